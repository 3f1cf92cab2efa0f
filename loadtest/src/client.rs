//! One load-test client connection: open (from a chosen source address), ping,
//! hold, and the process limits that bound how many there can be.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use chatbox::auth::{mint, now_secs, Claims};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A token for `user`, valid for an hour.
pub fn token(secret: &str, user: &str) -> String {
    mint(
        secret.as_bytes(),
        &Claims {
            sub: user.into(),
            name: None,
            roles: vec![],
            exp: now_secs() + 3600,
        },
    )
}

/// An admin's token (role `admin`), valid for an hour.
pub fn admin_token(secret: &str, admin: &str) -> String {
    mint(
        secret.as_bytes(),
        &Claims {
            sub: admin.into(),
            name: None,
            roles: vec!["admin".into()],
            exp: now_secs() + 3600,
        },
    )
}

/// The i-th source address: 127.0.0.2, .3, ... (about 28k ports each).
pub fn source(i: usize, sources: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % sources.max(1) as usize) as u8)
}

/// Open-files limit of this process (the machine allows 20,000).
pub fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|x| x.starts_with("Max open files"))
                .and_then(|x| x.split_whitespace().nth(3).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(1024)
}

/// Fails early, with a clear message, when `connections` cannot fit in this process.
pub fn check_fd_budget(connections: usize) -> anyhow::Result<()> {
    let limit = fd_limit();
    if connections + 64 > limit {
        anyhow::bail!(
            "{connections} connections need more open files than this process may have ({limit}); \
             run several loadtest processes instead"
        );
    }
    Ok(())
}

/// Opens one connection; `Err(true)` when the server refused it with an HTTP status.
pub async fn open(url: &str, addr: SocketAddr, source: Ipv4Addr, token: &str) -> Result<Ws, bool> {
    let sock = TcpSocket::new_v4().map_err(|_| false)?;
    sock.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
        .map_err(|_| false)?;
    let tcp = sock.connect(addr).await.map_err(|_| false)?;
    let _ = tcp.set_nodelay(true);
    let mut req = url.into_client_request().map_err(|_| false)?;
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().map_err(|_| false)?,
    );
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(_)) => Err(true),
        Err(_) => Err(false),
    }
}

/// Holds the connection (reading, so the server's keep-alive pings are answered)
/// until the run reaches `at`. False if the connection died meanwhile.
pub async fn idle_until(ws: &mut Ws, phase: &mut tokio::sync::watch::Receiver<u8>, at: u8) -> bool {
    loop {
        tokio::select! {
            r = phase.wait_for(|p| *p >= at) => return r.is_ok(),
            m = ws.next() => match m {
                Some(Ok(_)) => {}
                _ => return false,
            },
        }
    }
}

/// Sends a ping and waits for its pong.
pub async fn ping_pong(ws: &mut Ws) -> bool {
    if ws.send(Message::Ping(b"lt".to_vec().into())).await.is_err() {
        return false;
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) if p.as_ref() == b"lt" => return true,
            Ok(Some(Ok(_))) => continue,
            _ => return false,
        }
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
