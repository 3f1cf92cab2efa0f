//! The embedded store's changes as SQL: one function per kind of change, run by
//! the writer (`group`) inside its open transaction.

use rusqlite::{params, Connection};

use crate::store::writer::JobResult;
use crate::store::{AuditAction, Op, SessionState, StoreError, WriteOp, WriteOutcome};

/// Runs a transaction statement. Every statement here, savepoints included, is
/// prepared once and cached: re-parsing SQL was a third of the writer's time
/// under load.
pub(super) fn run(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    exec(conn, sql, [])
        .map(|_| ())
        .map_err(StoreError::sqlite(Op::Transaction))
}

/// Ends a failed transaction. A failed COMMIT may have ended it already.
pub(super) fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::warn!(error = %e, "SQLite rollback failed");
        }
    }
}

/// A job's changes in order, each error named by the change that failed.
pub(super) fn apply_job(conn: &Connection, ops: &[WriteOp]) -> JobResult {
    ops.iter()
        .map(|op| apply(conn, op).map_err(StoreError::sqlite(op.op())))
        .collect()
}

/// Executes a cached statement (prepared once per connection).
pub(super) fn exec(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
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

// Long: one arm per kind of change, each a statement or two; the longer ones are helpers.
fn apply(conn: &Connection, op: &WriteOp) -> Result<WriteOutcome, rusqlite::Error> {
    match op {
        // Leases fence nodes of a cluster, and a cluster needs MongoDB: one
        // process on its own file has no one to be fenced from.
        WriteOp::TakeLease { .. } | WriteOp::Fence { .. } => Ok(WriteOutcome::Leased { epoch: 0 }),
        WriteOp::RenewLeases { .. } | WriteOp::ReleaseLeases { .. } => Ok(WriteOutcome::Done),
        WriteOp::CreateSession(s) => {
            exec(conn,
                "INSERT INTO sessions (id, user_id, created_at, last_activity, state) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO NOTHING",
                params![s.id, s.user_id, s.created_at, s.last_activity, s.state.as_str()],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::AppendMessage { user_id, message } => append(conn, user_id, message),
        WriteOp::SetState {
            session_id,
            state,
            actor,
            action,
            at,
        } => {
            let changed = exec(
                conn,
                "UPDATE sessions SET state = ?2, last_activity = max(last_activity, ?3),
                     ended_at = CASE WHEN ?2 = 'ended' THEN ?3 ELSE ended_at END
                 WHERE id = ?1 AND state != 'ended'",
                params![session_id, state.as_str(), at],
            )?;
            if changed == 0 {
                // Ended stays ended (a change racing an admin's end is dropped);
                // a session that is not there at all is refused.
                let ended = conn
                    .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
                    .exists(params![session_id])?;
                return if ended {
                    Ok(WriteOutcome::Done)
                } else {
                    Err(session_gone(session_id))
                };
            }
            exec(
                conn,
                "INSERT INTO session_events (session_id, at, actor, action, state)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![session_id, at, actor, action.as_str(), state.as_str()],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::EndIdle {
            session_id,
            idle_before,
            at,
        } => end_idle(conn, session_id, *idle_before, *at),
        WriteOp::PurgeOutbox {
            delivered_before,
            dead_before,
        } => {
            exec(
                conn,
                "DELETE FROM outbox WHERE (state = 'delivered' AND delivered_at < ?1)
                    OR (state = 'dead' AND created_at < ?2)",
                params![delivered_before, dead_before],
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
            delete_user(conn, user_id)?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::DropEmptySession { session_id } => {
            exec(
                conn,
                "DELETE FROM sessions WHERE id = ?1 AND message_count = 0",
                params![session_id],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::SetContent {
            session_id,
            message_id,
            sealed,
        } => {
            exec(
                conn,
                "UPDATE messages SET key_id = ?3, nonce = ?4, ciphertext = ?5, aad_version = ?6
                 WHERE session_id = ?1 AND message_id = ?2",
                params![
                    session_id,
                    message_id,
                    sealed.key_id,
                    &sealed.nonce[..],
                    sealed.ciphertext,
                    sealed.version
                ],
            )?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::PutFile(f) => {
            exec(
                conn,
                "INSERT INTO files (file_id, owner, mime, size, sha256, name, created_at, key_id, location)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    f.file_id,
                    f.owner,
                    f.mime,
                    i64::try_from(f.size).unwrap_or(i64::MAX),
                    f.sha256,
                    f.name,
                    f.created_at,
                    f.key_id,
                    f.location
                ],
            )?;
            Ok(WriteOutcome::Done)
        }
    }
}

/// Ends a session idle since before `idle_before` unless it ended already; the
/// audit event is written only when the update matched.
fn end_idle(
    conn: &Connection,
    session_id: &str,
    idle_before: i64,
    at: i64,
) -> Result<WriteOutcome, rusqlite::Error> {
    let ended = exec(
        conn,
        "UPDATE sessions SET state = 'ended', ended_at = ?3
         WHERE id = ?1 AND state != 'ended' AND last_activity < ?2",
        params![session_id, idle_before, at],
    )?;
    if ended == 1 {
        let action = AuditAction::EndedIdle.as_str();
        exec(
            conn,
            "INSERT INTO session_events (session_id, at, actor, action, state)
             VALUES (?1, ?2, '', ?3, ?4)",
            params![session_id, at, action, SessionState::Ended.as_str()],
        )?;
    }
    Ok(WriteOutcome::Done)
}

/// A message and its session's counters; a resent client id is answered with
/// where it was stored the first time, and changes nothing.
fn append(
    conn: &Connection,
    user_id: &str,
    m: &crate::store::MessageRecord,
) -> rusqlite::Result<WriteOutcome> {
    let inserted = exec(conn,
        "INSERT INTO messages (session_id, seq, message_id, role, author, user_id, client_id, key_id,
             nonce, ciphertext, created_at, tokens_in, tokens_out, cancelled, aad_version, file, extra)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
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
            m.sealed.version,
            m.file.as_ref().map(crate::store::FileRef::to_json),
            m.extra,
        ],
    )?;
    if inserted == 0 {
        let (message_id, session_id) = query_one(
            conn,
            "SELECT message_id, session_id FROM messages WHERE user_id = ?1 AND client_id = ?2",
            params![user_id, m.client_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        return Ok(WriteOutcome::Duplicate {
            message_id,
            session_id,
        });
    }
    let counted = exec(
        conn,
        "UPDATE sessions SET message_count = message_count + 1, tokens_in = tokens_in + ?2,
             tokens_out = tokens_out + ?3, last_activity = max(last_activity, ?4) WHERE id = ?1",
        params![
            m.session_id,
            m.tokens_in as i64,
            m.tokens_out as i64,
            m.created_at
        ],
    )?;
    if counted == 0 {
        // The job fails and its savepoint (or transaction) takes the message back.
        return Err(session_gone(&m.session_id));
    }
    Ok(WriteOutcome::Done)
}

/// Everything stored for a user: audit trails, messages, sessions.
fn delete_user(conn: &Connection, user_id: &str) -> rusqlite::Result<()> {
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
    exec(conn, "DELETE FROM files WHERE owner = ?1", params![user_id])?;
    scrub_outbox(conn, user_id)
}

/// The user's traces in the notification outbox: notifications not sent yet are
/// dropped (they would announce a deleted user), sent and dead ones keep their
/// row (delivery counts, errors) with the ids and the name replaced. A payload
/// that is not JSON names no user and is left alone.
fn scrub_outbox(conn: &Connection, user_id: &str) -> rusqlite::Result<()> {
    const THEIRS: &str =
        "CASE WHEN json_valid(payload) THEN json_extract(payload, '$.user_id') END = ?1";
    exec(
        conn,
        &format!("DELETE FROM outbox WHERE state = 'pending' AND {THEIRS}"),
        params![user_id],
    )?;
    exec(
        conn,
        &format!(
            "UPDATE outbox SET payload = json_set(payload, '$.user_id', ?2, '$.user_name', ?2,
                 '$.session_id', ?2) WHERE {THEIRS}"
        ),
        params![user_id, crate::store::SCRUBBED],
    )?;
    Ok(())
}

/// A change to a session that is not stored (any more: its user was deleted while
/// the change was queued) is refused, so a late write cannot bring back rows of a
/// deleted user.
fn session_gone(session_id: &str) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY),
        Some(format!("session {session_id} is not stored (deleted?)")),
    )
}
