//! MySQL / MariaDB through diesel-async's `AsyncMysqlConnection` (pure Rust, mysql_async) behind
//! a deadpool pool. Writers and readers share the pool; InnoDB row locks serialize what must be.

use diesel::prelude::*;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::sql::impl_sql_store;
use super::{StoreError, StoreResult};

/// The MySQL migrations, embedded in the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/mysql");

/// MySQL store; cheap to clone.
#[derive(Clone)]
pub struct MysqlStore {
    pool: Pool<AsyncMysqlConnection>,
    /// The URL without its password, for logs.
    display_url: String,
}

impl std::fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlStore")
            .field("url", &self.display_url)
            .finish()
    }
}

impl MysqlStore {
    /// Connects to `url` (`mysql://user:pass@host:port/db`), migrates the database, and keeps a
    /// pool of at most `pool_size` connections. Fails when the server cannot be reached.
    pub async fn open(url: &str, pool_size: usize) -> StoreResult<Self> {
        migrate(url).await?;
        let manager = AsyncDieselConnectionManager::<AsyncMysqlConnection>::new(url);
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("mysql pool: {e}")))?;
        let store = Self {
            pool,
            display_url: redact(url),
        };
        // Check now, so a wrong URL fails at start rather than at the first request.
        drop(store.reader().await?);
        Ok(store)
    }

    async fn writer(&self) -> StoreResult<Object<AsyncMysqlConnection>> {
        self.reader().await
    }

    async fn reader(&self) -> StoreResult<Object<AsyncMysqlConnection>> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("mysql pool: {e}")))
    }
}

/// Applies pending migrations to the database at `url`.
pub async fn migrate(url: &str) -> StoreResult<()> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || -> StoreResult<()> {
        let mut conn =
            <AsyncConnectionWrapper<AsyncMysqlConnection> as diesel::Connection>::establish(&url)
                .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to {}: {e}", redact(&url)))
            })?;
        conn.run_pending_migrations(MIGRATIONS)
            .map_err(|e| StoreError::Database(format!("migrating {}: {e}", redact(&url))))?;
        Ok(())
    })
    .await
    .map_err(|e| StoreError::Database(format!("migration task: {e}")))?
}

/// `mysql://user:secret@host/db` -> `mysql://user:***@host/db`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Multi-row inserts: one statement.
macro_rules! mysql_batch {
    ($conn:expr, $insert:ident, $table:expr, $rows:expr) => {{
        let rows = $rows;
        diesel::$insert($table).values(&rows).execute($conn).await
    }};
}

impl_sql_store!(MysqlStore, mysql_batch);

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("mysql://u:p@h:1/d"), "mysql://u:***@h:1/d");
        assert_eq!(super::redact("mysql://u@h/d"), "mysql://u@h/d");
    }
}
