//! Decides whether an upgrade request becomes a WebSocket: method and headers,
//! origin, then the JWT. Every refusal is an HTTP response with a JSON reason,
//! written before any upgrade happens.

use std::net::SocketAddr;

use crate::auth::{bearer, AuthError, Identity, Verifier};
use crate::metrics::Refusal;
use crate::runtime::http::head::{has_token, Head};
use crate::runtime::http::Refuse;
use crate::trace::TraceCtx;

/// Which connection machinery serves the socket after the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The chat protocol: authenticated, sharded by user.
    Chat,
    /// The opt-in echo endpoint for conformance runs: unauthenticated, stays on the
    /// accepting core.
    Echo,
}

/// An upgrade that passed every check; `Send`, so it can travel to the owning core.
#[derive(Debug)]
pub struct Upgrade {
    pub route: Route,
    pub identity: Option<Identity>,
    /// The token's `exp` (Unix seconds) on the chat route: the connection is closed
    /// (4001) when it passes, unless the client refreshes its token. 0: never.
    pub expires: u64,
    pub accept_key: String,
    /// Bytes the client sent after the head (early frames), fed to the WebSocket.
    pub leftover: Vec<u8>,
    pub peer: SocketAddr,
    /// The connection's trace: the client's `traceparent` when well formed (its
    /// trace id becomes the connection's id in every log line), else a new one.
    pub trace: TraceCtx,
}

impl Upgrade {
    /// The `101 Switching Protocols` response.
    pub fn response(&self) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            self.accept_key
        )
    }
}

/// Checks an upgrade request. `buf` holds the head and whatever followed it.
pub fn check(
    head: &Head,
    buf: &[u8],
    route: Route,
    verifier: &Verifier,
    allowed_origins: &[String],
    peer: SocketAddr,
) -> Result<Upgrade, Refuse> {
    let bad = |msg: &str| Refuse::new(400, "bad_request", msg, Refusal::BadRequest);
    if head.method != "GET" {
        return Err(Refuse::new(
            405,
            "method_not_allowed",
            "WebSocket upgrades use GET",
            Refusal::BadRequest,
        )
        .header("Allow", "GET"));
    }
    if !head.http11 {
        return Err(bad("WebSocket upgrades need HTTP/1.1"));
    }
    if !has_token(head.upgrade.as_deref(), "websocket")
        || !has_token(head.connection.as_deref(), "upgrade")
    {
        return Err(Refuse::new(
            426,
            "upgrade_required",
            "this endpoint speaks WebSocket only (Upgrade: websocket, Connection: Upgrade)",
            Refusal::BadRequest,
        )
        .header("Upgrade", "websocket"));
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(Refuse::new(
            426,
            "upgrade_required",
            "Sec-WebSocket-Version must be 13",
            Refusal::BadRequest,
        )
        .header("Sec-WebSocket-Version", "13"));
    }
    let key = match head.ws_key.as_deref() {
        Some(k) if k.len() == 24 && k.ends_with("==") => k,
        _ => return Err(bad("Sec-WebSocket-Key must be 16 bytes in base64")),
    };
    let (origin, host) = (head.origin.as_deref(), head.host.as_deref());
    if !origin_allowed(origin, host, allowed_origins) {
        return Err(Refuse::new(
            403,
            "forbidden",
            "origin not allowed; add it to CHATBOX_ALLOWED_ORIGINS",
            Refusal::Forbidden,
        ));
    }
    let (identity, expires) = match route {
        Route::Echo => (None, 0),
        Route::Chat => authenticate(head, verifier).map(|(id, exp)| (Some(id), exp))?,
    };
    Ok(Upgrade {
        route,
        identity,
        expires,
        accept_key: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        leftover: buf[head.len..].to_vec(),
        peer,
        trace: trace_of(head),
    })
}

/// The connection's trace: a span of the client's when its `traceparent` is well
/// formed, else a new trace (W3C: an invalid one is ignored, never refused).
fn trace_of(head: &Head) -> TraceCtx {
    head.traceparent
        .as_deref()
        .and_then(TraceCtx::parse)
        .map_or_else(TraceCtx::new, |client| client.child())
}

/// The token from `Authorization: Bearer`, else from `?token=` (browsers cannot set
/// headers on a WebSocket). Returns the caller and the token's `exp`.
fn authenticate(head: &Head, verifier: &Verifier) -> Result<(Identity, u64), Refuse> {
    let from_header = head.authorization.as_deref().and_then(bearer);
    let token = from_header
        .map(str::to_owned)
        .or_else(|| head.query_param("token"))
        .ok_or(AuthError::Missing);
    let unauthorized = |e: AuthError| {
        let msg = match e {
            AuthError::Missing => "a token is required (Authorization: Bearer, or ?token=)",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid (nbf)",
            AuthError::Invalid(_) => "invalid token",
        };
        tracing::debug!(error = %e, "upgrade refused: bad token");
        Refuse::new(401, "unauthorized", msg, Refusal::Unauthorized)
            .header("WWW-Authenticate", "Bearer")
    };
    token
        .and_then(|t| verifier.verify_until(&t))
        .map_err(unauthorized)
}

/// No `Origin`: not a browser, allowed. Otherwise the origin must be listed, or
/// `*` must be listed, or it must be this server's own origin (same host).
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let authority = origin.split_once("://").map(|(_, a)| a);
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_matrix() {
        let none: Vec<String> = vec![];
        let list = vec!["https://app.example".to_string()];
        let star = vec!["*".to_string()];
        assert!(
            origin_allowed(None, Some("h"), &none),
            "non-browser clients pass"
        );
        assert!(!origin_allowed(
            Some("https://evil.example"),
            Some("api.example"),
            &none
        ));
        assert!(
            origin_allowed(Some("https://api.example"), Some("api.example"), &none),
            "same origin"
        );
        assert!(origin_allowed(
            Some("https://APP.example"),
            Some("api.example"),
            &list
        ));
        assert!(!origin_allowed(
            Some("https://app.example.evil"),
            Some("api.example"),
            &list
        ));
        assert!(!origin_allowed(Some("null"), Some("api.example"), &list));
        assert!(origin_allowed(Some("https://any.example"), None, &star));
    }
}
