//! The command line, run as the built binary: help, version, `genconfig` round trip
//! through `--check-config`, the warning for an unknown variable, derived limits,
//! and README.md's configuration table against the key declarations; then the
//! binary serving real clients: no message content in its log at any level,
//! `--dev` secrets across a restart, and the `migrate` and `copy` commands.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};

const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";
const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The binary with an empty environment (the test runner's `CHATBOX_*` must not leak in).
fn chatbox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chatbox"));
    c.env_clear().env("RUST_LOG", "info").stdin(Stdio::null());
    c
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("the binary runs");
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn temp_dir() -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix("chatbox-cli-")
        .tempdir()
        .expect("temp dir")
        .keep()
}

#[test]
fn help_goes_to_stdout_and_names_the_variables() {
    let (code, out, err) = run(chatbox().arg("--help"));
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "--config",
        "--dev",
        "--check-config",
        "genconfig",
        "migrate",
        "copy",
        "CHATBOX_CONFIG",
        "CHATBOX_LISTEN",
        "CHATBOX_CORES",
        "CHATBOX_PATH_PREFIX",
        "CHATBOX_JWT_SECRET",
        "CHATBOX_ENCRYPTION_KEY",
        "CHATBOX_ALLOWED_ORIGINS",
        "CHATBOX_DATA_DIR",
        "CHATBOX_MONGO_URI",
        "CHATBOX_LLM_PROVIDER",
        "CHATBOX_LLM_BASE_URL",
        "CHATBOX_LLM_API_KEY",
        "CHATBOX_LLM_MODEL",
        "CHATBOX_LLM_MODELS",
        "CHATBOX_MAX_CONNECTIONS_PER_USER",
        "CHATBOX_RATE_LIMIT_PER_MINUTE",
        "CHATBOX_SHUTDOWN_TIMEOUT_SECS",
        "CHATBOX_WS_FRAMES_PER_MINUTE_MAX",
    ] {
        assert!(out.contains(needle), "{needle} missing from --help:\n{out}");
    }
    for key in chatbox::config::KEYS {
        assert!(
            out.contains(&key.env()),
            "{} missing from --help",
            key.env()
        );
    }
}

#[test]
fn version_is_name_and_package_version() {
    let (code, out, _) = run(chatbox().arg("--version"));
    assert_eq!(code, Some(0));
    assert_eq!(out, concat!("chatbox ", env!("CARGO_PKG_VERSION"), "\n"));
}

#[test]
fn unknown_flags_and_bad_subcommand_arguments_exit_2() {
    let (code, out, err) = run(chatbox().arg("--no-such-flag"));
    assert_eq!(code, Some(2));
    assert!(out.is_empty() && err.contains("--no-such-flag"), "{err}");
    let (code, _, err) = run(chatbox().args(["copy", "--from", "sqlite"]));
    assert_eq!(code, Some(2));
    assert!(err.contains("--to"), "{err}");
    let (code, _, err) = run(chatbox().args(["copy", "--from", "mongo", "--to", "mongodb"]));
    assert_eq!(code, Some(2));
    assert!(err.contains("two different stores"), "{err}");
    let (code, _, err) = run(chatbox().args(["copy", "--from", "oracle", "--to", "sqlite"]));
    assert_eq!(code, Some(2));
    assert!(err.contains("sqlite or mongo"), "{err}");
}

#[test]
fn empty_config_variable_means_no_file() {
    let (code, out, err) = run(chatbox()
        .args(["--dev", "--check-config"])
        .env("CHATBOX_CONFIG", ""));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("configuration OK"), "{out}");
}

