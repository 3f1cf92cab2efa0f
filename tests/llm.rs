//! Real providers against local fake servers that speak the exact streaming formats
//! (OpenAI chat completions SSE, Anthropic messages SSE): streaming, usage,
//! cancellation seen by the provider, resume across a reconnect, retries, timeouts,
//! malformed events, disconnects and fallback.

mod common;

use std::time::{Duration, Instant};

use chatbox::config::LlmProvider;
use chatbox::llm::ModelConfig;
use common::fake_llm::*;
use common::*;
use serde_json::{json, Value};

fn chunks_text(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|v| v["type"] == "ai_chunk")
        .map(|v| v["content"].as_str().unwrap())
        .collect()
}

fn session_of(frames: &[Value]) -> String {
    frames.iter().find(|v| v["type"] == "session").unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_stream_reaches_the_client_with_provider_usage() {
    let fake = Fake::start(vec![stream(
        openai_events(&["Hel", "lo", " world"], Some((9, 3))),
        1,
    )])
    .await;
    let server = start(with_models(vec![model("gpt", LlmProvider::Openai, &fake)]));
    let mut ws = connect_user(server.local_addr(), "oa").await;
    send(
        &mut ws,
        json!({"type": "user_message", "id": "c1", "content": "say hello"}),
    )
    .await;
    let (done, before) = until(&mut ws, "ai_done").await;
    assert_eq!(chunks_text(&before), "Hello world");
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 9, "output_tokens": 3})
    );
    let req = &fake.requests()[0];
    assert!(
        req.headers.starts_with("post /v1/chat/completions "),
        "{}",
        req.headers
    );
    assert!(req.headers.contains("authorization: bearer test-key"));
    assert_eq!(req.body["model"], "upstream-gpt");
    assert_eq!(req.body["stream"], true);
    assert_eq!(req.body["stream_options"]["include_usage"], true);
    assert_eq!(
        req.body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(
        req.body["messages"][1],
        json!({"role": "user", "content": "say hello"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conversation_so_far_is_sent_upstream() {
    let fake = Fake::start(vec![
        stream(openai_events(&["First answer."], None), 1),
        stream(openai_events(&["Second."], None), 1),
    ])
    .await;
    let server = start(with_models(vec![model("gpt", LlmProvider::Openai, &fake)]));
    let mut ws = connect_user(server.local_addr(), "ctx").await;
    send(&mut ws, json!({"type": "user_message", "content": "one"})).await;
    let (_, before) = until(&mut ws, "ai_done").await;
    let sid = session_of(&before);
    send(
        &mut ws,
        json!({"type": "user_message", "session_id": sid, "content": "two"}),
    )
    .await;
    until(&mut ws, "ai_done").await;
    let roles: Vec<(String, String)> = fake.requests()[1].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = [
        ("system", "Be brief."),
        ("user", "one"),
        ("assistant", "First answer."),
        ("user", "two"),
    ];
    assert_eq!(roles, expect.map(|(a, b)| (a.to_owned(), b.to_owned())));
}

/// Step by step: one chunk is out, the user cancels, the upstream connection
/// closes with no second event sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_closes_the_upstream_connection_at_once() {
    let words: Vec<String> = (0..200).map(|i| format!("w{i} ")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let gate = Gate::new();
    let mut fake = Fake::start(vec![stepped(openai_events(&words, None), &gate)]).await;
    let server = start(with_models(vec![model("gpt", LlmProvider::Openai, &fake)]));
    let mut ws = connect_user(server.local_addr(), "cancel").await;
    send(
        &mut ws,
        json!({"type": "user_message", "content": "long please"}),
    )
    .await;
    gate.release(1);
    let (_, before) = until(&mut ws, "ai_chunk").await;
    let sid = session_of(&before);
    let sent_at = Instant::now();
    send(&mut ws, json!({"type": "cancel", "session_id": sid})).await;
    let closed_at = fake.wait_closed(0).await;
    let (done, _) = until(&mut ws, "ai_done").await;
    assert_eq!(done["cancelled"], true);
    let req = &fake.requests()[0];
    assert_eq!(
        req.events_sent, 1,
        "the provider sent nothing after the cancel"
    );
    // Recorded in PERF.md; not asserted (tests do not assert wall-clock times).
    eprintln!(
        "upstream closed {:?} after the cancel frame was sent",
        closed_at.saturating_duration_since(sent_at)
    );
    assert_eq!(total(&server, |m| m.answers_cancelled.get()), 1);
    assert_eq!(fake.requests().len(), 1);
}

/// Step by step: five chunks reach the only connection, it goes away, a new one
/// resumes after seq 5, and only then does the model go on: every chunk exactly
/// once, and the upstream request outlived the disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_resumes_with_every_chunk_exactly_once() {
    let words: Vec<String> = (1..=30).map(|i| format!("<{i}>")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let gate = Gate::new();
    let fake = Fake::start(vec![stepped(openai_events(&words, Some((5, 30))), &gate)]).await;
    let server = start(with_models(vec![model("gpt", LlmProvider::Openai, &fake)]));
    let addr = server.local_addr();
    let mut a = connect_user(addr, "blip").await;
    send(
        &mut a,
        json!({"type": "user_message", "content": "count to thirty"}),
    )
    .await;
    gate.release(5);
    let mut seen = String::new();
    let mut sid = String::new();
    loop {
        let v = recv(&mut a).await;
        if v["type"] == "session" {
            sid = v["session_id"].as_str().unwrap().to_owned();
        }
        if v["type"] == "ai_chunk" {
            seen.push_str(v["content"].as_str().unwrap());
            if v["seq"] == 5 {
                break;
            }
        }
    }
    // The network blip: the only connection goes away entirely, then comes back.
    close_and_wait(a).await;
    let mut b = connect_user(addr, "blip").await;
    send(
        &mut b,
        json!({"type": "resume", "session_id": sid, "after_seq": 5}),
    )
    .await;
    let (s, _) = until(&mut b, "session").await;
    assert_eq!(s["session_id"], json!(sid));
    gate.open();
    let (done, rest) = until(&mut b, "ai_done").await;
    let seqs: Vec<u64> = rest
        .iter()
        .filter(|v| v["type"] == "ai_chunk")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (6..=30).collect::<Vec<_>>());
    seen.push_str(&chunks_text(&rest));
    assert_eq!(seen, words.concat(), "every chunk exactly once, in order");
    assert_eq!(done["cancelled"], Value::Null);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert!(
        reqs[0].client_closed.is_none(),
        "the grace period kept the upstream request"
    );
}

/// Step by step: one chunk, then the user is gone; after the grace period the
/// upstream request is dropped with nothing more sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_the_upstream_request_is_dropped() {
    let words: Vec<String> = (0..500).map(|i| format!("w{i} ")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let gate = Gate::new();
    let mut fake = Fake::start(vec![stepped(openai_events(&words, None), &gate)]).await;
    let server = start(chatbox::Config {
        llm_grace_secs: 1,
        ..with_models(vec![model("gpt", LlmProvider::Openai, &fake)])
    });
    let mut ws = connect_user(server.local_addr(), "gone").await;
    send(&mut ws, json!({"type": "user_message", "content": "talk"})).await;
    gate.release(1);
    until(&mut ws, "ai_chunk").await;
    drop(ws);
    fake.wait_closed(0).await;
    assert_eq!(fake.requests()[0].events_sent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_honouring_retry_after_then_succeeds() {
    let fake = Fake::start(vec![
        Reply::Status {
            code: 429,
            retry_after: Some(2),
            body: r#"{"error":{"message":"slow down"}}"#,
        },
        Reply::Status {
            code: 503,
            retry_after: None,
            body: "busy",
        },
        stream(openai_events(&["ok"], None), 1),
    ])
    .await;
    let server = start(with_models(vec![model("gpt", LlmProvider::Openai, &fake)]));
    let mut ws = connect_user(server.local_addr(), "retry").await;
    send(&mut ws, json!({"type": "user_message", "content": "hi"})).await;
    let (_, before) = until(&mut ws, "ai_done").await;
    assert_eq!(chunks_text(&before), "ok");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3, "one try and two retries, nothing more");
    assert!(reqs.iter().all(|r| !r.unscripted));
    assert!(
        reqs.iter().all(|r| r.body == reqs[0].body),
        "each retry asks the same"
    );
    // The upstream asked for 2 s: the retry waited at least that; the retry after
    // the 503 (no Retry-After) used the short backoff (at most 400 ms here).
    let first_wait = reqs[1].at - reqs[0].at;
    let second_wait = reqs[2].at - reqs[1].at;
    assert!(
        first_wait >= Duration::from_secs(2),
        "Retry-After: 2 honoured, waited {first_wait:?}"
    );
    assert!(
        second_wait < first_wait,
        "backoff without Retry-After is shorter: {second_wait:?} vs {first_wait:?}"
    );
    assert_eq!(llm_total(&server, |m| m.retries.get()), 2);
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_failure_is_llm_unavailable_and_the_fallback_model_is_tried() {
    let bad = Fake::start(vec![
        Reply::Status {
            code: 500,
            retry_after: None,
            body: "down"
        };
        2
    ])
    .await;
    let good = Fake::start(vec![stream(openai_events(&["from fallback"], None), 1)]).await;
    let mut primary = model("primary", LlmProvider::Openai, &bad);
    primary.max_retries = 1;
    primary.fallback = Some("backup".into());
    let server = start(with_models(vec![
        primary,
        model("backup", LlmProvider::Openai, &good),
    ]));
    let mut ws = connect_user(server.local_addr(), "fb").await;
    send(&mut ws, json!({"type": "user_message", "content": "hi"})).await;
    let (_, before) = until(&mut ws, "ai_done").await;
    assert_eq!(chunks_text(&before), "from fallback");
    let tried = bad.requests();
    assert_eq!(tried.len(), 2, "one try and one retry, no more");
    assert!(tried.iter().all(|r| r.body["model"] == "upstream-primary"));
    let used = good.requests();
    assert_eq!(used.len(), 1, "the fallback was asked once");
    assert_eq!(used[0].body["model"], "upstream-backup");
    assert!(!used[0].unscripted);

    // Without a fallback: one clean llm_unavailable, no ai_done.
    let bad = Fake::start(vec![Reply::Status {
        code: 500,
        retry_after: None,
        body: "down",
    }])
    .await;
    let mut only = model("only", LlmProvider::Openai, &bad);
    only.max_retries = 0;
    let server = start(with_models(vec![only]));
    let mut ws = connect_user(server.local_addr(), "nofb").await;
    send(
        &mut ws,
        json!({"type": "user_message", "id": "c1", "content": "hi"}),
    )
    .await;
    let (err, before) = until(&mut ws, "error").await;
    assert_eq!(err["code"], "llm_unavailable");
    assert_eq!(bad.requests().len(), 1, "max_retries 0: no retry");
    assert!(
        before
            .iter()
            .all(|v| v["type"] != "ai_chunk" && v["type"] != "ai_done"),
        "{before:?}"
    );
    assert_eq!(
        llm_total(&server, |m| m
            .error_count(chatbox::llm::ErrorKind::ServerError.index())),
        1
    );
    // The connection is fine.
    send(
        &mut ws,
        json!({"type": "resume", "session_id": session_of(&before)}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_skipped_and_counted() {
    let mut events = openai_events(&["a", "b"], None);
    events.insert(1, "data: {this is not json\n\n".into());
    events.insert(2, ": keep-alive comment\n\n".into());
    let fake = Fake::start(vec![stream(events, 1)]).await;
    let server = start(with_models(vec![model("gpt", LlmProvider::Openai, &fake)]));
    let mut ws = connect_user(server.local_addr(), "mal").await;
    send(&mut ws, json!({"type": "user_message", "content": "hi"})).await;
    let (_, before) = until(&mut ws, "ai_done").await;
    assert_eq!(chunks_text(&before), "ab");
    assert_eq!(llm_total(&server, |m| m.malformed_events.get()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_times_out_and_a_broken_one_keeps_its_partial_text() {
    // Stall before the first token: timeout, no chunk, llm_unavailable.
    let stall = Fake::start(vec![Reply::Stream {
        events: vec![],
        gap: Duration::ZERO,
        gate: None,
        then: End::Stall,
    }])
    .await;
    let mut m = model("stall", LlmProvider::Openai, &stall);
    m.first_token_timeout_ms = 300;
    m.max_retries = 0;
    let server = start(with_models(vec![m]));
    let mut ws = connect_user(server.local_addr(), "stall").await;
    send(&mut ws, json!({"type": "user_message", "content": "hi"})).await;
    let (err, _) = until(&mut ws, "error").await;
    assert_eq!(err["code"], "llm_unavailable");
    assert_eq!(
        llm_total(&server, |m| m
            .error_count(chatbox::llm::ErrorKind::Timeout.index())),
        1
    );

    // Disconnect mid-stream: what was said is kept (cancelled), then the error.
    let mut events = openai_events(&["half ", "an answer"], None);
    events.pop(); // no [DONE]: the connection just ends
    let broken = Fake::start(vec![stream(events, 1)]).await;
    let mut m = model("broken", LlmProvider::Openai, &broken);
    m.max_retries = 0;
    let server = start(with_models(vec![m]));
    let mut ws = connect_user(server.local_addr(), "broken").await;
    send(&mut ws, json!({"type": "user_message", "content": "hi"})).await;
    let (done, before) = until(&mut ws, "ai_done").await;
    assert_eq!(
        (done["cancelled"].as_bool(), chunks_text(&before).as_str()),
        (Some(true), "half an answer")
    );
    assert_eq!(recv(&mut ws).await["code"], "llm_unavailable");
    send(
        &mut ws,
        json!({"type": "resume", "session_id": session_of(&before)}),
    )
    .await;
    let s = recv(&mut ws).await;
    let last = s["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["content"].as_str(), last["cancelled"].as_bool()),
        (Some("half an answer"), Some(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_stream() {
    let sse = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let events = vec![
        sse(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        ),
        sse(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse("ping", json!({"type": "ping"})),
        sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Bonjour"}}),
        ),
        sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " !"}}),
        ),
        sse(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        sse(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}),
        ),
        sse("message_stop", json!({"type": "message_stop"})),
    ];
    let fake = Fake::start(vec![stream(events, 1)]).await;
    let server = start(with_models(vec![model(
        "claude",
        LlmProvider::Anthropic,
        &fake,
    )]));
    let mut ws = connect_user(server.local_addr(), "anth").await;
    send(&mut ws, json!({"type": "user_message", "content": "salut"})).await;
    let (done, before) = until(&mut ws, "ai_done").await;
    assert_eq!(chunks_text(&before), "Bonjour !");
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 12, "output_tokens": 4})
    );
    let req = &fake.requests()[0];
    assert!(
        req.headers.starts_with("post /v1/messages "),
        "{}",
        req.headers
    );
    assert!(
        req.headers.contains("x-api-key: test-key")
            && req.headers.contains("anthropic-version: 2023-06-01")
    );
    assert_eq!(req.body["system"], "Be brief.");
    assert_eq!(
        req.body["messages"],
        json!([{"role": "user", "content": "salut"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_id_picks_a_configured_model_and_unknown_ones_are_refused() {
    let a = Fake::start(vec![]).await;
    let b = Fake::start(vec![stream(openai_events(&["from b"], None), 1)]).await;
    let server = start(with_models(vec![
        model("a", LlmProvider::Openai, &a),
        model("b", LlmProvider::Openai, &b),
    ]));
    let mut ws = connect_user(server.local_addr(), "pick").await;
    send(
        &mut ws,
        json!({"type": "user_message", "id": "x", "content": "hi", "model_id": "nope"}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("invalid_message"), Some("x"))
    );
    assert!(e["message"].as_str().unwrap().contains("a, b"), "{e}");
    send(
        &mut ws,
        json!({"type": "user_message", "content": "hi", "model_id": "b"}),
    )
    .await;
    let (_, before) = until(&mut ws, "ai_done").await;
    assert_eq!(chunks_text(&before), "from b");
    assert!(
        a.requests().is_empty(),
        "the other model was not called: {:?}",
        a.requests()
    );
    let asked = b.requests();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].body["model"], "upstream-b");
}

#[test]
fn plain_http_endpoints_are_refused_unless_loopback() {
    let mut m = ModelConfig::new("remote", LlmProvider::Openai);
    m.base_url = Some("http://api.example.com/v1".into());
    let cfg = with_models(vec![m]);
    let e = chatbox::check_config(&cfg, false).unwrap_err().to_string();
    assert!(e.contains("must be https"), "{e}");
}

/// An upstream that never ends an event: the answer fails with the `too_large`
/// kind once `llm_event_bytes_max` is passed, and the upstream request is dropped,
/// instead of the buffer growing until a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_upstream_event_is_bounded() {
    let cases = [
        // One `data:` line that never ends.
        ("data: ", "x".repeat(1024)),
        // Endless `data:` lines of one event (never a blank line).
        ("", format!("data: {}\n", "y".repeat(100))),
    ];
    for (prefix, piece) in cases {
        let mut fake = Fake::start(vec![Reply::Endless {
            prefix: prefix.into(),
            piece,
        }])
        .await;
        let server = start(chatbox::Config {
            llm_event_bytes_max: 4096,
            ..with_models(vec![model("gpt", LlmProvider::Openai, &fake)])
        });
        let mut ws = connect_user(server.local_addr(), "endless").await;
        send(&mut ws, json!({"type": "user_message", "content": "hi"})).await;
        let (err, _) = until(&mut ws, "error").await;
        assert_eq!(err["code"], "llm_unavailable", "{prefix:?}");
        fake.wait_closed(0).await;
        assert_eq!(
            llm_total(&server, |m| m
                .error_count(chatbox::llm::ErrorKind::TooLarge.index())),
            1,
            "{prefix:?}"
        );
        assert_eq!(fake.requests().len(), 1, "too large is not retried");
        server.shutdown();
        stop(server).await;
    }
}
