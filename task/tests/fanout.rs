//! The task service end to end, in process: a real repo (`gochat_repo::Repo` on a SQLite file in
//! a temporary directory and the moka cache), a real `MemoryBus`, and `gochat_task::run`
//! consuming `im-task-topic`. Tasks go in as JSON records, deliveries are read back from the
//! gateways' downstream topics by a probe consumer group.
//!
//! Nothing here bounds wall-clock time: waits have generous limits only so a broken build fails
//! instead of hanging.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use gochat_infra::ids::group_conversation_id;
use gochat_infra::mq::memory::{MemoryBus, MemoryBusConfig};
use gochat_infra::mq::{Bus, Consumer, Producer, Record};
use gochat_infra::wire::{
    DownstreamKind, DownstreamMessage, FanoutTaskData, TASK_TOPIC, TaskMessage, TaskType,
    downstream_topic,
};
use gochat_proto::repo as pb;
use gochat_proto::repo::group_service_server::GroupService;
use gochat_proto::repo::online_status_service_server::OnlineStatusService;
use gochat_proto::repo::user_service_server::UserService;
use gochat_repo::cache::memory::MemoryCache;
use gochat_repo::store::AnyStore;
use gochat_repo::{Repo, RepoSettings};
use gochat_task::{
    CONSUMER_GROUP, RepoApi, RetryPolicy, StaticGateways, TaskError, TaskService, TaskSettings,
    TaskStatsSnapshot,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// Limit of any one wait (a hang guard, not a performance bound).
const GUARD: Duration = Duration::from_secs(120);

type TestRepo = Repo<AnyStore, MemoryCache>;

/// A repo on a fresh SQLite file, and a bus.
struct Env {
    repo: TestRepo,
    bus: MemoryBus,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("gochat.db");
    let store = AnyStore::open(path.to_str().expect("a UTF-8 path"), 4)
        .await
        .expect("open the SQLite store");
    let settings = RepoSettings {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        ..RepoSettings::default()
    };
    Env {
        repo: Repo::new(store, MemoryCache::new(1_000_000), settings),
        bus: MemoryBus::new(MemoryBusConfig::default()),
        _dir: dir,
    }
}

/// Settings with short waits, so retry paths run quickly.
fn quick_settings() -> TaskSettings {
    TaskSettings {
        arbiters: 2,
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            ..RetryPolicy::default()
        },
        redelivery_delay: Duration::from_millis(5),
        redelivery_max_delay: Duration::from_millis(20),
        ..TaskSettings::default()
    }
}

/// `n` users (the password hash is cheap in these settings); their ids.
async fn create_users(repo: &TestRepo, n: usize) -> Vec<String> {
    let tag = format!("{:x}", gochat_infra::time::now_ms());
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let repo = repo.clone();
        let username = format!("u{i}_{tag}");
        set.spawn(async move {
            let user = UserService::create_user(
                &repo,
                Request::new(pb::CreateUserRequest {
                    username,
                    password: "secret".to_owned(),
                    ..Default::default()
                }),
            )
            .await
            .expect("CreateUser")
            .into_inner()
            .user
            .expect("a user");
            (i, user.id)
        });
    }
    let mut ids = vec![String::new(); n];
    while let Some(joined) = set.join_next().await {
        let (i, id) = joined.expect("create task");
        ids[i] = id;
    }
    ids
}

/// A group of `users` (the first is the owner); its id.
async fn create_group(repo: &TestRepo, users: &[String]) -> String {
    GroupService::create_group(
        repo,
        Request::new(pb::CreateGroupRequest {
            name: "big".to_owned(),
            owner_id: users[0].clone(),
            member_ids: users[1..].to_vec(),
            avatar_url: String::new(),
        }),
    )
    .await
    .expect("CreateGroup")
    .into_inner()
    .group
    .expect("a group")
    .id
}

async fn set_online(repo: &TestRepo, user: &str, gateway: &str) {
    OnlineStatusService::set_user_online(
        repo,
        Request::new(pb::SetUserOnlineRequest {
            user_id: user.to_owned(),
            gateway_id: gateway.to_owned(),
            ttl_seconds: 3600,
        }),
    )
    .await
    .expect("SetUserOnline");
}

