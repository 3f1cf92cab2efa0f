//! Three chatbox nodes as one service: a real nats-server between them and one
//! MongoDB-compatible store. Help requests reach the admins of every node once; an
//! admin's disconnect or delete on one node closes the user's connections on all.
//! Ignored unless asked for (`--include-ignored`): CI sets CHATBOX_TEST_NATS_SERVER
//! and CHATBOX_TEST_MONGO_URI.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use chatbox::auth::now_secs;
use chatbox::Config;
use common::cluster::{user_owned_by, wait_metric, Cluster};
use common::*;
use serde_json::{json, Value};

async fn admin(addr: SocketAddr, id: &str) -> Ws {
    let t = token_with(id, &["admin"], now_secs() + 3600);
    connect(addr, "/ws", Some(&t), None)
        .await
        .expect("admin connects")
}

async fn admin_call_as_boss(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let token = token_with("boss", &["admin"], now_secs() + 3600);
    admin_call(addr, method, path, &token).await
}

/// A user's session with one answered message, and the user's socket.
async fn user_session(addr: SocketAddr, user: &str) -> (Ws, String) {
    let mut ws = connect_user(addr, user).await;
    send(&mut ws, json!({"type": "user_message", "content": "hello"})).await;
    let (_, before) = until(&mut ws, "ai_done").await;
    let sid = before[0]["session_id"].as_str().unwrap().to_owned();
    (ws, sid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn a_help_request_reaches_the_admins_of_every_node_once() {
    let cluster = Cluster::start(3).await;
    let mut admins = Vec::new();
    for i in 0..3 {
        admins.push(admin(cluster.addr(i), &format!("agent-{i}")).await);
    }
    let (mut first, first_sid) = user_session(cluster.addr(0), "ann").await;
    let (mut second, second_sid) = user_session(cluster.addr(2), "bob").await;
    send(
        &mut first,
        json!({"type": "help_request", "session_id": first_sid}),
    )
    .await;
    until(&mut first, "help_requested").await;
    // The second request is the marker: every admin reads up to it, and the first
    // must have come exactly once before it.
    send(
        &mut second,
        json!({"type": "help_request", "session_id": second_sid}),
    )
    .await;
    until(&mut second, "help_requested").await;
    for (i, a) in admins.iter_mut().enumerate() {
        let mut seen = Vec::new();
        loop {
            let (help, _) = until(a, "help_requested").await;
            let sid = help["session_id"].as_str().unwrap().to_owned();
            seen.push(sid.clone());
            if seen.contains(&first_sid) && seen.contains(&second_sid) {
                break;
            }
        }
        let firsts = seen.iter().filter(|s| **s == first_sid).count();
        assert_eq!(firsts, 1, "admin on node {i} saw {seen:?}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn a_disconnect_on_one_node_closes_the_user_on_every_node() {
    let cluster = Cluster::start(3).await;
    let mut sockets = Vec::new();
    for i in 0..3 {
        sockets.push(connect_user(cluster.addr(i), "carl").await);
    }
    let _other = connect_user(cluster.addr(0), "dora").await;
    let (status, body) =
        admin_call_as_boss(cluster.addr(1), "POST", "/users/carl/disconnect").await;
    assert_eq!((status, &body["closed"]), (200, &json!(3)), "{body}");
    for ws in &mut sockets {
        assert_eq!(close_code(ws).await.map(u16::from), Some(4003));
    }
    // The asking node timed its round trip to the others (answered before the 200).
    wait_metric(cluster.addr(1), "chatbox_bus_request_seconds_count", 1).await;
    // Deleting closes them too, wherever they are, and says how many.
    let _again = connect_user(cluster.addr(2), "carl").await;
    let (status, body) = admin_call_as_boss(cluster.addr(0), "DELETE", "/users/carl").await;
    assert_eq!((status, &body["closed"]), (200, &json!(1)), "{body}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn a_disconnect_a_node_cannot_confirm_is_reported_not_counted() {
    let cluster = Cluster::start(2).await;
    // A member that heartbeats but never answers (a node stuck mid-GC, say).
    let (runtime, pool) = chatbox::pool::PoolRuntime::start(1, 16).unwrap();
    let settings = chatbox::runtime::bus::BusSettings {
        servers: vec![cluster.nats.url()],
        node_id: "mute-node".into(),
        prefix: "chatbox".into(),
        heartbeat: Duration::from_millis(100),
        member_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(1),
    };
    let _mute =
        chatbox::runtime::bus::Bus::start(settings, &pool, std::sync::Arc::new(|_| {})).unwrap();
    wait_metric(cluster.addr(0), "chatbox_cluster_members", 3).await;
    let _ws = connect_user(cluster.addr(1), "erin").await;
    let (status, body) =
        admin_call_as_boss(cluster.addr(0), "POST", "/users/erin/disconnect").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("mute-node"), "{message}");
    cluster.stop().await;
    runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn an_end_on_one_node_reaches_the_user_on_another() {
    let cluster = Cluster::start(2).await;
    let (mut ws, sid) = user_session(cluster.addr(0), "fay").await;
    let (status, body) =
        admin_call_as_boss(cluster.addr(1), "POST", &format!("/sessions/{sid}/end")).await;
    assert_eq!(status, 200, "{body}");
    let (ended, _) = until(&mut ws, "session_ended").await;
    assert_eq!(ended["session_id"], json!(sid));
    // The node that holds it no longer takes messages for it.
    send(
        &mut ws,
        json!({"type": "user_message", "session_id": sid, "content": "still there?"}),
    )
    .await;
    let (error, _) = until(&mut ws, "error").await;
    assert_eq!(error["session_id"], json!(sid), "{error}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn while_the_bus_is_down_nodes_serve_and_say_so_then_recover() {
    let mut cluster = Cluster::start(2).await;
    let addr = cluster.addr(0);
    let (_, _, body) = get(addr, "/chatbox/readyz").await;
    assert_eq!(body, r#"{"status":"ready"}"#);
    // Mid-conversation: a user served by the other node through this one.
    let theirs = user_owned_by("node-1", &["node-0"]);
    let (mut other, their_sid) = user_session(addr, &theirs).await;
    cluster.nats.stop();
    wait_metric(addr, "chatbox_bus_up", 0).await;
    let (status, _, body) = get(addr, "/chatbox/readyz").await;
    assert_eq!(status, 200, "a degraded node stays in the load balancer");
    assert!(body.contains("degraded"), "{body}");
    // Its own users (those it owns) are served meanwhile...
    let mine = user_owned_by("node-0", &["node-1"]);
    let (mut ws, _) = user_session(addr, &mine).await;
    // ...and one served by the other node is told so, clearly, with when to retry.
    let lost = json!({"type": "user_message", "session_id": their_sid, "content": "hello?"});
    send(&mut other, lost).await;
    let (error, _) = until(&mut other, "error").await;
    assert_eq!(error["code"], "unavailable", "{error}");
    assert!(error["retry_after_ms"].as_u64().is_some(), "{error}");
    // What needs the other nodes is refused with a clear error, not lost silently.
    let (status, body) =
        admin_call_as_boss(addr, "POST", &format!("/users/{mine}/disconnect")).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    assert!(
        body["error"]["message"].as_str().unwrap().contains("bus"),
        "{body}"
    );
    assert_eq!(
        close_code(&mut ws).await.map(u16::from),
        Some(4003),
        "local ones closed"
    );
    // The bus returns: no restart, the nodes find each other again.
    cluster.nats.restart();
    // Up on both ends (each resubscribed), or the first message may be dropped.
    for node in 0..2 {
        wait_metric(cluster.addr(node), "chatbox_bus_up", 1).await;
    }
    wait_metric(addr, "chatbox_cluster_members", 2).await;
    let (_, _, body) = get(addr, "/chatbox/readyz").await;
    assert_eq!(body, r#"{"status":"ready"}"#);
    // The conversation carries on over the same socket, its history whole.
    let again = json!({"type": "user_message", "session_id": their_sid, "content": "back?"});
    send(&mut other, again).await;
    until(&mut other, "ai_done").await;
    let texts = history_texts(&mut other, &their_sid, Some("user")).await;
    assert_eq!(texts, ["hello", "back?"]);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn one_user_on_two_nodes_shares_one_session_and_one_cap() {
    let base = Config {
        max_connections_per_user: 2,
        ..config()
    };
    let cluster = Cluster::start_with(3, base).await;
    let (mut first, sid) = user_session(cluster.addr(0), "hal").await;
    let mut second = connect_user(cluster.addr(1), "hal").await;
    send(&mut second, json!({"type": "resume", "session_id": sid})).await;
    until(&mut second, "session").await;
    // A message on the second socket is answered on both: one session, wherever
    // the sockets are (two copies of it would answer only the socket that asked).
    send(
        &mut second,
        json!({"type": "user_message", "session_id": sid, "content": "and now?"}),
    )
    .await;
    let (done, _) = until(&mut second, "ai_done").await;
    let (seen, _) = until(&mut first, "ai_done").await;
    assert_eq!(done["message_id"], seen["message_id"], "{done} {seen}");
    // The cap counts both, on whichever node the third one lands.
    match connect(cluster.addr(2), "/ws", Some(&token("hal")), None).await {
        Err(e) => assert_eq!(refusal(e).0, 429),
        Ok(mut third) => assert_eq!(close_code(&mut third).await.map(u16::from), Some(1008)),
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn a_stopping_node_hands_its_users_over() {
    let cluster = Cluster::start(2).await;
    let Cluster { mut nodes, nats } = cluster;
    let edge = nodes[0].local_addr();
    // Served by node-1 through a socket on node-0.
    let user = user_owned_by("node-1", &["node-0"]);
    let (mut ws, sid) = user_session(edge, &user).await;
    let leaving = nodes.remove(1);
    leaving.shutdown();
    // Told at once, while node-1 still drains: reconnect.
    assert_eq!(close_code(&mut ws).await.map(u16::from), Some(1012));
    stop(leaving).await;
    // The reconnect is served by the node that stays, with the whole history.
    let mut again = connect_user(edge, &user).await;
    send(&mut again, json!({"type": "resume", "session_id": sid})).await;
    let (history, _) = until(&mut again, "session").await;
    let text = history.to_string();
    assert!(text.contains("hello"), "{text}");
    send(
        &mut again,
        json!({"type": "user_message", "session_id": sid, "content": "still here"}),
    )
    .await;
    until(&mut again, "ai_done").await;
    for node in nodes {
        node.shutdown();
        stop(node).await;
    }
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn an_admin_on_one_node_takes_over_a_user_on_another() {
    let cluster = Cluster::start(3).await;
    // The user is owned by, and connected to, node-0; the admin is on node-1.
    let user = user_owned_by("node-0", &["node-1", "node-2"]);
    let (mut u, sid) = user_session(cluster.addr(0), &user).await;
    let mut a = admin(cluster.addr(1), "agent-x").await;
    send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    until(&mut a, "help_requested").await;
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    // One copy of the session: the admin sees its history, the user sees the join.
    let (history, _) = until(&mut a, "session").await;
    assert!(history.to_string().contains("hello"), "{history}");
    until(&mut a, "admin_joined").await;
    until(&mut u, "admin_joined").await;
    send(
        &mut u,
        json!({"type": "user_message", "id": "h1", "session_id": sid, "content": "hello human?"}),
    )
    .await;
    until(&mut u, "ack").await;
    let (seen, _) = until(&mut a, "user_message").await;
    assert_eq!(seen["content"], "hello human?", "{seen}");
    send(
        &mut a,
        json!({"type": "admin_message", "session_id": sid, "content": "Hi, let me check."}),
    )
    .await;
    let (said, between) = until(&mut u, "admin_message").await;
    assert_eq!(said["content"], "Hi, let me check.", "{said}");
    assert!(
        between.iter().all(|v| v["type"] != "ai_chunk"),
        "{between:?}"
    );
    until(&mut a, "admin_message").await;
    // The admin's socket closing ends the seat on the owner: the AI answers again.
    drop(a);
    until(&mut u, "admin_left").await;
    send(
        &mut u,
        json!({"type": "user_message", "session_id": sid, "content": "thanks"}),
    )
    .await;
    until(&mut u, "ai_done").await;
    // A second admin, on node-2, joins and leaves by frame.
    let mut b = admin(cluster.addr(2), "agent-y").await;
    send(&mut b, json!({"type": "admin_join", "session_id": sid})).await;
    until(&mut u, "admin_joined").await;
    send(&mut b, json!({"type": "admin_leave", "session_id": sid})).await;
    until(&mut u, "admin_left").await;
    until(&mut b, "admin_left").await;
    cluster.stop().await;
}
