//! The admin API's answers that grow with history (a session's transcript, a
//! user's export), streamed page by page.
//!
//! A producer on the blocking pool reads keyset pages from storage
//! (`admin_page_messages` messages, or sessions, at a time), opens and encodes
//! them, and hands each page's JSON to the connection through a bounded channel
//! ([`crate::runtime::http::paged`]); the core only copies bytes to the socket.
//! At most [`PAGES_QUEUED`] pages wait, so memory stays bounded whatever the
//! history's size, and a slow reader slows the producer down. A storage failure
//! after the first page cuts the response short (the client sees an unterminated
//! body), never a short answer that looks whole.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use super::admin::{session_json, ApiError};
use super::chat::extra::Extra;
use super::Core;
use crate::crypto::KeyRing;
use crate::runtime::app::Body;
use crate::runtime::http::{paged, Pages};
use crate::store::{MessageRecord, SessionQuery, SortBy, StoreError};

/// Pages encoded ahead of the connection's writes.
const PAGES_QUEUED: usize = 2;

/// What the streams did, for `/metrics` (and for tests to see the pages bounded).
#[derive(Debug, Default)]
pub struct PageStats {
    /// Pages read from storage.
    pub pages: AtomicU64,
    /// The most messages (or sessions) one page held.
    pub page_rows_max: AtomicU64,
    /// Messages that failed their integrity check while streamed.
    pub integrity_failures: AtomicU64,
}

impl PageStats {
    fn page(&self, rows: usize) {
        self.pages.fetch_add(1, Relaxed);
        self.page_rows_max.fetch_max(rows as u64, Relaxed);
    }

    pub fn render(&self) -> String {
        format!(
            "# HELP chatbox_admin_pages_total Pages the admin transcript and export read from storage.\n\
             # TYPE chatbox_admin_pages_total counter\nchatbox_admin_pages_total {}\n\
             # HELP chatbox_admin_page_rows_max Most rows one of those pages held.\n\
             # TYPE chatbox_admin_page_rows_max gauge\nchatbox_admin_page_rows_max {}\n\
             # HELP chatbox_admin_integrity_failures_total Stored messages withheld from streamed transcripts and exports.\n\
             # TYPE chatbox_admin_integrity_failures_total counter\nchatbox_admin_integrity_failures_total {}\n",
            self.pages.load(Relaxed),
            self.page_rows_max.load(Relaxed),
            self.integrity_failures.load(Relaxed),
        )
    }
}

/// A 200 whose JSON body `produce` writes, on the blocking pool.
fn stream<F, Fut>(core: &Rc<Core>, produce: F) -> Result<Response<Body>, ApiError>
where
    F: FnOnce(Arc<crate::runtime::core::Shared<super::ChatApp>>, Pages) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (pages, body) = paged(PAGES_QUEUED);
    let work = produce(core.shared.clone(), pages);
    core.shared
        .pool
        .spawn(work)
        .map_err(|e| ApiError::Storage(StoreError::Pool(e)))?;
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// `GET /admin/sessions/{id}`: the session and its audit trail first, then its
/// messages page by page. A missing session is a plain 404 (checked before the
/// status line goes out).
pub(super) async fn transcript(core: &Rc<Core>, id: &str) -> Result<Response<Body>, ApiError> {
    let store = &core.shared.app.store;
    let (rec, _) = store
        .load_session(id, 0)
        .await?
        .ok_or(ApiError::NotFound("no such session"))?;
    let events: Vec<Value> = store
        .session_events(id)
        .await?
        .iter()
        .map(|e| json!({"at": e.at, "actor": e.actor, "action": e.action, "state": e.state}))
        .collect();
    let head = format!(
        r#"{{"session":{},"events":{},"messages":["#,
        session_json(&rec),
        Value::Array(events)
    );
    let id = id.to_owned();
    stream(core, move |shared, pages| async move {
        if pages.send(head).await && messages(&shared.app, &pages, &id, Shape::Transcript).await {
            pages.send("]}").await;
        }
    })
}