/// `genconfig` with the two secrets filled in is a file `--check-config` accepts.
#[test]
fn genconfig_round_trips_through_check_config() {
    let (code, text, err) = run(chatbox().arg("genconfig"));
    assert_eq!(code, Some(0), "{err}");
    for key in chatbox::config::KEYS {
        assert!(text.contains(&key.env()), "{} missing", key.env());
    }
    // Unfilled, the file names what is missing.
    let dir = temp_dir();
    let file = dir.join("chatbox.toml");
    std::fs::write(&file, &text).unwrap();
    let (code, _, err) = run(chatbox().arg("--check-config").arg("--config").arg(&file));
    assert_eq!(code, Some(2));
    assert!(err.contains("CHATBOX_JWT_SECRET is required"), "{err}");

    let filled = text
        .replace(
            "\n# jwt_secret = \"\"\n",
            &format!("\njwt_secret = \"{SECRET}\"\n"),
        )
        .replace(
            "\n# encryption_key = \"\"\n",
            &format!("\nencryption_key = \"{KEY}\"\n"),
        );
    assert_eq!(filled.matches(SECRET).count(), 1, "jwt_secret placeholder");
    assert_eq!(filled.matches(KEY).count(), 1, "encryption_key placeholder");
    std::fs::write(&file, &filled).unwrap();
    let (code, out, err) = run(chatbox().arg("--check-config").arg("--config").arg(&file));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("configuration OK"), "{out}");
    // The file writes no derived limit down, so raising the rate alone still works.
    let (code, _, err) = run(chatbox()
        .arg("--check-config")
        .env("CHATBOX_CONFIG", &file)
        .env("CHATBOX_RATE_LIMIT_PER_MINUTE", "5000"));
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn unknown_variable_is_warned_about_in_the_log() {
    let (code, _, err) = run(chatbox()
        .arg("--check-config")
        .env("CHATBOX_JWT_SECRET", SECRET)
        .env("CHATBOX_ENCRYPTION_KEY", KEY)
        .env("CHATBOX_LOG_FORMAT", "json")
        .env("CHATBOX_RATE_LIMT_PER_MINUTE", "100"));
    assert_eq!(code, Some(0), "{err}");
    let warning = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "WARN")
        .unwrap_or_else(|| panic!("no warning in the log:\n{err}"));
    let message = warning["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("CHATBOX_RATE_LIMT_PER_MINUTE"),
        "{warning}"
    );
}

#[test]
fn contradicting_limits_set_together_are_refused_with_both_names() {
    let (code, _, err) = run(chatbox()
        .arg("--check-config")
        .env("CHATBOX_JWT_SECRET", SECRET)
        .env("CHATBOX_ENCRYPTION_KEY", KEY)
        .env("CHATBOX_RATE_LIMIT_PER_MINUTE", "5000")
        .env("CHATBOX_WS_FRAMES_PER_MINUTE_MAX", "1000"));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("CHATBOX_WS_FRAMES_PER_MINUTE_MAX (1000)")
            && err.contains("CHATBOX_RATE_LIMIT_PER_MINUTE (5000)"),
        "{err}"
    );
}

/// The contract: raising the rate limit alone never stops start-up. The server
/// starts, says it derived the frame guard and its version, and stops on SIGTERM.
#[test]
fn raised_rate_limit_alone_starts() {
    let mut child = chatbox()
        .arg("--dev")
        .env("CHATBOX_LISTEN", "127.0.0.1:0")
        .env("CHATBOX_CORES", "1")
        .env("CHATBOX_DATA_DIR", temp_dir())
        .env("CHATBOX_RATE_LIMIT_PER_MINUTE", "5000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let listening = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("chatbox listening on http://"));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("the child exits");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut err)
        .unwrap();
    assert!(listening, "never listened:\n{err}");
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        err.contains("ws_frames_per_minute_max = 50000 (derived from rate_limit_per_minute)"),
        "{err}"
    );
    assert!(
        err.contains(concat!("chatbox ", env!("CARGO_PKG_VERSION"), " started")),
        "{err}"
    );
}

