//! The embedded default: SQLite in WAL mode through diesel-async's `SyncConnectionWrapper`.
//!
//! One writer connection sits behind an async mutex, so writers queue in-process instead of
//! failing with `SQLITE_BUSY`; readers come from a pool and never wait for the writer (WAL).
//!
//! Message batches are group-committed: a batch joins a queue, and whoever holds the writer
//! next stores every queued batch in one transaction, with one set of statements and no lookup
//! while none of their messages was stored before (if one was, or anything else collides, that
//! transaction rolls back and a careful one follows, where each batch's failure rolls back only
//! that batch: see `commit_group`). While one transaction runs, the batches of
//! other conversations gather for the next one, so the number of commits stays near what the
//! writer can do while the messages per commit grow with the load.

use std::path::Path;
use std::sync::Arc;

use diesel::prelude::*;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::{SpawnBlocking, SyncConnectionWrapper};
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures::FutureExt;
use futures::future::BoxFuture;
use gochat_infra::telemetry as t;
use metrics::{counter, histogram};
use tokio::sync::{Mutex, MutexGuard, oneshot};

use super::sql::{Prepared, TxError, impl_sql_store};
use super::{StoreError, StoreResult};
use crate::model::SaveOutcome;

/// The SQLite migrations, embedded in the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/sqlite");

type Conn = SyncConnectionWrapper<SqliteConnection>;

/// A connection whose queries run on the calling thread, for reads of a few rows by key.
type QuickConn = SyncConnectionWrapper<SqliteConnection, Inline>;

/// Runs a connection's query where it is asked for, without a hand-off to tokio's blocking
/// pool. A read of a few rows by key from the page cache takes microseconds, less than the
/// hand-off itself (a task, the pool's lock, a thread woken and parked again): in a connection
/// storm the hand-offs of the two reads each connection makes (its login session, its single-
/// chat peers) were a third of the server's CPU (docs/benchmarks.md). Only such reads use it;
/// anything that may read many rows, and every write, keeps the blocking pool.
pub(crate) struct Inline;

impl SpawnBlocking for Inline {
    fn spawn_blocking<'a, R>(
        &mut self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> BoxFuture<'a, Result<R, Box<dyn std::error::Error + Send + Sync + 'static>>>
    where
        R: Send + 'static,
    {
        futures::future::ready(Ok(task())).boxed()
    }

    fn get_runtime() -> Self {
        Inline
    }
}

/// Every connection runs these first: WAL for concurrent readers, a busy timeout for the rare
/// lock wait (another process, a checkpoint), and NORMAL sync, which in WAL mode loses no
/// committed transaction on a process crash (only on power loss of the last ones).
const PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY;";

/// The writer's own settings. It checkpoints (copies the WAL into the database file) every
/// 10 000 WAL pages (about 39 MiB) rather than SQLite's 1 000: the index leaves hot while messages
/// flow are written many times in that window, and a checkpoint copies each page once, so this
/// writes about a sixth fewer bytes per message (docs/benchmarks.md). After a checkpoint the WAL
/// file is cut back to 64 MiB if a long read made it grow. Its page cache holds up to 64 MiB
/// instead of 2 MiB: the index leaves that messages go to (one per conversation and one per
/// sender) outnumber 2 MiB of pages under load, and a full cache both writes changed pages
/// into the WAL before the commit and reads evicted ones back.
const WRITER_PRAGMAS: &str = "PRAGMA wal_autocheckpoint = 10000; \
     PRAGMA journal_size_limit = 67108864; PRAGMA cache_size = -65536;";

/// The quick readers' own setting. Their queries run on the caller's thread (an actix arbiter
/// serving thousands of sessions, or a tokio worker), so a lock wait, rare for a WAL reader
/// (another process recovering the WAL or holding the file exclusively), may hold that thread
/// for 250 ms at most; then the read fails as busy, a transient error the caller reports.
const QUICK_PRAGMAS: &str = "PRAGMA busy_timeout = 250;";

/// SQLite store; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

/// A batch waiting for the writer, with where its outcome goes.
type Queued = (
    Arc<Prepared>,
    oneshot::Sender<Result<Vec<SaveOutcome>, TxError>>,
);

/// The batches of the next group commit.
#[derive(Default)]
struct Queue {
    batches: Vec<Queued>,
    /// When the oldest of `batches` was queued.
    since: Option<std::time::Instant>,
    /// A [`commit_loop`] runs and will take what is queued.
    committing: bool,
}

struct Inner {
    /// The one connection that writes.
    writer: Mutex<Conn>,
    /// Message batches waiting for the next group commit.
    queue: std::sync::Mutex<Queue>,
    /// The nice value group commits run at ([`WriterPriority`]); 0 leaves the thread as it is.
    writer_nice: std::sync::atomic::AtomicI32,
    /// Connections that only read.
    readers: Pool<Conn>,
    /// Connections that only read a few rows by key, on the caller's thread ([`Inline`]).
    quick: Pool<QuickConn>,
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
        writer
            .batch_execute(WRITER_PRAGMAS)
            .await
            .map_err(super::sql::classify)?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                queue: std::sync::Mutex::new(Queue::default()),
                writer_nice: std::sync::atomic::AtomicI32::new(0),
                readers: reader_pool(path, readers, "")?,
                // A quick read never waits while it holds its connection, so a thread holds
                // at most one at a time and the pool need not outnumber the readers.
                quick: reader_pool(path, readers, QUICK_PRAGMAS)?,
                path: path.to_owned(),
            }),
        })
    }

    /// Runs the group commits at `nice` from the next one on (Linux; elsewhere a no-op). The
    /// writer is the one thread every stored message waits for: when the machine is busy, a
    /// negative value lets it run as soon as it has work instead of taking turns with the
    /// sessions and actors whose work piles up behind it (docs/benchmarks.md, seventeenth
    /// session). Lowering a thread's nice needs `CAP_SYS_NICE` or `RLIMIT_NICE`; without them
    /// the commits run at the process's own priority (one warning).
    pub fn set_writer_nice(&self, nice: i32) {
        self.inner
            .writer_nice
            .store(nice.clamp(-20, 19), std::sync::atomic::Ordering::Relaxed);
    }

    async fn writer(&self) -> StoreResult<MutexGuard<'_, Conn>> {
        Ok(self.inner.writer.lock().await)
    }

    /// One attempt at storing a batch: it joins the queue of the next group commit, and the
    /// batch's caller starts the committer when none runs.
    async fn save_once(&self, prepared: &Arc<Prepared>) -> Result<Vec<SaveOutcome>, TxError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.inner.queue();
            q.batches.push((Arc::clone(prepared), tx));
            q.since.get_or_insert_with(std::time::Instant::now);
            !std::mem::replace(&mut q.committing, true)
        };
        if start {
            // A task of its own: the commit must not stop when this caller is dropped.
            tokio::spawn(commit_loop(Arc::clone(&self.inner)));
        }
        rx.await.unwrap_or_else(|_| {
            Err(TxError::Store(StoreError::Unavailable(
                "the sqlite writer stopped before storing the batch".into(),
            )))
        })
    }

    async fn reader(&self) -> StoreResult<Object<Conn>> {
        self.inner
            .readers
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("sqlite reader pool: {e}")))
    }

    /// A reader for a few rows by key: its queries run on this thread (see [`Inline`]).
    async fn quick_reader(&self) -> StoreResult<Object<QuickConn>> {
        self.inner
            .quick
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("sqlite reader pool: {e}")))
    }
}

