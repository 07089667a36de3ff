//! `storm`: N authenticated WebSocket connections opened at R per second, held, then closed.
//! Reports the accept rate, connect + upgrade latency, failures by cause, and the server's
//! memory per connection ((RSS while holding − RSS before) / N, from /proc).
//!
//! One process may hold at most ~20,000 files, so with `--processes P` (automatic past 15,000
//! connections) the parent re-executes itself P times as hidden `storm-worker` subcommands.
//! Worker `w` opens connections `w·N/P .. (w+1)·N/P` at R/P per second from its own source
//! addresses (slots `s ≡ w mod P` of 127.0.0.2 ..= 127.0.0.251), after raising its open-file
//! soft limit to the hard limit. The parent talks to each worker over its stdin and stdout,
//! one JSON line per message:
//!
//! - parent → worker: the [`WorkerSpec`], later `close`;
//! - worker → parent: [`WorkerMsg::Progress`] every second, [`WorkerMsg::Ready`] when every
//!   attempt has finished, [`WorkerMsg::Done`] with its [`WorkerResult`] (latency histogram as
//!   base64 of HdrHistogram's V2 encoding) after closing.
//!
//! The parent measures the server's memory once everything is ready, holds, tells every worker
//! to close, and merges the results into one report. Every wait is bounded: a worker that hears
//! nothing closes by itself after its deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Ws, now_micros};
use crate::guard::{self, SOURCE_ADDRS, Target};
use crate::progress::{self, Counters, Snapshot, dec, inc};
use crate::report::{self, Latency, Outcome, Recorder, Table, histogram, per_sec};
use crate::users::User;

/// Connections one worker process takes at most when `--processes` is automatic.
pub const PER_PROCESS: usize = 15_000;

/// Options of `gochat-load storm`.
#[derive(Debug, Clone, clap::Args)]
pub struct StormOptions {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 19_000)]
    pub connections: usize,
    /// New connections per second (over all processes).
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Seconds to hold every connection once all are open.
    #[arg(long, default_value_t = 30)]
    pub hold: u64,
    /// Worker processes (0: one per 15,000 connections; 1: everything in this process).
    #[arg(long, default_value_t = 0)]
    pub processes: usize,
    /// Distinct users (connection j authenticates as user j mod users; 0: one per connection).
    #[arg(long, default_value_t = 0)]
    pub users: usize,
    /// Connection attempts under way at once, per process.
    #[arg(long, default_value_t = 1000)]
    pub inflight: usize,
    /// Connect + upgrade timeout, seconds.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
    /// The server's pid, for its memory (default: the process listening on the target port).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The binary to run as workers (default: this one). Not a flag: tests set it.
    #[arg(skip)]
    pub worker_exe: Option<PathBuf>,
}

impl Default for StormOptions {
    fn default() -> Self {
        Self {
            connections: 19_000,
            rate: 5000.0,
            hold: 30,
            processes: 0,
            users: 0,
            inflight: 1000,
            connect_timeout: 10,
            server_pid: None,
            worker_exe: None,
        }
    }
}

impl StormOptions {
    /// Users the run needs.
    pub fn users_needed(&self) -> usize {
        if self.users == 0 {
            self.connections
        } else {
            self.users.min(self.connections)
        }
    }

    /// Worker processes the run uses.
    pub fn processes(&self) -> usize {
        if self.processes == 0 {
            self.connections.div_ceil(PER_PROCESS).max(1)
        } else {
            self.processes.min(SOURCE_ADDRS)
        }
    }
}

/// What one worker is told.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub worker: usize,
    pub server: SocketAddr,
    pub allow_remote: bool,
    /// One token per connection.
    pub tokens: Vec<String>,
    /// Source-address slots to cycle over.
    pub sources: Vec<usize>,
    /// New connections per second.
    pub rate: f64,
    pub inflight: usize,
    pub connect_timeout_ms: u64,
    /// The worker closes by itself this long after starting if not told to earlier.
    pub deadline_secs: u64,
}

