//! The embedded store: SQLite in WAL mode. Writes go through one writer thread
//! (`group`) that commits in groups, behind the cores' journals when they keep
//! them (`store::journal`); reads run concurrently on the blocking pool, each on
//! one connection of a fixed pool ([`Readers`]): a read waits a bounded time for
//! a free one, never opens more.

#[cfg(test)]
mod fixtures;
mod group;
#[cfg(test)]
mod journal_tests;
mod read;
mod write;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

use super::writer::{self, WriteQueue};
use super::{
    FileRecord, Loaded, MessageRecord, Millis, Notification, Op, SessionEvent, SessionPage,
    SessionQuery, Store, StoreError, StoreFuture, WindowMetrics, WriteOp, WriteOutcome,
};
use crate::pool::BlockingPool;

/// How often the checkpointer moves the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// WAL frames (pages) after which the writer completes a checkpoint: 16 MiB.
const WAL_FRAMES_RESTART: i64 = 4096;
/// Bytes the WAL file is trimmed to when it starts over.
const WAL_BYTES_KEPT: i64 = 32 * 1024 * 1024;

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
    // 4: the format of each message's associated data (0: the ids only, before).
    "ALTER TABLE messages ADD COLUMN aad_version INTEGER NOT NULL DEFAULT 0;",
    // 5: uploaded files (their bytes are in the file store), and the file a
    // message carries (JSON: file_id, mime, size, name).
    "CREATE TABLE files (
        file_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        name TEXT,
        created_at INTEGER NOT NULL,
        key_id INTEGER NOT NULL,
        location TEXT NOT NULL
    );
    CREATE INDEX files_owner ON files(owner);
    ALTER TABLE messages ADD COLUMN file TEXT;",
    // 6: what a user sent with a message (file_url, metadata), sealed.
    "ALTER TABLE messages ADD COLUMN extra BLOB;",
    // 7: the last record of each core's journal the database holds.
    "CREATE TABLE journal_applied (journal TEXT PRIMARY KEY, lsn INTEGER NOT NULL);",
];

pub struct SqliteStore {
    writes: WriteQueue,
    /// Where the cores keep their journals; `None` without a commit interval.
    journals: Option<std::path::PathBuf>,
    /// The database file.
    db: std::path::PathBuf,
    /// This process's claim on the journals (`journal.lock`, locked): held, it
    /// replayed them at open and its cores may keep new ones; another process
    /// (a server running while `chatbox copy` reads) holding it owns them.
    journals_lock: Option<std::fs::File>,
    /// Dropping it stops the checkpointer (after a last checkpoint).
    _checkpointer: std::sync::mpsc::Sender<()>,
    readers: Arc<Readers>,
    /// How long a read waits for a free connection before it is refused.
    read_wait: Duration,
    pool: BlockingPool,
}

/// How long a read waits for a free connection unless told otherwise.
const READ_WAIT_DEFAULT: Duration = Duration::from_secs(2);

