//! The real binary as a child process (start, signals, its log) and a fake
//! OpenAI-style model the test drives step by step: for the tests of shutdown,
//! crashes and cluster failures, which need a process to kill or pause.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::json;

use super::{data_dir, read_request, KEY, SECRET, WAIT};

pub fn chatbox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chatbox"));
    c.env_clear()
        .env("RUST_LOG", "info")
        .env("CHATBOX_DATA_DIR", data_dir())
        .stdin(Stdio::null());
    c
}

/// A fake OpenAI-style model driven step by step: it sends the next event of an
/// answer only when the test says so, whatever the request.
pub struct StepLlm {
    addr: std::net::SocketAddr,
    steps: tokio::sync::mpsc::UnboundedSender<Step>,
    requests: tokio::sync::mpsc::UnboundedReceiver<()>,
}

pub enum Step {
    Chunk(&'static str),
    Done,
}

impl StepLlm {
    pub async fn start() -> StepLlm {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (steps, rx) = tokio::sync::mpsc::unbounded_channel::<Step>();
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        let (seen, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                let (rx, seen) = (rx.clone(), seen.clone());
                tokio::spawn(async move {
                    let (mut rd, mut wr) = sock.into_split();
                    if read_request(&mut rd).await.is_none() {
                        return;
                    }
                    let _ = seen.send(());
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
                    if wr.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    // One answer at a time takes the steps; a client that goes
                    // away lets the next one have them.
                    let mut steps = rx.lock().await;
                    let mut b = [0u8; 64];
                    loop {
                        let step = tokio::select! {
                            s = steps.recv() => s,
                            _ = rd.read(&mut b) => return,
                        };
                        let event = match step {
                            Some(Step::Chunk(w)) => format!(
                                "data: {}\n\n",
                                json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]})
                            ),
                            Some(Step::Done) | None => "data: [DONE]\n\n".to_owned(),
                        };
                        let last = !event.contains("chunk");
                        if wr.write_all(event.as_bytes()).await.is_err() || last {
                            let _ = wr.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        StepLlm {
            addr,
            steps,
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn step(&self, s: Step) {
        self.steps.send(s).unwrap();
    }

    pub async fn request_seen(&mut self) {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("the model was asked in time")
            .unwrap();
    }

    /// The CHATBOX_* settings that make the binary use this model.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CHATBOX_LLM_PROVIDER", "openai".into()),
            ("CHATBOX_LLM_BASE_URL", self.url()),
            ("CHATBOX_LLM_API_KEY", "test-key".into()),
        ]
    }
}

/// The real binary, serving; its log lines (stderr) arrive on `log`.
pub struct Proc {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub log: std::sync::mpsc::Receiver<String>,
}

pub fn spawn_server(data: &std::path::Path, env: &[(&str, String)]) -> Proc {
    let mut cmd = chatbox();
    cmd.env("CHATBOX_DATA_DIR", data)
        .env("CHATBOX_LISTEN", "127.0.0.1:0")
        .env("CHATBOX_CORES", "2")
        .env("CHATBOX_JWT_SECRET", SECRET)
        .env("CHATBOX_ENCRYPTION_KEY", KEY);
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn_server_with(cmd)
}

/// Starts `cmd` (the binary, configured) and waits for its readiness line.
pub fn spawn_server_with(mut cmd: Command) -> Proc {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let (tx, log) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            eprintln!("[chatbox] {line}");
            let _ = tx.send(line);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("chatbox listening on http://") {
                let addr = rest
                    .trim_end_matches("/chatbox")
                    .parse::<std::net::SocketAddr>();
                let _ = addr_tx.send(addr.unwrap());
            }
        }
    });
    let addr = addr_rx.recv_timeout(WAIT).expect("the readiness line");
    Proc { child, addr, log }
}

impl Proc {
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Reads log lines until one contains `text`; returns every line read.
    pub fn log_until(&self, text: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self
                .log
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("no log line with {text:?}; got {seen:#?}"));
            let found = line.contains(text);
            seen.push(line);
            if found {
                return seen;
            }
        }
    }

    /// Waits for the process to exit; its exit code and the rest of its log.
    pub fn wait(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.log.iter().collect();
        (status.code(), rest.join("\n"))
    }
}

/// The log without its colours (the text format colours it even into a pipe).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
