//! The `takeover` scenario: admins join many users' sessions and write into them
//! (the fan-out of admin frames to the sessions' connections). Across several
//! nodes every takeover is cross-node: each admin sits on a different node from
//! the users it takes over. It counts, per kind, the frames each side should get
//! against the frames it got, and names every refusal.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, check_fd_budget, open, source};
use crate::cluster::node_of;
use crate::push::{hist, open_users, user_message, Hist};
use crate::scenarios::{quantiles, url};
use crate::Opts;

/// How long an admin waits for its joins to be answered, and the run for its last
/// frames to arrive, before counting what is missing.
const SETTLE: Duration = Duration::from_secs(10);
const JOIN_WAIT: Duration = Duration::from_secs(30);
/// Refusals printed as they come (all are counted by code in the summary).
const PRINTED_ERRORS: u64 = 10;

/// For each admin, the sessions (indices into `user_nodes`, the node of each
/// session's user) it takes over. Admin k connects to node `node_of(k, nodes)`; a
/// session whose user is on node u goes to an admin on node (u + 1) mod nodes,
/// round-robin among that node's admins, so with several nodes every takeover
/// crosses nodes. On one node this is admin k taking sessions k, k + admins, ...
/// A node without an admin (fewer admins than nodes) hands its share to all admins.
pub fn shares(user_nodes: &[usize], admins: usize, nodes: usize) -> Vec<Vec<usize>> {
    let (admins, nodes) = (admins.max(1), nodes.max(1));
    let mut on_node: Vec<Vec<usize>> = vec![Vec::new(); nodes];
    for k in 0..admins {
        on_node[node_of(k, nodes)].push(k);
    }
    let everyone: Vec<usize> = (0..admins).collect();
    let mut next = vec![0usize; nodes];
    let mut out = vec![Vec::new(); admins];
    for (j, &u) in user_nodes.iter().enumerate() {
        let target = if nodes > 1 { (u + 1) % nodes } else { 0 };
        let pool = match &on_node[target] {
            p if p.is_empty() => &everyone,
            p => p,
        };
        out[pool[next[target] % pool.len()]].push(j);
        next[target] += 1;
    }
    out
}

/// Counters shared by every user and admin task.
#[derive(Default)]
struct Tally {
    errors: AtomicU64,
    error_codes: Mutex<BTreeMap<String, u64>>,
    /// `admin_message`s sent, and those sent into joins confirmed by `admin_joined`
    /// (chatbox; the baseline confirms with `ack` and echoes nothing to admins).
    sent: AtomicU64,
    sent_echoed: AtomicU64,
    joins_sent: AtomicU64,
    /// Joins confirmed with `admin_joined` (chatbox) and with `ack` (baseline).
    joined: AtomicU64,
    joined_acked: AtomicU64,
    users_admin_joined: AtomicU64,
    users_admin_message: AtomicU64,
    admins_session: AtomicU64,
    admins_admin_message: AtomicU64,
}

