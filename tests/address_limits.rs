//! Per-client-address limits of the front door: connections held at once (those
//! still in their handshake included) and new connections per second, exact across
//! cores, with the client taken from `X-Forwarded-For` only behind a trusted proxy.

mod common;

use std::net::SocketAddr;

use chatbox::metrics::Refusal;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self};
use tokio_tungstenite::MaybeTlsStream;

/// Opens `/ws` as `user` from `src`, with an optional `X-Forwarded-For`.
async fn ws_from(
    addr: SocketAddr,
    src: &str,
    user: &str,
    forwarded_for: Option<&str>,
) -> Result<Ws, tungstenite::Error> {
    let tcp = tcp_from(addr, src.parse().unwrap()).await;
    let mut req = format!("ws://{addr}/chatbox/ws")
        .into_client_request()
        .unwrap();
    let headers = req.headers_mut();
    headers.insert(
        "Authorization",
        format!("Bearer {}", token(user)).parse().unwrap(),
    );
    if let Some(xff) = forwarded_for {
        headers.insert("X-Forwarded-For", xff.parse().unwrap());
    }
    let handshake = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp));
    let (ws, _) = tokio::time::timeout(WAIT, handshake)
        .await
        .expect("handshake finished in time")?;
    Ok(ws)
}

/// Status, JSON error code and `Retry-After` of a refused upgrade.
fn refused(r: Result<Ws, tungstenite::Error>) -> (u16, String, u64) {
    let Err(tungstenite::Error::Http(resp)) = r else {
        panic!(
            "expected an HTTP refusal, got {:?}",
            r.map(|_| "a WebSocket")
        );
    };
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let body = resp.body().clone().unwrap_or_default();
    let code = error_code(&String::from_utf8_lossy(&body));
    (resp.status().as_u16(), code, retry)
}

/// A plain GET from `src`: status, lower-cased head, body.
async fn get_from(addr: SocketAddr, src: &str, path: &str) -> (u16, String, String) {
    let stream = tcp_from(addr, src.parse().unwrap()).await;
    exchange(stream, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await
}

fn retry_after(head: &str) -> u64 {
    head.lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// With a limit of three on two cores, an address gets exactly three connections
/// every time, whichever cores accepted them and whichever cores their users live
/// on (a per-core share of the limit would refuse some rounds early); the fourth
/// is refused with 429 and `Retry-After`, other addresses are unaffected, and a
/// closed connection frees its slot at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_capped_exactly_across_cores() {
    let server = start(chatbox::Config {
        connections_per_address_max: 3,
        ..config()
    });
    let addr = server.local_addr();
    for round in 0..4 {
        let mut held = Vec::new();
        for i in 0..3 {
            let user = format!("r{round}-u{i}");
            held.push(
                ws_from(addr, "127.0.0.1", &user, None)
                    .await
                    .expect("within the limit"),
            );
        }
        let (status, code, retry) = refused(ws_from(addr, "127.0.0.1", "one-more", None).await);
        assert_eq!(
            (status, code.as_str()),
            (429, "too_many_connections"),
            "round {round}"
        );
        assert!(retry > 0, "Retry-After is a positive number of seconds");
        // Another address has its own allowance.
        let mut other = Vec::new();
        for i in 0..3 {
            other.push(
                ws_from(addr, "127.0.0.2", &format!("o{round}-{i}"), None)
                    .await
                    .unwrap(),
            );
        }
        // Closing one frees its slot for the next connection at once.
        close_and_wait(held.pop().unwrap()).await;
        held.push(
            ws_from(addr, "127.0.0.1", "again", None)
                .await
                .expect("slot freed"),
        );
        for ws in held.into_iter().chain(other) {
            close_and_wait(ws).await;
        }
    }
    assert_eq!(
        total(&server, |m| m.refused_count(Refusal::AddressConnections)),
        4
    );
    let (_, _, metrics) = get_from(addr, "127.0.0.9", "/chatbox/metrics").await;
    assert!(
        metrics.contains("chatbox_refused_total{reason=\"address_too_many_connections\"} 4"),
        "{metrics}"
    );
}

/// A connection that has not sent its request head yet holds its slot: with a
/// limit of one, an idle TCP connection keeps the same address from upgrading,
/// until it goes away. One core, so the two are counted in the order they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_in_its_handshake_counts() {
    let server = start(chatbox::Config {
        cores: 1,
        connections_per_address_max: 1,
        ..config()
    });
    let addr = server.local_addr();
    let mut idle = tcp_from(addr, "127.0.0.3".parse().unwrap()).await;
    let (status, code, _) = refused(ws_from(addr, "127.0.0.3", "waiting", None).await);
    assert_eq!((status, code.as_str()), (429, "too_many_connections"));
    ws_from(addr, "127.0.0.4", "elsewhere", None)
        .await
        .expect("another address");
    // The idle client leaves; the server closes its side after releasing the slot.
    idle.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, idle.read_to_end(&mut rest))
        .await
        .expect("server closes in time")
        .ok();
    ws_from(addr, "127.0.0.3", "waiting", None)
        .await
        .expect("slot freed");
}

