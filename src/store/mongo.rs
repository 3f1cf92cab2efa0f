//! The MongoDB backend: the [`Store`] trait over the official driver, on the
//! blocking pool's tokio runtime.
//!
//! Writes go through one writer task that takes every job waiting, applies them in
//! one transaction (group commit, as the embedded store does) and answers each job
//! after the commit is acknowledged with the configured write concern. When
//! MongoDB is unreachable the writer retries the batch with backoff for up to
//! `mongo_write_retry_secs`; jobs that arrive meanwhile wait in a bounded queue,
//! and a caller whose job does not fit is told at once (`Overloaded`), never
//! dropped silently.
//!
//! Filters are built from typed values only: no string from a request ever becomes
//! a field name or an operator.

use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use mongodb::options::{
    ClientOptions, IndexOptions, ReturnDocument, TransactionOptions, WriteConcern,
};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use tokio::sync::{mpsc, oneshot};

use super::{
    CursorKey, Loaded, MessageRecord, Millis, Notification, Role, SessionEvent, SessionPage,
    SessionQuery, SessionRecord, SortBy, Store, StoreError, StoreFuture, WindowMetrics, WriteOp,
    WriteOutcome,
};
use crate::crypto::{Sealed, NONCE_BYTES};
use crate::pool::BlockingPool;

/// Jobs one transaction takes at most.
const GROUP_COMMIT_JOBS_MAX: usize = 256;
/// First pause before retrying a batch that failed for lack of MongoDB; doubles
/// up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);
/// Times a commit with an unknown result is tried before the batch is retried.
const COMMIT_TRIES_MAX: u32 = 3;

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

struct Job {
    ops: Vec<WriteOp>,
    reply: oneshot::Sender<Result<Vec<WriteOutcome>, StoreError>>,
}

type JobResult = Result<Vec<WriteOutcome>, StoreError>;

pub struct MongoStore {
    db: Database,
    jobs: mpsc::Sender<Job>,
    queue_max: usize,
    pool: BlockingPool,
}

fn db_err(e: mongodb::error::Error) -> StoreError {
    StoreError::Database(e.to_string())
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
        }
    }
}

fn write_concern(s: &str) -> Result<WriteConcern, StoreError> {
    match s {
        "majority" => Ok(WriteConcern::majority()),
        n => n.parse::<u32>().map(WriteConcern::nodes).map_err(|_| {
            StoreError::Database(format!(
                "write concern {n:?}: expected majority or a number"
            ))
        }),
    }
}

