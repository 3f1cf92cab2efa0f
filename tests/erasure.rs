//! Privacy in storage, on every backend (the embedded store always; MongoDB when
//! `CHATBOX_TEST_MONGO_URI` names a server, ignored otherwise, as in
//! tests/storage.rs): a write queued behind a user's deletion brings nothing
//! back, the notification outbox forgets the user, (embedded store) deleted
//! bytes leave the database file, and a row edited past the store fails to open
//! while rows sealed before the format version still open; and histories read in
//! keyset pages (the admin transcript and export stream them).

use std::sync::Arc;
use std::time::Duration;

use chatbox::crypto::{KeyRing, Place};
use chatbox::pool::{BlockingPool, PoolRuntime};
use chatbox::store::mongo::{MongoSettings, MongoStore};
use chatbox::store::sqlite::SqliteStore;
use chatbox::store::{
    AuditAction, MessageRecord, Role, SessionRecord, SessionState, Store, StoreError, StoreFuture,
    WriteOp,
};

macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $test() {
                super::$test(&super::sqlite());
            })*
        }
        mod mongodb {
            $(#[test]
            #[ignore = "needs MongoDB (SecantusDB): set CHATBOX_TEST_MONGO_URI (see .ci/run)"]
            fn $test() {
                super::$test(&super::mongodb());
            })*
        }
    };
}

on_every_backend!(
    a_write_queued_behind_a_delete_brings_nothing_back,
    a_deleted_users_notifications_are_dropped_or_scrubbed,
    an_edited_row_fails_to_open_and_an_old_one_opens,
    messages_come_in_keyset_pages,
);

fn messages_come_in_keyset_pages(b: &Backend) {
    let ring = ring();
    let s = &b.store;
    let mut ops = vec![WriteOp::CreateSession(session("paged", "u"))];
    ops.extend((1..=7).map(|i| append(&ring, "u", "paged", i, "x")));
    block(s.write(ops)).unwrap();
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = block(s.messages_after("paged", after, 3)).unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        pages.push(page.iter().map(|m| m.seq).collect::<Vec<_>>());
    }
    assert_eq!(pages, [vec![1, 2, 3], vec![4, 5, 6], vec![7]], "{}", b.name);
    assert!(block(s.messages_after("nope", 0, 3)).unwrap().is_empty());
}

/// Where a backend keeps its rows, for reading them raw.
enum Raw {
    Sqlite(tempfile::TempDir),
    Mongo { uri: String, database: String },
}

struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    raw: Raw,
    _rt: Arc<PoolRuntime>,
}

fn pool() -> (Arc<PoolRuntime>, BlockingPool) {
    let (rt, pool) = PoolRuntime::start(2, 256).expect("pool");
    (Arc::new(rt), pool)
}

fn sqlite() -> Backend {
    let (rt, p) = pool();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path(), p, 2, 256).expect("sqlite");
    Backend {
        name: "sqlite",
        store: Arc::new(store),
        raw: Raw::Sqlite(dir),
        _rt: rt,
    }
}

fn mongodb() -> Backend {
    let Ok(uri) = std::env::var("CHATBOX_TEST_MONGO_URI") else {
        panic!("this test needs CHATBOX_TEST_MONGO_URI=mongodb://127.0.0.1:PORT (see .ci/run)");
    };
    let settings = MongoSettings {
        uri: uri.clone(),
        database: format!("chatbox_test_{:016x}", rand::random::<u64>()),
        write_concern: "majority".into(),
        write_retry: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
    };
    let (rt, p) = pool();
    let store = MongoStore::open(&settings, p, 256).expect("MongoDB at CHATBOX_TEST_MONGO_URI");
    Backend {
        name: "mongodb",
        store: Arc::new(store),
        raw: Raw::Mongo {
            uri,
            database: settings.database,
        },
        _rt: rt,
    }
}

fn block<T>(f: StoreFuture<T>) -> Result<T, StoreError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn ring() -> KeyRing {
    KeyRing::new(&"44".repeat(32), &[]).expect("key")
}

fn session(id: &str, user: &str) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        user_id: user.into(),
        created_at: 10,
        last_activity: 10,
        state: SessionState::Ai,
        message_count: 0,
        tokens_in: 0,
        tokens_out: 0,
        ended_at: None,
    }
}

