//! The admin HTTP API under `{prefix}/admin/`: sessions (list, one with its
//! transcript, end), metrics over a time window, and a user's data and connections
//! (export, delete, disconnect).
//!
//! Every request needs an admin JWT (401 without a valid token, 403 without the
//! role) and passes the core's admin rate limit. Query parameters are checked
//! against a list per endpoint: an unknown parameter, sort key or value is a 400
//! that lists the valid ones, never a silent default.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::{ChatMsg, Core};
use crate::auth::{bearer, Identity};
use crate::clock::now_ms;
use crate::runtime::http::{error, json as json_response};
use crate::runtime::mesh::owner_core;
use crate::runtime::outbox::CLOSE_DISCONNECTED;
use crate::store::{
    AuditAction, CursorKey, Millis, SessionQuery, SessionRecord, SessionState, SortBy, StoreError,
    WriteOp,
};

use crate::runtime::app::Body;

/// Page size bounds of the session list.
const PAGE_DEFAULT: usize = 50;
const PAGE_MAX: usize = 200;
const STATES: [&str; 4] = SessionState::NAMES;

/// Why an admin request failed; mapped to its HTTP response in one place.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("an admin token is required (Authorization: Bearer)")]
    Unauthorized,
    #[error("the admin role is required")]
    Forbidden,
    #[error("{0}")]
    NotFound(&'static str),
    /// A known path asked with a method it does not take: these it does.
    #[error("use {0}")]
    MethodNotAllowed(&'static str),
    #[error("admin API rate limit reached")]
    RateLimited { retry_after_secs: u64 },
    #[error("storage is unavailable; retry")]
    Storage(#[from] StoreError),
    /// A core the request needed did not take it or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn into_response(self, core: &Core) -> Response<Body> {
        let (status, code) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized => {
                core.metrics()
                    .refused(crate::metrics::Refusal::Unauthorized);
                return crate::runtime::http::unauthorized(&self.to_string());
            }
            ApiError::MethodNotAllowed(allow) => {
                return crate::runtime::http::method_not_allowed(allow);
            }
            ApiError::Forbidden => {
                core.metrics().refused(crate::metrics::Refusal::Forbidden);
                (StatusCode::FORBIDDEN, "forbidden")
            }
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Storage(e) => {
                tracing::error!(error = %e, "admin API storage error");
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            ApiError::Unavailable(why) => {
                tracing::warn!(error = %why, "admin API could not reach a core");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        };
        let mut r = error(status, code, &self.to_string());
        if let Some(secs) = self.retry_after_secs() {
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(secs),
            );
        }
        r
    }

    /// `Retry-After` in whole seconds (at least 1) for a refusal that is worth
    /// retrying: the rate limit, and storage's back-pressure (its write queue
    /// full, every read connection busy).
    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            ApiError::Storage(e) => e.retry_after_ms().map(|ms| ms.div_ceil(1000).max(1)),
            _ => None,
        }
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

type Params = [(String, String)];

pub async fn handle(
    core: &Rc<Core>,
    req: &Request<hyper::body::Incoming>,
    path: &str,
) -> Response<Body> {
    match route(core, req, path).await {
        Ok(r) => r,
        Err(e) => e.into_response(core),
    }
}

fn ok(body: Value) -> Response<Body> {
    json_response(StatusCode::OK, body.to_string())
}

async fn route(
    core: &Rc<Core>,
    req: &Request<hyper::body::Incoming>,
    path: &str,
) -> Result<Response<Body>, ApiError> {
    let admin = authorize(core, req)?;
    let params = parse_query(req.uri().query().unwrap_or(""));
    let decoded = path_segments(path)?;
    let segments: Vec<&str> = decoded.iter().map(|s| &**s).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["sessions"]) => list(core, &params).await.map(ok),
        (&Method::GET, ["sessions", id]) => {
            check_params(&params, &[])?;
            super::admin_stream::transcript(core, id).await
        }
        (&Method::POST, ["sessions", id, "end"]) => {
            check_params(&params, &[])?;
            end(core, id, &admin).await.map(ok)
        }
        (&Method::GET, ["metrics"]) => metrics(core, &params).await.map(ok),
        (&Method::GET, ["users", id, "export"]) => {
            check_params(&params, &[])?;
            super::admin_stream::export(core, id)
        }
        (&Method::DELETE, ["users", id]) => {
            check_params(&params, &[])?;
            delete_user(core, id, &admin).await.map(ok)
        }
        (&Method::POST, ["users", id, "disconnect"]) => {
            check_params(&params, &[])?;
            disconnect(core, id, &admin).await.map(ok)
        }
        (_, ["sessions"] | ["sessions", _] | ["metrics"] | ["users", _, "export"]) => {
            Err(ApiError::MethodNotAllowed("GET"))
        }
        (_, ["sessions", _, "end"] | ["users", _, "disconnect"]) => {
            Err(ApiError::MethodNotAllowed("POST"))
        }
        (_, ["users", _]) => Err(ApiError::MethodNotAllowed("DELETE")),
        _ => Err(ApiError::NotFound("no such admin endpoint")),
    }
}

