//! Tests of the command line: every invocation the repository documents or runs
//! still parses to the options it meant, and errors name the flag at fault.

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

use super::Cli;
use crate::Opts;

/// Parses a command line written as in a shell (words split on spaces).
fn parse(line: &str) -> Result<(&'static str, Opts), clap::Error> {
    let cli = Cli::try_parse_from(line.split_whitespace())?;
    Ok(cli.command.into_opts())
}

fn ok(line: &str) -> (&'static str, Opts) {
    match parse(line) {
        Ok(x) => x,
        Err(e) => panic!("{line}\n{e}"),
    }
}

fn err(line: &str) -> clap::Error {
    match parse(line) {
        Ok(_) => panic!("{line} parsed, but should not"),
        Err(e) => e,
    }
}

#[test]
fn definitions_are_consistent() {
    Cli::command().debug_assert();
}

/// `.ci/run`'s load steps, with its shell variables filled in.
#[test]
fn ci_invocations_parse() {
    let (cmd, o) = ok("loadtest connect --addr 127.0.0.1:40123 --secret 0123abcd \
         --connections 2000 --rate 2000 --hold-secs 2 --deadline-secs 240 --out /tmp/a/load-connect.json");
    assert_eq!(cmd, "connect");
    assert_eq!(o.addrs, ["127.0.0.1:40123".parse().unwrap()]);
    assert_eq!(
        (o.secret.as_str(), o.connections, o.rate),
        ("0123abcd", 2000, 2000)
    );
    assert_eq!((o.hold.as_secs(), o.deadline.as_secs()), (2, 240));
    assert_eq!(o.out.as_deref(), Some("/tmp/a/load-connect.json"));
    assert_eq!(o.users, 2000, "connect: one user per connection by default");

    let (cmd, o) = ok(
        "loadtest compare --scenario chat --users 50 --secs 3 --rounds 1 \
         --deadline-secs 240 --out /tmp/a/compare-chat.json",
    );
    assert_eq!((cmd, o.scenario.as_str()), ("compare", "chat"));
    assert_eq!(
        (o.users, o.secs, o.rounds, o.deadline.as_secs()),
        (50, 3, 1, 240)
    );
    assert_eq!(o.out.as_deref(), Some("/tmp/a/compare-chat.json"));

    let (_, o) = ok(
        "loadtest compare --scenario idle --sizes 500,2000 --rounds 1 \
         --hold-secs 1 --deadline-secs 240 --out /tmp/a/compare-idle.json",
    );
    assert_eq!(
        (o.scenario.as_str(), o.sizes.clone()),
        ("idle", vec![500, 2000])
    );
    assert_eq!((o.users, o.hold.as_secs(), o.rounds), (2000, 1, 1));

    let (_, o) = ok(
        "loadtest compare --scenario churn --users 20 --secs 2 --rounds 1 \
         --deadline-secs 240 --out /tmp/a/compare-churn.json",
    );
    assert_eq!((o.scenario.as_str(), o.users, o.secs), ("churn", 20, 2));

    let (_, o) = ok(
        "loadtest compare --scenario stream --users 200 --secs 2 --rounds 1 \
         --deadline-secs 240 --out /tmp/a/compare-stream.json",
    );
    assert_eq!(
        (o.scenario.as_str(), o.users, o.chunk_ms),
        ("stream", 200, 40)
    );

    let (_, o) = ok(
        "loadtest compare --scenario takeover --users 200 --admins 4 \
         --msg-rate 500 --secs 2 --rounds 1 --deadline-secs 240 --out /tmp/a/compare-takeover.json",
    );
    assert_eq!(
        (o.scenario.as_str(), o.users, o.admins),
        ("takeover", 200, 4)
    );
    assert_eq!((o.msg_rate, o.secs, o.rounds), (500, 2, 1));
}