/// README.md's table is `chatbox genconfig --markdown`, so it lists exactly the
/// declared keys with their defaults.
#[test]
fn readme_table_is_the_declared_keys() {
    let (code, table, err) = run(chatbox().args(["genconfig", "--markdown"]));
    assert_eq!(code, Some(0), "{err}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let begin = "<!-- config-table:begin -->\n";
    let documented = readme
        .split_once(begin)
        .and_then(|(_, rest)| rest.split_once("<!-- config-table:end -->"))
        .map(|(t, _)| t)
        .expect("README.md has the config-table markers");
    assert!(
        documented == table,
        "README.md's configuration table is stale; replace it with the output of \
         `chatbox genconfig --markdown`:\n{table}"
    );
    for key in chatbox::config::KEYS {
        assert!(
            table.contains(&format!("| `{}` |", key.shown)),
            "{}",
            key.shown
        );
    }
}

// ---- The binary serving real clients: logs, --dev restarts, storage commands ----

/// A `chatbox` process: its address, stdout lines after the banner so far, and
/// its whole stderr (read by a thread all along, so a chatty log never blocks it).
struct Running {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    /// Spawns `cmd` (listening on 127.0.0.1:0) and waits for its banner line.
    fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .env("CHATBOX_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let (tx, stdout) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut r = Running {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            stdout,
            stderr,
        };
        let banner = r.line_starting("chatbox listening on http://");
        let rest = &banner["chatbox listening on http://".len()..];
        let host = rest.split('/').next().unwrap();
        r.addr = host.parse().expect("an address in the banner");
        r
    }

    /// The next stdout line starting with `prefix` (earlier ones are skipped).
    fn line_starting(&mut self, prefix: &str) -> String {
        loop {
            let line = self
                .stdout
                .recv_timeout(common::WAIT)
                .unwrap_or_else(|e| panic!("no stdout line {prefix:?}: {e}"));
            if line.trim_start().starts_with(prefix) {
                return line.trim_start().to_owned();
            }
        }
    }

    /// SIGTERM, then the exit code and everything the process logged.
    fn stop(mut self) -> (Option<i32>, String) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("the child exits");
        (status.code(), self.stderr.join().unwrap())
    }
}

async fn ws_at(addr: std::net::SocketAddr, token: &str) -> common::Ws {
    common::connect(addr, "/ws", Some(token), None)
        .await
        .expect("upgrade accepted")
}

/// One user message answered to the end; returns the session id.
async fn ask(ws: &mut common::Ws, sid: Option<&str>, content: &str) -> String {
    let mut m = serde_json::json!({"type": "user_message", "content": content});
    if let Some(s) = sid {
        m["session_id"] = s.into();
    }
    common::send(ws, m).await;
    let (ack, _) = common::until(ws, "ack").await;
    common::until(ws, "ai_done").await;
    ack["session_id"].as_str().unwrap().to_owned()
}

/// A marker no log line could contain by chance.
fn marker() -> String {
    format!("zqmark{:016x}", rand::random::<u64>())
}

/// A conversation carrying `marker` everywhere content goes: user messages, the
/// demo's answers (which quote the user), a help request, a takeover with the
/// admin's and the user's messages, the hand-back, a resume.
async fn converse_with_marker(addr: std::net::SocketAddr, marker: &str) {
    use common::{recv, send, until};
    use serde_json::json;
    let admin = common::token_with("agent-log", &["admin"], chatbox::auth::now_secs() + 3600);
    let mut a = ws_at(addr, &admin).await;
    let mut u = ws_at(addr, &common::token("user-log")).await;
    let sid = ask(&mut u, None, &format!("my order {marker} is late")).await;
    send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    until(&mut a, "help_requested").await;
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    until(&mut u, "admin_joined").await;
    send(
        &mut u,
        json!({"type": "user_message", "session_id": sid, "content": format!("human? {marker}")}),
    )
    .await;
    until(&mut a, "user_message").await;
    send(&mut a, json!({"type": "admin_message", "session_id": sid, "content": format!("admin says {marker}")})).await;
    until(&mut u, "admin_message").await;
    send(&mut a, json!({"type": "admin_leave", "session_id": sid})).await;
    until(&mut u, "admin_left").await;
    ask(&mut u, Some(&sid), &format!("thanks {marker}")).await;
    send(&mut u, json!({"type": "resume", "session_id": sid})).await;
    let s = recv(&mut u).await;
    assert!(s.to_string().contains(marker), "the content is there: {s}");
}

