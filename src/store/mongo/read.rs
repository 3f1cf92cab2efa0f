//! MongoDB reads: sessions with their messages, the admin list and window
//! metrics, audit trails and the notification outbox. Filters are built from
//! typed values only; errors are named by `MongoStore::read`.

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::Result;
use mongodb::Collection;

use super::{i64_of, Colls};
use crate::crypto::{Sealed, NONCE_BYTES};
use crate::store::{
    AuditAction, CursorKey, FileRecord, FileRef, Loaded, MessageRecord, Millis, Notification, Role,
    SessionEvent, SessionPage, SessionQuery, SessionRecord, SessionState, SortBy, WindowMetrics,
};

/// Runs a query and collects every document it returns.
async fn collect(
    query: impl std::future::IntoFuture<Output = mongodb::error::Result<mongodb::Cursor<Document>>>,
) -> mongodb::error::Result<Vec<Document>> {
    query.await?.try_collect().await
}

/// The fields a session list needs (explicit projection).
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
        state: SessionState::stored(d.get_str("state").unwrap_or_default()),
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
            // Absent on rows written before the version existed: 0. Out of range
            // is corruption: it will fail to open.
            version: u8::try_from(get_i64(d, "aad_version")).unwrap_or(u8::MAX),
        },
        created_at: get_i64(d, "created_at"),
        tokens_in: get_i64(d, "tokens_in").max(0) as u64,
        tokens_out: get_i64(d, "tokens_out").max(0) as u64,
        cancelled: d.get_bool("cancelled").unwrap_or(false),
        file: d.get_document("file").ok().map(|f| FileRef {
            file_id: text(f, "file_id"),
            mime: text(f, "mime"),
            size: get_i64(f, "size").max(0) as u64,
            name: f.get_str("name").ok().map(str::to_owned),
        }),
        extra: d.get("extra").map(|_| bytes_of(d, "extra")),
    }
}

pub(super) async fn file(c: Colls, id: String) -> Result<Option<FileRecord>> {
    let Some(d) = c.files.find_one(doc! {"_id": &id}).await? else {
        return Ok(None);
    };
    Ok(Some(FileRecord {
        file_id: id,
        owner: text(&d, "owner"),
        mime: text(&d, "mime"),
        size: get_i64(&d, "size").max(0) as u64,
        sha256: text(&d, "sha256"),
        name: d.get_str("name").ok().map(str::to_owned),
        created_at: get_i64(&d, "created_at"),
        key_id: u32::try_from(get_i64(&d, "key_id")).unwrap_or(0),
        location: text(&d, "location"),
    }))
}

pub(super) async fn files_bytes(c: Colls, owner: String) -> Result<u64> {
    let pipeline = [
        doc! {"$match": {"owner": &owner}},
        doc! {"$group": {"_id": Bson::Null, "bytes": {"$sum": "$size"}}},
    ];
    let rows: Vec<Document> = c.files.aggregate(pipeline).await?.try_collect().await?;
    Ok(rows
        .first()
        .map_or(0, |d| get_i64(d, "bytes").max(0) as u64))
}

pub(super) async fn user_file_ids(c: Colls, owner: String) -> Result<Vec<String>> {
    let docs: Vec<Document> = c
        .files
        .find(doc! {"owner": &owner})
        .projection(doc! {"_id": 1})
        .await?
        .try_collect()
        .await?;
    Ok(docs.iter().map(|d| text(d, "_id")).collect())
}