/// What one worker reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub worker: usize,
    pub attempted: u64,
    pub connected: u64,
    /// Connections that could not be opened, by cause.
    pub failures: BTreeMap<String, u64>,
    /// Open connections lost before the close, by cause.
    pub lost: BTreeMap<String, u64>,
    /// Closes the server answered / did not answer in time.
    pub clean_closes: u64,
    pub unclean_closes: u64,
    /// First attempt and last successful upgrade (Unix µs).
    pub ramp_start_us: u64,
    pub ramp_end_us: u64,
    /// Connect + upgrade latency (µs), base64 of the V2 encoding.
    pub latency: String,
    /// The open-files soft limit the worker ran with.
    pub nofile: u64,
}

/// A worker's line on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum WorkerMsg {
    Progress { counters: Snapshot },
    Ready { connected: u64, failed: u64 },
    Done { result: Box<WorkerResult> },
}

/// What `storm` measured.
#[derive(Debug, Clone, Serialize)]
pub struct StormOutcome {
    pub scenario: &'static str,
    pub target: String,
    pub connections: usize,
    pub processes: usize,
    pub offered_rate: f64,
    pub attempted: u64,
    pub connected: u64,
    /// Connections opened per second, from the first attempt to the last success.
    pub accept_per_sec: f64,
    pub ramp_secs: f64,
    pub hold_secs: u64,
    pub connect_latency: Latency,
    pub failures: BTreeMap<String, u64>,
    pub lost: BTreeMap<String, u64>,
    pub clean_closes: u64,
    pub unclean_closes: u64,
    pub server_pid: Option<u32>,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_held_kib: Option<u64>,
    pub server_rss_after_close_kib: Option<u64>,
    /// (RSS while holding − RSS before) / connections held.
    pub server_kib_per_connection: Option<f64>,
    /// Each process's open-files limit.
    pub nofile_limits: Vec<u64>,
}

impl Outcome for StormOutcome {
    fn table(&self) -> Table {
        let mut t = Table::new(format!(
            "storm against {}: {} connections at {}/s from {} process(es), held {} s",
            self.target, self.connections, self.offered_rate, self.processes, self.hold_secs
        ));
        let kib = |v: Option<u64>| v.map_or("n/a".to_owned(), |k| format!("{k} KiB"));
        t.row(
            "connected / attempted",
            format!("{} / {}", self.connected, self.attempted),
        )
        .rate("accept rate", self.accept_per_sec)
        .row("ramp", format!("{:.2} s", self.ramp_secs))
        .latency("connect + upgrade", &self.connect_latency)
        .failures("connect failures", &self.failures)
        .failures("lost while held", &self.lost)
        .row(
            "closes answered / not",
            format!("{} / {}", self.clean_closes, self.unclean_closes),
        )
        .row(
            "server pid",
            self.server_pid
                .map_or("not found".to_owned(), |p| p.to_string()),
        )
        .row("server RSS before", kib(self.server_rss_before_kib))
        .row("server RSS holding", kib(self.server_rss_held_kib))
        .row(
            "server RSS after close",
            kib(self.server_rss_after_close_kib),
        )
        .row(
            "server memory per connection",
            self.server_kib_per_connection
                .map_or("n/a".to_owned(), |k| format!("{k:.2} KiB")),
        );
        t
    }

    fn passed(&self) -> bool {
        self.failures.is_empty()
            && self.lost.is_empty()
            && self.unclean_closes == 0
            && self.connected == self.connections as u64
    }
}

