//! chatbox load harness: scenarios against one server (or the nodes of a cluster,
//! users spread over them), or `compare` against
//! chatbox and the tokio-tungstenite baseline in one run. Every run is bounded in
//! time (`--deadline-secs`) and stops by itself; summaries are printed as a table
//! (JSON with `--json`) and written as JSON to `--out`. `check` judges such files.

mod check;
mod cli;
mod client;
mod cluster;
mod compare;
mod pin;
mod progress;
mod push;
mod report;
mod scenarios;
mod takeover;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::Value;

use cli::Cli;

/// The options a run reads: the command line with every default filled in (built
/// by `cli`; `compare` copies it per server with that server's address and pid).
#[derive(Clone)]
pub struct Opts {
    /// The nodes users are spread over (one for a single server; never empty).
    pub addrs: Vec<SocketAddr>,
    pub prefix: String,
    pub secret: String,
    pub connections: usize,
    pub users: usize,
    pub rate: u64,
    pub hold: Duration,
    pub sizes: Vec<usize>,
    /// Server processes whose RSS (`idle`) or CPU and RSS (others) are summed.
    pub pids: Vec<u32>,
    /// This process's first user index (`--first-user`): users are first_user + i.
    pub first_user: usize,
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
    /// `--json`: the summary as JSON on stdout instead of the table.
    pub json: bool,
    /// Progress lines on stderr once a second (`--progress`, or stderr a terminal).
    pub progress: bool,
    /// `compare`: pin servers and loadtest to disjoint CPUs (`--no-pin` clears it).
    pub pin: bool,
}

pub async fn run_scenario(name: &str, o: &Opts) -> anyhow::Result<Value> {
    match name {
        "connect" => scenarios::connect(o).await,
        "idle" => scenarios::idle(o).await,
        "chat" => scenarios::chat(o).await,
        "churn" => scenarios::churn(o).await,
        "stream" => push::stream(o).await,
        "takeover" => takeover::takeover(o).await,
        other => bail!("unknown scenario {other:?}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // clap prints help and --version on stdout (exit 0) and usage errors, naming
    // the flag at fault, on stderr (exit 2).
    let (cmd, o) = match Cli::parse().command {
        cli::Command::Check(c) => return check::run(&c.recorded, &c.runs),
        other => other.into_opts(),
    };
    let run = async {
        if cmd == "compare" {
            return compare::compare(&o).await;
        }
        let _ticker = progress::start(o.progress, cmd.to_owned(), cmd.to_owned());
        if cmd == "idle" || o.pids.is_empty() {
            run_scenario(cmd, &o).await
        } else {
            cluster::sampled(&o.pids, run_scenario(cmd, &o)).await
        }
    };
    let summary = tokio::time::timeout(o.deadline, run)
        .await
        .map_err(|_| anyhow::anyhow!("run exceeded --deadline-secs {}", o.deadline.as_secs()))??;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", report::render(&summary));
    }
    if let Some(path) = &o.out {
        std::fs::write(path, summary.to_string()).with_context(|| format!("writing {path}"))?;
    }
    // A scenario that lost connections or messages fails the run; for `compare`,
    // any run of either server does.
    for (_, run) in check::summaries(&summary) {
        let lost = check::losses(run);
        if !lost.is_empty() {
            bail!(
                "errors, refusals, dropped connections or lost messages: {}",
                lost.join("; ")
            );
        }
    }
    Ok(())
}
