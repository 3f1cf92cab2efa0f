//! Request ids an operator can follow: the trace id of a WebSocket upgrade's W3C
//! `traceparent` (or a new one) is the connection's id in the log lines of the
//! work each message starts (on the core and on the blocking pool), and travels
//! on to the model as `traceparent`.

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use chatbox::config::LlmProvider;
use common::fake_llm::*;
use common::*;
use serde_json::json;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE}-{PARENT}-01")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_traceparent_reaches_the_model() {
    let words = openai_events(&["hi"], Some((1, 1)));
    let fake = Fake::start(vec![stream(words.clone(), 1), stream(words, 1)]).await;
    let server = start(with_models(vec![model("gpt", LlmProvider::Openai, &fake)]));
    let mut ws = connect_traced(server.local_addr(), "traced", &traceparent()).await;
    for i in 0..2 {
        let msg = json!({"type": "user_message", "content": format!("question {i}")});
        send(&mut ws, msg).await;
        until(&mut ws, "ai_done").await;
    }
    let seen = fake.requests();
    let (a, b) = (
        traceparent_of(&seen[0].headers),
        traceparent_of(&seen[1].headers),
    );
    assert_eq!(
        (a.0.as_str(), b.0.as_str()),
        (TRACE, TRACE),
        "the client's trace"
    );
    // Each message is its own span of it, and neither is the client's span.
    assert!(a.1 != b.1 && a.1 != PARENT && b.1 != PARENT, "{a:?} {b:?}");
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_traceparent_a_connection_gets_a_trace_of_its_own() {
    let words = openai_events(&["hi"], None);
    let script = (0..4).map(|_| stream(words.clone(), 1)).collect();
    let fake = Fake::start(script).await;
    let server = start(with_models(vec![model("gpt", LlmProvider::Openai, &fake)]));
    let addr = server.local_addr();
    let uppercase = traceparent().to_uppercase();
    let zero = format!("00-{}-{PARENT}-01", "0".repeat(32));
    let mut traces = Vec::new();
    for header in [
        None,
        Some(uppercase),
        Some(zero),
        Some("garbage".to_owned()),
    ] {
        let mut ws = match &header {
            Some(h) => connect_traced(addr, "untraced", h).await,
            None => connect_user(addr, "untraced").await,
        };
        send(&mut ws, json!({"type": "user_message", "content": "hello"})).await;
        until(&mut ws, "ai_done").await;
        let n = traces.len();
        traces.push(traceparent_of(&fake.requests()[n].headers).0);
        close_and_wait(ws).await;
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), 4, "a new trace each: {traces:?}");
    assert!(!traces.iter().any(|t| t == TRACE || t.starts_with("0000")));
    server.shutdown();
    stop(server).await;
}

/// Log lines of this test binary, as the server (in this process) writes them.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_grep_for_the_trace_id_finds_a_failed_answer_on_the_core_and_the_pool() {
    let logs = captured();
    // Unscripted: the fake answers 500, and the model gives up at once.
    let fake = Fake::start(vec![]).await;
    let mut m = model("gpt", LlmProvider::Openai, &fake);
    m.max_retries = 0;
    let server = start(with_models(vec![m]));
    let mut ws = connect_traced(server.local_addr(), "unlucky", &traceparent()).await;
    send(&mut ws, json!({"type": "user_message", "content": "hello"})).await;
    let (err, _) = until(&mut ws, "error").await;
    assert_eq!(err["code"], "llm_unavailable");
    server.shutdown();
    stop(server).await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let mine: Vec<&str> = text.lines().filter(|l| l.contains(TRACE)).collect();
    // The provider task on the blocking pool, and the answer on the core.
    for what in ["LLM request failed", "answer failed"] {
        assert!(
            mine.iter()
                .any(|l| l.contains(what) && l.contains("user=unlucky")),
            "no {what:?} line with the trace id in:\n{text}"
        );
    }
}