/// Message content never reaches the log, at any level (trace included, every
/// crate's) and in both formats, through answers, a takeover and a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_content_is_absent_from_the_logs_at_every_level() {
    for format in ["text", "json"] {
        let server = Running::spawn(
            chatbox()
                .env("RUST_LOG", "trace")
                .env("CHATBOX_LOG_FORMAT", format)
                .env("CHATBOX_JWT_SECRET", SECRET)
                .env("CHATBOX_ENCRYPTION_KEY", KEY)
                .env("CHATBOX_DATA_DIR", temp_dir())
                .env("CHATBOX_CORES", "2")
                .env("CHATBOX_DEMO_CHUNK_DELAY_MS", "1"),
        );
        let marker = marker();
        converse_with_marker(server.addr, &marker).await;
        let (code, log) = server.stop();
        assert_eq!(code, Some(0), "{format}");
        assert!(
            log.lines().count() > 50 && log.contains("TRACE"),
            "the log ran at trace level ({format}):\n{log}"
        );
        let leaks: Vec<&str> = log.lines().filter(|l| l.contains(&marker)).collect();
        assert!(
            leaks.is_empty(),
            "message content in the {format} log:\n{}",
            leaks.join("\n")
        );
    }
}

/// `--dev` keeps its secrets in the data directory: after a restart on the same
/// directory, a token printed by the first run still works and the stored
/// conversation still decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_secrets_survive_a_restart() {
    let dir = temp_dir();
    let dev = || {
        let mut c = chatbox();
        c.arg("--dev")
            .env("CHATBOX_DATA_DIR", &dir)
            .env("CHATBOX_CORES", "1")
            .env("CHATBOX_DEMO_CHUNK_DELAY_MS", "1");
        c
    };
    let mut first = Running::spawn(&mut dev());
    // A console link for each side, the token in the fragment (never sent).
    let agent = first.line_starting("agent console:").to_owned();
    let chat = first.line_starting("user chat:").to_owned();
    let base = format!("http://{}/chatbox/console/", first.addr);
    assert!(agent.contains(&format!("{base}#token=ey")), "{agent}");
    assert!(
        chat.contains(&format!("{base}chat.html#token=ey")),
        "{chat}"
    );
    let token = first.line_starting("user token:")["user token:".len()..]
        .trim()
        .to_owned();
    assert!(chat.ends_with(&format!("#token={token}")), "{chat}");
    let text = format!("kept across restarts {}", marker());
    let mut ws = ws_at(first.addr, &token).await;
    let sid = ask(&mut ws, None, &text).await;
    drop(ws);
    let (code, log) = first.stop();
    assert_eq!(code, Some(0), "{log}");

    let second = Running::spawn(&mut dev());
    let mut ws = ws_at(second.addr, &token).await;
    common::send(
        &mut ws,
        serde_json::json!({"type": "resume", "session_id": sid}),
    )
    .await;
    let s = common::recv(&mut ws).await;
    assert_eq!(s["type"], "session", "{s}");
    let messages = s["messages"].as_array().unwrap();
    assert_eq!(messages[0]["content"], serde_json::json!(text), "{s}");
    assert_eq!(messages[1]["role"], "assistant");
    drop(ws);
    let (code, log) = second.stop();
    assert_eq!(code, Some(0), "{log}");
}

