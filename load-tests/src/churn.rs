//! `churn`: steady connects and disconnects while traffic flows. Stable users chat in pairs
//! for the whole run (the `chat` engine, seq-checked); meanwhile churners connect at a steady
//! rate, each sends one message to its own pair conversation, waits for the ack, holds the
//! connection a moment and closes it, then becomes available for another cycle.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::chat::traffic_rows;
use crate::client::{self, Http, Ws, now_micros};
use crate::guard::Target;
use crate::progress::{self, Counters};
use crate::report::{Latency, Outcome, Recorder, Table, per_sec};
use crate::traffic::{self, Layout, Phase, TrafficPlan, TrafficResult};
use crate::users::User;

/// Options of `gochat-load churn`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChurnOptions {
    /// Users that stay connected and chat in pairs for the whole run.
    #[arg(long, default_value_t = 1000)]
    pub stable: usize,
    /// Messages per second each stable user sends.
    #[arg(long, default_value_t = 0.5)]
    pub rate: f64,
    /// Users that connect and disconnect over and over (in pairs of their own).
    #[arg(long, default_value_t = 1000)]
    pub churners: usize,
    /// Churn connections opened per second.
    #[arg(long, default_value_t = 200.0)]
    pub connects: f64,
    /// How long a churn connection stays open, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub hold_ms: u64,
    /// Seconds of traffic and churn.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Longest wait, in seconds, for outstanding acks and deliveries after sending.
    #[arg(long, default_value_t = 15)]
    pub drain: u64,
    /// New connections per second while connecting the stable users.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Connect + upgrade timeout, seconds.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
}

impl Default for ChurnOptions {
    fn default() -> Self {
        Self {
            stable: 1000,
            rate: 0.5,
            churners: 1000,
            connects: 200.0,
            hold_ms: 1000,
            duration: 30,
            drain: 15,
            connect_rate: 2000.0,
            connect_timeout: 10,
        }
    }
}

impl ChurnOptions {
    /// Users the run needs.
    pub fn users(&self) -> usize {
        self.stable + self.churners
    }
}

/// What `churn` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnOutcome {
    pub scenario: &'static str,
    pub target: String,
    /// Churn connections attempted.
    pub cycles: u64,
    /// Churn connections opened.
    pub connected: u64,
    /// Churn connections opened per second of the run.
    pub connects_per_sec: f64,
    /// Churn connections closed with the server's close answered.
    pub clean_closes: u64,
    /// Cycles skipped because every churner was busy (too few churners for the rate × hold).
    pub skipped_busy: u64,
    pub connect_latency: Latency,
    /// Churn send → ack.
    pub churn_ack: Latency,
    /// Churn connections that failed to open, by cause.
    pub connect_failures: BTreeMap<String, u64>,
    /// Open churn connections that misbehaved (no ack, close unanswered), by cause.
    pub churn_failures: BTreeMap<String, u64>,
    /// The stable users' chat.
    pub traffic: TrafficResult,
}

impl Outcome for ChurnOutcome {
    fn table(&self) -> Table {
        let mut t = Table::new(format!(
            "churn against {}: {} churn connects/s beside {} chatting users",
            self.target,
            self.connects_per_sec.round(),
            self.traffic.users
        ));
        t.row(
            "churn cycles attempted / connected",
            format!("{} / {}", self.cycles, self.connected),
        )
        .rate("churn connects", self.connects_per_sec)
        .row("churn clean closes", self.clean_closes)
        .row("cycles skipped (all churners busy)", self.skipped_busy)
        .latency("churn connect + upgrade", &self.connect_latency)
        .latency("churn send -> ack", &self.churn_ack)
        .failures("churn connect failures", &self.connect_failures)
        .failures("churn connection failures", &self.churn_failures)
        .row("-- stable traffic --", "");
        traffic_rows(&mut t, &self.traffic);
        t
    }

    fn passed(&self) -> bool {
        self.traffic.passed() && self.connect_failures.is_empty() && self.churn_failures.is_empty()
    }
}