/// A pool of up to `size` connections that only read, each set up with [`PRAGMAS`] and then
/// `own` (its own settings).
fn reader_pool<S>(
    path: &str,
    size: usize,
    own: &'static str,
) -> StoreResult<Pool<SyncConnectionWrapper<SqliteConnection, S>>>
where
    S: SpawnBlocking + Send + 'static,
{
    let mut config = ManagerConfig::default();
    // The default check runs `SELECT 1` at every checkout: for these connections one more
    // query per read (and, for the blocking pool, one more hand-off) to learn what a connection
    // to a local file cannot lose. A broken transaction is still checked.
    config.recycling_method = RecyclingMethod::Fast;
    config.custom_setup = Box::new(move |url| {
        let url = url.to_owned();
        async move {
            let mut conn = SyncConnectionWrapper::<SqliteConnection, S>::establish(&url).await?;
            conn.batch_execute(&format!("{PRAGMAS} {own}"))
                .await
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
            Ok(conn)
        }
        .boxed()
    });
    let manager = AsyncDieselConnectionManager::new_with_config(path, config);
    Pool::builder(manager)
        .max_size(size.max(1))
        .build()
        .map_err(|e| StoreError::Unavailable(format!("reader pool: {e}")))
}

/// The SQLite save path, on the sync connection (diesel's sync query methods, not diesel-async's).
mod sync_save {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Integer, Nullable, Text};
    use diesel::sqlite::Sqlite;

    use super::super::sql::{
        INSERT_CHUNK, NewConversation, Prepared, TxError, insert_failure, newest_per_conversation,
        newest_per_sender,
    };
    use crate::model::{Message, SaveOutcome};
    use crate::schema::{conversations, messages};

    /// Most messages a merged group commit takes; above it, batches go one by one.
    const MERGE_MAX_MESSAGES: usize = 4096;

    /// Stores a prepared batch inside an open transaction.
    pub(super) fn save_sync(
        c: &mut SqliteConnection,
        p: &Prepared,
    ) -> Result<Vec<SaveOutcome>, TxError> {
        // Unlike MySQL's path, no statement locks the existing conversation rows first: this
        // connection is the only writer. Missing rows are created.
        create_conversations(c, &p.conversations)?;
        let stored = find_stored(c, &p.ids, &p.senders, &p.keys)?;
        let (outcomes, rows) = p.plan(stored);
        insert_rows(c, &rows)?;
        advance_conversations(c, &rows, p.now)?;
        if p.mark_read {
            mark_read(c, &newest_per_sender(&rows), p.now)?;
        }
        Ok(outcomes)
    }

    /// Whether `batches` are few enough to be stored with one set of statements.
    pub(super) fn mergeable(batches: &[Arc<Prepared>]) -> bool {
        batches.iter().map(|p| p.batch.len()).sum::<usize>() <= MERGE_MAX_MESSAGES
    }

    /// Stores several batches with one set of statements, assuming none of their messages is
    /// stored yet (no lookup at all): what a group commit nearly always holds. A message that
    /// is stored after all (a retry, a key used before) or a seq already taken makes an insert
    /// fail, and the caller rolls the whole transaction back and goes the careful way
    /// ([`save_merged`], then batch by batch). Duplicates inside one batch are answered as
    /// [`save_sync`] answers them.
    pub(super) fn save_fresh(
        c: &mut SqliteConnection,
        batches: &[Arc<Prepared>],
    ) -> Result<Vec<Vec<SaveOutcome>>, TxError> {
        create_missing_conversations(c, batches)?;
        store_planned(c, batches, &[])
    }

    /// Stores several batches with one set of statements (one lookup of what is stored, one
    /// multi-row insert per 500 rows) instead of one set per batch. Fails (for the caller to
    /// roll back and go batch by batch) when the batches collide with each other (one id, key
    /// or seq in two batches) or are too many; each batch's answer is what
    /// [`save_sync`] would give alone.
    pub(super) fn save_merged(
        c: &mut SqliteConnection,
        batches: &[Arc<Prepared>],
    ) -> Result<Option<Vec<Vec<SaveOutcome>>>, TxError> {
        if !mergeable(batches) {
            return Ok(None);
        }
        create_missing_conversations(c, batches)?;
        let mut ids: Vec<i64> = batches.iter().flat_map(|p| p.ids.iter().copied()).collect();
        // Keys are looked up as (sender, key) pairs: `sender IN (..) AND key IN (..)` over the
        // whole group would probe the index once per sender for every key.
        let pairs: Vec<(i64, &str)> = batches
            .iter()
            .flat_map(|p| p.batch.iter())
            .filter_map(|m| m.client_msg_id.as_deref().map(|k| (m.sender_id, k)))
            .collect();
        ids.extend(ids_by_keys(c, &pairs)?);
        ids.sort_unstable();
        ids.dedup();
        let stored = find_stored(c, &ids, &[], &[])?;
        store_planned(c, batches, &stored).map(Some)
    }

    /// Creates the conversation rows `batches` need and do not have yet.
    fn create_missing_conversations(
        c: &mut SqliteConnection,
        batches: &[Arc<Prepared>],
    ) -> Result<(), TxError> {
        let mut seen = BTreeSet::new();
        let new_conversations: Vec<NewConversation> = batches
            .iter()
            .flat_map(|p| p.conversations.iter())
            .filter(|nc| seen.insert(nc.id.as_str()))
            .cloned()
            .collect();
        create_conversations(c, &new_conversations)
    }

    /// Stores what is new in `batches`, given the messages of theirs already `stored`, with
    /// one set of statements, and answers each batch.
    fn store_planned(
        c: &mut SqliteConnection,
        batches: &[Arc<Prepared>],
        stored: &[Message],
    ) -> Result<Vec<Vec<SaveOutcome>>, TxError> {
        let now = batches.iter().map(|p| p.now).max().unwrap_or_default();
        let mut answers = Vec::with_capacity(batches.len());
        let mut rows: Vec<Message> = Vec::new();
        // Where the rows of the batches that move their senders' read pointers lie in `rows`.
        let mut read_ranges = Vec::new();
        for p in batches {
            let (outcomes, fresh) = p.plan(stored.to_vec());
            if p.mark_read {
                read_ranges.push(rows.len()..rows.len() + fresh.len());
            }
            rows.extend(fresh);
            answers.push(outcomes);
        }
        insert_rows(c, &rows)?;
        advance_conversations(c, &rows, now)?;
        // Two batches may move one pointer; `mark_read` keeps the higher seq.
        let read: Vec<(i64, &str, i64)> = read_ranges
            .into_iter()
            .flat_map(|range| newest_per_sender(&rows[range]))
            .collect();
        mark_read(c, &read, now)?;
        Ok(answers)
    }

    fn create_conversations(
        c: &mut SqliteConnection,
        rows: &[NewConversation],
    ) -> Result<(), TxError> {
        for chunk in rows.chunks(INSERT_CHUNK) {
            diesel::insert_or_ignore_into(conversations::table)
                .values(chunk)
                .execute(c)?;
        }
        Ok(())
    }

    /// Stored messages with one of `ids`, or one of `keys` from one of `senders`.
    fn find_stored(
        c: &mut SqliteConnection,
        ids: &[i64],
        senders: &[i64],
        keys: &[String],
    ) -> Result<Vec<Message>, TxError> {
        let mut stored = Vec::new();
        for chunk in ids.chunks(INSERT_CHUNK) {
            stored.extend(
                messages::table
                    .filter(messages::id.eq_any(chunk))
                    .select(Message::as_select())
                    .load(c)?,
            );
        }
        for chunk in keys.chunks(INSERT_CHUNK) {
            stored.extend(
                messages::table
                    .filter(messages::sender_id.eq_any(senders))
                    .filter(messages::client_msg_id.eq_any(chunk))
                    .select(Message::as_select())
                    .load(c)?,
            );
        }
        Ok(stored)
    }

    /// A message id, read by name from a raw query.
    #[derive(QueryableByName)]
    struct IdRow {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }

    /// Ids of stored messages with one of the (sender, key) `pairs`: one statement per 500
    /// pairs, each pair one index probe (the pairs travel as one JSON parameter).
    fn ids_by_keys(c: &mut SqliteConnection, pairs: &[(i64, &str)]) -> Result<Vec<i64>, TxError> {
        let mut ids = Vec::new();
        for chunk in pairs.chunks(INSERT_CHUNK) {
            let json = json_param(&chunk)?;
            let rows: Vec<IdRow> = diesel::sql_query(
                "SELECT id FROM messages WHERE (sender_id, client_msg_id) IN \
                 (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') \
                 FROM json_each(?))",
            )
            .bind::<diesel::sql_types::Text, _>(json)
            .load(c)?;
            ids.extend(rows.into_iter().map(|r| r.id));
        }
        Ok(ids)
    }

    /// Inserts `rows`, 500 per statement, as `INSERT OR FAIL`: a row that breaks a constraint
    /// stops the statement without undoing the rows it inserted before, so SQLite keeps no
    /// statement journal for it (a copy of every page the statement changes, 3 % of the
    /// server's CPU when the store was the bottleneck, docs/benchmarks.md). Every caller runs
    /// this inside a transaction or savepoint that it rolls back whole on an error.
    fn insert_rows(c: &mut SqliteConnection, rows: &[Message]) -> Result<(), TxError> {
        const INSERT: &str = "INSERT OR FAIL INTO messages (id, conversation_id, sender_id, \
             message_type, content, seq_id, client_msg_id, created_at) VALUES ";
        const ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?)";
        for chunk in rows.chunks(INSERT_CHUNK) {
            let mut sql = String::with_capacity(INSERT.len() + chunk.len() * (ROW.len() + 1));
            sql.push_str(INSERT);
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(ROW);
            }
            let mut query = diesel::sql_query(sql).into_boxed::<Sqlite>();
            for m in chunk {
                query = query
                    .bind::<BigInt, _>(m.id)
                    .bind::<Text, _>(m.conversation_id.as_str())
                    .bind::<BigInt, _>(m.sender_id)
                    .bind::<Integer, _>(m.message_type)
                    .bind::<Text, _>(m.content.as_str())
                    .bind::<BigInt, _>(m.seq_id)
                    .bind::<Nullable<Text>, _>(m.client_msg_id.as_deref())
                    .bind::<BigInt, _>(m.created_at);
            }
            query.execute(c).map_err(|e| insert_failure(e, chunk))?;
        }
        Ok(())
    }

    /// `values` as one JSON text parameter, which the statements below read with `json_each`:
    /// a set of rows bound as one value, so one prepared statement serves any number of them.
    fn json_param(values: &impl serde::Serialize) -> Result<String, TxError> {
        serde_json::to_string(values)
            .map_err(|e| TxError::Store(crate::store::StoreError::Database(e.to_string())))
    }

    /// Moves each conversation's last seq and message forward to its newest row: one
    /// `UPDATE .. FROM` per 500 conversations (each row one primary-key probe), not one
    /// statement per conversation. A row whose conversation already went further stays.
    fn advance_conversations(
        c: &mut SqliteConnection,
        rows: &[Message],
        now: i64,
    ) -> Result<(), TxError> {
        let newest: Vec<(&str, i64, i64, i64)> = newest_per_conversation(rows)
            .into_iter()
            .map(|m| (m.conversation_id.as_str(), m.seq_id, m.id, m.created_at))
            .collect();
        for chunk in newest.chunks(INSERT_CHUNK) {
            diesel::sql_query(
                "UPDATE conversations SET last_seq = v.seq, last_message_id = v.id, \
                 last_message_at = v.at, updated_at = ? \
                 FROM (SELECT json_extract(value, '$[0]') AS cid, \
                 json_extract(value, '$[1]') AS seq, json_extract(value, '$[2]') AS id, \
                 json_extract(value, '$[3]') AS at FROM json_each(?)) AS v \
                 WHERE conversations.id = v.cid AND conversations.last_seq < v.seq",
            )
            .bind::<BigInt, _>(now)
            .bind::<Text, _>(json_param(&chunk)?)
            .execute(c)?;
        }
        Ok(())
    }

    /// Moves read pointers forward, creating missing ones: one upsert per 500 pointers. A
    /// pointer already at or past its new seq stays. `pointers` may name one pointer twice;
    /// the higher seq wins.
    fn mark_read(
        c: &mut SqliteConnection,
        pointers: &[(i64, &str, i64)],
        now: i64,
    ) -> Result<(), TxError> {
        for chunk in pointers.chunks(INSERT_CHUNK) {
            // `WHERE true` tells SQLite's parser the SELECT ends before ON CONFLICT.
            diesel::sql_query(
                "INSERT INTO user_read_pointers \
                 (user_id, conversation_id, last_read_seq_id, updated_at) \
                 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), \
                 json_extract(value, '$[2]'), ? FROM json_each(?) WHERE true \
                 ON CONFLICT (user_id, conversation_id) DO UPDATE \
                 SET last_read_seq_id = excluded.last_read_seq_id, updated_at = excluded.updated_at \
                 WHERE excluded.last_read_seq_id > user_read_pointers.last_read_seq_id",
            )
            .bind::<BigInt, _>(now)
            .bind::<Text, _>(json_param(&chunk)?)
            .execute(c)?;
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use diesel_migrations::MigrationHarness;

        use super::*;

        fn conn() -> SqliteConnection {
            let mut c = SqliteConnection::establish(":memory:").expect("in-memory sqlite");
            c.run_pending_migrations(super::super::MIGRATIONS)
                .expect("migrations");
            c
        }

        fn row(id: i64, conv: &str, seq: i64, at: i64) -> Message {
            Message {
                id,
                conversation_id: conv.to_owned(),
                sender_id: 1,
                message_type: 1,
                content: String::new(),
                seq_id: seq,
                client_msg_id: None,
                created_at: at,
            }
        }

        fn conversation(c: &mut SqliteConnection, id: &str) -> (i64, Option<i64>, i64, i64) {
            conversations::table
                .find(id)
                .select((
                    conversations::last_seq,
                    conversations::last_message_id,
                    conversations::last_message_at,
                    conversations::updated_at,
                ))
                .first(c)
                .expect("conversation row")
        }

        fn pointer(c: &mut SqliteConnection, user: i64, conv: &str) -> Option<(i64, i64)> {
            use crate::schema::user_read_pointers as p;
            p::table
                .filter(p::user_id.eq(user))
                .filter(p::conversation_id.eq(conv))
                .select((p::last_read_seq_id, p::updated_at))
                .first(c)
                .optional()
                .expect("pointer query")
        }

        /// Conversation rows move to their newest row and never back; rows of conversations
        /// that do not exist change nothing.
        #[test]
        fn conversations_advance_only_forward() {
            let mut c = conn();
            let new = |id: &str| NewConversation {
                id: id.to_owned(),
                kind: 1,
                group_id: None,
                last_message_at: 0,
                created_at: 0,
                updated_at: 0,
            };
            create_conversations(&mut c, &[new("s_1_2"), new("s_1_3")]).expect("create");
            let rows = [
                row(10, "s_1_2", 1, 100),
                row(11, "s_1_2", 2, 101),
                row(12, "s_1_3", 5, 102),
                row(13, "s_9_9", 1, 103),
            ];
            advance_conversations(&mut c, &rows, 7).expect("advance");
            assert_eq!(conversation(&mut c, "s_1_2"), (2, Some(11), 101, 7));
            assert_eq!(conversation(&mut c, "s_1_3"), (5, Some(12), 102, 7));
            advance_conversations(
                &mut c,
                &[row(20, "s_1_3", 4, 200), row(21, "s_1_2", 3, 201)],
                8,
            )
            .expect("advance again");
            assert_eq!(
                conversation(&mut c, "s_1_3"),
                (5, Some(12), 102, 7),
                "stays"
            );
            assert_eq!(
                conversation(&mut c, "s_1_2"),
                (3, Some(21), 201, 8),
                "moves"
            );
        }

        /// Pointers are created, moved forward, never moved back, and of one pointer named
        /// twice in a statement the higher seq wins in either order.
        #[test]
        fn read_pointers_move_only_forward() {
            let mut c = conn();
            mark_read(&mut c, &[(1, "s_1_2", 3), (2, "g_9", 5), (2, "g_9", 4)], 10)
                .expect("create");
            assert_eq!(pointer(&mut c, 1, "s_1_2"), Some((3, 10)));
            assert_eq!(pointer(&mut c, 2, "g_9"), Some((5, 10)));
            mark_read(&mut c, &[(1, "s_1_2", 2), (2, "g_9", 4), (2, "g_9", 6)], 11).expect("move");
            assert_eq!(pointer(&mut c, 1, "s_1_2"), Some((3, 10)), "not back");
            assert_eq!(pointer(&mut c, 2, "g_9"), Some((6, 11)));
            assert_eq!(pointer(&mut c, 1, "g_9"), None);
            let many: Vec<(i64, &str, i64)> = (0..1200).map(|u| (u, "w", u + 1)).collect();
            mark_read(&mut c, &many, 12).expect("more than one chunk");
            assert_eq!(pointer(&mut c, 1199, "w"), Some((1200, 12)));
            assert_eq!(pointer(&mut c, 0, "w"), Some((1, 12)));
        }
    }
}

