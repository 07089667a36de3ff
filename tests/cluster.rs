//! The distributed mode end to end: the real `gochat` binary, each service in its own process
//! (`gochat repo|logic|gateway|task`), joined by Kafka (a Kafka-compatible broker), etcd and
//! gRPC, with MariaDB and Redis behind repo: the servers `scripts/services.sh up` starts. The
//! variables naming them (`eval "$(scripts/services.sh env)"`, done by `scripts/test.sh`) are
//! required: a missing one fails the test with a message, nothing is skipped.
//!
//! Every cluster is isolated: its own MariaDB database, Redis namespace, etcd prefix and Kafka
//! namespace (topic and group prefix), so the tests run side by side on shared servers. Each
//! process logs to a file in the cluster's temporary directory; a failing test prints the tail
//! of every log.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Server, WAIT, Ws, assert_online, big_group, get, post, single, tag, user};
use serde_json::{Value, json};

/// The cluster's `[admin] token`.
const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789";

/// `GET url` (an `/admin/actors`) with the admin token, repeated until its `bus_lag` holds a
/// group whose name starts with `group` (each process reads its group's lag from Kafka every
/// few seconds).
async fn admin_with_lag(url: &str, group: &str) -> Value {
    let (st, _) = get(url, None).await;
    assert_eq!(st, 401, "{url} without the admin token");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (st, report) = get(url, Some(ADMIN_TOKEN)).await;
        assert_eq!(st, 200, "{url}: {report}");
        let lags = report["bus_lag"].as_object().expect("bus_lag");
        if lags
            .iter()
            .any(|(name, lag)| name.starts_with(group) && lag.is_u64())
        {
            return report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url}: no lag of {group}: {report}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A server variable the cluster needs.
fn required(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "the cluster tests need {var}: run `scripts/services.sh up` and \
             `eval \"$(scripts/services.sh env)\"` (scripts/test.sh does both)"
        )
    })
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One `gochat` process.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// `kill -9`: no cleanup, no deregistration, no commits.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill9();
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A whole cluster on the test servers.
struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    db_url: String,
    procs: BTreeMap<String, Proc>,
    ports: HashMap<String, u16>,
}

