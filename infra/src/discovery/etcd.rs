//! The etcd v3 client: connecting, leases, registrations and id claims.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use gochat_proto::etcd::etcdserverpb as pb;
use gochat_proto::etcd::mvccpb::KeyValue;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::request_op::Request;
use pb::response_op::Response;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::watcher::watch_prefix;
use super::{
    DEFAULT_ETCD_CONNECT_TIMEOUT, DiscoveryError, Label, check_name, endpoint_for, lazy_channel,
};

/// Attempts [`EtcdClient::claim`] makes before giving up (each lost attempt means another
/// claimer won an id, so this bounds the number of simultaneous claimers, not the id count).
const MAX_CLAIM_ATTEMPTS: u32 = 256;

/// A connection to an etcd cluster, with gochat's key prefix. Cheap to clone (clones share the
/// connection).
#[derive(Debug, Clone)]
pub struct EtcdClient {
    channel: Channel,
    prefix: Arc<str>,
    endpoints: Label,
}

/// The value of a `{prefix}/services/{service}/{instance}` key.
#[derive(Debug, Serialize, Deserialize)]
struct ServiceRecord {
    addr: String,
    #[serde(default)]
    started_at: i64,
}

/// The value of a `{prefix}/ids/{kind}/{id}` key.
#[derive(Debug, Serialize, Deserialize)]
struct IdRecord {
    id: String,
    #[serde(default)]
    started_at: i64,
}

/// A granted lease.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    /// The TTL etcd granted, in seconds.
    ttl_secs: i64,
}

impl Lease {
    /// How often the lease is renewed.
    fn renew_every(self) -> Duration {
        Duration::from_millis(
            u64::try_from(self.ttl_secs.saturating_mul(1000) / 3)
                .unwrap_or(1000)
                .max(300),
        )
    }

    fn ttl(self) -> Duration {
        Duration::from_secs(u64::try_from(self.ttl_secs).unwrap_or(1))
    }
}

/// What a registration keeps in etcd under its lease.
#[derive(Debug, Clone)]
enum Hold {
    /// A key written unconditionally (a service instance).
    Put { key: String, value: Vec<u8> },
    /// A key created only if absent (an id).
    Create {
        key: String,
        value: Vec<u8>,
        id: String,
    },
}

impl Hold {
    fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Create { key, .. } => key,
        }
    }
}

/// Why a keepalive stream ended.
enum KeepAliveEnd {
    /// etcd says the lease no longer exists.
    Lost,
    /// The stream broke; the lease may still exist.
    Broken(String),
}

/// Grows retry delays from 100 ms to 5 s.
#[derive(Debug)]
pub(super) struct Backoff(Duration);

impl Backoff {
    pub(super) fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        delay
    }

    pub(super) fn reset(&mut self) {
        *self = Self::new();
    }
}

/// The end of the key range holding every key that starts with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn lease_ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis().div_ceil(1000))
        .unwrap_or(i64::MAX)
        .max(1)
}

fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim().trim_end_matches('/');
    if trimmed.is_empty() || trimmed.starts_with('/') {
        trimmed.to_owned()
    } else {
        format!("/{trimmed}")
    }
}

