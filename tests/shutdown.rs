//! Graceful shutdown and the binary's start-up contract.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::process::*;
use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

/// Raises this process's soft open-files limit to `want` (or the hard limit):
/// 1,000 clients and their 1,000 server ends need more descriptors than the usual
/// soft limit of 1024. `Err` says why it cannot, when the hard limit is too low.
fn raise_open_files(want: u64) -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid, owned struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if lim.rlim_cur >= want as libc::rlim_t {
        return Ok(());
    }
    if lim.rlim_max < want as libc::rlim_t {
        return Err(format!(
            "the hard open-files limit is {} and this test needs {want}; raise it with `ulimit -Hn`",
            lim.rlim_max
        ));
    }
    lim.rlim_cur = lim.rlim_max.min(want.max(65_536) as libc::rlim_t);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_1000_clients_with_1001_and_exits_cleanly() {
    // Client and server ends both live in this process, plus the runtime's own.
    if let Err(why) = raise_open_files(2_400) {
        eprintln!("SKIPPED shutdown_closes_1000_clients_with_1001_and_exits_cleanly: {why}");
        return;
    }
    let server = start(config());
    let addr = server.local_addr();
    let mut tasks = Vec::new();
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(1000);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    for i in 0..1000 {
        let opened = opened_tx.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await.unwrap();
            let mut ws = connect_user(addr, &format!("s-{i}")).await;
            drop(permit);
            opened.send(()).await.unwrap();
            close_code(&mut ws).await
        }));
    }
    for _ in 0..1000 {
        opened_rx.recv().await.unwrap();
    }
    assert_eq!(total(&server, |m| m.ws_open.get()), 1000);
    server.shutdown();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Some(CloseCode::Away));
    }
    let joined = tokio::task::spawn_blocking(move || server.join())
        .await
        .unwrap();
    assert!(joined.is_ok(), "{joined:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1001_and_exits_zero() {
    let mut child = chatbox()
        .args(["--dev"])
        .env("CHATBOX_LISTEN", "127.0.0.1:0")
        .env("CHATBOX_CORES", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the readiness line and the dev token.
    let stdout = child.stdout.take().unwrap();
    let (addr, user_token) = tokio::task::spawn_blocking(move || {
        let mut addr = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("chatbox listening on http://") {
                addr = Some(
                    rest.trim_end_matches("/chatbox")
                        .parse::<std::net::SocketAddr>()
                        .unwrap(),
                );
            }
            if let Some(t) = line.trim().strip_prefix("user token:") {
                return (addr.unwrap(), t.trim().to_owned());
            }
        }
        panic!("no readiness line");
    })
    .await
    .unwrap();
    let mut ws = connect(addr, "/ws", Some(&user_token), None)
        .await
        .expect("dev token works");
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
    drop(ws);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_raises_the_soft_open_files_limit_to_the_hard_one() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = chatbox();
    cmd.env("CHATBOX_DATA_DIR", dir.path())
        .env("CHATBOX_LISTEN", "127.0.0.1:0")
        .env("CHATBOX_JWT_SECRET", SECRET)
        .env("CHATBOX_ENCRYPTION_KEY", KEY);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 256.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit on a valid, owned struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
    let server = block(|| spawn_server_with(cmd));
    let lines = block(|| server.log_until("open-files limit"));
    let line = lines.last().unwrap();
    assert!(
        line.contains(&format!("open_files_max={}", hard.rlim_max)) && line.contains("was=256"),
        "{line}"
    );
    server.signal(libc::SIGTERM);
    assert_eq!(block(|| server.wait()).0, Some(0));
}

#[test]
fn port_in_use_fails_start_up_with_a_clear_message() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let out = chatbox()
        .arg("--dev")
        .env("CHATBOX_LISTEN", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("address already in use"), "{err}");
}

