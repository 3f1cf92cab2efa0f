//! The embedded store's reads: sessions with their messages, the admin list and
//! window metrics, audit trails and the notification outbox. Each runs on a read
//! connection of its own (see `SqliteStore::read`); errors are named there.

use rusqlite::{params, Connection, OptionalExtension};

use crate::crypto::{Sealed, NONCE_BYTES};
use crate::store::{
    CursorKey, FileRecord, FileRef, Loaded, MessageRecord, Millis, Notification, Role,
    SessionEvent, SessionPage, SessionQuery, SessionRecord, SessionState, SortBy, WindowMetrics,
};

/// The columns [`session_row`] reads, in its order.
const SESSION_COLUMNS: &str =
    "id, user_id, created_at, last_activity, state, message_count, tokens_in, tokens_out, ended_at";

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        created_at: r.get(2)?,
        last_activity: r.get(3)?,
        state: SessionState::stored(&r.get::<_, String>(4)?),
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
    state: &Option<SessionState>,
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
        args.push(V::Text(st.as_str().to_owned()));
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

pub(super) fn list(conn: &Connection, q: &SessionQuery) -> Result<SessionPage, rusqlite::Error> {
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
    let sessions = stmt
        .query_map(rusqlite::params_from_iter(args), session_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SessionPage::from_overfetch(sessions, q))
}

/// Totals over every session started in the window: aggregates over all matching
/// rows, never over a truncated page.
pub(super) fn window(
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

/// The columns [`message_row`] reads, in its order.
const MESSAGE_COLUMNS: &str = "seq, message_id, role, author, client_id, key_id, nonce, ciphertext,
     created_at, tokens_in, tokens_out, cancelled, aad_version, file, extra";

fn message_row(session_id: &str, r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRecord> {
    let nonce: Vec<u8> = r.get(6)?;
    let role: String = r.get(2)?;
    Ok(MessageRecord {
        session_id: session_id.to_owned(),
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
            // Out of range is corruption too: it will fail to open.
            version: u8::try_from(r.get::<_, i64>(12)?).unwrap_or(u8::MAX),
        },
        created_at: r.get(8)?,
        tokens_in: r.get::<_, i64>(9)? as u64,
        tokens_out: r.get::<_, i64>(10)? as u64,
        cancelled: r.get(11)?,
        file: r
            .get::<_, Option<String>>(13)?
            .as_deref()
            .and_then(FileRef::from_json),
        extra: r.get(14)?,
    })
}

pub(super) fn file(conn: &Connection, id: &str) -> rusqlite::Result<Option<FileRecord>> {
    conn.query_row(
        "SELECT file_id, owner, mime, size, sha256, name, created_at, key_id, location
         FROM files WHERE file_id = ?1",
        params![id],
        |r| {
            Ok(FileRecord {
                file_id: r.get(0)?,
                owner: r.get(1)?,
                mime: r.get(2)?,
                size: r.get::<_, i64>(3)?.max(0) as u64,
                sha256: r.get(4)?,
                name: r.get(5)?,
                created_at: r.get(6)?,
                key_id: r.get(7)?,
                location: r.get(8)?,
            })
        },
    )
    .optional()
}

pub(super) fn files_bytes(conn: &Connection, owner: &str) -> rusqlite::Result<u64> {
    let sum: i64 = conn.query_row(
        "SELECT COALESCE(SUM(size), 0) FROM files WHERE owner = ?1",
        params![owner],
        |r| r.get(0),
    )?;
    Ok(sum.max(0) as u64)
}

pub(super) fn user_file_ids(conn: &Connection, owner: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT file_id FROM files WHERE owner = ?1")?;
    let rows = stmt.query_map(params![owner], |r| r.get(0))?;
    rows.collect()
}

/// Up to `limit` of a session's messages after `after_seq`, in order: one keyset
/// page of a long history.
pub(super) fn messages_after(
    conn: &Connection,
    id: &str,
    after_seq: u64,
    limit: usize,
) -> rusqlite::Result<Vec<MessageRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = ?1 AND seq > ?2
         ORDER BY seq LIMIT ?3"
    ))?;
    let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![id, after, limit as i64], |r| message_row(id, r))?;
    rows.collect()
}

pub(super) fn load(
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
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![id, messages_max as i64], |r| message_row(id, r))?;
    let mut messages = rows.collect::<Result<Vec<_>, _>>()?;
    messages.reverse();
    Ok(Some((session, messages)))
}
pub(super) fn events(conn: &Connection, id: &str) -> rusqlite::Result<Vec<SessionEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT at, actor, action, state FROM session_events WHERE session_id = ?1 ORDER BY at, rowid",
    )?;
    let rows = stmt.query_map(params![id], |r| {
        Ok(SessionEvent {
            at: r.get(0)?,
            actor: r.get(1)?,
            action: r.get(2)?,
            state: r.get(3)?,
        })
    })?;
    rows.collect()
}

pub(super) fn due(
    conn: &Connection,
    now: Millis,
    limit: usize,
) -> rusqlite::Result<Vec<Notification>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, kind, payload, attempts FROM outbox
         WHERE state = 'pending' AND next_at <= ?1 ORDER BY next_at, id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now, limit as i64], |r| {
        Ok(Notification {
            id: r.get(0)?,
            kind: r.get(1)?,
            payload: r.get(2)?,
            attempts: r.get(3)?,
        })
    })?;
    rows.collect()
}

pub(super) fn next_due(conn: &Connection) -> rusqlite::Result<Option<Millis>> {
    conn.query_row(
        "SELECT MIN(next_at) FROM outbox WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )
}

/// Sessions not ended and idle since before `before`, least recent first.
pub(super) fn idle(
    conn: &Connection,
    before: Millis,
    limit: usize,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, user_id FROM sessions WHERE last_activity < ?1 AND state != 'ended'
         ORDER BY last_activity LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![before, limit as i64], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    rows.collect()
}

pub(super) fn outbox_count(conn: &Connection, state: &str) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COUNT(*) FROM outbox WHERE state = ?1",
        params![state],
        |r| r.get(0),
    )
}

/// A user's sessions, oldest first, each with all its messages.
pub(super) fn user_sessions(
    conn: &Connection,
    user_id: &str,
    sessions_max: usize,
) -> rusqlite::Result<Vec<Loaded>> {
    let ids: Vec<String> = {
        let mut stmt = conn.prepare_cached(
            "SELECT id FROM sessions WHERE user_id = ?1 ORDER BY created_at LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![user_id, sessions_max as i64], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    ids.iter()
        .filter_map(|id| load(conn, id, i64::MAX as usize).transpose())
        .collect()
}

/// The stored client ids, looked up on a core for its journal.
pub(super) struct ClientIds(pub(super) Connection);

impl crate::store::journal::Resends for ClientIds {
    fn find(
        &mut self,
        user: &str,
        client_id: &str,
    ) -> Result<crate::store::journal::Found, crate::store::StoreError> {
        self.0
            .prepare_cached(
                "SELECT message_id, session_id FROM messages WHERE user_id = ?1 AND client_id = ?2",
            )
            .and_then(|mut q| {
                q.query_row(rusqlite::params![user, client_id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(crate::store::StoreError::sqlite(
                crate::store::Op::AppendMessage,
            ))
    }
}
