//! MongoDB's side of the shared writer: a batch in one transaction (acknowledged
//! with the configured write concern), a transaction per job when a batch is
//! redone, and retries with backoff while MongoDB is unreachable, for up to
//! `mongo_write_retry_secs`.

use std::future::Future;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use mongodb::options::{ReturnDocument, TransactionOptions};
use mongodb::{Client, ClientSession};

use super::{i64_of, Colls};
use crate::store::writer::{Commit, Failure, JobResult};
use crate::store::{
    AuditAction, MessageRecord, Millis, Op, SessionState, StoreError, WriteOp, WriteOutcome,
};

/// First pause before retrying a batch that failed for lack of MongoDB; doubles
/// up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);
/// Times a commit with an unknown result is tried before the batch is retried.
const COMMIT_TRIES_MAX: u32 = 3;

/// What the shared writer commits through, on the pool's runtime.
pub(super) struct MongoWriter {
    pub(super) client: Client,
    pub(super) colls: Colls,
    pub(super) txn: TransactionOptions,
    /// How long a batch is retried while MongoDB is unreachable.
    pub(super) retry_for: Duration,
}

impl MongoWriter {
    /// A session in a transaction, ready for changes.
    async fn begin(&self) -> Result<ClientSession, StoreError> {
        let mut s = self
            .client
            .start_session()
            .await
            .map_err(StoreError::mongo(Op::Transaction))?;
        s.start_transaction()
            .with_options(self.txn.clone())
            .await
            .map_err(StoreError::mongo(Op::Transaction))?;
        Ok(s)
    }

    /// Every job's changes in order, applied as one run (the messages of the
    /// whole batch go in with one `insert_many`), in one transaction.
    async fn batch(&self, jobs: &[&[WriteOp]]) -> Result<Vec<Vec<WriteOutcome>>, Failure> {
        let mut s = self.begin().await.map_err(Failure::Failed)?;
        let ops: Vec<&WriteOp> = jobs.iter().flat_map(|j| j.iter()).collect();
        match apply_all(&self.colls, &mut s, &ops).await {
            Ok(outcomes) => {
                commit(&mut s)
                    .await
                    .map_err(|e| Failure::Failed(StoreError::mongo(Op::Transaction)(e)))?;
                let mut outcomes = outcomes.into_iter();
                Ok(jobs
                    .iter()
                    .map(|j| outcomes.by_ref().take(j.len()).collect())
                    .collect())
            }
            Err(e) => {
                let _ = s.abort_transaction().await;
                Err(if unreachable(&e) {
                    Failure::Failed(e)
                } else {
                    Failure::Refused(e)
                })
            }
        }
    }

    /// A transaction per job: a job whose changes are refused fails alone.
    async fn each(
        &self,
        jobs: &[&[WriteOp]],
        settled: &mut Vec<JobResult>,
    ) -> Result<(), StoreError> {
        for job in jobs {
            let mut s = self.begin().await?;
            let ops: Vec<&WriteOp> = job.iter().collect();
            match apply_all(&self.colls, &mut s, &ops).await {
                Ok(outcomes) => {
                    commit(&mut s)
                        .await
                        .map_err(StoreError::mongo(Op::Transaction))?;
                    settled.push(Ok(outcomes));
                }
                Err(e) => {
                    let _ = s.abort_transaction().await;
                    if unreachable(&e) {
                        return Err(e);
                    }
                    settled.push(Err(e));
                }
            }
        }
        Ok(())
    }
}

impl Commit for MongoWriter {
    fn commit_batch(
        &mut self,
        jobs: &[&[WriteOp]],
    ) -> impl Future<Output = Result<Vec<Vec<WriteOutcome>>, Failure>> + Send {
        self.batch(jobs)
    }

    fn commit_each(
        &mut self,
        jobs: &[&[WriteOp]],
        settled: &mut Vec<JobResult>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.each(jobs, settled)
    }

    /// Retries while MongoDB is unreachable, pausing 50 ms, 100 ms, ... up to
    /// 2 s, until `retry_for` would pass; anything else fails at once.
    fn retry_pause(&self, error: &StoreError, tries: u32, waited: Duration) -> Option<Duration> {
        let doubled = RETRY_PAUSE_FIRST.saturating_mul(1 << tries.saturating_sub(1).min(16));
        let pause = doubled.min(RETRY_PAUSE_MAX);
        (unreachable(error) && waited + pause < self.retry_for).then_some(pause)
    }
}

