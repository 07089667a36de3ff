//! Service discovery: where the instances of a service are, and which ids are taken.
//!
//! Two implementations hide behind [`Discovery`]:
//!
//! - [`Discovery::Static`]: fixed addresses per service, from the configuration. `serve` mode and
//!   small fixed deployments use it; nothing registers and nothing changes at run time.
//! - [`Discovery::Etcd`]: etcd v3 ([`EtcdClient`]). Every instance registers itself under a
//!   lease it keeps alive; callers watch a service's live instance set and spread their gRPC
//!   calls over it ([`balanced_channel`]). A crashed instance stops renewing its lease and
//!   disappears from every caller's view within the lease TTL.
//!
//! The etcd client speaks etcd's gRPC API directly (the wire-compatible subset in
//! `gochat_proto::etcd`), so no `protoc` or C library is needed to build it.
//!
//! # etcd key layout
//!
//! Every key lives under one prefix (default `/gochat`, see [`DEFAULT_PREFIX`]), so several
//! gochat clusters (or test runs) can share one etcd cluster.
//!
//! | key | value | lifetime |
//! |-----|-------|----------|
//! | `{prefix}/services/{service}/{instance}` | JSON `{"addr": "10.0.0.5:9100", "started_at": 1712345678901}` | lease of the instance ([`EtcdClient::register`]) |
//! | `{prefix}/ids/{kind}/{id}` | JSON `{"id": "gw-3", "started_at": 1712345678901}` | lease of the holder ([`EtcdClient::claim`], [`EtcdClient::claim_exact`]) |
//!
//! - `service` is `repo`, `logic`, `gateway`, ...; `instance` is any name unique among the live
//!   instances of the service (gochat uses the instance's claimed id or its address). `addr` is
//!   the gRPC address callers dial: `host:port` (plain HTTP/2) or a full `http://host:port` URI.
//!   `started_at` is Unix milliseconds.
//! - `kind` is an id family such as `gw`; [`EtcdClient::claim`] hands out `{kind}-1`,
//!   `{kind}-2`, ... (the smallest free number first) with an etcd transaction that creates the
//!   key only if it does not exist, so two live instances never hold the same id.
//! - Leases: a registration's lease is granted with the requested TTL (etcd rounds it up to its
//!   minimum, about 2 s by default) and renewed every TTL/3. `deregister` revokes it (the key
//!   disappears at once); a crashed process stops renewing (the key expires within the TTL). If
//!   the lease is lost anyway (etcd restarted without its data, or the instance was cut off for
//!   longer than the TTL) the instance grants a new lease and writes its key again.
//! - Watchers read the whole `{prefix}/services/{service}/` range, then watch it from the next
//!   revision; on a broken stream or a compaction they log, re-read the range and watch again.
//!
//! Inspect it with `etcdctl get --prefix /gochat/`.

mod etcd;
mod watcher;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

pub use etcd::{EtcdClient, Registration};

/// The default key prefix of gochat's etcd keys.
pub const DEFAULT_PREFIX: &str = "/gochat";

