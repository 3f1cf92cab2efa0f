//! A fake LLM provider on 127.0.0.1:0 speaking the real streaming formats
//! (OpenAI chat completions SSE, Anthropic messages SSE). It records EVERY request
//! it gets, scripted or not (an unscripted one is answered 500), so "retried
//! twice" and "the other model was not called" can fail; and a [`Gate`] lets a
//! test release a stream one event at a time instead of racing timed chunks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatbox::config::LlmProvider;
use chatbox::llm::{LlmSection, ModelConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{config, read_request, WAIT};

/// Releases a stepped stream's events: each event waits for one permit.
#[derive(Clone)]
pub struct Gate(Arc<tokio::sync::Semaphore>);

impl Default for Gate {
    fn default() -> Gate {
        Gate(Arc::new(tokio::sync::Semaphore::new(0)))
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }
    /// Lets `n` more events out.
    pub fn release(&self, n: usize) {
        self.0.add_permits(n);
    }
    /// Lets every remaining event out.
    pub fn open(&self) {
        self.0.add_permits(1 << 20);
    }
    async fn pass(&self) {
        self.0.acquire().await.expect("gate open").forget();
    }
}

/// How the fake answers one request.
#[derive(Clone)]
pub enum Reply {
    /// 200 text/event-stream: each event is written after `gap` (and, with a
    /// gate, only once the gate lets it out); then `then`.
    Stream {
        events: Vec<String>,
        gap: Duration,
        gate: Option<Gate>,
        then: End,
    },
    /// 200 text/event-stream, `prefix`, then `piece` written again and again
    /// until the client goes away (an upstream that never ends an event).
    Endless { prefix: String, piece: String },
    Status {
        code: u16,
        retry_after: Option<u64>,
        body: &'static str,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Close the connection after the last event.
    Close,
    /// Keep the connection open, sending nothing, until the client goes away.
    Stall,
}

/// What the fake saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub headers: String,
    pub body: Value,
    /// When the request arrived (complete).
    pub at: Instant,
    /// No scripted reply was left for it (answered 500).
    pub unscripted: bool,
    /// When the client closed the connection, if it did before we finished.
    pub client_closed: Option<Instant>,
    pub events_sent: usize,
    pub bytes_sent: usize,
}

pub struct Fake {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    closed: tokio::sync::mpsc::UnboundedReceiver<(usize, Instant)>,
    arrived: tokio::sync::mpsc::UnboundedReceiver<usize>,
}

impl Fake {
    pub async fn start(script: Vec<Reply>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let ctx = Ctx {
                    script: script.clone(),
                    seen: s.clone(),
                    closed: closed_tx.clone(),
                    arrived: arrived_tx.clone(),
                };
                tokio::spawn(serve(sock, ctx));
            }
        });
        Fake {
            addr,
            seen,
            closed,
            arrived,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits for the next request to arrive; returns its index.
    pub async fn wait_request(&mut self) -> usize {
        tokio::time::timeout(WAIT, self.arrived.recv())
            .await
            .expect("a request reached the fake in time")
            .unwrap()
    }

    /// Waits for the client to close request `n`'s connection.
    pub async fn wait_closed(&mut self, n: usize) -> Instant {
        loop {
            let (i, at) = tokio::time::timeout(WAIT, self.closed.recv())
                .await
                .expect("upstream closed in time")
                .unwrap();
            if i == n {
                return at;
            }
        }
    }
}

struct Ctx {
    script: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    closed: tokio::sync::mpsc::UnboundedSender<(usize, Instant)>,
    arrived: tokio::sync::mpsc::UnboundedSender<usize>,
}

async fn serve(sock: TcpStream, ctx: Ctx) {
    let (mut rd, wr) = sock.into_split();
    let Some((headers, body)) = read_request(&mut rd).await else {
        return;
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = ctx.script.lock().unwrap().pop_front();
    let index = {
        let mut s = ctx.seen.lock().unwrap();
        s.push(Seen {
            headers,
            body,
            at: Instant::now(),
            unscripted: reply.is_none(),
            client_closed: None,
            events_sent: 0,
            bytes_sent: 0,
        });
        s.len() - 1
    };
    let _ = ctx.arrived.send(index);
    let reply = reply.unwrap_or(Reply::Status {
        code: 500,
        retry_after: None,
        body: "unscripted request",
    });
    // Notice the client going away while we write.
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<Instant>();
    tokio::spawn(async move {
        let mut b = [0u8; 64];
        while let Ok(n) = rd.read(&mut b).await {
            if n == 0 {
                break;
            }
        }
        let _ = gone_tx.send(Instant::now());
    });
    let mut out = Out {
        wr,
        gone: gone_rx,
        ctx: &ctx,
        index,
    };
    let closed = match reply {
        Reply::Status {
            code,
            retry_after,
            body,
        } => out.status(code, retry_after, body).await,
        Reply::Endless { prefix, piece } => out.endless(&prefix, &piece).await,
        Reply::Stream {
            events,
            gap,
            gate,
            then,
        } => out.stream(events, gap, gate, then).await,
    };
    match closed {
        Some(at) => {
            ctx.seen.lock().unwrap()[index].client_closed = Some(at);
            let _ = ctx.closed.send((index, at));
        }
        None => {
            let _ = out.wr.shutdown().await;
        }
    }
}

const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";

/// The writing half of one request's connection; each reply returns when the
/// client closed it first, `None` when the reply was written in full.
struct Out<'a> {
    wr: tokio::net::tcp::OwnedWriteHalf,
    gone: tokio::sync::oneshot::Receiver<Instant>,
    ctx: &'a Ctx,
    index: usize,
}

