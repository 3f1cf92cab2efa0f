//! chatbox load harness. Scenario `connect`: ramp N authenticated WebSocket
//! connections at R per second from many 127.0.0.x source addresses, check that
//! every one answers a ping with a pong, hold them, ping again, and report.
//!
//! Every run is bounded in time (`--deadline-secs`) and stops by itself.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chatbox::auth::{mint, now_secs, Claims};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const USAGE: &str = "\
usage: loadtest connect --addr HOST:PORT --secret SECRET [options]

  --addr HOST:PORT       server address (default 127.0.0.1:8080)
  --prefix PATH          URL prefix (default /chatbox)
  --secret SECRET        the server's CHATBOX_JWT_SECRET, to mint user tokens
  --connections N        connections to open (default 1000)
  --users N              distinct users (default: one per connection)
  --rate N               new connections per second (default 2000)
  --hold-secs N          how long to hold them before the second ping (default 5)
  --sources N            source addresses 127.0.0.2 .. (default 8; ~28k ports each)
  --deadline-secs N      hard stop for the whole run (default 300)
  --out FILE             also write the summary as JSON
";

struct Opts {
    addr: SocketAddr,
    prefix: String,
    secret: String,
    connections: usize,
    users: usize,
    rate: u64,
    hold: Duration,
    sources: u8,
    deadline: Duration,
    out: Option<String>,
}

fn parse() -> anyhow::Result<Opts> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("connect") => {}
        _ => bail!("{USAGE}"),
    }
    let mut o = Opts {
        addr: "127.0.0.1:8080".parse()?,
        prefix: "/chatbox".into(),
        secret: String::new(),
        connections: 1000,
        users: 0,
        rate: 2000,
        hold: Duration::from_secs(5),
        sources: 8,
        deadline: Duration::from_secs(300),
        out: None,
    };
    while let Some(flag) = args.next() {
        let v = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => o.addr = v.parse()?,
            "--prefix" => o.prefix = v,
            "--secret" => o.secret = v,
            "--connections" => o.connections = v.parse()?,
            "--users" => o.users = v.parse()?,
            "--rate" => o.rate = v.parse()?,
            "--hold-secs" => o.hold = Duration::from_secs(v.parse()?),
            "--sources" => o.sources = v.parse()?,
            "--deadline-secs" => o.deadline = Duration::from_secs(v.parse()?),
            "--out" => o.out = Some(v),
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    if o.secret.is_empty() {
        bail!("--secret is required\n{USAGE}");
    }
    if o.users == 0 {
        o.users = o.connections;
    }
    o.sources = o.sources.clamp(1, 250);
    // This process holds one descriptor per connection; the machine allows 20,000.
    let limit = fd_limit();
    if o.connections + 64 > limit {
        bail!(
            "{} connections need more open files than this process may have ({limit}); \
             run several loadtest processes instead",
            o.connections
        );
    }
    Ok(o)
}

fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|x| x.starts_with("Max open files"))
                .and_then(|x| x.split_whitespace().nth(3).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(1024)
}

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    pongs_first: AtomicU64,
    pongs_second: AtomicU64,
    dropped: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match tokio::time::timeout(o.deadline, connect_scenario(&o)).await {
        Ok(r) => r,
        Err(_) => bail!("run exceeded --deadline-secs {}", o.deadline.as_secs()),
    }
}