/// Raises this process's open-files soft limit to its hard limit; the limit in force.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// Runs `storm` (`allow_remote` is passed on to the workers, which check the target again).
pub async fn run(
    target: &Target,
    allow_remote: bool,
    users: &[User],
    opts: &StormOptions,
    show_progress: bool,
) -> anyhow::Result<StormOutcome> {
    anyhow::ensure!(opts.connections > 0, "--connections must be positive");
    anyhow::ensure!(opts.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(!users.is_empty(), "storm needs users");
    let processes = opts.processes();
    let n = opts.connections;
    let server_pid = opts
        .server_pid
        .or_else(|| crate::procfs::listener_pid(target.addr));
    let rss = || server_pid.and_then(crate::procfs::rss_kib);
    let rss_before = rss();
    let ramp_secs = n as f64 / opts.rate;
    let deadline_secs = (ramp_secs + opts.connect_timeout as f64) as u64 + opts.hold + 120;

    let specs: Vec<WorkerSpec> = (0..processes)
        .map(|w| WorkerSpec {
            worker: w,
            server: target.addr,
            allow_remote,
            tokens: (w * n / processes..(w + 1) * n / processes)
                .map(|j| users[j % users.len()].token.clone())
                .collect(),
            sources: (0..SOURCE_ADDRS).filter(|s| s % processes == w).collect(),
            rate: opts.rate / processes as f64,
            inflight: opts.inflight,
            connect_timeout_ms: opts.connect_timeout * 1000,
            deadline_secs,
        })
        .collect();

    let (msg_tx, mut msg_rx) = mpsc::unbounded_channel::<(usize, WorkerMsg)>();
    let (close_tx, close_rx) = watch::channel(false);
    let snapshots = Arc::new(Mutex::new(vec![Snapshot::default(); processes]));
    let mut children = Vec::new();
    if processes == 1 {
        let spec = specs.into_iter().next().context("one worker")?;
        let tx = msg_tx.clone();
        let mut close = close_rx.clone();
        children.push(Worker::InProcess(tokio::spawn(async move {
            let counters = Arc::new(Counters::default());
            let reporter = {
                let (c, tx) = (Arc::clone(&counters), tx.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        let _ = tx.send((
                            0,
                            WorkerMsg::Progress {
                                counters: c.snapshot(),
                            },
                        ));
                    }
                })
            };
            let ready_tx = tx.clone();
            let result = work(
                spec,
                counters,
                move |connected, failed| {
                    let _ = ready_tx.send((0, WorkerMsg::Ready { connected, failed }));
                },
                async move {
                    let _ = close.wait_for(|c| *c).await;
                },
            )
            .await;
            reporter.abort();
            let _ = tx.send((
                0,
                WorkerMsg::Done {
                    result: Box::new(result),
                },
            ));
        })));
    } else {
        let exe = match &opts.worker_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("finding this program to run workers")?,
        };
        for spec in specs {
            children.push(spawn_worker(&exe, spec, msg_tx.clone()).await?);
        }
    }
    drop(msg_tx);

    let snaps = Arc::clone(&snapshots);
    let ticker = progress::start("storm", show_progress, move || {
        snaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .fold(Snapshot::default(), |a, s| a.plus(*s))
    });

    // Wait for every worker to finish its ramp.
    let mut ready = vec![false; processes];
    let mut results: Vec<Option<WorkerResult>> = vec![None; processes];
    let ready_by = Instant::now() + Duration::from_secs(deadline_secs - opts.hold);
    while !ready.iter().all(|r| *r) {
        let Ok(Some((w, msg))) = tokio::time::timeout_at(ready_by.into(), msg_rx.recv()).await
        else {
            break;
        };
        on_msg(w, msg, &snapshots, &mut ready, &mut results);
    }
    // Let the server settle, then read its memory while everything is held.
    let held_from = Instant::now();
    let settle = Duration::from_secs(2).min(Duration::from_secs(opts.hold));
    pump_until(
        held_from + settle,
        &mut msg_rx,
        &snapshots,
        &mut ready,
        &mut results,
    )
    .await;
    let rss_held = rss();
    pump_until(
        held_from + Duration::from_secs(opts.hold),
        &mut msg_rx,
        &snapshots,
        &mut ready,
        &mut results,
    )
    .await;

    // Close, and collect every result.
    let _ = close_tx.send(true);
    for child in &mut children {
        child.close().await;
    }
    let done_by = Instant::now() + Duration::from_secs(60);
    while results.iter().any(Option::is_none) {
        match tokio::time::timeout_at(done_by.into(), msg_rx.recv()).await {
            Ok(Some((w, msg))) => on_msg(w, msg, &snapshots, &mut ready, &mut results),
            _ => break,
        }
    }
    for child in children {
        child.wait().await;
    }
    drop(ticker);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss();

    let mut out = StormOutcome {
        scenario: "storm",
        target: target.addr.to_string(),
        connections: n,
        processes,
        offered_rate: opts.rate,
        attempted: 0,
        connected: 0,
        accept_per_sec: 0.0,
        ramp_secs: 0.0,
        hold_secs: opts.hold,
        connect_latency: Latency::default(),
        failures: BTreeMap::new(),
        lost: BTreeMap::new(),
        clean_closes: 0,
        unclean_closes: 0,
        server_pid,
        server_rss_before_kib: rss_before,
        server_rss_held_kib: rss_held,
        server_rss_after_close_kib: rss_after,
        server_kib_per_connection: None,
        nofile_limits: Vec::new(),
    };
    let mut latency = histogram();
    let (mut start, mut end) = (u64::MAX, 0);
    for (w, r) in results.into_iter().enumerate() {
        let Some(r) = r else {
            *out.failures
                .entry(format!("worker {w} reported nothing"))
                .or_default() += 1;
            continue;
        };
        out.attempted += r.attempted;
        out.connected += r.connected;
        out.clean_closes += r.clean_closes;
        out.unclean_closes += r.unclean_closes;
        for (k, v) in r.failures {
            *out.failures.entry(k).or_default() += v;
        }
        for (k, v) in r.lost {
            *out.lost.entry(k).or_default() += v;
        }
        if r.connected > 0 {
            start = start.min(r.ramp_start_us);
            end = end.max(r.ramp_end_us);
        }
        let _ = latency.add(report::decode(&r.latency)?);
        out.nofile_limits.push(r.nofile);
    }
    if end > start {
        out.ramp_secs = (end - start) as f64 / 1e6;
        out.accept_per_sec = per_sec(out.connected, out.ramp_secs);
    }
    out.connect_latency = Latency::of(&latency);
    if let (Some(b), Some(h)) = (rss_before, rss_held)
        && out.connected > 0
    {
        out.server_kib_per_connection = Some((h as f64 - b as f64) / out.connected as f64);
    }
    Ok(out)
}

