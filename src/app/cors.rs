//! CORS for what a customer's own site calls across origins (`/upload` and
//! `/files/...`): answered for the origins of `allowed_origins` exactly, and for
//! no other; never with credentials (the token travels in `Authorization`, which
//! a preflight must allow, not in a cookie).

use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use crate::runtime::app::{full, Body};

/// How long a browser may keep a preflight's answer.
const PREFLIGHT_MAX_AGE_SECS: &str = "600";

/// The request's `Origin` when `allowed` admits it (`*` there admits any; it is
/// echoed, never sent as `*`), else `None`: the response then carries no CORS
/// header and the browser keeps it from the page.
pub fn allowed_origin(headers: &HeaderMap, allowed: &[String]) -> Option<HeaderValue> {
    let origin = headers.get(hyper::header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(text))
        .then(|| origin.clone())
}

/// The answer to a preflight (`OPTIONS`) for a path taking `methods`.
pub fn preflight(origin: Option<HeaderValue>, methods: &'static str) -> Response<Body> {
    let mut r = Response::new(full(String::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(hyper::header::ALLOW, HeaderValue::from_static(methods));
    if let Some(origin) = origin {
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, range"),
        );
        h.insert(
            hyper::header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECS),
        );
        h.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    h.insert(hyper::header::VARY, HeaderValue::from_static("origin"));
    r
}

/// Marks a response for an admitted origin, exposing what a page needs to read.
pub fn decorate(r: &mut Response<Body>, origin: Option<HeaderValue>) {
    let h = r.headers_mut();
    h.insert(hyper::header::VARY, HeaderValue::from_static("origin"));
    if let Some(origin) = origin {
        h.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            hyper::header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("content-disposition, content-range, retry-after"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_origin(o: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(hyper::header::ORIGIN, HeaderValue::from_str(o).unwrap());
        h
    }

    #[test]
    fn only_the_listed_origins_are_admitted_and_echoed() {
        let list = vec!["https://shop.example".to_string()];
        let got = allowed_origin(&with_origin("https://shop.example"), &list);
        assert_eq!(got.unwrap(), "https://shop.example");
        assert!(allowed_origin(&with_origin("https://evil.example"), &list).is_none());
        assert!(
            allowed_origin(&HeaderMap::new(), &list).is_none(),
            "no Origin: not CORS"
        );
        assert!(allowed_origin(&with_origin("https://shop.example"), &[]).is_none());
        let star = vec!["*".to_string()];
        let any = allowed_origin(&with_origin("https://a.example"), &star).unwrap();
        assert_eq!(any, "https://a.example", "echoed, never `*`");
    }
}