impl Tally {
    /// Counts a failure under `code`, printing the first few.
    fn error(&self, code: &str, detail: &str) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        crate::progress::error();
        if n < PRINTED_ERRORS {
            eprintln!("  takeover error {code}: {detail}");
        }
        let mut codes = self.error_codes.lock().unwrap_or_else(|e| e.into_inner());
        *codes.entry(code.to_owned()).or_default() += 1;
    }

    /// Counts an `error` frame by its code.
    fn error_frame(&self, v: &Value) {
        let code = v["code"].as_str().unwrap_or("error");
        self.error(code, &v.to_string());
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// `takeover`: `--users` users each open a session; `--admins` admins join them
/// (each a share, see `shares`) and write into them at `--msg-rate` messages per
/// second in all. Measures the time from an admin's `admin_message` to the user
/// receiving it, and that every frame due arrives, once.
pub async fn takeover(o: &Opts) -> anyhow::Result<Value> {
    let nodes = o.nodes();
    if nodes > 1 && o.admins < nodes {
        anyhow::bail!("takeover over {nodes} nodes needs --admins >= {nodes} (one per node)");
    }
    check_fd_budget(o.users + o.admins)?;
    let t = Arc::new(Tally::default());
    let base = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<Hist>();
    // 1. Users, each with a session (its id from the `ack`).
    let mut sessions: Vec<(usize, String)> = Vec::new();
    for (i, ws) in open_users(o, o.users, "user", &t.errors).await {
        match start_session(ws, i, base, &t, &stop_rx, &res_tx).await {
            Some(sid) => sessions.push((i, sid)),
            None => t.error("no_session", &format!("user-{i} got no ack")),
        }
    }
    drop(res_tx);
    // 2. Admins, each joining its share of the sessions and writing into them.
    let admins = o.admins.min(sessions.len()).max(1);
    let rate = if o.msg_rate == 0 { 1000 } else { o.msg_rate };
    let user_nodes: Vec<usize> = sessions.iter().map(|(i, _)| node_of(*i, nodes)).collect();
    let plan = shares(&user_nodes, admins, nodes);
    let cross = plan
        .iter()
        .enumerate()
        .flat_map(|(k, mine)| mine.iter().map(move |&j| (k, j)))
        .filter(|&(k, j)| node_of(k, nodes) != user_nodes[j])
        .count();
    let spread = match nodes {
        1 => String::new(),
        n => format!(" on {n} nodes, {cross} takeovers cross-node"),
    };
    eprintln!(
        "  {} sessions, {admins} admins{spread}; writing for {}s",
        sessions.len(),
        o.secs
    );
    let gap = Duration::from_secs_f64(admins as f64 / rate as f64);
    for task in start_admins(o, plan, &sessions, gap, base, &t).await {
        let _ = task.await;
    }
    // 3. Wait (at most SETTLE) for the last frames to reach the users, then stop them.
    let due = |t: &Tally| {
        Tally::get(&t.users_admin_message) >= Tally::get(&t.sent)
            && Tally::get(&t.users_admin_joined) >= Tally::get(&t.joined)
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !due(&t) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send_replace(true);
    let mut latency = hist();
    while let Some(h) = res_rx.recv().await {
        latency.add(h)?;
    }
    let mut summary = summarize(o, &t, admins, rate, &latency);
    if nodes > 1 {
        summary["nodes"] = json!(nodes);
        summary["cross_node_takeovers"] = json!(cross);
    }
    Ok(summary)
}

/// Connects admin k to its node (`node_of(k, nodes)`) and starts it on its share
/// of the sessions.
async fn start_admins(
    o: &Opts,
    plan: Vec<Vec<usize>>,
    sessions: &[(usize, String)],
    gap: Duration,
    base: Instant,
    t: &Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (k, mine) in plan.into_iter().enumerate() {
        let mine: Vec<String> = mine.into_iter().map(|j| sessions[j].1.clone()).collect();
        let addr = o.node_addr(node_of(k, o.nodes()));
        // Several loadtest processes (--first-user) must not share admins.
        let name = match o.first_user {
            0 => format!("agent-{k}"),
            first => format!("agent-{first}-{k}"),
        };
        let tok = client::admin_token(&o.secret, &name);
        match open(&url(o, addr), addr, source(k, o.sources), &tok).await {
            Ok(ws) => {
                let run = Duration::from_secs(o.secs);
                let w = Writer {
                    k,
                    name,
                    gap,
                    run,
                    base,
                };
                tasks.push(tokio::spawn(w.run(ws, mine, t.clone())));
            }
            Err(_) => t.error(
                "admin_connect",
                &format!("{name} could not connect to {addr}"),
            ),
        }
    }
    tasks
}

/// Sends the user's first message, waits for its `ack` (the session id), then
/// spawns the reader that counts and times what the admins send in. `None` when
/// the session could not be started.
async fn start_session(
    ws: client::Ws,
    i: usize,
    base: Instant,
    t: &Arc<Tally>,
    stop: &watch::Receiver<bool>,
    res: &mpsc::UnboundedSender<Hist>,
) -> Option<String> {
    let (mut tx, mut rx) = ws.split();
    tx.send(user_message(&format!("t{i}"), None)).await.ok()?;
    let sid = loop {
        let Message::Text(txt) = rx.next().await?.ok()? else {
            continue;
        };
        let v: Value = serde_json::from_str(&txt).ok()?;
        if v["type"] == "ack" {
            break v["session_id"].as_str()?.to_owned();
        }
    };
    let (t, mut stop, res) = (t.clone(), stop.clone(), res.clone());
    tokio::spawn(async move {
        let mut h = hist();
        loop {
            let m = tokio::select! {
                m = rx.next() => m,
                _ = stop.wait_for(|s| *s) => break,
            };
            let Some(Ok(m)) = m else { break };
            let Message::Text(txt) = m else { continue };
            let Ok(v) = serde_json::from_str::<Value>(&txt) else {
                continue;
            };
            match v["type"].as_str() {
                Some("admin_joined") => {
                    t.users_admin_joined.fetch_add(1, Ordering::Relaxed);
                }
                Some("admin_message") => {
                    if let Some(sent) = v["content"]
                        .as_str()
                        .and_then(|c| c.strip_prefix('t')?.parse::<u64>().ok())
                    {
                        let now = base.elapsed().as_micros() as u64;
                        let _ = h.record(now.saturating_sub(sent));
                        t.users_admin_message.fetch_add(1, Ordering::Relaxed);
                        crate::progress::done(1);
                    }
                }
                _ => {}
            }
        }
        let _ = tx.close().await;
        let _ = res.send(h);
    });
    Some(sid)
}

/// One admin connection: its number, its share of the write rate, the run.
struct Writer {
    k: usize,
    name: String,
    gap: Duration,
    run: Duration,
    base: Instant,
}

/// How an admin's joins were confirmed.
struct Joined {
    sessions: Vec<String>,
    /// By `admin_joined` (chatbox, which also echoes admin messages to the admin)
    /// rather than by `ack` (the baseline).
    echoes: bool,
}

impl Writer {
    /// Joins `mine`, writes into the sessions that were joined until the run ends,
    /// then waits (at most SETTLE) for its own messages' echoes before closing.
    async fn run(self, ws: client::Ws, mine: Vec<String>, t: Arc<Tally>) {
        let (mut tx, mut rx) = ws.split();
        for sid in &mine {
            let join = json!({"type": "admin_join", "session_id": sid});
            if tx.send(Message::text(join.to_string())).await.is_err() {
                return t.error("admin_send", &format!("{} lost its socket", self.name));
            }
            t.joins_sent.fetch_add(1, Ordering::Relaxed);
        }
        let Some(joined) = self.await_joins(&mut rx, &mine, &t).await else {
            return;
        };
        // From here on, reads the admin's own frames (so its socket never fills),
        // counting the echoes of its messages and the refusals.
        let echoed = Arc::new(AtomicU64::new(0));
        let (tc, ec) = (t.clone(), echoed.clone());
        let drain = tokio::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                let Message::Text(txt) = m else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&txt) else {
                    continue;
                };
                match v["type"].as_str() {
                    Some("error") => tc.error_frame(&v),
                    Some("admin_message") => {
                        ec.fetch_add(1, Ordering::Relaxed);
                        tc.admins_admin_message.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        let sent = self.write(&mut tx, &joined.sessions, &t).await;
        if joined.echoes {
            t.sent_echoed.fetch_add(sent, Ordering::Relaxed);
            let deadline = tokio::time::Instant::now() + SETTLE;
            while echoed.load(Ordering::Relaxed) < sent && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = tx.close().await;
        let _ = drain.await;
    }

    /// Waits (at most JOIN_WAIT) until every join is confirmed (chatbox:
    /// `admin_joined` with our name, after the transcript; the baseline: an `ack`)
    /// or refused; counts a refusal or a join left unanswered as an error.
    async fn await_joins(
        &self,
        rx: &mut futures_util::stream::SplitStream<client::Ws>,
        mine: &[String],
        t: &Tally,
    ) -> Option<Joined> {
        let me = &self.name;
        let wanted: HashSet<&str> = mine.iter().map(String::as_str).collect();
        let (mut joined, mut acked, mut refused) = (Vec::new(), 0usize, 0usize);
        let deadline = tokio::time::Instant::now() + JOIN_WAIT;
        while joined.len() + acked + refused < mine.len() {
            let m = match tokio::time::timeout_at(deadline, rx.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(_) => {
                    t.error(
                        "admin_closed",
                        &format!("{me}'s socket closed while joining"),
                    );
                    return None;
                }
                Err(_) => break,
            };
            let Message::Text(txt) = m else { continue };
            let Ok(v) = serde_json::from_str::<Value>(&txt) else {
                continue;
            };
            let sid = v["session_id"].as_str().unwrap_or_default();
            match v["type"].as_str() {
                Some("session") if wanted.contains(sid) => {
                    t.admins_session.fetch_add(1, Ordering::Relaxed);
                }
                Some("admin_joined") if v["admin_name"] == me.as_str() => {
                    joined.push(sid.to_owned());
                }
                // The baseline answers each join in order with an `ack`.
                Some("ack") => acked += 1,
                Some("error") => {
                    t.error_frame(&v);
                    refused += 1;
                }
                _ => {}
            }
        }
        let unanswered = mine.len().saturating_sub(joined.len() + acked + refused);
        for _ in 0..unanswered {
            t.error(
                "join_unanswered",
                &format!("{me}: no answer within {JOIN_WAIT:?}"),
            );
        }
        t.joined.fetch_add(joined.len() as u64, Ordering::Relaxed);
        t.joined_acked.fetch_add(acked as u64, Ordering::Relaxed);
        let echoes = acked == 0;
        let sessions = if echoes {
            joined
        } else {
            mine[..acked].to_vec()
        };
        Some(Joined { sessions, echoes })
    }

    /// Writes into `sessions`, round-robin, one message per `gap`, until the run
    /// ends (open loop: whether or not the server keeps up). Returns how many.
    async fn write(
        &self,
        tx: &mut futures_util::stream::SplitSink<client::Ws, Message>,
        sessions: &[String],
        t: &Tally,
    ) -> u64 {
        let end = tokio::time::Instant::now() + self.run;
        let mut next = tokio::time::Instant::now();
        let mut sent = 0;
        for (n, sid) in sessions.iter().cycle().enumerate() {
            tokio::time::sleep_until(next).await;
            if next >= end {
                break;
            }
            next += self.gap;
            let at = self.base.elapsed().as_micros() as u64;
            let m = json!({"type": "admin_message", "session_id": sid,
                           "id": format!("a{}-{n}", self.k), "content": format!("t{at}")});
            if tx.send(Message::text(m.to_string())).await.is_err() {
                t.error("admin_send", &format!("{} lost its socket", self.name));
                break;
            }
            sent += 1;
            t.sent.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

/// One kind of frame: how many were due and how many came.
fn kind(expected: u64, received: u64) -> Value {
    json!({"expected": expected, "received": received})
}

/// The summary: what `takeover` always reported, plus the frames due and received
/// per kind (`lost` and `duplicated` sum them) and the refusals by code.
fn summarize(o: &Opts, t: &Tally, admins: usize, rate: u64, latency: &Hist) -> Value {
    let g = Tally::get;
    let (sent, joined) = (g(&t.sent), g(&t.joined));
    let frames = [
        ("users_admin_joined", joined, g(&t.users_admin_joined)),
        ("users_admin_message", sent, g(&t.users_admin_message)),
        ("admins_session", joined, g(&t.admins_session)),
        (
            "admins_admin_joined",
            g(&t.joins_sent) - g(&t.joined_acked),
            joined,
        ),
        (
            "admins_admin_message",
            g(&t.sent_echoed),
            g(&t.admins_admin_message),
        ),
    ];
    let lost: u64 = frames.iter().map(|f| f.1.saturating_sub(f.2)).sum();
    let duplicated: u64 = frames.iter().map(|f| f.2.saturating_sub(f.1)).sum();
    let per_kind: serde_json::Map<String, Value> = frames
        .iter()
        .map(|&(name, e, r)| (name.to_owned(), kind(e, r)))
        .collect();
    let codes = t
        .error_codes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let delivered = g(&t.users_admin_message);
    json!({
        "scenario": "takeover",
        "users": o.users,
        "admins": admins,
        "msg_rate_target": rate,
        "sent": sent,
        "delivered": delivered,
        "lost": lost,
        "duplicated": duplicated,
        "messages_per_sec": delivered as f64 / o.secs.max(1) as f64,
        "errors": g(&t.errors),
        "error_codes": codes,
        "frames": per_kind,
        "delivery_us": quantiles(latency),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every session assigned to exactly one admin.
    fn assert_partition(plan: &[Vec<usize>], sessions: usize) {
        let mut all: Vec<usize> = plan.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..sessions).collect::<Vec<_>>());
    }

    #[test]
    fn one_node_keeps_the_old_round_robin() {
        let plan = shares(&[0; 10], 3, 1);
        assert_eq!(plan, vec![vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
        for (k, mine) in plan.iter().enumerate() {
            let old: Vec<usize> = (0..10).skip(k).step_by(3).collect();
            assert_eq!(*mine, old);
        }
    }

    #[test]
    fn across_nodes_every_takeover_crosses_and_the_load_is_even() {
        let (nodes, admins) = (3, 6);
        // Users spread round-robin, with user 4's session missing (a failed ack).
        let user_nodes: Vec<usize> = (0..30)
            .filter(|&i| i != 4)
            .map(|i| node_of(i, nodes))
            .collect();
        let plan = shares(&user_nodes, admins, nodes);
        assert_partition(&plan, user_nodes.len());
        for (k, mine) in plan.iter().enumerate() {
            for &j in mine {
                assert_ne!(node_of(k, nodes), user_nodes[j], "admin {k}, session {j}");
                assert_eq!(node_of(k, nodes), (user_nodes[j] + 1) % nodes);
            }
        }
        let sizes: Vec<usize> = plan.iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|&n| (4..=5).contains(&n)), "{sizes:?}");
    }

    #[test]
    fn admins_not_divisible_by_nodes_still_cross() {
        let user_nodes: Vec<usize> = (0..20).map(|i| node_of(i, 3)).collect();
        let plan = shares(&user_nodes, 4, 3);
        assert_partition(&plan, 20);
        for (k, mine) in plan.iter().enumerate() {
            assert!(mine.iter().all(|&j| node_of(k, 3) != user_nodes[j]));
        }
    }

    #[test]
    fn fewer_admins_than_nodes_still_covers_every_session() {
        let user_nodes: Vec<usize> = (0..9).map(|i| node_of(i, 3)).collect();
        assert_partition(&shares(&user_nodes, 2, 3), 9);
    }
}
