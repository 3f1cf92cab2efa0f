//! The scenarios. Each runs against one server address (or several nodes, each user
//! on one of them), prints progress on stderr, and returns its summary as JSON
//! (which `compare` turns into ratios).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, check_fd_budget, idle_until, open, ping_pong, rss_kib, source, token};
use crate::Opts;

/// The WebSocket URL of the node at `addr`.
pub fn url(o: &Opts, addr: std::net::SocketAddr) -> String {
    format!("ws://{addr}{}/ws", o.prefix)
}

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    pongs: [AtomicU64; 2],
    dropped: AtomicU64,
}

/// Opens connections `range` at `o.rate` per second; each one answers a ping when
/// the phase reaches 1 and again at 2, then holds until 3 and closes.
fn open_many(
    o: &Opts,
    range: std::ops::Range<usize>,
    counts: &Arc<Counts>,
    phase: &tokio::sync::watch::Sender<u8>,
    handshakes: &tokio::sync::mpsc::UnboundedSender<u64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let interval = Duration::from_secs_f64(1.0 / o.rate.max(1) as f64);
    let start = Instant::now();
    range
        .map(|i| {
            let user = o.first_user + i % o.users.max(1);
            let addr = o.user_addr(user);
            let (url, counts, hs) = (url(o, addr), counts.clone(), handshakes.clone());
            let tok = token(&o.secret, &format!("load-{user}"));
            let src = source(o.first_user + i, o.sources);
            let mut phase = phase.subscribe();
            let at = start + interval * (i as u32 % 1_000_000);
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let t0 = Instant::now();
                let mut ws = match open(&url, addr, src, &tok).await {
                    Ok(ws) => ws,
                    Err(refused) => {
                        let c = if refused {
                            &counts.refused
                        } else {
                            &counts.failed
                        };
                        crate::progress::failed(c);
                        let _ = hs.send(0);
                        return;
                    }
                };
                // Counted before the handshake is reported: the ramp ends when the
                // last report arrives, and reads `connected` at once (the other
                // order undercounted by the connections still between the two).
                counts.connected.fetch_add(1, Ordering::Relaxed);
                crate::progress::done(1);
                let _ = hs.send(t0.elapsed().as_micros() as u64 + 1);
                for round in 0..2u8 {
                    if !idle_until(&mut ws, &mut phase, round + 1).await
                        || !ping_pong(&mut ws).await
                    {
                        crate::progress::failed(&counts.dropped);
                        return;
                    }
                    counts.pongs[round as usize].fetch_add(1, Ordering::Relaxed);
                }
                idle_until(&mut ws, &mut phase, 3).await;
                let _ = ws.close(None).await;
            })
        })
        .collect()
}

/// Waits for `n` handshake results; returns a histogram of the successful ones (µs).
async fn collect_handshakes(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
    n: usize,
) -> hdrhistogram::Histogram<u64> {
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for done in 0..n {
        match rx.recv().await {
            Some(0) | None => {}
            Some(us) => {
                let _ = h.record(us);
            }
        }
        if done % 1000 == 999 {
            eprintln!("  {} connections opened", done + 1);
        }
    }
    h
}

