//! Answers driven step by step by a fake model (a gate releases each event, so
//! nothing races a timer): cancel keeps exactly the partial text, a resume gets
//! the missed chunks then the live rest exactly once, and a resent message id
//! starts no second answer.

mod common;

use common::*;
use serde_json::{json, Value};

/// What one message produced: its session.
struct Exchange {
    session_id: String,
}

/// Sends a message and reads to its `ai_done`.
async fn converse(ws: &mut Ws, session_id: Option<&str>, id: &str, content: &str) -> Exchange {
    let mut msg = json!({"type": "user_message", "id": id, "content": content});
    if let Some(s) = session_id {
        msg["session_id"] = json!(s);
    }
    send(ws, msg).await;
    let (_, before) = until(ws, "ai_done").await;
    let ack = before.iter().find(|v| v["type"] == "ack").expect("an ack");
    Exchange {
        session_id: ack["session_id"].as_str().unwrap().to_owned(),
    }
}

fn text_of(chunks: &[Value]) -> String {
    chunks
        .iter()
        .map(|c| c["content"].as_str().unwrap())
        .collect()
}

/// The words of a stepped answer: "w1 " .. "w{n} ".
fn words(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("w{i} ")).collect()
}

/// The model is driven step by step: two chunks go out, the user cancels, and
/// nothing more can come; the partial text is exactly those two chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_answer_and_keeps_the_partial_text() {
    let w = words(10);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    let (cfg, mut fake, gate) = fake_llm::stepped_server(&[&w]).await;
    let server = start(cfg);
    let mut ws = connect_user(server.local_addr(), "stopper").await;
    send(
        &mut ws,
        json!({"type": "user_message", "id": "c1", "content": "tell me a long story"}),
    )
    .await;
    gate.release(2);
    let (first, before) = until(&mut ws, "ai_chunk").await;
    let sid = before[0]["session_id"].as_str().unwrap().to_owned();
    let (second, _) = until(&mut ws, "ai_chunk").await;
    send(&mut ws, json!({"type": "cancel", "session_id": sid})).await;
    let (done, more) = until(&mut ws, "ai_done").await;
    assert_eq!(done["cancelled"], true);
    assert!(
        more.iter().all(|v| v["type"] != "ai_chunk"),
        "no chunk after the cancel: {more:?}"
    );
    assert_eq!(done["usage"]["output_tokens"], 2, "{done}");
    fake.wait_closed(0).await;
    // Releasing the rest now reaches no one: the upstream request is gone.
    gate.open();
    let partial = format!(
        "{}{}",
        first["content"].as_str().unwrap(),
        second["content"].as_str().unwrap()
    );
    assert_eq!(partial, "w1 w2 ");
    send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
    let s = recv(&mut ws).await;
    let last = s["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["role"].as_str(), last["cancelled"].as_bool()),
        (Some("assistant"), Some(true))
    );
    assert_eq!(last["content"], json!(partial));
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.requests()[0].events_sent, 2);
}

