//! Helpers shared by the end-to-end tests: a real server on 127.0.0.1:0 with two
//! cores, tokens, a real WebSocket client (tokio-tungstenite) and raw HTTP.
#![allow(dead_code)]

pub mod cluster;
pub mod fake_llm;
pub mod images;
pub mod nats;
pub mod process;
pub mod stores;

use std::net::SocketAddr;
use std::time::Duration;

use chatbox::auth::{mint, now_secs, Claims};
use chatbox::{Config, Hooks, ServerHandle};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";
pub const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// Bounds every wait in a test so a bug fails the test instead of hanging CI.
pub const WAIT: Duration = Duration::from_secs(20);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A fresh data directory; kept after the test so a failure can be inspected.
pub fn data_dir() -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix("chatbox-test-")
        .tempdir()
        .unwrap()
        .keep()
}

pub fn config() -> Config {
    let (mongo_uri, mongo_database) = match mongo() {
        Some((uri, db)) => (Some(uri), db),
        None => (None, Config::default().mongo_database),
    };
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 2,
        jwt_secret: Some(SECRET.into()),
        encryption_key: Some(KEY.into()),
        data_dir: data_dir(),
        mongo_uri,
        mongo_database,
        demo_chunk_delay_ms: 1,
        echo_path: Some("/echo".into()),
        shutdown_timeout_secs: 10,
        ..Config::default()
    };
    stores::apply_mode(&mut cfg);
    cfg
}

/// The store a stopped server used (SQLite or MongoDB, as `cfg` says), to check
/// what it left behind.
pub fn open_store(
    cfg: &Config,
) -> (
    chatbox::pool::PoolRuntime,
    std::sync::Arc<dyn chatbox::store::Store>,
) {
    let (rt, pool) = chatbox::pool::PoolRuntime::start(1, 64).unwrap();
    let backend = chatbox::store::Backend::configured(cfg);
    let store = chatbox::store::open(cfg, backend, pool).unwrap();
    (rt, store)
}

/// With `CHATBOX_TEST_STORE=mongo`, end-to-end tests store in MongoDB at
/// `CHATBOX_TEST_MONGO_URI` (a fresh database per call) instead of SQLite; so
/// they do with `CHATBOX_TEST_FILE_STORE=gridfs` (files in GridFS there).
pub fn mongo() -> Option<(String, String)> {
    let gridfs = stores::file_store_mode().as_deref() == Some("gridfs");
    if std::env::var("CHATBOX_TEST_STORE").as_deref() != Ok("mongo") && !gridfs {
        return None;
    }
    let uri = std::env::var("CHATBOX_TEST_MONGO_URI")
        .expect("CHATBOX_TEST_STORE=mongo needs CHATBOX_TEST_MONGO_URI");
    Some((uri, format!("chatbox_e2e_{:016x}", rand::random::<u64>())))
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

pub fn start(config: Config) -> ServerHandle {
    start_with(config, Hooks::default())
}

pub fn start_with(config: Config, hooks: Hooks) -> ServerHandle {
    chatbox::check_config(&config, false).expect("test config is valid");
    chatbox::start(config, hooks).expect("server starts")
}

pub fn token(user: &str) -> String {
    token_with(user, &[], now_secs() + 3600)
}

pub fn token_with(user: &str, roles: &[&str], exp: u64) -> String {
    mint(
        SECRET.as_bytes(),
        &Claims {
            sub: user.into(),
            name: Some(format!("{user} name")),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            exp,
        },
    )
}

/// Opens a WebSocket at `{prefix}{path}` with an optional bearer token and Origin.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    origin: Option<&str>,
) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("ws://{addr}/chatbox{path}")
        .into_client_request()
        .unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake finished in time")?;
    Ok(ws)
}

pub async fn connect_user(addr: SocketAddr, user: &str) -> Ws {
    connect(addr, "/ws", Some(&token(user)), None)
        .await
        .expect("upgrade accepted")
}

/// `user`'s WebSocket whose upgrade carries this `traceparent` header.
pub async fn connect_traced(addr: SocketAddr, user: &str, traceparent: &str) -> Ws {
    let mut req = format!("ws://{addr}/chatbox/ws")
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert(
        "Authorization",
        format!("Bearer {}", token(user)).parse().unwrap(),
    );
    h.insert("traceparent", traceparent.parse().unwrap());
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake finished in time")
        .expect("upgrade accepted");
    ws
}

/// The `traceparent` header in a request head as `read_request` returns it
/// (lowercased), split into (trace id, parent id), checked for its format.
pub fn traceparent_of(headers: &str) -> (String, String) {
    let value = headers
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent in {headers}"));
    let parts: Vec<&str> = value.trim().split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!((parts[0], parts[3]), ("00", "01"), "{value}");
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(hex(parts[1], 32) && hex(parts[2], 16), "{value}");
    (parts[1].to_owned(), parts[2].to_owned())
}

