//! `chat`: N users, some in single chats (pairs), the rest in groups, each sending M messages
//! per second into its conversation. Reports messages stored (acked) and delivered per second,
//! end-to-end latency (send → every recipient's `new-message`), ack latency, and the seq check
//! of every recipient stream (gaps, duplicates, reordering).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::client::Http;
use crate::guard::Target;
use crate::progress::{self, Counters};
use crate::report::{Outcome, Table};
use crate::traffic::{self, Layout, TrafficPlan, TrafficResult};
use crate::users::User;

/// Options of `gochat-load chat`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatOptions {
    /// Users (one connection each).
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Messages per second each user sends.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Members of each group.
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// Share of the users in groups (the rest are in pairs), 0..=1.
    #[arg(long, default_value_t = 0.5)]
    pub group_share: f64,
    /// Longest wait, in seconds, for outstanding acks and deliveries after sending.
    #[arg(long, default_value_t = 15)]
    pub drain: u64,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Connect + upgrade timeout, seconds.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            users: 2000,
            rate: 10.0,
            duration: 30,
            group_size: 8,
            group_share: 0.5,
            drain: 15,
            connect_rate: 2000.0,
            connect_timeout: 10,
        }
    }
}

impl ChatOptions {
    /// Users in pairs and the group sizes: groups of `group_size` take `group_share` of the
    /// users; the rest pair up (an odd one out joins the last group).
    pub fn split(&self) -> anyhow::Result<(usize, Vec<usize>)> {
        anyhow::ensure!(self.users >= 2, "--users must be at least 2");
        anyhow::ensure!(self.rate > 0.0, "--rate must be positive");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.group_share),
            "--group-share must be within 0..=1"
        );
        let size = self.group_size.max(2);
        let groups = ((self.users as f64 * self.group_share) as usize) / size;
        let mut sizes = vec![size; groups];
        let mut paired = self.users - groups * size;
        if paired % 2 == 1 {
            match sizes.last_mut() {
                Some(last) => *last += 1,
                None => anyhow::bail!("with no groups, --users must be even"),
            }
            paired -= 1;
        }
        Ok((paired, sizes))
    }
}

/// What `chat` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChatOutcome {
    pub scenario: &'static str,
    pub target: String,
    pub rate_per_user: f64,
    pub users_in_pairs: usize,
    pub groups: usize,
    pub group_size: usize,
    #[serde(flatten)]
    pub traffic: TrafficResult,
}

/// Runs `chat` with `users` (at least `opts.users` of them).
pub async fn run(
    target: &Target,
    users: &[User],
    opts: &ChatOptions,
    show_progress: bool,
) -> anyhow::Result<ChatOutcome> {
    let (paired, sizes) = opts.split()?;
    anyhow::ensure!(users.len() >= opts.users, "chat needs {} users", opts.users);
    let users = &users[..opts.users];
    let http = Http::new(target, 32)?;
    let mut layout = Layout::pairs(&http, &users[..paired], 32).await?;
    layout.add_groups(&http, users, paired, &sizes, 32).await?;

    let counters = Arc::new(Counters::default());
    let c = Arc::clone(&counters);
    let _ticker = progress::start("chat", show_progress, move || c.snapshot());
    let plan = TrafficPlan {
        rate: opts.rate,
        duration: Duration::from_secs(opts.duration),
        drain: Duration::from_secs(opts.drain),
        connect_rate: opts.connect_rate,
        connect_timeout: Duration::from_secs(opts.connect_timeout),
        first_source: 0,
    };
    let traffic = traffic::run(target, users, &layout, &plan, counters, None).await?;
    Ok(ChatOutcome {
        scenario: "chat",
        target: target.addr.to_string(),
        rate_per_user: opts.rate,
        users_in_pairs: paired,
        groups: sizes.len(),
        group_size: opts.group_size,
        traffic,
    })
}

/// The traffic rows shared by `chat` and `churn`.
pub fn traffic_rows(t: &mut Table, r: &TrafficResult) {
    t.row("users (connections)", r.users)
        .row("conversations", r.conversations)
        .rate("offered", r.offered_per_sec)
        .rate("sent", r.sent_per_sec)
        .rate("stored (acked)", r.stored_per_sec)
        .rate("delivered", r.delivered_per_sec)
        .row(
            "messages sent / stored",
            format!("{} / {}", r.sent, r.stored),
        )
        .row(
            "deliveries received / expected",
            format!("{} / {}", r.delivered, r.expected_deliveries),
        )
        .row("deliveries from earlier runs", r.foreign)
        .latency("e2e send -> new-message", &r.e2e)
        .latency("send -> ack", &r.ack)
        .latency("gateway dispatch -> read", &r.read_lag)
        .latency("connect + upgrade", &r.connect_latency)
        .row("seq gaps", r.seq.gaps)
        .row("not delivered by the end", r.seq.tail)
        .row("seq duplicates", r.seq.duplicates)
        .row("seq reordered", r.seq.reordered)
        .row("drained", if r.drained { "yes" } else { "no (time limit)" })
        .failures("connect failures", &r.connect_failures)
        .failures("connections lost", &r.lost)
        .failures("error frames", &r.errors);
}

impl Outcome for ChatOutcome {
    fn table(&self) -> Table {
        let mut t = Table::new(format!(
            "chat against {}: {} users in pairs, {} groups of ~{}, {} msg/s each",
            self.target, self.users_in_pairs, self.groups, self.group_size, self.rate_per_user
        ));
        traffic_rows(&mut t, &self.traffic);
        t
    }

    fn passed(&self) -> bool {
        self.traffic.passed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_split_into_pairs_and_groups() {
        let o = |users, share| ChatOptions {
            users,
            group_share: share,
            group_size: 8,
            ..ChatOptions::default()
        };
        assert_eq!(o(2000, 0.5).split().expect("split"), (1000, vec![8; 125]));
        assert_eq!(o(10, 0.0).split().expect("split"), (10, vec![]));
        let (paired, sizes) = o(21, 0.5).split().expect("split");
        assert_eq!((paired, sizes), (12, vec![9]));
        assert!(o(9, 0.0).split().is_err());
    }
}