/// Whether `e` means "MongoDB is not there right now", not "this write is wrong".
fn unreachable(e: &StoreError) -> bool {
    matches!(e, StoreError::Mongo { source, .. } if retryable(source))
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
/// Errors are named by the change that failed.
async fn apply_all(
    c: &Colls,
    s: &mut ClientSession,
    ops: &[&WriteOp],
) -> Result<Vec<WriteOutcome>, StoreError> {
    let mut out = Vec::with_capacity(ops.len());
    let mut i = 0;
    while i < ops.len() {
        let run = ops[i..]
            .iter()
            .take_while(|op| matches!(op, WriteOp::AppendMessage { .. }))
            .count();
        if let Some(leased) = super::lease::apply(c, s, ops[i]).await {
            out.push(leased?);
            i += 1;
        } else if run == 0 {
            let outcome = apply(c, s, ops[i]).await;
            out.push(outcome.map_err(StoreError::mongo(ops[i].op()))?);
            i += 1;
        } else {
            let outcomes = append_many(c, s, &ops[i..i + run]).await;
            out.extend(outcomes.map_err(StoreError::mongo(Op::AppendMessage))?);
            i += run;
        }
    }
    Ok(out)
}

/// Per session: messages added, tokens in, tokens out, latest time.
type Counters<'a> = Vec<(&'a str, i64, i64, i64, Millis)>;

/// (user, client id) -> (message id, session id) of messages stored already.
type ClientIds = std::collections::HashMap<(String, String), (String, String)>;

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
    let mut known = stored_client_ids(c, s, &appends).await?;
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
        add_counters(c, s, counters).await?;
    }
    Ok(outcomes)
}

/// Where each (user, client id) of `appends` is stored already, if it is: a
/// resend is answered with the original.
async fn stored_client_ids(
    c: &Colls,
    s: &mut ClientSession,
    appends: &[(&String, &MessageRecord)],
) -> Result<ClientIds, mongodb::error::Error> {
    let keyed: Vec<Document> = appends
        .iter()
        .filter_map(|(u, m)| {
            Some(doc! {"user_id": u.as_str(), "client_id": m.client_id.as_deref()?})
        })
        .collect();
    let mut known = ClientIds::default();
    if keyed.is_empty() {
        return Ok(known);
    }
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
    Ok(known)
}

/// Every session's counters in one `update` command (one round trip, any
/// server version), not one update_one per session.
async fn add_counters(
    c: &Colls,
    s: &mut ClientSession,
    counters: Counters<'_>,
) -> Result<(), mongodb::error::Error> {
    let sessions = counters.len();
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
    let reply =
        c.db.run_command(doc! {"update": c.sessions.name(), "updates": updates, "ordered": true})
            .session(&mut *s)
            .await?;
    if let Ok(errors) = reply.get_array("writeErrors") {
        return Err(mongodb::error::Error::custom(format!(
            "updating session counters: {errors:?}"
        )));
    }
    // A session not stored (any more: its user was deleted while the append was
    // queued) fails the job, and its transaction takes the messages back.
    let matched = reply
        .get_i32("n")
        .map(i64::from)
        .or_else(|_| reply.get_i64("n"))
        .unwrap_or(0);
    if matched < sessions as i64 {
        return Err(session_gone("a message's"));
    }
    Ok(())
}

/// The refusal of a change to a session that is not stored (see `add_counters`).
fn session_gone(session_id: &str) -> mongodb::error::Error {
    mongodb::error::Error::custom(format!("session {session_id} is not stored (deleted?)"))
}

/// A message's sealed content as stored (read back by `mongo::read`).
fn sealed_fields(s: &crate::crypto::Sealed) -> Document {
    doc! {
        "key_id": i64::from(s.key_id), "nonce": binary(&s.nonce),
        "ciphertext": binary(&s.ciphertext), "aad_version": i32::from(s.version),
    }
}

