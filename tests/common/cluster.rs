//! Cluster helpers: waiting for what a node says it has learnt, and finding a
//! user that a given node owns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{get, WAIT};

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