/// Step by step: five chunks reach the first connection; a second connection
/// resumes after seq 3 and gets 4 and 5 (missed), then, once the model is let
/// go, the live rest: every chunk after 3 exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_mid_answer_gets_missed_chunks_then_the_live_rest_exactly_once() {
    let w = words(12);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    let (cfg, _fake, gate) = fake_llm::stepped_server(&[&w]).await;
    let server = start(cfg);
    let addr = server.local_addr();
    let mut a = connect_user(addr, "blip").await;
    send(
        &mut a,
        json!({"type": "user_message", "id": "c1", "content": "stream please"}),
    )
    .await;
    gate.release(5);
    let mut sid = String::new();
    loop {
        let v = recv(&mut a).await;
        if v["type"] == "session" {
            sid = v["session_id"].as_str().unwrap().to_owned();
        }
        if v["type"] == "ai_chunk" && v["seq"] == 5 {
            break;
        }
    }
    // The "network blip": a new connection resumes after seq 3.
    let mut b = connect_user(addr, "blip").await;
    send(
        &mut b,
        json!({"type": "resume", "session_id": sid, "after_seq": 3}),
    )
    .await;
    let s = recv(&mut b).await;
    assert_eq!(s["type"], "session");
    assert!(
        s["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["role"] == "user"),
        "the streaming answer is not in history"
    );
    let missed: Vec<Value> = [recv(&mut b).await, recv(&mut b).await].into();
    assert_eq!(
        missed.iter().map(|v| v["seq"].clone()).collect::<Vec<_>>(),
        [json!(4), json!(5)],
        "the missed chunks come first: {missed:?}"
    );
    gate.open();
    let (done, rest) = until(&mut b, "ai_done").await;
    let seqs: Vec<u64> = missed
        .iter()
        .chain(&rest)
        .filter(|v| v["type"] == "ai_chunk")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(done["usage"]["output_tokens"], 12, "{done}");
    assert_eq!(
        seqs,
        (4..=12).collect::<Vec<_>>(),
        "every chunk after 3, once, in order"
    );
    let text: String = missed
        .iter()
        .chain(&rest)
        .filter(|v| v["type"] == "ai_chunk")
        .map(|v| v["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, w[3..].concat());
}

/// A resent `id` is acked again and starts NO second answer: the model is asked
/// exactly once for it, on either connection, and no answer frames follow the
/// duplicate ack. A later new message (whose answer is the sync point) is the
/// model's second and last request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_ack_starts_no_second_answer() {
    let (cfg, mut fake, gate) = fake_llm::stepped_server(&[&["first"], &["second"]]).await;
    gate.open();
    let server = start(cfg);
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "dup2").await;
    let x = converse(&mut ws, None, "same-id", "original text").await;
    assert_eq!(fake.wait_request().await, 0);
    send(&mut ws, json!({"type": "user_message", "id": "same-id", "session_id": x.session_id, "content": "changed"})).await;
    let ack = recv(&mut ws).await;
    assert_eq!(
        (ack["type"].as_str(), ack["duplicate"].as_bool()),
        (Some("ack"), Some(true))
    );
    let mut other = connect_user(addr, "dup2").await;
    send(
        &mut other,
        json!({"type": "user_message", "id": "same-id", "content": "again"}),
    )
    .await;
    let (ack, _) = until(&mut other, "ack").await;
    assert_eq!(ack["duplicate"], true);
    // The sync point: a new message; its answer is the model's second request.
    send(&mut ws, json!({"type": "user_message", "id": "next", "session_id": x.session_id, "content": "a new question"})).await;
    let (done, before) = until(&mut ws, "ai_done").await;
    assert_eq!(done["cancelled"], Value::Null, "{done}");
    assert_eq!(
        before
            .iter()
            .map(|v| v["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["ack", "ai_chunk"],
        "only the new message's ack and answer: {before:?}"
    );
    assert_eq!(text_of(&before[1..]), "second");
    assert_eq!(fake.wait_request().await, 1);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2, "one answer per stored message");
    let last_user = |r: &fake_llm::Seen| {
        r.body["messages"].as_array().unwrap().last().unwrap()["content"].clone()
    };
    assert_eq!(last_user(&reqs[0]), "original text");
    assert_eq!(last_user(&reqs[1]), "a new question");
    assert_eq!(llm_total(&server, |m| m.requests.get()), 2);
    // The other connection saw no answer start either.
    send(
        &mut other,
        json!({"type": "resume", "session_id": x.session_id}),
    )
    .await;
    let (_, before) = until(&mut other, "session").await;
    assert!(
        before
            .iter()
            .all(|v| v["type"] != "ai_chunk" && v["type"] != "ai_done"),
        "{before:?}"
    );
    assert_eq!(fake.requests().len(), 2);
}

/// The model goes on while a second connection resumes: chunks produced while its
/// history is being read must not reach it before the `session` frame, nor twice
/// (the replay of the running answer already has them). Found by the widget's
/// browser tests, which had to sort chunks by seq to cope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_streamed_during_a_resume_come_after_its_history_and_once() {
    let w = words(400);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    let (cfg, _fake, gate) = fake_llm::stepped_server(&[&w]).await;
    let server = start(cfg);
    let addr = server.local_addr();
    let mut a = connect_user(addr, "race").await;
    send(
        &mut a,
        json!({"type": "user_message", "id": "c1", "content": "go"}),
    )
    .await;
    gate.release(3);
    let (first, before) = until(&mut a, "ai_chunk").await;
    let sid = before.iter().find(|f| f["type"] == "session").unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(first["seq"], 1);
    let mut b = connect_user(addr, "race").await;
    send(
        &mut b,
        json!({"type": "resume", "session_id": sid, "after_seq": 1}),
    )
    .await;
    // The rest streams while the resume reads the history.
    gate.open();
    let s = recv(&mut b).await;
    assert_eq!(s["type"], "session", "the history comes first: {s}");
    let (_, frames) = until(&mut b, "ai_done").await;
    let seqs: Vec<u64> = frames
        .iter()
        .filter(|v| v["type"] == "ai_chunk")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (2..=400).collect::<Vec<_>>(),
        "every chunk after 1, once, in order"
    );
    server.shutdown();
    stop(server).await;
}