impl EtcdClient {
    /// Connects to an etcd cluster. `endpoints` are its client URLs (`http://127.0.0.1:2379`;
    /// `host:port` works too); requests are spread over them. `prefix` namespaces every key
    /// (normally [`DEFAULT_PREFIX`](super::DEFAULT_PREFIX); a trailing `/` is ignored). Fails
    /// with [`DiscoveryError::Unreachable`] if no endpoint answers within
    /// [`DEFAULT_ETCD_CONNECT_TIMEOUT`].
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, DiscoveryError> {
        Self::connect_with_timeout(endpoints, prefix, DEFAULT_ETCD_CONNECT_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with an explicit wait for the first answer.
    pub async fn connect_with_timeout(
        endpoints: &[String],
        prefix: &str,
        wait: Duration,
    ) -> Result<Self, DiscoveryError> {
        if endpoints.is_empty() {
            return Err(DiscoveryError::NoEndpoints);
        }
        let parsed = endpoints
            .iter()
            .map(|e| endpoint_for(e, wait.min(Duration::from_secs(3))))
            .collect::<Result<Vec<_>, _>>()?;
        let client = Self {
            channel: lazy_channel(parsed),
            prefix: normalize_prefix(prefix).into(),
            endpoints: endpoints.join(",").into(),
        };

        // Probe: a cheap serializable count of one key.
        let deadline = Instant::now() + wait;
        let mut last_error = "no answer".to_owned();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let mut kv = client.kv();
            let probe = kv.range(pb::RangeRequest {
                key: client.prefix.as_bytes().to_vec(),
                count_only: true,
                serializable: true,
                ..Default::default()
            });
            match timeout(remaining, probe).await {
                Ok(Ok(_)) => {
                    tracing::info!(endpoints = %client.endpoints, prefix = %client.prefix, "connected to etcd");
                    return Ok(client);
                }
                Ok(Err(status)) => {
                    last_error = format!("{:?}: {}", status.code(), status.message());
                }
                Err(_) => {
                    last_error = "no answer".to_owned();
                    break;
                }
            }
            sleep(remaining.min(Duration::from_millis(200))).await;
        }
        Err(DiscoveryError::Unreachable {
            endpoints: client.endpoints.to_string(),
            timeout: wait,
            last_error,
        })
    }

    /// The key prefix (normalized: leading `/`, no trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The endpoints, comma-separated, as given to [`connect`](Self::connect).
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The underlying gRPC channel to etcd, for raw calls through the generated clients in
    /// `gochat_proto::etcd::etcdserverpb`.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// `{prefix}/services/{service}/`
    pub fn service_key_prefix(&self, service: &str) -> String {
        format!("{}/services/{service}/", self.prefix)
    }

    /// `{prefix}/ids/{kind}/`
    pub fn id_key_prefix(&self, kind: &str) -> String {
        format!("{}/ids/{kind}/", self.prefix)
    }

    /// Announces `instance` of `service` at `addr` (`host:port` or `http://host:port`, what
    /// callers dial): grants a lease of `ttl` (etcd may round it up to its minimum), writes
    /// `{prefix}/services/{service}/{instance}` = `{"addr": ..., "started_at": ...}` under it,
    /// and renews the lease in a background task every TTL/3. If the lease is lost (etcd
    /// restarted without it, or this process was cut off from etcd for longer than the TTL) a
    /// new lease is granted and the key written again.
    ///
    /// [`Registration::deregister`] removes the key at once; dropping the [`Registration`] stops
    /// the renewals and the key expires within the TTL. Must be called within a Tokio runtime.
    pub async fn register(
        &self,
        service: &str,
        instance: &str,
        addr: &str,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        check_name("service", service)?;
        check_name("instance", instance)?;
        endpoint_for(addr, Duration::from_secs(1))?;
        let key = format!("{}{instance}", self.service_key_prefix(service));
        let value = json(&ServiceRecord {
            addr: addr.trim().to_owned(),
            started_at: crate::time::now_ms(),
        });
        let hold = Hold::Put { key, value };
        let lease_id = Arc::new(AtomicI64::new(0));
        let lease = self.acquire(&hold, ttl, &lease_id).await?;
        Ok(self.start(hold, ttl, lease, lease_id))
    }

    /// Allocates the smallest free id `{kind}-1`, `{kind}-2`, ... among the live holders of
    /// `kind` and holds it under a lease kept alive like a registration's: the key
    /// `{prefix}/ids/{kind}/{kind}-{n}` is created in a transaction only if it does not exist,
    /// so concurrent claimers never get the same id. The id is free again once the
    /// [`Registration`] is deregistered, or dropped and its TTL has passed.
    pub async fn claim(
        &self,
        kind: &str,
        ttl: Duration,
    ) -> Result<(String, Registration), DiscoveryError> {
        check_name("kind", kind)?;
        let key_prefix = self.id_key_prefix(kind);
        let lease_id = Arc::new(AtomicI64::new(0));
        let lease = self.grant(ttl, &key_prefix).await?;
        lease_id.store(lease.id, Ordering::SeqCst);
        let started_at = crate::time::now_ms();
        let number_prefix = format!("{kind}-");
        for attempt in 1..=MAX_CLAIM_ATTEMPTS {
            let taken: BTreeSet<u64> = match self.range_prefix(&key_prefix).await {
                Ok((_, kvs)) => kvs
                    .iter()
                    .filter_map(|kv| kv.key.strip_prefix(key_prefix.as_bytes()))
                    .filter_map(|id| std::str::from_utf8(id).ok())
                    .filter_map(|id| id.strip_prefix(&number_prefix))
                    .filter_map(|n| n.parse().ok())
                    .collect(),
                Err(e) => {
                    self.revoke_quietly(lease.id, &key_prefix).await;
                    return Err(e);
                }
            };
            let mut n = 1u64;
            while taken.contains(&n) {
                n += 1;
            }
            let id = format!("{kind}-{n}");
            let key = format!("{key_prefix}{id}");
            let value = json(&IdRecord {
                id: id.clone(),
                started_at,
            });
            match self.create(&key, &value, lease.id, &id).await {
                Ok(()) => {
                    let hold = Hold::Create {
                        key,
                        value,
                        id: id.clone(),
                    };
                    return Ok((id, self.start(hold, ttl, lease, lease_id)));
                }
                Err(DiscoveryError::IdTaken { .. }) => {
                    tracing::debug!(%id, attempt, "id claimed by someone else meanwhile; retrying");
                }
                Err(e) => {
                    self.revoke_quietly(lease.id, &key).await;
                    return Err(e);
                }
            }
        }
        self.revoke_quietly(lease.id, &key_prefix).await;
        Err(DiscoveryError::ClaimContended {
            kind: kind.to_owned(),
            key_prefix,
            attempts: MAX_CLAIM_ATTEMPTS,
        })
    }

    /// Claims exactly `id` of `kind` (for a configured id), held like [`claim`](Self::claim)'s.
    /// Fails with [`DiscoveryError::IdTaken`] if a live instance holds it.
    pub async fn claim_exact(
        &self,
        kind: &str,
        id: &str,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        check_name("kind", kind)?;
        check_name("id", id)?;
        let key = format!("{}{id}", self.id_key_prefix(kind));
        let value = json(&IdRecord {
            id: id.to_owned(),
            started_at: crate::time::now_ms(),
        });
        let hold = Hold::Create {
            key,
            value,
            id: id.to_owned(),
        };
        let lease_id = Arc::new(AtomicI64::new(0));
        let lease = self.acquire(&hold, ttl, &lease_id).await?;
        Ok(self.start(hold, ttl, lease, lease_id))
    }

    /// The live instances of `service` (instance -> address), kept up to date: the current
    /// `{prefix}/services/{service}/` range first, then a watch from the next revision. When the
    /// watch breaks (etcd restarted, network cut, history compacted) the watcher logs, re-reads
    /// the range and watches again; meanwhile the view keeps its last known state. The watching
    /// task ends once every receiver is dropped. Must be called within a Tokio runtime.
    pub async fn watch_service(
        &self,
        service: &str,
    ) -> Result<watch::Receiver<BTreeMap<String, String>>, DiscoveryError> {
        check_name("service", service)?;
        watch_prefix(
            self,
            self.service_key_prefix(service),
            decode_service,
            Clone::clone,
        )
        .await
    }

    /// The ids of `kind` currently held by live instances (for example the live gateway ids),
    /// kept up to date like [`watch_service`](Self::watch_service).
    pub async fn watch_ids(
        &self,
        kind: &str,
    ) -> Result<watch::Receiver<BTreeSet<String>>, DiscoveryError> {
        check_name("kind", kind)?;
        watch_prefix(self, self.id_key_prefix(kind), decode_id, |ids| {
            ids.keys().cloned().collect()
        })
        .await
    }

    // ----- raw operations -----

    pub(super) fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
    }