#[test]
fn check_config_reports_what_to_fix() {
    let out = chatbox().arg("--check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CHATBOX_JWT_SECRET is required") && err.contains("openssl rand -hex 32"),
        "{err}"
    );

    let out = chatbox()
        .arg("--check-config")
        .env("CHATBOX_JWT_SECRET", "s".repeat(32))
        .env("CHATBOX_CORES", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CHATBOX_CORES"));

    let out = chatbox()
        .arg("--check-config")
        .env("CHATBOX_JWT_SECRET", "s".repeat(32))
        .env("CHATBOX_ENCRYPTION_KEY", "ab".repeat(16))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exactly 32"));

    let dir = std::env::temp_dir().join(format!("chatbox-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("chatbox.toml");
    std::fs::write(&file, "cores = 3\nmax_connections_per_user = 4\n").unwrap();
    let out = chatbox()
        .args(["--check-config", "--config"])
        .arg(&file)
        .env("CHATBOX_JWT_SECRET", "s".repeat(32))
        .env("CHATBOX_CORES", "2")
        .env("CHATBOX_ENCRYPTION_KEY", "ab".repeat(32))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("configuration OK")
            && text.contains("2 cores")
            && text.contains("4 connections per user"),
        "{text}"
    );

    // A model whose key comes from a variable that is not set: the server would
    // refuse to start, so the check says so; the summary names the real models.
    let models = "[[llm.models]]\nid = \"fast\"\nprovider = \"openai\"\n\
                  api_key_env = \"CHATBOX_TEST_UNSET_KEY\"\n";
    std::fs::write(&file, models).unwrap();
    let check = |key: Option<&str>| {
        let mut cmd = chatbox();
        cmd.args(["--check-config", "--config"])
            .arg(&file)
            .env("CHATBOX_JWT_SECRET", "s".repeat(32))
            .env("CHATBOX_ENCRYPTION_KEY", "ab".repeat(32));
        if let Some(k) = key {
            cmd.env("CHATBOX_TEST_UNSET_KEY", k);
        }
        cmd.output().unwrap()
    };
    let out = check(None);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CHATBOX_TEST_UNSET_KEY, which is not set"),
        "{err}"
    );
    let out = check(Some("sk-test"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("models fast (Openai)"), "{text}");
}

/// A client that stops reading while the server has frames for it is closed with
/// 1013 once its queue passes its bound, and the close frame reaches it when it
/// reads again (after every whole frame it was already sent); another user, who
/// reads, keeps everything and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_closed_with_1013_and_others_carry_on() {
    let mut cfg = config();
    cfg.ws_outbox_frames_max = 8;
    cfg.ws_write_buffer_bytes_max = 64 * 1024;
    let server = start(cfg);
    let addr = server.local_addr();
    // Never polled until the end: tokio-tungstenite reads only when asked.
    let mut slow = connect_user(addr, "slow-reader").await;
    let good = connect_user(addr, "good-reader").await;
    // The good reader reads everything, saying when it got each broadcast, until "end".
    let (got_tx, mut got_rx) = tokio::sync::mpsc::channel::<()>(1);
    let reader = tokio::spawn(async move {
        let mut good = good;
        let mut n = 0u64;
        loop {
            match next_msg(&mut good).await {
                Some(Message::Text(t)) if t.as_str() == "end" => return (good, n),
                Some(Message::Text(_)) => {
                    n += 1;
                    got_tx.send(()).await.unwrap();
                }
                other => panic!("the good reader lost its connection: {other:?}"),
            }
        }
    });
    let big = "x".repeat(60 * 1024);
    let mut sent = 0u64;
    // Until the server gives up on the slow reader; bounded so a bug fails.
    while total(&server, |m| m.slow_consumers.get()) == 0 {
        assert!(sent < 4_000, "the slow reader was never closed");
        // Paced by the good reader, which keeps up: only the slow one falls behind.
        assert!(server.broadcast(&big).is_empty(), "broadcast refused");
        sent += 1;
        tokio::time::timeout(WAIT, got_rx.recv())
            .await
            .expect("the good reader keeps up");
    }
    assert!(server.broadcast("end").is_empty());
    // Reading again, the slow client gets whole frames, then 1013.
    let mut frames = 0;
    let code = loop {
        match next_msg(&mut slow).await {
            Some(Message::Text(t)) => {
                assert_eq!(t.len(), big.len(), "a whole frame");
                frames += 1;
            }
            Some(Message::Close(f)) => break f.map(|f| f.code),
            other => panic!("expected frames then a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::Again), "after {frames} frames");
    assert!(frames > 0);
    let (mut good, got) = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(got, sent, "the good reader got every broadcast");
    send(
        &mut good,
        json!({"type": "user_message", "content": "still here?"}),
    )
    .await;
    until(&mut good, "ai_done").await;
    assert_eq!(total(&server, |m| m.slow_consumers.get()), 1);
    server.shutdown();
    stop(server).await;
}

// ---- Shutdown's deadline, draining, and answers cut off by it ----

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_off_by_shutdown_is_stored_as_cancelled_and_resumes() {
    let mut llm = StepLlm::start().await;
    let data = data_dir();
    let mut env = llm.env();
    env.push(("CHATBOX_SHUTDOWN_GRACE_SECS", "1".into()));
    let server = block(|| spawn_server(&data, &env));
    let mut ws = connect_user(server.addr, "pat").await;
    send(
        &mut ws,
        json!({"type": "user_message", "content": "my order is late", "id": "c1"}),
    )
    .await;
    let (session, _) = until(&mut ws, "session").await;
    let sid = session["session_id"].as_str().unwrap().to_owned();
    llm.request_seen().await;
    llm.step(Step::Chunk("Let me check "));
    until(&mut ws, "ai_chunk").await;
    llm.step(Step::Chunk("your order"));
    let (chunk, _) = until(&mut ws, "ai_chunk").await;
    assert_eq!(chunk["seq"], 2);
    server.signal(libc::SIGTERM);
    // The grace ends with the answer still streaming: it is closed as cancelled.
    let (done, _) = until(&mut ws, "ai_done").await;
    assert_eq!(done["cancelled"], true, "{done}");
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
    let (code, log) = block(|| server.wait());
    assert_eq!(code, Some(0), "{log}");

    let server = block(|| spawn_server(&data, &env));
    let mut ws = connect_user(server.addr, "pat").await;
    send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
    let (session, _) = until(&mut ws, "session").await;
    let messages = session["messages"].as_array().expect("history");
    let last = messages.last().expect("messages");
    assert_eq!(last["role"], "assistant", "{session}");
    assert_eq!(last["content"], "Let me check your order", "{session}");
    assert_eq!(last["cancelled"], true, "{session}");
    // The session goes on.
    send(
        &mut ws,
        json!({"type": "user_message", "session_id": sid, "content": "and?", "id": "c2"}),
    )
    .await;
    llm.request_seen().await;
    llm.step(Step::Chunk("It ships today."));
    llm.step(Step::Done);
    let (done, before) = until(&mut ws, "ai_done").await;
    assert!(done.get("cancelled").is_none_or(|c| c == false), "{done}");
    assert!(before.iter().any(|f| f["content"] == "It ships today."));
    server.signal(libc::SIGTERM);
    let (code, log) = block(|| server.wait());
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_draining_requests_get_503_and_healthz_stays_200() {
    let mut llm = StepLlm::start().await;
    let mut cfg = config();
    cfg.llm_provider = chatbox::config::LlmProvider::Openai;
    cfg.llm_base_url = Some(llm.url());
    cfg.llm_api_key = Some("test-key".into());
    // Long enough that the answer below, not the clock, ends the draining.
    cfg.shutdown_timeout_secs = 120;
    cfg.shutdown_grace_secs = 60;
    let server = start(cfg);
    let addr = server.local_addr();
    let mut ws = connect_user(addr, "dora").await;
    send(
        &mut ws,
        json!({"type": "user_message", "content": "hi", "id": "c1"}),
    )
    .await;
    llm.request_seen().await;
    llm.step(Step::Chunk("Hello"));
    until(&mut ws, "ai_chunk").await;
    server.shutdown();
    // Draining once /readyz says so (each core answers for itself: ask both).
    let mut unready = 0;
    while unready < 4 {
        let (status, head, body) = get(addr, "/chatbox/readyz").await;
        if status == 503 {
            assert_eq!(error_code(&body), "shutting_down");
            assert!(head.contains("retry-after: 5"), "{head}");
            unready += 1;
        } else {
            assert_eq!(status, 200);
        }
    }
    for _ in 0..4 {
        let (status, _, _) = get(addr, "/chatbox/healthz").await;
        assert_eq!(status, 200, "healthz while draining");
        let (status, head, body) = get(addr, "/chatbox/admin/sessions").await;
        assert_eq!((status, error_code(&body)), (503, "shutting_down".into()));
        assert!(head.contains("retry-after: 5"), "{head}");
        match connect(addr, "/ws", Some(&token("late-comer")), None).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 503);
                assert_eq!(resp.headers()["retry-after"], "5");
            }
            other => panic!(
                "expected a 503 upgrade refusal, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // The answer under way finishes on its connection, which then gets 1001.
    llm.step(Step::Chunk(" there"));
    llm.step(Step::Done);
    let (done, _) = until(&mut ws, "ai_done").await;
    assert!(done.get("cancelled").is_none_or(|c| c == false), "{done}");
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
    stop(server).await;
}

/// Shutdown with a step that hangs: cut off at the deadline, named, non-zero exit.
/// `core_hangs`: the hang is on the connection's core (which then says nothing).
async fn hung_step_is_cut_off(
    hang: &str,
    step: &str,
    timeout_secs: u64,
    core_hangs: bool,
) -> String {
    let data = data_dir();
    let env = [
        ("CHATBOX_TEST_HANG", hang.to_owned()),
        ("CHATBOX_SHUTDOWN_TIMEOUT_SECS", timeout_secs.to_string()),
    ];
    let server = block(|| spawn_server(&data, &env));
    let mut ws = connect_user(server.addr, "hal").await;
    send(
        &mut ws,
        json!({"type": "user_message", "content": "hi", "id": "c1"}),
    )
    .await;
    if core_hangs {
        block(|| server.log_until("fault point reached"));
    } else {
        until(&mut ws, "ai_done").await;
    }
    let asked = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    if !core_hangs {
        assert_eq!(close_code(&mut ws).await, Some(CloseCode::Away));
    }
    let (code, log) = block(|| server.wait());
    let took = asked.elapsed();
    assert!(
        took < std::time::Duration::from_secs(timeout_secs + 3),
        "exited {took:?} after SIGTERM; deadline {timeout_secs} s\n{log}"
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!("step=\"{step}\"")) && log.contains("cut off"),
        "the warning names the step: {log}"
    );
    log
}

#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_storage_flush_is_cut_off_at_the_deadline() {
    let log = hung_step_is_cut_off("flush", "storage flush", 2, false).await;
    assert!(log.contains("could not be flushed"), "{log}");
}

#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_core_is_cut_off_at_the_deadline() {
    // The answer's fault point hangs its core thread: shutdown cannot stop it.
    let log = hung_step_is_cut_off("answer", "stopping cores", 2, true).await;
    assert!(log.contains("could not be flushed"), "{log}");
}

#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_while_draining_exits_at_once() {
    let data = data_dir();
    let env = [
        ("CHATBOX_TEST_HANG", "flush".to_owned()),
        ("CHATBOX_SHUTDOWN_TIMEOUT_SECS", "600".to_owned()),
    ];
    let server = block(|| spawn_server(&data, &env));
    server.signal(libc::SIGTERM);
    block(|| server.log_until("shutting down gracefully"));
    let asked = std::time::Instant::now();
    server.signal(libc::SIGINT);
    let (code, log) = block(|| server.wait());
    assert!(asked.elapsed() < WAIT);
    assert_eq!(code, Some(130), "{log}");
    assert!(log.contains("second signal"), "{log}");
}
