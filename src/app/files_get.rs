//! `GET {prefix}/files/{file_id}`: an uploaded file for its owner and for admins
//! (404 for everyone else, whether or not it exists), served as an attachment
//! that no browser renders in place, whole or one byte range (audio players ask
//! for ranges).
//!
//! Chunks are read and opened on the blocking pool and reach the connection
//! through a bounded paged body: one chunk or two in memory per download.

use std::rc::Rc;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::files::{authorize, FileApiError};
use super::Core;
use crate::runtime::app::Body;
use crate::runtime::http::{paged, Pages};
use crate::store::files::sealed::{read_chunk, CHUNK_BYTES};
use crate::store::files::FileStore;
use crate::store::FileRecord;

/// Chunks waiting for the connection to write them.
const PAGES_MAX: usize = 2;
/// What a download may do in a browser: nothing.
const CSP: &str = "default-src 'none'; sandbox";

/// An inclusive byte range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: u64,
    pub last: u64,
}

/// The one range of a `Range` header for a file of `size` bytes: `Ok(None)` to
/// serve the whole file (no header, a unit other than bytes, several ranges:
/// RFC 9110 lets a server ignore those), `Err(())` when it lies outside the file.
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<Span>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let span = if a.is_empty() {
        // The last `b` bytes.
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || size == 0 {
            return Err(());
        }
        Span {
            first: size.saturating_sub(n),
            last: size - 1,
        }
    } else {
        let first: u64 = a.parse().map_err(|_| ())?;
        let last = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        if first >= size || last < first {
            return Err(());
        }
        Span { first, last }
    };
    Ok(Some(span))
}

