//! Building the repo service from configuration (`gochat serve` runs it in-process; `gochat
//! repo` serves it over gRPC, see the root crate's `cluster` module).

use std::path::Path;
use std::time::Duration;

use gochat_infra::config::{CacheBackend, Config};

use crate::cache::memory::MemoryCache;
use crate::cache::redis::RedisCache;
use crate::cache::{AnyCache, CacheError};
use crate::service::{Repo, RepoSettings};
use crate::store::{AnyStore, StoreError};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The cache.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// The database URL of `config`, defaulting to `<data_dir>/gochat.db`.
pub fn database_url(config: &Config, data_dir: &Path) -> String {
    if config.database.url.is_empty() {
        data_dir.join("gochat.db").to_string_lossy().into_owned()
    } else {
        config.database.url.clone()
    }
}

/// Repo's tunables from configuration.
pub fn settings(config: &Config) -> RepoSettings {
    RepoSettings {
        max_group_members: config.repo.max_group_members,
        argon2_memory_kib: config.repo.argon2_memory_kib,
        argon2_iterations: config.repo.argon2_iterations,
        presence_ttl: Duration::from_secs(config.repo.presence_ttl_secs.max(1)),
        node_id: config.repo.node_id,
        ..RepoSettings::default()
    }
}

/// Opens (and migrates) the database and connects the cache that `config` names.
pub async fn build(config: &Config, data_dir: &Path) -> Result<Repo, StartError> {
    let url = database_url(config, data_dir);
    let store = AnyStore::open(&url, config.database.pool_size).await?;
    store.set_writer_nice(config.database.writer_nice);
    let cache = match config.cache.backend {
        CacheBackend::Memory => AnyCache::Memory(MemoryCache::new(config.cache.max_entries)),
        CacheBackend::Redis => AnyCache::Redis(
            RedisCache::connect(&config.cache.redis_url, &config.cache.namespace).await?,
        ),
    };
    tracing::info!(engine = store.engine(), cache = ?config.cache.backend, "repo data layer ready");
    Ok(Repo::new(store, cache, settings(config)))
}