#[derive(Debug, Default)]
struct ChurnState {
    cycles: u64,
    connected: u64,
    clean_closes: u64,
    skipped_busy: u64,
    connect_failures: BTreeMap<String, u64>,
    churn_failures: BTreeMap<String, u64>,
}

/// Runs `churn` with `users` (at least `opts.users()`: stable first, then churners).
pub async fn run(
    target: &Target,
    users: &[User],
    opts: &ChurnOptions,
    show_progress: bool,
) -> anyhow::Result<ChurnOutcome> {
    anyhow::ensure!(
        opts.stable >= 2 && opts.stable.is_multiple_of(2),
        "--stable must be even and at least 2"
    );
    anyhow::ensure!(
        opts.churners >= 2 && opts.churners.is_multiple_of(2),
        "--churners must be even and at least 2"
    );
    anyhow::ensure!(opts.connects > 0.0, "--connects must be positive");
    anyhow::ensure!(
        users.len() >= opts.users(),
        "churn needs {} users",
        opts.users()
    );
    let stable = &users[..opts.stable];
    let churners = users[opts.stable..opts.users()].to_vec();
    let http = Http::new(target, 32)?;
    let stable_layout = Layout::pairs(&http, stable, 32).await?;
    let churn_layout = Layout::pairs(&http, &churners, 32).await?;

    let counters = Arc::new(Counters::default());
    let c = Arc::clone(&counters);
    let _ticker = progress::start("churn", show_progress, move || c.snapshot());
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let state = Arc::new(Mutex::new(ChurnState::default()));
    let connect_hist = Arc::new(Recorder::default());
    let ack_hist = Arc::new(Recorder::default());
    let churn = tokio::spawn(churn_loop(ChurnCtx {
        target: target.clone(),
        churners,
        conversations: churn_layout
            .conversation_of
            .iter()
            .map(|&k| churn_layout.conversations[k].id.clone())
            .collect(),
        opts: opts.clone(),
        state: Arc::clone(&state),
        connect_hist: Arc::clone(&connect_hist),
        ack_hist: Arc::clone(&ack_hist),
        phase: phase_rx,
    }));
    let plan = TrafficPlan {
        rate: opts.rate,
        duration: Duration::from_secs(opts.duration),
        drain: Duration::from_secs(opts.drain),
        connect_rate: opts.connect_rate,
        connect_timeout: Duration::from_secs(opts.connect_timeout),
        first_source: 0,
    };
    let traffic = traffic::run(
        target,
        stable,
        &stable_layout,
        &plan,
        counters,
        Some(phase_tx),
    )
    .await?;
    churn
        .await
        .map_err(|e| anyhow::anyhow!("the churn loop failed: {e}"))?;
    let st = std::mem::take(&mut *state.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(ChurnOutcome {
        scenario: "churn",
        target: target.addr.to_string(),
        cycles: st.cycles,
        connected: st.connected,
        connects_per_sec: per_sec(st.connected, opts.duration as f64),
        clean_closes: st.clean_closes,
        skipped_busy: st.skipped_busy,
        connect_latency: Latency::of(&connect_hist.merged()),
        churn_ack: Latency::of(&ack_hist.merged()),
        connect_failures: st.connect_failures,
        churn_failures: st.churn_failures,
        traffic,
    })
}

#[derive(Debug)]
struct ChurnCtx {
    target: Target,
    churners: Vec<User>,
    /// Each churner's pair conversation.
    conversations: Vec<String>,
    opts: ChurnOptions,
    state: Arc<Mutex<ChurnState>>,
    connect_hist: Arc<Recorder>,
    ack_hist: Arc<Recorder>,
    phase: watch::Receiver<Phase>,
}

/// Waits for the traffic's sending phase, then starts `connects` cycles per second until it
/// ends, each on an idle churner; waits for the cycles under way.
async fn churn_loop(mut ctx: ChurnCtx) {
    let (start, end) = loop {
        if let Phase::Sending(s, e) = *ctx.phase.borrow_and_update() {
            break (s, e);
        }
        if ctx.phase.changed().await.is_err() {
            return;
        }
    };
    let (idle_tx, mut idle_rx) = tokio::sync::mpsc::channel(ctx.churners.len());
    for i in 0..ctx.churners.len() {
        let _ = idle_tx.try_send(i);
    }
    let ctx = Arc::new(ctx);
    let tag = format!("{:08x}", rand::random::<u32>());
    let mut cycles = Vec::new();
    for k in 0u64.. {
        let at = start + Duration::from_secs_f64(k as f64 / ctx.opts.connects);
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let Ok(i) = idle_rx.try_recv() else {
            ctx.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .skipped_busy += 1;
            continue;
        };
        let (ctx, idle_tx, tag) = (Arc::clone(&ctx), idle_tx.clone(), tag.clone());
        cycles.push(tokio::spawn(async move {
            cycle(&ctx, i, k, &tag).await;
            let _ = idle_tx.send(i).await;
        }));
    }
    for c in cycles {
        let _ = c.await;
    }
}

/// One churn cycle of churner `i`: connect, send, await the ack, hold, close.
async fn cycle(ctx: &ChurnCtx, i: usize, k: u64, tag: &str) {
    let user = &ctx.churners[i];
    let began = Instant::now();
    ctx.state.lock().unwrap_or_else(|e| e.into_inner()).cycles += 1;
    let source = ctx.target.source(ctx.opts.stable + i);
    let timeout = Duration::from_secs(ctx.opts.connect_timeout);
    let mut ws = match client::connect(&ctx.target, source, &user.token, timeout).await {
        Ok(ws) => ws,
        Err(e) => {
            let mut st = ctx.state.lock().unwrap_or_else(|e| e.into_inner());
            *st.connect_failures.entry(e.cause()).or_default() += 1;
            return;
        }
    };
    ctx.connect_hist
        .record(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX));
    ctx.state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .connected += 1;
    let failure = |cause: &str| {
        let mut st = ctx.state.lock().unwrap_or_else(|e| e.into_inner());
        *st.churn_failures.entry(cause.to_owned()).or_default() += 1;
    };
    let sent = now_micros();
    let cmid = format!("{tag}.{k}.{sent}");
    let frame = client::send_message(&ctx.conversations[i], &format!("{tag}:{k}:{sent}"), &cmid);
    if client::send_text(&mut ws, frame).await.is_err() {
        failure("write error");
        return;
    }
    match tokio::time::timeout(Duration::from_secs(5), await_ack(&mut ws, &cmid)).await {
        Ok(Ok(())) => ctx.ack_hist.record(now_micros().saturating_sub(sent)),
        Ok(Err(cause)) => {
            failure(&cause);
            return;
        }
        Err(_) => failure("no ack within 5 s"),
    }
    let hold = Duration::from_millis(ctx.opts.hold_ms);
    let _ = tokio::time::timeout(hold.saturating_sub(began.elapsed()), drain_frames(&mut ws)).await;
    if client::close(&mut ws, Duration::from_secs(5)).await {
        ctx.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clean_closes += 1;
    } else {
        failure("close not answered");
    }
}

/// Reads until the ack of `cmid`; Err(cause) when the connection fails or the send is refused.
async fn await_ack(ws: &mut Ws, cmid: &str) -> Result<(), String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let Some(f) = client::parse(&text) else {
                    continue;
                };
                let mine = f.data.client_msg_id.as_deref() == Some(cmid);
                match f.kind.as_ref() {
                    "message-ack" if mine => return Ok(()),
                    "error" if mine => {
                        return Err(format!("send refused: error {}", f.data.code.unwrap_or(0)));
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Close(cf))) => {
                let code = cf.map(|f| u16::from(f.code)).unwrap_or(1005);
                return Err(format!("closed by server ({code})"));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err("connection broke".to_owned()),
        }
    }
}

/// Reads and drops frames (keeps the connection's queue empty while it is held).
async fn drain_frames(ws: &mut Ws) {
    while let Some(Ok(_)) = ws.next().await {}
}