/// Creates the indexes (idempotent: an index that exists is left alone). The
/// `chatbox migrate` command and every start run it.
pub async fn ensure_indexes(db: &Database) -> Result<(), StoreError> {
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
        .await
        .map_err(db_err)?;
    let client_id = IndexOptions::builder()
        .unique(true)
        .partial_filter_expression(doc! {"client_id": {"$type": "string"}})
        .build();
    c.messages
        .create_indexes([
            index(doc! {"session_id": 1, "seq": 1}, Some(unique())),
            index(doc! {"user_id": 1, "client_id": 1}, Some(client_id)),
        ])
        .await
        .map_err(db_err)?;
    c.events
        .create_indexes([
            index(doc! {"session_id": 1, "at": 1}, None),
            index(doc! {"action": 1, "at": 1}, None),
        ])
        .await
        .map_err(db_err)?;
    c.outbox
        .create_indexes([index(doc! {"state": 1, "next_at": 1}, None)])
        .await
        .map_err(db_err)?;
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

impl MongoStore {
    /// Connects (within `connect_timeout`), creates the indexes, and starts the
    /// writer on the pool. Fails with a clear error when MongoDB cannot be reached.
    pub fn open(
        settings: &MongoSettings,
        pool: BlockingPool,
        queue_max: usize,
    ) -> Result<MongoStore, StoreError> {
        let wc = write_concern(&settings.write_concern)?;
        let (uri, name, timeout) = (
            settings.uri.clone(),
            settings.database.clone(),
            settings.connect_timeout,
        );
        let wc_client = wc.clone();
        let db = pool.block_on(async move {
            let mut opts = ClientOptions::parse(&uri).await.map_err(db_err)?;
            opts.server_selection_timeout = Some(timeout);
            opts.connect_timeout = Some(timeout);
            opts.write_concern = Some(wc_client);
            opts.app_name = Some("chatbox".into());
            // Hosts only: the URI may carry a password, which must not reach logs.
            let hosts: Vec<String> = opts.hosts.iter().map(ToString::to_string).collect();
            let hosts = hosts.join(",");
            let client = Client::with_options(opts).map_err(db_err)?;
            let db = client.database(&name);
            db.run_command(doc! {"ping": 1}).await.map_err(|e| {
                StoreError::Database(format!("cannot reach MongoDB at {hosts}: {e}"))
            })?;
            ensure_indexes(&db).await?;
            Ok::<_, StoreError>((client, db))
        })??;
        let (client, db) = db;
        let (jobs, rx) = mpsc::channel(queue_max.max(1));
        let writer = Writer {
            client,
            colls: Colls::new(&db),
            txn: TransactionOptions::builder().write_concern(wc).build(),
            retry_for: settings.write_retry,
        };
        pool.spawn(writer.run(rx))
            .map_err(|e| StoreError::Database(format!("cannot start the MongoDB writer: {e}")))?;
        Ok(MongoStore {
            db,
            jobs,
            queue_max,
            pool,
        })
    }

    /// Runs a read on the pool's runtime (the driver lives there).
    fn read<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> StoreFuture<T> {
        let call = self.pool.call(f);
        Box::pin(async move { call.await? })
    }

    fn colls(&self) -> Colls {
        Colls::new(&self.db)
    }
}

/// The one task that writes.
struct Writer {
    client: Client,
    colls: Colls,
    txn: TransactionOptions,
    retry_for: Duration,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < GROUP_COMMIT_JOBS_MAX {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            let results = self.commit_with_retry(&batch).await;
            for (job, r) in batch.into_iter().zip(results) {
                let _ = job.reply.send(r);
            }
        }
        tracing::debug!("mongodb writer stopped");
    }

    /// Commits the batch, retrying while MongoDB is unreachable (up to
    /// `retry_for`); one result per job.
    async fn commit_with_retry(&self, batch: &[Job]) -> Vec<JobResult> {
        let started = tokio::time::Instant::now();
        let mut pause = RETRY_PAUSE_FIRST;
        loop {
            match self.commit(batch).await {
                Ok(results) => return results,
                Err(e) if retryable(&e) && started.elapsed() + pause < self.retry_for => {
                    tracing::warn!(error = %e, jobs = batch.len(), retry_in_ms = pause.as_millis() as u64, "MongoDB write failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_PAUSE_MAX);
                }
                Err(e) => {
                    tracing::error!(error = %e, jobs = batch.len(), "MongoDB write failed");
                    let msg = e.to_string();
                    return batch
                        .iter()
                        .map(|_| Err(StoreError::Database(msg.clone())))
                        .collect();
                }
            }
        }
    }

    /// Fast path: the whole batch in one transaction. If a job fails on its own
    /// (say, a key clash), each job is redone in a transaction of its own so that
    /// only it fails.
    async fn commit(&self, batch: &[Job]) -> Result<Vec<JobResult>, mongodb::error::Error> {
        let mut s = self.client.start_session().await?;
        s.start_transaction().with_options(self.txn.clone()).await?;
        // Every job's changes in order, applied as one run: the messages of the
        // whole batch go in with one insert_many.
        let ops: Vec<&WriteOp> = batch.iter().flat_map(|j| &j.ops).collect();
        match apply_all(&self.colls, &mut s, &ops).await {
            Ok(outcomes) => {
                commit(&mut s).await?;
                let mut outcomes = outcomes.into_iter();
                Ok(batch
                    .iter()
                    .map(|j| Ok(outcomes.by_ref().take(j.ops.len()).collect()))
                    .collect())
            }
            Err(e) => {
                let _ = s.abort_transaction().await;
                if retryable(&e) {
                    return Err(e);
                }
                self.commit_each(batch).await
            }
        }
    }

    async fn commit_each(&self, batch: &[Job]) -> Result<Vec<JobResult>, mongodb::error::Error> {
        let mut results = Vec::with_capacity(batch.len());
        for job in batch {
            let mut s = self.client.start_session().await?;
            s.start_transaction().with_options(self.txn.clone()).await?;
            let ops: Vec<&WriteOp> = job.ops.iter().collect();
            match apply_all(&self.colls, &mut s, &ops).await {
                Ok(outcomes) => {
                    commit(&mut s).await?;
                    results.push(Ok(outcomes));
                }
                Err(e) if retryable(&e) => return Err(e),
                Err(e) => {
                    let _ = s.abort_transaction().await;
                    results.push(Err(db_err(e)));
                }
            }
        }
        Ok(results)
    }
}

/// Commits, retrying a commit whose result is unknown (the driver's advice).
async fn commit(s: &mut ClientSession) -> Result<(), mongodb::error::Error> {
    let mut tries = 1;
    loop {
        match s.commit_transaction().await {
            // Bounded: with MongoDB gone every try fails alike, and the error must
            // reach the batch's retry loop, which has the deadline.
            Err(e)
                if e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT)
                    && tries < COMMIT_TRIES_MAX =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}

/// Errors that mean "MongoDB is not there right now", not "this write is wrong".
fn retryable(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
        || e.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
        || matches!(
            *e.kind,
            ErrorKind::Io(_)
                | ErrorKind::ServerSelection { .. }
                | ErrorKind::ConnectionPoolCleared { .. }
        )
}

/// Applies `ops` in order. Consecutive appends are applied together: one query for
/// resent client ids, one `insert_many`, one counter update per session.
async fn apply_all(
    c: &Colls,
    s: &mut ClientSession,
    ops: &[&WriteOp],
) -> Result<Vec<WriteOutcome>, mongodb::error::Error> {
    let mut out = Vec::with_capacity(ops.len());
    let mut i = 0;
    while i < ops.len() {
        let run = ops[i..]
            .iter()
            .take_while(|op| matches!(op, WriteOp::AppendMessage { .. }))
            .count();
        if run == 0 {
            out.push(apply(c, s, ops[i]).await?);
            i += 1;
        } else {
            out.extend(append_many(c, s, &ops[i..i + run]).await?);
            i += run;
        }
    }
    Ok(out)
}

/// Per session: messages added, tokens in, tokens out, latest time.
type Counters<'a> = Vec<(&'a str, i64, i64, i64, Millis)>;

/// A run of `AppendMessage` ops (others are ignored).
async fn append_many(
    c: &Colls,
    s: &mut ClientSession,
    ops: &[&WriteOp],
) -> Result<Vec<WriteOutcome>, mongodb::error::Error> {
    let appends: Vec<(&String, &MessageRecord)> = ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::AppendMessage { user_id, message } => Some((user_id, message)),
            _ => None,
        })
        .collect();
    // Client ids already stored (a resend is answered with the original).
    let keyed: Vec<Document> = appends
        .iter()
        .filter_map(|(u, m)| {
            Some(doc! {"user_id": u.as_str(), "client_id": m.client_id.as_deref()?})
        })
        .collect();
    let mut known: std::collections::HashMap<(String, String), (String, String)> =
        Default::default();
    if !keyed.is_empty() {
        let mut found = c
            .messages
            .find(doc! {"$or": keyed})
            .projection(doc! {"session_id": 1, "user_id": 1, "client_id": 1})
            .session(&mut *s)
            .await?;
        while let Some(d) = found.next(&mut *s).await.transpose()? {
            let get = |k: &str| d.get_str(k).unwrap_or_default().to_owned();
            known.insert(
                (get("user_id"), get("client_id")),
                (get("_id"), get("session_id")),
            );
        }
    }
    let mut outcomes = Vec::with_capacity(appends.len());
    let mut docs = Vec::new();
    let mut counters: Counters = Vec::new();
    for (user_id, m) in appends {
        if let Some(cid) = &m.client_id {
            let key = (user_id.clone(), cid.clone());
            if let Some((message_id, session_id)) = known.get(&key) {
                outcomes.push(WriteOutcome::Duplicate {
                    message_id: message_id.clone(),
                    session_id: session_id.clone(),
                });
                continue;
            }
            // A later resend of it within this run is a duplicate of this one.
            known.insert(key, (m.message_id.clone(), m.session_id.clone()));
        }
        docs.push(message_doc(user_id, m));
        let (tin, tout) = (i64_of(m.tokens_in), i64_of(m.tokens_out));
        match counters.iter_mut().find(|x| x.0 == m.session_id) {
            Some(x) => {
                x.1 += 1;
                x.2 += tin;
                x.3 += tout;
                x.4 = x.4.max(m.created_at);
            }
            None => counters.push((&m.session_id, 1, tin, tout, m.created_at)),
        }
        outcomes.push(WriteOutcome::Done);
    }
    if !docs.is_empty() {
        c.messages.insert_many(docs).session(&mut *s).await?;
    }
    if !counters.is_empty() {
        // Every session's counters in one `update` command (one round trip, any
        // server version), not one update_one per session.
        let updates: Vec<Document> = counters
            .into_iter()
            .map(|(sid, n, tin, tout, at)| {
                doc! {"q": {"_id": sid}, "u": {
                    "$inc": {"message_count": n, "tokens_in": tin, "tokens_out": tout,
                             "total_tokens": tin + tout},
                    "$max": {"last_activity": at},
                }}
            })
            .collect();
        let reply = c
            .db
            .run_command(doc! {"update": c.sessions.name(), "updates": updates, "ordered": true})
            .session(&mut *s)
            .await?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            return Err(mongodb::error::Error::custom(format!(
                "updating session counters: {errors:?}"
            )));
        }
    }
    Ok(outcomes)
}