/// The tables of the embedded store in `dir` (empty when there is no store).
fn tables(dir: &std::path::Path) -> Vec<String> {
    let path = dir.join("chatbox.db");
    if !path.exists() {
        return Vec::new();
    }
    let c = rusqlite::Connection::open(path).unwrap();
    let mut q = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap();
    q.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// An in-process server on the embedded store in `dir` (never MongoDB).
fn embedded(dir: &std::path::Path) -> chatbox::Config {
    chatbox::Config {
        data_dir: dir.to_owned(),
        mongo_uri: None,
        ..common::config()
    }
}

/// Conversations stored through a real server in `dir`: user `copy-a` with one
/// exchange, user `copy-b` with two. Returns (session id, user, texts sent).
async fn store_conversations(dir: &std::path::Path) -> Vec<(String, String, Vec<String>)> {
    let server = common::start(embedded(dir));
    let mut made = Vec::new();
    for (user, n) in [("copy-a", 1), ("copy-b", 2)] {
        let mut ws = common::connect_user(server.local_addr(), user).await;
        let mut sid = None;
        let mut texts = Vec::new();
        for i in 0..n {
            let text = format!("{user} says {i} {}", marker());
            sid = Some(ask(&mut ws, sid.as_deref(), &text).await);
            texts.push(text);
        }
        made.push((sid.unwrap(), user.to_owned(), texts));
    }
    server.shutdown();
    common::stop(server).await;
    made
}

/// Each session's user messages, as a server on `dir` resumes them.
async fn resumed(dir: &std::path::Path, made: &[(String, String, Vec<String>)]) {
    let server = common::start(embedded(dir));
    for (sid, user, texts) in made {
        let mut ws = common::connect_user(server.local_addr(), user).await;
        common::send(
            &mut ws,
            serde_json::json!({"type": "resume", "session_id": sid}),
        )
        .await;
        let s = common::recv(&mut ws).await;
        let msgs = s["messages"].as_array().unwrap_or_else(|| panic!("{s}"));
        let users: Vec<&str> = msgs
            .iter()
            .filter(|m| m["role"] == "user")
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(users, *texts, "{s}");
        assert_eq!(msgs.len(), 2 * texts.len(), "each with its answer: {s}");
    }
    server.shutdown();
    common::stop(server).await;
}

/// `chatbox migrate` creates the embedded store's schema in a fresh data
/// directory; on one with data (run twice) it changes nothing that was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_on_a_fresh_and_an_existing_data_dir() {
    let dir = temp_dir();
    assert!(tables(&dir).is_empty());
    let (code, out, err) = run(chatbox().arg("migrate").env("CHATBOX_DATA_DIR", &dir));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("is ready (schema and indexes up to date)"),
        "{out}"
    );
    let fresh = tables(&dir);
    for t in ["messages", "outbox", "session_events", "sessions"] {
        assert!(fresh.iter().any(|f| f == t), "{t} in {fresh:?}");
    }

    let made = store_conversations(&dir).await;
    for _ in 0..2 {
        let (code, out, err) = run(chatbox().arg("migrate").env("CHATBOX_DATA_DIR", &dir));
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("is ready"), "{out}");
    }
    assert_eq!(tables(&dir), fresh);
    resumed(&dir, &made).await;
}