/// The admin filters as a typed document (values only, never operators).
fn session_filter(
    user_id: &Option<String>,
    state: &Option<SessionState>,
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

pub(super) async fn list(c: Colls, q: SessionQuery) -> Result<SessionPage> {
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
    let sessions: Vec<SessionRecord> = docs.iter().map(session_from).collect();
    Ok(SessionPage::from_overfetch(sessions, &q))
}

pub(super) async fn load(c: Colls, id: String, messages_max: usize) -> Result<Option<Loaded>> {
    let Some(session) = c
        .sessions
        .find_one(doc! {"_id": &id})
        .projection(session_projection())
        .await?
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

/// Up to `limit` of a session's messages after `after_seq`, in order.
pub(super) async fn messages_after(
    c: Colls,
    id: String,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<MessageRecord>> {
    let found = collect(
        c.messages
            .find(doc! {"session_id": &id, "seq": {"$gt": i64_of(after_seq)}})
            .sort(doc! {"seq": 1})
            .limit(i64_of(limit as u64)),
    )
    .await?;
    Ok(found.iter().map(message_from).collect())
}

/// Totals over every session started in the window. Counts are aggregations over
/// all matching documents (`$group`), never over a page; response times walk the
/// matching messages in order, projected to role and time only.
pub(super) async fn window(
    c: Colls,
    from: Option<Millis>,
    to: Option<Millis>,
) -> Result<WindowMetrics> {
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
            let out: Vec<Document> = c.aggregate(pipeline).await?.try_collect().await?;
            Ok::<_, mongodb::error::Error>(out.into_iter().next().unwrap_or_default())
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
            doc! {"$group": {"_id": Bson::Null, "joins": action(AuditAction::AdminJoin.as_str()),
            "help": action(AuditAction::HelpRequest.as_str())}},
        ],
    )
    .await?;
    (m.takeovers, m.help_requests) = (count(&ev, "joins"), count(&ev, "help"));
    response_times(&c, &ids, &mut m).await?;
    Ok(m)
}
/// Replies (assistant or admin) right after a user message, per session in
/// order: their count, mean and longest delay.
async fn response_times(c: &Colls, ids: &[Bson], m: &mut WindowMetrics) -> Result<()> {
    let mut cursor = c
        .messages
        .find(doc! {"session_id": {"$in": &ids}})
        .projection(doc! {"session_id": 1, "role": 1, "created_at": 1, "_id": 0})
        .sort(doc! {"session_id": 1, "seq": 1})
        .await?;
    let (mut prev, mut sum, mut max): (Option<(String, bool, i64)>, i64, Option<i64>) =
        (None, 0, None);
    while let Some(d) = cursor.try_next().await? {
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
    Ok(())
}

pub(super) async fn events(c: Colls, id: String) -> Result<Vec<SessionEvent>> {
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
}

/// A user's sessions, oldest first, each with all its messages.
pub(super) async fn user_sessions(
    c: Colls,
    user: String,
    sessions_max: usize,
) -> Result<Vec<Loaded>> {
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
}

pub(super) async fn due(c: Colls, now: Millis, limit: usize) -> Result<Vec<Notification>> {
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
}

pub(super) async fn idle(c: Colls, before: Millis, limit: usize) -> Result<Vec<(String, String)>> {
    let docs: Vec<Document> = collect(
        c.sessions
            .find(doc! {"last_activity": {"$lt": before}, "state": {"$ne": "ended"}})
            .projection(doc! {"user_id": 1})
            .sort(doc! {"last_activity": 1})
            .limit(i64_of(limit as u64)),
    )
    .await?;
    Ok(docs
        .iter()
        .map(|d| (text(d, "_id"), text(d, "user_id")))
        .collect())
}

pub(super) async fn outbox_count(c: Colls, state: String) -> Result<u64> {
    c.outbox.count_documents(doc! {"state": state}).await
}

pub(super) async fn next_due(c: Colls) -> Result<Option<Millis>> {
    let d = c
        .outbox
        .find_one(doc! {"state": "pending"})
        .projection(doc! {"next_at": 1})
        .sort(doc! {"next_at": 1})
        .await?;
    Ok(d.map(|d| get_i64(&d, "next_at")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_typed_values() {
        // A filter value that looks like an operator stays a plain string.
        let f = session_filter(
            &Some("{\"$ne\": 1}".into()),
            &Some(SessionState::Waiting),
            Some(1),
            None,
        );
        assert_eq!(f.get_str("user_id").unwrap(), "{\"$ne\": 1}");
        assert_eq!(f.get_str("state").unwrap(), "waiting");
        assert_eq!(f.get_document("created_at").unwrap(), &doc! {"$gte": 1i64});
    }
}
