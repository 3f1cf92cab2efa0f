//! The embedded store: SQLite in WAL mode. One writer thread applies every write
//! with group commit (all jobs waiting when a transaction starts share its fsync);
//! reads run concurrently on the blocking pool with their own connections.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    CursorKey, Loaded, MessageRecord, Millis, Notification, Role, SessionEvent, SessionPage,
    SessionQuery, SessionRecord, SortBy, Store, StoreError, StoreFuture, WindowMetrics, WriteOp,
    WriteOutcome,
};
use crate::crypto::{Sealed, NONCE_BYTES};
use crate::pool::BlockingPool;

/// How often the checkpointer moves the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// WAL frames (pages) after which the writer completes a checkpoint: 16 MiB.
const WAL_FRAMES_RESTART: i64 = 4096;
/// Bytes the WAL file is trimmed to when it starts over.
const WAL_BYTES_KEPT: i64 = 32 * 1024 * 1024;

/// Jobs one transaction takes at most; bounds the latency a large batch adds.
const GROUP_COMMIT_JOBS_MAX: usize = 256;

/// Bytes of the database file each connection maps for reading.
const MMAP_BYTES_MAX: i64 = 256 * 1024 * 1024;
/// Page cache per connection, in KiB (SQLite's negative `cache_size` unit).
const PAGE_CACHE_KIB_MAX: u32 = 32 * 1024;

/// Schema migrations, applied in order; `PRAGMA user_version` records the last one.
const MIGRATIONS: &[&str] = &[
    // 1: sessions and encrypted messages.
    "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        last_activity INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'ai',
        message_count INTEGER NOT NULL DEFAULT 0,
        tokens_in INTEGER NOT NULL DEFAULT 0,
        tokens_out INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_user_start ON sessions(user_id, created_at);
    CREATE INDEX sessions_last_activity ON sessions(last_activity);
    CREATE TABLE messages (
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        message_id TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        author TEXT NOT NULL,
        user_id TEXT NOT NULL,
        client_id TEXT,
        key_id INTEGER NOT NULL,
        nonce BLOB NOT NULL,
        ciphertext BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        tokens_in INTEGER NOT NULL DEFAULT 0,
        tokens_out INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
        CREATE UNIQUE INDEX messages_client_id ON messages(user_id, client_id) WHERE client_id IS NOT NULL;",
    // 2: session states over time: an audit trail, and when a session ended.
    "CREATE TABLE session_events (
        session_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        state TEXT NOT NULL
    );
    CREATE INDEX session_events_session ON session_events(session_id, at);
    CREATE INDEX session_events_action ON session_events(action, at);
        ALTER TABLE sessions ADD COLUMN ended_at INTEGER;
    CREATE INDEX sessions_state ON sessions(state);",
    // 3: the notification outbox (survives restarts; dead letters are kept).
    "CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        delivered_at INTEGER,
        last_error TEXT
    );
    CREATE INDEX outbox_due ON outbox(state, next_at);",
];

struct Job {
    ops: Vec<WriteOp>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<WriteOutcome>, StoreError>>,
}