/// The commands in PERF.md (its `...` filled with the flags a run against one
/// server needs).
#[test]
fn perf_md_invocations_parse() {
    let (cmd, o) = ok("loadtest connect --addr 127.0.0.1:19002 --secret s3cret \
         --connections 10000 --rate 5000 --hold-secs 10");
    assert_eq!(cmd, "connect");
    assert_eq!((o.connections, o.rate, o.hold.as_secs()), (10000, 5000, 10));

    let chat = "loadtest compare --scenario chat --users 100 --secs 5 --rounds 2 --server-cores 1";
    let (_, o) = ok(chat);
    assert_eq!((o.users, o.secs, o.rounds, o.server_cores), (100, 5, 2, 1));
    assert_eq!(o.mongo_uri, None);
    let (_, o) = ok(&format!("{chat} --mongo-uri mongodb://127.0.0.1:27017"));
    assert_eq!(o.mongo_uri.as_deref(), Some("mongodb://127.0.0.1:27017"));

    let (_, o) =
        ok("loadtest compare --scenario stream --users 1000 --secs 5 --rounds 2 --server-cores 1");
    assert_eq!((o.scenario.as_str(), o.users), ("stream", 1000));

    let (_, o) = ok(
        "loadtest compare --scenario takeover --users 1000 --admins 10 --msg-rate 2000 \
         --secs 5 --rounds 2 --server-cores 1",
    );
    assert_eq!((o.users, o.admins, o.msg_rate), (1000, 10, 2000));

    let (cmd, o) = ok("loadtest takeover --addr 127.0.0.1:19002 --secret s3cret --secs 10");
    assert_eq!((cmd, o.secs, o.users, o.admins), ("takeover", 10, 1000, 10));

    let (_, o) = ok(
        "loadtest compare --scenario idle --sizes 2000,18000 --rate 5000 --hold-secs 2 \
         --rounds 2 --server-cores 1",
    );
    assert_eq!(
        (o.sizes.clone(), o.rate, o.hold.as_secs()),
        (vec![2000, 18000], 5000, 2)
    );

    let (_, o) =
        ok("loadtest compare --scenario churn --users 50 --secs 5 --rounds 2 --server-cores 1");
    assert_eq!((o.scenario.as_str(), o.users, o.secs), ("churn", 50, 5));

    // "Several nodes": bench/cluster.sh adds --addr, --pid, --deadline-secs, --out.
    let nodes = "--addr 127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003 --pid 11,12,13 \
                 --deadline-secs 900 --out /tmp/o/cluster-chat-1.json --secret s";
    let (cmd, o) = ok(&format!("loadtest chat --users 3000 --secs 10 {nodes}"));
    assert_eq!(
        (cmd, o.users, o.nodes(), o.pids.len()),
        ("chat", 3000, 3, 3)
    );
    let (cmd, o) = ok(&format!(
        "loadtest takeover --users 3000 --admins 30 --msg-rate 2000 --secs 10 {nodes}"
    ));
    assert_eq!(
        (cmd, o.admins, o.msg_rate, o.nodes()),
        ("takeover", 30, 2000, 3)
    );
    let (cmd, o) = ok(&format!(
        "loadtest connect --connections 19000 --rate 3000 --hold-secs 30 {nodes} \
         --first-user 2000000"
    ));
    assert_eq!(
        (cmd, o.connections, o.first_user),
        ("connect", 19000, 2_000_000)
    );
    assert_eq!(ok("loadtest chat --secret s").1.first_user, 0);
}

#[test]
fn readme_invocations_parse() {
    for line in [
        "loadtest compare --scenario chat --users 100 --secs 5",
        "loadtest compare --scenario idle --sizes 2000,18000",
        "loadtest compare --scenario stream --users 1000 --secs 5",
        "loadtest compare --scenario takeover --users 1000 --admins 10 --msg-rate 2000",
    ] {
        assert_eq!(ok(line).0, "compare");
    }
}

