//! Human takeover: help requests reach admins, an admin joins (the AI goes silent),
//! chats, leaves (the AI answers again); several admins, admins on other cores,
//! users and admins going away mid-takeover, and the persisted audit trail.

mod common;

use chatbox::auth::now_secs;
use chatbox::runtime::mesh::owner_core;
use common::*;
use serde_json::{json, Value};

async fn admin(addr: std::net::SocketAddr, id: &str) -> Ws {
    let t = token_with(id, &["admin"], now_secs() + 3600);
    connect(addr, "/ws", Some(&t), None)
        .await
        .expect("admin connects")
}

/// A user id whose core differs from (or equals) the admin's, on two cores.
fn user_on(other_than_admin: bool, admin_id: &str) -> String {
    let admin_core = owner_core(admin_id, 2);
    (0..100)
        .map(|i| format!("user-{i}"))
        .find(|u| (owner_core(u, 2) != admin_core) == other_than_admin)
        .unwrap()
}

/// Starts a session with one answered message; returns its id.
async fn session_with_answer(ws: &mut Ws) -> String {
    send(
        ws,
        json!({"type": "user_message", "content": "my parcel is lost"}),
    )
    .await;
    let (_, before) = until(ws, "ai_done").await;
    before[0]["session_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_takeover_chat_and_hand_back_across_cores() {
    let server = start(config());
    let addr = server.local_addr();
    let admin_id = "agent-ann";
    let user = user_on(true, admin_id);
    let mut a = admin(addr, admin_id).await;
    let mut u = connect_user(addr, &user).await;
    let sid = session_with_answer(&mut u).await;

    send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    let (help, _) = until(&mut a, "help_requested").await;
    assert_eq!(
        (help["session_id"].as_str(), help["user_id"].as_str()),
        (Some(sid.as_str()), Some(user.as_str()))
    );
    assert_eq!(help["user_name"], json!(format!("{user} name")));
    assert!(help["at"].as_i64().unwrap() > 0);
    until(&mut u, "help_requested").await;

    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    let (history, _) = until(&mut a, "session").await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        2,
        "the admin sees the transcript"
    );
    until(&mut a, "admin_joined").await;
    let (joined, _) = until(&mut u, "admin_joined").await;
    assert_eq!(joined["admin_name"], "agent-ann name");

    // While the human has the session the AI says nothing.
    let llm_before = llm_total(&server, |m| m.requests.get());
    send(
        &mut u,
        json!({"type": "user_message", "id": "h1", "session_id": sid, "content": "hello human?"}),
    )
    .await;
    until(&mut u, "ack").await;
    let (seen, _) = until(&mut a, "user_message").await;
    assert_eq!(seen["content"], "hello human?");
    send(&mut a, json!({"type": "admin_message", "session_id": sid, "content": "Hi, I'm Ann. Let me check."})).await;
    let (said, between) = until(&mut u, "admin_message").await;
    assert_eq!(
        (said["content"].as_str(), said["admin_name"].as_str()),
        (Some("Hi, I'm Ann. Let me check."), Some("agent-ann name"))
    );
    assert!(
        between.iter().all(|v| v["type"] != "ai_chunk"),
        "{between:?}"
    );
    assert_eq!(llm_total(&server, |m| m.requests.get()), llm_before);

    send(&mut a, json!({"type": "admin_leave", "session_id": sid})).await;
    until(&mut u, "admin_left").await;
    until(&mut a, "admin_left").await;
    send(
        &mut u,
        json!({"type": "user_message", "session_id": sid, "content": "thanks"}),
    )
    .await;
    let (done, _) = until(&mut u, "ai_done").await;
    assert_eq!(done["cancelled"], Value::Null, "the AI answers again");

    // The transcript has every voice, in order.
    send(&mut u, json!({"type": "resume", "session_id": sid})).await;
    let (s, _) = until(&mut u, "session").await;
    let roles: Vec<&str> = s["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "admin", "user", "assistant"]
    );
}