fn append(ring: &KeyRing, user: &str, sid: &str, seq: u64, text: &str) -> WriteOp {
    let id = format!("{sid}-m{seq}");
    WriteOp::AppendMessage {
        user_id: user.into(),
        message: MessageRecord {
            session_id: sid.into(),
            message_id: id.clone(),
            seq,
            role: Role::Assistant,
            author: String::new(),
            client_id: None,
            sealed: ring.seal(
                &Place {
                    session_id: sid,
                    message_id: &id,
                    role: "assistant",
                    author: "",
                    seq,
                },
                text,
            ),
            created_at: 10 + seq as i64,
            tokens_in: 0,
            tokens_out: 0,
            cancelled: false,
            file: None,
            extra: None,
        },
    }
}

fn a_write_queued_behind_a_delete_brings_nothing_back(b: &Backend) {
    let ring = ring();
    let s = &b.store;
    block(s.write(vec![
        WriteOp::CreateSession(session("gone-1", "leaver")),
        append(&ring, "leaver", "gone-1", 1, "hello"),
    ]))
    .unwrap();
    // The delete, then what a core may still have had in flight for that user (an
    // answer finishing, a help request), queued behind it before either commits.
    let delete = s.write(vec![WriteOp::DeleteUser {
        user_id: "leaver".into(),
    }]);
    let late_answer = s.write(vec![append(&ring, "leaver", "gone-1", 2, "late")]);
    let late_state = s.write(vec![WriteOp::SetState {
        session_id: "gone-1".into(),
        state: SessionState::Waiting,
        actor: "leaver".into(),
        action: AuditAction::HelpRequest,
        at: 20,
    }]);
    block(delete).unwrap();
    let answer = block(late_answer);
    assert!(answer.is_err(), "{}: {answer:?}", b.name);
    let state = block(late_state);
    assert!(state.is_err(), "{}: {state:?}", b.name);
    assert!(block(s.user_sessions("leaver", 10)).unwrap().is_empty());
    // Were any of their rows left behind (a message, an audit entry), a session
    // of the same id would show them again.
    block(s.write(vec![WriteOp::CreateSession(session("gone-1", "leaver"))])).unwrap();
    let (rec, messages) = block(s.load_session("gone-1", 100)).unwrap().unwrap();
    assert_eq!((rec.message_count, messages.len()), (0, 0), "{}", b.name);
    assert!(
        block(s.session_events("gone-1")).unwrap().is_empty(),
        "{}",
        b.name
    );
}

fn help_payload(sid: &str, user: &str, name: &str) -> String {
    serde_json::json!({"event": "help_requested", "session_id": sid, "user_id": user,
        "user_name": name, "at": 5})
    .to_string()
}

fn enqueue(payload: String) -> WriteOp {
    WriteOp::Enqueue {
        kind: "webhook".into(),
        payload,
        at: 5,
    }
}

fn a_deleted_users_notifications_are_dropped_or_scrubbed(b: &Backend) {
    let s = &b.store;
    block(s.write(vec![
        enqueue(help_payload("q-1", "quitter", "Zoë Quitter")),
        enqueue(help_payload("q-2", "quitter", "Zoë Quitter")),
        enqueue(help_payload("r-1", "remains", "Ray Remains")),
        enqueue("not json, names nobody".into()),
    ]))
    .unwrap();
    let due = block(s.due_notifications(5, 10)).unwrap();
    assert_eq!(due.len(), 4, "{}", b.name);
    // The first one was sent already: its row stays, scrubbed.
    block(s.write(vec![WriteOp::Delivered {
        id: due[0].id,
        at: 6,
    }]))
    .unwrap();
    block(s.write(vec![WriteOp::DeleteUser {
        user_id: "quitter".into(),
    }]))
    .unwrap();
    let due = block(s.due_notifications(10, 10)).unwrap();
    let left: Vec<&str> = due.iter().map(|n| n.payload.as_str()).collect();
    assert_eq!(
        left,
        [
            help_payload("r-1", "remains", "Ray Remains").as_str(),
            "not json, names nobody"
        ],
        "{}: the deleted user's pending notification is dropped",
        b.name
    );
    let rows = outbox_rows(b);
    assert_eq!(rows.len(), 3, "{}: {rows:?}", b.name);
    let sent = rows.iter().find(|(state, _)| state == "delivered").unwrap();
    assert!(
        !sent.1.contains("quitter") && !sent.1.contains("Zoë") && !sent.1.contains("q-1"),
        "{}: {sent:?}",
        b.name
    );
    let v: serde_json::Value = serde_json::from_str(&sent.1).unwrap();
    assert_eq!(v["user_id"], "[deleted]");
    assert_eq!(v["event"], "help_requested", "what happened is kept");
}