    fn lease_client(&self) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel.clone())
    }

    fn rpc_error(&self, op: &'static str, key: &str, status: &tonic::Status) -> DiscoveryError {
        DiscoveryError::Etcd {
            op,
            key: key.to_owned(),
            endpoints: self.endpoints.to_string(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// Runs a unary call, retrying twice if the endpoint is unavailable (another endpoint may
    /// answer). Every request retried this way is idempotent or checked by its caller.
    async fn unary<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut call: F,
    ) -> Result<T, DiscoveryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut backoff = Backoff::new();
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == tonic::Code::Unavailable && attempt < 2 => {
                    attempt += 1;
                    tracing::debug!(
                        op,
                        key,
                        message = status.message(),
                        "etcd unavailable; retrying"
                    );
                    sleep(backoff.next_delay()).await;
                }
                Err(status) => return Err(self.rpc_error(op, key, &status)),
            }
        }
    }

    /// Every key under `key_prefix`, and the store revision of the read.
    pub(super) async fn range_prefix(
        &self,
        key_prefix: &str,
    ) -> Result<(i64, Vec<KeyValue>), DiscoveryError> {
        let request = pb::RangeRequest {
            key: key_prefix.as_bytes().to_vec(),
            range_end: prefix_end(key_prefix.as_bytes()),
            ..Default::default()
        };
        let response = self
            .unary("Range", key_prefix, || {
                let (mut kv, request) = (self.kv(), request.clone());
                async move { kv.range(request).await }
            })
            .await?;
        let revision =
            response
                .header
                .map(|h| h.revision)
                .ok_or_else(|| DiscoveryError::Protocol {
                    key: key_prefix.to_owned(),
                    endpoints: self.endpoints.to_string(),
                    reason: "Range response without a header".to_owned(),
                })?;
        Ok((revision, response.kvs))
    }

    async fn grant(&self, ttl: Duration, key: &str) -> Result<Lease, DiscoveryError> {
        let request = pb::LeaseGrantRequest {
            ttl: lease_ttl_secs(ttl),
            id: 0,
        };
        let response = self
            .unary("LeaseGrant", key, || {
                let mut leases = self.lease_client();
                async move { leases.lease_grant(request).await }
            })
            .await?;
        if !response.error.is_empty() || response.id == 0 {
            return Err(DiscoveryError::Protocol {
                key: key.to_owned(),
                endpoints: self.endpoints.to_string(),
                reason: format!("lease grant refused: {:?}", response.error),
            });
        }
        Ok(Lease {
            id: response.id,
            ttl_secs: response.ttl.max(1),
        })
    }

    /// Revokes a lease (deleting its keys); a lease that no longer exists is not an error.
    async fn revoke(&self, lease: i64, key: &str) -> Result<(), DiscoveryError> {
        let result = self
            .unary("LeaseRevoke", key, || {
                let mut leases = self.lease_client();
                async move {
                    leases
                        .lease_revoke(pb::LeaseRevokeRequest { id: lease })
                        .await
                }
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(DiscoveryError::Etcd {
                code: tonic::Code::NotFound,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn revoke_quietly(&self, lease: i64, key: &str) {
        if let Err(e) = self.revoke(lease, key).await {
            tracing::warn!(lease, error = %e, "could not revoke an unused etcd lease (it will expire)");
        }
    }

    async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), DiscoveryError> {
        let request = pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        };
        self.unary("Put", key, || {
            let (mut kv, request) = (self.kv(), request.clone());
            async move { kv.put(request).await }
        })
        .await
        .map(drop)
    }

    /// Creates `key` under `lease` only if it does not exist. A key that exists under this very
    /// lease counts as created (an earlier attempt whose answer was lost).
    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
        id: &str,
    ) -> Result<(), DiscoveryError> {
        let request = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal.into(),
                target: CompareTarget::Create.into(),
                key: key.as_bytes().to_vec(),
                target_union: Some(TargetUnion::CreateRevision(0)),
                ..Default::default()
            }],
            success: vec![pb::RequestOp {
                request: Some(Request::RequestPut(pb::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.to_vec(),
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![pb::RequestOp {
                request: Some(Request::RequestRange(pb::RangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..Default::default()
                })),
            }],
        };
        let response = self
            .unary("Txn", key, || {
                let (mut kv, request) = (self.kv(), request.clone());
                async move { kv.txn(request).await }
            })
            .await?;
        if response.succeeded {
            return Ok(());
        }
        let holder_lease = response.responses.iter().find_map(|op| match &op.response {
            Some(Response::ResponseRange(range)) => range.kvs.first().map(|kv| kv.lease),
            _ => None,
        });
        if holder_lease == Some(lease) {
            return Ok(());
        }
        Err(DiscoveryError::IdTaken {
            id: id.to_owned(),
            key: key.to_owned(),
        })
    }

    /// Grants a lease and writes the held key under it. The lease id is published in
    /// `lease_id` as soon as it is granted, so a deregistration never misses it.
    async fn acquire(
        &self,
        hold: &Hold,
        ttl: Duration,
        lease_id: &AtomicI64,
    ) -> Result<Lease, DiscoveryError> {
        let lease = self.grant(ttl, hold.key()).await?;
        lease_id.store(lease.id, Ordering::SeqCst);
        let written = match hold {
            Hold::Put { key, value } => self.put(key, value, lease.id).await,
            Hold::Create { key, value, id } => self.create(key, value, lease.id, id).await,
        };
        if let Err(e) = written {
            self.revoke_quietly(lease.id, hold.key()).await;
            return Err(e);
        }
        Ok(lease)
    }

    /// Starts renewing a freshly acquired hold.
    fn start(
        &self,
        hold: Hold,
        ttl: Duration,
        lease: Lease,
        lease_id: Arc<AtomicI64>,
    ) -> Registration {
        tracing::info!(
            key = hold.key(),
            lease = lease.id,
            ttl_secs = lease.ttl_secs,
            "registered in etcd"
        );
        let (live_tx, live_rx) = watch::channel(true);
        let key = hold.key().to_owned();
        let task = tokio::spawn(keep_alive_task(
            self.clone(),
            hold,
            ttl,
            lease,
            Arc::clone(&lease_id),
            live_tx,
        ));
        Registration {
            client: self.clone(),
            key,
            lease_id,
            live: live_rx,
            task,
        }
    }

    /// Renews `lease` on one keepalive stream until the lease is gone or the stream breaks.
    async fn keep_alive(
        &self,
        lease: Lease,
        last_ok: &mut Instant,
        live: &watch::Sender<bool>,
    ) -> KeepAliveEnd {
        let every = lease.renew_every();
        let wait = every.max(Duration::from_secs(1));
        let request = pb::LeaseKeepAliveRequest { id: lease.id };
        // etcd answers (and sends response headers) only after a request: queue one first.
        let (tx, rx) = mpsc::channel(2);
        if tx.send(request).await.is_err() {
            return KeepAliveEnd::Broken("request queue closed".to_owned());
        }
        let mut leases = self.lease_client();
        let opened = timeout(wait, leases.lease_keep_alive(ReceiverStream::new(rx))).await;
        let mut responses = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return KeepAliveEnd::Broken(format!("{:?}: {}", status.code(), status.message()));
            }
            Err(_) => {
                return KeepAliveEnd::Broken(format!("no answer within {wait:?}"));
            }
        };
        loop {
            match timeout(wait, responses.message()).await {
                Ok(Ok(Some(response))) => {
                    if response.ttl <= 0 {
                        return KeepAliveEnd::Lost;
                    }
                    *last_ok = Instant::now();
                    live.send_if_modified(|live| !std::mem::replace(live, true));
                }
                Ok(Ok(None)) => {
                    return KeepAliveEnd::Broken("etcd closed the keepalive stream".to_owned());
                }
                Ok(Err(status)) => {
                    return KeepAliveEnd::Broken(format!(
                        "{:?}: {}",
                        status.code(),
                        status.message()
                    ));
                }
                Err(_) => {
                    return KeepAliveEnd::Broken(format!("no keepalive answer within {wait:?}"));
                }
            }
            sleep(every).await;
            if tx.send(request).await.is_err() {
                return KeepAliveEnd::Broken("request queue closed".to_owned());
            }
        }
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode_service(_instance: &str, value: &[u8]) -> Option<String> {
    serde_json::from_slice::<ServiceRecord>(value)
        .ok()
        .map(|record| record.addr)
}

fn decode_id(_id: &str, value: &[u8]) -> Option<()> {
    serde_json::from_slice::<IdRecord>(value).ok().map(drop)
}

/// Keeps a hold alive for the life of its [`Registration`].
async fn keep_alive_task(
    client: EtcdClient,
    hold: Hold,
    ttl: Duration,
    mut lease: Lease,
    lease_id: Arc<AtomicI64>,
    live: watch::Sender<bool>,
) {
    let key = hold.key().to_owned();
    let mut last_ok = Instant::now();
    let mut backoff = Backoff::new();
    sleep(lease.renew_every()).await;
    loop {
        match client.keep_alive(lease, &mut last_ok, &live).await {
            KeepAliveEnd::Lost => {
                tracing::warn!(%key, lease = lease.id, "etcd lease lost (expired or revoked); registering again");
            }
            KeepAliveEnd::Broken(reason) => {
                let silent_for = last_ok.elapsed();
                if silent_for > lease.ttl() {
                    live.send_if_modified(|live| std::mem::replace(live, false));
                }
                tracing::warn!(%key, lease = lease.id, %reason, ?silent_for, "etcd lease keepalive interrupted; retrying");
                // Retry at least as often as the lease is renewed, so that a lease etcd kept
                // across its restart is renewed before it expires.
                sleep(backoff.next_delay().min(lease.renew_every())).await;
                continue;
            }
        }
        live.send_if_modified(|live| std::mem::replace(live, false));
        loop {
            match client.acquire(&hold, ttl, &lease_id).await {
                Ok(new_lease) => {
                    lease = new_lease;
                    last_ok = Instant::now();
                    backoff.reset();
                    live.send_replace(true);
                    tracing::info!(%key, lease = lease.id, "registered in etcd again");
                    break;
                }
                Err(e @ DiscoveryError::IdTaken { .. }) => {
                    tracing::error!(%key, error = %e, "this instance's id was taken by another instance while its lease was lost; retrying");
                    sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "could not register in etcd again; retrying");
                    sleep(backoff.next_delay()).await;
                }
            }
        }
        sleep(lease.renew_every()).await;
    }
}

