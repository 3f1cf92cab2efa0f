//! chatbox load harness: scenarios against one server, or `compare` against
//! chatbox and the tokio-tungstenite baseline in one run. Every run is bounded in
//! time (`--deadline-secs`) and stops by itself; summaries are printed as JSON and
//! written to `--out`.

mod client;
mod compare;
mod push;
mod scenarios;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

const USAGE: &str = "\
usage: loadtest SCENARIO [options]

scenarios (against --addr):
  connect   N connections ramped at R/s; each answers a ping after the ramp and after the hold
  idle      server RSS per idle connection: slope between --sizes A,B (needs --pid)
  chat      users send user_message and time each to its ack (closed loop, or --msg-rate)
  churn     --users workers connect, ping, close, repeatedly for --secs; the server must end at 0 open
  stream    --users users ask and read whole streamed answers (paced at --chunk-ms), again and again
  takeover  --admins admins join --users users' sessions and write into them at --msg-rate
  compare   run --scenario against chatbox and the baseline, alternating, and print ratios

options:
  --addr HOST:PORT       server (default 127.0.0.1:8080)
  --prefix PATH          URL prefix (default /chatbox)
  --secret SECRET        the server's JWT secret (compare starts servers with it)
  --connections N        connect: connections (default 1000)
  --users N              chat: users, one connection each (default 100); connect: distinct users
  --rate N               new connections per second (default 2000)
  --hold-secs N          connect/idle: hold time (default 5)
  --sizes A,B            idle: the two connection counts (default 2000,18000)
  --pid PID              idle: the server's process id
  --msg-rate N           chat: messages per second in all; 0 = closed loop (default 0)
  --secs N               chat: measuring time (default 10)
  --sources N            source addresses 127.0.0.2.. (default 8)
  --chunk-ms N           stream: pause between answer chunks (compare sets it on both servers; default 40)
  --admins N             takeover: admin connections (default 10)
  --mongo-uri URI        compare: chatbox stores in MongoDB (a fresh database) instead of SQLite
  --scenario NAME        compare: connect | idle | chat | churn | stream | takeover (default chat)
  --rounds N             compare: rounds, each running both servers (default 2)
  --server-cores N       compare: cores (threads) each server gets (default 1)
  --chatbox PATH / --baseline PATH   compare: binaries (default: next to this one)
  --deadline-secs N      hard stop for the whole run (default 600)
  --out FILE             also write the summary JSON here
";

#[derive(Clone)]
pub struct Opts {
    pub addr: SocketAddr,
    pub prefix: String,
    pub secret: String,
    pub connections: usize,
    pub users: usize,
    pub rate: u64,
    pub hold: Duration,
    pub sizes: Vec<usize>,
    pub pid: Option<u32>,
    pub msg_rate: u64,
    pub chunk_ms: u64,
    pub admins: usize,
    pub mongo_uri: Option<String>,
    pub secs: u64,
    pub sources: u8,
    pub scenario: String,
    pub rounds: usize,
    pub server_cores: usize,
    pub chatbox_bin: Option<PathBuf>,
    pub baseline_bin: Option<PathBuf>,
    pub deadline: Duration,
    pub out: Option<String>,
}