/// The fixed pool of read connections, opened at start. A permit is a claim on
/// one idle connection: whoever holds one finds one in `idle`. Reads beyond the
/// pool wait (asynchronously, on the blocking pool's runtime, holding no thread)
/// and are refused when the wait ends, so a burst of slow reads can neither open
/// connections without end nor pile up blocked threads.
struct Readers {
    idle: Mutex<Vec<Connection>>,
    permits: tokio::sync::Semaphore,
    /// Connections in the pool (they never change after start).
    count: usize,
    /// Reads refused because no connection came free in time (for tests and logs).
    refused: AtomicUsize,
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(StoreError::sqlite(Op::Open))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(StoreError::sqlite(Op::Open))?;
    let pragmas: [(&str, rusqlite::types::Value); 7] = [
        // Deleted content is overwritten with zeros, not left in free pages: an
        // erased user's rows must not stay readable in the file.
        ("secure_delete", "ON".to_owned().into()),
        ("journal_mode", "WAL".to_owned().into()),
        // FULL: a commit is on disk before its ack leaves, even across power loss.
        ("synchronous", "FULL".to_owned().into()),
        ("foreign_keys", "ON".to_owned().into()),
        // Reads through a memory map instead of a read() copy per page, and a page
        // cache large enough that index pages stay in it (both bounded; SQLite's
        // defaults are no map and 2 MiB).
        ("mmap_size", MMAP_BYTES_MAX.into()),
        ("cache_size", (-(PAGE_CACHE_KIB_MAX as i64)).into()),
        ("temp_store", "MEMORY".to_owned().into()),
    ];
    for (name, value) in pragmas {
        conn.pragma_update(None, name, value)
            .map_err(StoreError::sqlite(Op::Open))?;
    }
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let err = StoreError::sqlite(Op::Migrate);
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    if found > known {
        return Err(StoreError::NewerSchema { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let mut step = || {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()
        };
        step().map_err(StoreError::sqlite(Op::Migrate))?;
        tracing::info!(version = i + 1, "storage schema migrated");
    }
    Ok(())
}

impl SqliteStore {
    /// [`SqliteStore::open_with`] without journals: every write commits before it
    /// resolves.
    pub fn open(
        dir: &Path,
        pool: BlockingPool,
        readers: usize,
        queue_max: usize,
    ) -> Result<SqliteStore, StoreError> {
        Self::open_with(dir, pool, readers, queue_max, Duration::ZERO)
    }

    /// Opens (creating if needed) `dir/chatbox.db`, migrates it, applies what
    /// journals left in `dir/journal` hold, and starts the writer and the
    /// checkpointer. With a `commit_interval`, the cores keep journals and the
    /// database commits their writes at most about that long after they came.
    pub fn open_with(
        dir: &Path,
        pool: BlockingPool,
        readers: usize,
        queue_max: usize,
        commit_interval: Duration,
    ) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io(Op::Open))?;
        let path = dir.join("chatbox.db");
        let mut conn = open(&path)?;
        migrate(&mut conn)?;
        let journals = dir.join(super::journal::DIR);
        let journals_lock = lock(&dir.join("journal.lock"))?;
        match journals_lock {
            Some(_) => drop(group::replay(&conn, &journals)?),
            None => {
                tracing::info!(dir = %dir.display(), "another process holds this store's journals: not replayed here")
            }
        }
        // Checkpoints run on their own connection and thread (PASSIVE: they never
        // block the writer); inside a commit they were a fifth of the writer's time.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .and_then(|()| conn.pragma_update(None, "journal_size_limit", WAL_BYTES_KEPT))
            .map_err(StoreError::sqlite(Op::Open))?;
        let checkpointer = open(&path)?;
        // Set by the checkpointer when the WAL is long; the writer then finishes
        // the checkpoint itself (see `checkpoint_loop`).
        let wal_big = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let big = wal_big.clone();
        std::thread::Builder::new()
            .name("chatbox-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, stopped, big))
            .map_err(StoreError::io(Op::Open))?;
        let idle = (0..readers.max(1))
            .map(|_| open(&path))
            .collect::<Result<Vec<_>, _>>()?;
        let readers = Readers {
            permits: tokio::sync::Semaphore::new(idle.len()),
            count: idle.len(),
            idle: Mutex::new(idle),
            refused: AtomicUsize::new(0),
        };
        let (writes, jobs) = writer::queue(queue_max);
        // The writer is async (for its commit timer); it runs alone on its own
        // thread, where SQLite's synchronous commits block nothing else.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(StoreError::io(Op::Open))?;
        let writer = group::Writer::new(conn, wal_big, jobs.unsettled.clone(), commit_interval);
        std::thread::Builder::new()
            .name("chatbox-sqlite-writer".into())
            .spawn(move || runtime.block_on(writer.run(jobs)))
            .map_err(StoreError::io(Op::Open))?;
        Ok(SqliteStore {
            writes,
            journals: (!commit_interval.is_zero()).then_some(journals),
            db: path,
            journals_lock,
            _checkpointer: stop,
            readers: Arc::new(readers),
            read_wait: READ_WAIT_DEFAULT,
            pool,
        })
    }

    /// Sets how long a read waits for a free read connection.
    pub fn with_read_wait(mut self, wait: Duration) -> SqliteStore {
        self.read_wait = wait;
        self
    }

    /// Read connections in the pool.
    pub fn readers(&self) -> usize {
        self.readers.count
    }

    /// Runs `f` with a read connection on the blocking pool; its errors are `op`'s.
    fn read<T: Send + 'static>(
        &self,
        op: Op,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreFuture<T> {
        let readers = self.readers.clone();
        let wait = self.read_wait;
        // Journaled writes are acknowledged before their commit: a read waits
        // for that commit, so it never sees less than was acknowledged.
        let behind = (self.writes.unsettled() > 0).then(|| self.commit());
        let pool = self.pool.clone();
        let call = async move {
            if let Some(commit) = behind {
                commit.await?;
            }
            pool.call(async move {
            let permit = match tokio::time::timeout(wait, readers.permits.acquire()).await {
                Ok(Ok(permit)) => permit,
                // Timed out (or closed, which never happens: the pool owns it).
                _ => {
                    readers.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(readers = readers.count, wait_ms = wait.as_millis() as u64, %op, "no read connection came free in time");
                    return Err(busy(&readers, wait));
                }
            };
            permit.forget();
            let pool = readers.clone();
            let done = tokio::task::spawn_blocking(move || {
                // A permit promises an idle connection; the pool gets it back (and
                // the permit) whatever `f` does, panics included.
                let lease = Lease::take(&pool).ok_or_else(|| busy(&pool, wait))?;
                f(lease.conn()).map_err(StoreError::sqlite(op))
            })
            .await;
            done.map_err(|e| StoreError::Task {
                op,
                source: Arc::new(e),
            })?
            })
            .await?
        };
        Box::pin(call)
    }
}

/// Takes `path`'s exclusive lock (creating the file), or `None` when another
/// process holds it. Released when the file closes.
fn lock(path: &Path) -> Result<Option<std::fs::File>, StoreError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(StoreError::io(Op::Journal))?;
    // (`File::try_lock` would do, from Rust 1.89; the crate supports 1.85.)
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor owned by `file`, alive for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        e => Err(StoreError::io(Op::Journal)(e)),
    }
}