use sync_save::{mergeable, save_fresh, save_merged, save_sync};

impl Inner {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Commits what is queued, again and again, until the queue is empty: while one transaction
/// runs, the batches arriving meanwhile gather for the next.
///
/// The commits run back to back inside one call on the blocking pool ([`commit_run`]), for up
/// to [`COMMIT_RUN`] at a time. A call per commit made every commit wait, after its blocking
/// call, for this task to be polled again on its runtime, where the conversation actors that
/// started it keep the thread busy: a saturated writer's thread was running only about 60 % of
/// the time while batches waited (docs/benchmarks.md, thirteenth session).
async fn commit_loop(inner: Arc<Inner>) {
    /// Lets the next batch start a new loop if this one ends early (its runtime shut down).
    struct Reset<'a>(&'a Inner, bool);
    impl Drop for Reset<'_> {
        fn drop(&mut self) {
            if self.1 {
                self.0.queue().committing = false;
            }
        }
    }
    let mut reset = Reset(&inner, true);
    let mut gate = FreshGate::default();
    loop {
        let mut conn = inner.writer.lock().await;
        {
            let mut q = inner.queue();
            if q.batches.is_empty() {
                q.committing = false;
                reset.1 = false;
                return;
            }
        }
        // Outcomes are sent from the blocking call itself, after each commit.
        let run = Arc::clone(&inner);
        match conn
            .spawn_blocking(move |c| Ok(commit_run(c, &run, gate)))
            .await
        {
            Ok(next) => gate = next,
            Err(e) => tracing::error!(cause = %e, "the sqlite writer failed"),
        }
    }
}

