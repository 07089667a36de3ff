//! etcd service discovery ([`EtcdClient`], [`balanced_channel`], [`Discovery`]) against a real
//! etcd, named by `GOCHAT_TEST_ETCD_ENDPOINTS` (comma-separated client URLs, e.g.
//! `http://127.0.0.1:2379`; `scripts/services.sh up` starts one). The tests fail, never skip,
//! when the variable is missing. One test restarts etcd, so it runs a private etcd of its own
//! (the `etcd` binary on `PATH`, or `GOCHAT_TEST_ETCD_BIN`) on free ports.
//!
//! etcd is shared: every test uses its own key prefix (random suffix). Timeouts only turn a hang
//! into a failure; no assertion depends on how fast etcd or this machine is.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gochat_infra::discovery::{
    Discovery, DiscoveryError, EtcdClient, balanced_channel, static_channel,
};
use gochat_proto::etcd::etcdserverpb::kv_client::KvClient;
use gochat_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use gochat_proto::etcd::etcdserverpb::{LeaseRevokeRequest, PutRequest, RangeRequest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tonic::transport::Channel;

/// Bound of any single wait; only there to fail instead of hanging.
const GUARD: Duration = Duration::from_secs(120);

/// A short lease, so that expiry tests do not take long.
const TTL: Duration = Duration::from_secs(2);

fn endpoints() -> Vec<String> {
    let value = std::env::var("GOCHAT_TEST_ETCD_ENDPOINTS").unwrap_or_else(|_| {
        panic!(
            "GOCHAT_TEST_ETCD_ENDPOINTS is not set: start etcd with `scripts/services.sh up` and \
             run `eval \"$(scripts/services.sh env)\"` (or point it at any etcd v3, e.g. \
             GOCHAT_TEST_ETCD_ENDPOINTS=http://127.0.0.1:2379)"
        )
    });
    let endpoints: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(!endpoints.is_empty(), "GOCHAT_TEST_ETCD_ENDPOINTS is empty");
    endpoints
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A client on the test etcd with a fresh key prefix.
async fn client() -> EtcdClient {
    let prefix = format!("/{}", unique("gochat-test"));
    EtcdClient::connect(&endpoints(), &prefix)
        .await
        .expect("connect to the test etcd")
}

async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    match timeout(GUARD, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {GUARD:?} waiting for {what}"),
    }
}

/// Waits until the watched value satisfies `pred`; returns it.
async fn wait_until<T: Clone>(
    rx: &mut watch::Receiver<T>,
    what: &str,
    pred: impl FnMut(&T) -> bool,
) -> T {
    guard(what, rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("watch closed while waiting for {what}"))
        .clone()
}

fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_fails_clearly_when_no_endpoint_answers() {
    let dead = vec!["http://127.0.0.1:1".to_owned()];
    let err = EtcdClient::connect_with_timeout(&dead, "/gochat", Duration::from_secs(1))
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(err, DiscoveryError::Unreachable { .. }),
        "unexpected error: {err}"
    );
    assert!(
        err.to_string().contains("127.0.0.1:1"),
        "the error names the endpoint: {err}"
    );

    let err = EtcdClient::connect(&[], "/gochat")
        .await
        .expect_err("no endpoints");
    assert!(matches!(err, DiscoveryError::NoEndpoints), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_instances_are_watched_and_deregistered() {
    let etcd = client().await;
    let mut view = etcd.watch_service("repo").await.expect("watch repo");
    assert!(view.borrow().is_empty(), "fresh prefix, no instances");

    let a = etcd
        .register("repo", "repo-a", "127.0.0.1:9101", TTL)
        .await
        .expect("register repo-a");
    assert_eq!(
        a.key(),
        format!("{}/services/repo/repo-a", etcd.prefix()),
        "documented key layout"
    );
    wait_until(&mut view, "repo-a to appear", |m| m.contains_key("repo-a")).await;
    let b = etcd
        .register("repo", "repo-b", "http://127.0.0.1:9102", TTL)
        .await
        .expect("register repo-b");
    let seen = wait_until(&mut view, "repo-b to appear", |m| m.len() == 2).await;
    assert_eq!(
        seen,
        map(&[
            ("repo-a", "127.0.0.1:9101"),
            ("repo-b", "http://127.0.0.1:9102")
        ])
    );

    // A watcher started now reads the current state first.
    let late = etcd.watch_service("repo").await.expect("second watch");
    assert_eq!(late.borrow().len(), 2);
    // Another service's view is separate.
    let other = etcd.watch_service("logic").await.expect("watch logic");
    assert!(other.borrow().is_empty());

    a.deregister().await.expect("deregister repo-a");
    let seen = wait_until(&mut view, "repo-a to disappear", |m| {
        !m.contains_key("repo-a")
    })
    .await;
    assert_eq!(seen, map(&[("repo-b", "http://127.0.0.1:9102")]));

    // The value is the documented JSON.
    let mut kv = KvClient::new(etcd.channel());
    let stored = kv
        .range(RangeRequest {
            key: b.key().as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    let value: serde_json::Value =
        serde_json::from_slice(&stored.kvs[0].value).expect("JSON value");
    assert_eq!(value["addr"], "http://127.0.0.1:9102");
    assert!(value["started_at"].as_i64().is_some_and(|t| t > 0));
    assert_eq!(stored.kvs[0].lease, b.lease_id(), "held under its lease");

    b.deregister().await.expect("deregister repo-b");
    wait_until(&mut view, "no instances", BTreeMap::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_registration_expires() {
    let etcd = client().await;
    let mut view = etcd.watch_service("logic").await.expect("watch");
    let crashed = etcd
        .register("logic", "logic-1", "127.0.0.1:9200", TTL)
        .await
        .expect("register");
    let survivor = etcd
        .register("logic", "logic-2", "127.0.0.1:9201", TTL)
        .await
        .expect("register");
    wait_until(&mut view, "both instances", |m| m.len() == 2).await;

    // A crash: the keepalive stops without a revoke.
    drop(crashed);
    let seen = wait_until(&mut view, "the dropped instance to expire", |m| {
        !m.contains_key("logic-1")
    })
    .await;
    assert_eq!(seen, map(&[("logic-2", "127.0.0.1:9201")]));

    // The survivor's keepalive keeps it there well past its TTL.
    sleep(TTL * 3).await;
    assert!(
        view.borrow().contains_key("logic-2"),
        "renewed instance stays"
    );
    assert!(*survivor.live().borrow());
    survivor.deregister().await.expect("deregister");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_replaced() {
    let etcd = client().await;
    let mut view = etcd.watch_service("task").await.expect("watch");
    let reg = etcd
        .register("task", "task-1", "127.0.0.1:9300", TTL)
        .await
        .expect("register");
    wait_until(&mut view, "task-1", |m| m.contains_key("task-1")).await;

    // Someone revokes the lease behind the registration's back (as if etcd lost it).
    let old = reg.lease_id();
    LeaseClient::new(etcd.channel())
        .lease_revoke(LeaseRevokeRequest { id: old })
        .await
        .expect("revoke");

    // The registration notices, grants a new lease and writes its key again.
    guard("a new lease", async {
        while reg.lease_id() == old {
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let mut kv = KvClient::new(etcd.channel());
    let stored = guard("the key under the new lease", async {
        loop {
            let stored = kv
                .range(RangeRequest {
                    key: reg.key().as_bytes().to_vec(),
                    ..Default::default()
                })
                .await
                .expect("range")
                .into_inner();
            if stored.kvs.first().is_some_and(|kv| kv.lease != old) {
                return stored;
            }
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(stored.kvs[0].lease, reg.lease_id());
    wait_until(&mut view, "task-1 back in the view", |m| {
        m.contains_key("task-1")
    })
    .await;
    let mut live = reg.live();
    wait_until(&mut live, "the registration to be live again", |l| *l).await;
    reg.deregister().await.expect("deregister");
    wait_until(&mut view, "task-1 gone", BTreeMap::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_get_distinct_ids_and_released_ids_are_reused() {
    let etcd = client().await;
    let mut live_ids = etcd.watch_ids("gw").await.expect("watch ids");

    let claims = (0..8).map(|_| {
        let etcd = etcd.clone();
        tokio::spawn(async move { etcd.claim("gw", TTL).await })
    });
    let mut held = BTreeMap::new();
    for claim in claims {
        let (id, reg) = guard("a claim", claim)
            .await
            .expect("claim task")
            .expect("claim");
        assert!(
            held.insert(id.clone(), reg).is_none(),
            "{id} handed out twice"
        );
    }
    let expected: BTreeSet<String> = (1..=8).map(|n| format!("gw-{n}")).collect();
    assert_eq!(
        held.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the smallest free ids"
    );
    let seen = wait_until(&mut live_ids, "8 live ids", |ids| ids.len() == 8).await;
    assert_eq!(seen, expected);

    // Release gw-3: the next claim reuses it.
    let gw3 = held.remove("gw-3").expect("gw-3 held");
    gw3.deregister().await.expect("release gw-3");
    wait_until(&mut live_ids, "gw-3 released", |ids| !ids.contains("gw-3")).await;
    let (id, reg) = etcd.claim("gw", TTL).await.expect("claim again");
    assert_eq!(id, "gw-3");
    held.insert(id, reg);
    let (id, _reg9) = etcd.claim("gw", TTL).await.expect("claim a 9th");
    assert_eq!(id, "gw-9");

    // An id of a crashed holder comes back after its TTL.
    drop(held.remove("gw-5"));
    wait_until(&mut live_ids, "gw-5 to expire", |ids| !ids.contains("gw-5")).await;
    let (id, _reg5) = etcd.claim("gw", TTL).await.expect("claim after expiry");
    assert_eq!(id, "gw-5");

    // Kinds are separate.
    let (id, _task) = etcd.claim("task", TTL).await.expect("claim another kind");
    assert_eq!(id, "task-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_exact_refuses_a_held_id() {
    let etcd = client().await;
    let (id, holder) = etcd.claim("gw", TTL).await.expect("claim");
    assert_eq!(id, "gw-1");
    assert_eq!(holder.key(), format!("{}/ids/gw/gw-1", etcd.prefix()));

    let err = etcd
        .claim_exact("gw", "gw-1", TTL)
        .await
        .expect_err("gw-1 is held");
    assert!(matches!(err, DiscoveryError::IdTaken { .. }), "{err}");
    assert!(err.to_string().contains("gw-1"), "names the id: {err}");

    // A configured, non-numbered id works, and claim() skips nothing because of it.
    let edge = etcd
        .claim_exact("gw", "edge-eu", TTL)
        .await
        .expect("claim a free exact id");
    let (id, _gw2) = etcd.claim("gw", TTL).await.expect("claim");
    assert_eq!(id, "gw-2");
    let mut ids = etcd.watch_ids("gw").await.expect("watch ids");
    wait_until(&mut ids, "three ids", |ids| ids.len() == 3).await;

    holder.deregister().await.expect("release gw-1");
    let again = etcd
        .claim_exact("gw", "gw-1", TTL)
        .await
        .expect("gw-1 is free again");
    again.deregister().await.expect("release");
    edge.deregister().await.expect("release");

    let err = etcd
        .claim_exact("gw", "a/b", TTL)
        .await
        .expect_err("ids are one key segment");
    assert!(matches!(err, DiscoveryError::InvalidName { .. }), "{err}");
}

/// A Range of `key` through `channel`, guarded against hanging.
async fn range_through(channel: Channel, key: &str) -> Vec<u8> {
    let mut kv = KvClient::new(channel);
    let response = guard(
        "a Range through the channel",
        kv.range(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("Range through the channel")
    .into_inner();
    response
        .kvs
        .first()
        .map(|kv| kv.value.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_from_discovery_carry_rpcs() {
    let etcd = client().await;
    let probe_key = format!("{}/probe", etcd.prefix());
    KvClient::new(etcd.channel())
        .put(PutRequest {
            key: probe_key.as_bytes().to_vec(),
            value: b"hello".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put the probe");

    // etcd itself plays the part of a gRPC service registered in etcd.
    let etcd_addr = endpoints()[0].clone();
    let reg = etcd
        .register("etcd-self", "member-0", &etcd_addr, TTL)
        .await
        .expect("register etcd as a service");
    let view = etcd.watch_service("etcd-self").await.expect("watch");
    let channel = balanced_channel(view, Duration::from_secs(3));
    assert_eq!(range_through(channel.clone(), &probe_key).await, b"hello");
    // Several calls at once through one channel.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (channel, key) = (channel.clone(), probe_key.clone());
            tokio::spawn(async move { range_through(channel, &key).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("call task"), b"hello");
    }

    // The same through the Discovery front, both flavours.
    let discovery = Discovery::Etcd(etcd.clone());
    let channel = discovery
        .channel_for("etcd-self")
        .await
        .expect("etcd channel");
    assert_eq!(range_through(channel, &probe_key).await, b"hello");
    let fixed = Discovery::Static {
        services: BTreeMap::from([("etcd-self".to_owned(), vec![etcd_addr.clone()])]),
    };
    let channel = fixed
        .channel_for("etcd-self")
        .await
        .expect("static channel");
    assert_eq!(range_through(channel, &probe_key).await, b"hello");
    assert!(
        fixed
            .register("etcd-self", "x", &etcd_addr, TTL)
            .await
            .expect("no-op")
            .is_none()
    );
    let err = fixed
        .channel_for("nope")
        .await
        .expect_err("unknown service");
    assert!(err.to_string().contains("nope"), "{err}");
    let channel = static_channel(&[etcd_addr.clone(), etcd_addr]).expect("static channel");
    assert_eq!(range_through(channel, &probe_key).await, b"hello");

    reg.deregister().await.expect("deregister");
}

/// A TCP proxy in front of etcd whose connections can be cut.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, connections) = (Arc::clone(&up), Arc::clone(&connections));
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // refused: dropped at once
                    }
                    let conn = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().expect("lock").push(conn);
                }
            }
        });
        Self {
            addr,
            up,
            connections,
            accept,
        }
    }

    /// Drops every connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for conn in self.connections.lock().expect("lock").drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_recovers_from_a_broken_stream() {
    let direct = client().await;
    let target = endpoints()[0]
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let target = tokio::net::lookup_host(&target)
        .await
        .expect("resolve etcd")
        .next()
        .expect("an etcd address");
    let proxy = Proxy::start(target).await;
    let proxied = EtcdClient::connect(&[format!("http://{}", proxy.addr)], direct.prefix())
        .await
        .expect("connect through the proxy");

    let mut view = proxied.watch_service("gateway").await.expect("watch");
    let first = direct
        .register("gateway", "gw-1", "127.0.0.1:8080", TTL)
        .await
        .expect("register gw-1");
    wait_until(&mut view, "gw-1 through the proxy", |m| {
        m.contains_key("gw-1")
    })
    .await;

    // Cut the watcher off; change the set meanwhile; let it back in.
    proxy.cut();
    first.deregister().await.expect("deregister gw-1");
    let second = direct
        .register("gateway", "gw-2", "127.0.0.1:8081", TTL)
        .await
        .expect("register gw-2");
    sleep(Duration::from_millis(500)).await;
    proxy.restore();

    let seen = wait_until(&mut view, "the view to catch up after the cut", |m| {
        !m.contains_key("gw-1") && m.contains_key("gw-2")
    })
    .await;
    assert_eq!(seen, map(&[("gw-2", "127.0.0.1:8081")]));

    // And it keeps following changes on the new stream.
    second.deregister().await.expect("deregister gw-2");
    wait_until(&mut view, "gw-2 gone", BTreeMap::is_empty).await;
}

/// A private single-member etcd (the `etcd` binary, or `GOCHAT_TEST_ETCD_BIN`) on free ports,
/// for tests that restart it. Killed (and its data removed) on drop.
struct PrivateEtcd {
    child: Option<std::process::Child>,
    data_dir: std::path::PathBuf,
    client_url: String,
    peer_url: String,
}

impl PrivateEtcd {
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    fn start() -> Self {
        let mut etcd = Self {
            child: None,
            data_dir: std::env::temp_dir().join(unique("gochat-etcd")),
            client_url: format!("http://127.0.0.1:{}", Self::free_port()),
            peer_url: format!("http://127.0.0.1:{}", Self::free_port()),
        };
        etcd.spawn();
        etcd
    }

    fn spawn(&mut self) {
        let bin = std::env::var("GOCHAT_TEST_ETCD_BIN").unwrap_or_else(|_| "etcd".to_owned());
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let child = std::process::Command::new(&bin)
            .env("ETCD_UNSUPPORTED_ARCH", arch)
            .args(["--name", "private", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .arg("--initial-cluster")
            .arg(format!("private={}", self.peer_url))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {bin:?} ({e}): this test restarts a private etcd; install etcd \
                     (`scripts/services.sh up` does) or set GOCHAT_TEST_ETCD_BIN"
                )
            });
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again, with its data or from scratch.
    fn restart(&mut self, keep_data: bool) {
        self.kill();
        if !keep_data {
            std::fs::remove_dir_all(&self.data_dir).expect("wipe the etcd data");
        }
        self.spawn();
    }
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Waits until `key` exists in etcd under a lease other than `old_lease`; returns that lease.
async fn key_under_new_lease(etcd: &EtcdClient, key: &str, old_lease: i64) -> i64 {
    let mut kv = KvClient::new(etcd.channel());
    guard("the key written again under a new lease", async {
        loop {
            let request = RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            };
            if let Ok(response) = kv.range(request).await
                && let Some(found) = response.into_inner().kvs.first()
                && found.lease != old_lease
            {
                return found.lease;
            }
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_watches_survive_etcd_restarts() {
    let mut private = PrivateEtcd::start();
    let etcd = EtcdClient::connect_with_timeout(
        std::slice::from_ref(&private.client_url),
        "/gochat",
        GUARD,
    )
    .await
    .expect("connect to the private etcd");
    let mut view = etcd.watch_service("repo").await.expect("watch");
    let mut ids = etcd.watch_ids("gw").await.expect("watch ids");
    let r1 = etcd
        .register("repo", "r1", "127.0.0.1:9101", TTL)
        .await
        .expect("register r1");
    let (gw, gw_reg) = etcd.claim("gw", TTL).await.expect("claim");
    wait_until(&mut view, "r1", |m| m.contains_key("r1")).await;

    // Restart with the data: the watcher follows again (it sees what happens afterwards) and the
    // registration is still there.
    private.restart(true);
    let r2 = guard("a registration after the restart", async {
        loop {
            match etcd.register("repo", "r2", "127.0.0.1:9102", TTL).await {
                Ok(reg) => return reg,
                Err(_) => sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await;
    wait_until(&mut view, "r1 and r2 after the restart", |m| {
        m.contains_key("r1") && m.contains_key("r2")
    })
    .await;

    // Restart from scratch: every lease is gone, so each registration grants a new one and
    // writes its key again, and the claimed id is claimed again.
    let (r1_lease, r2_lease, gw_lease) = (r1.lease_id(), r2.lease_id(), gw_reg.lease_id());
    private.restart(false);
    key_under_new_lease(&etcd, r1.key(), r1_lease).await;
    key_under_new_lease(&etcd, r2.key(), r2_lease).await;
    key_under_new_lease(&etcd, gw_reg.key(), gw_lease).await;
    // The watchers re-read the (new) store and follow it: a new instance shows up next to the
    // re-registered ones.
    let _r3 = etcd
        .register("repo", "r3", "127.0.0.1:9103", TTL)
        .await
        .expect("register r3");
    let seen = wait_until(&mut view, "r1, r2 and r3 in the new store", |m| {
        m.len() == 3
    })
    .await;
    assert_eq!(
        seen,
        map(&[
            ("r1", "127.0.0.1:9101"),
            ("r2", "127.0.0.1:9102"),
            ("r3", "127.0.0.1:9103")
        ])
    );
    wait_until(&mut ids, "the id claimed again", |s| s.contains(&gw)).await;
    r1.deregister().await.expect("deregister r1");
    wait_until(&mut view, "r1 gone", |m| !m.contains_key("r1")).await;
}
