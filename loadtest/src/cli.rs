//! The command line: clap's definitions of every subcommand and flag, and their
//! translation into the `Opts` the scenarios read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{NonEmptyStringValueParser, RangedU64ValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::Opts;

// Defaults shared by several subcommands, so each one is stated once.
const ADDR: &str = "127.0.0.1:8080";
const PREFIX: &str = "/chatbox";
const CONNECTIONS: usize = 1000;
const RATE: u64 = 2000;
const HOLD_SECS: u64 = 5;
const SIZES: &str = "2000,18000";
const SECS: u64 = 10;
const CHUNK_MS: u64 = 40;
const ADMINS: usize = 10;

/// A count that must be at least 1 (0 users, admins, rounds or cores is a mistake,
/// better named at once than run).
fn at_least_one() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::new().range(1..)
}

#[derive(Parser, Debug)]
#[command(
    name = "loadtest",
    version,
    about = "Load harness for chatbox: scenarios against one server, or `compare` \
             against chatbox and the tokio-tungstenite baseline in one run",
    long_about = None,
    after_help = "Every run is bounded in time (--deadline-secs) and stops by itself. \
                  stdout gets a table of the summary (compare: each metric for chatbox \
                  and the baseline, and their ratio); the summary as JSON goes to --out \
                  FILE, or to stdout instead of the table with --json. Progress (elapsed, \
                  work done, errors so far) goes to stderr once a second when stderr is \
                  a terminal, or always with --progress. A run that lost connections or \
                  messages exits with status 1.",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Every subcommand allows negative numbers, so `--secs -1` is reported as a bad
// value of --secs rather than as an unknown flag `-1`. The flags common to several
// subcommands (`Server`, `Harness`) come last in each, as their help headings hold
// for the flags after them.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// N connections ramped at R/s; each answers a ping after the ramp and after the hold
    Connect(ConnectArgs),
    /// Server RSS per idle connection: the slope between --sizes A,B (needs --pid)
    Idle(IdleArgs),
    /// Users send user_message and time each to its ack (closed loop, or --msg-rate)
    Chat(ChatArgs),
    /// --users workers connect, ping, close, repeatedly for --secs; the server must end at 0 open
    Churn(ChurnArgs),
    /// --users users ask and read whole streamed answers, again and again
    Stream(StreamArgs),
    /// --admins admins join --users users' sessions and write into them at --msg-rate
    Takeover(TakeoverArgs),
    /// Run --scenario against chatbox and the baseline, alternating, and print ratios
    Compare(CompareArgs),
    /// Print runs' ratios beside the recorded ones; fail on errors, losses, idle bytes > 2 KiB
    Check(CheckArgs),
}

/// `check`: judges run files (JSON written by --out) by the rules stable on a
/// shared machine, and prints their ratios beside the recorded figures.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The recorded figures (bench/recorded.toml)
    #[arg(long, value_name = "FILE")]
    pub recorded: PathBuf,
    /// Run summaries (JSON from --out) to check
    #[arg(long = "run", value_name = "FILE", num_args = 1.., required = true)]
    pub runs: Vec<PathBuf>,
}

/// The server a single-server scenario runs against: one node, or the nodes of a
/// cluster (users spread over them round-robin by user index).
#[derive(Args, Debug)]
#[command(next_help_heading = "Server")]
pub struct Server {
    /// The server's address; several nodes as a comma list (or the flag repeated):
    /// user i and its connections go to node i mod N
    #[arg(long, value_name = "HOST:PORT[,...]", default_value = ADDR, value_delimiter = ',')]
    addr: Vec<SocketAddr>,
    /// URL prefix of the server's routes
    #[arg(long, value_name = "PATH", default_value = PREFIX)]
    prefix: String,
    /// Index of this process's first user: user names, nodes and source addresses
    /// count from it, so several loadtest processes (each at most ~19,900
    /// connections) can load one cluster without sharing users
    #[arg(long, value_name = "N", default_value_t = 0)]
    first_user: usize,
    /// The server's JWT secret, to mint the clients' tokens with
    #[arg(
        long,
        env = "CHATBOX_JWT_SECRET",
        hide_env_values = true,
        value_parser = NonEmptyStringValueParser::new()
    )]
    secret: String,
}

/// The server processes whose cost a run reports (every scenario but `idle`, whose
/// --pid is required and measured its own way).
#[derive(Args, Debug)]
#[command(next_help_heading = "Server")]
pub struct Sample {
    /// Server process ids (comma list or repeated): their CPU time over the run and
    /// peak RSS are summed into the summary's `server` field, so a cluster's whole
    /// cost is counted
    #[arg(long = "pid", value_name = "PID[,...]", value_delimiter = ',')]
    pids: Vec<u32>,
}