/// How long [`commit_run`] goes on committing while batches keep coming: other writes (a new
/// user, a conversation, a read pointer) wait for the writer at most about this long.
const COMMIT_RUN: std::time::Duration = std::time::Duration::from_millis(25);

/// Group commits, one after the other, of whatever is queued when the last one ended, until
/// the queue is empty or [`COMMIT_RUN`] has passed. Returns the gate for the next run.
fn commit_run(c: &mut SqliteConnection, inner: &Inner, mut gate: FreshGate) -> FreshGate {
    // Spelled out: diesel-async's `RunQueryDsl::load` would shadow the atomic's `load`.
    let nice = std::sync::atomic::AtomicI32::load(
        &inner.writer_nice,
        std::sync::atomic::Ordering::Relaxed,
    );
    let _priority = WriterPriority::set(nice);
    let run = std::time::Instant::now();
    loop {
        let (queued, since) = {
            let mut q = inner.queue();
            (std::mem::take(&mut q.batches), q.since.take())
        };
        if queued.is_empty() {
            return gate;
        }
        if let Some(since) = since {
            histogram!(t::STORE_SECONDS, "op" => "sqlite_commit_wait")
                .record(since.elapsed().as_secs_f64());
        }
        histogram!(t::BATCH_SIZE, "kind" => "sqlite_commit").record(queued.len() as f64);
        let started = std::time::Instant::now();
        let (how, collided) = commit_group(c, queued, gate.allows());
        histogram!(t::STORE_SECONDS, "op" => "sqlite_group_commit")
            .record(started.elapsed().as_secs_f64());
        gate.record(collided);
        counter!(t::STORE_GROUP_COMMITS, "how" => how.label()).increment(1);
        if run.elapsed() >= COMMIT_RUN {
            return gate;
        }
    }
}