/// The defaults are the ones the hand-written parser had.
#[test]
fn defaults_are_unchanged() {
    let (_, o) = ok("loadtest chat --secret s");
    assert_eq!(o.addrs, ["127.0.0.1:8080".parse().unwrap()]);
    assert!(o.pids.is_empty(), "no server sampled unless asked");
    assert_eq!(o.prefix, "/chatbox");
    assert_eq!((o.users, o.msg_rate, o.secs), (100, 0, 10));
    assert_eq!(
        (o.sources, o.deadline.as_secs(), o.out.clone()),
        (8, 600, None)
    );

    let (_, o) = ok("loadtest connect --secret s");
    assert_eq!(
        (o.connections, o.users, o.rate, o.hold.as_secs()),
        (1000, 1000, 2000, 5)
    );
    let (_, o) = ok("loadtest idle --secret s --pid 1");
    assert_eq!(
        (o.sizes.clone(), o.users, o.pids.clone()),
        (vec![2000, 18000], 18000, vec![1])
    );
    assert_eq!(ok("loadtest churn --secret s").1.users, 50);
    let (_, o) = ok("loadtest stream --secret s");
    assert_eq!((o.users, o.chunk_ms, o.rate), (1000, 40, 2000));
    let (_, o) = ok("loadtest takeover --secret s");
    assert_eq!((o.users, o.admins, o.msg_rate), (1000, 10, 0));

    let (_, o) = ok("loadtest compare");
    assert_eq!(
        (o.scenario.as_str(), o.users, o.rounds, o.server_cores),
        ("chat", 100, 2, 1)
    );
    assert!(
        o.secret.len() >= 32,
        "compare makes up a long enough secret"
    );
    assert_eq!(
        (o.chatbox_bin.clone(), o.baseline_bin.clone()),
        (None, None)
    );
    assert_eq!(ok("loadtest compare --scenario idle").1.users, 18000);
    assert_eq!(ok("loadtest compare --scenario churn").1.users, 50);
    assert_eq!(
        ok("loadtest compare --scenario stream --connections 300")
            .1
            .users,
        300
    );
}

#[test]
fn a_bad_value_names_its_flag() {
    for (line, flag) in [
        ("loadtest chat --secret s --users abc", "--users"),
        ("loadtest compare --users abc", "--users"),
        ("loadtest compare --users 0", "--users"),
        ("loadtest connect --secret s --addr nowhere", "--addr"),
        ("loadtest compare --sizes 18000,2000", "--sizes"),
        ("loadtest compare --sizes 2000", "--sizes"),
        ("loadtest compare --scenario nope", "--scenario"),
        ("loadtest compare --sources 300", "--sources"),
        ("loadtest compare --deadline-secs -1", "--deadline-secs"),
    ] {
        let e = err(line);
        assert_eq!(e.exit_code(), 2, "{line}");
        let text = e.to_string();
        assert!(text.contains(flag), "{line}: {text}");
        assert!(
            matches!(
                e.kind(),
                ErrorKind::InvalidValue | ErrorKind::ValueValidation
            ),
            "{line}: {:?}",
            e.kind()
        );
    }
}

#[test]
fn a_missing_required_flag_is_named() {
    let e = err("loadtest idle --secret s");
    assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    assert!(e.to_string().contains("--pid"), "{e}");
    assert_eq!(e.exit_code(), 2);
    // --secret can also come from the environment; only without it is it missing.
    if std::env::var_os("CHATBOX_JWT_SECRET").is_none() {
        let e = err("loadtest chat --users 5");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("--secret"), "{e}");
    }
}

#[test]
fn flags_belong_to_their_subcommands() {
    let e = err("loadtest chat --secret s --rounds 3");
    assert_eq!(e.kind(), ErrorKind::UnknownArgument);
    assert!(e.to_string().contains("--rounds"), "{e}");
    assert_eq!(err("loadtest bogus").kind(), ErrorKind::InvalidSubcommand);
    assert_eq!(err("loadtest chat --secret s --users").exit_code(), 2);
}

