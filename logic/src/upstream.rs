//! The upstream consumer: reads `im-upstream-topic` as consumer group `im-logic`, hands each
//! message to its Conversation actor, and commits a partition's records in offset order once
//! each is handled (stored and acknowledged, or refused). Records of different conversations are
//! handled concurrently (up to `max_in_flight`); a partition's commit never passes a record that
//! is still in flight, so a crash redelivers it (and the actor's dedup makes that harmless).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use gochat_infra::mq::{Bus, Consumer, MqError, Payload, Record};
use gochat_infra::wire::{UPSTREAM_TOPIC, UpstreamMessage};

use crate::{Logic, RepoApi};

/// The consumer group of logic instances.
pub const GROUP: &str = "im-logic";

/// One partition's records in flight, in offset order: (offset, handled).
type Window = VecDeque<(u64, bool)>;

impl<R: RepoApi, B: Bus> Logic<R, B> {
    /// Consumes `im-upstream-topic` until `shutdown` resolves or the bus closes.
    pub async fn run_upstream(
        &self,
        partitions: u32,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), MqError> {
        self.core
            .bus
            .ensure_topic(UPSTREAM_TOPIC, partitions)
            .await?;
        let mut consumer = self.core.bus.subscribe(GROUP, &[UPSTREAM_TOPIC]).await?;
        let mut windows: HashMap<u32, Window> = HashMap::new();
        let mut in_flight = FuturesUnordered::new();
        let max = self.core.settings.max_in_flight.max(1);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some((partition, offset)) = in_flight.next(), if !in_flight.is_empty() => {
                    finish(&mut consumer, &mut windows, partition, offset).await?;
                }
                record = consumer.recv(), if in_flight.len() < max => {
                    let record = record?;
                    let partition = record.partition;
                    let offset = record.offset;
                    windows.entry(partition).or_default().push_back((offset, false));
                    // Shared, not copied: in process the record holds the gateway's own `Arc`.
                    match record.payload.decode_shared::<UpstreamMessage>() {
                        Ok(message) => {
                            let logic = self.clone();
                            in_flight.push(async move {
                                let trace = message.trace_id.clone();
                                if let Err(e) = logic.core.directory.route(message).await {
                                    tracing::error!(cause = %e, trace_id = %trace, "upstream message not handled");
                                }
                                (partition, offset)
                            });
                        }
                        Err(e) => {
                            tracing::error!(cause = %e, partition, offset, "malformed upstream record skipped");
                            finish(&mut consumer, &mut windows, partition, offset).await?;
                        }
                    }
                }
            }
        }
        // Finish what is in hand, so its commits are not lost.
        while let Some((partition, offset)) = in_flight.next().await {
            finish(&mut consumer, &mut windows, partition, offset).await?;
        }
        Ok(())
    }
}

/// Marks a record handled and commits the partition up to its first unhandled record.
async fn finish<C: Consumer>(
    consumer: &mut C,
    windows: &mut HashMap<u32, Window>,
    partition: u32,
    offset: u64,
) -> Result<(), MqError> {
    let Some(window) = windows.get_mut(&partition) else {
        return Ok(());
    };
    if let Some(slot) = window.iter_mut().find(|(o, _)| *o == offset) {
        slot.1 = true;
    }
    let mut last = None;
    while let Some(&(o, true)) = window.front() {
        last = Some(o);
        window.pop_front();
    }
    if let Some(o) = last {
        let committed = consumer
            .commit(&Record {
                topic: UPSTREAM_TOPIC.to_owned(),
                partition,
                offset: o,
                key: String::new(),
                payload: Payload::default(),
                headers: BTreeMap::new(),
            })
            .await;
        match committed {
            Ok(()) => {}
            Err(MqError::Closed) => return Err(MqError::Closed),
            // A failed commit only means these records may come again (to us or to the
            // partition's next owner); handling them again changes nothing (dedup).
            Err(e) => tracing::warn!(cause = %e, partition, offset = o, "upstream commit failed"),
        }
    }
    Ok(())
}