/// `chatbox copy` from the embedded store to MongoDB and back into another data
/// directory: the counts it reports are what was stored, a second run copies
/// nothing again, and the copy serves the same conversations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs MongoDB: set CHATBOX_TEST_MONGO_URI (see .ci/run)"]
async fn copy_embedded_to_mongodb_and_back_with_the_counts() {
    let uri = std::env::var("CHATBOX_TEST_MONGO_URI")
        .expect("this test needs CHATBOX_TEST_MONGO_URI (a MongoDB; .ci/run starts SecantusDB)");
    let database = format!("chatbox_copy_{:016x}", rand::random::<u64>());
    let (from_dir, to_dir) = (temp_dir(), temp_dir());
    let made = store_conversations(&from_dir).await;
    let copy = |from: &str, to: &str, dir: &std::path::Path| {
        run(chatbox()
            .args(["copy", "--from", from, "--to", to])
            .env("CHATBOX_DATA_DIR", dir)
            .env("CHATBOX_MONGO_URI", &uri)
            .env("CHATBOX_MONGO_DATABASE", &database))
    };
    let (code, out, err) = copy("sqlite", "mongo", &from_dir);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("copied 2 sessions (6 messages,")
            && out.contains("; 0 sessions were there already"),
        "{out}"
    );
    let (code, out, err) = copy("sqlite", "mongo", &from_dir);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("copied 0 sessions (0 messages,")
            && out.contains("; 2 sessions were there already"),
        "run again, it copies nothing twice: {out}"
    );
    let (code, out, err) = copy("mongo", "sqlite", &to_dir);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("copied 2 sessions (6 messages,"), "{out}");
    resumed(&to_dir, &made).await;
}

/// Cluster mode needs files every node can read: `file_store = local` is
/// refused; left unset, the store follows the configuration and `--check-config`
/// says which it chose and why, without printing the bucket's credentials.
#[test]
fn cluster_mode_needs_shared_file_storage_and_check_config_explains_the_choice() {
    let base = || {
        let mut c = chatbox();
        c.arg("--check-config")
            .env("CHATBOX_JWT_SECRET", SECRET)
            .env("CHATBOX_ENCRYPTION_KEY", KEY)
            .env("CHATBOX_DATA_DIR", temp_dir());
        c
    };
    let cluster = |c: &mut Command| {
        c.env("CHATBOX_NATS_URL", "nats://127.0.0.1:4222")
            .env("CHATBOX_MONGO_URI", "mongodb://127.0.0.1:27017");
    };
    let mut c = base();
    cluster(&mut c);
    let (code, _, err) = run(c.env("CHATBOX_FILE_STORE", "local"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cluster mode needs shared file storage (s3 or gridfs)"),
        "{err}"
    );

    let mut c = base();
    cluster(&mut c);
    let (code, out, err) = run(&mut c);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(
            "files: gridfs (GridFS in database chatbox), chosen by nats_url and mongo_uri"
        ),
        "{out}"
    );

    let access = "AKIDEXAMPLEKEYID0001";
    let secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY";
    let s3 = |c: &mut Command| {
        c.env("CHATBOX_S3_BUCKET", "chatbox-files")
            .env("CHATBOX_S3_ENDPOINT", "http://127.0.0.1:9000")
            .env("CHATBOX_S3_ACCESS_KEY_ID", access)
            .env("CHATBOX_S3_SECRET_ACCESS_KEY", secret);
    };
    let mut c = base();
    cluster(&mut c);
    s3(&mut c);
    let (code, out, err) = run(&mut c);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(
            "files: s3 (bucket chatbox-files at http://127.0.0.1:9000), chosen by s3_bucket"
        ),
        "{out}"
    );
    assert!(
        !out.contains(secret) && !err.contains(secret) && !out.contains(access),
        "credentials printed:\n{out}\n{err}"
    );

    // A bucket elsewhere must be reached over https; GridFS needs MongoDB.
    let mut c = base();
    s3(&mut c);
    let (code, _, err) = run(c.env("CHATBOX_S3_ENDPOINT", "http://s3.example.com"));
    assert_eq!(code, Some(2));
    assert!(err.contains("CHATBOX_S3_ENDPOINT must be https"), "{err}");
    let (code, _, err) = run(base().env("CHATBOX_FILE_STORE", "gridfs"));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("CHATBOX_FILE_STORE=gridfs needs CHATBOX_MONGO_URI"),
        "{err}"
    );
    let (code, out, err) = run(&mut base());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("files: local ("), "{out}");
}
