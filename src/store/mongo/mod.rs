//! The MongoDB backend: the [`Store`] trait over the official driver, on the
//! blocking pool's tokio runtime.
//!
//! Writes go through the shared writer (`store::writer`) as a task on
//! the pool: every job waiting goes into one transaction (group commit, as the
//! embedded store does), answered after the commit is acknowledged with the
//! configured write concern. When MongoDB is unreachable a batch is retried with
//! backoff for up to `mongo_write_retry_secs` (see `write.rs`); jobs that arrive
//! meanwhile wait in the bounded queue, and a caller whose job does not fit is
//! told at once (`Overloaded`), never dropped silently.
//!
//! Filters are built from typed values only: no string from a request ever becomes
//! a field name or an operator.

mod lease;
mod read;
mod write;

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Document};
use mongodb::options::{ClientOptions, IndexOptions, TransactionOptions, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};

use super::writer::{self, WriteQueue};
use super::{
    FileRecord, Loaded, MessageRecord, Millis, Notification, Op, SessionEvent, SessionPage,
    SessionQuery, Store, StoreError, StoreFuture, WindowMetrics, WriteOp, WriteOutcome,
};
use crate::pool::BlockingPool;

/// How to reach MongoDB and how durable a write must be before its ack.
#[derive(Debug, Clone)]
pub struct MongoSettings {
    pub uri: String,
    pub database: String,
    /// `majority` (default) or a number of nodes.
    pub write_concern: String,
    /// How long a batch is retried while MongoDB is unreachable before its
    /// writes fail.
    pub write_retry: Duration,
    /// How long start-up and `ping` wait to reach a server.
    pub connect_timeout: Duration,
}

pub struct MongoStore {
    db: Database,
    writes: WriteQueue,
    pool: BlockingPool,
}

/// The collections, typed once.
#[derive(Clone)]
struct Colls {
    db: Database,
    sessions: Collection<Document>,
    messages: Collection<Document>,
    events: Collection<Document>,
    outbox: Collection<Document>,
    counters: Collection<Document>,
    leases: Collection<Document>,
    files: Collection<Document>,
}

impl Colls {
    fn new(db: &Database) -> Colls {
        Colls {
            db: db.clone(),
            sessions: db.collection("sessions"),
            messages: db.collection("messages"),
            events: db.collection("session_events"),
            outbox: db.collection("outbox"),
            counters: db.collection("counters"),
            leases: db.collection("leases"),
            files: db.collection("files"),
        }
    }
}

/// A count as MongoDB stores it (saturating: no count reaches `i64::MAX`).
fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn write_concern(s: &str) -> Result<WriteConcern, StoreError> {
    match s {
        "majority" => Ok(WriteConcern::majority()),
        n => n.parse::<u32>().map(WriteConcern::nodes).map_err(|_| {
            StoreError::Setting(format!(
                "write concern {n:?}: expected majority or a number"
            ))
        }),
    }
}

/// Creates the indexes (idempotent: an index that exists is left alone). The
/// `chatbox migrate` command and every start run it.
pub async fn ensure_indexes(db: &Database) -> Result<(), StoreError> {
    indexes(db).await.map_err(StoreError::mongo(Op::Migrate))
}

async fn indexes(db: &Database) -> mongodb::error::Result<()> {
    let c = Colls::new(db);
    let index = |keys: Document, opts: Option<IndexOptions>| {
        IndexModel::builder().keys(keys).options(opts).build()
    };
    let unique = || IndexOptions::builder().unique(true).build();
    c.sessions
        .create_indexes([
            index(doc! {"user_id": 1, "created_at": 1}, None),
            index(doc! {"state": 1}, None),
            index(doc! {"last_activity": 1}, None),
            index(doc! {"created_at": 1}, None),
        ])
        .await?;
    let client_id = IndexOptions::builder()
        .unique(true)
        .partial_filter_expression(doc! {"client_id": {"$type": "string"}})
        .build();
    c.messages
        .create_indexes([
            index(doc! {"session_id": 1, "seq": 1}, Some(unique())),
            index(doc! {"user_id": 1, "client_id": 1}, Some(client_id)),
        ])
        .await?;
    c.events
        .create_indexes([
            index(doc! {"session_id": 1, "at": 1}, None),
            index(doc! {"action": 1, "at": 1}, None),
        ])
        .await?;
    c.outbox
        .create_indexes([index(doc! {"state": 1, "next_at": 1}, None)])
        .await?;
    c.leases
        .create_indexes([index(doc! {"node": 1}, None)])
        .await?;
    c.files
        .create_indexes([index(doc! {"owner": 1}, None)])
        .await?;
    Ok(())
}