/// The message a fan-out task carries.
fn message(conversation_id: &str, sender: &str) -> DownstreamMessage {
    DownstreamMessage {
        message_id: "7001".to_owned(),
        conversation_id: conversation_id.to_owned(),
        sender_id: sender.to_owned(),
        message_type: 1,
        content: "hello, everyone".to_owned(),
        seq_id: 42,
        timestamp: 1_700_000_000_000,
        exclude_session: "sess-1".to_owned(),
        ..DownstreamMessage::default()
    }
}

fn fanout_task(task_id: &str, group_id: &str, msg: DownstreamMessage) -> TaskMessage {
    TaskMessage {
        trace_id: format!("trace-{task_id}"),
        task_type: TaskType::Fanout,
        task_id: task_id.to_owned(),
        data: serde_json::to_value(FanoutTaskData {
            group_id: group_id.to_owned(),
            message_id: msg.message_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            message: Some(msg),
        })
        .expect("serializes"),
        headers: BTreeMap::new(),
        created_at: 0,
    }
}

fn world_task(task_id: &str) -> TaskMessage {
    fanout_task(task_id, "", message("world", "1"))
}

async fn submit_raw(bus: &MemoryBus, key: &str, payload: Vec<u8>) {
    bus.send(TASK_TOPIC, key, payload, BTreeMap::new())
        .await
        .expect("send a task");
}

async fn submit(bus: &MemoryBus, task: &TaskMessage) {
    let key = task.data["conversation_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    submit_raw(bus, &key, serde_json::to_vec(task).expect("serializes")).await;
}

/// A running task service.
struct Running {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), TaskError>>,
    stats: Arc<gochat_task::TaskStats>,
}

fn start<R: RepoApi>(
    settings: TaskSettings,
    repo: R,
    bus: &MemoryBus,
    gateways: &[&str],
) -> Running {
    let service = TaskService::new(
        settings,
        repo,
        bus.clone(),
        StaticGateways::new(gateways.iter().copied()),
    );
    let stats = service.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(service.run(async move {
        let _ = stopped.await;
    }));
    Running {
        stop,
        handle,
        stats,
    }
}

impl Running {
    /// Stops the service (it must end cleanly); its final counters.
    async fn stop(self) -> TaskStatsSnapshot {
        let _ = self.stop.send(());
        tokio::time::timeout(GUARD, self.handle)
            .await
            .expect("the task service did not stop")
            .expect("the task service panicked")
            .expect("the task service failed");
        self.stats.snapshot()
    }
}

/// Polls `cond` until it holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the task service has committed every task record.
async fn wait_committed(bus: &MemoryBus) {
    wait_until("every task record to be committed", || {
        bus.lag(CONSUMER_GROUP, TASK_TOPIC) == 0
    })
    .await;
}

/// Everything on `gateway`'s downstream topic that the probe group has not read yet.
async fn drain(bus: &MemoryBus, gateway: &str) -> Vec<(Record, DownstreamMessage)> {
    let topic = downstream_topic(gateway);
    let mut probe = bus.subscribe("probe", &[&topic]).await.expect("subscribe");
    let mut out = Vec::new();
    while bus.lag("probe", &topic) > 0 {
        let record = tokio::time::timeout(GUARD, probe.recv())
            .await
            .expect("a downstream record")
            .expect("recv");
        probe.commit(&record).await.expect("commit");
        let msg: DownstreamMessage = record
            .payload
            .decode::<DownstreamMessage>()
            .expect("a downstream message")
            .into_owned();
        out.push((record, msg));
    }
    out
}

/// Which gateways user number `i` is online on: odd users are offline, multiples of 4 are on
/// gw-a (multiples of 12 on gw-b too), the other even users on gw-b.
fn gateways_of(i: usize) -> Vec<&'static str> {
    match i % 4 {
        0 if i.is_multiple_of(12) => vec!["gw-a", "gw-b"],
        0 => vec!["gw-a"],
        2 => vec!["gw-b"],
        _ => vec![],
    }
}

#[actix_rt::test]
async fn big_group_is_delivered_in_batches_per_gateway() {
    big_group_delivery(true).await;
}