/// How the harness itself runs; every subcommand has these.
#[derive(Args, Debug)]
#[command(next_help_heading = "Run")]
pub struct Harness {
    /// Source addresses to spread connections over: 127.0.0.2, .3, ...
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u8).range(1..=250))]
    sources: u8,
    /// Hard stop for the whole run, in seconds
    #[arg(long, value_name = "N", default_value_t = 600)]
    deadline_secs: u64,
    /// Write the summary as JSON to this file (stdout keeps the table)
    #[arg(long, value_name = "FILE")]
    out: Option<String>,
    /// Print the summary as JSON on stdout instead of the table
    #[arg(long)]
    json: bool,
    /// Progress on stderr once a second (elapsed, work done, errors so far) even
    /// when stderr is not a terminal (on a terminal it is always shown)
    #[arg(long)]
    progress: bool,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct ConnectArgs {
    /// Connections to open
    #[arg(long, value_name = "N", default_value_t = CONNECTIONS)]
    connections: usize,
    /// Distinct users the connections belong to [default: one per connection]
    #[arg(long, value_name = "N", value_parser = at_least_one())]
    users: Option<usize>,
    /// New connections per second
    #[arg(long, value_name = "N", default_value_t = RATE)]
    rate: u64,
    /// Seconds to hold the connections between the two pings
    #[arg(long, value_name = "N", default_value_t = HOLD_SECS)]
    hold_secs: u64,
    #[command(flatten)]
    server: Server,
    #[command(flatten)]
    sample: Sample,
    #[command(flatten)]
    harness: Harness,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct IdleArgs {
    /// The server's process id (its RSS is read from /proc); several (comma list
    /// or repeated) are summed
    #[arg(
        long = "pid",
        value_name = "PID[,...]",
        value_delimiter = ',',
        required = true
    )]
    pids: Vec<u32>,
    /// The two connection counts to measure RSS at, increasing
    #[arg(long, value_name = "A,B", default_value = SIZES, value_parser = parse_sizes)]
    sizes: Sizes,
    /// Distinct users the connections belong to [default: one per connection]
    #[arg(long, value_name = "N", value_parser = at_least_one())]
    users: Option<usize>,
    /// New connections per second
    #[arg(long, value_name = "N", default_value_t = RATE)]
    rate: u64,
    /// Seconds to let the server settle before each RSS reading
    #[arg(long, value_name = "N", default_value_t = HOLD_SECS)]
    hold_secs: u64,
    #[command(flatten)]
    server: Server,
    #[command(flatten)]
    harness: Harness,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct ChatArgs {
    /// Users, one connection each
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = at_least_one())]
    users: usize,
    /// Messages per second in all; 0 is a closed loop (one in flight per user)
    #[arg(long, value_name = "N", default_value_t = 0)]
    msg_rate: u64,
    /// Seconds to measure for
    #[arg(long, value_name = "N", default_value_t = SECS)]
    secs: u64,
    #[command(flatten)]
    server: Server,
    #[command(flatten)]
    sample: Sample,
    #[command(flatten)]
    harness: Harness,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct ChurnArgs {
    /// Workers, each opening and closing one connection after another
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = at_least_one())]
    users: usize,
    /// Seconds to churn for
    #[arg(long, value_name = "N", default_value_t = SECS)]
    secs: u64,
    #[command(flatten)]
    server: Server,
    #[command(flatten)]
    sample: Sample,
    #[command(flatten)]
    harness: Harness,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct StreamArgs {
    /// Users, one connection each
    #[arg(long, value_name = "N", default_value_t = CONNECTIONS, value_parser = at_least_one())]
    users: usize,
    /// New connections per second
    #[arg(long, value_name = "N", default_value_t = RATE)]
    rate: u64,
    /// Seconds to stream for
    #[arg(long, value_name = "N", default_value_t = SECS)]
    secs: u64,
    /// The server's pause between answer chunks (recorded in the summary)
    #[arg(long, value_name = "N", default_value_t = CHUNK_MS)]
    chunk_ms: u64,
    #[command(flatten)]
    server: Server,
    #[command(flatten)]
    sample: Sample,
    #[command(flatten)]
    harness: Harness,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct TakeoverArgs {
    /// Users, each with one session
    #[arg(long, value_name = "N", default_value_t = CONNECTIONS, value_parser = at_least_one())]
    users: usize,
    /// Admin connections, each joining its share of the sessions
    #[arg(long, value_name = "N", default_value_t = ADMINS, value_parser = at_least_one())]
    admins: usize,
    /// Admin messages per second in all; 0 means 1000
    #[arg(long, value_name = "N", default_value_t = 0)]
    msg_rate: u64,
    /// New connections per second
    #[arg(long, value_name = "N", default_value_t = RATE)]
    rate: u64,
    /// Seconds to write for
    #[arg(long, value_name = "N", default_value_t = SECS)]
    secs: u64,
    #[command(flatten)]
    server: Server,
    #[command(flatten)]
    sample: Sample,
    #[command(flatten)]
    harness: Harness,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct CompareArgs {
    /// The scenario to run against both servers
    #[arg(long, value_name = "NAME", value_enum, default_value_t = Scenario::Chat)]
    scenario: Scenario,
    /// Rounds, each running both servers (which goes first alternates)
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = at_least_one())]
    rounds: usize,
    /// Cores (threads) each server gets
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least_one())]
    server_cores: usize,
    /// chatbox stores in MongoDB (a fresh database) instead of SQLite
    #[arg(long, value_name = "URI")]
    mongo_uri: Option<String>,
    /// The chatbox binary [default: next to this one]
    #[arg(long, value_name = "PATH", visible_alias = "chatbox-bin")]
    chatbox: Option<PathBuf>,
    /// The baseline binary [default: baseline-server next to this one]
    #[arg(long, value_name = "PATH", visible_alias = "baseline-bin")]
    baseline: Option<PathBuf>,
    /// Pin (the default): each server, all its threads, on the first
    /// --server-cores CPUs this process may use, loadtest on the others (checked
    /// in /proc after each start and at the end of each run; unpinned, and said
    /// so, when no CPU is left for loadtest)
    #[arg(long, overrides_with = "no_pin")]
    pin: bool,
    /// Run servers and loadtest on any CPU
    #[arg(long, overrides_with = "pin")]
    no_pin: bool,
    /// JWT secret both servers get [default: a fresh one per run]
    #[arg(long, value_parser = NonEmptyStringValueParser::new())]
    secret: Option<String>,
    #[command(flatten)]
    load: CompareLoad,
    #[command(flatten)]
    harness: Harness,
}

