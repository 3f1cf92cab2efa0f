//! Several nodes: which node each user (and admin) connects to, and the summed
//! cost (CPU time, RSS) of several server processes, so a cluster's whole cost is
//! counted.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Opts;

/// The node user `user` goes to, of `nodes`: round-robin by user index, so every
/// connection of one user lands on one node and the users split evenly.
pub fn node_of(user: usize, nodes: usize) -> usize {
    user % nodes.max(1)
}

impl Opts {
    /// How many nodes the run spreads over.
    pub fn nodes(&self) -> usize {
        self.addrs.len().max(1)
    }

    /// The address of node `n` (an index from `node_of`).
    pub fn node_addr(&self, n: usize) -> SocketAddr {
        self.addrs[n % self.addrs.len()]
    }

    /// The address user `user` connects to.
    pub fn user_addr(&self, user: usize) -> SocketAddr {
        self.node_addr(node_of(user, self.nodes()))
    }
}

/// Clock ticks per second of /proc/PID/stat's times: USER_HZ, 100 on every Linux
/// architecture this runs on (the kernel's HZ is hidden behind it).
const USER_HZ: f64 = 100.0;

/// User plus system CPU time of a process (all its threads), in ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields
    // from the last ')'. After it: state (3), ..., utime (14), stime (15).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Summed RSS (KiB) of the processes that still exist.
fn rss_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| crate::client::rss_kib(p)).sum()
}

fn cpu_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| cpu_ticks(p)).sum()
}

/// Runs `run` while sampling `pids` (RSS every 250 ms, CPU before and after) and
/// adds a `server` object to its summary: CPU seconds used over the run by all the
/// processes together, their CPU in cores (seconds per wall second), summed RSS
/// before, at the peak and after.
pub async fn sampled(
    pids: &[u32],
    run: impl Future<Output = anyhow::Result<Value>>,
) -> anyhow::Result<Value> {
    for &p in pids {
        if cpu_ticks(p).is_none() {
            anyhow::bail!("cannot read /proc/{p}/stat: is --pid {p} a running server?");
        }
    }
    let (cpu0, rss0, t0) = (cpu_sum(pids), rss_sum(pids), Instant::now());
    let owned = pids.to_vec();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let peak = tokio::spawn(async move {
        let mut peak = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => peak = peak.max(rss_sum(&owned)),
                _ = &mut stop_rx => return peak,
            }
        }
    });
    let result = run.await;
    let _ = stop_tx.send(());
    let (cpu1, rss1, wall) = (cpu_sum(pids), rss_sum(pids), t0.elapsed());
    let peak = peak.await.unwrap_or(0).max(rss1);
    let mut summary = result?;
    let cpu_secs = cpu1.saturating_sub(cpu0) as f64 / USER_HZ;
    summary["server"] = json!({
        "pids": pids,
        "cpu_secs": cpu_secs,
        "cpu_cores": cpu_secs / wall.as_secs_f64().max(1e-3),
        "rss_kib_before": rss0,
        "rss_kib_peak": peak,
        "rss_kib_after": rss1,
    });
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_takes_everyone() {
        assert!((0..100).all(|u| node_of(u, 1) == 0));
        assert_eq!(node_of(7, 0), 0, "no nodes is treated as one");
    }

    #[test]
    fn users_go_round_robin_and_split_evenly() {
        let nodes: Vec<usize> = (0..7).map(|u| node_of(u, 3)).collect();
        assert_eq!(nodes, [0, 1, 2, 0, 1, 2, 0]);
        let mut per_node = [0; 3];
        for u in 0..3000 {
            per_node[node_of(u, 3)] += 1;
        }
        assert_eq!(per_node, [1000, 1000, 1000]);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_sum(&[me, me]) >= 2 * rss_sum(&[me]) - 1024);
        assert_eq!(cpu_ticks(u32::MAX), None);
    }
}