/// The refusal of a read that found no free connection within `wait`.
fn busy(readers: &Readers, wait: Duration) -> StoreError {
    StoreError::ReadersBusy {
        readers: readers.count,
        retry_after_ms: wait.as_millis().clamp(100, 5000) as u64,
    }
}

/// One read connection out of the pool, returned with its permit on drop.
struct Lease<'a> {
    pool: &'a Readers,
    conn: Option<Connection>,
}

impl<'a> Lease<'a> {
    fn take(pool: &'a Readers) -> Option<Lease<'a>> {
        let conn = pool.idle.lock().ok().and_then(|mut idle| idle.pop());
        if conn.is_none() {
            // Cannot happen while permits match connections; give the permit back.
            pool.permits.add_permits(1);
        }
        Some(Lease {
            pool,
            conn: Some(conn?),
        })
    }

    fn conn(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(conn), Ok(mut idle)) = (self.conn.take(), self.pool.idle.lock()) {
            idle.push(conn);
        }
        self.pool.permits.add_permits(1);
    }
}

/// Checkpoints every [`CHECKPOINT_EVERY`] until the store is dropped, then once
/// more, so a clean shutdown leaves the WAL folded into the database.
fn checkpoint_loop(
    conn: Connection,
    stopped: std::sync::mpsc::Receiver<()>,
    wal_big: Arc<AtomicBool>,
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
            Ok(frames) if frames >= WAL_FRAMES_RESTART => wal_big.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
        if last {
            return;
        }
    }
}