/// The calling thread's nice value, changed for as long as this lives (a commit run on one of
/// tokio's blocking threads, which go on to run other work after it) and then put back.
#[must_use]
struct WriterPriority {
    /// The thread and the nice value to put back.
    #[cfg(target_os = "linux")]
    restore: Option<(rustix::process::Pid, i32)>,
}

impl WriterPriority {
    /// Sets this thread's nice value to `nice` unless it is 0 or the thread is not allowed to.
    #[cfg(target_os = "linux")]
    fn set(nice: i32) -> Self {
        use rustix::process::{getpriority_process, setpriority_process};
        static REFUSED: std::sync::Once = std::sync::Once::new();
        if nice == 0 {
            return Self { restore: None };
        }
        let tid = rustix::thread::gettid();
        let restore = match getpriority_process(Some(tid)) {
            Ok(before) if before == nice => None,
            Ok(before) => match setpriority_process(Some(tid), nice) {
                Ok(()) => Some((tid, before)),
                Err(cause) => {
                    REFUSED.call_once(|| {
                        tracing::warn!(%cause, nice, "the sqlite writer runs at the process's priority: \
                            lowering a thread's nice needs CAP_SYS_NICE or RLIMIT_NICE \
                            (set database.writer_nice = 0 to not ask)");
                    });
                    None
                }
            },
            Err(_) => None,
        };
        Self { restore }
    }

    #[cfg(not(target_os = "linux"))]
    fn set(_nice: i32) -> Self {
        Self {}
    }
}

impl Drop for WriterPriority {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some((tid, before)) = self.restore {
            // Raising a nice value back is always allowed.
            let _ = rustix::process::setpriority_process(Some(tid), before);
        }
    }
}

/// Whether a group commit tries the path without lookups first. After a try collided, the
/// next [`FreshGate::CAREFUL_GROUPS`] groups go the careful way at once: while clients resend
/// (a reconnect storm), nearly every group may hold a message stored before, and each failed
/// try costs a group's inserts twice.
#[derive(Debug, Default, Clone, Copy)]
struct FreshGate {
    /// Groups still to go the careful way.
    careful: u32,
}

impl FreshGate {
    const CAREFUL_GROUPS: u32 = 8;

    fn allows(&self) -> bool {
        self.careful == 0
    }

    /// The outcome of the last group: whether its try without lookups collided.
    fn record(&mut self, collided: bool) {
        self.careful = if collided {
            Self::CAREFUL_GROUPS
        } else {
            self.careful.saturating_sub(1)
        };
    }
}

/// How a group commit stored its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// All batches with one set of statements, none of their messages stored before.
    Fresh,
    /// All batches with one set of statements, after looking up what was stored.
    Merged,
    /// Batch by batch, each in a savepoint (one batch, or batches that collided).
    OneByOne,
    /// The transaction failed; every batch was told why.
    Failed,
}

impl Stored {
    fn label(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Merged => "merged",
            Self::OneByOne => "one_by_one",
            Self::Failed => "failed",
        }
    }
}

