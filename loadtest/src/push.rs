//! Scenarios where the server pushes: `stream` (answers streamed chunk by chunk to
//! many users at once) and `takeover` (admins writing into many users' sessions, the
//! fan-out of admin frames to the sessions' connections).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, check_fd_budget, open, source, token};
use crate::scenarios::{quantiles, url};
use crate::Opts;

type Hist = Histogram<u64>;

fn hist() -> Hist {
    Histogram::new(3).expect("3 significant digits is valid")
}

/// Opens `n` user connections at `o.rate` per second; counts failures in `errors`.
async fn open_users(o: &Opts, n: usize, prefix: &str, errors: &AtomicU64) -> Vec<client::Ws> {
    let gap = Duration::from_secs_f64(1.0 / o.rate.max(1) as f64);
    let mut next = tokio::time::Instant::now();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(next).await;
        next += gap;
        let tok = token(&o.secret, &format!("{prefix}-{i}"));
        match open(&url(o), o.addr, source(i, o.sources), &tok).await {
            Ok(ws) => out.push(ws),
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if i % 1000 == 999 {
            eprintln!("  {} connections opened", i + 1);
        }
    }
    out
}

fn user_message(id: &str, session: Option<&str>) -> Message {
    let mut m = json!({"type": "user_message", "id": id,
                       "content": "My parcel has not arrived. Can you check where it is?"});
    if let Some(s) = session {
        m["session_id"] = json!(s);
    }
    Message::text(m.to_string())
}

/// What one streaming user saw.
struct StreamStats {
    first_chunk: Hist,
    gap: Hist,
    chunks: u64,
    answers: u64,
    unfinished: u64,
}

/// `stream`: every user asks, reads the whole streamed answer (`ai_chunk`s up to
/// `ai_done`), and asks again, for `--secs`. Measures time to the first chunk and
/// the gaps between chunks (the server paces them at `--chunk-ms`; lateness beyond
/// that is the server falling behind).
pub async fn stream(o: &Opts) -> anyhow::Result<Value> {
    check_fd_budget(o.users)?;
    let errors = Arc::new(AtomicU64::new(0));
    let users = open_users(o, o.users, "stream", &errors).await;
    eprintln!(
        "  {} users connected; streaming for {}s",
        users.len(),
        o.secs
    );
    let end = tokio::time::Instant::now() + Duration::from_secs(o.secs);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    for (i, ws) in users.into_iter().enumerate() {
        let (errors, done) = (errors.clone(), done_tx.clone());
        tokio::spawn(async move {
            let _ = done.send(stream_user(ws, i, end, &errors).await);
        });
    }
    drop(done_tx);
    let (mut first_chunk, mut gap) = (hist(), hist());
    let (mut chunks, mut answers, mut unfinished) = (0, 0, 0);
    while let Some(s) = done_rx.recv().await {
        first_chunk.add(s.first_chunk)?;
        gap.add(s.gap)?;
        chunks += s.chunks;
        answers += s.answers;
        unfinished += s.unfinished;
    }
    Ok(json!({
        "scenario": "stream",
        "users": o.users,
        "chunk_ms": o.chunk_ms,
        "answers": answers,
        "chunks": chunks,
        "chunks_per_sec": chunks as f64 / o.secs.max(1) as f64,
        "unfinished_at_end": unfinished,
        "errors": errors.load(Ordering::Relaxed),
        "first_chunk_us": quantiles(&first_chunk),
        "chunk_gap_us": quantiles(&gap),
    }))
}

async fn stream_user(
    ws: client::Ws,
    i: usize,
    end: tokio::time::Instant,
    errors: &AtomicU64,
) -> StreamStats {
    let mut st = StreamStats {
        first_chunk: hist(),
        gap: hist(),
        chunks: 0,
        answers: 0,
        unfinished: 0,
    };
    let (mut tx, mut rx) = ws.split();
    let mut session: Option<String> = None;
    for n in 0u64.. {
        if tokio::time::Instant::now() >= end {
            break;
        }
        let asked = Instant::now();
        if tx
            .send(user_message(&format!("s{i}-{n}"), session.as_deref()))
            .await
            .is_err()
        {
            errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        let mut last_chunk: Option<Instant> = None;
        let finished = loop {
            let m = tokio::select! {
                m = rx.next() => m,
                _ = tokio::time::sleep_until(end) => break false,
            };
            let Some(Ok(Message::Text(t))) = m else {
                if matches!(m, Some(Ok(_))) {
                    continue;
                }
                errors.fetch_add(1, Ordering::Relaxed);
                break false;
            };
            let Ok(v) = serde_json::from_str::<Value>(&t) else {
                continue;
            };
            match v["type"].as_str() {
                Some("ack") => session = v["session_id"].as_str().map(str::to_owned),
                Some("ai_chunk") => {
                    let now = Instant::now();
                    let since = last_chunk.map_or(asked, |l| l);
                    let h = if last_chunk.is_some() {
                        &mut st.gap
                    } else {
                        &mut st.first_chunk
                    };
                    let _ = h.record(now.duration_since(since).as_micros() as u64);
                    last_chunk = Some(now);
                    st.chunks += 1;
                }
                Some("ai_done") => break true,
                Some("error") => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break false;
                }
                _ => {}
            }
        };
        if finished {
            st.answers += 1;
        } else {
            st.unfinished += 1;
            break;
        }
    }
    let _ = tx.close().await;
    st
}