/// New connections per second per address: a token bucket whose burst is the
/// rate. Over it, 429 `rate_limited` with a positive `Retry-After`, counted by
/// reason; another address still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_per_address_are_rate_limited() {
    let server = start(chatbox::Config {
        handshakes_per_address_per_second: 1,
        ..config()
    });
    let addr = server.local_addr();
    let (s, _, _) = get_from(addr, "127.0.0.5", "/chatbox/healthz").await;
    assert_eq!(s, 200, "the burst allows one");
    // One a second: unless each request took a second, one of these is refused.
    let mut refusal = None;
    for _ in 0..10 {
        let (s, head, body) = get_from(addr, "127.0.0.5", "/chatbox/healthz").await;
        if s == 429 {
            refusal = Some((head, body));
            break;
        }
    }
    let (head, body) = refusal.expect("refused within ten requests");
    assert_eq!(error_code(&body), "rate_limited");
    assert!(retry_after(&head) >= 1, "{head}");
    // Upgrades pay from the same bucket.
    let (status, code, retry) = refused(ws_from(addr, "127.0.0.5", "fast", None).await);
    assert_eq!(
        (status, code.as_str(), retry >= 1),
        (429, "rate_limited", true)
    );
    let (s, _, _) = get_from(addr, "127.0.0.6", "/chatbox/healthz").await;
    assert_eq!(s, 200, "another address has its own bucket");
    assert!(total(&server, |m| m.refused_count(Refusal::AddressRate)) >= 2);
    let (_, _, metrics) = get_from(addr, "127.0.0.7", "/chatbox/metrics").await;
    assert!(metrics.contains("chatbox_refused_total{reason=\"address_rate_limited\"}"));
}

/// Behind a trusted proxy the client is the right-most untrusted address of
/// `X-Forwarded-For` (entries further left are the client's own and may be
/// forged), and the proxy's own address is not limited. From a peer that is not
/// trusted, the header is ignored: every connection counts as the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_honoured_only_from_a_trusted_proxy() {
    let trusting = start(chatbox::Config {
        connections_per_address_max: 1,
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        ..config()
    });
    let addr = trusting.local_addr();
    let _a = ws_from(addr, "127.0.0.1", "a", Some("203.0.113.7"))
        .await
        .expect("first of .7");
    let forged = ws_from(addr, "127.0.0.1", "b", Some("198.51.100.1, 203.0.113.7")).await;
    let (status, code, _) = refused(forged);
    assert_eq!(
        (status, code.as_str()),
        (429, "too_many_connections"),
        "still .7"
    );
    let _c = ws_from(addr, "127.0.0.1", "c", Some("203.0.113.8"))
        .await
        .expect("another client");
    let _d = ws_from(addr, "127.0.0.1", "d", None)
        .await
        .expect("the proxy itself");

    let untrusting = start(chatbox::Config {
        connections_per_address_max: 1,
        ..config()
    });
    let addr = untrusting.local_addr();
    let _a = ws_from(addr, "127.0.0.1", "a", Some("203.0.113.7"))
        .await
        .expect("first");
    let spoofed = ws_from(addr, "127.0.0.1", "b", Some("203.0.113.8")).await;
    let (status, code, _) = refused(spoofed);
    assert_eq!(
        (status, code.as_str()),
        (429, "too_many_connections"),
        "the header of an untrusted peer changes nothing"
    );
}

/// Shutdown with a connection whose address's home core is not the core it lives
/// on: the home core stops first (it has nothing to drain), and the connection's
/// release then goes to a stopped core's queue. That once deadlocked the sending
/// core (the stopped core's orphaned task was woken, freed and re-locked the queue
/// from the sender's thread; see `AddrLimits::serve`); the server must stop in
/// time. The hang depended on how the stopped runtime was torn down and did not
/// recur on demand here, so this test keeps the scenario rather than proving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_when_a_release_goes_to_a_stopped_core() {
    use chatbox::runtime::addr::AddrKey;
    use chatbox::runtime::mesh::owner_core;
    let server = start(chatbox::Config {
        shutdown_timeout_secs: 5,
        ..config()
    });
    let addr = server.local_addr();
    // A source address homed on the core that does not own the user.
    let user = "homeless";
    let src = (10..60)
        .map(|i| format!("127.0.0.{i}"))
        .find(|s| AddrKey::of(s.parse().unwrap()).home(2) != owner_core(user, 2))
        .expect("some address is homed on the other core");
    let mut ws = ws_from(addr, &src, user, None).await.unwrap();
    server.shutdown();
    // Answered at once: the release then races the home core's exit.
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
    // Joined on a thread of its own: a deadlocked server fails the test instead
    // of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.join().is_ok());
    });
    let joined = tokio::task::spawn_blocking(move || rx.recv_timeout(WAIT))
        .await
        .unwrap();
    assert_eq!(joined, Ok(true), "the server stopped in time");
    drop(ws);
}