/// Every outbox row as (state, payload), read past the store.
fn outbox_rows(b: &Backend) -> Vec<(String, String)> {
    match &b.raw {
        Raw::Sqlite(dir) => {
            let c = rusqlite::Connection::open(dir.path().join("chatbox.db")).unwrap();
            let mut stmt = c
                .prepare("SELECT state, payload FROM outbox ORDER BY id")
                .unwrap();
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
            rows.collect::<Result<_, _>>().unwrap()
        }
        Raw::Mongo { uri, database } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                use futures_util::TryStreamExt;
                let client = ::mongodb::Client::with_uri_str(uri).await.unwrap();
                let coll = client
                    .database(database)
                    .collection::<::mongodb::bson::Document>("outbox");
                let docs: Vec<::mongodb::bson::Document> = coll
                    .find(::mongodb::bson::doc! {})
                    .await
                    .unwrap()
                    .try_collect()
                    .await
                    .unwrap();
                docs.iter()
                    .map(|d| {
                        let get = |k| d.get_str(k).unwrap_or_default().to_owned();
                        (get("state"), get("payload"))
                    })
                    .collect()
            }),
    }
}

/// With `secure_delete`, a deleted user's rows are overwritten in the file, not
/// only unlinked: after the delete and a checkpoint, none of their bytes remain.
#[test]
fn deleted_content_leaves_the_database_file() {
    let b = sqlite();
    let Raw::Sqlite(dir) = &b.raw else {
        unreachable!()
    };
    let ring = ring();
    let user = "erase-me-7f3a9c";
    let text = "x".repeat(64);
    let mut ops = vec![WriteOp::CreateSession(session("erase-sess-7f3a9c", user))];
    ops.extend((1..=20).map(|i| append(&ring, user, "erase-sess-7f3a9c", i, &text)));
    ops.push(enqueue(help_payload(
        "erase-sess-7f3a9c",
        user,
        "Erin Erase",
    )));
    block(b.store.write(ops)).unwrap();
    // Someone else's rows stay, so the pages are reused rather than dropped.
    block(b.store.write(vec![
        WriteOp::CreateSession(session("keep-sess", "keeper")),
        append(&ring, "keeper", "keep-sess", 1, "kept"),
    ]))
    .unwrap();
    let path = dir.path().join("chatbox.db");
    let checkpoint = || {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    };
    let bytes_of = |needle: &[u8]| {
        let mut all = std::fs::read(&path).unwrap();
        all.extend(std::fs::read(dir.path().join("chatbox.db-wal")).unwrap_or_default());
        all.windows(needle.len()).filter(|w| *w == needle).count()
    };
    checkpoint();
    assert!(bytes_of(user.as_bytes()) > 0, "the test sees stored bytes");
    block(b.store.write(vec![WriteOp::DeleteUser {
        user_id: user.into(),
    }]))
    .unwrap();
    checkpoint();
    assert_eq!(
        bytes_of(user.as_bytes()),
        0,
        "the user id is still in the file"
    );
    assert_eq!(
        bytes_of(b"erase-sess-7f3a9c"),
        0,
        "a session id is still in the file"
    );
    assert_eq!(bytes_of(b"Erin Erase"), 0, "the name is still in the file");
    assert!(bytes_of(b"keep-sess") > 0, "other users' rows stay");
}