fn authorize(core: &Core, req: &Request<hyper::body::Incoming>) -> Result<Identity, ApiError> {
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| bearer(v.to_str().ok()?))
        .ok_or(ApiError::Unauthorized)?;
    let id = core
        .shared
        .verifier
        .verify(token)
        .map_err(|_| ApiError::Unauthorized)?;
    if !id.admin {
        return Err(ApiError::Forbidden);
    }
    core.app
        .admin_rate_check(&id.user_id, now_ms())
        .map_err(|wait_ms| ApiError::RateLimited {
            retry_after_secs: wait_ms.div_ceil(1000),
        })?;
    Ok(id)
}

/// The path's segments, each percent-decoded on its own (so `a%2Fb` is one segment
/// `a/b`, and `jos%C3%A9` is `josé`). `+` stays a plus: this is a path, not a form.
fn path_segments(path: &str) -> Result<Vec<Cow<'_, str>>, ApiError> {
    path.trim_start_matches('/')
        .split('/')
        .map(|seg| {
            percent_encoding::percent_decode_str(seg)
                .decode_utf8()
                .map_err(|_| bad("a path segment is not UTF-8 once percent-decoded"))
        })
        .collect()
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

/// Checks that only `allowed` parameters appear, each once.
fn check_params(params: &Params, allowed: &[&str]) -> Result<(), ApiError> {
    for (i, (k, _)) in params.iter().enumerate() {
        if !allowed.contains(&k.as_str()) {
            let valid = if allowed.is_empty() {
                "none".to_owned()
            } else {
                allowed.join(", ")
            };
            return Err(bad(format!("unknown parameter {k:?}; valid: {valid}")));
        }
        if params[..i].iter().any(|(other, _)| other == k) {
            return Err(bad(format!("parameter {k:?} given twice")));
        }
    }
    Ok(())
}

fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn millis(params: &Params, name: &str) -> Result<Option<Millis>, ApiError> {
    param(params, name)
        .map(|v| {
            v.parse::<Millis>()
                .map_err(|_| bad(format!("{name} must be milliseconds since the Unix epoch")))
        })
        .transpose()
}

pub(super) fn session_json(s: &SessionRecord) -> Value {
    json!({
        "session_id": s.id,
        "user_id": s.user_id,
        "state": s.state.as_str(),
        "start_time": s.created_at,
        "end_time": s.ended_at,
        "last_activity": s.last_activity,
        "message_count": s.message_count,
        "tokens_in": s.tokens_in,
        "tokens_out": s.tokens_out,
        "total_tokens": s.tokens_in + s.tokens_out,
    })
}

fn encode_cursor(key: &CursorKey, id: &str) -> String {
    let k = match key {
        CursorKey::Int(i) => json!(i),
        CursorKey::Text(t) => json!(t),
    };
    hex::encode(json!([k, id]).to_string())
}

fn decode_cursor(c: &str) -> Option<(CursorKey, String)> {
    let v: Value = serde_json::from_slice(&hex::decode(c).ok()?).ok()?;
    let key = match &v[0] {
        Value::Number(n) => CursorKey::Int(n.as_i64()?),
        Value::String(s) => CursorKey::Text(s.clone()),
        _ => return None,
    };
    Some((key, v[1].as_str()?.to_owned()))
}