impl Store for SqliteStore {
    fn write(&self, ops: Vec<WriteOp>) -> StoreFuture<Vec<WriteOutcome>> {
        self.writes.submit(ops)
    }

    fn write_logged(
        &self,
        logged: super::journal::Logged,
        ops: Vec<WriteOp>,
    ) -> Result<(), StoreError> {
        self.writes.submit_logged(logged, ops)
    }

    fn journal_backing(&self) -> Result<Option<super::journal::Backing>, StoreError> {
        let Some(dir) = &self.journals else {
            return Ok(None);
        };
        if self.journals_lock.is_none() {
            return Err(StoreError::Setting(format!(
                "another chatbox process holds the journals in {}",
                dir.display()
            )));
        }
        let conn = open(&self.db)?;
        // On a core: a lookup that finds the database locked (a WAL reset, for
        // an instant) fails at once rather than stall the core; and a small page
        // cache, one per core (index pages come from the shared memory map).
        conn.busy_timeout(Duration::ZERO)
            .and_then(|()| conn.pragma_update(None, "cache_size", -2048))
            .map_err(StoreError::sqlite(Op::Open))?;
        Ok(Some(super::journal::Backing {
            dir: dir.clone(),
            resends: Box::new(read::ClientIds(conn)),
        }))
    }

    fn commit(&self) -> StoreFuture<()> {
        // An empty job: answered once the commit that follows it is done.
        let job = self.writes.submit(Vec::new());
        Box::pin(async move { job.await.map(|_| ()) })
    }

    fn write_queue(&self) -> (usize, usize) {
        self.writes.depth()
    }

    fn load_session(&self, id: &str, messages_max: usize) -> StoreFuture<Option<Loaded>> {
        let id = id.to_owned();
        self.read(Op::LoadSession, move |c| read::load(c, &id, messages_max))
    }