/// A repo from before page tokens (`next_page_token` never set) is paged by offset.
#[actix_rt::test]
async fn a_repo_without_page_tokens_is_paged_by_offset() {
    big_group_delivery(false).await;
}

/// A 600-member group, about half online on two gateways, delivered through a repo that returns
/// page tokens or not.
async fn big_group_delivery(tokens: bool) {
    let env = env().await;
    let users = create_users(&env.repo, 600).await;
    let group = create_group(&env.repo, &users).await;
    let conversation = group_conversation_id(group.parse().expect("an id"));
    let mut expected: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (i, user) in users.iter().enumerate() {
        for gw in gateways_of(i) {
            set_online(&env.repo, user, gw).await;
            expected.entry(gw).or_default().insert(user.clone());
        }
    }
    let online: BTreeSet<&String> = expected.values().flatten().collect();
    assert!((250..=350).contains(&online.len()), "about half online");

    let repo = FlakyRepo {
        inner: env.repo.clone(),
        failures: Arc::new(AtomicI64::new(0)),
        tokens,
    };
    let running = start(quick_settings(), repo, &env.bus, &["gw-a", "gw-b"]);
    let msg = message(&conversation, &users[0]);
    submit(&env.bus, &fanout_task("big", &group, msg.clone())).await;
    wait_committed(&env.bus).await;
    let stats = running.stop().await;

    let mut total = 0;
    for (gw, want) in &expected {
        let records = drain(&env.bus, gw).await;
        assert_eq!(records.len(), 3, "{gw}: one record per page of 200");
        let mut got = Vec::new();
        for (record, m) in &records {
            assert_eq!(record.key, conversation, "keyed by conversation");
            assert_eq!(
                record.headers.get("trace_id").map(String::as_str),
                Some("trace-big")
            );
            assert!(
                (1..=200).contains(&m.targets.len()),
                "{} targets",
                m.targets.len()
            );
            assert!(!m.broadcast);
            assert_eq!(m.kind, DownstreamKind::NewMessage);
            assert_eq!(m.target_user_id, "");
            assert_eq!(m.exclude_session, "sess-1");
            assert_eq!(m.trace_id, "trace-big");
            assert_eq!(
                (&m.message_id, &m.conversation_id, &m.sender_id, &m.content),
                (
                    &msg.message_id,
                    &msg.conversation_id,
                    &msg.sender_id,
                    &msg.content
                )
            );
            assert_eq!(
                (m.seq_id, m.message_type, m.timestamp),
                (42, 1, msg.timestamp)
            );
            got.extend(m.targets.iter().cloned());
        }
        let unique: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(unique.len(), got.len(), "{gw}: a user named twice");
        assert_eq!(&unique, want, "{gw}: exactly the users online there");
        total += got.len() as u64;
    }
    assert_eq!(stats.jobs, 1);
    assert_eq!(stats.batches, 6);
    assert_eq!(stats.deliveries, total);
    assert_eq!(stats.jobs_failed, 0);
}

#[actix_rt::test]
async fn world_room_is_one_broadcast_per_live_gateway() {
    let env = env().await;
    let running = start(
        quick_settings(),
        env.repo.clone(),
        &env.bus,
        &["gw-b", "gw-a", "gw-a"],
    );
    submit(&env.bus, &world_task("w1")).await;
    wait_committed(&env.bus).await;
    let stats = running.stop().await;
    for gw in ["gw-a", "gw-b"] {
        let records = drain(&env.bus, gw).await;
        assert_eq!(records.len(), 1, "{gw}");
        let (record, m) = &records[0];
        assert_eq!(record.key, "world");
        assert!(m.broadcast);
        assert!(m.targets.is_empty());
        assert_eq!(m.exclude_session, "sess-1");
        assert_eq!(m.conversation_id, "world");
        assert_eq!(m.seq_id, 42);
    }
    assert_eq!((stats.jobs, stats.broadcasts, stats.batches), (1, 2, 2));
}