async fn list(core: &Core, params: &Params) -> Result<Value, ApiError> {
    check_params(
        params,
        &[
            "sort_by", "order", "limit", "cursor", "user_id", "state", "from", "to",
        ],
    )?;
    let sort_by = match param(params, "sort_by") {
        None => SortBy::StartTime,
        Some(name) => SortBy::parse(name).ok_or_else(|| {
            bad(format!(
                "unknown sort_by {name:?}; valid: {}",
                SortBy::NAMES.join(", ")
            ))
        })?,
    };
    let descending = match param(params, "order") {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(bad("order must be asc or desc")),
    };
    let limit = match param(params, "limit").map(str::parse::<usize>) {
        None => PAGE_DEFAULT,
        Some(Ok(n)) if (1..=PAGE_MAX).contains(&n) => n,
        Some(_) => return Err(bad(format!("limit must be between 1 and {PAGE_MAX}"))),
    };
    let state = param(params, "state")
        .map(|s| {
            SessionState::parse(s)
                .ok_or_else(|| bad(format!("unknown state {s:?}; valid: {}", STATES.join(", "))))
        })
        .transpose()?;
    let after = param(params, "cursor")
        .map(|c| decode_cursor(c).ok_or_else(|| bad("cursor is not one this API returned")))
        .transpose()?;
    let query = SessionQuery {
        user_id: param(params, "user_id").map(str::to_owned),
        state,
        from: millis(params, "from")?,
        to: millis(params, "to")?,
        sort_by,
        descending,
        limit,
        after,
    };
    let page = core.shared.app.store.list_sessions(query).await?;
    let next = page.next.map(|(k, id)| encode_cursor(&k, &id));
    let sessions: Vec<Value> = page.sessions.iter().map(session_json).collect();
    Ok(json!({"sessions": sessions, "next_cursor": next}))
}

async fn end(core: &Rc<Core>, id: &str, admin: &Identity) -> Result<Value, ApiError> {
    let store = &core.shared.app.store;
    let (rec, _) = store
        .load_session(id, 0)
        .await?
        .ok_or(ApiError::NotFound("no such session"))?;
    let op = WriteOp::SetState {
        session_id: id.to_owned(),
        state: SessionState::Ended,
        actor: admin.user_id.to_string(),
        action: AuditAction::End,
        at: now_ms(),
    };
    store.write(vec![op]).await?;
    // The owning core stops taking messages for it now, not only after a restart.
    let owner = owner_core(&rec.user_id, core.shared.mesh.cores());
    if let Err(e) = core.send_app(owner, ChatMsg::EndSession(id.into())) {
        tracing::warn!(error = %e, session = %id, "the owning core was not told the session ended");
    }
    if let Some(bus) = &core.shared.app.bus {
        // At most once: a node that misses it still has the session ended in the
        // store, which its next load or sweep reads.
        if let Err(e) = super::cluster::end_session(bus, id, &rec.user_id) {
            tracing::warn!(error = %e, session = %id, "the other nodes were not told the session ended");
        }
    }
    Ok(json!({"session_id": id, "state": "ended"}))
}

async fn metrics(core: &Core, params: &Params) -> Result<Value, ApiError> {
    check_params(params, &["from", "to"])?;
    let (from, to) = (millis(params, "from")?, millis(params, "to")?);
    let m = core.shared.app.store.window_metrics(from, to).await?;
    Ok(json!({"from": from, "to": to, "metrics": m}))
}

async fn delete_user(core: &Rc<Core>, user_id: &str, admin: &Identity) -> Result<Value, ApiError> {
    // Their live connections close and their sessions leave memory first, so their
    // core queues no more writes for them; a write still queued ahead of the
    // delete is deleted with the rest, and one behind it (an answer finishing) is
    // refused by storage, its session being gone: nothing comes back.
    let closed = close_user(core, user_id, true).await;
    // Their files' bytes first, while the records still say which they are: a
    // failure here leaves the records, so a retry finds them again.
    let files = core.shared.app.store.user_file_ids(user_id).await?;
    let count = files.len();
    let kept = super::files::delete_objects(core, files).await;
    if kept > 0 {
        return Err(ApiError::Unavailable(format!(
            "{kept} of the user's files could not be removed; nothing else was deleted; retry the request"
        )));
    }
    let op = WriteOp::DeleteUser {
        user_id: user_id.to_owned(),
    };
    core.shared.app.store.write(vec![op]).await?;
    tracing::info!(user = %user_id, admin = %admin.user_id, files = count, "user data deleted");
    // A core that did not confirm is reported, and a retry is safe.
    let closed = closed.map_err(|e| {
        ApiError::Unavailable(format!(
            "the user's stored data was deleted, but {e}; retry the request"
        ))
    })?;
    Ok(json!({"user_id": user_id, "deleted": true, "closed": closed}))
}

async fn disconnect(core: &Rc<Core>, user_id: &str, admin: &Identity) -> Result<Value, ApiError> {
    let closed = close_user(core, user_id, false)
        .await
        .map_err(|e| ApiError::Unavailable(format!("{e}; retry the request")))?;
    tracing::info!(user = %user_id, admin = %admin.user_id, closed, "user disconnected");
    Ok(json!({"closed": closed}))
}

/// What the admin API asks of the core owning a user (see [`close_user_here`]).
pub struct CloseUser {
    user: Arc<str>,
    /// Their data was deleted: drop their queued frames and in-memory sessions too.
    deleted: bool,
    /// How many connections were asked to close; any `Send` one-shot will do, and a
    /// bounded(1) channel is one.
    reply: async_channel::Sender<usize>,
}