async fn connect_scenario(o: &Opts) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let exp = now_secs() + 3600;
    let url = format!("ws://{}{}/ws", o.addr, o.prefix);
    let started = Instant::now();
    let (phase_tx, _) = tokio::sync::watch::channel(0u8);
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, bool)>();
    let mut tasks = Vec::with_capacity(o.connections);
    let interval = Duration::from_secs_f64(1.0 / o.rate.max(1) as f64);
    let mut tick = tokio::time::interval(interval);
    for i in 0..o.connections {
        tick.tick().await;
        let user = format!("load-{}", i % o.users);
        let token = mint(
            o.secret.as_bytes(),
            &Claims {
                sub: user,
                name: None,
                roles: vec![],
                exp,
            },
        );
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % o.sources as usize) as u8);
        let (url, addr, counts, lat_tx) = (url.clone(), o.addr, counts.clone(), lat_tx.clone());
        let mut phase = phase_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let ws = match open(&url, addr, source, &token).await {
                Ok(ws) => ws,
                Err(refused) => {
                    let c = if refused {
                        &counts.refused
                    } else {
                        &counts.failed
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let _ = lat_tx.send((t0.elapsed().as_micros() as u64, true));
            counts.connected.fetch_add(1, Ordering::Relaxed);
            let mut ws = ws;
            for round in 1..=2u8 {
                if !idle_until(&mut ws, &mut phase, round).await || !ping_pong(&mut ws).await {
                    counts.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let c = if round == 1 {
                    &counts.pongs_first
                } else {
                    &counts.pongs_second
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
            idle_until(&mut ws, &mut phase, 3).await;
            let _ = ws.close(None).await;
        }));
        if i % 1000 == 999 {
            eprintln!(
                "  {} connections opened ({:.1}s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    drop(lat_tx);
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    while let Some((us, _)) = lat_rx.recv().await {
        hist.record(us)?;
        if hist.len() as usize
            + (counts.refused.load(Ordering::Relaxed) + counts.failed.load(Ordering::Relaxed))
                as usize
            >= o.connections
        {
            break;
        }
    }
    let ramp = started.elapsed();
    eprintln!(
        "  ramp done: {} connected in {:.1}s; ping round 1",
        counts.connected.load(Ordering::Relaxed),
        ramp.as_secs_f64()
    );
    phase_tx.send_replace(1);
    wait_count(
        &counts.pongs_first,
        &counts,
        counts.connected.load(Ordering::Relaxed),
    )
    .await;
    eprintln!("  holding {}s", o.hold.as_secs());
    tokio::time::sleep(o.hold).await;
    phase_tx.send_replace(2);
    let alive = counts.connected.load(Ordering::Relaxed) - counts.dropped.load(Ordering::Relaxed);
    wait_count(&counts.pongs_second, &counts, alive).await;
    phase_tx.send_replace(3);
    for t in tasks {
        let _ = t.await;
    }
    let summary = serde_json::json!({
        "scenario": "connect",
        "connections": o.connections,
        "users": o.users,
        "connected": counts.connected.load(Ordering::Relaxed),
        "refused": counts.refused.load(Ordering::Relaxed),
        "failed": counts.failed.load(Ordering::Relaxed),
        "pongs_first_round": counts.pongs_first.load(Ordering::Relaxed),
        "pongs_after_hold": counts.pongs_second.load(Ordering::Relaxed),
        "dropped": counts.dropped.load(Ordering::Relaxed),
        "ramp_secs": ramp.as_secs_f64(),
        "hold_secs": o.hold.as_secs(),
        "handshake_us": {
            "p50": hist.value_at_quantile(0.5), "p99": hist.value_at_quantile(0.99),
            "p999": hist.value_at_quantile(0.999), "max": hist.max(),
        },
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &o.out {
        std::fs::write(path, summary.to_string()).with_context(|| format!("writing {path}"))?;
    }
    let ok = summary["connected"] == o.connections as u64
        && summary["pongs_after_hold"] == o.connections as u64;
    if !ok {
        bail!("not every connection stayed open and answered (see summary)");
    }
    Ok(())
}

/// Waits until `c` (or `c` plus drops) reaches `n`.
async fn wait_count(c: &AtomicU64, counts: &Counts, n: u64) {
    while c.load(Ordering::Relaxed) + counts.dropped.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens one connection; `Err(true)` when the server refused it with an HTTP status.
async fn open(url: &str, addr: SocketAddr, source: Ipv4Addr, token: &str) -> Result<Ws, bool> {
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
/// until the run reaches `phase`. False if the connection died meanwhile.
async fn idle_until(ws: &mut Ws, phase: &mut tokio::sync::watch::Receiver<u8>, at: u8) -> bool {
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

async fn ping_pong(ws: &mut Ws) -> bool {
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
