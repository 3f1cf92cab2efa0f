//! The chat pipeline end to end: sessions, durable acks, the demo answer stream,
//! resume (also across restarts), encryption at rest, and every error path.

mod common;

use std::collections::HashMap;

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// What one message produced: the session id, the ack, the chunks, the done frame.
struct Exchange {
    session_id: String,
    ack: Value,
    chunks: Vec<Value>,
    done: Value,
}

async fn converse(ws: &mut Ws, session_id: Option<&str>, id: &str, content: &str) -> Exchange {
    let mut msg = json!({"type": "user_message", "id": id, "content": content});
    if let Some(s) = session_id {
        msg["session_id"] = json!(s);
    }
    send(ws, msg).await;
    let (done, before) = until(ws, "ai_done").await;
    let ack = before
        .iter()
        .find(|v| v["type"] == "ack")
        .cloned()
        .expect("an ack");
    let chunks: Vec<Value> = before
        .iter()
        .filter(|v| v["type"] == "ai_chunk")
        .cloned()
        .collect();
    let session_id = match session_id {
        Some(s) => s.to_owned(),
        None => {
            assert_eq!(
                before[0]["type"], "session",
                "session frame comes first: {before:?}"
            );
            assert_eq!(before[0]["created"], true);
            before[0]["session_id"].as_str().unwrap().to_owned()
        }
    };
    Exchange {
        session_id,
        ack,
        chunks,
        done,
    }
}

