//! `history`: a client reads a long session's older messages page by page (the
//! chat widget loads them as the user scrolls up), after `resume` gave it the
//! latest `history_messages_max`.

mod common;

use common::*;
use serde_json::{json, Value};

/// The `history` answer to a request (skipping other frames).
async fn page(ws: &mut Ws, sid: &str, before_seq: u64, limit: u64) -> Value {
    let req = json!({"type": "history", "id": "h", "session_id": sid,
                     "before_seq": before_seq, "limit": limit});
    send(ws, req).await;
    until(ws, "history").await.0
}

fn contents(messages: &Value) -> Vec<String> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_messages_come_page_by_page_until_none_is_left() {
    let mut cfg = config();
    cfg.history_messages_max = 3;
    let server = start(cfg);
    let addr = server.local_addr();
    // 5 questions, 5 answers: 10 messages, seqs 1..=10.
    let sid = conversation(addr, "ann", 5).await;
    let mut ws = connect_user(addr, "ann").await;
    send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
    let (s, _) = until(&mut ws, "session").await;
    let latest = s["messages"].as_array().unwrap().clone();
    assert_eq!(latest.len(), 3);
    let seqs: Vec<u64> = latest.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [8, 9, 10], "history items carry their seq");

    // Pages of 4 before the oldest one shown: 4..=7, then 1..=3 and no more.
    let p1 = page(&mut ws, &sid, seqs[0], 4).await;
    assert_eq!(
        (p1["id"].as_str(), p1["session_id"].as_str()),
        (Some("h"), Some(sid.as_str()))
    );
    let got: Vec<u64> = p1["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [4, 5, 6, 7]);
    assert_eq!(p1["before_seq"], 4);
    let p2 = page(&mut ws, &sid, 4, 4).await;
    assert_eq!(p2["messages"].as_array().unwrap().len(), 3);
    assert!(p2.get("before_seq").is_none(), "nothing older: {p2}");

    // Together with the resume: the whole conversation, once, in order.
    let mut all = contents(&p2["messages"]);
    all.extend(contents(&p1["messages"]));
    all.extend(contents(&s["messages"]));
    assert_eq!(all.len(), 10);
    for i in 0..5 {
        assert_eq!(all[2 * i], format!("question {i} from ann"));
        assert!(all[2 * i + 1].starts_with("[demo]"), "{}", all[2 * i + 1]);
    }

    // Someone else's session is refused like any other; a bad limit is invalid.
    let mut other = connect_user(addr, "bob").await;
    send(
        &mut other,
        json!({"type": "history", "session_id": sid, "before_seq": 5}),
    )
    .await;
    let e = until(&mut other, "error").await.0;
    assert_eq!(e["code"], "forbidden");
    let bad = json!({"type": "history", "session_id": sid, "before_seq": 5, "limit": 0});
    send(&mut ws, bad).await;
    assert_eq!(until(&mut ws, "error").await.0["code"], "invalid_message");

    drop((ws, other));
    server.shutdown();
    stop(server).await;
}