/// `takeover`: `--users` users each open a session; `--admins` admins join them
/// (each a share) and write into them at `--msg-rate` messages per second in all.
/// Measures the time from an admin's `admin_message` to the user receiving it, and
/// that every message sent arrives.
pub async fn takeover(o: &Opts) -> anyhow::Result<Value> {
    check_fd_budget(o.users + o.admins)?;
    let errors = Arc::new(AtomicU64::new(0));
    let arrived = Arc::new(AtomicU64::new(0));
    let base = Instant::now();
    // 1. Users, each with a session (its id from the `ack`).
    let mut sessions = Vec::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<(Hist, u64)>();
    for (i, ws) in open_users(o, o.users, "user", &errors)
        .await
        .into_iter()
        .enumerate()
    {
        let (mut tx, mut rx) = ws.split();
        let session = async {
            tx.send(user_message(&format!("t{i}"), None)).await.ok()?;
            while let Some(Ok(m)) = rx.next().await {
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(&t).ok()?;
                if v["type"] == "ack" {
                    return v["session_id"].as_str().map(str::to_owned);
                }
            }
            None
        };
        let Some(sid) = session.await else {
            errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        sessions.push(sid);
        let (mut stop, res, arrived) = (stop_rx.clone(), res_tx.clone(), arrived.clone());
        tokio::spawn(async move {
            let (mut h, mut got) = (hist(), 0u64);
            loop {
                let m = tokio::select! {
                    m = rx.next() => m,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let Some(Ok(Message::Text(t))) = m else {
                    if matches!(m, Some(Ok(_))) {
                        continue;
                    }
                    break;
                };
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                if v["type"] == "admin_message" {
                    if let Some(sent) = v["content"]
                        .as_str()
                        .and_then(|c| c.strip_prefix('t')?.parse::<u64>().ok())
                    {
                        let now = base.elapsed().as_micros() as u64;
                        let _ = h.record(now.saturating_sub(sent));
                        got += 1;
                        arrived.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let _ = tx.close().await;
            let _ = res.send((h, got));
        });
    }
    drop(res_tx);
    // 2. Admins, each joining its share of the sessions.
    let admins = o.admins.min(sessions.len()).max(1);
    let mut admin_tasks = Vec::new();
    let sent = Arc::new(AtomicU64::new(0));
    let run = Duration::from_secs(o.secs);
    // Open loop: admins write at this rate in all, whether or not the server keeps up.
    let rate = if o.msg_rate == 0 { 1000 } else { o.msg_rate };
    let per_admin_gap = Duration::from_secs_f64(admins as f64 / rate as f64);
    for k in 0..admins {
        let tok = client::admin_token(&o.secret, &format!("agent-{k}"));
        let Ok(ws) = open(&url(o), o.addr, source(k, o.sources), &tok).await else {
            errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let mine: Vec<String> = sessions.iter().skip(k).step_by(admins).cloned().collect();
        let (errors, sent) = (errors.clone(), sent.clone());
        admin_tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            for sid in &mine {
                let join = json!({"type": "admin_join", "session_id": sid});
                if tx.send(Message::text(join.to_string())).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            // Writes start once every join is confirmed (chatbox: `admin_joined` with
            // our name; the baseline: an `ack`), so none is refused as "join first".
            let me = format!("agent-{k}");
            let mut joined = 0;
            while joined < mine.len() {
                let Some(Ok(m)) = rx.next().await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let Message::Text(t) = m else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                match v["type"].as_str() {
                    Some("admin_joined") if v["admin_name"] == me.as_str() => joined += 1,
                    Some("ack") => joined += 1,
                    Some("error") => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    _ => {}
                }
            }
            // From here on, reads the admin's own frames (so its socket never fills)
            // and counts refusals.
            let refusals = errors.clone();
            let drain = tokio::spawn(async move {
                while let Some(Ok(m)) = rx.next().await {
                    if let Message::Text(t) = m {
                        if t.contains(r#""type":"error""#) {
                            refusals.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
            let end = tokio::time::Instant::now() + run;
            let mut next = tokio::time::Instant::now();
            for (n, sid) in mine.iter().cycle().enumerate() {
                tokio::time::sleep_until(next).await;
                if next >= end {
                    break;
                }
                next += per_admin_gap;
                let at = base.elapsed().as_micros() as u64;
                let m = json!({"type": "admin_message", "session_id": sid,
                               "id": format!("a{k}-{n}"), "content": format!("t{at}")});
                if tx.send(Message::text(m.to_string())).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            let _ = tx.close().await;
            let _ = drain.await;
        }));
    }
    eprintln!(
        "  {} sessions, {admins} admins; writing for {}s",
        sessions.len(),
        o.secs
    );
    for t in admin_tasks {
        let _ = t.await;
    }
    // 3. Wait (at most 10 s) for the last messages to arrive, then stop the users.
    let sent = sent.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while arrived.load(Ordering::Relaxed) < sent && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut latency = hist();
    let mut delivered = 0;
    stop_tx.send_replace(true);
    while let Some((h, got)) = res_rx.recv().await {
        latency.add(h)?;
        delivered += got;
    }
    Ok(json!({
        "scenario": "takeover",
        "users": o.users,
        "admins": admins,
        "msg_rate_target": rate,
        "sent": sent,
        "delivered": delivered,
        "lost": sent.saturating_sub(delivered),
        "messages_per_sec": delivered as f64 / o.secs.max(1) as f64,
        "errors": errors.load(Ordering::Relaxed),
        "delivery_us": quantiles(&latency),
    }))
}