/// `Content-Disposition: attachment` with the display name: an ASCII fallback
/// and the exact name percent-encoded (RFC 6266).
fn disposition(name: Option<&str>) -> String {
    let Some(name) = name else {
        return "attachment".into();
    };
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .filter(|c| *c != '"' && *c != '\\')
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

pub(super) async fn download(
    core: &Rc<Core>,
    req: &Request<Incoming>,
    id: &str,
) -> Result<Response<Body>, FileApiError> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return Err(FileApiError::Method("GET, HEAD"));
    }
    let who = authorize(core, req)?;
    let shared = &core.shared.app;
    let id = percent_encoding::percent_decode_str(id)
        .decode_utf8()
        .map_err(|_| FileApiError::NotFound)?;
    if id.is_empty() || id.len() > 128 || id.contains('/') {
        return Err(FileApiError::NotFound);
    }
    let record = match shared.store.file(&id).await? {
        Some(r) if who.admin || *r.owner == *who.user_id => r,
        // Someone else's file looks exactly like no file.
        _ => return Err(FileApiError::NotFound),
    };
    // Read from the place its record names, whatever new uploads use now.
    let store = shared.files.stores.get(&record.location).ok_or_else(|| {
        tracing::warn!(file = %record.file_id, location = %record.location, "a file is kept in a file store this node is not configured for");
        FileApiError::Unavailable("the file's storage is not configured on this server")
    })?;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let span = parse_range(range, record.size).map_err(|()| FileApiError::Range(record.size))?;
    let whole = Span {
        first: 0,
        last: record.size.saturating_sub(1),
    };
    let serve = span.unwrap_or(whole);
    let len = if record.size == 0 {
        0
    } else {
        serve.last - serve.first + 1
    };
    // The first chunk is read before the status goes out: a file whose bytes are
    // missing or unreadable is a clear 503, not a 200 cut short.
    // Shared with the reads on the pool (one record, never copied).
    let record = Arc::new(record);
    let first = if req.method() == hyper::Method::GET && len > 0 {
        Some(first_chunk(core, store.clone(), record.clone(), serve).await?)
    } else {
        None
    };
    let (pages, body) = paged(PAGES_MAX);
    let mut r = Response::new(body);
    let h = r.headers_mut();
    let mut put = |k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put(header::CONTENT_TYPE, record.mime.clone());
    put(header::CONTENT_LENGTH, len.to_string());
    put(
        header::CONTENT_DISPOSITION,
        disposition(record.name.as_deref()),
    );
    put(header::X_CONTENT_TYPE_OPTIONS, "nosniff".into());
    put(header::CONTENT_SECURITY_POLICY, CSP.into());
    put(header::ACCEPT_RANGES, "bytes".into());
    put(header::CACHE_CONTROL, "private, no-store".into());
    if let Some(s) = span {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        let h = r.headers_mut();
        if let Ok(v) = format!("bytes {}-{}/{}", s.first, s.last, record.size).parse() {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    if let Some(first) = first {
        let keys = shared.keys.clone();
        let work = send_chunks(store, keys, record, serve, first, pages);
        if let Err(e) = shared.pool.spawn(work) {
            tracing::warn!(error = %e, "a download could not start");
            return Err(FileApiError::Unavailable(
                "the server is too busy to serve files; retry",
            ));
        }
    }
    Ok(r)
}

/// On the pool: reads, opens and sends the chunks that hold `span`, each cut
/// to the span. A chunk that fails to open (tampered, key gone) cuts the body
/// short, visibly: the status line went out already.
async fn send_chunks(
    store: Arc<dyn FileStore>,
    keys: Arc<crate::crypto::KeyRing>,
    record: Arc<FileRecord>,
    span: Span,
    first: Vec<u8>,
    pages: Pages,
) {
    let chunk = CHUNK_BYTES as u64;
    let mut first = Some(first);
    for index in span.first / chunk..=span.last / chunk {
        let read = match first.take() {
            Some(plain) => Ok(plain),
            None => open_chunk(store.clone(), keys.clone(), record.clone(), index).await,
        };
        let plain = match read {
            Ok(p) => p,
            Err(e) => return pages.fail(e).await,
        };
        let start = index * chunk;
        let from = span.first.saturating_sub(start) as usize;
        let to = ((span.last + 1 - start) as usize).min(plain.len());
        if from >= to || !pages.send(plain[from..to].to_vec()).await {
            return;
        }
    }
}

/// Reads and opens chunk `index` on a blocking thread; a failure is logged and
/// described.
async fn open_chunk(
    store: Arc<dyn FileStore>,
    keys: Arc<crate::crypto::KeyRing>,
    record: Arc<FileRecord>,
    index: u64,
) -> Result<Vec<u8>, String> {
    let r = record.clone();
    let read = tokio::task::spawn_blocking(move || {
        read_chunk(&*store, &keys, &r.file_id, r.key_id, r.size, index)
    })
    .await;
    match read {
        Ok(Ok(plain)) => Ok(plain),
        Ok(Err(e)) => {
            tracing::error!(file = %record.file_id, error = %e, "a stored file failed to open");
            Err(e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The first chunk of `span`, read on the pool before the response starts.
async fn first_chunk(
    core: &Core,
    store: Arc<dyn FileStore>,
    record: Arc<FileRecord>,
    span: Span,
) -> Result<Vec<u8>, FileApiError> {
    let shared = &core.shared.app;
    let keys = shared.keys.clone();
    let index = span.first / CHUNK_BYTES as u64;
    let read = shared.pool.call(open_chunk(store, keys, record, index));
    match read.await {
        Ok(Ok(plain)) => Ok(plain),
        Ok(Err(_)) => Err(FileApiError::Unavailable(
            "the file's stored bytes could not be read; nothing was sent",
        )),
        Err(_) => Err(FileApiError::Unavailable(
            "the server is too busy to serve files; retry",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let s = |first, last| Ok(Some(Span { first, last }));
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-3"), 10), s(0, 3));
        assert_eq!(parse_range(Some("bytes=5-"), 10), s(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), s(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), s(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), s(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=4-2"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=x-2"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 10), Ok(None));
    }

    #[test]
    fn names_in_the_disposition_cannot_break_out() {
        assert_eq!(disposition(None), "attachment");
        let d = disposition(Some("a\"b é.png"));
        assert!(
            d.starts_with(
                "attachment; filename=\"ab _.png\"; filename*=UTF-8''a%22b%20%C3%A9%2Epng"
            ),
            "{d}"
        );
    }
}