fn message_doc(user_id: &str, m: &MessageRecord) -> Document {
    let mut d = doc! {
        "_id": &m.message_id, "session_id": &m.session_id, "seq": i64_of(m.seq),
        "role": m.role.as_str(), "author": &m.author, "user_id": user_id,
        "key_id": i64::from(m.sealed.key_id), "nonce": binary(&m.sealed.nonce),
        "ciphertext": binary(&m.sealed.ciphertext), "created_at": m.created_at,
        "tokens_in": i64_of(m.tokens_in), "tokens_out": i64_of(m.tokens_out),
        "cancelled": m.cancelled,
    };
    if let Some(client_id) = &m.client_id {
        d.insert("client_id", client_id);
    }
    d
}

fn binary(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    })
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn apply(
    c: &Colls,
    s: &mut ClientSession,
    op: &WriteOp,
) -> Result<WriteOutcome, mongodb::error::Error> {
    match op {
        WriteOp::CreateSession(r) => {
            c.sessions
                .update_one(
                    doc! {"_id": &r.id},
                    doc! {"$setOnInsert": {
                        "user_id": &r.user_id, "created_at": r.created_at,
                        "last_activity": r.last_activity, "state": &r.state,
                        "message_count": 0i64, "tokens_in": 0i64, "tokens_out": 0i64,
                        "total_tokens": 0i64, "end_key": 0i64, "ended_at": Bson::Null,
                    }},
                )
                .upsert(true)
                .session(&mut *s)
                .await?;
        }
        // `apply_all` sends runs of appends to `append_many` directly; this arm keeps
        // `apply` whole for any other caller.
        WriteOp::AppendMessage { .. } => {
            let outcomes = append_many(c, s, &[op]).await?;
            return Ok(outcomes.into_iter().next().unwrap_or(WriteOutcome::Done));
        }
        WriteOp::SetState {
            session_id,
            state,
            actor,
            action,
            at,
        } => {
            let mut set = doc! {"state": *state};
            if *state == "ended" {
                set.insert("ended_at", *at);
                set.insert("end_key", *at);
            }
            c.sessions
                .update_one(
                    doc! {"_id": session_id},
                    doc! {"$set": set, "$max": {"last_activity": *at}},
                )
                .session(&mut *s)
                .await?;
            c.events
                .insert_one(doc! {"session_id": session_id, "at": *at, "actor": actor,
                "action": *action, "state": *state})
                .session(&mut *s)
                .await?;
        }
        WriteOp::DeleteUser { user_id } => {
            let ids: Vec<String> = c
                .sessions
                .find(doc! {"user_id": user_id})
                .projection(doc! {"_id": 1})
                .session(&mut *s)
                .await?
                .stream(&mut *s)
                .try_collect::<Vec<Document>>()
                .await?
                .into_iter()
                .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
                .collect();
            c.events
                .delete_many(doc! {"session_id": {"$in": &ids}})
                .session(&mut *s)
                .await?;
            c.messages
                .delete_many(doc! {"user_id": user_id})
                .session(&mut *s)
                .await?;
            c.sessions
                .delete_many(doc! {"user_id": user_id})
                .session(&mut *s)
                .await?;
        }
        WriteOp::Enqueue { kind, payload, at } => {
            let counter = c
                .counters
                .find_one_and_update(doc! {"_id": "outbox"}, doc! {"$inc": {"seq": 1i64}})
                .upsert(true)
                .return_document(ReturnDocument::After)
                .session(&mut *s)
                .await?;
            let id = counter.and_then(|d| d.get_i64("seq").ok()).unwrap_or(1);
            c.outbox
                .insert_one(
                    doc! {"_id": id, "kind": kind, "payload": payload, "state": "pending",
                    "attempts": 0i64, "next_at": *at, "created_at": *at},
                )
                .session(&mut *s)
                .await?;
        }
        WriteOp::Delivered { id, at } => {
            c.outbox
                .update_one(
                    doc! {"_id": *id},
                    doc! {"$set": {"state": "delivered", "delivered_at": *at}, "$inc": {"attempts": 1i64}},
                )
                .session(&mut *s)
                .await?;
        }
        WriteOp::DeliveryFailed {
            id,
            error,
            next_at,
            dead,
        } => {
            let state = if *dead { "dead" } else { "pending" };
            c.outbox
                .update_one(
                    doc! {"_id": *id},
                    doc! {"$set": {"last_error": error, "next_at": *next_at, "state": state},
                    "$inc": {"attempts": 1i64}},
                )
                .session(&mut *s)
                .await?;
        }
    }
    Ok(WriteOutcome::Done)
}