#[actix_rt::test]
async fn malformed_record_is_committed_and_the_next_task_runs() {
    let env = env().await;
    let running = start(quick_settings(), env.repo.clone(), &env.bus, &["gw-a"]);
    // Same key, so the same partition: the good task waits behind the bad record.
    submit_raw(&env.bus, "world", b"{not json".to_vec()).await;
    submit_raw(
        &env.bus,
        "world",
        br#"{"trace_id":"t","task_type":"no-such-type","task_id":"x","data":{},"created_at":0}"#
            .to_vec(),
    )
    .await;
    submit(&env.bus, &world_task("w2")).await;
    wait_committed(&env.bus).await;
    let stats = running.stop().await;
    assert_eq!(drain(&env.bus, "gw-a").await.len(), 1);
    assert_eq!((stats.tasks, stats.malformed, stats.jobs), (3, 2, 1));
}

#[actix_rt::test]
async fn tasks_without_processor_or_that_cannot_succeed_are_committed() {
    let env = env().await;
    let running = start(quick_settings(), env.repo.clone(), &env.bus, &["gw-a"]);
    let mut push = world_task("p1");
    push.task_type = TaskType::Push;
    submit(&env.bus, &push).await;
    // A fan-out without its message, and one for a group that does not exist.
    let mut bare = world_task("f1");
    bare.data["message"] = serde_json::Value::Null;
    submit(&env.bus, &bare).await;
    submit(&env.bus, &fanout_task("f2", "123456789", message("", "1"))).await;
    submit(&env.bus, &world_task("w3")).await;
    wait_committed(&env.bus).await;
    let stats = running.stop().await;
    let records = drain(&env.bus, "gw-a").await;
    assert_eq!(records.len(), 1, "only the world task delivers");
    assert!(records[0].1.broadcast);
    assert_eq!((stats.unhandled, stats.rejected, stats.jobs), (1, 2, 1));
}

/// A repo whose presence lookups fail while `failures` is positive (each failure uses one up),
/// and that answers them without page tokens unless `tokens`.
#[derive(Clone)]
struct FlakyRepo {
    inner: TestRepo,
    failures: Arc<AtomicI64>,
    tokens: bool,
}