/// `GET /admin/users/{id}/export`: every session of the user, oldest first, each
/// with its messages, all read in pages.
pub(super) fn export(core: &Rc<Core>, user_id: &str) -> Result<Response<Body>, ApiError> {
    let head = format!(r#"{{"user_id":{},"sessions":["#, json!(user_id));
    let user_id = user_id.to_owned();
    stream(core, move |shared, pages| async move {
        if pages.send(head).await && sessions(&shared.app, &pages, &user_id).await {
            pages.send("]}").await;
        }
    })
}

/// Every session of `user_id`, each as `{"session":..,"messages":[..]}`. `false`
/// when the stream ended early (failed, or the client left).
async fn sessions(app: &super::ChatShared, pages: &Pages, user_id: &str) -> bool {
    let mut query = SessionQuery {
        user_id: Some(user_id.to_owned()),
        state: None,
        from: None,
        to: None,
        sort_by: SortBy::StartTime,
        descending: false,
        limit: app.admin_page,
        after: None,
    };
    let mut first = true;
    loop {
        let page = match app.store.list_sessions(query.clone()).await {
            Ok(page) => page,
            Err(e) => return failed(pages, e).await,
        };
        app.pages.page(page.sessions.len());
        for rec in &page.sessions {
            let sep = if first { "" } else { "," };
            first = false;
            let head = format!(r#"{sep}{{"session":{},"messages":["#, session_json(rec));
            if !pages.send(head).await
                || !messages(app, pages, &rec.id, Shape::Export).await
                || !pages.send("]}").await
            {
                return false;
            }
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => return true,
        }
    }
}

/// How a message is shown: the transcript's fields, or the export's.
#[derive(Clone, Copy)]
enum Shape {
    Transcript,
    Export,
}

/// A session's messages, comma-separated, one page per chunk.
async fn messages(app: &super::ChatShared, pages: &Pages, sid: &str, shape: Shape) -> bool {
    let (mut after, mut first) = (0, true);
    loop {
        let page = match app.store.messages_after(sid, after, app.admin_page).await {
            Ok(page) => page,
            Err(e) => return failed(pages, e).await,
        };
        app.pages.page(page.len());
        let Some(last) = page.last() else {
            return true;
        };
        after = last.seq;
        let mut chunk = String::new();
        for m in &page {
            if !first {
                chunk.push(',');
            }
            first = false;
            chunk.push_str(&message_json(&app.keys, &app.pages, m, shape).to_string());
        }
        if !pages.send(chunk).await {
            return false;
        }
        if page.len() < app.admin_page {
            return true;
        }
    }
}

fn message_json(keys: &KeyRing, stats: &PageStats, m: &MessageRecord, shape: Shape) -> Value {
    // Extras that fail their check withhold the message like its content would.
    let (opened, extra) = match (keys.open(&m.place(), &m.sealed), Extra::open(keys, m)) {
        (Ok(c), Ok(extra)) => (Ok(c), Some(extra)),
        (Err(e), _) | (_, Err(e)) => (Err(e), None),
    };
    if let Err(e) = &opened {
        stats.integrity_failures.fetch_add(1, Relaxed);
        tracing::error!(session = %m.session_id, message = %m.message_id, error = %e, "stored message failed its integrity check");
    }
    let mut v = match shape {
        Shape::Export => json!({"message_id": m.message_id, "role": m.role.as_str(),
            "author": m.author, "created_at": m.created_at, "content": opened.ok(),
            "cancelled": m.cancelled}),
        Shape::Transcript => {
            let mut v = json!({"message_id": m.message_id, "seq": m.seq,
                "role": m.role.as_str(), "author": m.author, "created_at": m.created_at,
                "tokens_in": m.tokens_in, "tokens_out": m.tokens_out,
                "cancelled": m.cancelled});
            match opened {
                Ok(content) => v["content"] = json!(content),
                Err(_) => v["error"] = json!("integrity check failed; content withheld"),
            }
            v
        }
    };
    // An attachment: what it is, and where an admin fetches it
    // (`GET {prefix}/files/{file_id}`).
    if let Some(f) = &m.file {
        v["file"] = json!(f);
    }
    // What the user sent beside the text (`file_url`, `metadata`).
    if let Some(Extra { file_url, metadata }) = extra {
        if let Some(url) = file_url {
            v["file_url"] = json!(url);
        }
        if let Some(metadata) = metadata {
            v["metadata"] = metadata;
        }
    }
    v
}

/// Ends the stream on a storage failure; always `false` (the stream stopped).
async fn failed(pages: &Pages, e: StoreError) -> bool {
    tracing::error!(error = %e, "admin stream: storage failed mid-answer");
    pages.fail(format!("storage failed: {e}")).await;
    false
}