impl CloseUser {
    /// A close request and the receiving end of its answer.
    pub fn new(user: Arc<str>, deleted: bool) -> (CloseUser, async_channel::Receiver<usize>) {
        let (reply, answer) = async_channel::bounded(1);
        let msg = CloseUser {
            user,
            deleted,
            reply,
        };
        (msg, answer)
    }
}

/// Closes `user`'s connections on this node and, in a cluster, on every other
/// node; an error names what did not confirm.
async fn close_user(core: &Rc<Core>, user: &str, deleted: bool) -> Result<usize, String> {
    let here = close_user_on_node(core, user, deleted).await?;
    let Some(bus) = &core.shared.app.bus else {
        return Ok(here);
    };
    let elsewhere = super::cluster::close_user_elsewhere(bus, user, deleted).await?;
    Ok(here + elsewhere)
}

/// Closes `user`'s connections on the core that owns them (all of a user's
/// connections live there) and returns how many it closed. An error says which
/// core did not take the request or did not answer within half the HTTP request's
/// time, so the admin hears of it instead of a success.
async fn close_user_on_node(core: &Rc<Core>, user: &str, deleted: bool) -> Result<usize, String> {
    let owner = owner_core(user, core.shared.mesh.cores());
    let (msg, answer) = CloseUser::new(user.into(), deleted);
    core.send_app(owner, ChatMsg::CloseUser(Box::new(msg)))
        .map_err(|e| format!("the user's connections were not closed: {e}"))?;
    let wait = Duration::from_millis(core.shared.config.http_request_timeout_ms / 2);
    match monoio::time::timeout(wait, answer.recv()).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(_)) => Err(format!(
            "core {owner} stopped before closing the user's connections"
        )),
        Err(_) => Err(format!(
            "core {owner} did not confirm closing the user's connections in time"
        )),
    }
}

/// The owning core's half of [`close_user`].
pub fn close_user_here(core: &Rc<Core>, msg: CloseUser) {
    debug_assert_eq!(owner_core(&msg.user, core.shared.mesh.cores()), core.id);
    let reason = if msg.deleted {
        "user deleted"
    } else {
        "disconnected by an admin"
    };
    // Each socket is closed and counted once, by the node that holds it (every
    // node is asked): what this core serves for sockets elsewhere just ends here.
    super::remote::end_served_user(core, &msg.user);
    let closed =
        core.registry
            .borrow()
            .close_user(&msg.user, CLOSE_DISCONNECTED, reason, msg.deleted);
    core.metrics().admin_disconnects.add(closed as u64);
    if msg.deleted {
        let sessions = core.app.forget_user(&msg.user);
        tracing::debug!(core = core.id, sessions, "forgot a deleted user's sessions");
    }
    // The asker may have given up waiting; nothing more to do then.
    let _ = msg.reply.try_send(closed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_back_pressure_says_when_to_retry() {
        let full = ApiError::Storage(StoreError::Overloaded(8));
        assert_eq!(full.retry_after_secs(), Some(1), "a full write queue");
        let busy = ApiError::Storage(StoreError::ReadersBusy {
            readers: 2,
            retry_after_ms: 2500,
        });
        assert_eq!(busy.retry_after_secs(), Some(3), "every reader busy");
        assert_eq!(
            ApiError::Storage(StoreError::Stopped).retry_after_secs(),
            None
        );
        let limited = ApiError::RateLimited {
            retry_after_secs: 4,
        };
        assert_eq!(limited.retry_after_secs(), Some(4));
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        for key in [
            CursorKey::Int(-5),
            CursorKey::Int(1_795_000_000_000),
            CursorKey::Text("ü\"x".into()),
        ] {
            assert_eq!(
                decode_cursor(&encode_cursor(&key, "s_1")),
                Some((key, "s_1".into()))
            );
        }
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor(&hex::encode("[1]")), None);
    }

    #[test]
    fn path_segments_are_decoded_one_by_one() {
        let segs = path_segments("/users/jos%C3%A9/export").unwrap();
        assert_eq!(segs, ["users", "josé", "export"]);
        let segs = path_segments("/users/a%2Fb+c").unwrap();
        assert_eq!(
            segs,
            ["users", "a/b+c"],
            "an encoded slash stays in its segment"
        );
        assert!(path_segments("/users/%FF").is_err());
    }

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            parse_query("user_id=a%20b&state=ai&x"),
            [
                ("user_id".into(), "a b".into()),
                ("state".into(), "ai".into()),
                ("x".into(), String::new())
            ]
        );
    }
}