/// The fields a session list needs (explicit projection).
/// Runs a query and collects every document it returns.
async fn collect(
    query: impl std::future::IntoFuture<Output = mongodb::error::Result<mongodb::Cursor<Document>>>,
) -> Result<Vec<Document>, StoreError> {
    query
        .await
        .map_err(db_err)?
        .try_collect()
        .await
        .map_err(db_err)
}

fn session_projection() -> Document {
    doc! {"user_id": 1, "created_at": 1, "last_activity": 1, "state": 1, "message_count": 1,
    "tokens_in": 1, "tokens_out": 1, "ended_at": 1}
}

fn get_i64(d: &Document, k: &str) -> i64 {
    match d.get(k) {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Double(v)) => *v as i64,
        _ => 0,
    }
}

fn session_from(d: &Document) -> SessionRecord {
    SessionRecord {
        id: text(d, "_id"),
        user_id: text(d, "user_id"),
        created_at: get_i64(d, "created_at"),
        last_activity: get_i64(d, "last_activity"),
        state: d.get_str("state").unwrap_or("ai").to_owned(),
        message_count: get_i64(d, "message_count").max(0) as u64,
        tokens_in: get_i64(d, "tokens_in").max(0) as u64,
        tokens_out: get_i64(d, "tokens_out").max(0) as u64,
        ended_at: match d.get("ended_at") {
            Some(Bson::Int64(v)) => Some(*v),
            _ => None,
        },
    }
}