impl MongoSettings {
    pub fn from_config(config: &crate::config::Config) -> Option<MongoSettings> {
        Some(MongoSettings {
            uri: config.mongo_uri.clone()?,
            database: config.mongo_database.clone(),
            write_concern: config.mongo_write_concern.clone(),
            write_retry: Duration::from_secs(config.mongo_write_retry_secs),
            connect_timeout: Duration::from_millis(config.mongo_connect_timeout_ms),
        })
    }
}

/// Parses the URI; a `mongodb+srv://` one is resolved in DNS here (SRV records
/// for the servers, TXT for options), bounded by the connect timeout so a DNS
/// server that never answers cannot hold start-up.
async fn parse_uri(uri: &str, timeout: Duration) -> Result<ClientOptions, StoreError> {
    let Some(rest) = uri.strip_prefix("mongodb+srv://") else {
        return ClientOptions::parse(uri)
            .await
            .map_err(StoreError::mongo(Op::Open));
    };
    // The host alone: what precedes it may be a user and password.
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split(['/', '?']).next().unwrap_or_default().to_owned();
    let lookup = |source: Arc<dyn std::error::Error + Send + Sync>| StoreError::SrvLookup {
        host: host.clone(),
        source,
    };
    match tokio::time::timeout(timeout, ClientOptions::parse(uri)).await {
        Ok(Ok(opts)) => Ok(opts),
        Ok(Err(e)) => Err(lookup(Arc::new(e))),
        Err(_) => Err(lookup(Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} ms", timeout.as_millis()),
        )))),
    }
}

/// Connects to `settings.database` (within the connect timeout, with the
/// write concern set) and pings it; also what GridFS file storage opens.
pub fn connect(
    settings: &MongoSettings,
    pool: &BlockingPool,
) -> Result<(Client, Database), StoreError> {
    let wc = write_concern(&settings.write_concern)?;
    let (uri, name, timeout) = (
        settings.uri.clone(),
        settings.database.clone(),
        settings.connect_timeout,
    );
    pool.block_on(async move {
        let mut opts = parse_uri(&uri, timeout).await?;
        opts.server_selection_timeout = Some(timeout);
        opts.connect_timeout = Some(timeout);
        opts.write_concern = Some(wc);
        opts.app_name = Some("chatbox".into());
        // Hosts only: the URI may carry a password, which must not reach logs.
        let hosts: Vec<String> = opts.hosts.iter().map(ToString::to_string).collect();
        let hosts = hosts.join(",");
        let client = Client::with_options(opts).map_err(StoreError::mongo(Op::Open))?;
        let db = client.database(&name);
        db.run_command(doc! {"ping": 1})
            .await
            .map_err(|e| StoreError::Unreachable {
                hosts,
                source: std::sync::Arc::new(e),
            })?;
        Ok::<_, StoreError>((client, db))
    })?
}

impl MongoStore {
    /// Connects (within `connect_timeout`), creates the indexes, and starts the
    /// writer on the pool. Fails with a clear error when MongoDB cannot be reached.
    pub fn open(
        settings: &MongoSettings,
        pool: BlockingPool,
        queue_max: usize,
    ) -> Result<MongoStore, StoreError> {
        let wc = write_concern(&settings.write_concern)?;
        let (client, db) = connect(settings, &pool)?;
        let indexed = db.clone();
        pool.block_on(async move { ensure_indexes(&indexed).await })??;
        let (writes, jobs) = writer::queue(queue_max);
        let commit = write::MongoWriter {
            client,
            colls: Colls::new(&db),
            txn: TransactionOptions::builder().write_concern(wc).build(),
            retry_for: settings.write_retry,
        };
        pool.spawn(writer::run(commit, jobs))?;
        Ok(MongoStore { db, writes, pool })
    }