/// The scenario flags `compare` passes on; each applies to the scenarios named.
#[derive(Args, Debug)]
#[command(next_help_heading = "Scenario")]
pub struct CompareLoad {
    /// connect: connections to open
    #[arg(long, value_name = "N", default_value_t = CONNECTIONS)]
    connections: usize,
    /// Users (churn: workers) [default: chat 100, churn 50, idle B of --sizes, else --connections]
    #[arg(long, value_name = "N", value_parser = at_least_one())]
    users: Option<usize>,
    /// connect, idle, stream, takeover: new connections per second
    #[arg(long, value_name = "N", default_value_t = RATE)]
    rate: u64,
    /// connect, idle: hold time in seconds
    #[arg(long, value_name = "N", default_value_t = HOLD_SECS)]
    hold_secs: u64,
    /// idle: the two connection counts, increasing
    #[arg(long, value_name = "A,B", default_value = SIZES, value_parser = parse_sizes)]
    sizes: Sizes,
    /// chat, takeover: messages per second in all (chat: 0 is a closed loop)
    #[arg(long, value_name = "N", default_value_t = 0)]
    msg_rate: u64,
    /// chat, churn, stream, takeover: seconds to measure for
    #[arg(long, value_name = "N", default_value_t = SECS)]
    secs: u64,
    /// stream: pause between answer chunks, set on both servers
    #[arg(long, value_name = "N", default_value_t = CHUNK_MS)]
    chunk_ms: u64,
    /// takeover: admin connections
    #[arg(long, value_name = "N", default_value_t = ADMINS, value_parser = at_least_one())]
    admins: usize,
}

/// What `compare --scenario` accepts: every single-server scenario.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Connect,
    Idle,
    Chat,
    Churn,
    Stream,
    Takeover,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Idle => "idle",
            Scenario::Chat => "chat",
            Scenario::Churn => "churn",
            Scenario::Stream => "stream",
            Scenario::Takeover => "takeover",
        }
    }
}

/// `--sizes A,B`: two connection counts, the second larger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes(usize, usize);

fn parse_sizes(s: &str) -> Result<Sizes, String> {
    let bad = || format!("takes two increasing counts, e.g. {SIZES}");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    let (a, b) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a >= b {
        return Err(bad());
    }
    Ok(Sizes(a, b))
}

/// Every option at its default; each subcommand then sets the ones it has.
fn defaults(scenario: &str, users: usize, h: Harness) -> Opts {
    Opts {
        // Only read by single-server scenarios, whose --addr replaces it; compare
        // puts each server's own address here.
        addrs: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
        prefix: PREFIX.into(),
        secret: String::new(),
        connections: CONNECTIONS,
        users,
        rate: RATE,
        hold: Duration::from_secs(HOLD_SECS),
        sizes: vec![2000, 18000],
        pids: Vec::new(),
        first_user: 0,
        msg_rate: 0,
        chunk_ms: CHUNK_MS,
        admins: ADMINS,
        mongo_uri: None,
        secs: SECS,
        sources: h.sources,
        scenario: scenario.into(),
        rounds: 2,
        server_cores: 1,
        chatbox_bin: None,
        baseline_bin: None,
        deadline: Duration::from_secs(h.deadline_secs),
        out: h.out,
        json: h.json,
        progress: crate::progress::wanted(h.progress),
        pin: true,
    }
}