/// Step by step: one chunk has gone out when the admin joins; the answer ends
/// cancelled with that chunk only, and the upstream request is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_cancels_a_running_answer() {
    let words: Vec<String> = (1..=10).map(|i| format!("w{i} ")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let (cfg, mut fake, gate) = fake_llm::stepped_server(&[&words]).await;
    let server = start(cfg);
    let addr = server.local_addr();
    let mut a = admin(addr, "agent-x").await;
    let mut u = connect_user(addr, "impatient").await;
    send(
        &mut u,
        json!({"type": "user_message", "content": "tell me everything"}),
    )
    .await;
    gate.release(1);
    let (chunk, before) = until(&mut u, "ai_chunk").await;
    assert_eq!(chunk["content"], "w1 ");
    let sid = before[0]["session_id"].as_str().unwrap().to_owned();
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    // Both arrive; their order is not fixed (the answer is stored as it stops).
    let (mut done, mut joined) = (None, false);
    while done.is_none() || !joined {
        let v = recv(&mut u).await;
        assert_ne!(v["type"], "ai_chunk", "no chunk after the join: {v}");
        if v["type"] == "ai_done" {
            done = Some(v);
        } else if v["type"] == "admin_joined" {
            joined = true;
        }
    }
    let done = done.unwrap();
    assert_eq!(done["cancelled"], true);
    assert_eq!(done["usage"]["output_tokens"], 1, "{done}");
    fake.wait_closed(0).await;
    gate.open();
    let seen = fake.requests();
    assert_eq!((seen.len(), seen[0].events_sent), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admins_and_the_ai_returns_only_when_the_last_leaves() {
    let server = start(config());
    let addr = server.local_addr();
    let mut u = connect_user(addr, "popular").await;
    let sid = session_with_answer(&mut u).await;
    let mut a1 = admin(addr, "agent-1").await;
    let mut a2 = admin(addr, "agent-2").await;
    // Both join at once.
    send(&mut a1, json!({"type": "admin_join", "session_id": sid})).await;
    send(&mut a2, json!({"type": "admin_join", "session_id": sid})).await;
    for a in [&mut a1, &mut a2] {
        let mut names = Vec::new();
        while names.len() < 2 {
            let (j, _) = until(a, "admin_joined").await;
            names.push(j["admin_name"].as_str().unwrap().to_owned());
        }
        names.sort();
        assert_eq!(names, ["agent-1 name", "agent-2 name"]);
    }
    // One admin writing reaches the other admin and the user.
    send(
        &mut a1,
        json!({"type": "admin_message", "session_id": sid, "content": "I take this one"}),
    )
    .await;
    until(&mut a2, "admin_message").await;
    until(&mut u, "admin_message").await;

    send(&mut a1, json!({"type": "admin_leave", "session_id": sid})).await;
    until(&mut u, "admin_left").await;
    let llm_before = llm_total(&server, |m| m.requests.get());
    send(
        &mut u,
        json!({"type": "user_message", "id": "q", "session_id": sid, "content": "still there?"}),
    )
    .await;
    until(&mut a2, "user_message").await;
    assert_eq!(
        llm_total(&server, |m| m.requests.get()),
        llm_before,
        "agent-2 still has it"
    );

    // The last admin's connection closing is a leave too.
    drop(a2);
    let (left, _) = until(&mut u, "admin_left").await;
    assert_eq!(left["admin_name"], "agent-2 name");
    send(
        &mut u,
        json!({"type": "user_message", "session_id": sid, "content": "anyone?"}),
    )
    .await;
    until(&mut u, "ai_done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_leaving_mid_takeover_finds_the_admin_reply_on_return() {
    let cfg = config();
    let server = start(cfg.clone());
    let addr = server.local_addr();
    let admin_id = "agent-z";
    let user = user_on(false, admin_id);
    let mut u = connect_user(addr, &user).await;
    let sid = session_with_answer(&mut u).await;
    send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    until(&mut u, "help_requested").await;
    let mut a = admin(addr, admin_id).await;
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    until(&mut u, "admin_joined").await;
    close_and_wait(u).await;
    send(
        &mut a,
        json!({"type": "admin_message", "session_id": sid, "content": "Found your parcel."}),
    )
    .await;
    until(&mut a, "admin_message").await;
    let mut u = connect_user(addr, &user).await;
    send(&mut u, json!({"type": "resume", "session_id": sid})).await;
    let (s, _) = until(&mut u, "session").await;
    let last = s["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["role"].as_str(), last["content"].as_str()),
        (Some("admin"), Some("Found your parcel."))
    );
    send(&mut a, json!({"type": "admin_leave", "session_id": sid})).await;
    until(&mut u, "admin_left").await;

    // Every transition is stored with who made it.
    drop((u, a));
    server.shutdown();
    stop(server).await;
    let (pool, store) = open_store(&cfg);
    let events: Vec<(String, String, String)> = store
        .session_events(&sid)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.actor, e.action, e.state))
        .collect();
    let expect = [
        (user.as_str(), "help_request", "waiting"),
        (admin_id, "admin_join", "human"),
        (admin_id, "admin_leave", "ai"),
    ];
    assert_eq!(
        events,
        expect.map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
    );
    let (session, _) = store.load_session(&sid, 0).await.unwrap().unwrap();
    assert_eq!(session.state, chatbox::store::SessionState::Ai);
    // A runtime may only be dropped where blocking is allowed.
    tokio::task::block_in_place(move || drop((store, pool)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_frames_on_unknown_or_unjoined_sessions_are_refused() {
    let server = start(config());
    let addr = server.local_addr();
    let mut a = admin(addr, "agent-q").await;
    send(
        &mut a,
        json!({"type": "admin_join", "id": "j", "session_id": "s_nope"}),
    )
    .await;
    let e = recv(&mut a).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("not_found"), Some("j"))
    );
    send(
        &mut a,
        json!({"type": "admin_message", "id": "m", "session_id": "s_nope", "content": "hi"}),
    )
    .await;
    let e = recv(&mut a).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("forbidden"), Some("m"))
    );
    // A user asking for help on someone else's session learns nothing.
    let mut u = connect_user(addr, "owner-1").await;
    let sid = session_with_answer(&mut u).await;
    let mut other = connect_user(addr, "someone-else").await;
    send(
        &mut other,
        json!({"type": "help_request", "session_id": sid}),
    )
    .await;
    assert_eq!(recv(&mut other).await["code"], "forbidden");
}

