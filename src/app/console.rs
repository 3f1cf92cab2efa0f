//! The web console under `{prefix}/console/`: the agent console, the user's chat
//! page and the embeddable widget, compiled into the binary from `console/`.
//!
//! Nothing is built at run time and nothing comes from a CDN: every file is
//! listed in [`ASSETS`] (tests/console.rs checks the list against the directory),
//! served with its type, an ETag and a Content-Security-Policy that allows no
//! inline script, so a message shown as text can never run as code.

use std::sync::OnceLock;

use hyper::{Method, Request, Response, StatusCode};

use crate::runtime::app::{full, Body};

/// One embedded file: its name under `console/`, its type, its bytes.
struct Asset {
    name: &'static str,
    mime: &'static str,
    bytes: &'static [u8],
}

macro_rules! assets {
    ($($name:literal => $mime:literal),* $(,)?) => {
        &[$(Asset {
            name: $name,
            mime: $mime,
            bytes: include_bytes!(concat!("../../console/", $name)),
        }),*]
    };
}

/// Every file of `console/`.
const ASSETS: &[Asset] = assets! {
    "index.html" => "text/html; charset=utf-8",
    "chat.html" => "text/html; charset=utf-8",
    "console.css" => "text/css; charset=utf-8",
    "agent.js" => "text/javascript; charset=utf-8",
    "agent.css" => "text/css; charset=utf-8",
    "widget.js" => "text/javascript; charset=utf-8",
    "widget.css" => "text/css; charset=utf-8",
};

/// The names [`ASSETS`] holds, for the test that compares them with `console/`.
pub fn asset_names() -> Vec<&'static str> {
    ASSETS.iter().map(|a| a.name).collect()
}

/// No inline script or style, nothing from elsewhere; WebSockets and uploads to
/// this origin only; media from blobs (recorded voice notes); never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; \
    font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Serves `path` (prefix stripped, starting with `/console`); `None` when the
/// path is not the console's.
pub fn handle(req: &Request<hyper::body::Incoming>, path: &str) -> Option<Response<Body>> {
    let rest = path.strip_prefix("/console")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Some(crate::runtime::http::method_not_allowed("GET, HEAD"));
    }
    // `/console` itself: the relative links of the page need the slash.
    if rest.is_empty() {
        let mut r = Response::new(full(bytes::Bytes::new()));
        *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
        let to = format!("{}/", req.uri().path());
        if let Ok(v) = to.parse() {
            r.headers_mut().insert(hyper::header::LOCATION, v);
        }
        return Some(r);
    }
    let name = match &rest[1..] {
        "" => "index.html",
        name => name,
    };
    let Some((i, asset)) = ASSETS.iter().enumerate().find(|(_, a)| a.name == name) else {
        return Some(crate::runtime::http::not_found());
    };
    let etag = &etags()[i];
    let fresh = req
        .headers()
        .get(hyper::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut r = if fresh {
        let mut r = Response::new(full(bytes::Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if req.method() == Method::HEAD {
        Response::new(full(bytes::Bytes::new()))
    } else {
        Response::new(full(bytes::Bytes::from_static(asset.bytes)))
    };
    decorate(&mut r, asset, etag);
    Some(r)
}

fn decorate(r: &mut Response<Body>, asset: &Asset, etag: &str) {
    use hyper::header::{self, HeaderValue};
    let h = r.headers_mut();
    let set = |h: &mut hyper::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_TYPE, asset.mime);
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // The token rides in the URL fragment, which no Referer carries; this also
    // keeps the console's paths from other sites.
    set(h, header::REFERRER_POLICY, "no-referrer");
    // Revalidated on every load: a new binary's console is seen at once.
    set(h, header::CACHE_CONTROL, "no-cache");
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
}

/// Each asset's ETag: a hash of its bytes, computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        use sha2::Digest;
        ASSETS
            .iter()
            .map(|a| format!("\"{}\"", hex::encode(&sha2::Sha256::digest(a.bytes)[..12])))
            .collect()
    })
}
