//! The bus between nodes against a real nats-server: membership, a message to every
//! node, a request answered by every node, and recovery when the bus restarts.
//! Ignored unless asked for (`--include-ignored`; CI sets CHATBOX_TEST_NATS_SERVER).

mod common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use chatbox::pool::{BlockingPool, PoolRuntime};
use chatbox::runtime::bus::{Bus, BusError, BusSettings, Handler, Inbound};
use common::nats::NatsServer;

const WAIT: Duration = Duration::from_secs(20);

struct Node {
    bus: Bus,
    pool: BlockingPool,
    inbox: mpsc::Receiver<Vec<u8>>,
    _runtime: PoolRuntime,
}

/// A node whose handler passes every payload to the test and answers requests
/// with `{node id}:{payload}`.
fn node(id: &str, url: &str) -> Node {
    let (runtime, pool) = PoolRuntime::start(1, 64).unwrap();
    let (tx, inbox) = mpsc::channel();
    let me = id.to_owned();
    let handler: Handler = Arc::new(move |msg: Inbound| {
        msg.reply(format!("{me}:{}", String::from_utf8_lossy(&msg.payload)).into_bytes());
        let _ = tx.send(msg.payload.to_vec());
    });
    let settings = BusSettings {
        servers: vec![url.to_owned()],
        node_id: id.into(),
        prefix: "test".into(),
        heartbeat: Duration::from_millis(100),
        member_timeout: Duration::from_millis(600),
        request_timeout: Duration::from_secs(2),
    };
    let bus = Bus::start(settings, &pool, handler).unwrap();
    Node {
        bus,
        pool,
        inbox,
        _runtime: runtime,
    }
}

/// Waits (bounded) until `node` sees exactly `others` as the other live nodes.
fn wait_members(node: &Node, others: &[&str]) {
    let mut view = node.bus.watch_members();
    let want: Vec<Arc<str>> = others.iter().map(|o| Arc::from(*o)).collect();
    let seen = node.pool.block_on(async move {
        let waited = tokio::time::timeout(WAIT, view.wait_for(|v| *v == want)).await;
        waited.map(|_| ()).map_err(|_| view.borrow().clone())
    });
    if let Err(seen) = seen.unwrap() {
        panic!("{} sees {seen:?}, not {others:?}", node.bus.node_id());
    }
}

/// Waits (bounded) until the node's bus connection is up (or down).
fn wait_up(node: &Node, up: bool) {
    let bus = node.bus.clone();
    let deadline = std::time::Instant::now() + WAIT;
    // The connection state has no watch of its own: it changes on the client's
    // events, which the test cannot await, so this polls it, bounded.
    while bus.is_up() != up {
        assert!(
            std::time::Instant::now() < deadline,
            "bus up = {up} never came"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "needs nats-server (CHATBOX_TEST_NATS_SERVER)"]
fn nodes_see_each_other_and_a_message_reaches_every_other_node_once() {
    let nats = NatsServer::start();
    let (a, b, c) = (
        node("a", &nats.url()),
        node("b", &nats.url()),
        node("c", &nats.url()),
    );
    wait_members(&a, &["b", "c"]);
    wait_members(&b, &["a", "c"]);
    a.bus.publish_all(b"hello".to_vec()).unwrap();
    for n in [&b, &c] {
        assert_eq!(n.inbox.recv_timeout(WAIT).unwrap(), b"hello");
    }
    // Once: the sender does not hear itself, and nothing more comes to the others.
    a.bus.publish_to("b", b"direct".to_vec()).unwrap();
    assert_eq!(b.inbox.recv_timeout(WAIT).unwrap(), b"direct");
    assert!(
        a.inbox.try_recv().is_err(),
        "the sender heard its own message"
    );
    assert!(c.inbox.try_recv().is_err(), "c got a message for b");
    // Every node agrees on who owns a user.
    for user in ["alice", "bob", "carol", "dave"] {
        assert_eq!(a.bus.owner(user), b.bus.owner(user));
        assert_eq!(a.bus.owner(user), c.bus.owner(user));
    }
}

#[test]
#[ignore = "needs nats-server (CHATBOX_TEST_NATS_SERVER)"]
fn a_request_gathers_every_live_node_and_names_the_silent_ones() {
    let nats = NatsServer::start();
    let (a, b, c) = (
        node("a", &nats.url()),
        node("b", &nats.url()),
        node("c", &nats.url()),
    );
    wait_members(&a, &["b", "c"]);
    let gathered = a
        .pool
        .block_on(a.bus.gather(b"count".to_vec()))
        .unwrap()
        .unwrap();
    let mut replies: Vec<String> = gathered
        .replies
        .iter()
        .map(|(node, body)| format!("{node}={}", String::from_utf8_lossy(body)))
        .collect();
    replies.sort();
    assert_eq!(replies, ["b=b:count", "c=c:count"]);
    assert!(gathered.missing.is_empty());

    // A node that leaves is gone from the view at once, not after the timeout.
    c.bus.leave(&c.pool, WAIT);
    wait_members(&a, &["b"]);
    drop(c);
    drop(b);
    let gathered = a
        .pool
        .block_on(a.bus.gather(b"again".to_vec()))
        .unwrap()
        .unwrap();
    assert!(gathered.replies.is_empty(), "{:?}", gathered.replies);
    assert_eq!(
        gathered.missing,
        vec![Arc::<str>::from("b")],
        "b died without a word"
    );
}

#[test]
#[ignore = "needs nats-server (CHATBOX_TEST_NATS_SERVER)"]
fn while_the_bus_is_down_sends_are_refused_and_it_recovers_by_itself() {
    let mut nats = NatsServer::start();
    let (a, b) = (node("a", &nats.url()), node("b", &nats.url()));
    wait_members(&a, &["b"]);
    nats.stop();
    wait_up(&a, false);
    assert_eq!(a.bus.publish_all(b"lost".to_vec()), Err(BusError::Down));
    let refused = a.pool.block_on(a.bus.gather(b"lost".to_vec())).unwrap();
    assert_eq!(refused.unwrap_err(), BusError::Down);

    nats.restart();
    wait_up(&a, true);
    wait_up(&b, true);
    // Up means resubscribed: the first message after both say so arrives (the
    // client reports the connection before it renews the subscriptions).
    a.bus.publish_all(b"back".to_vec()).unwrap();
    assert_eq!(b.inbox.recv_timeout(WAIT).unwrap(), b"back");
    wait_members(&b, &["a"]);
}
