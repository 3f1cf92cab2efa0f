//! `hop`: the round trip of a frame the owner of a user answers without storage
//! (a `cancel` of a session that does not exist), one in flight per connection,
//! so that what is measured is the path and not a queue. Run against a node that
//! owns the users (no hop) and against another node of the same cluster (the edge
//! forwards each frame over the bus and the answer comes back the same way): the
//! difference is the cost of a cross-node hop, both ways.
//!
//!   hop --addr HOST:PORT --secret S --owner NODE --nodes A,B,C [--connections 20]
//!       [--rounds 500]
//!
//! `--owner` and `--nodes` pick user ids that NODE owns when the live nodes are
//! `--nodes` (the server's own rendezvous hash). Prints one JSON line.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context};
use chatbox::auth::{mint, now_secs, Claims};
use chatbox::runtime::bus::owner_among;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, env = "CHATBOX_JWT_SECRET")]
    secret: String,
    #[arg(long, default_value = "/chatbox")]
    prefix: String,
    /// The node that must own every user.
    #[arg(long)]
    owner: String,
    /// Every live node of the cluster, the owner included.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    #[arg(long, default_value_t = 20)]
    connections: usize,
    #[arg(long, default_value_t = 500)]
    rounds: usize,
}

/// `n` user ids that `owner` owns among `nodes`.
fn owned_users(owner: &str, nodes: &[String], n: usize) -> Vec<String> {
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    (0..)
        .map(|i| format!("hop-{i}"))
        .filter(|u| owner_among(&nodes, u) == Some(owner))
        .take(n)
        .collect()
}

async fn one(url: String, token: String, rounds: usize) -> anyhow::Result<Vec<u64>> {
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let frame = r#"{"type":"cancel","session_id":"s_none","id":"h"}"#;
    let mut rtts = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t0 = Instant::now();
        ws.send(Message::text(frame)).await?;
        loop {
            match ws.next().await.context("closed")?? {
                Message::Text(t) if t.contains("\"error\"") => break,
                Message::Text(t) => bail!("unexpected frame {t}"),
                Message::Close(c) => bail!("closed: {c:?}"),
                _ => continue,
            }
        }
        rtts.push(t0.elapsed().as_micros() as u64);
    }
    Ok(rtts)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let url = format!("ws://{}{}/ws", a.addr, a.prefix);
    let users = owned_users(&a.owner, &a.nodes, a.connections);
    let tasks: Vec<_> = users
        .iter()
        .map(|u| {
            let claims = Claims {
                sub: u.clone(),
                name: None,
                roles: vec![],
                exp: now_secs() + 3600,
            };
            let token = mint(a.secret.as_bytes(), &claims);
            tokio::spawn(one(url.clone(), token, a.rounds))
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_unstable();
    let q = |p: f64| all[((all.len() - 1) as f64 * p) as usize];
    println!(
        "{}",
        serde_json::json!({"addr": a.addr.to_string(), "owner": a.owner, "round_trips": all.len(),
            "rtt_us_p50": q(0.5), "rtt_us_p90": q(0.9), "rtt_us_p99": q(0.99)})
    );
    Ok(())
}