/// Stores `queued` batches and sends each its outcome once the transaction committed (or the
/// reason it did not).
///
/// First as if none of their messages were stored yet, the usual case: one transaction, one
/// set of statements, no lookup and no savepoint (a savepoint copies every page it changes
/// into a sub-journal). If an insert collides (a message stored before, a key used before, a
/// seq taken) or anything fails, that transaction rolls back and the group goes the careful
/// way in a new one: all batches as one after looking up what is stored, in a savepoint; if
/// they collide or fail, batch by batch, each in a savepoint of its own, so one batch's failure
/// is that batch's alone. This connection is the only writer, so nothing changes in between.
///
/// `fresh`: whether to try the first way at all. Returns how the group was stored and whether
/// that try collided.
fn commit_group(c: &mut SqliteConnection, queued: Vec<Queued>, fresh: bool) -> (Stored, bool) {
    let (batches, senders): (Vec<Arc<Prepared>>, Vec<_>) = queued.into_iter().unzip();
    let mut collided = false;
    if fresh && mergeable(&batches) {
        match c.transaction::<_, TxError, _>(|c| save_fresh(c, &batches)) {
            Ok(answers) => {
                for (tx, answer) in senders.into_iter().zip(answers) {
                    let _ = tx.send(Ok(answer));
                }
                return (Stored::Fresh, false);
            }
            Err(e) => {
                collided = true;
                tracing::debug!(cause = ?e, "group commit collided; looking up what is stored");
            }
        }
    }
    let mut how = Stored::OneByOne;
    let outcome = c.transaction::<_, TxError, _>(|c| {
        if batches.len() > 1 {
            match c.transaction::<_, TxError, _>(|c| save_merged(c, &batches)) {
                Ok(Some(merged)) => {
                    how = Stored::Merged;
                    return Ok(merged.into_iter().map(Ok).collect());
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(cause = ?e, "merged group commit failed; one by one"),
            }
        }
        Ok(batches
            .iter()
            .map(|p| c.transaction::<_, TxError, _>(|c| save_sync(c, p)))
            .collect::<Vec<_>>())
    });
    let how = match outcome {
        Ok(results) => {
            for (tx, result) in senders.into_iter().zip(results) {
                let _ = tx.send(result);
            }
            how
        }
        Err(e) => {
            let transient = super::sql::is_transient(&e);
            let why = StoreError::from(e).to_string();
            for tx in senders {
                let e = if transient {
                    TxError::Busy(why.clone())
                } else {
                    TxError::Store(StoreError::Database(why.clone()))
                };
                let _ = tx.send(Err(e));
            }
            Stored::Failed
        }
    };
    (how, collided)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Direction, Message};
    use crate::store::Store;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_commit_run_takes_the_writer_nice_and_gives_the_thread_its_own_back() {
        use rustix::process::getpriority_process;
        let tid = rustix::thread::gettid();
        let now = || getpriority_process(Some(tid)).expect("getpriority");
        let before = now();
        let higher = (before + 3).min(19);
        {
            // A higher nice value is always allowed.
            let _p = WriterPriority::set(higher);
            assert_eq!(now(), higher);
        }
        assert_eq!(now(), before);
        {
            let _p = WriterPriority::set(0);
            assert_eq!(now(), before, "0 leaves the thread alone");
        }
        {
            // Allowed as root, refused (with one warning) otherwise: either way no error.
            let _p = WriterPriority::set(-5);
            assert!(now() == -5 || now() == before);
        }
        assert_eq!(now(), before);
    }

    fn msg(id: i64, conv: &str, seq: i64, key: Option<&str>) -> Message {
        Message {
            id,
            conversation_id: conv.to_owned(),
            sender_id: 1,
            message_type: 1,
            content: format!("message {id}"),
            seq_id: seq,
            client_msg_id: key.map(str::to_owned),
            created_at: 0,
        }
    }

    async fn seqs(store: &SqliteStore, conv: &str) -> Vec<i64> {
        let (rows, _) = store
            .get_messages(conv, Direction::Forward { after_seq: 0 }, 100)
            .await
            .expect("history");
        rows.iter().map(|m| m.seq_id).collect()
    }

    /// A store in a fresh temp dir (kept alive by the returned guard) holding `first`.
    async fn store_with(first: Message) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gochat.db");
        let store = SqliteStore::open(path.to_str().expect("utf-8 path"), 2)
            .await
            .expect("open");
        store.save_messages(&[first]).await.expect("first message");
        (dir, store)
    }

    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }

    #[derive(diesel::QueryableByName)]
    struct Checkpoint {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        wal_autocheckpoint: i64,
    }

    #[derive(diesel::QueryableByName)]
    struct Limit {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        journal_size_limit: i64,
    }

    #[derive(diesel::QueryableByName)]
    struct Timeout {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        timeout: i64,
    }

    /// The thread a reader's query ran on, and that reader's busy timeout.
    async fn where_and_how_long<S>(
        conn: &mut SyncConnectionWrapper<SqliteConnection, S>,
    ) -> (std::thread::ThreadId, i64)
    where
        S: SpawnBlocking + Send + 'static,
    {
        conn.spawn_blocking(|c| {
            use diesel::RunQueryDsl;
            let t: Timeout = RunQueryDsl::get_result(diesel::sql_query("PRAGMA busy_timeout"), c)?;
            Ok((std::thread::current().id(), t.timeout))
        })
        .await
        .expect("pragma")
    }

    #[derive(diesel::QueryableByName)]
    struct PlanStep {
        #[diesel(sql_type = diesel::sql_types::Text)]
        detail: String,
    }

    /// A page of a group's members (the task service reads every page of a large group for
    /// each of its messages) comes from an index in join order, with no sort of the whole
    /// group first; a page by token seeks straight to its first member.
    #[tokio::test]
    async fn member_pages_are_read_in_index_order_without_a_sort() {
        let (_dir, store) = store_with(msg(1, "s_1_2", 1, Some("k1"))).await;
        let mut conn = store.reader().await.expect("reader");
        // The page queries as `group_members` and `member_ids_page` in store/sql.rs build them.
        let cases = [
            (
                "SELECT id, group_id, user_id, role, joined_at FROM group_members \
                 WHERE group_id = 7 ORDER BY id ASC LIMIT 200 OFFSET 400",
                "SEARCH group_members USING INDEX idx_group_members_group (group_id=?)",
            ),
            (
                "SELECT id, user_id FROM group_members \
                 WHERE group_id = 7 AND id > 400 ORDER BY id ASC LIMIT 201",
                "SEARCH group_members USING INDEX idx_group_members_group (group_id=? AND rowid>?)",
            ),
        ];
        for (query, want) in cases {
            let plan: Vec<PlanStep> = conn
                .spawn_blocking(move |c| {
                    diesel::RunQueryDsl::load(
                        diesel::sql_query(format!("EXPLAIN QUERY PLAN {query}")),
                        c,
                    )
                })
                .await
                .expect("query plan");
            let steps: Vec<&str> = plan.iter().map(|s| s.detail.as_str()).collect();
            assert_eq!(steps, [want], "{query}");
        }
    }

    /// Point reads run on the calling thread with a short lock wait, see what was committed
    /// before them, and other reads keep tokio's blocking pool.
    #[tokio::test]
    async fn quick_reads_run_on_the_callers_thread_and_wait_briefly_for_locks() {
        let (_dir, store) = store_with(msg(1, "s_1_2", 1, Some("k1"))).await;
        let here = std::thread::current().id();

        let mut quick = store.quick_reader().await.expect("quick reader");
        assert_eq!(where_and_how_long(&mut quick).await, (here, 250));
        drop(quick);
        let mut pooled = store.reader().await.expect("reader");
        let (there, timeout) = where_and_how_long(&mut pooled).await;
        assert_ne!(there, here, "a blocking-pool thread");
        assert_eq!(timeout, 5000);
        drop(pooled);

        // A quick read after a commit sees it (no read transaction outlives a query).
        assert_eq!(store.seq_floor("s_1_2").await.expect("floor"), 1);
        store
            .save_messages(&[msg(2, "s_1_2", 2, Some("k2"))])
            .await
            .expect("second message");
        assert_eq!(store.seq_floor("s_1_2").await.expect("floor"), 2);
        let found = store
            .find_by_client_msg_id(1, "k2")
            .await
            .expect("lookup")
            .expect("the second message");
        assert_eq!(found.id, 2);
    }

    /// The messages table keeps the indexes its reads and its dedup need, and not the spec's
    /// `idx_conv_time`, which nothing reads; the writer checkpoints every 10 000 pages.
    #[tokio::test]
    async fn messages_have_only_the_indexes_that_are_read_and_the_writer_checkpoints_late() {
        let (_dir, store) = store_with(msg(1, "s_1_2", 1, Some("k1"))).await;
        let mut conn = store.inner.writer.lock().await;
        let (indexes, checkpoint, limit) = conn
            .spawn_blocking(|c| {
                use diesel::RunQueryDsl;
                let indexes: Vec<Name> = RunQueryDsl::load(
                    diesel::sql_query(
                        "SELECT name FROM sqlite_master WHERE type = 'index' \
                         AND tbl_name = 'messages' AND sql IS NOT NULL ORDER BY name",
                    ),
                    c,
                )?;
                let checkpoint: Checkpoint =
                    RunQueryDsl::get_result(diesel::sql_query("PRAGMA wal_autocheckpoint"), c)?;
                let limit: Limit =
                    RunQueryDsl::get_result(diesel::sql_query("PRAGMA journal_size_limit"), c)?;
                Ok((
                    indexes.into_iter().map(|i| i.name).collect::<Vec<_>>(),
                    checkpoint.wal_autocheckpoint,
                    limit.journal_size_limit,
                ))
            })
            .await
            .expect("schema query");
        assert_eq!(indexes, ["idx_conv_seq", "uk_sender_client_msg"]);
        assert_eq!(checkpoint, 10_000);
        assert_eq!(limit, 64 << 20);
    }

    /// Runs `batches` as one group commit and returns each batch's answer.
    async fn group_commit(
        store: &SqliteStore,
        batches: &[Vec<Message>],
        mark_read: bool,
    ) -> (Stored, Vec<Result<Vec<SaveOutcome>, TxError>>) {
        let (how, _, results) = group_commit_with(store, batches, mark_read, true).await;
        (how, results)
    }

    /// [`group_commit`], saying whether to try the path without lookups, and answering
    /// whether that try collided.
    async fn group_commit_with(
        store: &SqliteStore,
        batches: &[Vec<Message>],
        mark_read: bool,
        fresh: bool,
    ) -> (Stored, bool, Vec<Result<Vec<SaveOutcome>, TxError>>) {
        let (queued, answers) = queue_of(batches, mark_read);
        let mut conn = store.inner.writer.lock().await;
        let (how, collided) = conn
            .spawn_blocking(move |c| Ok(commit_group(c, queued, fresh)))
            .await
            .expect("the group commit ran");
        drop(conn);
        (how, collided, answered(answers).await)
    }

    type Answer = oneshot::Receiver<Result<Vec<SaveOutcome>, TxError>>;

    /// `batches` as the writer's queue holds them, with where each one's answer arrives.
    fn queue_of(batches: &[Vec<Message>], mark_read: bool) -> (Vec<Queued>, Vec<Answer>) {
        batches
            .iter()
            .map(|b| {
                let (tx, rx) = oneshot::channel();
                let mut p = Prepared::new(b, 1_700_000_000_000).expect("valid");
                p.mark_read = mark_read;
                ((Arc::new(p), tx), rx)
            })
            .unzip()
    }

    /// Every batch's answer, in order.
    async fn answered(answers: Vec<Answer>) -> Vec<Result<Vec<SaveOutcome>, TxError>> {
        let mut results = Vec::with_capacity(answers.len());
        for rx in answers {
            results.push(rx.await.expect("an answer for every batch"));
        }
        results
    }

    /// Each batch's answers as (duplicate, id, seq), every batch stored.
    fn duplicate_id_seq(
        results: Vec<Result<Vec<SaveOutcome>, TxError>>,
    ) -> Vec<Vec<(bool, i64, i64)>> {
        results
            .into_iter()
            .map(|r| {
                r.expect("stored")
                    .iter()
                    .map(|o| (o.duplicate, o.message.id, o.message.seq_id))
                    .collect()
            })
            .collect()
    }

    /// Batches of different conversations are stored together (the merged path) with the
    /// answers, conversation rows and read pointers each would get alone; batches that collide
    /// (one key in two of them) fall back to one by one, where the later one is a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merged_group_commits_answer_like_single_batches() {
        let (_dir, store) = store_with(msg(1, "s_1_2", 1, Some("k1"))).await;
        let mut retry = msg(12, "s_1_3", 1, Some("k1"));
        retry.sender_id = 1;
        let (how, results) = group_commit(
            &store,
            &[
                vec![msg(10, "s_1_2", 2, Some("k2")), msg(11, "s_1_2", 3, None)],
                vec![retry, msg(13, "s_1_3", 2, Some("k3"))],
                vec![msg(14, "g_9", 1, None)],
            ],
            true,
        )
        .await;
        assert_eq!(how, Stored::Merged);
        let answers = duplicate_id_seq(results);
        assert_eq!(
            answers,
            vec![
                vec![(false, 10, 2), (false, 11, 3)],
                vec![(true, 1, 1), (false, 13, 1)],
                vec![(false, 14, 1)],
            ]
        );
        assert_eq!(seqs(&store, "s_1_2").await, vec![1, 2, 3]);
        assert_eq!(seqs(&store, "s_1_3").await, vec![1]);
        let conv = store
            .get_conversation("s_1_3")
            .await
            .expect("get")
            .expect("created by the merged commit");
        assert_eq!((conv.last_seq, conv.last_message_id), (1, Some(13)));
        assert_eq!(store.read_pointer(1, "s_1_2").await.expect("pointer"), 3);
        assert_eq!(store.read_pointer(1, "g_9").await.expect("pointer"), 1);

        // Existing rows move forward: the conversation rows and the read pointers.
        let mut other = msg(41, "g_9", 2, None);
        other.sender_id = 2;
        let (how, _) = group_commit(
            &store,
            &[vec![msg(40, "s_1_2", 4, None)], vec![other]],
            true,
        )
        .await;
        assert_eq!(how, Stored::Fresh, "nothing of it was stored before");
        let conv = store
            .get_conversation("s_1_2")
            .await
            .expect("get")
            .expect("row");
        assert_eq!((conv.last_seq, conv.last_message_id), (4, Some(40)));
        assert_eq!(store.read_pointer(1, "s_1_2").await.expect("pointer"), 4);
        assert_eq!(store.read_pointer(1, "g_9").await.expect("pointer"), 1);
        assert_eq!(store.read_pointer(2, "g_9").await.expect("pointer"), 2);

        // One key in two batches: one by one, the second is a duplicate of the first.
        let (how, results) = group_commit(
            &store,
            &[
                vec![msg(20, "s_1_4", 1, Some("same"))],
                vec![msg(21, "s_1_5", 1, Some("same"))],
            ],
            false,
        )
        .await;
        assert_eq!(how, Stored::OneByOne, "the merged insert collided");
        let first = results[0].as_ref().expect("stored");
        let second = results[1].as_ref().expect("answered");
        assert!(!first[0].duplicate);
        assert!(second[0].duplicate && second[0].message.id == 20);
        assert_eq!(seqs(&store, "s_1_5").await, Vec::<i64>::new());
    }

    /// A group none of whose messages is stored yet takes the path without lookups: every
    /// batch answered as alone (a key repeated inside a batch is a duplicate of its first
    /// message, which keeps the lowest seq), conversation rows created and moved, read pointers
    /// moved. A group that collides after that path inserted some of its rows (a first chunk
    /// of 500) rolls all of them back: the careful path then stores each row once and answers
    /// none of them as a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fresh_group_commits_store_without_lookups_and_roll_back_whole_on_a_collision() {
        let (_dir, store) = store_with(msg(1, "s_1_2", 1, Some("k1"))).await;
        let (how, results) = group_commit(
            &store,
            &[
                vec![
                    msg(10, "s_1_2", 2, Some("k2")),
                    msg(11, "s_1_2", 3, Some("k2")),
                ],
                vec![msg(20, "g_7", 1, None), msg(21, "g_7", 2, Some("k3"))],
            ],
            true,
        )
        .await;
        assert_eq!(how, Stored::Fresh);
        let answers = duplicate_id_seq(results);
        assert_eq!(
            answers,
            vec![
                vec![(false, 10, 2), (true, 10, 2)],
                vec![(false, 20, 1), (false, 21, 2)],
            ]
        );
        assert_eq!(seqs(&store, "s_1_2").await, vec![1, 2]);
        assert_eq!(seqs(&store, "g_7").await, vec![1, 2]);
        let conv = store
            .get_conversation("g_7")
            .await
            .expect("get")
            .expect("created by the group commit");
        assert_eq!((conv.last_seq, conv.last_message_id), (2, Some(21)));
        assert_eq!(store.read_pointer(1, "s_1_2").await.expect("pointer"), 2);
        assert_eq!(store.read_pointer(1, "g_7").await.expect("pointer"), 2);

        // 600 new messages, then a retry of k1: the retry's insert (in the second chunk) fails
        // after the first chunk went in.
        let many: Vec<Message> = (1..=600).map(|i| msg(1000 + i, "s_1_3", i, None)).collect();
        let (how, results) = group_commit(
            &store,
            &[many, vec![msg(30, "s_1_4", 1, Some("k1"))]],
            false,
        )
        .await;
        assert_eq!(how, Stored::Merged, "the fresh attempt collided");
        let first = results[0].as_ref().expect("stored");
        assert_eq!(first.len(), 600);
        assert!(
            first.iter().all(|o| !o.duplicate),
            "rolled back, then stored once"
        );
        let retry = results[1].as_ref().expect("answered");
        assert!(retry[0].duplicate && retry[0].message.id == 1);
        let (rows, _) = store
            .get_messages("s_1_3", Direction::Forward { after_seq: 0 }, 1000)
            .await
            .expect("history");
        assert_eq!(rows.len(), 600);
        assert_eq!(seqs(&store, "s_1_4").await, Vec::<i64>::new());
    }

    /// A group whose try without lookups collides says so; a group told not to try goes the
    /// careful way even when nothing of it was stored; after a collision the gate keeps the
    /// next groups careful, and a group that did not collide counts one of them down.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_collision_keeps_the_next_groups_careful() {
        let (_dir, store) = store_with(msg(1, "s_1_2", 1, Some("k1"))).await;
        let (how, collided, _) = group_commit_with(
            &store,
            &[
                vec![msg(2, "s_1_3", 1, Some("k1"))],
                vec![msg(3, "s_1_4", 1, None)],
            ],
            false,
            true,
        )
        .await;
        assert_eq!((how, collided), (Stored::Merged, true));
        let (how, collided, results) = group_commit_with(
            &store,
            &[
                vec![msg(4, "s_1_5", 1, None)],
                vec![msg(5, "s_1_6", 1, None)],
            ],
            false,
            false,
        )
        .await;
        assert_eq!((how, collided), (Stored::Merged, false), "not tried");
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(seqs(&store, "s_1_6").await, vec![1]);

        let mut gate = FreshGate::default();
        assert!(gate.allows());
        gate.record(true);
        for _ in 0..FreshGate::CAREFUL_GROUPS {
            assert!(!gate.allows());
            gate.record(false);
        }
        assert!(gate.allows(), "careful for a bounded number of groups");
        gate.record(false);
        assert!(gate.allows());
    }

    /// A commit run stores whatever is queued, answers every batch and leaves the queue empty;
    /// the gate it hands back remembers a collision of its last group for the next run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_run_empties_the_queue_and_hands_the_gate_on() {
        let (_dir, store) = store_with(msg(1, "s_1_2", 1, Some("k1"))).await;
        // The writer first: the loop that stored the first message may not have ended yet,
        // and it must not take these batches.
        let mut conn = store.inner.writer.lock().await;
        let (queued, answers) = queue_of(
            &[
                vec![msg(2, "s_1_3", 1, None)],
                vec![msg(3, "s_1_4", 1, Some("k1"))],
            ],
            false,
        );
        store.inner.queue().batches.extend(queued);
        let inner = Arc::clone(&store.inner);
        let gate = conn
            .spawn_blocking(move |c| Ok(commit_run(c, &inner, FreshGate::default())))
            .await
            .expect("the run ran");
        drop(conn);
        assert!(store.inner.queue().batches.is_empty());
        assert!(
            !gate.allows(),
            "its group collided: the next runs start careful"
        );
        assert_eq!(
            duplicate_id_seq(answered(answers).await),
            vec![vec![(false, 2, 1)], vec![(true, 1, 1)]]
        );
    }

    /// Three batches in one group commit: the one with a seq conflict rolls back alone (its
    /// savepoint), the others commit, and a duplicate inside a batch leaves no hole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_batch_of_a_group_commit_rolls_back_alone() {
        let (_dir, store) = store_with(msg(1, "s_1_2", 1, Some("a"))).await;

        let batches = [
            vec![msg(10, "s_1_2", 2, Some("b")), msg(11, "s_1_2", 3, None)],
            vec![msg(20, "s_1_3", 1, None), msg(21, "s_1_2", 1, None)],
            vec![msg(30, "s_1_4", 1, Some("a")), msg(31, "s_1_4", 2, None)],
        ];
        let (how, results) = group_commit(&store, &batches, false).await;
        assert_eq!(how, Stored::OneByOne, "the merged attempt met the conflict");
        let first = results[0].as_ref().expect("the first batch commits");
        assert!(first.iter().all(|o| !o.duplicate));
        assert!(
            matches!(
                &results[1],
                Err(TxError::Store(StoreError::SeqConflict { .. }))
            ),
            "the conflicting batch fails: {:?}",
            results[1].as_ref().err()
        );
        let third = results[2].as_ref().expect("the third batch commits");
        assert!(third[0].duplicate && third[0].message.id == 1);
        assert!(!third[1].duplicate);
        assert_eq!(
            (third[1].message.id, third[1].message.seq_id),
            (31, 1),
            "the new message takes the lowest seq"
        );

        assert_eq!(seqs(&store, "s_1_2").await, vec![1, 2, 3]);
        assert_eq!(seqs(&store, "s_1_4").await, vec![1]);
        assert_eq!(store.get_message(20).await.expect("get"), None);
        assert_eq!(
            store.get_conversation("s_1_3").await.expect("get"),
            None,
            "the failed batch's conversation row was rolled back with it"
        );
    }
}
