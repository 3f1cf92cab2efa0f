//! The HTTP front door: reads a request head, routes it, and serves plain HTTP
//! endpoints with hyper (health, readiness, metrics, JSON errors); every other
//! path goes to the application.

pub mod head;

use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};

use super::addr::Slot;
use super::app::{full, App, Body};
use super::core::Core;
use super::io::{HyperIo, Socket};
use crate::metrics::Refusal;

/// The `Retry-After` of every refusal while shutting down: long enough for a load
/// balancer to move the client to another instance, short enough for a restart.
pub const RETRY_AFTER_SHUTDOWN_SECS: u64 = 5;

/// `{"error":{"code":..,"message":..}}`, the one error body of every endpoint.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"error": {"code": code, "message": message}}).to_string()
}

/// A refusal written as a raw HTTP response (before any upgrade or hyper).
#[derive(Debug, Clone)]
pub struct Refuse {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub why: Refusal,
    headers: Vec<(&'static str, String)>,
}

impl Refuse {
    pub fn new(
        status: u16,
        code: &'static str,
        message: impl Into<String>,
        why: Refusal,
    ) -> Refuse {
        Refuse {
            status,
            code,
            message: message.into(),
            why,
            headers: Vec::new(),
        }
    }

    /// 503 while the server drains or stops: try again (another instance) shortly.
    pub fn shutting_down() -> Refuse {
        Refuse::new(
            503,
            "shutting_down",
            "server is shutting down",
            Refusal::ShuttingDown,
        )
        .header("Retry-After", RETRY_AFTER_SHUTDOWN_SECS.to_string())
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Refuse {
        self.headers.push((name, value.into()));
        self
    }

    pub fn to_http(&self) -> Vec<u8> {
        let body = error_body(self.code, &self.message);
        let reason = StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\nCache-Control: no-store\r\n",
            self.status,
            body.len()
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out.into_bytes()
    }

    /// Writes the response, counts the refusal, and half-closes the socket.
    pub async fn send(&self, metrics: &crate::metrics::CoreMetrics, sock: &Socket) {
        metrics.refused(self.why);
        let _ = sock.send_all(&self.to_http()).await;
        sock.shutdown_write();
    }
}

/// Why a paged body ended before its last page. The status line went out with
/// the first page, so hyper aborts the connection instead: the client sees a
/// truncated (unterminated chunked) body, never a short one that looks whole.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PageError(String);

/// A response body whose chunks arrive through a bounded channel.
pub type PagedBody = StreamBody<async_channel::Receiver<Result<Frame<Bytes>, PageError>>>;

/// The producing side of a [`PagedBody`], usable from any thread.
pub struct Pages(async_channel::Sender<Result<Frame<Bytes>, PageError>>);

/// A body of chunks of which at most `pages_max` wait while the connection
/// writes: the producer waits for the writer, so memory stays bounded whatever
/// the length of the whole.
pub fn paged(pages_max: usize) -> (Pages, Body) {
    let (tx, rx) = async_channel::bounded(pages_max.max(1));
    (
        Pages(tx),
        http_body_util::Either::Right(StreamBody::new(rx)),
    )
}

impl Pages {
    /// Queues one chunk, waiting while the queue is full. `false` when the
    /// client went away (the body was dropped): stop producing.
    pub async fn send(&self, chunk: impl Into<Bytes>) -> bool {
        self.0.send(Ok(Frame::data(chunk.into()))).await.is_ok()
    }