fn parse() -> anyhow::Result<(String, Opts)> {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next().filter(|c| {
        [
            "connect", "idle", "chat", "churn", "stream", "takeover", "compare",
        ]
        .contains(&c.as_str())
    }) else {
        bail!("{USAGE}");
    };
    let mut o = Opts {
        addr: "127.0.0.1:8080".parse()?,
        prefix: "/chatbox".into(),
        secret: String::new(),
        connections: 1000,
        users: 0,
        rate: 2000,
        hold: Duration::from_secs(5),
        sizes: vec![2000, 18000],
        pid: None,
        msg_rate: 0,
        chunk_ms: 40,
        admins: 10,
        mongo_uri: None,
        secs: 10,
        sources: 8,
        scenario: "chat".into(),
        rounds: 2,
        server_cores: 1,
        chatbox_bin: None,
        baseline_bin: None,
        deadline: Duration::from_secs(600),
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
            "--sizes" => o.sizes = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--pid" => o.pid = Some(v.parse()?),
            "--msg-rate" => o.msg_rate = v.parse()?,
            "--chunk-ms" => o.chunk_ms = v.parse()?,
            "--admins" => o.admins = v.parse::<usize>()?.max(1),
            "--mongo-uri" => o.mongo_uri = Some(v),
            "--secs" => o.secs = v.parse()?,
            "--sources" => o.sources = v.parse::<u8>()?.clamp(1, 250),
            "--scenario" => o.scenario = v,
            "--rounds" => o.rounds = v.parse::<usize>()?.max(1),
            "--server-cores" => o.server_cores = v.parse::<usize>()?.max(1),
            "--chatbox" => o.chatbox_bin = Some(v.into()),
            "--baseline" => o.baseline_bin = Some(v.into()),
            "--deadline-secs" => o.deadline = Duration::from_secs(v.parse()?),
            "--out" => o.out = Some(v),
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    if o.secret.is_empty() {
        if cmd != "compare" {
            bail!("--secret is required\n{USAGE}");
        }
        o.secret = format!("loadtest-secret-{}", std::process::id()).repeat(2);
    }
    if o.users == 0 {
        // The scenario that will run: the command itself, or compare's --scenario.
        let scenario = if cmd == "compare" {
            o.scenario.as_str()
        } else {
            cmd.as_str()
        };
        o.users = match scenario {
            "chat" => 100,
            "churn" => 50,
            // One user per connection, so the per-user cap never refuses any.
            "idle" => o.sizes.get(1).copied().unwrap_or(o.connections),
            _ => o.connections,
        };
    }
    if o.sizes.len() != 2 || o.sizes[0] >= o.sizes[1] {
        bail!("--sizes takes two increasing counts, e.g. 2000,18000");
    }
    Ok((cmd, o))
}

pub async fn run_scenario(name: &str, o: &Opts) -> anyhow::Result<Value> {
    match name {
        "connect" => scenarios::connect(o).await,
        "idle" => scenarios::idle(o).await,
        "chat" => scenarios::chat(o).await,
        "churn" => scenarios::churn(o).await,
        "stream" => push::stream(o).await,
        "takeover" => push::takeover(o).await,
        other => bail!("unknown scenario {other:?}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (cmd, o) = match parse() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let run = async {
        if cmd == "compare" {
            compare::compare(&o).await
        } else {
            run_scenario(&cmd, &o).await
        }
    };
    let summary = tokio::time::timeout(o.deadline, run)
        .await
        .map_err(|_| anyhow::anyhow!("run exceeded --deadline-secs {}", o.deadline.as_secs()))??;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &o.out {
        std::fs::write(path, summary.to_string()).with_context(|| format!("writing {path}"))?;
    }
    // A scenario that lost connections or messages fails the run; for `compare`,
    // any run of either server does.
    let runs: Vec<&Value> = match summary["runs"].as_array() {
        Some(runs) => runs.iter().map(|r| &r["summary"]).collect(),
        None => vec![&summary],
    };
    for run in runs {
        check(run)?;
    }
    Ok(())
}

/// Fails on errors, refusals, dropped connections or connections left open.
fn check(summary: &Value) -> anyhow::Result<()> {
    let lost = |k: &str| summary.get(k).and_then(Value::as_u64).unwrap_or(0);
    if lost("dropped") + lost("failed") + lost("refused") + lost("errors") + lost("lost") > 0 {
        bail!("errors, refusals, dropped connections or lost messages (see summary)");
    }
    if summary["open_after"].as_u64().is_some_and(|n| n > 0) {
        bail!("the server still counts open connections after the storm");
    }
    if summary["scenario"] == "connect" && summary["pongs_after_hold"] != summary["connections"] {
        bail!("not every connection stayed open and answered");
    }
    Ok(())
}
