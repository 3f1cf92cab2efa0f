//! Uploads: `POST {prefix}/upload` takes a file (the raw body, or the one `file`
//! part of a `multipart/form-data` body), decides its type from its first bytes,
//! and streams it, sealed, to the file store; `GET {prefix}/files/{id}` (in
//! `files_get`) gives it back to its owner and to admins.
//!
//! The core only moves bytes: sealing, hashing and every file operation run on
//! the blocking pool (`store::files::sealed::store_stream`), fed through a
//! bounded channel, so memory per upload stays a few chunks whatever its size.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::Core;
use crate::auth::{bearer, Identity};
use crate::clock::{new_id, now_ms};
use crate::config::Config;
use crate::media::{ScrubError, Scrubber};
use crate::runtime::app::Body;
use crate::runtime::http::{error, json as json_response};
use crate::store::files::sealed::{store_stream, FileError, Piece};
use crate::store::files::{FileStore, FileStores};
use crate::store::{FileRecord, StoreError, WriteOp};

/// Bytes looked at to decide an upload's type (the longest signature `infer`
/// reads, WebM's, is within the first 256).
const SNIFF_BYTES: usize = 8 * 1024;
/// What a multipart body may carry beyond its file: boundaries, part headers,
/// small other fields.
pub const MULTIPART_SLACK_BYTES: u64 = 64 * 1024;
/// Below this many bytes a file of no known type is called too short rather
/// than unknown (`infer` needs 257 bytes to see a WebM).
const TYPE_BYTES_MIN: usize = 512;

/// Pieces queued between the core and the sealing task.
const PIECES_IN_FLIGHT: usize = 4;
/// After a refusal, how much of the rest of the body is read and dropped so the
/// client, still sending, reads the answer instead of a reset connection.
const DRAIN_BYTES_MAX: u64 = 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
/// Longest display name kept, in characters.
const NAME_CHARS_MAX: usize = 128;

/// Uploads: where their bytes go and what they may be.
pub struct Files {
    /// Where uploads go and where each recorded file is read from.
    pub stores: FileStores,
    pub bytes_max: u64,
    pub types: Vec<String>,
    /// 0: none.
    pub quota_bytes: u64,
    pub rate_per_minute: u32,
}

impl Files {
    /// Uploads go to `stores`' current place (opened at start).
    pub fn new(config: &Config, stores: FileStores) -> Files {
        Files {
            stores,
            bytes_max: config.upload_bytes_max,
            types: config.upload_types_allowed.clone(),
            quota_bytes: config.upload_quota_bytes,
            rate_per_minute: config.upload_rate_limit_per_minute,
        }
    }
}

