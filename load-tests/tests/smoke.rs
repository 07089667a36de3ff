//! Every scenario at tiny scale against the real server (`gochat::serve` in-process on
//! 127.0.0.1:0 with a temporary data directory), through the library API the binary uses:
//! nothing may fail, go missing or arrive twice, and every figure must be reported.

use std::path::Path;

use gochat_infra::config::Config;
use gochat_load::chat::{self, ChatOptions};
use gochat_load::churn::{self, ChurnOptions};
use gochat_load::fanout::{self, FanoutOptions, Room};
use gochat_load::guard::Target;
use gochat_load::report::Outcome;
use gochat_load::storm::{self, StormOptions};
use gochat_load::users::{self, User, UserOptions};

/// A running server; stopped (as SIGTERM would) when dropped.
struct Server {
    target: Target,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = Config::default();
        config.repo.argon2_memory_kib = 64;
        config.repo.argon2_iterations = 1;
        config.log.filter = "warn".into();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let options = gochat::ServeOptions { data_dir, listener };
            actix_rt::System::new().block_on(gochat::serve(&config, options, async move {
                let _ = rx.await;
            }))
        });
        Self {
            target: Target::loopback(addr).expect("loopback"),
            stop: Some(tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    async fn users(&self, count: usize, cache: Option<&Path>) -> Vec<User> {
        let opts = UserOptions {
            parallel: 8,
            cache: cache.map(Path::to_path_buf),
            ..UserOptions::default()
        };
        users::ensure(&self.target, &opts, count)
            .await
            .expect("users")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn show(outcome: &impl Outcome) {
    eprintln!("{}", outcome.table().render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_in_one_process() {
    let server = Server::start();
    let users = server.users(50, None).await;
    let opts = StormOptions {
        connections: 50,
        rate: 500.0,
        hold: 1,
        processes: 1,
        ..StormOptions::default()
    };
    let out = storm::run(&server.target, false, &users, &opts, false)
        .await
        .expect("storm");
    show(&out);
    assert!(out.passed(), "{out:?}");
    assert_eq!(out.connected, 50);
    assert_eq!(out.clean_closes, 50);
    assert!(out.failures.is_empty() && out.lost.is_empty(), "{out:?}");
    assert!(out.accept_per_sec > 0.0);
    assert_eq!(out.connect_latency.count, 50);
    assert!(out.connect_latency.p99_ms >= out.connect_latency.p50_ms);
    if Path::new("/proc/net/tcp").exists() {
        // The server runs in this very process.
        assert_eq!(out.server_pid, Some(std::process::id()));
        assert!(out.server_kib_per_connection.is_some(), "{out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_with_worker_processes() {
    let server = Server::start();
    let users = server.users(20, None).await;
    let opts = StormOptions {
        connections: 40,
        rate: 400.0,
        hold: 1,
        processes: 2,
        users: 20,
        worker_exe: Some(env!("CARGO_BIN_EXE_gochat-load").into()),
        ..StormOptions::default()
    };
    let out = storm::run(&server.target, false, &users, &opts, false)
        .await
        .expect("storm");
    show(&out);
    assert!(out.passed(), "{out:?}");
    assert_eq!(out.processes, 2);
    assert_eq!(out.connected, 40);
    assert_eq!(out.connect_latency.count, 40, "histograms merged");
    assert_eq!(out.nofile_limits.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_pairs_and_groups() {
    let server = Server::start();
    let cache = tempfile::tempdir().expect("tempdir");
    let cache_file = cache.path().join("users.json");
    let users = server.users(6, Some(&cache_file)).await;
    // A second run reuses the cached tokens.
    let again = server.users(6, Some(&cache_file)).await;
    assert_eq!(
        users.iter().map(|u| &u.token).collect::<Vec<_>>(),
        again.iter().map(|u| &u.token).collect::<Vec<_>>()
    );
    let opts = ChatOptions {
        users: 6,
        rate: 10.0,
        duration: 2,
        group_size: 3,
        group_share: 0.5,
        drain: 10,
        ..ChatOptions::default()
    };
    let out = chat::run(&server.target, &users, &opts, false)
        .await
        .expect("chat");
    show(&out);
    let t = &out.traffic;
    assert!(out.passed(), "{out:?}");
    assert_eq!((out.users_in_pairs, out.groups), (2, 1));
    assert_eq!(t.sent, 6 * 20);
    assert_eq!(t.stored, t.sent);
    // The pair: 1 recipient per message; the group of 4: 3.
    assert_eq!(t.expected_deliveries, 2 * 20 + 4 * 20 * 3);
    assert_eq!(t.delivered, t.expected_deliveries);
    assert_eq!(t.seq.delivered, t.delivered);
    assert_eq!((t.seq.gaps, t.seq.duplicates, t.seq.reordered), (0, 0, 0));
    assert_eq!(t.e2e.count, t.delivered);
    assert_eq!(t.ack.count, t.stored);
    assert!(t.stored_per_sec > 0.0 && t.delivered_per_sec > 0.0);

    // A second run in the same conversations starts from their current seq.
    let out = chat::run(&server.target, &users, &opts, false)
        .await
        .expect("chat again");
    assert!(out.passed(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_world_and_group() {
    let server = Server::start();
    let users = server.users(21, None).await;
    for room in [Room::World, Room::Group] {
        let opts = FanoutOptions {
            members: 20,
            room,
            rate: 10.0,
            duration: 2,
            drain: 10,
            ..FanoutOptions::default()
        };
        let out = fanout::run(&server.target, &users, &opts, false)
            .await
            .expect("fanout");
        show(&out);
        assert!(out.passed(), "{out:?}");
        assert_eq!(out.online, 20);
        assert_eq!(out.published, 20);
        assert_eq!(out.stored, 20);
        assert_eq!(out.delivered, 20 * 20);
        assert_eq!(out.recipient_latency.count, 400);
        assert_eq!(out.last_recipient_latency.count, 20);
        assert_eq!(out.incomplete_messages, 0);
        assert!(out.seq.clean(), "{:?}", out.seq);
        assert!(out.deliveries_per_sec > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_beside_traffic() {
    let server = Server::start();
    let opts = ChurnOptions {
        stable: 4,
        rate: 5.0,
        churners: 4,
        connects: 10.0,
        hold_ms: 200,
        duration: 3,
        drain: 10,
        ..ChurnOptions::default()
    };
    let users = server.users(opts.users(), None).await;
    let out = churn::run(&server.target, &users, &opts, false)
        .await
        .expect("churn");
    show(&out);
    assert!(out.passed(), "{out:?}");
    assert!(out.cycles > 0);
    assert_eq!(out.connected, out.cycles);
    assert_eq!(out.clean_closes, out.connected);
    assert_eq!(out.churn_ack.count, out.connected);
    assert_eq!(out.traffic.sent, 4 * 15);
    assert_eq!(out.traffic.delivered, out.traffic.expected_deliveries);
    assert!(out.traffic.seq.clean(), "{:?}", out.traffic.seq);
}