/// The frames a connection receives until `kind`, `kind`'s included.
async fn frames_until(ws: &mut Ws, kind: &str) -> Vec<Value> {
    let (last, mut before) = until(ws, kind).await;
    before.push(last);
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_watches_an_answer_stream_live_without_taking_over() {
    let words: Vec<String> = (1..=4).map(|i| format!("w{i} ")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let (cfg, _fake, gate) = fake_llm::stepped_server(&[&words, &["later"]]).await;
    let server = start(cfg);
    let addr = server.local_addr();
    let admin_id = "agent-wes";
    let user = user_on(true, admin_id);
    let mut a = admin(addr, admin_id).await;
    let mut u = connect_user(addr, &user).await;
    send(
        &mut u,
        json!({"type": "user_message", "content": "where is it?"}),
    )
    .await;
    gate.release(1);
    let (_, before) = until(&mut u, "ai_chunk").await;
    let sid = before[0]["session_id"].as_str().unwrap().to_owned();

    // The transcript, then the answer so far, then the rest live.
    send(&mut a, json!({"type": "admin_watch", "session_id": sid})).await;
    let (history, _) = until(&mut a, "session").await;
    assert_eq!(history["messages"][0]["content"], "where is it?");
    assert!(history.get("agents").is_none(), "{history}");
    let (replayed, _) = until(&mut a, "ai_chunk").await;
    assert_eq!(
        (replayed["seq"].as_u64(), replayed["content"].as_str()),
        (Some(1), Some("w1 "))
    );
    gate.release(words.len());
    let live = frames_until(&mut a, "ai_done").await;
    let text: String = live.iter().filter_map(|f| f["content"].as_str()).collect();
    assert_eq!(text, "w2 w3 w4 ", "each chunk once: {live:?}");

    // The user is told nothing; the watcher cannot write; the AI keeps the session.
    let seen = frames_until(&mut u, "ai_done").await;
    assert!(
        seen.iter()
            .all(|f| !f["type"].as_str().unwrap().starts_with("admin")),
        "{seen:?}"
    );
    let write = json!({"type": "admin_message", "id": "w", "session_id": sid, "content": "hi"});
    send(&mut a, write).await;
    assert_eq!(until(&mut a, "error").await.0["code"], "forbidden");
    let boss = token_with(admin_id, &["admin"], now_secs() + 3600);
    let (_, body) = admin_call(addr, "GET", &format!("/sessions/{sid}"), &boss).await;
    assert_eq!(body["session"]["state"], "ai");

    // Taking over from watching: the user is told, and a reload shows who is in.
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    let (told, _) = until(&mut u, "admin_joined").await;
    assert!(told.get("you").is_none(), "{told}");
    let (own, _) = until(&mut a, "admin_joined").await;
    assert_eq!(
        own["you"], true,
        "the joining connection hears its own join: {own}"
    );
    let mut back = connect_user(addr, &user).await;
    send(&mut back, json!({"type": "resume", "session_id": sid})).await;
    let (resumed, _) = until(&mut back, "session").await;
    assert_eq!(resumed["agents"], json!([format!("{admin_id} name")]));

    // Handed back, the session is the AI's again and nobody is listed.
    send(&mut a, json!({"type": "admin_leave", "session_id": sid})).await;
    until(&mut u, "admin_left").await;
    assert_eq!(until(&mut a, "admin_left").await.0["you"], true);
    send(&mut back, json!({"type": "resume", "session_id": sid})).await;
    let (resumed, _) = until(&mut back, "session").await;
    assert!(resumed.get("agents").is_none(), "{resumed}");
}
