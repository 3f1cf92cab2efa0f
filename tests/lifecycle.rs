//! A session's life after its conversation: ended when idle (in memory or only
//! stored), help requests that never multiply notifications and cool down after
//! a hand-back, ended sessions refusing help and takeover, and stored sessions
//! loaded back within the per-user bound.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatbox::auth::now_secs;
use chatbox::runtime::mesh::owner_core;
use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

async fn admin(addr: SocketAddr, id: &str) -> Ws {
    let t = token_with(id, &["admin"], now_secs() + 3600);
    connect(addr, "/ws", Some(&t), None)
        .await
        .expect("admin connects")
}

/// A user id whose core differs from the admin's, on two cores.
fn user_apart_from(admin_id: &str) -> String {
    let admin_core = owner_core(admin_id, 2);
    (0..100)
        .map(|i| format!("user-{i}"))
        .find(|u| owner_core(u, 2) != admin_core)
        .unwrap()
}

/// Reads frames until one of type `kind`, failing with `what` if none comes in
/// time; returns it and everything before it.
async fn expect(ws: &mut Ws, kind: &str, what: &str) -> (Value, Vec<Value>) {
    tokio::time::timeout(WAIT, until(ws, kind))
        .await
        .unwrap_or_else(|_| panic!("{what}: no {kind} frame within {WAIT:?}"))
}

/// Starts a session with one answered message; returns its id.
async fn session_with_answer(ws: &mut Ws) -> String {
    send(
        ws,
        json!({"type": "user_message", "content": "my parcel is lost"}),
    )
    .await;
    let (_, before) = expect(ws, "ai_done", "the first answer").await;
    before[0]["session_id"].as_str().unwrap().to_owned()
}

/// Every frame `ws` sent before this is handled once its `resume` is answered
/// (a connection's frames are handled in order); returns what came before.
async fn sync_user(ws: &mut Ws, sid: &str) -> Vec<Value> {
    send(ws, json!({"type": "resume", "session_id": sid})).await;
    expect(ws, "session", "the resume used to synchronise")
        .await
        .1
}