/// How long [`EtcdClient::connect`] waits for an etcd endpoint to answer.
pub const DEFAULT_ETCD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP connect timeout of the channels [`Discovery::channel_for`] builds.
pub const DEFAULT_CHANNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A discovery failure. Messages name the etcd endpoints, key, service or id involved.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No etcd endpoint was configured.
    #[error("no etcd endpoint configured")]
    NoEndpoints,
    /// An etcd endpoint or a service address is not a usable URI.
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it was refused.
        reason: String,
    },
    /// None of the etcd endpoints answered in time.
    #[error("no etcd endpoint answered within {timeout:?} (tried {endpoints}): {last_error}")]
    Unreachable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// How long the client waited.
        timeout: Duration,
        /// The last error seen.
        last_error: String,
    },
    /// An etcd request failed.
    #[error("etcd {op} of {key} at {endpoints} failed: {code:?}: {message}")]
    Etcd {
        /// The RPC (`Range`, `Put`, `Txn`, `LeaseGrant`, ...).
        op: &'static str,
        /// The key (or key prefix, or lease) the request was about.
        key: String,
        /// The etcd endpoints of the client.
        endpoints: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The gRPC status message.
        message: String,
    },
    /// etcd answered something this client cannot use.
    #[error("unexpected answer from etcd at {endpoints} for {key}: {reason}")]
    Protocol {
        /// The key the request was about.
        key: String,
        /// The etcd endpoints of the client.
        endpoints: String,
        /// What was wrong.
        reason: String,
    },
    /// A service, instance, kind or id name is empty or contains `/`.
    #[error("invalid {what} name {name:?}: it must be non-empty and must not contain '/'")]
    InvalidName {
        /// Which kind of name (`service`, `instance`, `kind`, `id`).
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// [`EtcdClient::claim_exact`]: another live instance holds the id.
    #[error("id {id} is already held by a live instance (etcd key {key} exists)")]
    IdTaken {
        /// The id.
        id: String,
        /// Its etcd key.
        key: String,
    },
    /// [`EtcdClient::claim`] lost too many races in a row.
    #[error("could not claim a free {kind} id under {key_prefix} after {attempts} attempts")]
    ClaimContended {
        /// The id kind.
        kind: String,
        /// The etcd key prefix of the kind.
        key_prefix: String,
        /// Attempts made.
        attempts: u32,
    },
    /// [`Discovery::Static`] has no address for the service.
    #[error("no static address configured for service {0}")]
    UnknownService(String),
}

/// Where services are: fixed addresses, or etcd. Callers ask for a channel to a service and do
/// not care which.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// Fixed addresses per service (`host:port` or `http://host:port`), from the configuration.
    /// Nothing registers; the view never changes.
    Static {
        /// Service name -> the addresses of its instances.
        services: BTreeMap<String, Vec<String>>,
    },
    /// etcd leases and watches.
    Etcd(EtcdClient),
}

impl Discovery {
    /// A channel that spreads calls over the live instances of `service`: the configured
    /// addresses ([`static_channel`]) or the instances registered in etcd, following them as
    /// they come and go ([`balanced_channel`] over [`EtcdClient::watch_service`]). TCP connects
    /// time out after [`DEFAULT_CHANNEL_CONNECT_TIMEOUT`]. Must be called within a Tokio runtime.
    pub async fn channel_for(&self, service: &str) -> Result<Channel, DiscoveryError> {
        self.channel_with_timeout(service, DEFAULT_CHANNEL_CONNECT_TIMEOUT)
            .await
    }

    /// [`channel_for`](Self::channel_for) with TCP connects timing out after
    /// `connect_timeout`.
    pub async fn channel_with_timeout(
        &self,
        service: &str,
        connect_timeout: Duration,
    ) -> Result<Channel, DiscoveryError> {
        match self {
            Self::Static { services } => {
                let addrs = services
                    .get(service)
                    .filter(|addrs| !addrs.is_empty())
                    .ok_or_else(|| DiscoveryError::UnknownService(service.to_owned()))?;
                let endpoints = addrs
                    .iter()
                    .map(|addr| endpoint_for(addr, connect_timeout))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(lazy_channel(endpoints))
            }
            Self::Etcd(client) => {
                let rx = client.watch_service(service).await?;
                Ok(balanced_channel(rx, connect_timeout))
            }
        }
    }

    /// The live instances of `service` (instance -> address), kept up to date. With static
    /// discovery the instances are named after their addresses and the view never changes (its
    /// `changed()` reports the sender as gone).
    pub async fn watch_service(
        &self,
        service: &str,
    ) -> Result<watch::Receiver<BTreeMap<String, String>>, DiscoveryError> {
        match self {
            Self::Static { services } => {
                let addrs = services
                    .get(service)
                    .ok_or_else(|| DiscoveryError::UnknownService(service.to_owned()))?;
                let view = addrs.iter().map(|a| (a.clone(), a.clone())).collect();
                Ok(watch::Sender::new(view).subscribe())
            }
            Self::Etcd(client) => client.watch_service(service).await,
        }
    }

    /// Announces this instance of `service` at `addr` ([`EtcdClient::register`]). With static
    /// discovery there is nothing to announce and the result is `None`.
    pub async fn register(
        &self,
        service: &str,
        instance: &str,
        addr: &str,
        ttl: Duration,
    ) -> Result<Option<Registration>, DiscoveryError> {
        match self {
            Self::Static { .. } => Ok(None),
            Self::Etcd(client) => client
                .register(service, instance, addr, ttl)
                .await
                .map(Some),
        }
    }
}