/// A string field, empty when absent (the schema requires it; a corrupt document
/// then fails where it is used, not here).
fn text(d: &Document, k: &str) -> String {
    d.get_str(k).unwrap_or_default().to_owned()
}

fn bytes_of(d: &Document, k: &str) -> Vec<u8> {
    match d.get(k) {
        Some(Bson::Binary(b)) => b.bytes.clone(),
        _ => Vec::new(),
    }
}

fn message_from(d: &Document) -> MessageRecord {
    let nonce = bytes_of(d, "nonce");
    MessageRecord {
        session_id: text(d, "session_id"),
        message_id: text(d, "_id"),
        seq: get_i64(d, "seq").max(0) as u64,
        // An unknown role or a malformed nonce is corruption: it will fail to open.
        role: Role::parse(d.get_str("role").unwrap_or_default()).unwrap_or(Role::System),
        author: text(d, "author"),
        client_id: d.get_str("client_id").ok().map(str::to_owned),
        sealed: Sealed {
            key_id: u32::try_from(get_i64(d, "key_id")).unwrap_or(0),
            nonce: nonce.as_slice().try_into().unwrap_or([0u8; NONCE_BYTES]),
            ciphertext: bytes_of(d, "ciphertext"),
        },
        created_at: get_i64(d, "created_at"),
        tokens_in: get_i64(d, "tokens_in").max(0) as u64,
        tokens_out: get_i64(d, "tokens_out").max(0) as u64,
        cancelled: d.get_bool("cancelled").unwrap_or(false),
    }
}

