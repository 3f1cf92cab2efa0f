//! Scenarios where the server pushes: `stream` (answers streamed chunk by chunk to
//! many users at once), and the helpers `takeover` (admins writing into many users'
//! sessions, in takeover.rs) shares with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, check_fd_budget, open, source, token};
use crate::scenarios::{quantiles, url};
use crate::Opts;

pub type Hist = Histogram<u64>;

pub fn hist() -> Hist {
    Histogram::new(3).expect("3 significant digits is valid")
}

/// Opens `n` user connections at `o.rate` per second, user i (counted from
/// `--first-user`) on its node; counts failures in `errors`. Returns each
/// connection with its user's index.
pub async fn open_users(
    o: &Opts,
    n: usize,
    prefix: &str,
    errors: &AtomicU64,
) -> Vec<(usize, client::Ws)> {
    let gap = Duration::from_secs_f64(1.0 / o.rate.max(1) as f64);
    let mut next = tokio::time::Instant::now();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(next).await;
        next += gap;
        let user = o.first_user + i;
        let tok = token(&o.secret, &format!("{prefix}-{user}"));
        let addr = o.user_addr(user);
        match open(&url(o, addr), addr, source(user, o.sources), &tok).await {
            Ok(ws) => out.push((user, ws)),
            Err(_) => {
                crate::progress::failed(errors);
            }
        }
        if i % 1000 == 999 {
            eprintln!("  {} connections opened", i + 1);
        }
    }
    out
}

pub fn user_message(id: &str, session: Option<&str>) -> Message {
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
    for (i, ws) in users {
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
            crate::progress::failed(errors);
            break;
        }
        let finished = read_answer(&mut rx, asked, end, &mut st, &mut session, errors).await;
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

/// Reads one streamed answer to its `ai_done`, timing its chunks into `st` and
/// taking the session id from the `ack`. False when the run ended first, the
/// connection failed or the server answered with an error.
async fn read_answer(
    rx: &mut futures_util::stream::SplitStream<client::Ws>,
    asked: Instant,
    end: tokio::time::Instant,
    st: &mut StreamStats,
    session: &mut Option<String>,
    errors: &AtomicU64,
) -> bool {
    let mut last_chunk: Option<Instant> = None;
    loop {
        let m = tokio::select! {
            m = rx.next() => m,
            _ = tokio::time::sleep_until(end) => return false,
        };
        let Some(Ok(Message::Text(t))) = m else {
            if matches!(m, Some(Ok(_))) {
                continue;
            }
            crate::progress::failed(errors);
            return false;
        };
        let Ok(v) = serde_json::from_str::<Value>(&t) else {
            continue;
        };
        match v["type"].as_str() {
            Some("ack") => *session = v["session_id"].as_str().map(str::to_owned),
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
                crate::progress::done(1);
            }
            Some("ai_done") => return true,
            Some("error") => {
                crate::progress::failed(errors);
                return false;
            }
            _ => {}
        }
    }
}