impl Cluster {
    /// Writes the cluster's configuration and creates its database.
    fn new() -> Self {
        let mysql = required("GOCHAT_TEST_MYSQL_URL");
        let redis = required("GOCHAT_TEST_REDIS_URL");
        let kafka = required("GOCHAT_TEST_KAFKA_BROKERS");
        let etcd = required("GOCHAT_TEST_ETCD_ENDPOINTS");
        let t = tag();
        let dir = tempfile::tempdir().expect("tempdir");
        let db_url = format!("{}/gochat_cl_{t}", mysql.trim_end_matches('/'));
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                r#"[database]
url = "{db_url}"
pool_size = 8

[cache]
backend = "redis"
redis_url = "{redis}"
namespace = "gochat-cl-{t}:"

[repo]
argon2_memory_kib = 64
argon2_iterations = 1
presence_ttl_secs = 6

[auth]
jwt_secret = "cluster-test-secret-0123456789abcdef"

[admin]
token = "{ADMIN_TOKEN}"

[gateway]
id = "auto"

[logic]
idle_timeout_secs = 30

[bus]
backend = "kafka"
brokers = "{kafka}"
namespace = "cl-{t}"
partitions = 4
session_timeout_ms = 6000

# tansu 0.6 (the test broker) loses the rest of a multi-record batch when a consumer resumes
# inside it; one record per batch avoids that. Apache Kafka does not need this.
[bus.properties]
"batch.num.messages" = "1"
"partition.assignment.strategy" = "roundrobin"

[discovery]
backend = "etcd"
etcd_endpoints = ["{etcd}"]
prefix = "/gochat-test-{t}"
lease_ttl_secs = 3

[rpc]
timeout_ms = 10000

[log]
filter = "info"
"#
            ),
        )
        .expect("write the cluster config");
        let c = Self {
            dir,
            config,
            db_url,
            procs: BTreeMap::new(),
            ports: HashMap::new(),
        };
        let status = c
            .command(&["migrate", "--create-database"])
            .status()
            .expect("run gochat migrate");
        assert!(status.success(), "gochat migrate --create-database failed");
        c
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gochat"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(args)
            .env_remove("RUST_LOG");
        // Only this cluster's configuration: no stray GOCHAT_<SECTION>__<FIELD> from outside.
        for (k, _) in std::env::vars() {
            if k.starts_with("GOCHAT_") && k.contains("__") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    /// Starts `gochat <args>` as process `name` (its log in the cluster directory).
    fn spawn(&mut self, name: &str, args: &[&str]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = self
            .command(args)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn gochat");
        self.procs.insert(name.to_owned(), Proc { child, log });
    }

    /// Where process `name` serves `/metrics` and `/healthz`.
    fn metrics_listen(&mut self, name: &str) -> String {
        format!("127.0.0.1:{}", self.port(&format!("{name}-metrics")))
    }

    /// The Prometheus text of process `name`.
    async fn metrics(&mut self, name: &str) -> String {
        let url = format!("http://{}/metrics", self.metrics_listen(name));
        let (st, _) = get(&url.replace("/metrics", "/healthz"), None).await;
        assert_eq!(st, 200, "{name} /healthz");
        let resp = reqwest::Client::new()
            .get(&url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("metrics");
        assert_eq!(resp.status(), 200, "{name} /metrics with the admin token");
        resp.text().await.expect("metrics text")
    }

    /// `/admin/actors` of process `name` (on its metrics listener) once `bus_lag` holds
    /// `group`.
    async fn admin(&mut self, name: &str, group: &str) -> Value {
        let url = format!("http://{}/admin/actors", self.metrics_listen(name));
        admin_with_lag(&url, group).await
    }

    /// The port of `name`, the same across restarts.
    fn port(&mut self, name: &str) -> u16 {
        *self.ports.entry(name.to_owned()).or_insert_with(free_port)
    }

    /// Starts repo and waits until it accepts connections.
    async fn repo(&mut self, name: &str) {
        let port = self.port(name);
        let listen = format!("127.0.0.1:{port}");
        let metrics = self.metrics_listen(name);
        self.spawn(
            name,
            &["repo", "--listen", &listen, "--metrics-listen", &metrics],
        );
        self.wait_tcp(name, port).await;
    }

    /// Starts a logic instance.
    async fn logic(&mut self, name: &str) {
        let port = self.port(name);
        let listen = format!("127.0.0.1:{port}");
        let metrics = self.metrics_listen(name);
        self.spawn(
            name,
            &["logic", "--listen", &listen, "--metrics-listen", &metrics],
        );
        self.wait_tcp(name, port).await;
    }

    /// Starts a gateway (id claimed in etcd) and waits for `/healthz`.
    async fn gateway(&mut self, name: &str) -> Server {
        let port = self.port(name);
        let listen = format!("127.0.0.1:{port}");
        self.spawn(name, &["gateway", "--listen", &listen]);
        let addr: SocketAddr = listen.parse().expect("addr");
        let url = format!("http://{addr}/healthz");
        for _ in 0..600 {
            self.check_alive(name);
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return Server::external(addr);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.fail(&format!("{name} did not answer /healthz"));
    }

    /// Starts the task service and waits until it consumes.
    async fn task(&mut self, name: &str) {
        let metrics = self.metrics_listen(name);
        self.spawn(name, &["task", "--metrics-listen", &metrics]);
        for _ in 0..600 {
            self.check_alive(name);
            if self.procs[name].log_text().contains("task consuming") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.fail(&format!("{name} did not start consuming"));
    }

    async fn wait_tcp(&mut self, name: &str, port: u16) {
        for _ in 0..600 {
            self.check_alive(name);
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.fail(&format!("{name} did not listen on {port}"));
    }

    fn check_alive(&mut self, name: &str) {
        let alive = self.procs.get_mut(name).is_some_and(Proc::alive);
        if !alive {
            self.fail(&format!("{name} exited"));
        }
    }

    fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs.get_mut(name).expect("a started process")
    }

    /// Fails the test with every process's log tail.
    fn fail(&self, why: &str) -> ! {
        self.dump();
        panic!("{why}");
    }

    fn dump(&self) {
        for (name, p) in &self.procs {
            let text = p.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("----- {name} ({}) -----", p.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }

    /// The standard cluster: 1 repo, 2 logic, 2 gateways, 1 task.
    async fn standard() -> (Self, Server, Server) {
        let mut c = Self::new();
        c.repo("repo").await;
        c.logic("logic-1").await;
        c.logic("logic-2").await;
        c.task("task").await;
        let g1 = c.gateway("gw-a").await;
        let g2 = c.gateway("gw-b").await;
        (c, g1, g2)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        for p in self.procs.values_mut() {
            p.stop();
        }
        drop_database(&self.db_url);
    }
}

/// Drops a cluster's database (best effort, with the mariadb client).
fn drop_database(url: &str) {
    let Some(rest) = url.strip_prefix("mysql://") else {
        return;
    };
    let Some((auth_host, db)) = rest.rsplit_once('/') else {
        return;
    };
    let (auth, host) = auth_host.rsplit_once('@').unwrap_or(("root", auth_host));
    let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
    let (host, port) = host.split_once(':').unwrap_or((host, "3306"));
    let mut cmd = Command::new("mariadb");
    cmd.args(["-h", host, "-P", port, "-u", user]);
    if !pass.is_empty() {
        cmd.arg(format!("-p{pass}"));
    }
    let _ = cmd
        .arg("-e")
        .arg(format!("DROP DATABASE IF EXISTS `{db}`"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The acked (message_id, seq) of `cmid` on `ws`, resending the same message whenever no ack
/// comes within `patience` (a send whose logic died is retried, as a client would).
async fn send_until_acked(
    ws: &mut Ws,
    conv: &str,
    content: &str,
    cmid: &str,
    patience: Duration,
) -> (String, i64) {
    for _ in 0..20 {
        ws.send_message(conv, content, cmid).await;
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let Ok(frame) = tokio::time::timeout(left, ws.next()).await else {
                break;
            };
            let f = frame.expect("the connection stays open");
            match f["type"].as_str() {
                Some("message-ack") if f["data"]["client_msg_id"] == cmid => {
                    return (
                        f["data"]["message_id"].as_str().expect("id").to_owned(),
                        f["data"]["seq_id"].as_i64().expect("seq"),
                    );
                }
                // An error for this send (e.g. repo unreachable for a moment): send it again.
                Some("error") if f["data"]["client_msg_id"] == cmid => break,
                _ => {}
            }
        }
    }
    panic!("{cmid} was never acknowledged");
}

/// The whole history of `conv` as `user` sees it, ascending, over HTTP.
async fn history(s: &Server, token: &str, conv: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut after = 0;
    loop {
        let (st, body) = get(
            &s.url(&format!(
                "/conversations/{conv}/messages?after_seq={after}&limit=100"
            )),
            Some(token),
        )
        .await;
        assert_eq!(st, 200, "history: {body}");
        let page = body["messages"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return out;
        }
        after = page
            .iter()
            .filter_map(|m| m["seq_id"].as_i64())
            .max()
            .expect("seqs");
        out.extend(page);
        if body["has_more"] != true {
            return out;
        }
    }
}

/// The value of the sample `series` (exact name and labels) in Prometheus text, 0 if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Users on different gateways chat 1:1 and in a group; a 600-member group and the world room
/// go through task to members on both gateways. Every service exports its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_two_logic_chat_group_and_task_fanout() {
    let (mut cluster, g1, g2) = Cluster::standard().await;
    let alice = user(&g1, "alice").await;
    let bob = user(&g2, "bob").await;
    let carol = user(&g2, "carol").await;
    let mut a = Ws::connect(&g1, &alice.access).await;
    let mut b = Ws::connect(&g2, &bob.access).await;
    let mut c = Ws::connect(&g1, &carol.access).await;

    // 1:1 across gateways, both ways.
    let conv = single(&g1, &alice, &bob).await;
    for k in 1..=3 {
        a.send_message(&conv, &format!("a{k}"), &format!("a-{k}"))
            .await;
        let ack = a.next_of("message-ack").await;
        assert_eq!(ack["data"]["seq_id"], k);
        let got = b.next_of("new-message").await;
        assert_eq!(got["data"]["content"], format!("a{k}"));
        assert_eq!(got["data"]["seq_id"], k);
    }
    b.send_message(&conv, "hi alice", "b-1").await;
    assert_eq!(b.next_of("message-ack").await["data"]["seq_id"], 4);
    assert_eq!(
        a.next_of("new-message").await["data"]["content"],
        "hi alice"
    );

    // A small group across gateways (delivered by logic).
    let (st, g) = post(
        &g1.url("/groups"),
        Some(&alice.access),
        json!({"name": "trio", "member_ids": [bob.id, carol.id]}),
    )
    .await;
    assert_eq!(st, 201, "{g}");
    let trio = g["group"]["conversation_id"]
        .as_str()
        .expect("conv")
        .to_owned();
    c.send_message(&trio, "hello trio", "c-1").await;
    assert_eq!(c.next_of("message-ack").await["data"]["seq_id"], 1);
    for ws in [&mut a, &mut b] {
        let f = ws.next_of("new-message").await;
        assert_eq!(f["data"]["conversation_id"], trio);
        assert_eq!(f["data"]["content"], "hello trio");
    }

    // 600 members, half of them online, spread over both gateways: through task.
    let (members, gid, big) = big_group(&[&g1, &g2], &alice, 597, &[&bob.id, &carol.id]).await;
    let (_, g) = get(&g1.url(&format!("/groups/{gid}")), Some(&alice.access)).await;
    assert_eq!(g["group"]["member_count"], 600);
    let mut online = Vec::new();
    let mut online_ids = BTreeSet::from([bob.id.clone(), carol.id.clone()]);
    for (i, m) in members.iter().enumerate().step_by(2) {
        let gw = if i % 4 == 0 { &g1 } else { &g2 };
        online.push(Ws::connect(gw, &m.access).await);
        online_ids.insert(m.id.clone());
    }
    // A connection is open only once its presence is reported (docs/protocol.md), so every
    // member shows online at once and task reaches all of them.
    assert_online(&g1, &alice.access, &gid, &online_ids).await;
    a.send_message(&big, "to everyone", "big-1").await;
    assert_eq!(a.next_of("message-ack").await["data"]["seq_id"], 1);
    for ws in online.iter_mut().chain([&mut b, &mut c]) {
        let f = ws.next_of("new-message").await;
        assert_eq!(f["data"]["content"], "to everyone");
    }

    // The world room reaches every connected user, on both gateways.
    b.send_message("world", "hello world", "w-1").await;
    b.next_of("message-ack").await;
    for ws in online.iter_mut().chain([&mut a, &mut c]) {
        let f = ws.next_of("new-message").await;
        assert_eq!(f["data"]["conversation_id"], "world");
        assert_eq!(f["data"]["content"], "hello world");
    }

    // Operators see every service: 7 messages stored by the two logic instances together,
    // repo's store calls, task's fanout jobs.
    let stored = sample(
        &cluster.metrics("logic-1").await,
        "gochat_logic_messages_stored_total",
    ) + sample(
        &cluster.metrics("logic-2").await,
        "gochat_logic_messages_stored_total",
    );
    assert_eq!(stored, 7.0, "4 single, 1 trio, 1 big group, 1 world");
    let repo = cluster.metrics("repo").await;
    assert!(
        sample(
            &repo,
            "gochat_store_duration_seconds_count{op=\"save_batch\"}"
        ) >= 1.0,
        "{repo}"
    );
    let task = cluster.metrics("task").await;
    assert!(task.contains("gochat_"), "{task}");

    // Each process's admin view holds its own actors and its own group's lag.
    let mut conversations = 0;
    for name in ["logic-1", "logic-2"] {
        let r = cluster.admin(name, "im-logic").await;
        assert_eq!(r["process"], "logic", "{r}");
        assert!(
            r["actors"]["session"].is_null() && r["gateway"].is_null(),
            "{r}"
        );
        assert!(r["actors"]["fanout"].is_null(), "{r}");
        conversations += r["actors"]["conversation"].as_u64().expect("conversations");
        let text = cluster.metrics(name).await;
        assert!(
            text.contains(
                "gochat_bus_consumer_lag{group=\"im-logic\",topic=\"im-upstream-topic\"}"
            ),
            "{text}"
        );
    }
    // At least the world room's actor, which just ran (an idle actor stops after
    // `idle_timeout_secs`, 30 s here, so the earliest ones may be gone on a slow run).
    assert!(conversations >= 1, "{conversations}");
    let r = cluster.admin("task", "im-task").await;
    assert_eq!(r["process"], "task", "{r}");
    assert!(
        r["actors"]["fanout"].is_u64() && r["actors"]["conversation"].is_null(),
        "{r}"
    );
    let gw1 = g1.root_url("/admin/actors");
    let r = admin_with_lag(&gw1, "im-gateway-gw-").await;
    assert_eq!(r["process"], "gateway", "{r}");
    assert!(
        r["actors"]["session"].as_u64().expect("sessions") >= 2,
        "{r}"
    );
    assert!(r["actors"]["conversation"].is_null(), "{r}");
    assert!(
        r["gateway"]["messages_in"].as_u64().expect("messages in") >= 4,
        "{r}"
    );
    let page = reqwest::get(format!(
        "http://{}/admin?token={ADMIN_TOKEN}",
        cluster.metrics_listen("logic-1")
    ))
    .await
    .expect("admin page");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("page").contains("/admin/actors"));
}

/// `kill -9` one logic process in the middle of a stream of messages: every acked message is
/// stored once, seqs stay gap-free, the live members take the partitions over, and sends that
/// were never acked succeed when the client retries them.
///
/// A replacement logic joins after the kill, as a supervisor would start one: tansu 0.6 (the
/// test broker) evicts the dead member after `session.timeout.ms` but then hands the survivor
/// its old assignment again, leaving the dead member's partitions unowned until the next join.
/// Apache Kafka reassigns them on eviction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_logic_loses_nothing_acked() {
    let (mut cluster, g1, g2) = Cluster::standard().await;
    // Several conversations, so both logic instances own some.
    const PAIRS: usize = 6;
    const PER_CONV: usize = 40;
    let mut streams = Vec::new();
    for p in 0..PAIRS {
        let x = user(&g1, &format!("x{p}")).await;
        let y = user(&g2, &format!("y{p}")).await;
        let conv = single(&g1, &x, &y).await;
        let ws = Ws::connect(&g1, &x.access).await;
        streams.push((x, conv, ws));
    }
    let mut senders = Vec::new();
    let (half_tx, mut half_rx) = tokio::sync::mpsc::channel::<()>(PAIRS);
    for (p, (x, conv, mut ws)) in streams.into_iter().enumerate() {
        let half_tx = half_tx.clone();
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..PER_CONV {
                if k == PER_CONV / 2 {
                    let _ = half_tx.send(()).await;
                }
                let cmid = format!("p{p}-{k}");
                let ack = send_until_acked(
                    &mut ws,
                    &conv,
                    &format!("m{k}"),
                    &cmid,
                    Duration::from_secs(8),
                )
                .await;
                acked.push((cmid, ack));
            }
            (x, conv, acked)
        }));
    }
    drop(half_tx);
    for _ in 0..PAIRS {
        half_rx.recv().await.expect("a sender reached half way");
    }
    let assigned = |c: &mut Cluster| {
        c.proc("logic-2")
            .log_text()
            .matches("partitions assigned")
            .count()
    };
    let before = assigned(&mut cluster);
    cluster.proc("logic-1").kill9();
    // The broker notices the silent member (session timeout) and rebalances the group...
    for _ in 0..600 {
        if assigned(&mut cluster) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        assigned(&mut cluster) > before,
        "the group rebalanced after the kill"
    );
    // ... and a supervisor starts a replacement, a new member of im-logic.
    cluster.logic("logic-3").await;

    for s in senders {
        let (x, conv, acked) = s.await.expect("sender");
        let stored = history(&g2, &x.access, &conv).await;
        let seqs: Vec<i64> = stored.iter().filter_map(|m| m["seq_id"].as_i64()).collect();
        assert_eq!(
            seqs,
            (1..=PER_CONV as i64).collect::<Vec<_>>(),
            "{conv}: every message once, seqs gap-free"
        );
        let by_id: HashMap<&str, &Value> = stored
            .iter()
            .map(|m| (m["id"].as_str().expect("id"), m))
            .collect();
        let mut acked_seqs = BTreeSet::new();
        for (cmid, (id, seq)) in &acked {
            let m = by_id
                .get(id.as_str())
                .unwrap_or_else(|| panic!("acked {cmid} ({id}) is stored"));
            assert_eq!(m["seq_id"].as_i64(), Some(*seq), "{cmid}: acked seq");
            acked_seqs.insert(*seq);
        }
        assert_eq!(acked_seqs.len(), PER_CONV, "{conv}: one ack per message");
    }
    // The survivor handles new conversations too.
    let p = user(&g1, "late").await;
    let q = user(&g2, "later").await;
    let conv = single(&g1, &p, &q).await;
    let mut ws = Ws::connect(&g1, &p.access).await;
    let (_, seq) = send_until_acked(&mut ws, &conv, "after", "late-1", WAIT).await;
    assert_eq!(seq, 1);
}

/// Whether `user_id` shows online in the member list of group `gid`.
async fn member_online(s: &Server, token: &str, gid: &str, user_id: &str) -> bool {
    let (st, body) = get(&s.url(&format!("/groups/{gid}/members")), Some(token)).await;
    assert_eq!(st, 200, "members: {body}");
    body["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["user"]["id"] == user_id)
        .map(|m| m["is_online"] == true)
        .expect("a member")
}

/// `kill -9` one gateway: its users show offline once their presence lapses, and its clients
/// reconnect to the other gateway and pull what they missed by `after_seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_gateway_clients_resume_on_the_other() {
    let (mut cluster, g1, g2) = Cluster::standard().await;
    let alice = user(&g1, "alice").await;
    let bob = user(&g2, "bob").await;
    let conv = single(&g2, &bob, &alice).await;
    let (st, g) = post(
        &g2.url("/groups"),
        Some(&bob.access),
        json!({"name": "watchers", "member_ids": [alice.id]}),
    )
    .await;
    assert_eq!(st, 201, "{g}");
    let gid = g["group"]["id"].as_str().expect("gid").to_owned();

    let mut a = Ws::connect(&g1, &alice.access).await;
    let mut b = Ws::connect(&g2, &bob.access).await;
    b.send_message(&conv, "before", "b-0").await;
    b.next_of("message-ack").await;
    let seen = a.next_of("new-message").await["data"]["seq_id"]
        .as_i64()
        .expect("seq");
    let mut online = false;
    for _ in 0..100 {
        online = member_online(&g2, &bob.access, &gid, &alice.id).await;
        if online {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(online, "alice shows online while connected");

    cluster.proc("gw-a").kill9();
    drop(a);
    // Bob keeps writing while alice has no connection.
    for k in 1..=5 {
        send_until_acked(
            &mut b,
            &conv,
            &format!("missed {k}"),
            &format!("b-{k}"),
            WAIT,
        )
        .await;
    }
    // Nobody said goodbye for alice: her presence lapses (presence_ttl_secs = 6).
    let mut offline = false;
    for _ in 0..300 {
        if !member_online(&g2, &bob.access, &gid, &alice.id).await {
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(offline, "alice shows offline after her gateway died");

    // Alice comes back through the other gateway and catches up by seq.
    let mut a = Ws::connect(&g2, &alice.access).await;
    let (st, body) = get(
        &g2.url(&format!(
            "/conversations/{conv}/messages?after_seq={seen}&limit=50"
        )),
        Some(&alice.access),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let missed: Vec<&str> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().expect("content"))
        .collect();
    assert_eq!(
        missed,
        (1..=5).map(|k| format!("missed {k}")).collect::<Vec<_>>()
    );
    let mut back = false;
    for _ in 0..100 {
        if member_online(&g2, &bob.access, &gid, &alice.id).await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "alice is online again");
    // And live delivery works on the new gateway.
    b.send_message(&conv, "welcome back", "b-6").await;
    let f = a.next_of("new-message").await;
    assert_eq!(f["data"]["content"], "welcome back");
    assert_eq!(f["data"]["seq_id"], seen + 6);
}

/// Restart repo while messages flow: calls fail for a moment and are retried (by logic, and by
/// the client for a send that was refused); nothing acked is lost, seqs stay gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_repo_while_traffic_flows() {
    let (mut cluster, g1, g2) = Cluster::standard().await;
    let x = user(&g1, "x").await;
    let y = user(&g2, "y").await;
    let conv = single(&g1, &x, &y).await;
    let mut ws = Ws::connect(&g1, &x.access).await;
    const TOTAL: usize = 60;
    let (half_tx, half_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = {
        let conv = conv.clone();
        tokio::spawn(async move {
            let mut half = Some(half_tx);
            let mut acked = Vec::new();
            for k in 0..TOTAL {
                if k == TOTAL / 3
                    && let Some(h) = half.take()
                {
                    let _ = h.send(());
                }
                let cmid = format!("r-{k}");
                acked.push((
                    cmid.clone(),
                    send_until_acked(&mut ws, &conv, &format!("m{k}"), &cmid, WAIT).await,
                ));
            }
            acked
        })
    };
    half_rx.await.expect("a third sent");
    cluster.proc("repo").stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.repo("repo").await;

    let acked = sender.await.expect("sender");
    let stored = history(&g2, &y.access, &conv).await;
    let seqs: Vec<i64> = stored.iter().filter_map(|m| m["seq_id"].as_i64()).collect();
    assert_eq!(
        seqs,
        (1..=TOTAL as i64).collect::<Vec<_>>(),
        "gap-free, once each"
    );
    let by_id: HashMap<&str, i64> = stored
        .iter()
        .map(|m| {
            (
                m["id"].as_str().expect("id"),
                m["seq_id"].as_i64().expect("seq"),
            )
        })
        .collect();
    for (cmid, (id, seq)) in &acked {
        assert_eq!(
            by_id.get(id.as_str()),
            Some(seq),
            "acked {cmid} stored as acked"
        );
    }
}
