//! The places uploads rest besides local disk, against real servers: an
//! S3-compatible bucket on moto's server mode (`CHATBOX_TEST_MOTO_SERVER`) and
//! MongoDB GridFS on SecantusDB (`CHATBOX_TEST_MONGO_URI`). Each: a file larger
//! than one multipart part / many GridFS chunks goes up and comes back whole and
//! by ranges, rests as ciphertext only, and a node whose `file_store` changed
//! still serves the files recorded in the old place, or says clearly that it
//! cannot. tests/files.rs runs against each store too (`CHATBOX_TEST_FILE_STORE`).
//! The tests are ignored unless asked for (`--include-ignored`, as CI does).

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::Value;

/// A PDF (by its magic bytes) of `len` bytes that no window of ciphertext
/// could match by chance.
fn pdf(len: usize) -> Vec<u8> {
    let mut doc = b"%PDF-1.4\n".to_vec();
    doc.extend((0..len - doc.len()).map(|_| rand::random::<u8>()));
    doc
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn upload(addr: SocketAddr, user: &str, doc: &[u8]) -> String {
    let r = http()
        .post(format!("http://{addr}/chatbox/upload?name=plans.pdf"))
        .bearer_auth(token(user))
        .body(doc.to_vec())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 201, "{body}");
    body["file_id"].as_str().unwrap().to_owned()
}

/// Status, `Content-Range` and body of a download, with an optional range.
async fn download(
    addr: SocketAddr,
    user: &str,
    id: &str,
    range: Option<&str>,
) -> (u16, Option<String>, Vec<u8>) {
    let mut req = http()
        .get(format!("http://{addr}/chatbox/files/{id}"))
        .bearer_auth(token(user));
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    let r = req.send().await.unwrap();
    let range = r
        .headers()
        .get("content-range")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        r.status().as_u16(),
        range,
        r.bytes().await.unwrap().to_vec(),
    )
}

/// Whole, by ranges (one inside a sealed chunk, across chunk and part
/// boundaries, the tail), and at rest as ciphertext only.
async fn round_trip(cfg: &chatbox::Config, addr: SocketAddr, user: &str, doc: &[u8]) -> String {
    let id = upload(addr, user, doc).await;
    let (status, _, body) = download(addr, user, &id, None).await;
    assert_eq!(status, 200);
    assert!(body == doc, "the whole file comes back");
    let part = 5 * 1024 * 1024;
    for (first, last) in [
        (10, 19),
        (65_530, 65_545),
        (part - 100, part + 100),
        (doc.len() - 70_000, doc.len() - 1),
    ]
    .into_iter()
    .filter(|&(_, last)| last < doc.len())
    {
        let range = format!("bytes={first}-{last}");
        let (status, got, body) = download(addr, user, &id, Some(&range)).await;
        assert_eq!(status, 206, "{range}");
        assert_eq!(got, Some(format!("bytes {first}-{last}/{}", doc.len())));
        assert!(body == doc[first..=last], "{range}");
    }
    let at_rest = stores::at_rest(cfg, &id).await.expect("the object");
    assert!(
        at_rest.len() > doc.len(),
        "sealed chunks carry nonces and tags"
    );
    for at in [0, 9, doc.len() / 2, doc.len() - 64] {
        let probe = &doc[at..at + 32];
        assert!(
            !at_rest.windows(probe.len()).any(|w| w == probe),
            "plaintext at rest (offset {at})"
        );
    }
    id
}

/// Uploads on local disk, then the same node (data directory and records)
/// restarted with `s3_bucket` set: new uploads go to the bucket, split into
/// multipart parts; the old file is still read from disk, the new one from the
/// bucket; a node not configured for the bucket refuses its file clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto: set CHATBOX_TEST_MOTO_SERVER (.ci/s3-setup.sh)"]
async fn s3_bucket_holds_sealed_multipart_uploads_and_old_local_files_stay_readable() {
    let mut local = config();
    local.file_store = Some("local".into());
    local.s3_bucket = None;
    local.upload_bytes_max = 12 * 1024 * 1024;
    let server = start(local.clone());
    let old_doc = pdf(200_000);
    let old = round_trip(&local, server.local_addr(), "olga", &old_doc).await;
    server.shutdown();
    stop(server).await;

    let mut s3 = local.clone();
    stores::use_s3(&mut s3);
    let server = start(s3.clone());
    let addr = server.local_addr();
    // Larger than two 5 MiB parts: a multipart upload of three parts.
    let big = pdf(11 * 1024 * 1024);
    let new = round_trip(&s3, addr, "olga", &big).await;
    let small = round_trip(&s3, addr, "olga", &pdf(80_000)).await;
    assert_eq!(stores::ids_at_rest(&s3).await.len(), 2);
    assert!(stores::at_rest(&local, &new).await.is_none(), "not on disk");
    let (status, _, body) = download(addr, "olga", &old, None).await;
    assert_eq!(status, 200, "the file recorded on disk is still served");
    assert!(body == old_doc);
    server.shutdown();
    stop(server).await;

    // Back to local only: the bucket's files are refused, saying why.
    let server = start(local.clone());
    let (status, _, body) = download(server.local_addr(), "olga", &small, None).await;
    assert_eq!(status, 503);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body.to_string().contains("not configured"), "{body}");
    server.shutdown();
    stop(server).await;
}

/// GridFS in the configured database: a file of many GridFS chunks, read back
/// by ranges that start in the middle (only the chunks overlapping are
/// fetched), resting as ciphertext in `chatbox_files.chunks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SecantusDB: set CHATBOX_TEST_MONGO_URI (see .ci/run)"]
async fn gridfs_holds_sealed_uploads_read_by_ranges() {
    let uri = std::env::var("CHATBOX_TEST_MONGO_URI")
        .expect("this test needs CHATBOX_TEST_MONGO_URI (a MongoDB; .ci/run starts SecantusDB)");
    let mut cfg = config();
    cfg.mongo_uri = Some(uri);
    cfg.mongo_database = format!("chatbox_gridfs_{:016x}", rand::random::<u64>());
    cfg.file_store = Some("gridfs".into());
    cfg.upload_bytes_max = 12 * 1024 * 1024;
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let doc = pdf(6 * 1024 * 1024);
    let id = round_trip(&cfg, addr, "gus", &doc).await;
    assert_eq!(stores::ids_at_rest(&cfg).await, std::slice::from_ref(&id));
    let (status, _) = admin_call(addr, "DELETE", "/users/gus", &admin()).await;
    assert_eq!(status, 200);
    assert!(
        stores::at_rest(&cfg, &id).await.is_none(),
        "chunks and file gone"
    );
    server.shutdown();
    stop(server).await;
}

fn admin() -> String {
    token_with("agent-1", &["admin"], chatbox::auth::now_secs() + 3600)
}
