//! Keeping a local view of an etcd key range: one Range, then a Watch from the next revision,
//! and a fresh Range whenever the watch breaks.

use std::collections::BTreeMap;

use gochat_proto::etcd::etcdserverpb as pb;
use gochat_proto::etcd::mvccpb::KeyValue;
use gochat_proto::etcd::mvccpb::event::EventType;
use pb::watch_client::WatchClient;
use pb::watch_request::RequestUnion;
use tokio::sync::{mpsc, watch};
use tokio::time::sleep;
use tokio_stream::wrappers::ReceiverStream;

use super::DiscoveryError;
use super::etcd::{Backoff, EtcdClient, prefix_end};

/// Reads an entry's value; `None` skips a value that is not understood.
type Decode<V> = fn(&str, &[u8]) -> Option<V>;

/// Turns the entries into what receivers see.
type Project<V, T> = fn(&BTreeMap<String, V>) -> T;

/// The entries directly under one key prefix, by the name after the prefix.
struct View<V> {
    key_prefix: String,
    decode: Decode<V>,
    entries: BTreeMap<String, V>,
}

impl<V> View<V> {
    /// The entry name of a key: what follows the prefix, if it is one non-empty segment.
    fn name<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        let rest = key.strip_prefix(self.key_prefix.as_bytes())?;
        let name = std::str::from_utf8(rest).ok()?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }

    fn put(&mut self, kv: &KeyValue) {
        let Some(name) = self.name(&kv.key) else {
            return;
        };
        match (self.decode)(name, &kv.value) {
            Some(value) => {
                self.entries.insert(name.to_owned(), value);
            }
            None => {
                tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "ignoring an etcd entry whose value is not understood");
                self.entries.remove(name);
            }
        }
    }

    fn delete(&mut self, kv: &KeyValue) {
        if let Some(name) = self.name(&kv.key) {
            self.entries.remove(name);
        }
    }

    fn reset(&mut self, kvs: &[KeyValue]) {
        self.entries.clear();
        for kv in kvs {
            self.put(kv);
        }
    }
}

fn publish<V, T: PartialEq>(tx: &watch::Sender<T>, view: &View<V>, project: Project<V, T>) {
    let next = project(&view.entries);
    tx.send_if_modified(|current| {
        if *current == next {
            false
        } else {
            *current = next;
            true
        }
    });
}

/// Reads the entries under `key_prefix` and keeps them up to date in a background task until
/// every receiver is dropped.
pub(super) async fn watch_prefix<V, T>(
    client: &EtcdClient,
    key_prefix: String,
    decode: Decode<V>,
    project: Project<V, T>,
) -> Result<watch::Receiver<T>, DiscoveryError>
where
    V: Send + Sync + 'static,
    T: PartialEq + Send + Sync + 'static,
{
    let (revision, kvs) = client.range_prefix(&key_prefix).await?;
    let mut view = View {
        key_prefix,
        decode,
        entries: BTreeMap::new(),
    };
    view.reset(&kvs);
    let (tx, rx) = watch::channel(project(&view.entries));
    tokio::spawn(run(client.clone(), view, revision, tx, project));
    Ok(rx)
}

async fn run<V, T: PartialEq>(
    client: EtcdClient,
    mut view: View<V>,
    mut revision: i64,
    tx: watch::Sender<T>,
    project: Project<V, T>,
) {
    let mut backoff = Backoff::new();
    loop {
        let reason = tokio::select! {
            () = tx.closed() => return,
            reason = follow(&client, &mut view, revision, &tx, project, &mut backoff) => reason,
        };
        tracing::warn!(prefix = %view.key_prefix, %reason, "etcd watch interrupted; re-reading the range");
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = sleep(backoff.next_delay()) => {}
            }
            match client.range_prefix(&view.key_prefix).await {
                Ok((read_at, kvs)) => {
                    view.reset(&kvs);
                    revision = read_at;
                    publish(&tx, &view, project);
                    tracing::info!(prefix = %view.key_prefix, revision, entries = view.entries.len(), "etcd range re-read; watching again");
                    break;
                }
                Err(e) => {
                    tracing::warn!(prefix = %view.key_prefix, error = %e, "re-reading the etcd range failed; the view may be stale; retrying");
                }
            }
        }
    }
}

/// Follows one watch stream from `revision + 1`; returns why it ended.
async fn follow<V, T: PartialEq>(
    client: &EtcdClient,
    view: &mut View<V>,
    revision: i64,
    tx: &watch::Sender<T>,
    project: Project<V, T>,
    backoff: &mut Backoff,
) -> String {
    let create = pb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: view.key_prefix.as_bytes().to_vec(),
            range_end: prefix_end(view.key_prefix.as_bytes()),
            start_revision: revision + 1,
            ..Default::default()
        })),
    };
    // The request half stays open (requests_tx lives until this function returns): closing it
    // would end the watch.
    let (requests_tx, requests_rx) = mpsc::channel(1);
    if requests_tx.send(create).await.is_err() {
        return "request queue closed".to_owned();
    }
    let opened = WatchClient::new(client.channel())
        .watch(ReceiverStream::new(requests_rx))
        .await;
    let mut stream = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return format!(
                "opening the watch at {} failed: {:?}: {}",
                client.endpoints(),
                status.code(),
                status.message()
            );
        }
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return "etcd closed the watch stream".to_owned(),
            Err(status) => {
                return format!(
                    "watch stream from {} broke: {:?}: {}",
                    client.endpoints(),
                    status.code(),
                    status.message()
                );
            }
        };
        if response.compact_revision > 0 {
            return format!(
                "revision {} was compacted (history starts at {})",
                revision + 1,
                response.compact_revision
            );
        }
        if response.canceled {
            return format!("etcd cancelled the watch: {:?}", response.cancel_reason);
        }
        if response.created {
            backoff.reset();
            tracing::debug!(prefix = %view.key_prefix, from = revision + 1, "etcd watch created");
        }
        if response.events.is_empty() {
            continue;
        }
        for event in &response.events {
            let Some(kv) = &event.kv else { continue };
            if event.r#type == EventType::Delete as i32 {
                view.delete(kv);
            } else {
                view.put(kv);
            }
        }
        publish(tx, view, project);
    }
}