/// Why an upload or a download failed; mapped to its response in one place.
#[derive(Debug, thiserror::Error)]
pub(super) enum FileApiError {
    #[error("a token is required (Authorization: Bearer)")]
    Unauthorized,
    #[error("upload rate limit reached; retry in {0} s")]
    RateLimited(u64),
    #[error("the file is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the file does not fit in the storage quota ({0} bytes per user)")]
    Quota(u64),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("no such file")]
    NotFound,
    #[error("use {0}")]
    Method(&'static str),
    #[error("the range is outside the file")]
    Range(u64),
    #[error("storage is unavailable; retry")]
    Storage(#[from] StoreError),
    #[error("file storage failed; retry")]
    File(#[from] FileError),
    #[error("{0}")]
    Unavailable(&'static str),
}

impl FileApiError {
    pub(super) fn into_response(self, core: &Core) -> Response<Body> {
        use crate::metrics::Refusal;
        let (status, code) = match &self {
            FileApiError::Unauthorized => {
                core.metrics().refused(Refusal::Unauthorized);
                return crate::runtime::http::unauthorized(&self.to_string());
            }
            FileApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            FileApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            FileApiError::Quota(_) => (StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded"),
            FileApiError::Unsupported(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            FileApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            FileApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            FileApiError::Method(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            FileApiError::Range(_) => (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable"),
            FileApiError::Storage(e) => {
                tracing::error!(error = %e, "file API storage error");
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            FileApiError::File(e) => {
                tracing::error!(error = %e, "file store error");
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            FileApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        let mut r = error(status, code, &self.to_string());
        let h = r.headers_mut();
        match self {
            FileApiError::RateLimited(secs) => {
                h.insert(hyper::header::RETRY_AFTER, secs.into());
            }
            FileApiError::Range(size) => {
                if let Ok(v) = format!("bytes */{size}").parse() {
                    h.insert(hyper::header::CONTENT_RANGE, v);
                }
            }
            FileApiError::Method(allow) => {
                h.insert(
                    hyper::header::ALLOW,
                    hyper::header::HeaderValue::from_static(allow),
                );
            }
            _ => {}
        }
        r
    }
}

/// `/upload` and `/files/...`; `None` for any other path.
/// Whether `path` is one of the files endpoints (their routing and their longer
/// request timeout go by the same rule).
pub fn serves(path: &str) -> bool {
    path == "/upload" || path.starts_with("/files/")
}

pub async fn handle(core: &Rc<Core>, req: Request<Incoming>, path: &str) -> Option<Response<Body>> {
    let methods = match path {
        "/upload" => "POST, OPTIONS",
        p if p.starts_with("/files/") => "GET, HEAD, OPTIONS",
        _ => return None,
    };
    let origin = super::cors::allowed_origin(req.headers(), &core.shared.config.allowed_origins);
    if req.method() == hyper::Method::OPTIONS {
        return Some(super::cors::preflight(origin, methods));
    }
    let result = match path.strip_prefix("/files/") {
        Some(id) => super::files_get::download(core, &req, id).await,
        None => {
            let uploaded = upload(core, req).await;
            if uploaded.is_err() {
                core.metrics().uploads_refused.inc();
            }
            uploaded
        }
    };
    let mut response = result.unwrap_or_else(|e| e.into_response(core));
    super::cors::decorate(&mut response, origin);
    Some(response)
}

/// The token's identity, user or admin.
pub(super) fn authorize(core: &Core, req: &Request<Incoming>) -> Result<Identity, FileApiError> {
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| bearer(v.to_str().ok()?))
        .ok_or(FileApiError::Unauthorized)?;
    core.shared
        .verifier
        .verify(token)
        .map_err(|_| FileApiError::Unauthorized)
}

/// Where the file's bytes come from: the whole body, or one multipart part.
enum Source {
    Raw(Incoming),
    /// The parser, and the `file` part while it is read (dropped before the
    /// parser is asked for the next part: multer allows one at a time).
    Part(Box<Multipart>),
}

/// A multipart body: the parser, and the `file` part while it is read.
struct Multipart {
    parser: multer::Multipart<'static>,
    field: Option<multer::Field<'static>>,
}

impl Source {
    /// The next bytes of the file; `None` at its end.
    async fn next(&mut self) -> Result<Option<Bytes>, FileApiError> {
        let lost = |e: String| FileApiError::BadRequest(format!("the upload broke off: {e}"));
        match self {
            Source::Raw(body) => loop {
                match body.frame().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(lost(e.to_string())),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Ok(Some(data));
                        }
                    }
                }
            },
            Source::Part(part) => match &mut part.field {
                Some(field) => field.chunk().await.map_err(multipart_error),
                None => Ok(None),
            },
        }
    }

    /// After the file: a multipart body may hold no second `file` part.
    async fn finish(&mut self) -> Result<(), FileApiError> {
        if let Source::Part(part) = self {
            drop(part.field.take());
            while let Some(field) = part.parser.next_field().await.map_err(multipart_error)? {
                if field.name() == Some("file") {
                    return Err(FileApiError::BadRequest(
                        "send one `file` part per upload".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads and drops what is left of the body, within bounds, so that a
    /// client still sending reads the refusal.
    async fn drain(self) {
        let work = async move {
            let mut left = DRAIN_BYTES_MAX;
            let mut body = match self {
                Source::Raw(body) => body,
                // multer owns the stream; its parser reads on while asked.
                Source::Part(part) => {
                    let Multipart { mut parser, field } = *part;
                    if let Some(mut field) = field {
                        while let Ok(Some(b)) = field.chunk().await {
                            left = left.saturating_sub(b.len() as u64);
                            if left == 0 {
                                return;
                            }
                        }
                    }
                    while let Ok(Some(_)) = parser.next_field().await {}
                    return;
                }
            };
            while let Some(Ok(frame)) = body.frame().await {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                left = left.saturating_sub(n);
                if left == 0 {
                    return;
                }
            }
        };
        let _ = monoio::time::timeout(DRAIN_TIME, work).await;
    }
}

fn multipart_error(e: multer::Error) -> FileApiError {
    match e {
        multer::Error::StreamSizeExceeded { limit } => FileApiError::TooLarge(limit),
        e => FileApiError::BadRequest(format!("malformed multipart body: {e}")),
    }
}

/// Opens the body: the raw bytes, or the first `file` part of a multipart body
/// (and its file name).
async fn open_source(
    req: Request<Incoming>,
    bytes_max: u64,
) -> Result<(Source, Option<String>), FileApiError> {
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let query_name = req.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "name")
            .map(|(_, v)| v.into_owned())
    });
    let body = req.into_body();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return Ok((Source::Raw(body), query_name));
    }
    let boundary = multer::parse_boundary(&content_type)
        .map_err(|_| FileApiError::BadRequest("multipart/form-data needs a boundary".into()))?;
    let limits = multer::Constraints::new().size_limit(
        multer::SizeLimit::new().whole_stream(bytes_max.saturating_add(MULTIPART_SLACK_BYTES)),
    );
    let stream = http_body_util::BodyDataStream::new(body);
    let mut mp = multer::Multipart::with_constraints(stream, boundary, limits);
    while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
        if field.name() == Some("file") {
            let name = field.file_name().map(str::to_owned);
            let part = Multipart {
                parser: mp,
                field: Some(field),
            };
            return Ok((Source::Part(Box::new(part)), name));
        }
    }
    Err(FileApiError::BadRequest(
        "the multipart body has no `file` part".into(),
    ))
}

/// The client's file name as a display name only: its last path component,
/// without control characters, quotes or characters file systems refuse, no
/// leading dots, at most [`NAME_CHARS_MAX`] characters; `None` if nothing is left.
pub fn display_name(raw: &str) -> Option<String> {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let kept: String = base
        .chars()
        .filter(|c| !c.is_control() && !"\"'<>:|?*;`$%".contains(*c))
        .take(NAME_CHARS_MAX)
        .collect();
    let name = kept.trim().trim_start_matches('.').trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// How much more `user` may store, and the size cap of this upload.
struct Room {
    cap: u64,
    /// The cap is the quota's, not the size limit's.
    quota_bound: bool,
}

async fn room(core: &Core, user: &str, declared: Option<u64>) -> Result<Room, FileApiError> {
    let files = &core.shared.app.files;
    if files.quota_bytes == 0 {
        return Ok(Room {
            cap: files.bytes_max,
            quota_bound: false,
        });
    }
    let used = core.shared.app.store.files_bytes(user).await?;
    let left = files.quota_bytes.saturating_sub(used);
    if left == 0 || declared.is_some_and(|n| n > left) {
        return Err(FileApiError::Quota(files.quota_bytes));
    }
    Ok(Room {
        cap: files.bytes_max.min(left),
        quota_bound: left < files.bytes_max,
    })
}

impl Room {
    fn exceeded(&self, core: &Core) -> FileApiError {
        let files = &core.shared.app.files;
        if self.quota_bound {
            FileApiError::Quota(files.quota_bytes)
        } else {
            FileApiError::TooLarge(files.bytes_max)
        }
    }
}

/// `POST /upload`: checks, then streams the file to storage and records it.
async fn upload(core: &Rc<Core>, req: Request<Incoming>) -> Result<Response<Body>, FileApiError> {
    if req.method() != hyper::Method::POST {
        return Err(FileApiError::Method("POST"));
    }
    let who = authorize(core, &req)?;
    core.app
        .upload_rate_check(&who.user_id, now_ms())
        .map_err(|ms| FileApiError::RateLimited(ms.div_ceil(1000).max(1)))?;
    let files = &core.shared.app.files;
    let store = files
        .stores
        .current()
        .ok_or(FileApiError::Unavailable("file storage is not available"))?;
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let multipart = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("multipart/"));
    let slack = if multipart { MULTIPART_SLACK_BYTES } else { 0 };
    // Refused before a byte of the body is read.
    if declared.is_some_and(|n| n > files.bytes_max.saturating_add(slack)) {
        return Err(FileApiError::TooLarge(files.bytes_max));
    }
    let room = room(core, &who.user_id, declared.filter(|_| !multipart)).await?;
    let (mut source, name) = open_source(req, files.bytes_max).await?;
    match receive(core, store, &mut source, &room).await {
        Ok(sealed) => {
            let record = FileRecord {
                name: name.as_deref().and_then(display_name),
                owner: who.user_id.to_string(),
                ..sealed
            };
            record_file(core, record).await
        }
        Err(e) => {
            source.drain().await;
            Err(e)
        }
    }
}

/// Reads the file: its type from the first bytes, then everything through the
/// sealing task. The record it returns lacks owner and name.
async fn receive(
    core: &Rc<Core>,
    store: Arc<dyn FileStore>,
    source: &mut Source,
    room: &Room,
) -> Result<FileRecord, FileApiError> {
    let (held, total, ended) = first_bytes(core, source, room).await?;
    let mime = sniff(core, &held)?;
    let file_id = new_id("f");
    let shared = &core.shared.app;
    let (tx, rx) = async_channel::bounded(PIECES_IN_FLIGHT);
    let task = store_stream(store.clone(), shared.keys.clone(), file_id.to_string(), rx);
    let writing = monoio::spawn(shared.pool.call(task));
    let fed = feed(core, source, room, (held, total, ended), &mime, &tx).await;
    // Closing the channel without `End` makes the task drop what it wrote.
    drop(tx);
    let written = writing.await;
    if let Err(Stop::Refused(refused)) = fed {
        return Err(refused);
    }
    let sealed = written
        .map_err(|_| FileApiError::Unavailable("the server is too busy to store files; retry"))??;
    Ok(FileRecord {
        file_id: file_id.to_string(),
        owner: String::new(),
        mime,
        size: sealed.size,
        sha256: sealed.sha256,
        name: None,
        created_at: now_ms(),
        key_id: sealed.key_id,
        location: store.name().to_owned(),
    })
}

/// Why feeding the sealing task stopped early.
enum Stop {
    /// The upload was refused (too large, malformed): the answer says why.
    Refused(FileApiError),
    /// The sealing task is gone; its own result says why.
    Closed,
}

impl From<FileApiError> for Stop {
    fn from(e: FileApiError) -> Stop {
        Stop::Refused(e)
    }
}

/// Feeds the sealing task the file: the first bytes already read (`first`: the
/// pieces, their length, whether the file ended there), then the rest of
/// `source`. Images lose their location metadata on the way.
async fn feed(
    core: &Core,
    source: &mut Source,
    room: &Room,
    first: (Vec<Bytes>, u64, bool),
    mime: &str,
    tx: &async_channel::Sender<Piece>,
) -> Result<(), Stop> {
    let (held, mut total, ended) = first;
    let mut scrub = Scrubber::for_mime(mime);
    for b in held {
        send(tx, clean(&mut scrub, b)?).await?;
    }
    let mut more = !ended;
    while more {
        let Some(b) = source.next().await? else {
            more = false;
            continue;
        };
        total += b.len() as u64;
        if total > room.cap {
            return Err(room.exceeded(core).into());
        }
        send(tx, clean(&mut scrub, b)?).await?;
    }
    source.finish().await?;
    let mut rest = Vec::new();
    if let Some(s) = &mut scrub {
        s.finish(&mut rest).map_err(unreadable_image)?;
        if s.removed() {
            core.metrics().upload_locations_removed.inc();
        }
    }
    send(tx, rest).await?;
    tx.send(Piece::End).await.map_err(|_| Stop::Closed)
}

async fn send(tx: &async_channel::Sender<Piece>, pieces: Vec<Bytes>) -> Result<(), Stop> {
    for b in pieces.into_iter().filter(|b| !b.is_empty()) {
        tx.send(Piece::Data(b)).await.map_err(|_| Stop::Closed)?;
    }
    Ok(())
}

/// The pieces of `b` that may be stored: as they came, or cleaned of location
/// metadata when the type carries it.
fn clean(scrub: &mut Option<Scrubber>, b: Bytes) -> Result<Vec<Bytes>, FileApiError> {
    let Some(s) = scrub else {
        return Ok(vec![b]);
    };
    let mut out = Vec::new();
    s.push(b, &mut out).map_err(unreadable_image)?;
    Ok(out)
}

fn unreadable_image(e: ScrubError) -> FileApiError {
    FileApiError::BadRequest(format!(
        "{e}; an image is stored only once its location metadata can be removed"
    ))
}

/// The file's first [`SNIFF_BYTES`] (or all of it): the pieces, their length,
/// and whether the file ended there.
async fn first_bytes(
    core: &Core,
    source: &mut Source,
    room: &Room,
) -> Result<(Vec<Bytes>, u64, bool), FileApiError> {
    let mut held: Vec<Bytes> = Vec::new();
    let mut total: u64 = 0;
    while total < SNIFF_BYTES as u64 {
        let Some(b) = source.next().await? else {
            return Ok((held, total, true));
        };
        total += b.len() as u64;
        held.push(b);
        if total > room.cap {
            return Err(room.exceeded(core));
        }
    }
    Ok((held, total, false))
}

/// The type of the file from its first bytes, if it is allowed.
fn sniff(core: &Core, held: &[Bytes]) -> Result<String, FileApiError> {
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    for b in held {
        let take = (SNIFF_BYTES - head.len()).min(b.len());
        head.extend_from_slice(&b[..take]);
    }
    if head.is_empty() {
        return Err(FileApiError::BadRequest("the file is empty".into()));
    }
    let allowed = &core.shared.app.files.types;
    match infer::get(&head).map(|t| t.mime_type()) {
        Some(mime) if allowed.iter().any(|a| a == mime) => Ok(mime.to_owned()),
        // Some signatures need more bytes than a near-empty file has (a WebM
        // recorder stopped at once: its header alone, about 200 bytes).
        None if head.len() < TYPE_BYTES_MIN => Err(FileApiError::Unsupported(format!(
            "the file is too short ({} bytes) to tell its type (an empty recording?); allowed: {}",
            head.len(),
            allowed.join(", ")
        ))),
        found => Err(FileApiError::Unsupported(format!(
            "the file's content is {}, which is not allowed; allowed: {}",
            found.unwrap_or("of no known type"),
            allowed.join(", ")
        ))),
    }
}

/// Records the file; its bytes are deleted again when that fails.
async fn record_file(core: &Rc<Core>, record: FileRecord) -> Result<Response<Body>, FileApiError> {
    let shared = &core.shared.app;
    let body = json!({
        "file_id": record.file_id,
        "mime": record.mime,
        "size": record.size,
        "sha256": record.sha256,
        "name": record.name,
    });
    let (id, size) = (record.file_id.clone(), record.size);
    let record_location = record.location.clone();
    if let Err(e) = shared.store.write(vec![WriteOp::PutFile(record)]).await {
        if let Some(store) = shared.files.stores.get(&record_location) {
            let gone = shared
                .pool
                .call(async move { tokio::task::spawn_blocking(move || store.delete(&id)).await });
            if let Ok(Ok(Err(err))) = gone.await {
                tracing::warn!(error = %err, "an unrecorded upload's bytes could not be deleted");
            }
        }
        return Err(e.into());
    }
    core.metrics().uploads.inc();
    core.metrics().upload_bytes.add(size);
    Ok(json_response(StatusCode::CREATED, body.to_string()))
}

/// Deletes the bytes of these files (their records still exist: each names
/// the place that holds its bytes), on the blocking pool; returns how many
/// could not be deleted (each is logged). A record whose place this node does
/// not reach counts as not deleted, so the caller keeps the records and says so.
pub async fn delete_objects(core: &Core, ids: Vec<String>) -> usize {
    let n = ids.len();
    let mut places = Vec::with_capacity(n);
    for id in ids {
        let location = match core.shared.app.store.file(&id).await {
            Ok(Some(r)) => r.location,
            // Gone already: nothing to delete.
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(file = %id, error = %e, "a deleted user's file record could not be read");
                places.push((id, None));
                continue;
            }
        };
        let store = core.shared.app.files.stores.get(&location);
        if store.is_none() {
            tracing::warn!(file = %id, location = %location, "a deleted user's file is kept where this node cannot reach (configure that file store)");
        }
        places.push((id, store));
    }
    let work = async move {
        tokio::task::spawn_blocking(move || {
            places
                .iter()
                .filter(|(id, store)| match store.as_ref().map(|s| s.delete(id)) {
                    Some(Ok(())) => false,
                    Some(Err(e)) => {
                        tracing::warn!(file = %id, error = %e, "a deleted user's file could not be removed");
                        true
                    }
                    None => true,
                })
                .count()
        })
        .await
        .unwrap_or(n)
    };
    core.shared.app.pool.call(work).await.unwrap_or(n)
}

#[cfg(test)]
mod tests {
    use super::display_name;

    #[test]
    fn display_names_are_base_names_without_tricks() {
        let cases = [
            ("../../etc/passwd", Some("passwd")),
            ("C:\\Users\\me\\shot.png", Some("shot.png")),
            ("..", None),
            (".htaccess", Some("htaccess")),
            ("a\"b\r\nc.png", Some("abc.png")),
            ("   ", None),
            ("résumé.pdf", Some("résumé.pdf")),
        ];
        for (raw, want) in cases {
            assert_eq!(display_name(raw).as_deref(), want, "{raw:?}");
        }
        assert_eq!(display_name(&"x".repeat(500)).unwrap().len(), 128);
    }
}