fn on_msg(
    w: usize,
    msg: WorkerMsg,
    snapshots: &Mutex<Vec<Snapshot>>,
    ready: &mut [bool],
    results: &mut [Option<WorkerResult>],
) {
    match msg {
        WorkerMsg::Progress { counters } => {
            if let Some(s) = snapshots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(w)
            {
                *s = counters;
            }
        }
        WorkerMsg::Ready { .. } => {
            if let Some(r) = ready.get_mut(w) {
                *r = true;
            }
        }
        WorkerMsg::Done { result } => {
            if let Some(r) = ready.get_mut(w) {
                *r = true;
            }
            if let Some(slot) = results.get_mut(w) {
                *slot = Some(*result);
            }
        }
    }
}

async fn pump_until(
    until: Instant,
    rx: &mut mpsc::UnboundedReceiver<(usize, WorkerMsg)>,
    snapshots: &Mutex<Vec<Snapshot>>,
    ready: &mut [bool],
    results: &mut [Option<WorkerResult>],
) {
    loop {
        match tokio::time::timeout_at(until.into(), rx.recv()).await {
            Ok(Some((w, msg))) => on_msg(w, msg, snapshots, ready, results),
            Ok(None) => {
                tokio::time::sleep_until(until.into()).await;
                return;
            }
            Err(_) => return,
        }
    }
}

/// A worker: a task of this process, or a child process.
#[derive(Debug)]
enum Worker {
    InProcess(tokio::task::JoinHandle<()>),
    Child {
        child: Box<tokio::process::Child>,
        stdin: Option<tokio::process::ChildStdin>,
        reader: tokio::task::JoinHandle<()>,
    },
}