async fn wait_count(c: &AtomicU64, counts: &Counts, n: u64) {
    while c.load(Ordering::Relaxed) + counts.dropped.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn quantiles(h: &hdrhistogram::Histogram<u64>) -> Value {
    json!({"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99),
           "p999": h.value_at_quantile(0.999), "max": h.max(), "count": h.len()})
}

/// `connect`: N connections ramped at R/s; every one must answer a ping right
/// after the ramp and again after the hold.
pub async fn connect(o: &Opts) -> anyhow::Result<Value> {
    check_fd_budget(o.connections)?;
    let counts = Arc::new(Counts::default());
    let (phase, _) = tokio::sync::watch::channel(0u8);
    let (hs_tx, mut hs_rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let tasks = open_many(o, 0..o.connections, &counts, &phase, &hs_tx);
    let hist = collect_handshakes(&mut hs_rx, o.connections).await;
    let ramp = started.elapsed();
    let connected = counts.connected.load(Ordering::Relaxed);
    eprintln!(
        "  ramp done: {connected} connected in {:.1}s",
        ramp.as_secs_f64()
    );
    phase.send_replace(1);
    wait_count(&counts.pongs[0], &counts, connected).await;
    tokio::time::sleep(o.hold).await;
    phase.send_replace(2);
    wait_count(&counts.pongs[1], &counts, connected).await;
    phase.send_replace(3);
    for t in tasks {
        let _ = t.await;
    }
    Ok(json!({
        "scenario": "connect",
        "connections": o.connections,
        "connected": connected,
        "refused": counts.refused.load(Ordering::Relaxed),
        "failed": counts.failed.load(Ordering::Relaxed),
        "pongs_first_round": counts.pongs[0].load(Ordering::Relaxed),
        "pongs_after_hold": counts.pongs[1].load(Ordering::Relaxed),
        "dropped": counts.dropped.load(Ordering::Relaxed),
        "ramp_secs": ramp.as_secs_f64(),
        "handshake_us": quantiles(&hist),
    }))
}

/// `idle`: server memory per idle authenticated connection, as the slope of its
/// RSS between two connection counts (so fixed costs cancel out).
pub async fn idle(o: &Opts) -> anyhow::Result<Value> {
    if o.pids.is_empty() {
        anyhow::bail!("idle needs --pid (the server's process id)");
    }
    // Several pids (the nodes of a cluster) are summed; one that is gone fails.
    let rss = || -> anyhow::Result<u64> {
        o.pids.iter().try_fold(0, |sum, &pid| {
            let kib =
                rss_kib(pid).ok_or_else(|| anyhow::anyhow!("cannot read /proc/{pid}/status"))?;
            Ok(sum + kib)
        })
    };
    let (small, large) = (o.sizes[0], o.sizes[1]);
    check_fd_budget(large)?;
    let counts = Arc::new(Counts::default());
    let (phase, _) = tokio::sync::watch::channel(0u8);
    let (hs_tx, mut hs_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = open_many(o, 0..small, &counts, &phase, &hs_tx);
    collect_handshakes(&mut hs_rx, small).await;
    tokio::time::sleep(o.hold).await;
    let rss_small = rss()?;
    tasks.extend(open_many(o, small..large, &counts, &phase, &hs_tx));
    collect_handshakes(&mut hs_rx, large - small).await;
    tokio::time::sleep(o.hold).await;
    let rss_large = rss()?;
    let connected = counts.connected.load(Ordering::Relaxed);
    phase.send_replace(1);
    wait_count(&counts.pongs[0], &counts, connected).await;
    phase.send_replace(2);
    wait_count(&counts.pongs[1], &counts, connected).await;
    phase.send_replace(3);
    for t in tasks {
        let _ = t.await;
    }
    let per_conn = (rss_large as f64 - rss_small as f64) * 1024.0 / (large - small) as f64;
    eprintln!("  RSS {rss_small} KiB at {small}, {rss_large} KiB at {large}: {per_conn:.0} bytes per connection");
    Ok(json!({
        "scenario": "idle",
        "sizes": [small, large],
        "connected": connected,
        "refused": counts.refused.load(Ordering::Relaxed),
        "failed": counts.failed.load(Ordering::Relaxed),
        "dropped": counts.dropped.load(Ordering::Relaxed),
        "alive_after": counts.pongs[1].load(Ordering::Relaxed),
        "rss_kib": [rss_small, rss_large],
        "bytes_per_connection": per_conn,
    }))
}

/// `chat`: N users send `user_message`s and time each one to its `ack` (after the
/// message is durably stored; the baseline acks at once). `--msg-rate 0` is a
/// closed loop (one message in flight per user: the peak); otherwise open loop.
pub async fn chat(o: &Opts) -> anyhow::Result<Value> {
    check_fd_budget(o.users)?;
    let run = Duration::from_secs(o.secs);
    let (go_tx, _) = tokio::sync::watch::channel(false);
    let (res_tx, mut res_rx) =
        tokio::sync::mpsc::unbounded_channel::<(hdrhistogram::Histogram<u64>, u64, u64)>();
    let errors = Arc::new(AtomicU64::new(0));
    let per_user_gap =
        (o.msg_rate > 0).then(|| Duration::from_secs_f64(o.users as f64 / o.msg_rate as f64));
    let mut opened = 0;
    for i in 0..o.users {
        let user = o.first_user + i;
        let addr = o.user_addr(user);
        let Ok(ws) = open(
            &url(o, addr),
            addr,
            source(user, o.sources),
            &token(&o.secret, &format!("chat-{user}")),
        )
        .await
        else {
            crate::progress::failed(&errors);
            continue;
        };
        opened += 1;
        let (mut go, res, errors) = (go_tx.subscribe(), res_tx.clone(), errors.clone());
        tokio::spawn(async move {
            let _ = go.wait_for(|g| *g).await;
            let _ = res.send(user_loop(ws, i, run, per_user_gap, &errors).await);
        });
    }
    drop(res_tx);
    eprintln!("  {opened} users connected; measuring for {}s", o.secs);
    let started = Instant::now();
    go_tx.send_replace(true);
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let (mut acks, mut unanswered) = (0, 0);
    while let Some((h, a, u)) = res_rx.recv().await {
        hist.add(h)?;
        acks += a;
        unanswered += u;
    }
    let secs = started.elapsed().as_secs_f64().max(o.secs as f64);
    Ok(json!({
        "scenario": "chat",
        "users": o.users,
        "msg_rate_target": o.msg_rate,
        "acks": acks,
        "acks_per_sec": acks as f64 / secs,
        "unanswered_at_end": unanswered,
        "errors": errors.load(Ordering::Relaxed),
        "rtt_us": quantiles(&hist),
    }))
}

/// One user: sends messages (into one session) and times each to its ack.
async fn user_loop(
    ws: client::Ws,
    i: usize,
    run: Duration,
    gap: Option<Duration>,
    errors: &AtomicU64,
) -> (hdrhistogram::Histogram<u64>, u64, u64) {
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let (mut tx, mut rx) = ws.split();
    let end = tokio::time::Instant::now() + run;
    let mut in_flight: HashMap<String, Instant> = HashMap::new();
    let mut session: Option<String> = None;
    let (mut n, mut acks) = (0u64, 0u64);
    let mut next_send = tokio::time::Instant::now();
    loop {
        let can_send = match gap {
            None => in_flight.is_empty(),
            Some(_) => true,
        };
        let send_at = if can_send { next_send } else { end };
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            _ = tokio::time::sleep_until(send_at), if can_send && tokio::time::Instant::now() < end => {
                n += 1;
                let id = format!("u{i}-{n}");
                let mut m = json!({"type": "user_message", "id": id, "content": "Where is my order? It was due yesterday."});
                if let Some(s) = &session {
                    m["session_id"] = json!(s);
                }
                if tx.send(Message::text(m.to_string())).await.is_err() {
                    crate::progress::failed(errors);
                    break;
                }
                in_flight.insert(id, Instant::now());
                next_send = gap.map_or_else(tokio::time::Instant::now, |g| next_send + g);
            }
            m = rx.next() => {
                let Some(Ok(Message::Text(t))) = m else {
                    if matches!(m, Some(Ok(_))) { continue; }
                    crate::progress::failed(errors);
                    break;
                };
                let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                match v["type"].as_str() {
                    Some("session") => session = v["session_id"].as_str().map(str::to_owned),
                    Some("ack") => {
                        if let Some(sent) = v["id"].as_str().and_then(|id| in_flight.remove(id)) {
                            let _ = hist.record(sent.elapsed().as_micros() as u64);
                            acks += 1;
                            crate::progress::done(1);
                        }
                    }
                    Some("error") => {
                        crate::progress::failed(errors);
                        if let Some(id) = v["id"].as_str() {
                            in_flight.remove(id);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let _ = tx.close().await;
    (hist, acks, in_flight.len() as u64)
}

/// `churn`: a connect/disconnect storm. `--users` workers each open a connection,
/// check it with a ping, and close it, over and over for `--secs`. Afterwards the
/// server must be back to no open WebSocket connections (read from its /metrics;
/// skipped for servers without one, like the baseline).
pub async fn churn(o: &Opts) -> anyhow::Result<Value> {
    check_fd_budget(o.users * 2)?;
    let end = tokio::time::Instant::now() + Duration::from_secs(o.secs);
    let (cycles, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (hs_tx, mut hs_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut workers = Vec::new();
    for w in 0..o.users {
        let user = o.first_user + w;
        let addr = o.user_addr(user);
        let (url, src) = (url(o, addr), source(user, o.sources));
        let tok = token(&o.secret, &format!("churn-{user}"));
        let (cycles, errors, hs) = (cycles.clone(), errors.clone(), hs_tx.clone());
        workers.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < end {
                let t0 = Instant::now();
                match open(&url, addr, src, &tok).await {
                    Ok(mut ws) => {
                        let _ = hs.send(t0.elapsed().as_micros() as u64);
                        if ping_pong(&mut ws).await {
                            cycles.fetch_add(1, Ordering::Relaxed);
                            crate::progress::done(1);
                        } else {
                            crate::progress::failed(&errors);
                        }
                        let _ = ws.close(None).await;
                        // Read to the end, so the server's side is gone too.
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                    Err(_) => {
                        crate::progress::failed(&errors);
                    }
                }
            }
        }));
    }
    drop(hs_tx);
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    while let Some(us) = hs_rx.recv().await {
        let _ = hist.record(us);
    }
    for w in workers {
        let _ = w.await;
    }
    let open_after = open_connections_settled(o).await;
    let n = cycles.load(Ordering::Relaxed);
    Ok(json!({
        "scenario": "churn",
        "workers": o.users,
        "cycles": n,
        "cycles_per_sec": n as f64 / o.secs.max(1) as f64,
        "errors": errors.load(Ordering::Relaxed),
        "open_after": open_after,
        "handshake_us": quantiles(&hist),
    }))
}

/// The open WebSocket count of all the nodes once they have caught up (up to
/// 10 s), or `None` when none has a chatbox /metrics endpoint.
async fn open_connections_settled(o: &Opts) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut open = None;
        for &addr in &o.addrs {
            if let Some(n) = scrape_open(o, addr).await {
                open = Some(open.unwrap_or(0) + n);
            }
        }
        let open = open?;
        if open == 0 || tokio::time::Instant::now() >= deadline {
            return Some(open);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape_open(o: &Opts, addr: std::net::SocketAddr) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!(
        "GET {}/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        o.prefix
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    if !body.starts_with("HTTP/1.1 200") {
        return None;
    }
    let open = body
        .lines()
        .filter(|l| l.starts_with("chatbox_ws_connections_open{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    Some(open)
}
