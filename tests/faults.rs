//! A panic in any task a core spawns for a session (the answer, the reply from
//! storage, takeover, resume, the expiry sweep) ends only that unit of work: the
//! session hears `internal`, the panic is counted, and the core, the connection and
//! every other user carry on. Debug builds only: the fault points do not exist in
//! release builds.
#![cfg(debug_assertions)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chatbox::auth::now_secs;
use common::*;
use serde_json::json;

/// A server whose task passing fault point `point` panics, once, when armed.
fn server_failing_at(point: &'static str, armed: Arc<AtomicBool>) -> chatbox::ServerHandle {
    let hooks = chatbox::Hooks {
        fault: Some(Arc::new(move |at: &str| {
            if at == point && armed.swap(false, Ordering::SeqCst) {
                panic!("fault injected at {point}");
            }
        })),
        ..Default::default()
    };
    start_with(config(), hooks)
}

/// Sends a first message and returns (the session id, the frames up to the
/// `internal` error or `ai_done`, whichever the case brings).
async fn first_message(ws: &mut Ws) -> String {
    send(
        ws,
        json!({"type": "user_message", "content": "hello there", "id": "c1"}),
    )
    .await;
    let (session, _) = until(ws, "session").await;
    session["session_id"]
        .as_str()
        .expect("session id")
        .to_owned()
}

/// The same connection still gets a whole answer, and so does another user.
async fn everyone_carries_on(addr: std::net::SocketAddr, ws: &mut Ws, sid: &str) {
    send(
        ws,
        json!({"type": "user_message", "session_id": sid, "content": "again", "id": "c2"}),
    )
    .await;
    until(ws, "ai_done").await;
    let mut other = connect_user(addr, "someone-else").await;
    send(&mut other, json!({"type": "user_message", "content": "hi"})).await;
    until(&mut other, "ai_done").await;
}

async fn internal_error_for(ws: &mut Ws, sid: &str) {
    let (error, _) = until(ws, "error").await;
    assert_eq!(error["code"], "internal", "{error}");
    assert_eq!(error["session_id"], sid, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_answer_costs_only_that_answer() {
    let armed = Arc::new(AtomicBool::new(true));
    let server = server_failing_at("answer", armed.clone());
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "alice").await;
    let sid = first_message(&mut ws).await;
    internal_error_for(&mut ws, &sid).await;
    assert!(!armed.load(Ordering::SeqCst), "the fault point was reached");
    everyone_carries_on(addr, &mut ws, &sid).await;
    assert_eq!(total(&server, |m| m.panics.get()), 1);
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_after_the_commit_costs_only_that_reply() {
    let armed = Arc::new(AtomicBool::new(true));
    let server = server_failing_at("store_reply", armed);
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "bob").await;
    let sid = first_message(&mut ws).await;
    internal_error_for(&mut ws, &sid).await;
    everyone_carries_on(addr, &mut ws, &sid).await;
    assert_eq!(total(&server, |m| m.panics.get()), 1);
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_resume_costs_only_that_resume() {
    let armed = Arc::new(AtomicBool::new(false));
    let server = server_failing_at("resume", armed.clone());
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "carol").await;
    let sid = first_message(&mut ws).await;
    until(&mut ws, "ai_done").await;
    armed.store(true, Ordering::SeqCst);
    send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
    internal_error_for(&mut ws, &sid).await;
    // The next resume works: the history is there.
    send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
    let (session, _) = until(&mut ws, "session").await;
    assert_eq!(
        session["messages"].as_array().map(Vec::len),
        Some(2),
        "{session}"
    );
    everyone_carries_on(addr, &mut ws, &sid).await;
    assert_eq!(total(&server, |m| m.panics.get()), 1);
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_takeover_costs_only_that_join() {
    let armed = Arc::new(AtomicBool::new(false));
    let server = server_failing_at("takeover", armed.clone());
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "dave").await;
    let sid = first_message(&mut ws).await;
    until(&mut ws, "ai_done").await;
    armed.store(true, Ordering::SeqCst);
    let admin_token = token_with("agent", &["admin"], now_secs() + 3600);
    let mut admin = connect(addr, "/ws", Some(&admin_token), None)
        .await
        .expect("admin");
    send(&mut admin, json!({"type": "admin_join", "session_id": sid})).await;
    internal_error_for(&mut ws, &sid).await;
    assert_eq!(total(&server, |m| m.panics.get()), 1);
    // The admin's connection and the core live on: it can leave and join again.
    send(
        &mut admin,
        json!({"type": "admin_leave", "session_id": sid}),
    )
    .await;
    until(&mut admin, "admin_left").await;
    send(&mut admin, json!({"type": "admin_join", "session_id": sid})).await;
    until(&mut admin, "admin_joined").await;
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_expiry_sweep_costs_one_sweep() {
    let armed = Arc::new(AtomicBool::new(true));
    let mut cfg = config();
    cfg.session_idle_secs = 1;
    let hooks_armed = armed.clone();
    let hooks = chatbox::Hooks {
        fault: Some(Arc::new(move |at: &str| {
            if at == "expiry" && hooks_armed.swap(false, Ordering::SeqCst) {
                panic!("fault injected at expiry");
            }
        })),
        ..Default::default()
    };
    let server = start_with(cfg, hooks);
    let addr = server.local_addr();
    // The sweep runs on its own timer; wait for the event of its panic.
    let mut ws = connect_user(addr, "erin").await;
    while total(&server, |m| m.panics.get()) == 0 {
        tokio::task::yield_now().await;
    }
    assert!(!armed.load(Ordering::SeqCst));
    let sid = first_message(&mut ws).await;
    until(&mut ws, "ai_done").await;
    everyone_carries_on(addr, &mut ws, &sid).await;
    server.shutdown();
    stop(server).await;
}
