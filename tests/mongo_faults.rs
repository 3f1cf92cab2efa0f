//! MongoDB going away under load, against a real MongoDB-compatible server that
//! the test starts, stops and restarts itself (SecantusDB, named by
//! `CHATBOX_TEST_SECANTUSD`). The tests are ignored unless asked for (`cargo
//! test -- --include-ignored`, as CI does: see `.ci/run`); asked for without the
//! variable, they fail and say what they need.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A SecantusDB server on a port of its own, over a storage directory that
/// outlives restarts.
struct Mongod {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mongod {
    fn start() -> Mongod {
        let Ok(bin) = std::env::var("CHATBOX_TEST_SECANTUSD") else {
            panic!(
                "this test needs SecantusDB: set CHATBOX_TEST_SECANTUSD to its secantusd-py \
                 (python3 -m venv V && V/bin/pip install 'SecantusDB==0.7.0b3'; see .ci/run)"
            );
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut m = Mongod {
            bin: bin.into(),
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        m.restart();
        m
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    fn restart(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--storage-path",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("secantusd-py starts");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "SecantusDB did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGTERM, as an operator would) and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain syscall on a child we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for Mongod {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mongo_config(uri: String, queue_max: usize) -> chatbox::Config {
    chatbox::Config {
        mongo_uri: Some(uri),
        mongo_database: format!("chatbox_fault_{:016x}", rand::random::<u64>()),
        mongo_write_retry_secs: 120,
        mongo_connect_timeout_ms: 1000,
        store_queue_max: queue_max,
        rate_limit_per_minute: 100_000,
        ws_frames_per_minute_max: 100_000,
        ..config()
    }
}

fn user_message(id: &str, sid: &str) -> Value {
    json!({"type": "user_message", "id": id, "session_id": sid, "content": format!("message {id}")})
}

/// Reads frames until `ids` each got an ack or an error; returns them by id, and
/// how many answers (`ai_done`) went by meanwhile.
async fn answers(ws: &mut Ws, ids: &[String]) -> (std::collections::HashMap<String, Value>, usize) {
    let (mut got, mut done) = (std::collections::HashMap::new(), 0);
    while got.len() < ids.len() {
        let v = recv(ws).await;
        match (v["type"].as_str(), v["id"].as_str()) {
            (Some("ack" | "error"), Some(id)) => {
                got.insert(id.to_owned(), v.clone());
            }
            (Some("ai_done"), _) => done += 1,
            _ => {}
        }
    }
    (got, done)
}

/// Waits until `n` more answers are done (so their writes have left the queue).
async fn answers_done(ws: &mut Ws, n: usize) {
    for _ in 0..n {
        until(ws, "ai_done").await;
    }
}

/// A server on `cfg`, and a user's connection with a session (message `m0`).
async fn session(cfg: &chatbox::Config, user: &str) -> (chatbox::ServerHandle, Ws, String) {
    let server = start(cfg.clone());
    let mut ws = connect_user(server.local_addr(), user).await;
    send(
        &mut ws,
        json!({"type": "user_message", "id": "m0", "content": "hello"}),
    )
    .await;
    let (ack, _) = until(&mut ws, "ack").await;
    let sid = ack["session_id"].as_str().unwrap().to_owned();
    (server, ws, sid)
}

/// The user messages stored in `sid`, by client id (duplicates show as counts > 1).
async fn stored(cfg: &chatbox::Config, sid: &str) -> std::collections::HashMap<String, usize> {
    let (pool, store) = open_store(cfg);
    let (_, msgs) = store.load_session(sid, 100_000).await.unwrap().unwrap();
    tokio::task::block_in_place(move || drop((store, pool)));
    let mut by_id = std::collections::HashMap::new();
    for m in msgs {
        if let Some(c) = m.client_id {
            *by_id.entry(c).or_insert(0) += 1;
        }
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SecantusDB: set CHATBOX_TEST_SECANTUSD (see .ci/run)"]
async fn mongodb_stopped_mid_load_and_restarted_loses_no_acked_message() {
    let mut mongod = Mongod::start();
    let cfg = mongo_config(mongod.uri(), 4096);
    let (server, mut ws, sid) = session(&cfg, "faulty").await;
    let addr = server.local_addr();

    // Half the messages while MongoDB is up...
    let first: Vec<String> = (1..=20).map(|i| format!("m{i}")).collect();
    for id in &first {
        send(&mut ws, user_message(id, &sid)).await;
    }
    let (acked, _) = answers(&mut ws, &first).await;
    assert!(acked.values().all(|v| v["type"] == "ack"), "{acked:?}");

    // ...then MongoDB stops: readiness says so, and new messages wait, unacked.
    mongod.stop();
    let (status, _, body) = get(addr, "/chatbox/readyz").await;
    assert_eq!(status, 503, "{body}");
    let second: Vec<String> = (21..=40).map(|i| format!("m{i}")).collect();
    for id in &second {
        send(&mut ws, user_message(id, &sid)).await;
    }
    no_ack_while_down(&mut ws, addr).await;
    // It comes back: the held messages are written and acked, once each.
    mongod.restart();
    let (later, _) = answers(&mut ws, &second).await;
    assert!(later.values().all(|v| v["type"] == "ack"), "{later:?}");
    let (status, _, _) = get(addr, "/chatbox/readyz").await;
    assert_eq!(status, 200);

    drop(ws);
    server.shutdown();
    stop(server).await;
    let stored = stored(&cfg, &sid).await;
    for id in std::iter::once("m0".to_owned()).chain(first).chain(second) {
        assert_eq!(stored.get(&id), Some(&1), "acked {id} stored exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SecantusDB: set CHATBOX_TEST_SECANTUSD (see .ci/run)"]
async fn a_full_write_queue_reaches_the_client_as_a_clear_error() {
    let mut mongod = Mongod::start();
    let cfg = mongo_config(mongod.uri(), 4);
    let (server, mut ws, sid) = session(&cfg, "patient").await;
    // Let the first answer finish, so only this test's writes fill the queue.
    until(&mut ws, "ai_done").await;
    mongod.stop();
    let ids = burst(&mut ws, &sid).await;
    mongod.restart();
    refused_then_stored(&mut ws, &sid, &ids).await;
    drop(ws);
    server.shutdown();
    stop(server).await;
    assert_stored_once(&cfg, &sid, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SecantusDB: set CHATBOX_TEST_SECANTUSD (see .ci/run)"]
async fn a_slow_mongodb_reaches_the_client_as_a_clear_error() {
    let mongod = Mongod::start();
    // Every chunk MongoDB sends or receives is held 50 ms: each batch takes a few
    // hundred milliseconds, and a burst of messages outruns a queue of 4.
    let slow = slow_proxy(mongod.port, Duration::from_millis(50)).await;
    let cfg = mongo_config(format!("mongodb://127.0.0.1:{slow}"), 4);
    let (server, mut ws, sid) = session(&cfg, "rushed").await;
    until(&mut ws, "ai_done").await;
    let ids = burst(&mut ws, &sid).await;
    refused_then_stored(&mut ws, &sid, &ids).await;
    drop(ws);
    server.shutdown();
    stop(server).await;
    assert_stored_once(&cfg, &sid, &ids).await;
}

/// While MongoDB is down, nothing sent is acked. Sync points, not sleeps: the
/// reply to a probe frame sent after the messages means the server has handled
/// (and submitted) every one of them; `/readyz` answering 503 afterwards means
/// it went on failing to reach MongoDB meanwhile (the writer retrying); every
/// frame that arrived up to then is read without waiting, and none is an ack.
async fn no_ack_while_down(ws: &mut Ws, addr: std::net::SocketAddr) {
    use futures_util::{FutureExt, StreamExt};
    send(ws, json!({"type": "no_such_frame", "id": "probe"})).await;
    let (probe, before) = until(ws, "error").await;
    assert_eq!(probe["id"], "probe", "{probe}");
    let mut seen = before;
    let (status, _, body) = get(addr, "/chatbox/readyz").await;
    assert_eq!(status, 503, "MongoDB is still down: {body}");
    while let Some(Some(Ok(m))) = ws.next().now_or_never() {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            seen.push(serde_json::from_str(&t).unwrap());
        }
    }
    assert!(
        seen.iter().all(|v| v["type"] != "ack"),
        "an ack arrived while MongoDB was down: {seen:?}"
    );
}

/// Sends 30 messages at once; returns their ids.
async fn burst(ws: &mut Ws, sid: &str) -> Vec<String> {
    let ids: Vec<String> = (1..=30).map(|i| format!("m{i}")).collect();
    for id in &ids {
        send(ws, user_message(id, sid)).await;
    }
    ids
}

/// Every message of the burst gets one answer: the few the queue held are acked;
/// the rest are refused at once, each with a reason and when to retry, and the
/// connection stays. Sent again one at a time, each refused one is stored.
async fn refused_then_stored(ws: &mut Ws, sid: &str, ids: &[String]) {
    let (first, done) = answers(ws, ids).await;
    let refused: Vec<&String> = ids
        .iter()
        .filter(|id| first[*id]["type"] == "error")
        .collect();
    assert!(!refused.is_empty(), "a queue of 4 held all 30: {first:?}");
    for id in &refused {
        let e = &first[*id];
        assert_eq!(e["code"], "overloaded", "{e}");
        assert!(e["retry_after_ms"].as_u64().is_some(), "{e}");
    }
    // Once the held messages are answered (their answers stored too), the queue
    // is free again.
    answers_done(ws, ids.len() - refused.len() - done).await;
    for id in refused {
        send(ws, user_message(id, sid)).await;
        let (again, done) = answers(ws, std::slice::from_ref(id)).await;
        assert_eq!(again[id]["type"], "ack", "{again:?}");
        answers_done(ws, 1 - done).await;
    }
}

async fn assert_stored_once(cfg: &chatbox::Config, sid: &str, ids: &[String]) {
    let stored = stored(cfg, sid).await;
    for id in ids {
        assert_eq!(stored.get(id), Some(&1), "{id} stored exactly once");
    }
}

/// A TCP proxy to `port` that holds every chunk for `delay`, both ways: a slow
/// MongoDB (the real one behind it).
async fn slow_proxy(port: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    return;
                };
                let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                tokio::join!(pump(cr, sw, delay), pump(sr, cw, delay));
            });
        }
    });
    local
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        tokio::time::sleep(delay).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