pub struct SqliteStore {
    jobs: SyncSender<Job>,
    /// Dropping it stops the checkpointer (after a last checkpoint).
    _checkpointer: std::sync::mpsc::Sender<()>,
    queue_max: usize,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    pool: BlockingPool,
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(db_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(db_err)?;
    // FULL: a commit is on disk before its ack leaves, even across power loss.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(db_err)?;
    // Reads through a memory map instead of a read() copy per page, and a page
    // cache large enough that index pages stay in it (both bounded; SQLite's
    // defaults are no map and 2 MiB).
    conn.pragma_update(None, "mmap_size", MMAP_BYTES_MAX)
        .map_err(db_err)?;
    conn.pragma_update(None, "cache_size", -(PAGE_CACHE_KIB_MAX as i64))
        .map_err(db_err)?;
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(db_err)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db_err)?;
    if found > known {
        return Err(StoreError::NewerSchema { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction().map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        tracing::info!(version = i + 1, "storage schema migrated");
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/chatbox.db`, migrates it, and starts the writer.
    pub fn open(
        dir: &Path,
        pool: BlockingPool,
        readers: usize,
        queue_max: usize,
    ) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Database(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("chatbox.db");
        let mut writer = open(&path)?;
        migrate(&mut writer)?;
        // Checkpoints run on their own connection and thread (PASSIVE: they never
        // block the writer); inside a commit they were a fifth of the writer's time.
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db_err)?;
        writer
            .pragma_update(None, "journal_size_limit", WAL_BYTES_KEPT)
            .map_err(db_err)?;
        let checkpointer = open(&path)?;
        // Set by the checkpointer when the WAL is long; the writer then finishes
        // the checkpoint itself (see `checkpoint_loop`).
        let wal_big = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let wal_big_seen = wal_big.clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("chatbox-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, stopped, wal_big))
            .map_err(|e| {
                StoreError::Database(format!("cannot start the checkpoint thread: {e}"))
            })?;
        let readers = (0..readers.max(1))
            .map(|_| open(&path))
            .collect::<Result<Vec<_>, _>>()?;
        let (jobs, rx) = sync_channel(queue_max);
        std::thread::Builder::new()
            .name("chatbox-sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx, wal_big_seen))
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            jobs,
            _checkpointer: stop,
            queue_max,
            readers: Arc::new(Mutex::new(readers)),
            path,
            pool,
        })
    }

    /// Runs `f` with a read connection on the blocking pool.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<T> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        let call = self.pool.call(async move {
            tokio::task::spawn_blocking(move || {
                let taken = readers.lock().map(|mut r| r.pop()).unwrap_or(None);
                let conn = match taken {
                    Some(c) => c,
                    None => open(&path)?,
                };
                let out = f(&conn);
                if let Ok(mut r) = readers.lock() {
                    r.push(conn);
                }
                out
            })
            .await
            .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?
        });
        Box::pin(async move { call.await? })
    }
}

/// Checkpoints every [`CHECKPOINT_EVERY`] until the store is dropped, then once
/// more, so a clean shutdown leaves the WAL folded into the database.
fn checkpoint_loop(
    conn: Connection,
    stopped: std::sync::mpsc::Receiver<()>,
    wal_big: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        // Anything but a timeout means the store is gone (or going).
        let last = !matches!(
            stopped.recv_timeout(CHECKPOINT_EVERY),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        );
        // PASSIVE never waits, so under constant writes it never copies the last
        // frames and the WAL never starts over: it grew by 100 MB/s under the chat
        // load. When it is long, the writer finishes the job right after a commit
        // (when nothing newer exists), so its next commit starts the WAL over. A
        // RESTART here instead made writers wait in SQLite's busy handler (sleeps
        // of up to 100 ms: 1.2 s stalls in the takeover scenario).
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
            Ok(frames) if frames >= WAL_FRAMES_RESTART => {
                wal_big.store(true, std::sync::atomic::Ordering::Relaxed)
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
        if last {
            return;
        }
    }
}

/// Takes every job waiting, applies them in one transaction, commits once, then
/// replies. One job's failure does not fail the others (see `apply_batch`).
fn writer_loop(
    mut conn: Connection,
    rx: Receiver<Job>,
    wal_big: Arc<std::sync::atomic::AtomicBool>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_JOBS_MAX {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let results = apply_batch(&mut conn, &batch);
        match results {
            Ok(results) => {
                for (job, r) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = batch.len(), "storage commit failed");
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::Database(e.to_string())));
                }
            }
        }
        if wal_big.swap(false, std::sync::atomic::Ordering::Relaxed) {
            // Copies only what the checkpointer has not (it did the rest); busy
            // (the checkpointer is at it) just means the next signal retries.
            let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
    }
    tracing::debug!("sqlite writer stopped");
}

type JobResult = Result<Vec<WriteOutcome>, StoreError>;

fn apply_batch(conn: &mut Connection, batch: &[Job]) -> Result<Vec<JobResult>, rusqlite::Error> {
    // Fast path: every job straight into one transaction. Savepoints around each
    // job cost a copy of every page it touches (a sub-journal), and jobs almost
    // never fail; when one does, the batch is redone with a savepoint per job.
    match apply_jobs(conn, batch, false) {
        Ok(results) if results.iter().all(Result::is_ok) => return Ok(results),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "batch failed; retrying job by job"),
    }
    apply_jobs(conn, batch, true)
}

/// One transaction over `batch`. With `isolated`, each job runs in a savepoint and
/// a failing job is undone alone; without, the first failure rolls everything back
/// (the caller then retries isolated).
fn apply_jobs(
    conn: &mut Connection,
    batch: &[Job],
    isolated: bool,
) -> Result<Vec<JobResult>, rusqlite::Error> {
    // Every statement here, savepoints included, is prepared once and cached:
    // re-parsing SQL was a third of the writer's time under load.
    let run = |sql: &str| conn.prepare_cached(sql)?.execute([]).map(|_| ());
    run("BEGIN IMMEDIATE")?;
    let mut results = Vec::with_capacity(batch.len());
    let applied = (|| {
        for job in batch {
            if isolated {
                run("SAVEPOINT job")?;
            }
            let r = job
                .ops
                .iter()
                .map(|op| apply(conn, op))
                .collect::<Result<Vec<_>, _>>();
            match r {
                Ok(outcomes) => {
                    if isolated {
                        run("RELEASE job")?;
                    }
                    results.push(Ok(outcomes));
                }
                Err(e) if isolated => {
                    // Undo this job only; the others in the batch still commit.
                    run("ROLLBACK TO job")?;
                    run("RELEASE job")?;
                    results.push(Err(db_err(e)));
                }
                Err(e) => {
                    results.push(Err(db_err(e)));
                    return Ok(false);
                }
            }
        }
        run("COMMIT").map(|_| true)
    })();
    match applied {
        Ok(true) => Ok(results),
        Ok(false) => {
            conn.execute_batch("ROLLBACK")?;
            Ok(results)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Executes a cached statement (prepared once per connection).
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// One row of a cached query.
fn query_one<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

fn apply(conn: &Connection, op: &WriteOp) -> Result<WriteOutcome, rusqlite::Error> {
    match op {
        WriteOp::CreateSession(s) => {
            exec(conn,
                "INSERT INTO sessions (id, user_id, created_at, last_activity, state) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO NOTHING",
                params![s.id, s.user_id, s.created_at, s.last_activity, s.state],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::AppendMessage {
            user_id,
            message: m,
        } => {
            let inserted = exec(conn,
                "INSERT INTO messages (session_id, seq, message_id, role, author, user_id, client_id, key_id,
                     nonce, ciphertext, created_at, tokens_in, tokens_out, cancelled)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT(user_id, client_id) WHERE client_id IS NOT NULL DO NOTHING",
                params![
                    m.session_id,
                    m.seq as i64,
                    m.message_id,
                    m.role.as_str(),
                    m.author,
                    user_id,
                    m.client_id,
                    m.sealed.key_id,
                    &m.sealed.nonce[..],
                    m.sealed.ciphertext,
                    m.created_at,
                    m.tokens_in as i64,
                    m.tokens_out as i64,
                    m.cancelled,
                ],
            )?;
            if inserted == 0 {
                let (message_id, session_id) = query_one(conn, "SELECT message_id, session_id FROM messages WHERE user_id = ?1 AND client_id = ?2",
                    params![user_id, m.client_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                return Ok(WriteOutcome::Duplicate {
                    message_id,
                    session_id,
                });
            }
            exec(conn,
                "UPDATE sessions SET message_count = message_count + 1, tokens_in = tokens_in + ?2,
                     tokens_out = tokens_out + ?3, last_activity = max(last_activity, ?4) WHERE id = ?1",
                params![m.session_id, m.tokens_in as i64, m.tokens_out as i64, m.created_at],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::SetState {
            session_id,
            state,
            actor,
            action,
            at,
        } => {
            exec(
                conn,
                "UPDATE sessions SET state = ?2, last_activity = max(last_activity, ?3),
                     ended_at = CASE WHEN ?2 = 'ended' THEN ?3 ELSE ended_at END WHERE id = ?1",
                params![session_id, state, at],
            )?;
            exec(conn,
                                "INSERT INTO session_events (session_id, at, actor, action, state) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![session_id, at, actor, action, state],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::Enqueue { kind, payload, at } => {
            exec(
                conn,
                "INSERT INTO outbox (kind, payload, next_at, created_at) VALUES (?1, ?2, ?3, ?3)",
                params![kind, payload, at],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::Delivered { id, at } => {
            exec(conn,
                "UPDATE outbox SET state = 'delivered', delivered_at = ?2, attempts = attempts + 1 WHERE id = ?1",
                params![id, at],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::DeliveryFailed {
            id,
            error,
            next_at,
            dead,
        } => {
            exec(
                conn,
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_at = ?3,
                     state = CASE WHEN ?4 THEN 'dead' ELSE 'pending' END WHERE id = ?1",
                params![id, error, next_at, dead],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::DeleteUser { user_id } => {
            exec(conn,
                "DELETE FROM session_events WHERE session_id IN (SELECT id FROM sessions WHERE user_id = ?1)",
                params![user_id],
            )?;
            exec(
                conn,
                "DELETE FROM messages WHERE user_id = ?1",
                params![user_id],
            )?;
            exec(
                conn,
                "DELETE FROM sessions WHERE user_id = ?1",
                params![user_id],
            )?;
            Ok(WriteOutcome::Done)
        }
    }
}

/// The columns [`session_row`] reads, in its order.
const SESSION_COLUMNS: &str =
    "id, user_id, created_at, last_activity, state, message_count, tokens_in, tokens_out, ended_at";

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        created_at: r.get(2)?,
        last_activity: r.get(3)?,
        state: r.get(4)?,
        message_count: r.get::<_, i64>(5)? as u64,
        tokens_in: r.get::<_, i64>(6)? as u64,
        tokens_out: r.get::<_, i64>(7)? as u64,
        ended_at: r.get(8)?,
    })
}

/// The SQL expression each sort key orders by. Written out per key: no name from a
/// request ever reaches the SQL text.
fn sort_expr(by: SortBy) -> &'static str {
    match by {
        SortBy::StartTime => "created_at",
        SortBy::EndTime => "COALESCE(ended_at, 0)",
        SortBy::MessageCount => "message_count",
        SortBy::TotalTokens => "(tokens_in + tokens_out)",
        SortBy::UserId => "user_id",
    }
}

/// `WHERE` clause and parameters for the admin filters (values are bound, never
/// spliced into the SQL).
fn session_filter(
    user_id: &Option<String>,
    state: &Option<String>,
    from: Option<Millis>,
    to: Option<Millis>,
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let mut clauses = vec!["1 = 1".to_string()];
    let mut args = Vec::new();
    if let Some(u) = user_id {
        clauses.push("user_id = ?".into());
        args.push(V::Text(u.clone()));
    }
    if let Some(st) = state {
        clauses.push("state = ?".into());
        args.push(V::Text(st.clone()));
    }
    if let Some(f) = from {
        clauses.push("created_at >= ?".into());
        args.push(V::Integer(f));
    }
    if let Some(t) = to {
        clauses.push("created_at < ?".into());
        args.push(V::Integer(t));
    }
    (clauses.join(" AND "), args)
}

fn list(conn: &Connection, q: &SessionQuery) -> Result<SessionPage, rusqlite::Error> {
    use rusqlite::types::Value as V;
    let (mut filter, mut args) = session_filter(&q.user_id, &q.state, q.from, q.to);
    let key = sort_expr(q.sort_by);
    let (dir, cmp) = if q.descending {
        ("DESC", "<")
    } else {
        ("ASC", ">")
    };
    if let Some((k, id)) = &q.after {
        filter.push_str(&format!(" AND ({key}, id) {cmp} (?, ?)"));
        args.push(match k {
            CursorKey::Int(i) => V::Integer(*i),
            CursorKey::Text(t) => V::Text(t.clone()),
        });
        args.push(V::Text(id.clone()));
    }
    args.push(V::Integer(q.limit as i64 + 1));
    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE {filter} ORDER BY {key} {dir}, id {dir} LIMIT ?");
    let mut stmt = conn.prepare(&sql)?;
    let mut sessions = stmt
        .query_map(rusqlite::params_from_iter(args), session_row)?
        .collect::<Result<Vec<_>, _>>()?;
    let next = if sessions.len() > q.limit {
        sessions.truncate(q.limit);
        sessions.last().map(|s| (q.sort_by.key_of(s), s.id.clone()))
    } else {
        None
    };
    Ok(SessionPage { sessions, next })
}

/// Totals over every session started in the window: aggregates over all matching
/// rows, never over a truncated page.
fn window(
    conn: &Connection,
    from: Option<Millis>,
    to: Option<Millis>,
) -> Result<WindowMetrics, rusqlite::Error> {
    let (filter, args) = session_filter(&None, &None, from, to);
    let scope = format!("SELECT id FROM sessions WHERE {filter}");
    let args = || rusqlite::params_from_iter(args.clone());
    let count = |r: &rusqlite::Row<'_>, i| r.get::<_, i64>(i).map(|v| v as u64);
    let mut m = WindowMetrics::default();
    conn.query_row(
        &format!("SELECT COUNT(*), COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0) FROM sessions WHERE {filter}"),
        args(),
        |r| {
            (m.sessions, m.tokens_in, m.tokens_out) = (count(r, 0)?, count(r, 1)?, count(r, 2)?);
            Ok(())
        },
    )?;
    conn.query_row(
        &format!(
            "SELECT COUNT(*), COALESCE(SUM(role = 'user'), 0), COALESCE(SUM(role = 'assistant'), 0),
                    COALESCE(SUM(role = 'admin'), 0)
             FROM messages WHERE session_id IN ({scope})"
        ),
        args(),
        |r| {
            (
                m.messages,
                m.user_messages,
                m.assistant_messages,
                m.admin_messages,
            ) = (count(r, 0)?, count(r, 1)?, count(r, 2)?, count(r, 3)?);
            Ok(())
        },
    )?;
    conn.query_row(
        &format!(
            "SELECT COALESCE(SUM(action = 'admin_join'), 0), COALESCE(SUM(action = 'help_request'), 0)
             FROM session_events WHERE session_id IN ({scope})"
        ),
        args(),
        |r| {
            (m.takeovers, m.help_requests) = (count(r, 0)?, count(r, 1)?);
            Ok(())
        },
    )?;
    conn.query_row(
        &format!(
            "WITH ordered AS (
                 SELECT role, created_at,
                        LAG(role) OVER w AS prev_role, LAG(created_at) OVER w AS prev_at
                 FROM messages WHERE session_id IN ({scope})
                 WINDOW w AS (PARTITION BY session_id ORDER BY seq))
             SELECT COUNT(*), AVG(created_at - prev_at), MAX(created_at - prev_at)
             FROM ordered WHERE role IN ('assistant', 'admin') AND prev_role = 'user'"
        ),
        args(),
        |r| {
            m.responses = count(r, 0)?;
            m.response_ms_avg = r.get(1)?;
            m.response_ms_max = r.get(2)?;
            Ok(())
        },
    )?;
    Ok(m)
}

fn load(
    conn: &Connection,
    id: &str,
    messages_max: usize,
) -> Result<Option<Loaded>, rusqlite::Error> {
    let session = conn
        .query_row(
            &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"),
            params![id],
            session_row,
        )
        .optional()?;
    let Some(session) = session else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT seq, message_id, role, author, client_id, key_id, nonce, ciphertext, created_at,
                tokens_in, tokens_out, cancelled
         FROM messages WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![id, messages_max as i64], |r| {
        let nonce: Vec<u8> = r.get(6)?;
        let role: String = r.get(2)?;
        Ok(MessageRecord {
            session_id: id.to_owned(),
            seq: r.get::<_, i64>(0)? as u64,
            message_id: r.get(1)?,
            // An unknown role or a malformed nonce is corruption: it will fail to open.
            role: Role::parse(&role).unwrap_or(Role::System),
            author: r.get(3)?,
            client_id: r.get(4)?,
            sealed: Sealed {
                key_id: r.get(5)?,
                nonce: nonce.as_slice().try_into().unwrap_or([0u8; NONCE_BYTES]),
                ciphertext: r.get(7)?,
            },
            created_at: r.get(8)?,
            tokens_in: r.get::<_, i64>(9)? as u64,
            tokens_out: r.get::<_, i64>(10)? as u64,
            cancelled: r.get(11)?,
        })
    })?;
    let mut messages = rows.collect::<Result<Vec<_>, _>>()?;
    messages.reverse();
    Ok(Some((session, messages)))
}

impl Store for SqliteStore {
    fn write(&self, ops: Vec<WriteOp>) -> StoreFuture<Vec<WriteOutcome>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let sent = self.jobs.try_send(Job { ops, reply });
        let queue_max = self.queue_max;
        Box::pin(async move {
            match sent {
                Ok(()) => rx.await.map_err(|_| StoreError::Stopped)?,
                Err(TrySendError::Full(_)) => Err(StoreError::Overloaded(queue_max)),
                Err(TrySendError::Disconnected(_)) => Err(StoreError::Stopped),
            }
        })
    }

    fn load_session(&self, id: &str, messages_max: usize) -> StoreFuture<Option<Loaded>> {
        let id = id.to_owned();
        self.read(move |c| load(c, &id, messages_max).map_err(db_err))
    }

    fn ping(&self) -> StoreFuture<()> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db_err))
    }

    fn list_sessions(&self, query: SessionQuery) -> StoreFuture<SessionPage> {
        self.read(move |c| list(c, &query).map_err(db_err))
    }

    fn session_events(&self, id: &str) -> StoreFuture<Vec<SessionEvent>> {
        let id = id.to_owned();
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT at, actor, action, state FROM session_events WHERE session_id = ?1 ORDER BY at, rowid")
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![id], |r| Ok(SessionEvent { at: r.get(0)?, actor: r.get(1)?, action: r.get(2)?, state: r.get(3)? }))
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
    }

    fn window_metrics(
        &self,
        from: Option<Millis>,
        to: Option<Millis>,
    ) -> StoreFuture<WindowMetrics> {
        self.read(move |c| window(c, from, to).map_err(db_err))
    }

    fn due_notifications(&self, now: Millis, limit: usize) -> StoreFuture<Vec<Notification>> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, kind, payload, attempts FROM outbox
                     WHERE state = 'pending' AND next_at <= ?1 ORDER BY next_at, id LIMIT ?2",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![now, limit as i64], |r| {
                    Ok(Notification {
                        id: r.get(0)?,
                        kind: r.get(1)?,
                        payload: r.get(2)?,
                        attempts: r.get(3)?,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
    }

    fn next_notification_at(&self) -> StoreFuture<Option<Millis>> {
        self.read(|c| {
            c.query_row(
                "SELECT MIN(next_at) FROM outbox WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)
        })
    }

    fn user_sessions(&self, user_id: &str, sessions_max: usize) -> StoreFuture<Vec<Loaded>> {
        let user_id = user_id.to_owned();
        self.read(move |c| {
            let ids: Vec<String> = {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT id FROM sessions WHERE user_id = ?1 ORDER BY created_at LIMIT ?2",
                    )
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![user_id, sessions_max as i64], |r| r.get(0))
                    .map_err(db_err)?;
                rows.collect::<Result<_, _>>().map_err(db_err)?
            };
            ids.iter()
                .filter_map(|id| load(c, id, i64::MAX as usize).transpose())
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyRing;
    use crate::pool::PoolRuntime;

    /// Awaits a store future from a plain test thread.
    fn block<T>(f: StoreFuture<T>) -> Result<T, StoreError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn msg(
        ring: &KeyRing,
        session: &str,
        seq: u64,
        id: &str,
        client: Option<&str>,
        text: &str,
    ) -> MessageRecord {
        MessageRecord {
            session_id: session.into(),
            message_id: id.into(),
            seq,
            role: Role::User,
            author: "u1".into(),
            client_id: client.map(str::to_owned),
            sealed: ring.seal(session, id, text),
            created_at: 1000 + seq as i64,
            tokens_in: 0,
            tokens_out: 0,
            cancelled: false,
        }
    }

    fn session(id: &str) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            user_id: "u1".into(),
            created_at: 1000,
            last_activity: 1000,
            state: "ai".into(),
            message_count: 0,
            tokens_in: 0,
            tokens_out: 0,
            ended_at: None,
        }
    }

    #[test]
    fn writes_dedupe_by_client_id_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, pool) = PoolRuntime::start(1, 64).unwrap();
        let ring = KeyRing::new(&"33".repeat(32), &[]).unwrap();
        {
            let store = SqliteStore::open(dir.path(), pool.clone(), 2, 16).unwrap();
            let first = vec![
                WriteOp::CreateSession(session("s1")),
                WriteOp::AppendMessage {
                    user_id: "u1".into(),
                    message: msg(&ring, "s1", 1, "m1", Some("c1"), "hi"),
                },
            ];
            assert_eq!(
                block(store.write(first)).unwrap(),
                [WriteOutcome::Done, WriteOutcome::Done]
            );
            let again = vec![WriteOp::AppendMessage {
                user_id: "u1".into(),
                message: msg(&ring, "s1", 2, "m2", Some("c1"), "different text"),
            }];
            assert_eq!(
                block(store.write(again)).unwrap(),
                [WriteOutcome::Duplicate {
                    message_id: "m1".into(),
                    session_id: "s1".into()
                }]
            );
        }
        let store = SqliteStore::open(dir.path(), pool, 1, 16).unwrap();
        let (s, msgs) = block(store.load_session("s1", 100)).unwrap().unwrap();
        assert_eq!(s.message_count, 1);
        assert_eq!(s.last_activity, 1001);
        assert_eq!(msgs.len(), 1);
        assert_eq!(ring.open("s1", "m1", &msgs[0].sealed).unwrap(), "hi");
        assert!(block(store.load_session("nope", 10)).unwrap().is_none());
        block(store.ping()).unwrap();
    }

    #[test]
    fn a_failing_job_fails_alone_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("t.db")).unwrap();
        migrate(&mut conn).unwrap();
        let ring = KeyRing::new(&"33".repeat(32), &[]).unwrap();
        let job = |ops: Vec<WriteOp>| Job {
            ops,
            reply: tokio::sync::oneshot::channel().0,
        };
        let append = |seq: u64, id: &str| WriteOp::AppendMessage {
            user_id: "u1".into(),
            message: msg(&ring, "s1", seq, id, None, "x"),
        };
        let batch = [
            job(vec![WriteOp::CreateSession(session("s1")), append(1, "m1")]),
            // Same (session, seq) as m1: a primary key violation.
            job(vec![append(2, "m2"), append(1, "m-clash")]),
            job(vec![append(3, "m3")]),
        ];
        let results = apply_batch(&mut conn, &batch).unwrap();
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(results[1].is_err(), "{results:?}");
        let stored: Vec<String> = conn
            .prepare("SELECT message_id FROM messages ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored, ["m1", "m3"], "the failing job left nothing behind");
        let count: i64 = conn
            .query_row(
                "SELECT message_count FROM sessions WHERE id = 's1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(count, 2);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, pool) = PoolRuntime::start(1, 8).unwrap();
        let c = Connection::open(dir.path().join("chatbox.db")).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        match SqliteStore::open(dir.path(), pool, 1, 8) {
            Err(StoreError::NewerSchema { found: 99, .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a database from the future"),
        }
    }

    #[test]
    fn history_is_the_latest_messages_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, pool) = PoolRuntime::start(1, 64).unwrap();
        let ring = KeyRing::new(&"33".repeat(32), &[]).unwrap();
        let store = SqliteStore::open(dir.path(), pool, 1, 16).unwrap();
        let mut ops = vec![WriteOp::CreateSession(session("s"))];
        for i in 1..=5 {
            ops.push(WriteOp::AppendMessage {
                user_id: "u1".into(),
                message: msg(&ring, "s", i, &format!("m{i}"), None, &format!("t{i}")),
            });
        }
        block(store.write(ops)).unwrap();
        let (_, msgs) = block(store.load_session("s", 3)).unwrap().unwrap();
        assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4, 5]);
    }
}