async fn admin_api(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let t = token_with("boss", &["admin"], now_secs() + 3600);
    let req = format!(
        "{method} /chatbox/admin{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 0\r\n\r\n"
    );
    let (status, _, body) = http(addr, &req).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Polls the admin API until the session is `ended`; fails after [`WAIT`].
async fn until_ended(addr: SocketAddr, sid: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, v) = admin_api(addr, "GET", &format!("/sessions/{sid}")).await;
        assert_eq!(status, 200, "{v}");
        if v["session"]["state"] == "ended" {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {sid} not ended within {WAIT:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The session's audit trail says the server ended it for idleness, and its end
/// time is set and sorts it first by end time.
async fn assert_ended_idle(addr: SocketAddr, sid: &str, v: &Value) {
    let end = v["session"]["end_time"].as_i64().expect("end time set");
    assert!(
        end >= v["session"]["last_activity"].as_i64().unwrap(),
        "{v}"
    );
    let events = v["events"].as_array().unwrap();
    let idle: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "ended_idle")
        .collect();
    assert_eq!(idle.len(), 1, "one ended_idle event: {events:?}");
    assert_eq!(
        (idle[0]["state"].as_str(), idle[0]["actor"].as_str()),
        (Some("ended"), Some(""))
    );
    let (_, list) = admin_api(addr, "GET", "/sessions?sort_by=end_time&order=desc&limit=1").await;
    assert_eq!(list["sessions"][0]["session_id"], json!(sid), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_ended_and_its_connections_hear_it() {
    let server = start(chatbox::Config {
        session_idle_secs: 1,
        session_end_idle_secs: 1,
        ..config()
    });
    let addr = server.local_addr();
    let mut u = connect_user(addr, "idler").await;
    let sid = session_with_answer(&mut u).await;
    // Nothing more happens: the attached user hears the end, as from an admin.
    let (ended, _) = expect(&mut u, "session_ended", "the idle session ending").await;
    assert_eq!(ended["session_id"], json!(sid));
    let v = until_ended(addr, &sid).await;
    assert_ended_idle(addr, &sid, &v).await;
    send(
        &mut u,
        json!({"type": "user_message", "id": "late", "session_id": sid, "content": "still there?"}),
    )
    .await;
    let (e, _) = expect(&mut u, "error", "a message to the ended session").await;
    assert_eq!(e["code"], "invalid_message", "{e}");
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_idle_only_in_storage_is_ended_too() {
    let cfg = config();
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let mut u = connect_user(addr, "sleeper").await;
    let sid = session_with_answer(&mut u).await;
    close_and_wait(u).await;
    server.shutdown();
    stop(server).await;
    // A new process: the session is only stored, and nobody loads it.
    let server = start(chatbox::Config {
        session_idle_secs: 1,
        session_end_idle_secs: 1,
        ..cfg
    });
    let addr = server.local_addr();
    let v = until_ended(addr, &sid).await;
    assert_ended_idle(addr, &sid, &v).await;
    // Loading it back (a resume) finds it ended: it takes nothing new.
    let mut u = connect_user(addr, "sleeper").await;
    send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    let (e, _) = expect(&mut u, "error", "help on the ended session").await;
    assert!(e["message"].as_str().unwrap().contains("ended"), "{e}");
    server.shutdown();
    stop(server).await;
}

/// A webhook receiver that answers 200 and counts the requests.
async fn counting_receiver() -> (
    u16,
    Arc<AtomicUsize>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (s, tx) = (s.clone(), tx.clone());
            tokio::spawn(async move {
                if read_request(&mut sock).await.is_some() {
                    s.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(());
                    let resp = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                    let _ = sock.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
    (port, seen, rx)
}

/// Help requested three times while waiting and twice while an admin has the
/// session, then once within the cooldown after the hand-back: one admin frame,
/// one webhook, one outbox row, one counted request; the last one refused with
/// `rate_limited` and when to retry.
///
/// Every wait is bounded and each "nothing came" is checked behind a frame that
/// must come after it: the admin's readiness is an answer on its own connection
/// before the first request; the user's frames are handled in order, so a
/// `resume` answered means the requests before it were handled; an admin's
/// transcript comes from the session's core, which sent any admin feed of those
/// requests to the admin's core before it (one queue, in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_help_requests_notify_once_and_a_hand_back_cools_down() {
    let (port, hooks_seen, mut hooks) = counting_receiver().await;
    let cfg = chatbox::Config {
        notify_webhook_url: Some(format!("http://127.0.0.1:{port}/hooks/help")),
        notify_webhook_secret: Some("webhook-secret-0123456789".into()),
        help_cooldown_secs: 3600,
        ..config()
    };
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let admin_id = "agent-r";
    let user = user_apart_from(admin_id);
    let mut a = admin(addr, admin_id).await;
    // Readiness: the admin's connection answers, so it is registered for the feed.
    send(
        &mut a,
        json!({"type": "admin_join", "session_id": "s_nothing"}),
    )
    .await;
    let (e, _) = expect(&mut a, "error", "the admin's readiness check").await;
    assert_eq!(e["code"], "not_found", "{e}");
    let mut u = connect_user(addr, &user).await;
    let sid = session_with_answer(&mut u).await;

    for _ in 0..3 {
        send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    }
    expect(&mut u, "help_requested", "the first help request").await;
    let heard = sync_user(&mut u, &sid).await;
    assert!(heard.is_empty(), "repeats told the user: {heard:?}");
    expect(&mut a, "help_requested", "the admin feed").await;
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    let (_, heard) = expect(&mut a, "session", "the admin's transcript").await;
    assert!(heard.is_empty(), "repeats reached the admin: {heard:?}");
    expect(&mut u, "admin_joined", "the takeover").await;

    for _ in 0..2 {
        send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    }
    let heard = sync_user(&mut u, &sid).await;
    assert!(heard.is_empty(), "help with a human there told: {heard:?}");
    send(&mut a, json!({"type": "admin_leave", "session_id": sid})).await;
    expect(&mut u, "admin_left", "the hand-back").await;
    expect(&mut a, "admin_left", "the admin's own leave").await;

    send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    let (e, heard) = expect(&mut u, "error", "help within the cooldown").await;
    assert!(heard.is_empty(), "{heard:?}");
    assert_eq!(
        (e["code"].as_str(), e["session_id"].as_str()),
        (Some("rate_limited"), Some(sid.as_str()))
    );
    let retry = e["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry > 3_500_000 && retry <= 3_600_000, "{e}");
    assert!(sync_user(&mut u, &sid).await.is_empty());
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    let (_, heard) = expect(&mut a, "session", "the admin's second transcript").await;
    assert!(
        heard.is_empty(),
        "a refused request reached the admin: {heard:?}"
    );

    tokio::time::timeout(WAIT, hooks.recv())
        .await
        .expect("the webhook is called in time");
    assert_eq!(total(&server, |m| m.help_requests.get()), 1);
    server.shutdown();
    stop(server).await;
    let (rt, store) = open_store(&cfg);
    let mut rows = 0;
    for state in ["pending", "delivered", "dead"] {
        rows += store.outbox_count(state).await.unwrap();
    }
    // A runtime may not be dropped on an async thread.
    tokio::task::spawn_blocking(move || drop((store, rt)))
        .await
        .unwrap();
    assert_eq!(rows, 1, "one notification queued in all");
    assert_eq!(hooks_seen.load(Ordering::SeqCst), 1, "one webhook in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_session_refuses_help_and_takeover() {
    let server = start(config());
    let addr = server.local_addr();
    let admin_id = "agent-end";
    let user = user_apart_from(admin_id);
    let mut u = connect_user(addr, &user).await;
    let sid = session_with_answer(&mut u).await;
    let (status, _) = admin_api(addr, "POST", &format!("/sessions/{sid}/end")).await;
    assert_eq!(status, 200);
    expect(&mut u, "session_ended", "the admin's end").await;

    send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    let (e, heard) = expect(&mut u, "error", "help on an ended session").await;
    assert!(heard.is_empty(), "{heard:?}");
    assert_eq!(
        (e["code"].as_str(), e["session_id"].as_str()),
        (Some("invalid_message"), Some(sid.as_str()))
    );
    assert!(e["message"].as_str().unwrap().contains("ended"), "{e}");

    let mut a = admin(addr, admin_id).await;
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    let (e, heard) = expect(&mut a, "error", "joining an ended session").await;
    assert!(
        heard.is_empty(),
        "no transcript for an ended session: {heard:?}"
    );
    assert_eq!(
        (e["code"].as_str(), e["session_id"].as_str()),
        (Some("invalid_message"), Some(sid.as_str()))
    );
    assert!(e["message"].as_str().unwrap().contains("ended"), "{e}");
    // Nothing changed: no help request counted, the audit trail ends with the end.
    assert_eq!(total(&server, |m| m.help_requests.get()), 0);
    let (_, v) = admin_api(addr, "GET", &format!("/sessions/{sid}")).await;
    let actions: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["end"], "{v}");
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_sessions_load_back_within_the_per_user_bound() {
    let server = start(chatbox::Config {
        sessions_per_user_max: 1,
        ..config()
    });
    let addr = server.local_addr();
    let user = "capped";
    // Session A, then its connection goes: A stays in memory, idle.
    let mut first = connect_user(addr, user).await;
    let a_sid = session_with_answer(&mut first).await;
    close_and_wait(first).await;
    // Session B takes the only place (A, idle, leaves memory to make room) and
    // stays attached to a live connection.
    let mut u = connect_user(addr, user).await;
    let b_sid = session_with_answer(&mut u).await;
    assert_ne!(a_sid, b_sid);

    // Loading A back would be a second session in memory: refused, as creating is.
    send(
        &mut u,
        json!({"type": "resume", "id": "r1", "session_id": a_sid}),
    )
    .await;
    let (e, heard) = expect(&mut u, "error", "resuming past the bound").await;
    assert!(heard.is_empty(), "{heard:?}");
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("invalid_message"), Some("r1"))
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("too many open sessions"),
        "{e}"
    );
    send(&mut u, json!({"type": "help_request", "session_id": a_sid})).await;
    let (e, _) = expect(&mut u, "error", "help past the bound").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("too many open sessions"),
        "{e}"
    );
    let mut adm = admin(addr, "agent-cap").await;
    send(&mut adm, json!({"type": "admin_join", "session_id": a_sid})).await;
    let (e, heard) = expect(&mut adm, "error", "an admin joining past the bound").await;
    assert!(heard.is_empty(), "{heard:?}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("too many open sessions"),
        "{e}"
    );
    assert_eq!(total(&server, |m| m.help_requests.get()), 0);

    // Once B is idle (its connection gone), it makes room and A loads back.
    close_and_wait(u).await;
    let mut u = connect_user(addr, user).await;
    send(&mut u, json!({"type": "resume", "session_id": a_sid})).await;
    let (s, _) = expect(&mut u, "session", "resuming once there is room").await;
    assert_eq!(s["session_id"], json!(a_sid));
    server.shutdown();
    stop(server).await;
}

/// Outbox retention against a store (SQLite; MongoDB with
/// `CHATBOX_TEST_STORE=mongo`), with "now" given: delivered rows go after
/// `outbox_delivered_retention_secs`, dead letters only after the longer
/// `outbox_dead_retention_secs`, pending rows never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_notifications_are_purged_and_dead_letters_kept_longer() {
    use chatbox::store::WriteOp;
    let cfg = chatbox::Config {
        outbox_delivered_retention_secs: 100,
        outbox_dead_retention_secs: 1000,
        ..config()
    };
    let (rt, pool) = chatbox::pool::PoolRuntime::start(1, 64).unwrap();
    let backend = chatbox::store::Backend::configured(&cfg);
    let store = chatbox::store::open(&cfg, backend, pool.clone()).unwrap();
    let notifier = chatbox::notify::Notifier::new(&cfg, store.clone(), &pool).unwrap();
    let enqueue = || WriteOp::Enqueue {
        kind: "webhook".into(),
        payload: "{}".into(),
        at: 1_000,
    };
    store
        .write(vec![enqueue(), enqueue(), enqueue(), enqueue()])
        .await
        .unwrap();
    let ids: Vec<i64> = store
        .due_notifications(1_000, 10)
        .await
        .unwrap()
        .iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids.len(), 4);
    store
        .write(vec![
            WriteOp::Delivered {
                id: ids[0],
                at: 10_000,
            },
            WriteOp::Delivered {
                id: ids[1],
                at: 200_000,
            },
            WriteOp::DeliveryFailed {
                id: ids[2],
                error: "503".into(),
                next_at: 2_000,
                dead: true,
            },
        ])
        .await
        .unwrap();
    let counts = || async {
        let mut out = Vec::new();
        for state in ["pending", "delivered", "dead"] {
            out.push(store.outbox_count(state).await.unwrap());
        }
        out
    };
    assert_eq!(counts().await, [1, 2, 1]);
    // 150 s: the row delivered 140 s ago goes, the one delivered at 200 s stays.
    store.write(vec![notifier.purge_op(150_000)]).await.unwrap();
    assert_eq!(counts().await, [1, 1, 1]);
    // 900 s: every delivered row is past retention; the dead letter is not yet.
    store.write(vec![notifier.purge_op(900_000)]).await.unwrap();
    assert_eq!(counts().await, [1, 0, 1]);
    // 1,100 s: the dead letter, queued at 1 s, is past its longer retention.
    store
        .write(vec![notifier.purge_op(1_100_000)])
        .await
        .unwrap();
    assert_eq!(counts().await, [1, 0, 0], "pending rows are never purged");
    // A runtime may not be dropped on an async thread.
    tokio::task::spawn_blocking(move || drop((notifier, store, pool, rt)))
        .await
        .unwrap();
}