/// Parses a service address (`host:port` or `http://host:port`) into a tonic endpoint with the
/// given connect timeout. `https` is refused: this build has no TLS support.
pub fn endpoint_for(addr: &str, connect_timeout: Duration) -> Result<Endpoint, DiscoveryError> {
    let addr = addr.trim();
    let invalid = |reason: String| DiscoveryError::InvalidAddress {
        addr: addr.to_owned(),
        reason,
    };
    if addr.is_empty() {
        return Err(invalid("empty address".to_owned()));
    }
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    if !uri.starts_with("http://") {
        return Err(invalid(
            "only plain http:// (h2c) addresses are supported".to_owned(),
        ));
    }
    let endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(e.to_string()))?;
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// One lazily connected channel over fixed endpoints (balanced when there are several).
fn lazy_channel(endpoints: Vec<Endpoint>) -> Channel {
    if let [endpoint] = endpoints.as_slice() {
        return endpoint.connect_lazy();
    }
    Channel::balance_list(endpoints.into_iter())
}

/// A channel over fixed addresses (`host:port` or `http://host:port`), for setups without etcd.
/// With several addresses calls are spread over them. Connections are made lazily and remade
/// after failures, so an instance that is down at start-up is used once it comes up.
pub fn static_channel(addrs: &[String]) -> Result<Channel, DiscoveryError> {
    if addrs.is_empty() {
        return Err(DiscoveryError::InvalidAddress {
            addr: String::new(),
            reason: "no address given".to_owned(),
        });
    }
    let endpoints = addrs
        .iter()
        .map(|addr| endpoint_for(addr, DEFAULT_CHANNEL_CONNECT_TIMEOUT))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(lazy_channel(endpoints))
}

/// A channel that spreads calls over a live instance set (instance -> address, as
/// [`EtcdClient::watch_service`] produces it): instances are added to and removed from the
/// balancer (`Channel::balance_channel`) as the set changes. While the set is empty, calls wait
/// for an instance (give them a deadline). An instance whose address is not valid is skipped with
/// a warning. The feeding task ends when the channel (all its clones) is dropped or the set's
/// sender goes away (the channel then keeps its last instances).
///
/// Must be called within a Tokio runtime.
pub fn balanced_channel(
    rx: watch::Receiver<BTreeMap<String, String>>,
    connect_timeout: Duration,
) -> Channel {
    let (channel, tx) = Channel::balance_channel::<String>(64);
    tokio::spawn(feed_balancer(rx, tx, connect_timeout));
    channel
}

/// Turns instance-set snapshots into balancer changes.
async fn feed_balancer(
    mut rx: watch::Receiver<BTreeMap<String, String>>,
    tx: mpsc::Sender<Change<String, Endpoint>>,
    connect_timeout: Duration,
) {
    // What the balancer currently has: instance -> address.
    let mut current: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let wanted = rx.borrow_and_update().clone();
        let mut changes = Vec::new();
        for (instance, addr) in &current {
            if wanted.get(instance) != Some(addr) {
                changes.push(Change::Remove(instance.clone()));
            }
        }
        current.retain(|instance, addr| wanted.get(instance) == Some(addr));
        for (instance, addr) in &wanted {
            if current.contains_key(instance) {
                continue;
            }
            match endpoint_for(addr, connect_timeout) {
                Ok(endpoint) => {
                    tracing::debug!(%instance, %addr, "instance added to the balancer");
                    changes.push(Change::Insert(instance.clone(), endpoint));
                    current.insert(instance.clone(), addr.clone());
                }
                Err(e) => tracing::warn!(%instance, error = %e, "skipping instance"),
            }
        }
        for change in changes {
            if tx.send(change).await.is_err() {
                return; // the channel was dropped
            }
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return; // the instance set will not change any more
                }
            }
            () = tx.closed() => return,
        }
    }
}

/// Checks a name used as one etcd key segment.
fn check_name(what: &'static str, name: &str) -> Result<(), DiscoveryError> {
    if name.is_empty() || name.contains('/') {
        return Err(DiscoveryError::InvalidName {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Shared text of the etcd endpoints, for error messages.
type Label = Arc<str>;
