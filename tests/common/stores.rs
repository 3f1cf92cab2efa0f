//! Where a test server's uploads rest, and a way to look at them there without
//! the server: the data directory, an S3 bucket on a local moto server, or
//! GridFS in SecantusDB.
//!
//! `CHATBOX_TEST_FILE_STORE=s3` (with `CHATBOX_TEST_MOTO_SERVER`, the path of
//! `moto_server`) or `=gridfs` (with `CHATBOX_TEST_MONGO_URI`) runs every test
//! built on [`super::config`] against that store; `.ci/run` runs tests/files.rs
//! once per store.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chatbox::Config;

/// A moto server (S3 in server mode) for the whole test process. It runs under a
/// small shell that kills it when our end of its stdin closes, which is when
/// this process exits, however it exits: a static is never dropped.
pub struct Moto {
    pub port: u16,
    _child: Child,
    _stdin: Mutex<ChildStdin>,
}

impl Moto {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The process's moto server, started on first use; panics with what to install
/// when `CHATBOX_TEST_MOTO_SERVER` is unset.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        let Ok(bin) = std::env::var("CHATBOX_TEST_MOTO_SERVER") else {
            panic!(
                "this test needs moto's S3 server: run .ci/s3-setup.sh and set \
                 CHATBOX_TEST_MOTO_SERVER to the moto_server it prints"
            );
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("sh")
            .args([
                "-c",
                "\"$0\" -H 127.0.0.1 -p \"$1\" >/dev/null 2>&1 & pid=$!; cat >/dev/null; kill $pid",
                &bin,
                &port.to_string(),
            ])
            .stdin(Stdio::piped())
            .spawn()
            .expect("moto_server starts");
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Ready when it answers HTTP, not merely when the port is open.
        loop {
            let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
                use std::io::Read;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let req = "GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
                let mut head = [0u8; 12];
                s.write_all(req.as_bytes()).is_ok() && s.read_exact(&mut head).is_ok()
            });
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "moto_server did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            port,
            _child: child,
            _stdin: Mutex::new(stdin),
        }
    })
}

/// A plain HTTP client (reqwest is built without a TLS provider of its own).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A fresh bucket on the moto server.
pub fn new_bucket() -> String {
    let name = format!("chatbox-test-{:016x}", rand::random::<u64>());
    let url = format!("{}/{name}", moto().endpoint());
    // Blocking on a thread of its own: callers may be inside a runtime.
    let status = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { http().put(&url).send().await.map(|r| r.status()) })
    })
    .join()
    .unwrap()
    .expect("moto answers");
    assert!(status.is_success(), "creating the bucket: {status}");
    name
}

/// `CHATBOX_TEST_FILE_STORE`, when set.
pub fn file_store_mode() -> Option<String> {
    std::env::var("CHATBOX_TEST_FILE_STORE")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Points `cfg` at a fresh bucket on the moto server.
pub fn use_s3(cfg: &mut Config) {
    cfg.s3_endpoint = Some(moto().endpoint());
    cfg.s3_bucket = Some(new_bucket());
    cfg.s3_access_key_id = Some("testing".into());
    cfg.s3_secret_access_key = Some("testing".into());
    cfg.file_store = Some("s3".into());
}

/// Applies `CHATBOX_TEST_FILE_STORE` to a test configuration.
pub fn apply_mode(cfg: &mut Config) {
    match file_store_mode().as_deref() {
        None | Some("local") => {}
        Some("s3") => use_s3(cfg),
        Some("gridfs") => {
            assert!(
                cfg.mongo_uri.is_some(),
                "gridfs mode needs CHATBOX_TEST_MONGO_URI"
            );
            cfg.file_store = Some("gridfs".into());
        }
        Some(other) => panic!("CHATBOX_TEST_FILE_STORE={other}: local, s3 or gridfs"),
    }
}

/// The name of the place `cfg` stores uploads in.
pub fn store_name(cfg: &Config) -> String {
    cfg.file_store_choice().0.to_owned()
}

/// The ids of every object at rest where `cfg` stores uploads.
pub async fn ids_at_rest(cfg: &Config) -> Vec<String> {
    match store_name(cfg).as_str() {
        "s3" => {
            use futures_util::TryStreamExt;
            use object_store::ObjectStore;
            let prefix = object_store::path::Path::from("files");
            let listed: Vec<object_store::ObjectMeta> =
                bucket(cfg).list(Some(&prefix)).try_collect().await.unwrap();
            listed
                .iter()
                .filter_map(|m| {
                    m.location
                        .filename()?
                        .strip_suffix(".cbf")
                        .map(str::to_owned)
                })
                .collect()
        }
        "gridfs" => {
            use futures_util::TryStreamExt;
            let files = gridfs(cfg, "files").await;
            let docs: Vec<mongodb::bson::Document> = files
                .find(mongodb::bson::doc! {})
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            docs.iter()
                .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
                .collect()
        }
        _ => super::files_under(&cfg.data_dir.join("files"))
            .iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?;
                name.strip_suffix(".cbf").map(str::to_owned)
            })
            .collect(),
    }
}

/// The bytes of object `id` as they rest where `cfg` stores uploads, read
/// without the server (a plain S3 GET; the GridFS chunks in order); `None`
/// when there is none.
pub async fn at_rest(cfg: &Config, id: &str) -> Option<Vec<u8>> {
    match store_name(cfg).as_str() {
        "s3" => {
            use object_store::ObjectStoreExt;
            let key = object_store::path::Path::from(format!("files/{id}.cbf"));
            match bucket(cfg).get(&key).await {
                Err(object_store::Error::NotFound { .. }) => None,
                Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
                Err(e) => panic!("GET {key}: {e}"),
            }
        }
        "gridfs" => {
            use futures_util::TryStreamExt;
            let files = gridfs(cfg, "files").await;
            let file = files
                .find_one(mongodb::bson::doc! {"_id": id})
                .await
                .unwrap();
            let chunks = gridfs(cfg, "chunks").await;
            let docs: Vec<mongodb::bson::Document> = chunks
                .find(mongodb::bson::doc! {"files_id": id})
                .sort(mongodb::bson::doc! {"n": 1})
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            if file.is_none() && docs.is_empty() {
                return None;
            }
            let mut out = Vec::new();
            for d in &docs {
                out.extend_from_slice(d.get_binary_generic("data").unwrap());
            }
            Some(out)
        }
        _ => {
            let p = chatbox::store::files::LocalFiles::open(&cfg.data_dir.join("files"))
                .unwrap()
                .path_of(id)
                .unwrap();
            std::fs::read(p).ok()
        }
    }
}

/// The bucket, through a client of the test's own (signed plain GETs and lists).
fn bucket(cfg: &Config) -> object_store::aws::AmazonS3 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(cfg.s3_endpoint.as_deref().unwrap())
        .with_allow_http(true)
        .with_bucket_name(cfg.s3_bucket.as_deref().unwrap())
        .with_region(&cfg.s3_region)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap()
}

/// A collection of the GridFS bucket, through a client of the test's own.
async fn gridfs(cfg: &Config, which: &str) -> mongodb::Collection<mongodb::bson::Document> {
    let client = mongodb::Client::with_uri_str(cfg.mongo_uri.as_deref().unwrap())
        .await
        .unwrap();
    client.database(&cfg.mongo_database).collection(&format!(
        "{}.{which}",
        chatbox::store::files::gridfs::BUCKET
    ))
}
