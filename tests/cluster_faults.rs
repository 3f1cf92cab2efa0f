//! Cluster failures with real processes: three chatbox binaries on one nats-server
//! and one MongoDB-compatible store, and a model the test drives step by step, so
//! that a node can be killed or paused in the middle of an answer. Ignored unless
//! asked for (`--include-ignored`): CI sets CHATBOX_TEST_NATS_SERVER and
//! CHATBOX_TEST_MONGO_URI.

mod common;

use std::net::SocketAddr;

use common::cluster::{user_owned_by, wait_metric, wait_metric_until};
use common::nats::NatsServer;
use common::process::{spawn_server, Proc, Step, StepLlm};
use common::*;
use serde_json::{json, Value};

/// Heartbeats every 100 ms, a node gone after 1.5 s of silence, leases that
/// outlive their last renewal by 3 s: short, so the tests wait little, and still
/// many heartbeats long, so a busy machine does not drop a live node.
const CLUSTER_ENV: [(&str, &str); 3] = [
    ("CHATBOX_CLUSTER_HEARTBEAT_MS", "100"),
    ("CHATBOX_CLUSTER_MEMBER_TIMEOUT_MS", "1500"),
    ("CHATBOX_LEASE_TTL_MS", "3000"),
];

struct Nodes {
    procs: Vec<Proc>,
    _nats: NatsServer,
    _dirs: Vec<tempfile::TempDir>,
}