fn message_doc(user_id: &str, m: &MessageRecord) -> Document {
    let mut d = doc! {
        "_id": &m.message_id, "session_id": &m.session_id, "seq": i64_of(m.seq),
        "role": m.role.as_str(), "author": &m.author, "user_id": user_id,
        "created_at": m.created_at,
        "tokens_in": i64_of(m.tokens_in), "tokens_out": i64_of(m.tokens_out),
        "cancelled": m.cancelled,
    };
    d.extend(sealed_fields(&m.sealed));
    if let Some(client_id) = &m.client_id {
        d.insert("client_id", client_id);
    }
    if let Some(f) = &m.file {
        let mut file = doc! {"file_id": &f.file_id, "mime": &f.mime, "size": i64_of(f.size)};
        if let Some(name) = &f.name {
            file.insert("name", name);
        }
        d.insert("file", file);
    }
    if let Some(extra) = &m.extra {
        d.insert("extra", binary(extra));
    }
    d
}

fn binary(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    })
}

/// One change that is not an append (`apply_all` batches appends).
// Long: one arm per kind of change, each a statement or two; the longer ones are helpers.
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
                        "last_activity": r.last_activity, "state": r.state.as_str(),
                        "message_count": 0i64, "tokens_in": 0i64, "tokens_out": 0i64,
                        "total_tokens": 0i64, "end_key": 0i64, "ended_at": Bson::Null,
                    }},
                )
                .upsert(true)
                .session(&mut *s)
                .await?;
        }
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
        } => set_state(c, s, session_id, *state, actor, *action, *at).await?,
        WriteOp::EndIdle {
            session_id,
            idle_before,
            at,
        } => end_idle(c, s, session_id, *idle_before, *at).await?,
        WriteOp::PurgeOutbox {
            delivered_before,
            dead_before,
        } => purge_outbox(c, s, *delivered_before, *dead_before).await?,
        WriteOp::DeleteUser { user_id } => delete_user(c, s, user_id).await?,
        WriteOp::DropEmptySession { session_id } => {
            let empty = doc! {"_id": session_id, "message_count": 0i64};
            c.sessions.delete_one(empty).session(&mut *s).await?;
        }
        WriteOp::SetContent {
            session_id,
            message_id,
            sealed,
        } => {
            let set = doc! {"$set": sealed_fields(sealed)};
            let one = doc! {"_id": message_id, "session_id": session_id};
            c.messages.update_one(one, set).session(&mut *s).await?;
        }
        WriteOp::PutFile(f) => {
            let mut d = doc! {
                "_id": &f.file_id, "owner": &f.owner, "mime": &f.mime, "size": i64_of(f.size),
                "sha256": &f.sha256, "created_at": f.created_at,
                "key_id": i64::from(f.key_id), "location": &f.location,
            };
            if let Some(name) = &f.name {
                d.insert("name", name);
            }
            c.files.insert_one(d).session(&mut *s).await?;
        }
        WriteOp::Enqueue { kind, payload, at } => enqueue(c, s, kind, payload, *at).await?,
        WriteOp::Delivered { id, at } => {
            c.outbox
                .update_one(
                    doc! {"_id": *id},
                    doc! {"$set": {"state": "delivered", "delivered_at": *at}, "$inc": {"attempts": 1i64}},
                )
                .session(&mut *s)
                .await?;
        }
        // Applied by `lease::apply` before they reach here.
        WriteOp::TakeLease { .. }
        | WriteOp::Fence { .. }
        | WriteOp::RenewLeases { .. }
        | WriteOp::ReleaseLeases { .. } => {}
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

/// A session's new state, and who made it so in its audit trail.
async fn set_state(
    c: &Colls,
    s: &mut ClientSession,
    session_id: &str,
    state: SessionState,
    actor: &str,
    action: AuditAction,
    at: Millis,
) -> Result<(), mongodb::error::Error> {
    let mut set = doc! {"state": state.as_str()};
    if state == SessionState::Ended {
        set.insert("ended_at", at);
        set.insert("end_key", at);
    }
    let updated = c
        .sessions
        .update_one(
            doc! {"_id": session_id, "state": {"$ne": "ended"}},
            doc! {"$set": set, "$max": {"last_activity": at}},
        )
        .session(&mut *s)
        .await?;
    if updated.matched_count == 0 {
        // Ended stays ended (a change racing an admin's end is dropped); a
        // session that is not there at all is refused.
        let found = c
            .sessions
            .find_one(doc! {"_id": session_id})
            .session(&mut *s)
            .await?;
        return found.map(|_| ()).ok_or_else(|| session_gone(session_id));
    }
    c.events
        .insert_one(doc! {"session_id": session_id, "at": at, "actor": actor,
        "action": action.as_str(), "state": state.as_str()})
        .session(&mut *s)
        .await?;
    Ok(())
}