impl Server {
    fn apply(self, o: &mut Opts) {
        o.addrs = self.addr;
        o.first_user = self.first_user;
        o.prefix = self.prefix;
        o.secret = self.secret;
    }
}

/// The users a scenario gets when `--users` is not given.
fn default_users(scenario: Scenario, connections: usize, sizes: Sizes) -> usize {
    match scenario {
        Scenario::Chat => 100,
        Scenario::Churn => 50,
        // One user per connection, so the per-user cap never refuses any.
        Scenario::Idle => sizes.1,
        _ => connections,
    }
}

impl Command {
    /// The subcommand's name (a scenario, or "compare") and the options it runs with.
    pub fn into_opts(self) -> (&'static str, Opts) {
        match self {
            Command::Connect(a) => ("connect", a.into_opts()),
            Command::Idle(a) => ("idle", a.into_opts()),
            Command::Chat(a) => ("chat", a.into_opts()),
            Command::Churn(a) => ("churn", a.into_opts()),
            Command::Stream(a) => ("stream", a.into_opts()),
            Command::Takeover(a) => ("takeover", a.into_opts()),
            Command::Compare(a) => ("compare", a.into_opts()),
            Command::Check(_) => unreachable!("main runs `check` before asking for options"),
        }
    }
}

impl ConnectArgs {
    fn into_opts(self) -> Opts {
        let users = self.users.unwrap_or(self.connections);
        let mut o = defaults("connect", users, self.harness);
        self.server.apply(&mut o);
        o.pids = self.sample.pids;
        o.connections = self.connections;
        o.rate = self.rate;
        o.hold = Duration::from_secs(self.hold_secs);
        o
    }
}

impl IdleArgs {
    fn into_opts(self) -> Opts {
        let users = self.users.unwrap_or(self.sizes.1);
        let mut o = defaults("idle", users, self.harness);
        self.server.apply(&mut o);
        o.pids = self.pids;
        o.sizes = vec![self.sizes.0, self.sizes.1];
        o.rate = self.rate;
        o.hold = Duration::from_secs(self.hold_secs);
        o
    }
}

impl ChatArgs {
    fn into_opts(self) -> Opts {
        let mut o = defaults("chat", self.users, self.harness);
        self.server.apply(&mut o);
        o.pids = self.sample.pids;
        o.msg_rate = self.msg_rate;
        o.secs = self.secs;
        o
    }
}

impl ChurnArgs {
    fn into_opts(self) -> Opts {
        let mut o = defaults("churn", self.users, self.harness);
        self.server.apply(&mut o);
        o.pids = self.sample.pids;
        o.secs = self.secs;
        o
    }
}

impl StreamArgs {
    fn into_opts(self) -> Opts {
        let mut o = defaults("stream", self.users, self.harness);
        self.server.apply(&mut o);
        o.pids = self.sample.pids;
        o.rate = self.rate;
        o.secs = self.secs;
        o.chunk_ms = self.chunk_ms;
        o
    }
}

impl TakeoverArgs {
    fn into_opts(self) -> Opts {
        let mut o = defaults("takeover", self.users, self.harness);
        self.server.apply(&mut o);
        o.pids = self.sample.pids;
        o.admins = self.admins;
        o.msg_rate = self.msg_rate;
        o.rate = self.rate;
        o.secs = self.secs;
        o
    }
}

impl CompareArgs {
    fn into_opts(self) -> Opts {
        let l = self.load;
        let users = l
            .users
            .unwrap_or_else(|| default_users(self.scenario, l.connections, l.sizes));
        let mut o = defaults(self.scenario.name(), users, self.harness);
        // The servers compare starts take whatever secret it hands them; a fresh one
        // per run (long enough for chatbox's minimum) when none is given.
        o.secret = self
            .secret
            .unwrap_or_else(|| format!("loadtest-secret-{}", std::process::id()).repeat(2));
        o.rounds = self.rounds;
        o.server_cores = self.server_cores;
        o.pin = !self.no_pin;
        o.mongo_uri = self.mongo_uri;
        o.chatbox_bin = self.chatbox;
        o.baseline_bin = self.baseline;
        o.connections = l.connections;
        o.rate = l.rate;
        o.hold = Duration::from_secs(l.hold_secs);
        o.sizes = vec![l.sizes.0, l.sizes.1];
        o.msg_rate = l.msg_rate;
        o.secs = l.secs;
        o.chunk_ms = l.chunk_ms;
        o.admins = l.admins;
        o
    }
}

#[cfg(test)]
mod tests;