/// The HTTP status and JSON error code of a refused upgrade.
pub fn refusal(err: tungstenite::Error) -> (u16, String) {
    match err {
        tungstenite::Error::Http(resp) => {
            let body = resp.body().clone().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON error body");
            (
                resp.status().as_u16(),
                v["error"]["code"].as_str().unwrap_or("").to_owned(),
            )
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

/// Next data or close message, skipping pings and pongs.
pub async fn next_msg(ws: &mut Ws) -> Option<Message> {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("message in time");
        match m {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return Some(m),
            Some(Err(_)) | None => return None,
        }
    }
}

pub async fn echo_roundtrip(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    match next_msg(ws).await {
        Some(Message::Text(t)) => assert_eq!(t.as_str(), text),
        other => panic!("expected echo of {text:?}, got {other:?}"),
    }
}

/// Reads until the server's close frame and returns its code.
pub async fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match next_msg(ws).await? {
            Message::Close(f) => return f.map(|f| f.code),
            _ => continue,
        }
    }
}

/// Closes from the client side and waits for the server's FIN, which the server
/// sends only after it has unregistered the connection.
pub async fn close_and_wait(ws: Ws) {
    let mut ws = ws;
    ws.close(None).await.ok();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    let mut tcp = match ws.into_inner() {
        MaybeTlsStream::Plain(s) => s,
        _ => unreachable!(),
    };
    let mut buf = [0u8; 256];
    while let Ok(Ok(n)) = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

/// A raw HTTP/1.1 exchange; returns status, headers (lower-cased) and body.
pub async fn http(addr: SocketAddr, raw_request: &str) -> (u16, String, String) {
    exchange(TcpStream::connect(addr).await.unwrap(), raw_request).await
}

/// A TCP connection from source address `src` (any of 127.0.0.0/8).
pub async fn tcp_from(addr: SocketAddr, src: std::net::IpAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    sock.connect(addr).await.unwrap()
}

/// An admin API call with `token`; returns the status and the JSON body.
pub async fn admin_call(addr: SocketAddr, method: &str, path: &str, token: &str) -> (u16, Value) {
    let stream = TcpStream::connect(addr).await.unwrap();
    admin_call_on(stream, method, path, token).await
}

/// [`admin_call`] over `stream` (one from a chosen source address, say).
pub async fn admin_call_on(
    stream: TcpStream,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, Value) {
    let req = format!(
        "{method} /chatbox/admin{path} HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    );
    let (status, _, body) = exchange(stream, &req).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Writes `raw_request` on `s` and reads the whole response.
pub async fn exchange(mut s: TcpStream, raw_request: &str) -> (u16, String, String) {
    s.write_all(raw_request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .ok();
    parse_response(&out)
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    )
    .await
}

pub fn parse_response(raw: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, head, body)
}

/// A chunked body's data. An unterminated body (no last, empty chunk) is a
/// response cut short: it comes back with `<TRUNCATED>` appended, which no JSON
/// parser accepts.
pub fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return out + "<TRUNCATED>";
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return out + "<TRUNCATED>";
        };
        if n == 0 {
            return out;
        }
        if after.len() < n + 2 {
            return out + "<TRUNCATED>";
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
}

pub fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON body: {body}"));
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// Sum of one metric over all cores.
pub fn total(handle: &ServerHandle, f: impl Fn(&chatbox::metrics::CoreMetrics) -> u64) -> u64 {
    handle.metrics().iter().map(f).sum()
}

/// Sum of one LLM counter over all cores and models.
pub fn llm_total(handle: &ServerHandle, f: impl Fn(&chatbox::metrics::LlmCounters) -> u64) -> u64 {
    handle.shared().app.llm.total(f)
}

/// Sends a JSON frame.
pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON frame (skipping pings).
pub async fn recv(ws: &mut Ws) -> Value {
    match next_msg(ws).await {
        Some(Message::Text(t)) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a JSON frame, got {other:?}"),
    }
}

/// Resumes `sid` on `ws`: the contents of its history's messages, of `role` only
/// when given.
pub async fn history_texts(ws: &mut Ws, sid: &str, role: Option<&str>) -> Vec<String> {
    send(ws, serde_json::json!({"type": "resume", "session_id": sid})).await;
    let (s, _) = until(ws, "session").await;
    s["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("a session frame with messages: {s}"))
        .iter()
        .filter(|m| role.is_none_or(|r| m["role"] == r))
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Reads frames until one of type `kind`; returns it and everything before it.
pub async fn until(ws: &mut Ws, kind: &str) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let v = recv(ws).await;
        if v["type"] == kind {
            return (v, before);
        }
        before.push(v);
    }
}

/// Reads one HTTP/1.1 request (head and Content-Length body) from a local fake
/// server's socket: (lower-cased head, body). `None` if the client went away.
pub async fn read_request(sock: &mut (impl AsyncRead + Unpin)) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((head, buf[head_end..head_end + len].to_vec()))
}

/// Graceful shutdown, waited for off the async runtime (join blocks).
pub async fn stop(server: ServerHandle) {
    tokio::task::spawn_blocking(move || server.join())
        .await
        .unwrap()
        .expect("clean shutdown");
}

/// `n` answered messages in a new session of `user`; returns the session id.
pub async fn conversation(addr: SocketAddr, user: &str, n: usize) -> String {
    let mut ws = connect_user(addr, user).await;
    let mut sid: Option<String> = None;
    for i in 0..n {
        let mut m = serde_json::json!({"type": "user_message", "content": format!("question {i} from {user}")});
        if let Some(s) = &sid {
            m["session_id"] = serde_json::json!(s);
        }
        send(&mut ws, m).await;
        if sid.is_none() {
            sid = until(&mut ws, "session").await.0["session_id"]
                .as_str()
                .map(str::to_owned);
        }
        until(&mut ws, "ai_done").await;
    }
    sid.unwrap()
}