/// The admin filters as a typed document (values only, never operators).
fn session_filter(
    user_id: &Option<String>,
    state: &Option<String>,
    from: Option<Millis>,
    to: Option<Millis>,
) -> Document {
    let mut f = doc! {};
    if let Some(u) = user_id {
        f.insert("user_id", u.as_str());
    }
    if let Some(st) = state {
        f.insert("state", st.as_str());
    }
    let mut created = doc! {};
    if let Some(v) = from {
        created.insert("$gte", v);
    }
    if let Some(v) = to {
        created.insert("$lt", v);
    }
    if !created.is_empty() {
        f.insert("created_at", created);
    }
    f
}

/// The stored field each sort key orders by, written out per key.
fn sort_field(by: SortBy) -> &'static str {
    match by {
        SortBy::StartTime => "created_at",
        SortBy::EndTime => "end_key",
        SortBy::MessageCount => "message_count",
        SortBy::TotalTokens => "total_tokens",
        SortBy::UserId => "user_id",
    }
}

async fn list(c: Colls, q: SessionQuery) -> Result<SessionPage, StoreError> {
    let key = sort_field(q.sort_by);
    let mut filter = session_filter(&q.user_id, &q.state, q.from, q.to);
    let (dir, cmp) = if q.descending {
        (-1, "$lt")
    } else {
        (1, "$gt")
    };
    if let Some((k, id)) = &q.after {
        let k = match k {
            CursorKey::Int(i) => Bson::Int64(*i),
            CursorKey::Text(t) => Bson::String(t.clone()),
        };
        // (key, id) after the cursor: key beyond it, or the same key and id beyond.
        filter.insert(
            "$or",
            vec![
                Bson::Document(doc! {key: {cmp: k.clone()}}),
                Bson::Document(doc! {key: k, "_id": {cmp: id.as_str()}}),
            ],
        );
    }
    let docs: Vec<Document> = collect(
        c.sessions
            .find(filter)
            .projection(session_projection())
            .sort(doc! {key: dir, "_id": dir})
            .limit(i64_of(q.limit as u64 + 1)),
    )
    .await?;
    let mut sessions: Vec<SessionRecord> = docs.iter().map(session_from).collect();
    let next = if sessions.len() > q.limit {
        sessions.truncate(q.limit);
        sessions.last().map(|s| (q.sort_by.key_of(s), s.id.clone()))
    } else {
        None
    };
    Ok(SessionPage { sessions, next })
}

async fn load(c: Colls, id: String, messages_max: usize) -> Result<Option<Loaded>, StoreError> {
    let Some(session) = c
        .sessions
        .find_one(doc! {"_id": &id})
        .projection(session_projection())
        .await
        .map_err(db_err)?
    else {
        return Ok(None);
    };
    let mut messages: Vec<MessageRecord> = collect(
        c.messages
            .find(doc! {"session_id": &id})
            .sort(doc! {"seq": -1})
            .limit(i64_of(messages_max as u64)),
    )
    .await?
    .iter()
    .map(message_from)
    .collect();
    messages.reverse();
    Ok(Some((session_from(&session), messages)))
}