impl Out<'_> {
    fn sent(&self, events: usize, bytes: usize) {
        let mut s = self.ctx.seen.lock().unwrap();
        s[self.index].events_sent += events;
        s[self.index].bytes_sent += bytes;
    }

    async fn status(&mut self, code: u16, retry_after: Option<u64>, body: &str) -> Option<Instant> {
        let extra = retry_after
            .map(|s| format!("Retry-After: {s}\r\n"))
            .unwrap_or_default();
        let resp = format!(
            "HTTP/1.1 {code} Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        );
        self.wr
            .write_all(resp.as_bytes())
            .await
            .err()
            .map(|_| Instant::now())
    }

    async fn endless(&mut self, prefix: &str, piece: &str) -> Option<Instant> {
        let head = format!("{SSE_HEAD}{prefix}");
        if self.wr.write_all(head.as_bytes()).await.is_err() {
            return Some(Instant::now());
        }
        loop {
            tokio::select! {
                at = &mut self.gone => return Some(at.unwrap_or_else(|_| Instant::now())),
                r = self.wr.write_all(piece.as_bytes()) => if r.is_err() {
                    return Some(Instant::now());
                }
            }
            self.sent(0, piece.len());
        }
    }

    async fn stream(
        &mut self,
        events: Vec<String>,
        gap: Duration,
        gate: Option<Gate>,
        then: End,
    ) -> Option<Instant> {
        if self.wr.write_all(SSE_HEAD.as_bytes()).await.is_err() {
            return Some(Instant::now());
        }
        for ev in events {
            let wait = async {
                if let Some(g) = &gate {
                    g.pass().await;
                }
                tokio::time::sleep(gap).await;
            };
            tokio::select! {
                at = &mut self.gone => return Some(at.unwrap_or_else(|_| Instant::now())),
                _ = wait => {}
            }
            if self.wr.write_all(ev.as_bytes()).await.is_err() {
                return Some(Instant::now());
            }
            self.sent(1, ev.len());
        }
        if then == End::Stall {
            return Some((&mut self.gone).await.unwrap_or_else(|_| Instant::now()));
        }
        None
    }
}

/// OpenAI chat-completion chunks for `words`, optional usage, then `[DONE]`.
pub fn openai_events(words: &[&str], usage: Option<(u64, u64)>) -> Vec<String> {
    let mut ev: Vec<String> = words
        .iter()
        .map(|w| format!("data: {}\n\n", json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]})))
        .collect();
    if let Some((p, c)) = usage {
        ev.push(format!("data: {}\n\n", json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})));
    }
    ev.push("data: [DONE]\n\n".into());
    ev
}

/// A stream of `events`, one every `gap_ms`, then the connection closes.
pub fn stream(events: Vec<String>, gap_ms: u64) -> Reply {
    Reply::Stream {
        events,
        gap: Duration::from_millis(gap_ms),
        gate: None,
        then: End::Close,
    }
}

/// A stream whose events go out only as `gate` releases them.
pub fn stepped(events: Vec<String>, gate: &Gate) -> Reply {
    Reply::Stream {
        events,
        gap: Duration::ZERO,
        gate: Some(gate.clone()),
        then: End::Close,
    }
}

/// A model `id` served by `fake`, upstream model name `upstream-{id}`.
pub fn model(id: &str, provider: LlmProvider, fake: &Fake) -> ModelConfig {
    let mut m = ModelConfig::new(id, provider);
    m.base_url = Some(fake.url());
    m.api_key = Some("test-key".into());
    m.model = Some(format!("upstream-{id}"));
    m
}

/// The test configuration with these models (the first is the default).
pub fn with_models(models: Vec<ModelConfig>) -> chatbox::Config {
    chatbox::Config {
        llm: LlmSection { models },
        llm_system_prompt: "Be brief.".into(),
        ..config()
    }
}

/// A server configuration whose only model is a stepped OpenAI-format fake
/// answering `words` once per request scripted: returns the config, the fake
/// and the gate that releases its events (one per word, then `[DONE]`).
pub async fn stepped_server(answers: &[&[&str]]) -> (chatbox::Config, Fake, Gate) {
    let gate = Gate::new();
    let script = answers
        .iter()
        .map(|words| stepped(openai_events(words, None), &gate))
        .collect();
    let fake = Fake::start(script).await;
    let cfg = with_models(vec![model("stepped", LlmProvider::Openai, &fake)]);
    (cfg, fake, gate)
}