impl FlakyRepo {
    fn check(&self) -> Result<(), Status> {
        if self.failures.fetch_sub(1, Ordering::SeqCst) > 0 {
            Err(Status::unavailable("presence is down (test)"))
        } else {
            self.failures.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

#[tonic::async_trait]
impl GroupService for FlakyRepo {
    async fn create_group(
        &self,
        r: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        GroupService::create_group(&self.inner, r).await
    }
    async fn get_group(
        &self,
        r: Request<pb::GetGroupRequest>,
    ) -> Result<Response<pb::GetGroupResponse>, Status> {
        self.inner.get_group(r).await
    }
    async fn add_group_member(
        &self,
        r: Request<pb::AddGroupMemberRequest>,
    ) -> Result<Response<pb::AddGroupMemberResponse>, Status> {
        self.inner.add_group_member(r).await
    }
    async fn remove_group_member(
        &self,
        r: Request<pb::RemoveGroupMemberRequest>,
    ) -> Result<Response<pb::RemoveGroupMemberResponse>, Status> {
        self.inner.remove_group_member(r).await
    }
    async fn get_group_members(
        &self,
        r: Request<pb::GetGroupMembersRequest>,
    ) -> Result<Response<pb::GetGroupMembersResponse>, Status> {
        self.inner.get_group_members(r).await
    }
    async fn get_members_online_status(
        &self,
        r: Request<pb::GetMembersOnlineStatusRequest>,
    ) -> Result<Response<pb::GetMembersOnlineStatusResponse>, Status> {
        self.check()?;
        let mut page = self.inner.get_members_online_status(r).await?;
        if !self.tokens {
            page.get_mut().next_page_token.clear();
        }
        Ok(page)
    }
    async fn is_group_member(
        &self,
        r: Request<pb::IsGroupMemberRequest>,
    ) -> Result<Response<pb::IsGroupMemberResponse>, Status> {
        GroupService::is_group_member(&self.inner, r).await
    }
}

#[tonic::async_trait]
impl OnlineStatusService for FlakyRepo {
    async fn set_user_online(
        &self,
        r: Request<pb::SetUserOnlineRequest>,
    ) -> Result<Response<pb::SetUserOnlineResponse>, Status> {
        self.inner.set_user_online(r).await
    }
    async fn set_user_offline(
        &self,
        r: Request<pb::SetUserOfflineRequest>,
    ) -> Result<Response<pb::SetUserOfflineResponse>, Status> {
        self.inner.set_user_offline(r).await
    }
    async fn get_user_online_status(
        &self,
        r: Request<pb::GetUserOnlineStatusRequest>,
    ) -> Result<Response<pb::GetUserOnlineStatusResponse>, Status> {
        self.inner.get_user_online_status(r).await
    }
    async fn get_users_online_status(
        &self,
        r: Request<pb::GetUsersOnlineStatusRequest>,
    ) -> Result<Response<pb::GetUsersOnlineStatusResponse>, Status> {
        self.inner.get_users_online_status(r).await
    }
}

/// A small group, all online on gw-a; its id and members.
async fn small_online_group(env: &Env) -> (String, Vec<String>) {
    let users = create_users(&env.repo, 5).await;
    let group = create_group(&env.repo, &users).await;
    for u in &users {
        set_online(&env.repo, u, "gw-a").await;
    }
    (group, users)
}

#[actix_rt::test]
async fn failing_repo_calls_are_retried_and_the_job_is_tried_again() {
    let env = env().await;
    let (group, users) = small_online_group(&env).await;
    // 4 attempts per job run (1 + 3 retries): the first run fails, the second succeeds.
    let failures = Arc::new(AtomicI64::new(6));
    let flaky = FlakyRepo {
        inner: env.repo.clone(),
        failures: Arc::clone(&failures),
        tokens: true,
    };
    let running = start(quick_settings(), flaky, &env.bus, &["gw-a"]);
    let conversation = group_conversation_id(group.parse().expect("an id"));
    submit(
        &env.bus,
        &fanout_task("r1", &group, message(&conversation, &users[0])),
    )
    .await;
    wait_committed(&env.bus).await;
    let stats = running.stop().await;
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    let records = drain(&env.bus, "gw-a").await;
    assert_eq!(records.len(), 1);
    let got: BTreeSet<_> = records[0].1.targets.iter().cloned().collect();
    assert_eq!(got, users.iter().cloned().collect());
    assert_eq!((stats.jobs_failed, stats.jobs, stats.retries), (1, 1, 5));
}

#[actix_rt::test]
async fn a_task_that_keeps_failing_stays_uncommitted_for_the_next_consumer() {
    let env = env().await;
    let (group, users) = small_online_group(&env).await;
    let failures = Arc::new(AtomicI64::new(i64::MAX / 2));
    let broken = FlakyRepo {
        inner: env.repo.clone(),
        failures: Arc::clone(&failures),
        tokens: true,
    };
    let running = start(quick_settings(), broken, &env.bus, &["gw-a"]);
    let conversation = group_conversation_id(group.parse().expect("an id"));
    submit(
        &env.bus,
        &fanout_task("s1", &group, message(&conversation, &users[0])),
    )
    .await;
    let stats = Arc::clone(&running.stats);
    wait_until("two failed runs", || stats.snapshot().jobs_failed >= 2).await;
    running.stop().await;
    assert_eq!(env.bus.lag(CONSUMER_GROUP, TASK_TOPIC), 1, "not committed");
    assert!(drain(&env.bus, "gw-a").await.is_empty());

    // A healthy service picks the task up again.
    let running = start(quick_settings(), env.repo.clone(), &env.bus, &["gw-a"]);
    wait_committed(&env.bus).await;
    let stats = running.stop().await;
    assert_eq!(stats.jobs, 1);
    assert_eq!(drain(&env.bus, "gw-a").await.len(), 1);
}

/// Without an actix system around it, the service starts one of its own for its actors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_a_plain_tokio_runtime() {
    let env = env().await;
    let running = start(quick_settings(), env.repo.clone(), &env.bus, &["gw-a"]);
    submit(&env.bus, &world_task("w4")).await;
    wait_committed(&env.bus).await;
    let stats = running.stop().await;
    assert_eq!(stats.jobs, 1);
    assert_eq!(drain(&env.bus, "gw-a").await.len(), 1);
}