/// Several nodes: `--addr` as a comma list or repeated, each user (and each of its
/// connections) on node `user mod N`; several `--pid`s likewise.
#[test]
fn several_nodes_and_pids() {
    let three = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"];
    let three: Vec<std::net::SocketAddr> = three.iter().map(|a| a.parse().unwrap()).collect();
    for line in [
        "loadtest chat --secret s --addr 127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003",
        "loadtest chat --secret s --addr 127.0.0.1:9001 --addr 127.0.0.1:9002 --addr 127.0.0.1:9003",
    ] {
        let (_, o) = ok(line);
        assert_eq!(o.addrs, three, "{line}");
        assert_eq!(o.nodes(), 3);
        let spread: Vec<_> = (0..6).map(|u| o.user_addr(u)).collect();
        assert_eq!(spread, [three[0], three[1], three[2], three[0], three[1], three[2]]);
    }
    let (_, o) = ok("loadtest takeover --secret s --pid 10,11 --pid 12");
    assert_eq!(o.pids, [10, 11, 12]);
    let (_, o) = ok("loadtest idle --secret s --pid 10,11");
    assert_eq!(o.pids, [10, 11]);
    let e = err("loadtest chat --secret s --addr 127.0.0.1:9001,nowhere");
    assert!(e.to_string().contains("--addr"), "{e}");
    let e = err("loadtest chat --secret s --pid 1,x");
    assert!(e.to_string().contains("--pid"), "{e}");
    assert_eq!(
        err("loadtest compare --pid 1").kind(),
        ErrorKind::UnknownArgument
    );
}

#[test]
fn help_and_version_exit_zero() {
    for line in [
        "loadtest --help",
        "loadtest compare --help",
        "loadtest help idle",
    ] {
        let e = err(line);
        assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{line}");
        assert_eq!(e.exit_code(), 0, "{line}");
    }
    let e = err("loadtest --version");
    assert_eq!(e.kind(), ErrorKind::DisplayVersion);
    assert_eq!(e.exit_code(), 0);
}

/// The table is the default; JSON only on --json (stdout) or --out (a file).
#[test]
fn json_only_when_asked() {
    let (_, o) = ok("loadtest chat --secret s");
    assert!(!o.json && o.out.is_none());
    let (_, o) = ok("loadtest chat --secret s --json");
    assert!(o.json);
    let (_, o) = ok("loadtest compare --scenario idle --json --out /tmp/x.json");
    assert!(o.json);
    assert_eq!(o.out.as_deref(), Some("/tmp/x.json"));
    assert!(ok("loadtest churn --secret s --progress").1.progress);
}

/// compare pins by default; --no-pin turns it off, and the last of the two wins.
#[test]
fn compare_pins_unless_told_not_to() {
    assert!(ok("loadtest compare").1.pin);
    assert!(ok("loadtest compare --pin").1.pin);
    assert!(!ok("loadtest compare --no-pin").1.pin);
    assert!(ok("loadtest compare --no-pin --pin").1.pin);
    assert_eq!(
        err("loadtest chat --secret s --no-pin").kind(),
        ErrorKind::UnknownArgument
    );
    let (_, o) = ok("loadtest compare --chatbox-bin /b/chatbox --baseline-bin /b/base");
    assert_eq!(
        (o.chatbox_bin.unwrap(), o.baseline_bin.unwrap()),
        ("/b/chatbox".into(), "/b/base".into())
    );
}

/// .ci/bench.sh's check, and that it needs both flags.
#[test]
fn check_takes_the_recorded_figures_and_runs() {
    let cli = Cli::try_parse_from(
        "loadtest check --recorded bench/recorded.toml --run a.json b.json".split_whitespace(),
    )
    .unwrap();
    let super::Command::Check(c) = cli.command else {
        panic!("not check")
    };
    assert_eq!(c.recorded, std::path::PathBuf::from("bench/recorded.toml"));
    assert_eq!(c.runs.len(), 2);
    assert_eq!(
        err("loadtest check --recorded r.toml").kind(),
        ErrorKind::MissingRequiredArgument
    );
}

/// `--help` says where the table, the JSON and the progress lines go.
#[test]
fn help_documents_output_and_progress() {
    let help = Cli::command().render_long_help().to_string();
    for needle in ["--json", "--out", "--progress", "terminal"] {
        assert!(
            help.contains(needle),
            "{needle} missing from --help:\n{help}"
        );
    }
}