    /// Runs a read on the pool's runtime (the driver lives there); its errors are
    /// `op`'s.
    fn read<T: Send + 'static>(
        &self,
        op: Op,
        f: impl std::future::Future<Output = mongodb::error::Result<T>> + Send + 'static,
    ) -> StoreFuture<T> {
        let call = self.pool.call(f);
        Box::pin(async move { call.await?.map_err(StoreError::mongo(op)) })
    }

    fn colls(&self) -> Colls {
        Colls::new(&self.db)
    }
}

impl Store for MongoStore {
    fn write(&self, ops: Vec<WriteOp>) -> StoreFuture<Vec<WriteOutcome>> {
        self.writes.submit(ops)
    }

    fn write_queue(&self) -> (usize, usize) {
        self.writes.depth()
    }

    fn load_session(&self, id: &str, messages_max: usize) -> StoreFuture<Option<Loaded>> {
        let load = read::load(self.colls(), id.to_owned(), messages_max);
        self.read(Op::LoadSession, load)
    }

    fn messages_after(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<Vec<MessageRecord>> {
        let page = read::messages_after(self.colls(), session_id.to_owned(), after_seq, limit);
        self.read(Op::MessagePage, page)
    }

    fn ping(&self) -> StoreFuture<()> {
        let db = self.db.clone();
        self.read(Op::Ping, async move {
            db.run_command(doc! {"ping": 1}).await.map(drop)
        })
    }

    fn list_sessions(&self, query: SessionQuery) -> StoreFuture<SessionPage> {
        self.read(Op::ListSessions, read::list(self.colls(), query))
    }

    fn session_events(&self, id: &str) -> StoreFuture<Vec<SessionEvent>> {
        let events = read::events(self.colls(), id.to_owned());
        self.read(Op::SessionEvents, events)
    }

    fn window_metrics(
        &self,
        from: Option<Millis>,
        to: Option<Millis>,
    ) -> StoreFuture<WindowMetrics> {
        self.read(Op::WindowMetrics, read::window(self.colls(), from, to))
    }

    fn user_sessions(&self, user_id: &str, sessions_max: usize) -> StoreFuture<Vec<Loaded>> {
        let sessions = read::user_sessions(self.colls(), user_id.to_owned(), sessions_max);
        self.read(Op::UserSessions, sessions)
    }

    fn due_notifications(&self, now: Millis, limit: usize) -> StoreFuture<Vec<Notification>> {
        self.read(Op::DueNotifications, read::due(self.colls(), now, limit))
    }

    fn next_notification_at(&self) -> StoreFuture<Option<Millis>> {
        self.read(Op::NextNotification, read::next_due(self.colls()))
    }

    fn idle_sessions(&self, before: Millis, limit: usize) -> StoreFuture<Vec<(String, String)>> {
        self.read(Op::IdleSessions, read::idle(self.colls(), before, limit))
    }

    fn file(&self, file_id: &str) -> StoreFuture<Option<FileRecord>> {
        let file = read::file(self.colls(), file_id.to_owned());
        self.read(Op::ReadFile, file)
    }

    fn files_bytes(&self, owner: &str) -> StoreFuture<u64> {
        let bytes = read::files_bytes(self.colls(), owner.to_owned());
        self.read(Op::ReadFile, bytes)
    }

    fn user_file_ids(&self, owner: &str) -> StoreFuture<Vec<String>> {
        let ids = read::user_file_ids(self.colls(), owner.to_owned());
        self.read(Op::ReadFile, ids)
    }

    fn outbox_count(&self, state: &str) -> StoreFuture<u64> {
        let count = read::outbox_count(self.colls(), state.to_owned());
        self.read(Op::OutboxCount, count)
    }
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore")
            .field("database", &self.db.name())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_concern_names() {
        assert!(write_concern("majority").is_ok());
        assert!(write_concern("2").is_ok());
        assert!(write_concern("most").is_err());
    }
}
