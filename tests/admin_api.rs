//! The admin HTTP API: authorization, every filter and sort (and their errors),
//! stable pagination, transcripts, window metrics, ending sessions, export and
//! deletion of a user's data.

mod common;

use std::net::SocketAddr;

use chatbox::auth::now_secs;
use common::*;
use serde_json::{json, Value};

fn admin_token() -> String {
    token_with("boss", &["admin"], now_secs() + 3600)
}

async fn call(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} /chatbox/admin{path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n"
    );
    let (status, _, body) = http(addr, &req).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    call(addr, "GET", path, Some(&admin_token())).await
}

fn ids(v: &Value) -> Vec<String> {
    v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_get_in() {
    let server = start(config());
    let addr = server.local_addr();
    let user = token("plain-user");
    for (method, path) in [
        ("GET", "/sessions"),
        ("GET", "/sessions/s_x"),
        ("POST", "/sessions/s_x/end"),
        ("GET", "/metrics"),
        ("GET", "/users/u/export"),
        ("DELETE", "/users/u"),
        ("POST", "/users/u/disconnect"),
    ] {
        let (s, v) = call(addr, method, path, None).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{method} {path}"
        );
        let (s, v) = call(addr, method, path, Some("not-a-token")).await;
        assert_eq!(s, 401, "{method} {path} {v}");
        let (s, v) = call(addr, method, path, Some(&user)).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}"
        );
    }
    assert_eq!(get(addr, "/sessions").await.0, 200);
    assert_eq!(get(addr, "/nope").await.0, 404);
    // A 401 says how to authenticate (RFC 9110 requires the challenge).
    let req = "GET /chatbox/admin/sessions HTTP/1.1\r\nHost: x\r\n\r\n";
    let (status, head, _) = http(addr, req).await;
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_path_with_another_method_is_405_and_unknown_parameters_are_refused() {
    let server = start(config());
    let addr = server.local_addr();
    let admin = admin_token();
    for (method, path, allow) in [
        ("POST", "/sessions", "GET"),
        ("DELETE", "/sessions/s_x", "GET"),
        ("GET", "/sessions/s_x/end", "POST"),
        ("PUT", "/metrics", "GET"),
        ("POST", "/users/u/export", "GET"),
        ("GET", "/users/u", "DELETE"),
        ("GET", "/users/u/disconnect", "POST"),
    ] {
        let req = format!(
            "{method} /chatbox/admin{path} HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {admin}\r\nContent-Length: 0\r\n\r\n"
        );
        let (status, head, body) = http(addr, &req).await;
        assert_eq!(status, 405, "{method} {path}: {body}");
        let want = format!("allow: {}", allow.to_ascii_lowercase());
        assert!(head.contains(&want), "{head}");
        assert!(body.contains("method_not_allowed"), "{body}");
    }
    for (method, path) in [
        ("POST", "/sessions/s_x/end?bogus=1"),
        ("DELETE", "/users/u?bogus=1"),
        ("POST", "/users/u/disconnect?bogus=1"),
    ] {
        let (status, body) = call(addr, method, path, Some(&admin)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{method} {path}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorts_filters_and_pagination() {
    let server = start(config());
    let addr = server.local_addr();
    let a = conversation(addr, "alice", 1).await;
    let b = conversation(addr, "bob", 3).await;
    let c = conversation(addr, "carol", 2).await;
    let d = conversation(addr, "alice", 2).await;

    // Default: newest first.
    let (s, all) = get(addr, "/sessions").await;
    assert_eq!(s, 200);
    assert_eq!(ids(&all), [d.clone(), c.clone(), b.clone(), a.clone()]);
    let first = &all["sessions"][0];
    for field in [
        "session_id",
        "user_id",
        "state",
        "start_time",
        "end_time",
        "last_activity",
        "message_count",
        "total_tokens",
    ] {
        assert!(first.get(field).is_some(), "{field} in {first}");
    }
    assert_eq!(
        get(addr, "/sessions?sort_by=start_time&order=asc").await.1["sessions"][0]["session_id"],
        json!(a)
    );
    // message_count: b has 6 messages, c and d 4, a 2.
    let by_count = ids(&get(addr, "/sessions?sort_by=message_count&order=desc")
        .await
        .1);
    assert_eq!(by_count[0], b);
    assert_eq!(by_count[3], a);
    let by_tokens = get(addr, "/sessions?sort_by=total_tokens&order=asc")
        .await
        .1;
    let tokens: Vec<u64> = by_tokens["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["total_tokens"].as_u64().unwrap())
        .collect();
    assert!(
        tokens.windows(2).all(|w| w[0] <= w[1]) && tokens[0] > 0,
        "{tokens:?}"
    );
    let by_user: Vec<String> = get(addr, "/sessions?sort_by=user_id&order=asc").await.1["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["user_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(by_user, ["alice", "alice", "bob", "carol"]);

    // Filters.
    assert_eq!(
        ids(&get(addr, "/sessions?user_id=alice").await.1),
        [d.clone(), a.clone()]
    );
    let start_b = all["sessions"][2]["start_time"].as_i64().unwrap();
    let start_d = all["sessions"][0]["start_time"].as_i64().unwrap();
    assert_eq!(
        ids(&get(
            addr,
            &format!("/sessions?from={start_b}&to={start_d}&order=asc")
        )
        .await
        .1),
        [b.clone(), c.clone()]
    );
    assert_eq!(
        ids(&get(addr, "/sessions?state=human").await.1),
        Vec::<String>::new()
    );

    // Pagination: pages of 1 and 3 walk the same order, no gaps, no repeats.
    for limit in [1, 3] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let q = match &cursor {
                Some(c) => format!("/sessions?sort_by=message_count&limit={limit}&cursor={c}"),
                None => format!("/sessions?sort_by=message_count&limit={limit}"),
            };
            let (s, page) = get(addr, &q).await;
            assert_eq!(s, 200, "{page}");
            seen.extend(ids(&page));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, by_count, "limit {limit}");
    }

    // Every bad request is a 400 that says what is valid.
    for (q, needle) in [
        (
            "sort_by=length",
            "start_time, end_time, message_count, total_tokens, user_id",
        ),
        ("order=up", "asc or desc"),
        ("limit=0", "limit"),
        ("limit=500", "limit"),
        ("state=sleeping", "ai, waiting, human, ended"),
        ("cursor=zzz", "cursor"),
        ("from=yesterday", "milliseconds"),
        ("colour=red", "valid: sort_by"),
        ("user_id=a&user_id=b", "twice"),
    ] {
        let (s, v) = get(addr, &format!("/sessions?{q}")).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{q}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{q}: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcript_metrics_and_ending_a_session() {
    let server = start(config());
    let addr = server.local_addr();
    let sid = conversation(addr, "dora", 2).await;
    // A takeover, so the metrics have one.
    let mut u = connect_user(addr, "dora").await;
    send(&mut u, json!({"type": "help_request", "session_id": sid})).await;
    until(&mut u, "help_requested").await;
    let t = admin_token();
    let mut a = connect(addr, "/ws", Some(&t), None).await.unwrap();
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    until(&mut u, "admin_joined").await;
    send(
        &mut a,
        json!({"type": "admin_message", "session_id": sid, "content": "Hello Dora"}),
    )
    .await;
    until(&mut u, "admin_message").await;
    conversation(addr, "eve", 1).await;

    let (s, one) = get(addr, &format!("/sessions/{sid}")).await;
    assert_eq!(s, 200);
    let roles: Vec<&str> = one["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant", "admin"]);
    assert_eq!(one["messages"][4]["content"], "Hello Dora");
    assert_eq!(one["messages"][0]["content"], "question 0 from dora");
    let actions: Vec<&str> = one["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["help_request", "admin_join"]);
    assert_eq!(one["session"]["state"], "human");
    assert_eq!(get(addr, "/sessions/s_missing").await.0, 404);
    assert_eq!(
        get(addr, "/sessions?state=human").await.1["sessions"][0]["session_id"],
        json!(sid)
    );

    let (s, m) = get(addr, "/metrics").await;
    assert_eq!(s, 200);
    let m = &m["metrics"];
    assert_eq!(
        (m["sessions"].as_u64(), m["messages"].as_u64()),
        (Some(2), Some(7))
    );
    assert_eq!(
        (
            m["user_messages"].as_u64(),
            m["assistant_messages"].as_u64(),
            m["admin_messages"].as_u64()
        ),
        (Some(3), Some(3), Some(1))
    );
    assert_eq!(
        (m["takeovers"].as_u64(), m["help_requests"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(m["responses"].as_u64(), Some(3));
    assert!(m["response_ms_avg"].as_f64().is_some() && m["tokens_out"].as_u64().unwrap() > 0);
    let later = now_secs() as i64 * 1000 + 3_600_000;
    let (_, empty) = get(addr, &format!("/metrics?from={later}")).await;
    assert_eq!(empty["metrics"]["sessions"], 0);
    assert_eq!(get(addr, "/metrics?window=1h").await.0, 400);

    let (s, v) = call(addr, "POST", &format!("/sessions/{sid}/end"), Some(&t)).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("ended")));
    // The live session stops too: everyone in it hears it, and it takes no more.
    until(&mut u, "session_ended").await;
    until(&mut a, "session_ended").await;
    send(
        &mut u,
        json!({"type": "user_message", "id": "late", "session_id": sid, "content": "one more"}),
    )
    .await;
    let (e, _) = until(&mut u, "error").await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("invalid_message"), Some("late"))
    );
    assert!(e["message"].as_str().unwrap().contains("ended"), "{e}");
    let (_, one) = get(addr, &format!("/sessions/{sid}")).await;
    assert_eq!(one["session"]["state"], "ended");
    assert!(one["session"]["end_time"].as_i64().unwrap() > 0);
    assert_eq!(
        get(addr, "/sessions?sort_by=end_time&order=desc&limit=1")
            .await
            .1["sessions"][0]["session_id"],
        json!(sid)
    );
    assert_eq!(
        call(addr, "POST", "/sessions/s_missing/end", Some(&t))
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_data_is_exported_then_deleted() {
    let server = start(config());
    let addr = server.local_addr();
    let sid = conversation(addr, "frank", 2).await;
    conversation(addr, "frank", 1).await;
    let kept = conversation(addr, "grace", 1).await;
    let (s, ex) = get(addr, "/users/frank/export").await;
    assert_eq!(s, 200);
    let sessions = ex["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(
        sessions[0]["messages"][0]["content"],
        "question 0 from frank"
    );

    let (s, _) = call(addr, "DELETE", "/users/frank", Some(&admin_token())).await;
    assert_eq!(s, 200);
    assert_eq!(
        get(addr, "/users/frank/export").await.1["sessions"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(ids(&get(addr, "/sessions").await.1), [kept]);
    // The session is gone for its user too.
    let mut ws = connect_user(addr, "frank").await;
    send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
    assert_eq!(until(&mut ws, "error").await.0["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_has_its_own_rate_limit() {
    let server = start(chatbox::Config {
        admin_rate_limit_per_minute: 3,
        cores: 1,
        ..config()
    });
    let addr = server.local_addr();
    for _ in 0..3 {
        assert_eq!(get(addr, "/metrics").await.0, 200);
    }
    let (s, v) = get(addr, "/metrics").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
}
