//! `compare`: runs a scenario against chatbox and against the baseline server in
//! one invocation, alternating which goes first each round, and prints the ratios.
//! Both get the same cores, the same machine, the same minutes: ratios hold where
//! absolute numbers drift.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde_json::{json, Value};

use crate::Opts;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Chatbox,
    Baseline,
}

struct Server {
    child: Child,
    addr: SocketAddr,
    _data: Option<tempdir::TempDir>,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The baseline's pause between answer chunks. Only `stream` compares streaming;
/// elsewhere the baseline does not stream at all (plain echo, as the chat target is
/// stated), while chatbox keeps its default demo pace.
fn stream_pause(o: &Opts) -> u64 {
    match o.scenario.as_str() {
        "stream" => o.chunk_ms,
        _ => 0,
    }
}

/// Starts a server (on `cpus`, every thread, when given) and waits for its
/// readiness line.
fn spawn(target: Target, o: &Opts, cpus: Option<&[usize]>) -> anyhow::Result<Server> {
    let (mut cmd, data) = match target {
        Target::Chatbox => {
            let dir = std::env::temp_dir().join(format!(
                "chatbox-loadtest-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            let mut c = Command::new(o.chatbox_bin.clone().unwrap_or_else(|| sibling("chatbox")));
            c.env_clear()
                .env("CHATBOX_LISTEN", "127.0.0.1:0")
                .env("CHATBOX_CORES", o.server_cores.to_string())
                .env("CHATBOX_JWT_SECRET", &o.secret)
                .env("CHATBOX_ENCRYPTION_KEY", "5a".repeat(32))
                .env("CHATBOX_DATA_DIR", &dir)
                .env("CHATBOX_RATE_LIMIT_PER_MINUTE", "1000000")
                .env("CHATBOX_WS_FRAMES_PER_MINUTE_MAX", "1000000")
                // The harness measures the server, not its abuse limits: a run
                // with few --sources puts thousands of clients on one address.
                .env("CHATBOX_CONNECTIONS_PER_ADDRESS_MAX", "1000000")
                .env("CHATBOX_HANDSHAKES_PER_ADDRESS_PER_SECOND", "1000000")
                .env("RUST_LOG", "warn");
            if let Some(uri) = &o.mongo_uri {
                c.env("CHATBOX_MONGO_URI", uri).env(
                    "CHATBOX_MONGO_DATABASE",
                    format!("chatbox_loadtest_{}", rand_suffix()),
                );
            }
            if o.scenario == "stream" {
                c.env("CHATBOX_DEMO_CHUNK_DELAY_MS", o.chunk_ms.to_string());
            }
            (c, Some(tempdir::TempDir(dir)))
        }
        Target::Baseline => {
            let mut c = Command::new(
                o.baseline_bin
                    .clone()
                    .unwrap_or_else(|| sibling("baseline-server")),
            );
            c.args([
                "127.0.0.1:0",
                &o.secret,
                &o.server_cores.to_string(),
                &stream_pause(o).to_string(),
            ]);
            (c, None)
        }
    };
    if let Some(cpus) = cpus {
        crate::pin::pin_command(&mut cmd, cpus);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| match cpus {
            Some(c) => format!(
                "starting {target:?} ({}) on CPUs {}",
                cmd.get_program().to_string_lossy(),
                crate::pin::format_list(c)
            ),
            None => format!(
                "starting {target:?} ({})",
                cmd.get_program().to_string_lossy()
            ),
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .map(|a| a.trim_start_matches("http://").trim_end_matches("/chatbox"))
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{target:?} did not start: {line:?}"))?;
    Ok(Server {
        child,
        addr,
        _data: data,
    })
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The numbers compared for each scenario, and whether higher is better.
pub fn keys(scenario: &str) -> &'static [(&'static str, bool)] {
    match scenario {
        "idle" => &[("/bytes_per_connection", false)],
        "chat" => &[
            ("/acks_per_sec", true),
            ("/rtt_us/p50", false),
            ("/rtt_us/p99", false),
            ("/rtt_us/p999", false),
        ],
        "churn" => &[("/cycles_per_sec", true), ("/handshake_us/p99", false)],
        "stream" => &[
            ("/chunks_per_sec", true),
            ("/first_chunk_us/p50", false),
            ("/first_chunk_us/p99", false),
            ("/chunk_gap_us/p99", false),
        ],
        "takeover" => &[
            ("/messages_per_sec", true),
            ("/delivery_us/p50", false),
            ("/delivery_us/p99", false),
        ],
        _ => &[("/handshake_us/p50", false), ("/handshake_us/p99", false)],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The split of CPUs for this run (`--pin`, the default), with this process
/// already moved onto the client's CPUs; None when unpinned, with the reason
/// recorded in `record`.
fn pinning(o: &Opts) -> anyhow::Result<(Option<crate::pin::Plan>, Value)> {
    let allowed = crate::pin::allowed_cpus()?;
    let reason = if !o.pin {
        "--no-pin".to_owned()
    } else {
        match crate::pin::plan(&allowed, o.server_cores) {
            Ok(plan) => {
                crate::pin::pin_self(&plan.client)?;
                let threads = crate::pin::verify("self", &plan.client)?;
                eprintln!(
                    "pinned: servers on CPUs {}, loadtest ({threads} threads) on CPUs {}",
                    crate::pin::format_list(&plan.server),
                    crate::pin::format_list(&plan.client)
                );
                let record = json!({"pinned": true, "server_cpus": plan.server,
                    "client_cpus": plan.client, "cpus_available": allowed});
                return Ok((Some(plan), record));
            }
            Err(why) => {
                eprintln!("not pinned: {why}; running unpinned");
                why
            }
        }
    };
    let record = json!({"pinned": false, "reason": reason, "server_cpus": null,
        "client_cpus": null, "cpus_available": allowed});
    Ok((None, record))
}

/// Runs the scenario against one server; with a plan, checks the server's threads
/// are on its CPUs right after its start and again at the end of the run (threads
/// started lazily, such as storage threads, inherit the mask, and this proves it).
async fn run_one(
    target: Target,
    o: &Opts,
    plan: Option<&crate::pin::Plan>,
) -> anyhow::Result<(Value, Value)> {
    let cpus = plan.map(|p| p.server.as_slice());
    let mut server = spawn(target, o, cpus)?;
    let pid = server.child.id().to_string();
    let result = async {
        let at_start = cpus.map(|c| crate::pin::verify(&pid, c)).transpose()?;
        let mut so = o.clone();
        so.addrs = vec![server.addr];
        so.pids = vec![server.child.id()];
        let label = format!("{} {}", o.scenario, format!("{target:?}").to_lowercase());
        let _ticker = crate::progress::start(o.progress, label, o.scenario.clone());
        let summary = crate::run_scenario(&o.scenario, &so).await?;
        let at_end = cpus.map(|c| crate::pin::verify(&pid, c)).transpose()?;
        let affinity = json!({"cpus": cpus, "threads_checked_at_start": at_start,
            "threads_checked_at_end": at_end});
        anyhow::Ok((summary, affinity))
    }
    .await;
    let _ = server.child.kill();
    let _ = server.child.wait();
    result
}

pub async fn compare(o: &Opts) -> anyhow::Result<Value> {
    let (plan, pinning) = pinning(o)?;
    let mut runs: Vec<(Target, Value, Value)> = Vec::new();
    for round in 0..o.rounds {
        let order = if round % 2 == 0 {
            [Target::Chatbox, Target::Baseline]
        } else {
            [Target::Baseline, Target::Chatbox]
        };
        for target in order {
            eprintln!("round {} of {}: {target:?}", round + 1, o.rounds);
            let (summary, affinity) = run_one(target, o, plan.as_ref()).await?;
            runs.push((target, summary, affinity));
        }
    }
    let mut table = Vec::new();
    for &(key, higher_better) in keys(&o.scenario) {
        let pick = |t: Target| {
            median(
                runs.iter()
                    .filter(|(x, _, _)| *x == t)
                    .filter_map(|(_, v, _)| v.pointer(key)?.as_f64())
                    .collect(),
            )
        };
        let (c, b) = (pick(Target::Chatbox), pick(Target::Baseline));
        table.push(json!({"metric": key, "chatbox": c, "baseline": b, "ratio": c / b, "higher_is_better": higher_better}));
    }
    let runs: Vec<Value> = runs
        .into_iter()
        .map(|(t, v, a)| json!({"target": format!("{t:?}"), "summary": v, "affinity": a}))
        .collect();
    Ok(
        json!({"scenario": "compare", "compared": o.scenario, "rounds": o.rounds, "server_cores": o.server_cores, "pinning": pinning, "ratios": table, "runs": runs}),
    )
}