    fn messages_after(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<Vec<MessageRecord>> {
        let id = session_id.to_owned();
        self.read(Op::MessagePage, move |c| {
            read::messages_after(c, &id, after_seq, limit)
        })
    }

    fn ping(&self) -> StoreFuture<()> {
        self.read(Op::Ping, |c| c.query_row("SELECT 1", [], |_| Ok(())))
    }

    fn list_sessions(&self, query: SessionQuery) -> StoreFuture<SessionPage> {
        self.read(Op::ListSessions, move |c| read::list(c, &query))
    }

    fn session_events(&self, id: &str) -> StoreFuture<Vec<SessionEvent>> {
        let id = id.to_owned();
        self.read(Op::SessionEvents, move |c| read::events(c, &id))
    }

    fn window_metrics(
        &self,
        from: Option<Millis>,
        to: Option<Millis>,
    ) -> StoreFuture<WindowMetrics> {
        self.read(Op::WindowMetrics, move |c| read::window(c, from, to))
    }

    fn due_notifications(&self, now: Millis, limit: usize) -> StoreFuture<Vec<Notification>> {
        self.read(Op::DueNotifications, move |c| read::due(c, now, limit))
    }

    fn next_notification_at(&self) -> StoreFuture<Option<Millis>> {
        self.read(Op::NextNotification, read::next_due)
    }

    fn user_sessions(&self, user_id: &str, sessions_max: usize) -> StoreFuture<Vec<Loaded>> {
        let user_id = user_id.to_owned();
        self.read(Op::UserSessions, move |c| {
            read::user_sessions(c, &user_id, sessions_max)
        })
    }

    fn idle_sessions(&self, before: Millis, limit: usize) -> StoreFuture<Vec<(String, String)>> {
        self.read(Op::IdleSessions, move |c| read::idle(c, before, limit))
    }

    fn file(&self, file_id: &str) -> StoreFuture<Option<FileRecord>> {
        let id = file_id.to_owned();
        self.read(Op::ReadFile, move |c| read::file(c, &id))
    }

    fn files_bytes(&self, owner: &str) -> StoreFuture<u64> {
        let owner = owner.to_owned();
        self.read(Op::ReadFile, move |c| read::files_bytes(c, &owner))
    }

    fn user_file_ids(&self, owner: &str) -> StoreFuture<Vec<String>> {
        let owner = owner.to_owned();
        self.read(Op::ReadFile, move |c| read::user_file_ids(c, &owner))
    }

    fn outbox_count(&self, state: &str) -> StoreFuture<u64> {
        let state = state.to_owned();
        self.read(Op::OutboxCount, move |c| read::outbox_count(c, &state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyRing;
    use crate::pool::PoolRuntime;

    use super::fixtures::{block, msg, session};

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
        assert_eq!(ring.open(&msgs[0].place(), &msgs[0].sealed).unwrap(), "hi");
        assert!(block(store.load_session("nope", 10)).unwrap().is_none());
        block(store.ping()).unwrap();
    }

    #[test]
    fn a_failing_job_fails_alone_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, pool) = PoolRuntime::start(1, 64).unwrap();
        let ring = KeyRing::new(&"33".repeat(32), &[]).unwrap();
        let append = |seq: u64, id: &str| WriteOp::AppendMessage {
            user_id: "u1".into(),
            message: msg(&ring, "s1", seq, id, None, "x"),
        };
        let jobs = [
            vec![WriteOp::CreateSession(session("s1")), append(1, "m1")],
            // Same (session, seq) as m1: a primary key violation.
            vec![append(2, "m2"), append(1, "m-clash")],
            vec![append(3, "m3")],
        ];
        let store = SqliteStore::open(dir.path(), pool, 1, 16).unwrap();
        // Queued together (submitting does not wait), so they share a group.
        let waiting: Vec<_> = jobs.into_iter().map(|ops| store.write(ops)).collect();
        let results: Vec<_> = waiting.into_iter().map(block).collect();
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        match &results[1] {
            Err(e) => assert_eq!(e.op(), Some(Op::AppendMessage), "{e}"),
            Ok(r) => panic!("the clash was stored: {r:?}"),
        }
        let (s, msgs) = block(store.load_session("s1", 10)).unwrap().unwrap();
        let stored: Vec<&str> = msgs.iter().map(|m| m.message_id.as_str()).collect();
        assert_eq!(stored, ["m1", "m3"], "the failing job left nothing behind");
        assert_eq!(s.message_count, 2);
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

    #[test]
    fn reads_wait_for_the_fixed_pool_and_are_refused_when_it_stays_busy() {
        let dir = tempfile::tempdir().unwrap();
        let (_rt, pool) = PoolRuntime::start(2, 64).unwrap();
        let store = SqliteStore::open(dir.path(), pool, 1, 16)
            .unwrap()
            .with_read_wait(Duration::from_millis(50));
        assert_eq!(store.readers(), 1);
        // The one connection is held by a read until the test lets it go.
        let (started, is_started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let held = store.read(Op::Ping, move |c| {
            started.send(()).unwrap();
            released.lock().unwrap().recv().unwrap();
            c.query_row("SELECT 1", [], |_| Ok(()))
        });
        let held = std::thread::spawn(move || block(held));
        is_started.recv().unwrap();
        // Before the pool was fixed, this read opened a second connection (kept
        // for good) and succeeded.
        match block(store.ping()) {
            Err(e @ StoreError::ReadersBusy { readers: 1, .. }) => {
                assert!(e.retry_after_ms().unwrap_or(0) > 0, "{e}");
            }
            other => panic!("a read past the pool was not refused: {other:?}"),
        }
        assert_eq!(store.readers.refused.load(Ordering::Relaxed), 1);
        release.send(()).unwrap();
        held.join().unwrap().unwrap();
        block(store.ping()).expect("the connection came back to the pool");
        assert_eq!(
            store.readers.idle.lock().unwrap().len(),
            1,
            "still one connection"
        );
    }
}
