//! Cluster helpers: nodes started as one service, waiting for what a node says
//! it has learnt, and finding a user that a given node owns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chatbox::{Config, ServerHandle};

use super::nats::NatsServer;
use super::{config, data_dir, get, start, stop, WAIT};

/// Waits (bounded) until `/metrics` shows `name` at `value`: membership is learnt
/// from heartbeats, and this is where a node says what it has learnt.
pub async fn wait_metric(addr: SocketAddr, name: &str, value: u64) {
    wait_metric_until(addr, name, |v| v == value).await;
}

/// Waits (bounded) until `/metrics` shows `name` with a value `ok` accepts.
pub async fn wait_metric_until(addr: SocketAddr, name: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + WAIT;
    let prefix = format!("{name} ");
    loop {
        let (_, _, body) = get(addr, "/chatbox/metrics").await;
        let value = body
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse::<u64>().ok());
        if let Some(v) = value.filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never showed {name} as wanted (last {value:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A user that `node` owns when the other live nodes are `others`.
pub fn user_owned_by(node: &str, others: &[&str]) -> String {
    let nodes: Vec<&str> = std::iter::once(node)
        .chain(others.iter().copied())
        .collect();
    (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| chatbox::runtime::bus::owner_among(&nodes, u) == Some(node))
        .unwrap()
}

/// Nodes on one nats-server and one MongoDB-compatible store (CHATBOX_TEST_MONGO_URI).
pub struct Cluster {
    pub nodes: Vec<ServerHandle>,
    pub nats: NatsServer,
}

impl Cluster {
    /// Starts `n` nodes on one bus and one store, and waits until every node sees
    /// all the others.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, config()).await
    }

    /// `n` nodes, each configured as `base` says (with its own bus and store
    /// settings added).
    pub async fn start_with(n: usize, base: Config) -> Cluster {
        let nats = NatsServer::start();
        let uri = std::env::var("CHATBOX_TEST_MONGO_URI")
            .expect("the cluster tests need CHATBOX_TEST_MONGO_URI (see .ci/run)");
        let db = format!("chatbox_cluster_{:016x}", rand::random::<u64>());
        let nodes: Vec<ServerHandle> = (0..n)
            .map(|i| {
                start(Config {
                    mongo_uri: Some(uri.clone()),
                    mongo_database: db.clone(),
                    nats_url: vec![nats.url()],
                    node_id: Some(format!("node-{i}")),
                    cluster_heartbeat_ms: 100,
                    // Generous: a busy CI machine may starve a node's heartbeat for
                    // a while, and a node thought gone closes what it served. The
                    // tests that need a node gone have it leave, which is at once.
                    cluster_member_timeout_ms: 10_000,
                    lease_ttl_ms: 20_000,
                    data_dir: data_dir(),
                    ..base.clone()
                })
            })
            .collect();
        for node in &nodes {
            wait_metric(node.local_addr(), "chatbox_cluster_members", n as u64).await;
        }
        Cluster { nodes, nats }
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].local_addr()
    }

    pub async fn stop(self) {
        for node in self.nodes {
            node.shutdown();
            stop(node).await;
        }
    }
}