/// Ends a session idle since before `idle_before` unless it ended already; the
/// audit event is written only when this update matched.
async fn end_idle(
    c: &Colls,
    s: &mut ClientSession,
    session_id: &str,
    idle_before: Millis,
    at: Millis,
) -> Result<(), mongodb::error::Error> {
    let ended = SessionState::Ended.as_str();
    let r = c
        .sessions
        .update_one(
            doc! {"_id": session_id, "state": {"$ne": ended}, "last_activity": {"$lt": idle_before}},
            doc! {"$set": {"state": ended, "ended_at": at, "end_key": at}},
        )
        .session(&mut *s)
        .await?;
    if r.modified_count == 1 {
        c.events
            .insert_one(doc! {"session_id": session_id, "at": at, "actor": "",
            "action": AuditAction::EndedIdle.as_str(), "state": ended})
            .session(&mut *s)
            .await?;
    }
    Ok(())
}

/// Retention: delivered rows delivered before `delivered_before`, dead letters
/// queued before `dead_before`; pending rows stay.
async fn purge_outbox(
    c: &Colls,
    s: &mut ClientSession,
    delivered_before: Millis,
    dead_before: Millis,
) -> Result<(), mongodb::error::Error> {
    c.outbox
        .delete_many(doc! {"$or": [
            {"state": "delivered", "delivered_at": {"$lt": delivered_before}},
            {"state": "dead", "created_at": {"$lt": dead_before}},
        ]})
        .session(&mut *s)
        .await?;
    Ok(())
}

/// Everything stored for a user: audit trails, messages, sessions.
async fn delete_user(
    c: &Colls,
    s: &mut ClientSession,
    user_id: &str,
) -> Result<(), mongodb::error::Error> {
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
    c.files
        .delete_many(doc! {"owner": user_id})
        .session(&mut *s)
        .await?;
    scrub_outbox(c, s, user_id).await
}

/// The user's traces in the notification outbox, as the embedded store scrubs
/// them: pending notifications dropped, sent and dead ones with their ids and name
/// replaced. Payloads are JSON strings, so candidates are found by the user id's
/// JSON text and confirmed by parsing.
async fn scrub_outbox(
    c: &Colls,
    s: &mut ClientSession,
    user_id: &str,
) -> Result<(), mongodb::error::Error> {
    let quoted = serde_json::to_string(user_id).unwrap_or_default();
    let pattern = format!("\"user_id\":{}", regex_escape(&quoted));
    let mut found = c
        .outbox
        .find(doc! {"payload": {"$regex": pattern}})
        .projection(doc! {"_id": 1, "payload": 1, "state": 1})
        .session(&mut *s)
        .await?;
    let mut pending = Vec::new();
    let mut scrubbed = Vec::new();
    while let Some(d) = found.next(&mut *s).await.transpose()? {
        let Ok(mut payload) =
            serde_json::from_str::<serde_json::Value>(d.get_str("payload").unwrap_or_default())
        else {
            continue;
        };
        if payload["user_id"].as_str() != Some(user_id) {
            continue;
        }
        let id = d.get("_id").cloned().unwrap_or(Bson::Null);
        if d.get_str("state") == Ok("pending") {
            pending.push(id);
        } else {
            for field in ["user_id", "user_name", "session_id"] {
                payload[field] = crate::store::SCRUBBED.into();
            }
            scrubbed.push((id, payload.to_string()));
        }
    }
    if !pending.is_empty() {
        c.outbox
            .delete_many(doc! {"_id": {"$in": pending}})
            .session(&mut *s)
            .await?;
    }
    for (id, payload) in scrubbed {
        c.outbox
            .update_one(doc! {"_id": id}, doc! {"$set": {"payload": payload}})
            .session(&mut *s)
            .await?;
    }
    Ok(())
}

/// `text` matched literally by a MongoDB (PCRE) regular expression.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for ch in text.chars() {
        if "\\^$.|?*+()[]{}".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// A notification in the outbox, numbered by a counter (ids only grow, as
/// SQLite's AUTOINCREMENT).
async fn enqueue(
    c: &Colls,
    s: &mut ClientSession,
    kind: &str,
    payload: &str,
    at: Millis,
) -> Result<(), mongodb::error::Error> {
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
            "attempts": 0i64, "next_at": at, "created_at": at},
        )
        .session(&mut *s)
        .await?;
    Ok(())
}
