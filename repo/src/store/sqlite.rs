//! The embedded default: SQLite in WAL mode through diesel-async's `SyncConnectionWrapper`.
//!
//! One writer connection sits behind an async mutex, so writers queue in-process instead of
//! failing with `SQLITE_BUSY`; readers come from a pool and never wait for the writer (WAL).

use std::path::Path;
use std::sync::Arc;

use diesel::prelude::*;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures::FutureExt;
use tokio::sync::{Mutex, MutexGuard};

use super::sql::{Prepared, TxError, impl_sql_store};
use super::{StoreError, StoreResult};
use crate::model::SaveOutcome;

/// The SQLite migrations, embedded in the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/sqlite");

type Conn = SyncConnectionWrapper<SqliteConnection>;

/// Every connection runs these first: WAL for concurrent readers, a busy timeout for the rare
/// lock wait (another process, a checkpoint), and NORMAL sync, which in WAL mode loses no
/// committed transaction on a process crash (only on power loss of the last ones).
const PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY;";

/// SQLite store; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The one connection that writes.
    writer: Mutex<Conn>,
    /// Connections that only read.
    readers: Pool<Conn>,
    /// The database file.
    path: String,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, migrates it, and opens the writer
    /// and `readers` reader connections.
    pub async fn open(path: &str, readers: usize) -> StoreResult<Self> {
        if let Some(dir) = Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        migrate(path).await?;
        let mut writer = Conn::establish(path)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {path}: {e}")))?;
        writer
            .batch_execute(PRAGMAS)
            .await
            .map_err(super::sql::classify)?;
        let mut config = ManagerConfig::default();
        config.custom_setup = Box::new(|url| {
            let url = url.to_owned();
            async move {
                let mut conn = Conn::establish(&url).await?;
                conn.batch_execute(PRAGMAS)
                    .await
                    .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
                Ok(conn)
            }
            .boxed()
        });
        let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(path, config);
        let pool = Pool::builder(manager)
            .max_size(readers.max(1))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("reader pool: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                readers: pool,
                path: path.to_owned(),
            }),
        })
    }

    async fn writer(&self) -> StoreResult<MutexGuard<'_, Conn>> {
        Ok(self.inner.writer.lock().await)
    }

    /// One attempt at storing a batch: the whole transaction runs in one blocking call on the
    /// writer's sync connection (one thread hop per batch instead of one per statement).
    async fn save_once(&self, prepared: &Prepared) -> Result<Vec<SaveOutcome>, TxError> {
        let prepared = prepared.clone();
        let mut conn = self.inner.writer.lock().await;
        conn.spawn_blocking(
            move |c| Ok(c.transaction::<_, TxError, _>(|c| save_sync(c, &prepared))),
        )
        .await
        .map_err(TxError::Diesel)?
    }

    async fn reader(&self) -> StoreResult<Object<Conn>> {
        self.inner
            .readers
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("sqlite reader pool: {e}")))
    }
}

/// The SQLite save path, on the sync connection (diesel's sync query methods, not diesel-async's).
mod sync_save {
    use diesel::prelude::*;

    use super::super::sql::{
        INSERT_CHUNK, NewReadPointer, Prepared, TxError, insert_failure, newest_per_conversation,
        newest_per_sender,
    };
    use crate::model::{Message, SaveOutcome};
    use crate::schema::{conversations, messages, user_read_pointers};

    /// Stores a prepared batch inside an open transaction.
    pub(super) fn save_sync(
        c: &mut SqliteConnection,
        p: &Prepared,
    ) -> Result<Vec<SaveOutcome>, TxError> {
        // Same statement order as MySQL's path: lock existing rows, then create missing ones.
        let ids: Vec<&str> = p.conversations.iter().map(|c| c.id.as_str()).collect();
        diesel::update(conversations::table.filter(conversations::id.eq_any(&ids)))
            .set(conversations::updated_at.eq(p.now))
            .execute(c)?;
        diesel::insert_or_ignore_into(conversations::table)
            .values(&p.conversations)
            .execute(c)?;
        let mut stored = Vec::new();
        for chunk in p.ids.chunks(INSERT_CHUNK) {
            stored.extend(
                messages::table
                    .filter(messages::id.eq_any(chunk))
                    .select(Message::as_select())
                    .load(c)?,
            );
        }
        for chunk in p.keys.chunks(INSERT_CHUNK) {
            stored.extend(
                messages::table
                    .filter(messages::sender_id.eq_any(&p.senders))
                    .filter(messages::client_msg_id.eq_any(chunk))
                    .select(Message::as_select())
                    .load(c)?,
            );
        }
        let (outcomes, rows) = p.plan(stored);
        for chunk in rows.chunks(INSERT_CHUNK) {
            diesel::insert_into(messages::table)
                .values(chunk)
                .execute(c)
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
            .execute(c)?;
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
                if forward.execute(c)? == 0 {
                    diesel::insert_or_ignore_into(user_read_pointers::table)
                        .values(&NewReadPointer {
                            user_id: user,
                            conversation_id: conv,
                            last_read_seq_id: seq,
                            updated_at: p.now,
                        })
                        .execute(c)?;
                }
            }
        }
        Ok(outcomes)
    }
}

use sync_save::save_sync;

/// Applies pending migrations to the file at `path`.
pub async fn migrate(path: &str) -> StoreResult<()> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> StoreResult<()> {
        let mut conn = SqliteConnection::establish(&path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {path}: {e}")))?;
        diesel::connection::SimpleConnection::batch_execute(&mut conn, PRAGMAS)
            .map_err(super::sql::classify)?;
        conn.run_pending_migrations(MIGRATIONS)
            .map_err(|e| StoreError::Database(format!("migrating {path}: {e}")))?;
        Ok(())
    })
    .await
    .map_err(|e| StoreError::Database(format!("migration task: {e}")))?
}

/// Multi-row inserts run on the inner sync connection: diesel's SQLite batch insert is only
/// implemented there (it is still inside the open transaction: same connection).
macro_rules! sqlite_batch {
    ($conn:expr, $insert:ident, $table:expr, $rows:expr) => {{
        let rows = $rows;
        $conn
            .spawn_blocking(move |c| {
                diesel::RunQueryDsl::execute(diesel::$insert($table).values(&rows), c)
            })
            .await
    }};
}

impl_sql_store!(SqliteStore, sqlite_batch);