/// Totals over every session started in the window. Counts are aggregations over
/// all matching documents (`$group`), never over a page; response times walk the
/// matching messages in order, projected to role and time only.
async fn window(
    c: Colls,
    from: Option<Millis>,
    to: Option<Millis>,
) -> Result<WindowMetrics, StoreError> {
    let mut m = WindowMetrics::default();
    let scope = session_filter(&None, &None, from, to);
    let ids: Vec<Bson> = collect(c.sessions.find(scope.clone()).projection(doc! {"_id": 1}))
        .await?
        .into_iter()
        .filter_map(|d| d.get("_id").cloned())
        .collect();
    let group = |c: &Collection<Document>, pipeline: Vec<Document>| {
        let c = c.clone();
        async move {
            let out: Vec<Document> = c
                .aggregate(pipeline)
                .await
                .map_err(db_err)?
                .try_collect()
                .await
                .map_err(db_err)?;
            Ok::<_, StoreError>(out.into_iter().next().unwrap_or_default())
        }
    };
    let count = |d: &Document, k: &str| get_i64(d, k).max(0) as u64;
    let s = group(
        &c.sessions,
        vec![
            doc! {"$match": scope},
            doc! {"$group": {"_id": Bson::Null, "n": {"$sum": 1}, "tin": {"$sum": "$tokens_in"},
            "tout": {"$sum": "$tokens_out"}}},
        ],
    )
    .await?;
    (m.sessions, m.tokens_in, m.tokens_out) = (count(&s, "n"), count(&s, "tin"), count(&s, "tout"));
    let role = |r: &str| doc! {"$sum": {"$cond": [{"$eq": ["$role", r]}, 1, 0]}};
    let msgs = group(
        &c.messages,
        vec![
            doc! {"$match": {"session_id": {"$in": &ids}}},
            doc! {"$group": {"_id": Bson::Null, "n": {"$sum": 1}, "user": role("user"),
            "assistant": role("assistant"), "admin": role("admin")}},
        ],
    )
    .await?;
    m.messages = count(&msgs, "n");
    m.user_messages = count(&msgs, "user");
    m.assistant_messages = count(&msgs, "assistant");
    m.admin_messages = count(&msgs, "admin");
    let action = |a: &str| doc! {"$sum": {"$cond": [{"$eq": ["$action", a]}, 1, 0]}};
    let ev = group(
        &c.events,
        vec![
            doc! {"$match": {"session_id": {"$in": &ids}}},
            doc! {"$group": {"_id": Bson::Null, "joins": action("admin_join"),
            "help": action("help_request")}},
        ],
    )
    .await?;
    (m.takeovers, m.help_requests) = (count(&ev, "joins"), count(&ev, "help"));
    // A reply (assistant or admin) right after a user message, per session in order.
    let mut cursor = c
        .messages
        .find(doc! {"session_id": {"$in": &ids}})
        .projection(doc! {"session_id": 1, "role": 1, "created_at": 1, "_id": 0})
        .sort(doc! {"session_id": 1, "seq": 1})
        .await
        .map_err(db_err)?;
    let (mut prev, mut sum, mut max): (Option<(String, bool, i64)>, i64, Option<i64>) =
        (None, 0, None);
    while let Some(d) = cursor.try_next().await.map_err(db_err)? {
        let sid = d.get_str("session_id").unwrap_or_default();
        let role = d.get_str("role").unwrap_or_default();
        let at = get_i64(&d, "created_at");
        if let Some((psid, was_user, pat)) = &prev {
            if psid == sid && *was_user && (role == "assistant" || role == "admin") {
                m.responses += 1;
                sum += at - pat;
                max = Some(max.map_or(at - pat, |x: i64| x.max(at - pat)));
            }
        }
        prev = Some((sid.to_owned(), role == "user", at));
    }
    if m.responses > 0 {
        m.response_ms_avg = Some(sum as f64 / m.responses as f64);
        m.response_ms_max = max;
    }
    Ok(m)
}

impl Store for MongoStore {
    fn write(&self, ops: Vec<WriteOp>) -> StoreFuture<Vec<WriteOutcome>> {
        let (reply, rx) = oneshot::channel();
        let sent = self.jobs.try_send(Job { ops, reply });
        let queue_max = self.queue_max;
        Box::pin(async move {
            match sent {
                Ok(()) => rx.await.map_err(|_| StoreError::Stopped)?,
                Err(mpsc::error::TrySendError::Full(_)) => Err(StoreError::Overloaded(queue_max)),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(StoreError::Stopped),
            }
        })
    }

