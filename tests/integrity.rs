//! Stored messages are bound to their place: a row edited in the database (its
//! seq, role or session changed) fails to open and is reported, while the rest of
//! the history loads, and rows sealed before the format version still open.

mod common;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use chatbox::auth::now_secs;
use common::*;
use serde_json::{json, Value};

/// A message sealed as rows were before the format version: the two ids only,
/// length-prefixed, as associated data.
fn sealed_the_old_way(session_id: &str, message_id: &str, text: &str) -> (u32, Vec<u8>, Vec<u8>) {
    let key: [u8; 32] = hex::decode(KEY).unwrap().try_into().unwrap();
    let mut aad = Vec::new();
    for s in [session_id, message_id] {
        aad.extend_from_slice(&(s.len() as u32).to_be_bytes());
        aad.extend_from_slice(s.as_bytes());
    }
    let nonce: [u8; 12] = rand::random();
    let ciphertext = Aes256Gcm::new(&key.into())
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: text.as_bytes(),
                aad: &aad,
            },
        )
        .unwrap();
    (chatbox::crypto::key_id(&key), nonce.to_vec(), ciphertext)
}

/// (seq, content) of each message of a transcript; a withheld one shows its error.
fn by_seq(transcript: &Value) -> Vec<(u64, String)> {
    transcript["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let shown = match (m["content"].as_str(), m["role"].as_str()) {
                (Some(_), Some("assistant")) => "(an answer)".to_owned(),
                (Some(c), _) => c.to_owned(),
                (None, _) => format!("error: {}", m["error"].as_str().unwrap()),
            };
            (m["seq"].as_u64().unwrap(), shown)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_row_fails_to_open_and_an_old_one_still_opens() {
    // The embedded store, whatever the environment names: the test edits its file.
    let cfg = chatbox::Config {
        mongo_uri: None,
        ..config()
    };
    let db = cfg.data_dir.join("chatbox.db");
    let server = start(cfg);
    let addr = server.local_addr();
    let sid = conversation(addr, "ivy", 3).await;
    let other = conversation(addr, "ivy", 1).await;

    let c = rusqlite::Connection::open(&db).unwrap();
    c.busy_timeout(WAIT).unwrap();
    let edit = |sql: &str, args: &[&dyn rusqlite::ToSql]| {
        assert_eq!(c.execute(sql, args).unwrap(), 1, "{sql}");
    };
    // The first answer moved to another place in the session.
    edit(
        "UPDATE messages SET seq = 100 WHERE session_id = ?1 AND seq = 2",
        &[&sid],
    );
    // The second question relabelled as an admin's.
    edit(
        "UPDATE messages SET role = 'admin' WHERE session_id = ?1 AND seq = 3",
        &[&sid],
    );
    // Another session's question moved into this one.
    edit(
        "UPDATE messages SET session_id = ?1, seq = 50 WHERE session_id = ?2 AND seq = 1",
        &[&sid, &other],
    );
    // A row written before the format version existed (no version column value).
    let (key_id, nonce, ciphertext) = sealed_the_old_way(&sid, "legacy-1", "written before");
    c.execute(
        "INSERT INTO messages (session_id, seq, message_id, role, author, user_id, key_id,
             nonce, ciphertext, created_at)
         VALUES (?1, 60, 'legacy-1', 'user', 'ivy', 'ivy', ?2, ?3, ?4, 1)",
        rusqlite::params![sid, key_id, nonce, ciphertext],
    )
    .unwrap();
    drop(c);

    let admin = token_with("boss", &["admin"], now_secs() + 3600);
    let req = format!(
        "GET /chatbox/admin/sessions/{sid} HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {admin}\r\nContent-Length: 0\r\n\r\n"
    );
    let (status, _, body) = http(addr, &req).await;
    assert_eq!(status, 200, "{body}");
    let withheld = "error: integrity check failed; content withheld";
    let expected: Vec<(u64, &str)> = vec![
        (1, "question 0 from ivy"),
        (3, withheld),
        (4, "(an answer)"),
        (5, "question 2 from ivy"),
        (6, "(an answer)"),
        (50, withheld),
        (60, "written before"),
        (100, withheld),
    ];
    let got = by_seq(&serde_json::from_str(&body).unwrap());
    let got: Vec<(u64, &str)> = got.iter().map(|(n, s)| (*n, s.as_str())).collect();
    assert_eq!(got, expected);

    // The user's history loads too, without the three, and says so.
    let mut ws = connect_user(addr, "ivy").await;
    send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
    let (session, _) = until(&mut ws, "session").await;
    let contents: Vec<&str> = session["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents.len(), 5, "{contents:?}");
    assert!(contents.contains(&"written before"), "{contents:?}");
    let (error, _) = until(&mut ws, "error").await;
    assert_eq!(error["code"], "internal");
    assert!(
        error["message"].as_str().unwrap().starts_with("3 stored"),
        "{error}"
    );
    // Counted: by the history (on the core) and by the streamed transcript.
    assert_eq!(total(&server, |m| m.integrity_failures.get()), 3);
    let (_, _, metrics) = get(addr, "/chatbox/metrics").await;
    assert!(
        metrics.contains("\nchatbox_admin_integrity_failures_total 3\n"),
        "{metrics}"
    );
    server.shutdown();
    stop(server).await;
}
