//! MySQL / MariaDB through diesel-async's `AsyncMysqlConnection` (pure Rust, mysql_async) behind
//! a deadpool pool. Writers and readers share the pool; InnoDB row locks serialize what must be.

use diesel::prelude::*;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures::FutureExt;

use super::sql::{
    INSERT_CHUNK, NewReadPointer, Prepared, TxError, impl_sql_store, insert_failure,
    newest_per_conversation, newest_per_sender,
};
use super::{StoreError, StoreResult};
use crate::model::{Message, SaveOutcome};

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

/// Creates the database `url` names unless it exists (`gochat migrate --create-database`):
/// connects to the server without a database and runs `CREATE DATABASE IF NOT EXISTS` with
/// gochat's character set (utf8mb4, binary collation: ids and usernames compare exactly).
pub async fn create_database(url: &str) -> StoreResult<()> {
    let (base, rest) = url
        .rsplit_once('/')
        .filter(|(b, _)| b.len() > "mysql://".len())
        .ok_or_else(|| StoreError::Invalid(format!("{} names no database", redact(url))))?;
    let db = rest.split('?').next().unwrap_or_default();
    if db.is_empty()
        || !db
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    {
        return Err(StoreError::Invalid(format!(
            "database name {db:?} must be letters, digits, '_' or '$'"
        )));
    }
    let mut conn = AsyncMysqlConnection::establish(base)
        .await
        .map_err(|e| StoreError::Unavailable(format!("mysql {}: {e}", redact(base))))?;
    conn.batch_execute(&format!(
        "CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    ))
    .await
    .map_err(|e| StoreError::Unavailable(format!("creating database {db}: {e}")))
}

impl MysqlStore {
    /// Connects to `url` (`mysql://user:pass@host:port/db`), migrates the database, and keeps a
    /// pool of at most `pool_size` connections. Fails when the server cannot be reached.
    pub async fn open(url: &str, pool_size: usize) -> StoreResult<Self> {
        migrate(url).await?;
        // READ COMMITTED: every statement sees the latest committed rows (a read after a lost
        // race sees the winner), and InnoDB takes fewer gap locks than under REPEATABLE READ.
        let mut config = ManagerConfig::default();
        config.custom_setup = Box::new(|url| {
            let url = url.to_owned();
            async move {
                let mut conn = AsyncMysqlConnection::establish(&url).await?;
                conn.batch_execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .await
                    .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
                Ok(conn)
            }
            .boxed()
        });
        let manager =
            AsyncDieselConnectionManager::<AsyncMysqlConnection>::new_with_config(url, config);
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

    /// One attempt at storing a batch, in one transaction.
    async fn save_once(&self, p: &Prepared) -> Result<Vec<SaveOutcome>, TxError> {
        use crate::schema::{conversations, messages, user_read_pointers};
        let mut conn = self.writer().await.map_err(TxError::Store)?;
        conn.transaction::<_, TxError, _>(async |c| {
            // Lock the conversation rows first (X, in primary-key order), then create missing
            // ones: a shared lock on a duplicate upgraded by the last_seq update would deadlock.
            let ids: Vec<&str> = p.conversations.iter().map(|c| c.id.as_str()).collect();
            diesel::update(conversations::table.filter(conversations::id.eq_any(&ids)))
                .set(conversations::updated_at.eq(p.now))
                .execute(c)
                .await?;
            diesel::insert_or_ignore_into(conversations::table)
                .values(&p.conversations)
                .execute(c)
                .await?;
            let mut stored = Vec::new();
            for chunk in p.ids.chunks(INSERT_CHUNK) {
                stored.extend(
                    messages::table
                        .filter(messages::id.eq_any(chunk))
                        .select(Message::as_select())
                        .load(c)
                        .await?,
                );
            }
            for chunk in p.keys.chunks(INSERT_CHUNK) {
                stored.extend(
                    messages::table
                        .filter(messages::sender_id.eq_any(&p.senders))
                        .filter(messages::client_msg_id.eq_any(chunk))
                        .select(Message::as_select())
                        .load(c)
                        .await?,
                );
            }
            let (outcomes, rows) = p.plan(stored);
            for chunk in rows.chunks(INSERT_CHUNK) {
                diesel::insert_into(messages::table)
                    .values(chunk)
                    .execute(c)
                    .await
                    .map_err(|e| insert_failure(e, chunk))?;
            }
            for m in newest_per_conversation(&rows) {
                diesel::update(
                    conversations::table
                        .filter(conversations::id.eq(&m.conversation_id))
                        .filter(conversations::last_seq.lt(m.seq_id)),
                )
                .set((
                    conversations::last_seq.eq(m.seq_id),
                    conversations::last_message_id.eq(Some(m.id)),
                    conversations::last_message_at.eq(m.created_at),
                    conversations::updated_at.eq(p.now),
                ))
                .execute(c)
                .await?;
            }
            if p.mark_read {
                for (user, conv, seq) in newest_per_sender(&rows) {
                    let forward = diesel::update(
                        user_read_pointers::table
                            .filter(user_read_pointers::user_id.eq(user))
                            .filter(user_read_pointers::conversation_id.eq(conv))
                            .filter(user_read_pointers::last_read_seq_id.lt(seq)),
                    )
                    .set((
                        user_read_pointers::last_read_seq_id.eq(seq),
                        user_read_pointers::updated_at.eq(p.now),
                    ));
                    if forward.clone().execute(c).await? == 0 {
                        let inserted = diesel::insert_or_ignore_into(user_read_pointers::table)
                            .values(&NewReadPointer {
                                user_id: user,
                                conversation_id: conv,
                                last_read_seq_id: seq,
                                updated_at: p.now,
                            })
                            .execute(c)
                            .await?;
                        if inserted == 0 {
                            forward.execute(c).await?;
                        }
                    }
                }
            }
            Ok(outcomes)
        })
        .await
    }

    async fn reader(&self) -> StoreResult<Object<AsyncMysqlConnection>> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("mysql pool: {e}")))
    }

    /// Point reads share the pool: a MySQL query is network I/O, never a blocked thread.
    async fn quick_reader(&self) -> StoreResult<Object<AsyncMysqlConnection>> {
        self.reader().await
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