    fn load_session(&self, id: &str, messages_max: usize) -> StoreFuture<Option<Loaded>> {
        self.read(load(self.colls(), id.to_owned(), messages_max))
    }

    fn ping(&self) -> StoreFuture<()> {
        let db = self.db.clone();
        self.read(async move {
            db.run_command(doc! {"ping": 1}).await.map_err(db_err)?;
            Ok(())
        })
    }

    fn list_sessions(&self, query: SessionQuery) -> StoreFuture<SessionPage> {
        self.read(list(self.colls(), query))
    }

    fn session_events(&self, id: &str) -> StoreFuture<Vec<SessionEvent>> {
        let (c, id) = (self.colls(), id.to_owned());
        self.read(async move {
            let docs: Vec<Document> = collect(
                c.events
                    .find(doc! {"session_id": &id})
                    .projection(doc! {"at": 1, "actor": 1, "action": 1, "state": 1})
                    .sort(doc! {"at": 1, "_id": 1}),
            )
            .await?;
            Ok(docs
                .iter()
                .map(|d| SessionEvent {
                    at: get_i64(d, "at"),
                    actor: text(d, "actor"),
                    action: text(d, "action"),
                    state: text(d, "state"),
                })
                .collect())
        })
    }

    fn window_metrics(
        &self,
        from: Option<Millis>,
        to: Option<Millis>,
    ) -> StoreFuture<WindowMetrics> {
        self.read(window(self.colls(), from, to))
    }

    fn user_sessions(&self, user_id: &str, sessions_max: usize) -> StoreFuture<Vec<Loaded>> {
        let (c, user) = (self.colls(), user_id.to_owned());
        self.read(async move {
            let ids: Vec<String> = collect(
                c.sessions
                    .find(doc! {"user_id": &user})
                    .projection(doc! {"_id": 1})
                    .sort(doc! {"created_at": 1, "_id": 1})
                    .limit(i64_of(sessions_max as u64)),
            )
            .await?
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect();
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(l) = load(c.clone(), id, usize::MAX / 2).await? {
                    out.push(l);
                }
            }
            Ok(out)
        })
    }

    fn due_notifications(&self, now: Millis, limit: usize) -> StoreFuture<Vec<Notification>> {
        let c = self.colls();
        self.read(async move {
            let docs: Vec<Document> = collect(
                c.outbox
                    .find(doc! {"state": "pending", "next_at": {"$lte": now}})
                    .projection(doc! {"kind": 1, "payload": 1, "attempts": 1})
                    .sort(doc! {"next_at": 1, "_id": 1})
                    .limit(i64_of(limit as u64)),
            )
            .await?;
            Ok(docs
                .iter()
                .map(|d| Notification {
                    id: get_i64(d, "_id"),
                    kind: text(d, "kind"),
                    payload: text(d, "payload"),
                    attempts: u32::try_from(get_i64(d, "attempts")).unwrap_or(u32::MAX),
                })
                .collect())
        })
    }

    fn next_notification_at(&self) -> StoreFuture<Option<Millis>> {
        let c = self.colls();
        self.read(async move {
            let d = c
                .outbox
                .find_one(doc! {"state": "pending"})
                .projection(doc! {"next_at": 1})
                .sort(doc! {"next_at": 1})
                .await
                .map_err(db_err)?;
            Ok(d.map(|d| get_i64(&d, "next_at")))
        })
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
    fn filters_are_typed_values() {
        // A filter value that looks like an operator stays a plain string.
        let f = session_filter(
            &Some("{\"$ne\": 1}".into()),
            &Some("$where".into()),
            Some(1),
            None,
        );
        assert_eq!(f.get_str("user_id").unwrap(), "{\"$ne\": 1}");
        assert_eq!(f.get_str("state").unwrap(), "$where");
        assert_eq!(f.get_document("created_at").unwrap(), &doc! {"$gte": 1i64});
    }

    #[test]
    fn write_concern_names() {
        assert!(write_concern("majority").is_ok());
        assert!(write_concern("2").is_ok());
        assert!(write_concern("most").is_err());
    }
}