impl Worker {
    /// Tells a child to close (the in-process worker follows the close channel).
    async fn close(&mut self) {
        if let Self::Child { stdin, .. } = self
            && let Some(mut s) = stdin.take()
        {
            let _ = s.write_all(b"close\n").await;
            let _ = s.flush().await;
        }
    }

    /// Waits for the worker to end (a child that does not within 30 s is killed).
    async fn wait(self) {
        match self {
            Self::InProcess(h) => {
                let _ = h.await;
            }
            Self::Child {
                mut child, reader, ..
            } => {
                if tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
                let _ = reader.await;
            }
        }
    }
}

async fn spawn_worker(
    exe: &std::path::Path,
    spec: WorkerSpec,
    tx: mpsc::UnboundedSender<(usize, WorkerMsg)>,
) -> anyhow::Result<Worker> {
    let w = spec.worker;
    let mut child = tokio::process::Command::new(exe)
        .arg("storm-worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting worker {w} ({})", exe.display()))?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut line = serde_json::to_vec(&spec)?;
    line.push(b'\n');
    stdin.write_all(&line).await?;
    stdin.flush().await?;
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            match serde_json::from_str::<WorkerMsg>(&l) {
                Ok(m) => {
                    let _ = tx.send((w, m));
                }
                Err(_) => eprintln!("[storm worker {w}] {l}"),
            }
        }
    });
    Ok(Worker::Child {
        child: Box::new(child),
        stdin: Some(stdin),
        reader,
    })
}

/// The hidden `storm-worker` subcommand: reads its spec from stdin, raises its open-files
/// limit, opens and holds its connections, and closes them on `close` (or end of input, or its
/// deadline), speaking JSON lines on stdout.
pub async fn worker_main() -> anyhow::Result<()> {
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    let first = input
        .next_line()
        .await?
        .context("storm-worker: no spec on stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("storm-worker: bad spec")?;
    // The parent checked the target already; check again, a worker is a program too.
    guard::resolve(&spec.server.to_string(), spec.allow_remote).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<WorkerMsg>();
    let printer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(m) = rx.recv().await {
            if let Ok(mut line) = serde_json::to_vec(&m) {
                line.push(b'\n');
                if out.write_all(&line).await.is_err() {
                    break;
                }
                let _ = out.flush().await;
            }
        }
    });
    let counters = Arc::new(Counters::default());
    let reporter = {
        let (c, tx) = (Arc::clone(&counters), tx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let _ = tx.send(WorkerMsg::Progress {
                    counters: c.snapshot(),
                });
            }
        })
    };
    let deadline = Duration::from_secs(spec.deadline_secs);
    let ready_tx = tx.clone();
    let result = work(
        spec,
        counters,
        move |connected, failed| {
            let _ = ready_tx.send(WorkerMsg::Ready { connected, failed });
        },
        async move {
            // `close`, or the parent went away, or the deadline.
            let _ = tokio::time::timeout(deadline, input.next_line()).await;
        },
    )
    .await;
    reporter.abort();
    let _ = tx.send(WorkerMsg::Done {
        result: Box::new(result),
    });
    drop(tx);
    let _ = printer.await;
    Ok(())
}

/// How one held connection ended.
enum HeldEnd {
    Failed(String),
    Lost(String),
    Closed(bool),
}