/// A row sealed before the format version existed (ids-only associated data, no
/// version stored), put straight into the backend.
fn insert_legacy_row(b: &Backend, sid: &str, seq: i64, message_id: &str, text: &str) {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let key: [u8; 32] = [0x44; 32];
    let mut aad = Vec::new();
    for s in [sid, message_id] {
        aad.extend_from_slice(&(s.len() as u32).to_be_bytes());
        aad.extend_from_slice(s.as_bytes());
    }
    let nonce: [u8; 12] = rand::random();
    let payload = Payload {
        msg: text.as_bytes(),
        aad: &aad,
    };
    let cipher = aes_gcm::Aes256Gcm::new(&key.into());
    let ciphertext = cipher.encrypt(&nonce.into(), payload).unwrap();
    let key_id = chatbox::crypto::key_id(&key);
    match &b.raw {
        Raw::Sqlite(dir) => {
            let c = rusqlite::Connection::open(dir.path().join("chatbox.db")).unwrap();
            c.execute(
                "INSERT INTO messages (session_id, seq, message_id, role, author, user_id,
                     key_id, nonce, ciphertext, created_at)
                 VALUES (?1, ?2, ?3, 'user', 'u', 'u', ?4, ?5, ?6, 1)",
                rusqlite::params![sid, seq, message_id, key_id, &nonce[..], ciphertext],
            )
            .unwrap();
        }
        Raw::Mongo { .. } => mongo_raw(b, |db| async move {
            use ::mongodb::bson::{doc, spec::BinarySubtype, Binary};
            let bin = |bytes: Vec<u8>| Binary {
                subtype: BinarySubtype::Generic,
                bytes,
            };
            db.collection::<::mongodb::bson::Document>("messages")
                .insert_one(doc! {"_id": message_id, "session_id": sid, "seq": seq,
                "role": "user", "author": "u", "user_id": "u", "key_id": i64::from(key_id),
                "nonce": bin(nonce.to_vec()), "ciphertext": bin(ciphertext),
                "created_at": 1i64, "tokens_in": 0i64, "tokens_out": 0i64, "cancelled": false})
                .await
                .unwrap();
        }),
    }
}

/// Runs `f` on the test's MongoDB database.
fn mongo_raw<F: std::future::Future<Output = ()>>(
    b: &Backend,
    f: impl FnOnce(::mongodb::Database) -> F,
) {
    let Raw::Mongo { uri, database } = &b.raw else {
        unreachable!()
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = ::mongodb::Client::with_uri_str(uri).await.unwrap();
            f(client.database(database)).await
        })
}

fn an_edited_row_fails_to_open_and_an_old_one_opens(b: &Backend) {
    let ring = ring();
    let s = &b.store;
    let mut ops = vec![WriteOp::CreateSession(session("edited", "u"))];
    ops.extend((1..=3).map(|i| append(&ring, "u", "edited", i, &format!("text {i}"))));
    block(s.write(ops)).unwrap();
    // The second message moved to another place in the session, past the store.
    match &b.raw {
        Raw::Sqlite(dir) => {
            let c = rusqlite::Connection::open(dir.path().join("chatbox.db")).unwrap();
            let sql = "UPDATE messages SET seq = 9 WHERE session_id = 'edited' AND seq = 2";
            assert_eq!(c.execute(sql, []).unwrap(), 1);
        }
        Raw::Mongo { .. } => mongo_raw(b, |db| async move {
            use ::mongodb::bson::doc;
            let r = db
                .collection::<::mongodb::bson::Document>("messages")
                .update_one(doc! {"_id": "edited-m2"}, doc! {"$set": {"seq": 9i64}})
                .await
                .unwrap();
            assert_eq!(r.modified_count, 1);
        }),
    }
    insert_legacy_row(b, "edited", 7, "legacy-7", "sealed before v1");
    let (_, messages) = block(s.load_session("edited", 100)).unwrap().unwrap();
    let opened: Vec<(u64, Option<String>)> = messages
        .iter()
        .map(|m| (m.seq, ring.open(&m.place(), &m.sealed).ok()))
        .collect();
    assert_eq!(
        opened,
        [
            (1, Some("text 1".to_owned())),
            (3, Some("text 3".to_owned())),
            (7, Some("sealed before v1".to_owned())),
            (9, None),
        ],
        "{}",
        b.name
    );
}