impl Nodes {
    async fn start(llm: &StepLlm) -> Nodes {
        let nats = NatsServer::start();
        let uri = std::env::var("CHATBOX_TEST_MONGO_URI")
            .expect("these tests need CHATBOX_TEST_MONGO_URI (see .ci/run)");
        let db = format!("chatbox_faults_{:016x}", rand::random::<u64>());
        let mut procs = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let mut env = llm.env();
            env.extend([
                ("CHATBOX_NATS_URL", nats.url()),
                ("CHATBOX_MONGO_URI", uri.clone()),
                ("CHATBOX_MONGO_DATABASE", db.clone()),
                ("CHATBOX_NODE_ID", format!("node-{i}")),
            ]);
            env.extend(CLUSTER_ENV.map(|(k, v)| (k, v.to_owned())));
            procs.push(spawn_server(dir.path(), &env));
            dirs.push(dir);
        }
        for p in &procs {
            wait_metric(p.addr, "chatbox_cluster_members", 3).await;
        }
        Nodes {
            procs,
            _nats: nats,
            _dirs: dirs,
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.procs[i].addr
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Sends a user message and waits for its ack, sending it again with the same id
/// while the server says the conversation is moving (`unavailable`, after the
/// `retry_after_ms` it gives): what a client does while a lease changes hands.
async fn send_acked(ws: &mut Ws, sid: &str, id: &str, content: &str) -> Value {
    let msg = json!({"type": "user_message", "id": id, "session_id": sid, "content": content});
    for _ in 0..50 {
        send(ws, msg.clone()).await;
        loop {
            let v = recv(ws).await;
            if v["type"] == "ack" && v["id"] == id {
                return v;
            }
            if v["type"] == "error" && v["id"] == id {
                assert_eq!(v["code"], "unavailable", "{v}");
                let pause = v["retry_after_ms"].as_u64().expect("a retry time");
                tokio::time::sleep(std::time::Duration::from_millis(pause.min(1000))).await;
                break;
            }
        }
    }
    panic!("{content:?} was never acked");
}

/// The texts of a session's history, as a node serving it now reads them.
async fn history(addr: SocketAddr, user: &str, sid: &str) -> Vec<String> {
    let mut ws = connect_user(addr, user).await;
    history_texts(&mut ws, sid, None).await
}

/// A user of `node-1` with one answered message, connected to node-1 itself.
async fn answered_user(nodes: &Nodes, llm: &mut StepLlm) -> (String, Ws, String) {
    let user = user_owned_by("node-1", &["node-0", "node-2"]);
    let mut ws = connect_user(nodes.addr(1), &user).await;
    send(
        &mut ws,
        json!({"type": "user_message", "id": "m1", "content": "first"}),
    )
    .await;
    let (ack, _) = until(&mut ws, "ack").await;
    let sid = ack["session_id"].as_str().unwrap().to_owned();
    llm.request_seen().await;
    llm.step(Step::Chunk("answer one"));
    llm.step(Step::Done);
    until(&mut ws, "ai_done").await;
    (user, ws, sid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn a_killed_node_loses_no_acked_message() {
    let mut llm = StepLlm::start().await;
    let nodes = Nodes::start(&llm).await;
    let (user, mut ws, sid) = answered_user(&nodes, &mut llm).await;
    send_acked(&mut ws, &sid, "m2", "second").await;
    llm.request_seen().await;
    llm.step(Step::Chunk("half an ans"));
    until(&mut ws, "ai_chunk").await;
    // Killed mid-answer: its socket drops, the others see it gone.
    nodes.procs[1].signal(libc::SIGKILL);
    assert!(close_code(&mut ws)
        .await
        .is_none_or(|c| u16::from(c) != 1000));
    wait_metric(nodes.addr(0), "chatbox_cluster_members", 2).await;
    wait_metric(nodes.addr(2), "chatbox_cluster_members", 2).await;
    // Another node serves the user: every acked message is there, the unfinished
    // answer is not, and the conversation carries on (once the lease expires).
    let texts = history(nodes.addr(0), &user, &sid).await;
    assert_eq!(texts, ["first", "answer one", "second"], "{texts:?}");
    let mut again = connect_user(nodes.addr(2), &user).await;
    send(&mut again, json!({"type": "resume", "session_id": sid})).await;
    until(&mut again, "session").await;
    send_acked(&mut again, &sid, "m3", "third").await;
    llm.request_seen().await;
    llm.step(Step::Chunk("answer three"));
    llm.step(Step::Done);
    until(&mut again, "ai_done").await;
    let texts = history(nodes.addr(0), &user, &sid).await;
    assert_eq!(
        texts,
        ["first", "answer one", "second", "third", "answer three"],
        "{texts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB (CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI)"]
async fn a_paused_node_writes_nothing_after_its_lease_moved() {
    let mut llm = StepLlm::start().await;
    let nodes = Nodes::start(&llm).await;
    let (user, mut ws, sid) = answered_user(&nodes, &mut llm).await;
    send_acked(&mut ws, &sid, "m2", "second").await;
    llm.request_seen().await;
    llm.step(Step::Chunk("before the pause"));
    until(&mut ws, "ai_chunk").await;
    // Paused mid-answer: the others drop it, and the user moves on elsewhere.
    nodes.procs[1].signal(libc::SIGSTOP);
    wait_metric(nodes.addr(0), "chatbox_cluster_members", 2).await;
    let mut moved = connect_user(nodes.addr(0), &user).await;
    send(&mut moved, json!({"type": "resume", "session_id": sid})).await;
    until(&mut moved, "session").await;
    send_acked(&mut moved, &sid, "m3", "third").await;
    // Woken, the paused node finishes its answer: the store fences it off, and it
    // lets the user go instead of writing.
    nodes.procs[1].signal(libc::SIGCONT);
    llm.step(Step::Chunk(" and after"));
    llm.step(Step::Done);
    wait_metric_until(nodes.addr(1), "chatbox_cluster_users_let_go_total", |n| {
        n >= 1
    })
    .await;
    let texts = history(nodes.addr(2), &user, &sid).await;
    assert!(
        texts.iter().all(|t| !t.contains("before the pause")),
        "the paused node wrote after its lease moved: {texts:?}"
    );
    assert_eq!(texts[..3], ["first", "answer one", "second"], "{texts:?}");
    assert!(texts.contains(&"third".to_owned()), "{texts:?}");
}
