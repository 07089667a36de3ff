//! [`LiveGateways`]: which gateways are up, for deliveries addressed to "everyone" (the world
//! room). Serve mode has one gateway ([`StaticGateways`]); etcd discovery implements the same
//! trait in the distributed mode.

use std::sync::Arc;

/// The gateways currently serving clients.
pub trait LiveGateways: Send + Sync + 'static {
    /// Their ids (each has its `im-downstream-topic-{id}`), without duplicates.
    fn gateways(&self) -> Vec<String>;
}

/// A fixed list of gateways.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StaticGateways(pub Vec<String>);

impl StaticGateways {
    /// The list `ids`.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(ids: I) -> Self {
        Self(ids.into_iter().map(Into::into).collect())
    }
}

impl LiveGateways for StaticGateways {
    fn gateways(&self) -> Vec<String> {
        let mut ids = self.0.clone();
        ids.sort();
        ids.dedup();
        ids
    }
}

impl<T: LiveGateways + ?Sized> LiveGateways for Arc<T> {
    fn gateways(&self) -> Vec<String> {
        (**self).gateways()
    }
}