/// One worker's job: open every connection of `spec` on schedule, call `ready` once every
/// attempt has finished, hold until `close` resolves, close everything.
pub async fn work(
    spec: WorkerSpec,
    counters: Arc<Counters>,
    ready: impl FnOnce(u64, u64),
    close: impl std::future::Future<Output = ()>,
) -> WorkerResult {
    let nofile = raise_nofile();
    let target = Target { addr: spec.server };
    let n = spec.tokens.len();
    let latency = Arc::new(Recorder::default());
    let attempts_done = Arc::new(AtomicU64::new(0));
    let ramp_end_us = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(spec.inflight.max(1)));
    let (close_tx, close_rx) = watch::channel(false);
    let timeout = Duration::from_millis(spec.connect_timeout_ms);
    let start = tokio::time::Instant::now();
    let ramp_start_us = now_micros();
    let rate = spec.rate.max(0.001);
    let sources = if spec.sources.is_empty() {
        vec![0]
    } else {
        spec.sources.clone()
    };
    let mut tasks = Vec::with_capacity(n);
    for (j, token) in spec.tokens.into_iter().enumerate() {
        let at = start + Duration::from_secs_f64(j as f64 / rate);
        let source = target.source(sources[j % sources.len()]);
        let (target, permits, counters, latency, done, ramp_end, close_rx) = (
            target.clone(),
            Arc::clone(&permits),
            Arc::clone(&counters),
            Arc::clone(&latency),
            Arc::clone(&attempts_done),
            Arc::clone(&ramp_end_us),
            close_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let permit = permits.acquire_owned().await;
            let began = Instant::now();
            let r = client::connect(&target, source, &token, timeout).await;
            drop(permit);
            let ws = match r {
                Ok(ws) => {
                    latency.record(u64::try_from(began.elapsed().as_micros()).unwrap_or(0));
                    ramp_end.fetch_max(now_micros(), Ordering::Relaxed);
                    inc(&counters.connected);
                    done.fetch_add(1, Ordering::Relaxed);
                    ws
                }
                Err(e) => {
                    inc(&counters.failed);
                    done.fetch_add(1, Ordering::Relaxed);
                    return HeldEnd::Failed(e.cause());
                }
            };
            let end = hold(ws, close_rx).await;
            dec(&counters.connected);
            if matches!(end, HeldEnd::Lost(_)) {
                inc(&counters.failed);
            }
            end
        }));
    }
    let n64 = n as u64;
    let ramp_deadline = start + Duration::from_secs(spec.deadline_secs);
    while attempts_done.load(Ordering::Relaxed) < n64 && tokio::time::Instant::now() < ramp_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = counters.snapshot();
    ready(s.connected, s.failed);
    close.await;
    let _ = close_tx.send(true);

    let mut out = WorkerResult {
        worker: spec.worker,
        attempted: n64,
        ramp_start_us,
        ramp_end_us: ramp_end_us.load(Ordering::Relaxed),
        nofile,
        ..WorkerResult::default()
    };
    for t in tasks {
        match t.await {
            Ok(HeldEnd::Failed(cause)) => *out.failures.entry(cause).or_default() += 1,
            Ok(HeldEnd::Lost(cause)) => {
                out.connected += 1;
                *out.lost.entry(cause).or_default() += 1;
            }
            Ok(HeldEnd::Closed(clean)) => {
                out.connected += 1;
                if clean {
                    out.clean_closes += 1;
                } else {
                    out.unclean_closes += 1;
                }
            }
            Err(e) => *out.failures.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    out.latency = report::encode(&latency.merged()).unwrap_or_default();
    out
}

/// Holds `ws` (answering nothing, pinging every 30 s so the server's heartbeat stays happy)
/// until `close` flips, then closes it.
async fn hold(mut ws: Ws, mut close: watch::Receiver<bool>) -> HeldEnd {
    let mut ping = tokio::time::interval(Duration::from_secs(30));
    ping.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = close.changed() => break,
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(cf))) => {
                    let code = cf.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return HeldEnd::Lost(format!("closed by server ({code})"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let short: String = e.to_string().chars().take(60).collect();
                    return HeldEnd::Lost(format!("read error: {short}"));
                }
                None => return HeldEnd::Lost("connection ended".to_owned()),
            },
            _ = ping.tick() => {
                if client::send_text(&mut ws, client::PING.to_owned()).await.is_err() {
                    return HeldEnd::Lost("write error".to_owned());
                }
            }
        }
    }
    HeldEnd::Closed(client::close(&mut ws, Duration::from_secs(10)).await)
}
