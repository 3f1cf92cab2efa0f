//! The admin transcript and export stream in pages: a history many pages long
//! comes back complete and in order, as a chunked body, read from storage in
//! pages no larger than `admin_page_messages`.

mod common;

use std::net::SocketAddr;

use chatbox::auth::now_secs;
use common::*;
use serde_json::{json, Value};

/// Status, lower-cased head and JSON body of an admin GET.
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String, Value) {
    let admin = token_with("boss", &["admin"], now_secs() + 3600);
    let req = format!(
        "GET /chatbox/admin{path} HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {admin}\r\nContent-Length: 0\r\n\r\n"
    );
    let (status, head, body) = http(addr, &req).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, head, v)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The user questions of a message list, in order.
fn questions(messages: &Value) -> Vec<String> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_histories_stream_complete_and_in_order_in_bounded_pages() {
    let server = start(chatbox::Config {
        admin_page_messages: 3,
        ..config()
    });
    let addr = server.local_addr();
    // 20 messages: seven pages of at most three.
    let long = conversation(addr, "paula", 10).await;
    let short = conversation(addr, "paula", 2).await;
    let asked: Vec<String> = (0..10)
        .map(|i| format!("question {i} from paula"))
        .collect();

    let (status, head, t) = admin_get(addr, &format!("/sessions/{long}")).await;
    assert_eq!(status, 200, "{t}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(t["session"]["session_id"], json!(long));
    assert_eq!(t["session"]["message_count"], 20);
    let seqs: Vec<u64> = t["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
    assert_eq!(questions(&t["messages"]), asked);
    assert!(t["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["content"].is_string()));

    let (_, _, metrics) = get(addr, "/chatbox/metrics").await;
    assert_eq!(metric(&metrics, "chatbox_admin_page_rows_max "), 3);
    let transcript_pages = metric(&metrics, "chatbox_admin_pages_total ");
    assert!(transcript_pages >= 7, "{transcript_pages} pages");

    let (status, head, ex) = admin_get(addr, "/users/paula/export").await;
    assert_eq!(status, 200, "{ex}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(ex["user_id"], "paula");
    let sessions = ex["sessions"].as_array().unwrap();
    let ids: Vec<&Value> = sessions
        .iter()
        .map(|s| &s["session"]["session_id"])
        .collect();
    assert_eq!(ids, [&json!(long), &json!(short)], "oldest first");
    assert_eq!(sessions[0]["messages"].as_array().unwrap().len(), 20);
    assert_eq!(questions(&sessions[0]["messages"]), asked);
    assert_eq!(
        questions(&sessions[1]["messages"]),
        ["question 0 from paula", "question 1 from paula"]
    );
    let (_, _, metrics) = get(addr, "/chatbox/metrics").await;
    assert_eq!(metric(&metrics, "chatbox_admin_page_rows_max "), 3);
    assert!(metric(&metrics, "chatbox_admin_pages_total ") >= transcript_pages + 9);

    // A missing session is still a plain 404, decided before anything streams.
    let (status, _, v) = admin_get(addr, "/sessions/nope").await;
    assert_eq!((status, &v["error"]["code"]), (404, &json!("not_found")));
    server.shutdown();
    stop(server).await;
}