fn text_of(chunks: &[Value]) -> String {
    chunks
        .iter()
        .map(|c| c["content"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_streams_and_is_acked() {
    let server = start(config());
    let mut ws = connect_user(server.local_addr(), "ann").await;
    let x = converse(&mut ws, None, "c1", "hello there").await;
    assert_eq!(x.ack["id"], "c1");
    assert_eq!(x.ack["session_id"], json!(x.session_id));
    assert!(x.ack["message_id"].as_str().unwrap().starts_with("m_"));
    let seqs: Vec<u64> = x
        .chunks
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seq counts from 1 without gaps"
    );
    let answer = text_of(&x.chunks);
    assert!(
        answer.starts_with("[demo]") && answer.contains("hello there"),
        "{answer}"
    );
    assert_eq!(x.done["message_id"], x.chunks[0]["message_id"]);
    assert_eq!(
        x.done["usage"]["output_tokens"].as_u64().unwrap(),
        seqs.len() as u64
    );
    assert_eq!(x.done["usage"]["input_tokens"], 2);
    // A second message in the same session.
    let y = converse(&mut ws, Some(&x.session_id), "c2", "and again").await;
    assert_eq!(y.ack["session_id"], json!(x.session_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_returns_the_history_on_another_connection_and_after_restart() {
    let cfg = config();
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let mut a = connect_user(addr, "bo").await;
    let x = converse(&mut a, None, "c1", "first question").await;
    let answer = text_of(&x.chunks);
    let mut b = connect_user(addr, "bo").await;
    send(
        &mut b,
        json!({"type": "resume", "session_id": x.session_id}),
    )
    .await;
    let s = recv(&mut b).await;
    assert_eq!(
        (s["type"].as_str(), s["created"].as_bool()),
        (Some("session"), Some(false))
    );
    let hist = s["messages"].as_array().unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(
        (hist[0]["role"].as_str(), hist[0]["content"].as_str()),
        (Some("user"), Some("first question"))
    );
    assert_eq!(hist[0]["message_id"], x.ack["message_id"]);
    assert_eq!(
        (hist[1]["role"].as_str(), hist[1]["content"].as_str()),
        (Some("assistant"), Some(answer.as_str()))
    );

    drop((a, b));
    server.shutdown();
    stop(server).await;
    // Same data directory and key: everything is still there, decrypted.
    let server = start(cfg);
    let mut c = connect_user(server.local_addr(), "bo").await;
    send(
        &mut c,
        json!({"type": "resume", "session_id": x.session_id}),
    )
    .await;
    let s = recv(&mut c).await;
    assert_eq!(s["messages"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["messages"][1]["content"], json!(answer));
    // And the session continues.
    let y = converse(&mut c, Some(&x.session_id), "c2", "after restart").await;
    assert!(text_of(&y.chunks).contains("after restart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_session_is_forbidden_without_leaking_existence() {
    let server = start(config());
    let addr = server.local_addr();
    let mut owner = connect_user(addr, "owner").await;
    let x = converse(&mut owner, None, "c1", "private").await;
    let mut other = connect_user(addr, "intruder").await;
    send(
        &mut other,
        json!({"type": "resume", "id": "r1", "session_id": x.session_id}),
    )
    .await;
    let theirs = recv(&mut other).await;
    send(
        &mut other,
        json!({"type": "resume", "id": "r2", "session_id": "s_does_not_exist"}),
    )
    .await;
    let missing = recv(&mut other).await;
    assert_eq!(theirs["code"], "forbidden");
    assert_eq!(
        theirs["message"], missing["message"],
        "same answer for someone else's and for none"
    );
    assert_eq!(
        (theirs["id"].as_str(), missing["id"].as_str()),
        (Some("r1"), Some("r2"))
    );
    send(
        &mut other,
        json!({"type": "user_message", "id": "w1", "session_id": x.session_id, "content": "hi"}),
    )
    .await;
    assert_eq!(recv(&mut other).await["code"], "forbidden");
    send(
        &mut other,
        json!({"type": "cancel", "session_id": x.session_id}),
    )
    .await;
    assert_eq!(recv(&mut other).await["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_an_id_returns_the_original_ack_and_stores_nothing_twice() {
    let server = start(config());
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "dup").await;
    let x = converse(&mut ws, None, "same-id", "original text").await;
    send(&mut ws, json!({"type": "user_message", "id": "same-id", "session_id": x.session_id, "content": "changed"})).await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["message_id"], x.ack["message_id"]);
    assert_eq!(ack["duplicate"], true);
    // Also from another connection, without the session id.
    let mut other = connect_user(addr, "dup").await;
    send(
        &mut other,
        json!({"type": "user_message", "id": "same-id", "content": "again"}),
    )
    .await;
    let (ack, _) = until(&mut other, "ack").await;
    assert_eq!(
        (ack["message_id"].clone(), ack["session_id"].clone()),
        (x.ack["message_id"].clone(), json!(x.session_id))
    );
    // The session that resend opened is not left behind, empty.
    let boss = token_with("boss", &["admin"], chatbox::auth::now_secs() + 600);
    let (status, list) = admin_call(addr, "GET", "/sessions?user_id=dup", &boss).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1, "{list}");
    send(
        &mut ws,
        json!({"type": "resume", "session_id": x.session_id}),
    )
    .await;
    let (s, _) = until(&mut ws, "session").await;
    let users: Vec<&Value> = s["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .collect();
    assert_eq!(users.len(), 1, "{s}");
    assert_eq!(users[0]["content"], "original text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_frame_gets_exactly_one_error_and_the_connection_stays() {
    let server = start(config());
    let mut ws = connect_user(server.local_addr(), "matrix").await;
    let long = |n: usize| "x".repeat(n);
    let bad = [
        json!({"type": "user_message", "id": "e1", "content": long(8001)}),
        json!({"type": "user_message", "id": "e2", "content": "hi", "session_id": long(129)}),
        json!({"type": "user_message", "id": "e3"}),
        json!({"type": "user_message", "id": "e4", "content": "  "}),
        json!({"type": "user_message", "id": "e5", "content": "hi", "model_id": long(65)}),
        json!({"type": "user_message", "id": "e6", "content": "hi", "metadata": "not an object"}),
        json!({"type": "user_message", "id": "e7", "content": "hi", "metadata": {"a": long(5000)}}),
        json!({"type": "user_message", "id": "e8", "content": "hi", "file_url": "http://insecure"}),
        json!({"type": "file_message", "id": "e9", "session_id": "s", "file_id": long(129)}),
        json!({"type": "resume", "id": "e10"}),
        json!({"type": "resume", "id": "e11", "session_id": "s", "after_seq": "three"}),
        json!({"type": "no_such_type", "id": "e12"}),
        json!({"id": "e13"}),
    ];
    for frame in &bad {
        send(&mut ws, frame.clone()).await;
        let e = recv(&mut ws).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("invalid_message")),
            "{frame}"
        );
        assert_eq!(e["id"], frame["id"], "{frame}");
    }
    ws.send(Message::text("not json")).await.unwrap();
    assert_eq!(recv(&mut ws).await["code"], "invalid_message");
    send(
        &mut ws,
        json!({"type": "admin_join", "id": "a1", "session_id": "s"}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await["code"],
        "forbidden",
        "admin frames need the role"
    );
    // Still open and working, and nothing extra arrived in between.
    let x = converse(&mut ws, None, "ok", "still here").await;
    assert!(text_of(&x.chunks).contains("still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_deep_nesting_and_floods_close_with_their_codes() {
    let server = start(chatbox::Config {
        ws_frames_per_minute_max: 80,
        ..config()
    });
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "u8").await;
    let frame = Frame::message(vec![0xff, 0xfe, b'{'], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Invalid));

    let mut ws = connect_user(addr, "deep").await;
    ws.send(Message::text(format!(
        "{}{}",
        "[".repeat(5000),
        "]".repeat(5000)
    )))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Policy));

    let mut ws = connect_user(addr, "flood").await;
    for _ in 0..81 {
        if ws.send(Message::text("{}")).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Policy));
    // Others are unaffected.
    let mut fine = connect_user(addr, "fine").await;
    converse(&mut fine, None, "c", "ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_says_when_to_retry() {
    let server = start(chatbox::Config {
        rate_limit_per_minute: 2,
        ..config()
    });
    let mut ws = connect_user(server.local_addr(), "limited").await;
    let x = converse(&mut ws, None, "r1", "one").await;
    converse(&mut ws, Some(&x.session_id), "r2", "two").await;
    send(
        &mut ws,
        json!({"type": "user_message", "id": "r3", "session_id": x.session_id, "content": "three"}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("rate_limited"), Some("r3"))
    );
    let wait = e["retry_after_ms"].as_u64().unwrap();
    assert!(wait > 0 && wait <= 30_000, "{wait}");
    // The limit belongs to the user: a second connection shares it.
    let mut other = connect_user(server.local_addr(), "limited").await;
    send(
        &mut other,
        json!({"type": "user_message", "id": "r4", "content": "four"}),
    )
    .await;
    assert_eq!(recv(&mut other).await["code"], "rate_limited");
}

fn files_contain(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let bytes = std::fs::read(e.unwrap().path()).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

/// The test's MongoDB database (`CHATBOX_TEST_STORE=mongo`), read and changed
/// directly with the driver.
async fn mongo_database(cfg: &chatbox::Config) -> mongodb::Database {
    let uri = cfg
        .mongo_uri
        .as_deref()
        .expect("a MongoDB test configuration");
    let client = mongodb::Client::with_uri_str(uri).await.unwrap();
    client.database(&cfg.mongo_database)
}

/// Whether the raw BSON of any document stored in `db` contains `needle`;
/// also how many messages are stored (so that "not found" means something).
async fn mongo_contains(db: &mongodb::Database, needle: &[u8]) -> (bool, u64) {
    use futures_util::TryStreamExt;
    let mut found = false;
    for name in db.list_collection_names().await.unwrap() {
        let docs: Vec<mongodb::bson::RawDocumentBuf> = db
            .collection::<mongodb::bson::RawDocumentBuf>(&name)
            .find(mongodb::bson::doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        found |= docs
            .iter()
            .any(|d| d.as_bytes().windows(needle.len()).any(|w| w == needle));
    }
    let messages = db
        .collection::<mongodb::bson::Document>("messages")
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap();
    (found, messages)
}

/// Zeroes `zeroed`'s ciphertext, and moves `from`'s ciphertext and nonce onto
/// `onto`: as the SQLite variant does to rows.
async fn mongo_tamper(db: &mongodb::Database, zeroed: &str, from: &str, onto: &str) {
    use mongodb::bson::{doc, spec::BinarySubtype, Binary, Document};
    let messages = db.collection::<Document>("messages");
    let get = |id: &str| {
        let messages = messages.clone();
        let id = id.to_owned();
        async move {
            messages
                .find_one(doc! {"_id": &id})
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("message {id} stored"))
        }
    };
    let zeroes = get(zeroed)
        .await
        .get_binary_generic("ciphertext")
        .unwrap()
        .len();
    let zeroes = Binary {
        subtype: BinarySubtype::Generic,
        bytes: vec![0; zeroes],
    };
    let source = get(from).await;
    let updates = [
        (zeroed, doc! {"$set": {"ciphertext": zeroes}}),
        (
            onto,
            doc! {"$set": {"ciphertext": source.get("ciphertext").unwrap(),
            "nonce": source.get("nonce").unwrap()}},
        ),
    ];
    for (id, update) in updates {
        let r = messages.update_one(doc! {"_id": id}, update).await.unwrap();
        assert_eq!(r.modified_count, 1, "{id} changed");
    }
}

/// Tampers with rows of the stopped server's SQLite file as `mongo_tamper` does.
fn sqlite_tamper(dir: &std::path::Path, zeroed: &str, from: &str, onto: &str) {
    let db = rusqlite::Connection::open(dir.join("chatbox.db")).unwrap();
    db.execute(
        "UPDATE messages SET ciphertext = zeroblob(length(ciphertext)) WHERE message_id = ?1",
        [zeroed],
    )
    .unwrap();
    db.execute(
        "UPDATE messages SET ciphertext = (SELECT ciphertext FROM messages WHERE message_id = ?1),
                             nonce = (SELECT nonce FROM messages WHERE message_id = ?1) WHERE message_id = ?2",
        [from, onto],
    )
    .unwrap();
}

/// Stored messages are sealed wherever they are stored: the SQLite files, or
/// (`CHATBOX_TEST_STORE=mongo`) every document of the MongoDB database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_encrypted_on_disk_and_tampering_is_reported() {
    let cfg = config();
    let dir = cfg.data_dir.clone();
    let server = start(cfg.clone());
    let mut ws = connect_user(server.local_addr(), "secret").await;
    let marker = "xyzzy-plaintext-marker";
    let x = converse(&mut ws, None, "c1", marker).await;
    let y = converse(&mut ws, Some(&x.session_id), "c2", "second").await;
    drop(ws);
    server.shutdown();
    stop(server).await;

    // Tamper with one message and move another's ciphertext onto a third.
    let first = x.ack["message_id"].as_str().unwrap();
    let second = y.ack["message_id"].as_str().unwrap();
    let answer_id = y.done["message_id"].as_str().unwrap();
    if cfg.mongo_uri.is_some() {
        let db = mongo_database(&cfg).await;
        let (found, messages) = mongo_contains(&db, marker.as_bytes()).await;
        assert_eq!(messages, 4, "two messages and two answers stored");
        let (seen, _) = mongo_contains(&db, x.session_id.as_bytes()).await;
        assert!(
            seen,
            "the scan reads what is stored (session ids are plain)"
        );
        assert!(!found, "plaintext found in MongoDB");
        let (found, _) = mongo_contains(&db, b"[demo]").await;
        assert!(!found, "answer plaintext found in MongoDB");
        mongo_tamper(&db, first, answer_id, second).await;
    } else {
        assert!(
            files_contain(&dir, x.session_id.as_bytes()),
            "the scan reads what is stored (session ids are plain)"
        );
        assert!(
            !files_contain(&dir, marker.as_bytes()),
            "plaintext found on disk"
        );
        assert!(
            !files_contain(&dir, b"[demo]"),
            "answer plaintext found on disk"
        );
        sqlite_tamper(&dir, first, answer_id, second);
    }

    let server = start(cfg);
    let mut ws = connect_user(server.local_addr(), "secret").await;
    send(
        &mut ws,
        json!({"type": "resume", "session_id": x.session_id}),
    )
    .await;
    let s = recv(&mut ws).await;
    let ids: Vec<&str> = s["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.contains(&first) && !ids.contains(&second),
        "tampered rows are not returned: {ids:?}"
    );
    assert!(ids.contains(&answer_id), "untouched rows are");
    let e = recv(&mut ws).await;
    assert_eq!(e["code"], "internal");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("2 stored message(s) failed their integrity check"),
        "{e}"
    );
}

/// SIGKILL the server while clients stream messages; after a restart every acked
/// message is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loses_nothing_acked() {
    crash_and_restart(&[]).await;
}

/// The same with the embedded store committing only every 10 s: at the kill,
/// everything acknowledged is in the cores' journals only, and comes back from
/// them at the restart (and a resend of it is known as one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_every_ack_only_in_the_journals_loses_nothing() {
    if mongo().is_some() {
        return; // MongoDB acknowledges after its write concern: no journals.
    }
    crash_and_restart(&[("CHATBOX_STORE_COMMIT_INTERVAL_MS", "10000")]).await;
}

async fn crash_and_restart(env: &[(&str, &str)]) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = data_dir();
    // On MongoDB (CHATBOX_TEST_STORE=mongo) both runs use one fresh database.
    let (mongo_uri, mongo_db) = mongo().unzip();
    let spawn = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatbox"));
        cmd.env_clear().envs(env.iter().copied());
        if let (Some(uri), Some(db)) = (&mongo_uri, &mongo_db) {
            cmd.env("CHATBOX_MONGO_URI", uri)
                .env("CHATBOX_MONGO_DATABASE", db);
        }
        let mut child = cmd
            .env("CHATBOX_LISTEN", "127.0.0.1:0")
            .env("CHATBOX_CORES", "2")
            .env("CHATBOX_JWT_SECRET", SECRET)
            .env("CHATBOX_ENCRYPTION_KEY", KEY)
            .env("CHATBOX_DATA_DIR", &dir)
            .env("CHATBOX_DEMO_CHUNK_DELAY_MS", "0")
            .env("CHATBOX_RATE_LIMIT_PER_MINUTE", "100000")
            .env("CHATBOX_WS_FRAMES_PER_MINUTE_MAX", "100000")
            .env("CHATBOX_HISTORY_MESSAGES_MAX", "10000")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: std::net::SocketAddr = line
            .trim()
            .trim_start_matches("chatbox listening on http://")
            .trim_end_matches("/chatbox")
            .parse()
            .unwrap();
        (child, addr)
    };
    let (mut child, addr) = spawn();
    let (acked_tx, mut acked_rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, String, String)>();
    let mut writers = Vec::new();
    for u in 0..4 {
        let acked = acked_tx.clone();
        writers.push(tokio::spawn(async move {
            let mut ws = connect_user(addr, &format!("crash-{u}")).await;
            let mut sid: Option<String> = None;
            for i in 0.. {
                let mut m = json!({"type": "user_message", "id": format!("u{u}-{i}"), "content": format!("msg {u}/{i}")});
                if let Some(s) = &sid {
                    m["session_id"] = json!(s);
                }
                if ws.send(Message::text(m.to_string())).await.is_err() {
                    return;
                }
                loop {
                    let Some(Message::Text(t)) = next_msg(&mut ws).await else { return };
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "session" {
                        sid = v["session_id"].as_str().map(str::to_owned);
                    }
                    if v["type"] == "ack" {
                        let _ = acked.send((v["session_id"].as_str().unwrap().into(), v["message_id"].as_str().unwrap().into(), format!("u{u}")));
                        break;
                    }
                }
            }
        }));
    }
    drop(acked_tx);
    let mut acked: Vec<(String, String, String)> = Vec::new();
    while acked.len() < 200 {
        acked.push(acked_rx.recv().await.expect("acks keep coming"));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for w in writers {
        let _ = w.await;
    }
    while let Ok(a) = acked_rx.try_recv() {
        acked.push(a);
    }

    let (mut child, addr) = spawn();
    let mut by_session: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for (sid, mid, user) in &acked {
        by_session
            .entry(sid.clone())
            .or_insert_with(|| (user.clone(), Vec::new()))
            .1
            .push(mid.clone());
    }
    for (sid, (user, mids)) in &by_session {
        let mut ws = connect_user(addr, &format!("crash-{}", &user[1..])).await;
        send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
        let s = recv(&mut ws).await;
        // The first message of the session, sent again with its id: known.
        let first = format!("{user}-0");
        send(
            &mut ws,
            json!({"type": "user_message", "id": first, "session_id": sid, "content": "again"}),
        )
        .await;
        let (again, _) = until(&mut ws, "ack").await;
        assert_eq!(
            (again["duplicate"].as_bool(), again["message_id"].as_str()),
            (Some(true), Some(mids[0].as_str())),
            "{again}"
        );
        let stored: Vec<&str> = s["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "user")
            .map(|m| m["message_id"].as_str().unwrap())
            .collect();
        for mid in mids {
            assert_eq!(
                stored.iter().filter(|s| **s == mid.as_str()).count(),
                1,
                "acked {mid} stored once"
            );
        }
        let mut contents: Vec<&str> = s["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "user")
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        let n = contents.len();
        contents.dedup();
        assert_eq!(contents.len(), n, "no message stored twice");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_url_and_metadata_stay_with_the_message_sealed() {
    let cfg = config();
    let data_dir = cfg.data_dir.clone();
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let boss = token_with("boss", &["admin"], chatbox::auth::now_secs() + 600);
    let url = "https://shop.example/orders/4711/receipt.pdf";
    let metadata = json!({"plan": "pro", "page": {"path": "/billing", "tab": 2}});
    let mut ws = connect_user(addr, "cleo").await;
    let first = converse(&mut ws, None, "c1", "hello").await;
    let sid = first.session_id.clone();
    // An admin in the session sees them as the user sent them.
    let mut admin = connect(addr, "/ws", Some(&boss), None).await.unwrap();
    send(&mut admin, json!({"type": "admin_join", "session_id": sid})).await;
    until(&mut ws, "admin_joined").await;
    let m = json!({"type": "user_message", "session_id": sid, "id": "c2",
        "content": "my receipt is wrong", "file_url": url, "metadata": metadata});
    send(&mut ws, m).await;
    let relay = until(&mut admin, "user_message").await.0;
    assert_eq!(
        (&relay["file_url"], &relay["metadata"]),
        (&json!(url), &metadata)
    );
    until(&mut ws, "ack").await;
    // At rest they are sealed like the content: neither is readable in the file.
    drop((ws, admin));
    server.shutdown();
    stop(server).await;
    for needle in ["shop.example", "/billing", "my receipt"] {
        let (readable, stored) = readable_at_rest(&cfg, &data_dir, needle.as_bytes()).await;
        assert!(stored > 0, "the messages are somewhere");
        assert!(!readable, "{needle} readable at rest");
    }
    // After a restart: in history, in the transcript, in the export.
    let server = start(cfg);
    let addr = server.local_addr();
    let mut again = connect_user(addr, "cleo").await;
    send(&mut again, json!({"type": "resume", "session_id": sid})).await;
    let history = until(&mut again, "session").await.0["messages"].clone();
    let mine = history
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["content"] == "my receipt is wrong")
        .unwrap_or_else(|| panic!("{history}"));
    assert_eq!(
        (&mine["file_url"], &mine["metadata"]),
        (&json!(url), &metadata)
    );
    let plain = &history[0];
    assert!(
        plain.get("file_url").is_none() && plain.get("metadata").is_none(),
        "{plain}"
    );
    let (status, transcript) = admin_call(addr, "GET", &format!("/sessions/{sid}"), &boss).await;
    assert_eq!(status, 200);
    let m = transcript["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["content"] == "my receipt is wrong")
        .unwrap_or_else(|| panic!("{transcript}"));
    assert_eq!((&m["file_url"], &m["metadata"]), (&json!(url), &metadata));
    let (_, export) = admin_call(addr, "GET", "/users/cleo/export", &boss).await;
    assert!(export.to_string().contains(url), "{export}");
    server.shutdown();
    stop(server).await;
}

/// Whether `needle` is readable anywhere the store keeps data (the SQLite file
/// and its log, or every MongoDB document: [`mongo_contains`]), and how much
/// is stored there (bytes, or messages).
async fn readable_at_rest(
    cfg: &chatbox::config::Config,
    data_dir: &std::path::Path,
    needle: &[u8],
) -> (bool, u64) {
    let Some(uri) = &cfg.mongo_uri else {
        let db = std::fs::read(data_dir.join("chatbox.db")).unwrap();
        let wal = std::fs::read(data_dir.join("chatbox.db-wal")).unwrap_or_default();
        let bytes = [db, wal].concat();
        let found = bytes.windows(needle.len()).any(|w| w == needle);
        return (found, bytes.len() as u64);
    };
    let client = mongodb::Client::with_uri_str(uri).await.unwrap();
    mongo_contains(&client.database(&cfg.mongo_database), needle).await
}