    /// Ends the body with an error: the response is cut short, visibly.
    pub async fn fail(&self, why: impl Into<String>) {
        let _ = self.0.send(Err(PageError(why.into()))).await;
    }
}

pub fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(status, error_body(code, message))
}

/// Serves one plain HTTP connection with hyper, replaying the bytes already read.
/// Keep-alive is off: every request comes through the head reader, so routing,
/// limits and timeouts are decided in one place.
pub async fn serve<A: App>(
    core: Rc<Core<A>>,
    sock: Socket,
    replay: Vec<u8>,
    addr: Option<Slot>,
    path: &str,
) {
    let sock = Rc::new(sock);
    let mut io = HyperIo::new(sock.clone(), replay);
    if let Some(slot) = addr {
        io = io.hold_until_shutdown(Box::new(slot));
    }
    let cfg = &core.shared.config;
    let timeout = match path.strip_prefix(cfg.path_prefix.as_str()) {
        Some(path) => A::request_timeout(&core, path),
        None => std::time::Duration::from_millis(cfg.http_request_timeout_ms),
    };
    let svc_core = core.clone();
    let service = hyper::service::service_fn(move |req| {
        let core = svc_core.clone();
        async move { Ok::<_, Infallible>(route(&core, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(monoio_compat::hyper::MonoioTimer)
        .header_read_timeout(timeout)
        .max_buf_size(cfg.http_head_bytes_max.max(8192))
        .serve_connection(io, service);
    match monoio::time::timeout(timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "http connection error"),
        Err(_) => tracing::debug!("http request timed out"),
    }
    // A response cut short (its body failed), or a request that ran out of time:
    // the client learns it now, not when its own timeout fires.
    sock.shutdown_both();
}

async fn route<A: App>(core: &Rc<Core<A>>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    core.metrics().http_requests.inc();
    let config = &core.shared.config;
    let Some(path) = req.uri().path().strip_prefix(config.path_prefix.as_str()) else {
        core.metrics().refused(Refusal::NotFound);
        return not_found();
    };
    let path = path.to_owned();
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let body_max = A::body_bytes_max(core, &path);
    if declared.is_some_and(|n| n > body_max) {
        core.metrics().refused(Refusal::BadRequest);
        let msg = format!("request body over {body_max} bytes");
        return error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &msg);
    }
    let known = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
    if known && req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return method_not_allowed("GET, HEAD");
    }
    if core.gate.is_closing() && !known {
        // Draining: only the probes and the metrics are still served.
        core.metrics().refused(Refusal::ShuttingDown);
        return shutting_down();
    }
    match path.as_str() {
        "/healthz" => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        "/readyz" => ready(core).await,
        "/metrics" => metrics(core, &req).await,
        "/ws" => error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only",
        ),
        _ => A::http(core, req, &path).await,
    }
}

/// The one 404 of every endpoint.
pub fn not_found() -> Response<Body> {
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// 503 `shutting_down` with `Retry-After`.
fn shutting_down() -> Response<Body> {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "server is shutting down",
    );
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from(RETRY_AFTER_SHUTDOWN_SECS),
    );
    r
}

async fn ready<A: App>(core: &Rc<Core<A>>) -> Response<Body> {
    if core.gate.is_closing() {
        return shutting_down();
    }
    match A::ready(core).await {
        Ok(()) => {
            let body = match A::degraded(core) {
                None => r#"{"status":"ready"}"#.into(),
                Some(why) => serde_json::json!({"status": "ready", "degraded": why}).to_string(),
            };
            json(StatusCode::OK, body)
        }
        Err(reason) => {
            tracing::warn!(%reason, "not ready");
            error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", &reason)
        }
    }
}

/// 401 `unauthorized` with the challenge RFC 9110 asks of a 401 (bearer tokens).
pub fn unauthorized(message: &str) -> Response<Body> {
    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// 405 `method_not_allowed` naming the methods the path takes.
pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("use {allow}"),
    );
    r.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    r
}

async fn metrics<A: App>(
    core: &Rc<Core<A>>,
    req: &Request<hyper::body::Incoming>,
) -> Response<Body> {
    let shared = &core.shared;
    if let Some(token) = &shared.config.metrics_token {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| crate::auth::bearer(v.to_str().ok()?));
        // Constant time: how long a refusal takes says nothing about how much
        // of the token a guess got right.
        if !given.is_some_and(|g| crate::secret::same(g.as_bytes(), token.as_bytes())) {
            core.metrics().refused(Refusal::Unauthorized);
            return unauthorized("metrics need the metrics token");
        }
    }
    // What `/readyz` would answer now, so that an alert needs no probe of its own.
    let ready = !core.gate.is_closing() && A::ready(core).await.is_ok();
    let text = format!(
        "# HELP chatbox_ready Whether /readyz answers 200 (storage reachable, not shutting down).\n\
         # TYPE chatbox_ready gauge\nchatbox_ready {}\n",
        u8::from(ready)
    ) + &crate::metrics::render(&shared.metrics)
        + &A::render_metrics(&shared.app);
    let mut r = Response::new(full(text));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