/// A key held in etcd under a lease that a background task keeps alive: a service instance
/// ([`EtcdClient::register`]) or an id ([`EtcdClient::claim`]).
///
/// [`deregister`](Self::deregister) removes the key at once. Dropping the registration stops the
/// renewals: the key expires within the lease TTL, which is also what happens when the process
/// crashes.
#[derive(Debug)]
pub struct Registration {
    client: EtcdClient,
    key: String,
    lease_id: Arc<AtomicI64>,
    live: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Registration {
    /// The etcd key this registration holds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The id of the lease currently holding the key (it changes when a lost lease is replaced).
    pub fn lease_id(&self) -> i64 {
        self.lease_id.load(Ordering::SeqCst)
    }

    /// Whether the key is known to be held: `false` once the lease was lost (or could not be
    /// renewed for longer than its TTL) until it is held again. For a claimed id, a long `false`
    /// means another instance may have taken the id.
    pub fn live(&self) -> watch::Receiver<bool> {
        self.live.clone()
    }

    /// Stops the renewals and revokes the lease: the key disappears at once.
    pub async fn deregister(mut self) -> Result<(), DiscoveryError> {
        self.task.abort();
        // Wait for the task to stop so that no new lease is granted after this point.
        let _ = (&mut self.task).await;
        let lease = self.lease_id();
        self.client.revoke(lease, &self.key).await?;
        tracing::info!(key = %self.key, lease, "deregistered from etcd");
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(
            prefix_end(b"/gochat/services/repo/"),
            b"/gochat/services/repo0"
        );
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn prefixes_are_normalized() {
        assert_eq!(normalize_prefix("/gochat"), "/gochat");
        assert_eq!(normalize_prefix("/gochat/"), "/gochat");
        assert_eq!(normalize_prefix("gochat"), "/gochat");
        assert_eq!(normalize_prefix(""), "");
    }

    #[test]
    fn lease_ttls_round_up_to_seconds() {
        assert_eq!(lease_ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(lease_ttl_secs(Duration::from_millis(2500)), 3);
        assert_eq!(lease_ttl_secs(Duration::from_secs(10)), 10);
        let lease = Lease { id: 1, ttl_secs: 9 };
        assert_eq!(lease.renew_every(), Duration::from_secs(3));
    }
}
