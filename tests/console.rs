//! The web console as the server delivers it: every file of `console/` embedded
//! and served with its type, a Content-Security-Policy without inline script, an
//! ETag; nothing else under `{prefix}/console/`. The pages themselves are driven
//! in a real browser by tests/browser/ (Playwright, run by .ci/run).

mod common;

use common::*;

/// Every file in `console/`, sorted.
fn on_disk() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn every_console_file_is_embedded_and_nothing_else() {
    let mut embedded: Vec<String> = chatbox::app::console::asset_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    embedded.sort();
    assert_eq!(embedded, on_disk(), "src/app/console.rs ASSETS vs console/");
}

#[test]
fn no_page_has_inline_script_or_handlers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
    for name in on_disk().iter().filter(|n| n.ends_with(".html")) {
        let html = std::fs::read_to_string(dir.join(name))
            .unwrap()
            .to_lowercase();
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').unwrap()];
            assert!(tag.contains(" src="), "{name}: an inline script: {tag}");
        }
        let handler = regex_free_handler(&html);
        assert!(handler.is_none(), "{name}: an inline handler {handler:?}");
        assert!(!html.contains("javascript:"), "{name}: a javascript: URL");
    }
}

/// An ` on...=` attribute, if the page has one.
fn regex_free_handler(html: &str) -> Option<String> {
    html.match_indices(" on").find_map(|(i, _)| {
        let rest = &html[i + 3..];
        let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
        (!name.is_empty() && rest[name.len()..].trim_start().starts_with('='))
            .then(|| format!("on{name}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_with_its_type_and_a_strict_policy() {
    let server = start(config());
    let addr = server.local_addr();
    let (status, head, body) = get(addr, "/chatbox/console/").await;
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("<title>chatbox"), "{body}");
    let header = |head: &str, name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    assert_eq!(header(&head, "content-type"), "text/html; charset=utf-8");
    let csp = header(&head, "content-security-policy");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(header(&head, "x-content-type-options"), "nosniff");
    assert_eq!(header(&head, "referrer-policy"), "no-referrer");
    for (path, mime) in [
        ("/chatbox/console/chat.html", "text/html; charset=utf-8"),
        (
            "/chatbox/console/widget.js",
            "text/javascript; charset=utf-8",
        ),
        ("/chatbox/console/console.css", "text/css; charset=utf-8"),
    ] {
        let (status, head, _) = get(addr, path).await;
        assert_eq!(
            (status, header(&head, "content-type")),
            (200, mime.into()),
            "{path}"
        );
    }
    // Revalidation: the same ETag answers 304 without the body.
    let (_, head, _) = get(addr, "/chatbox/console/agent.js").await;
    let etag = header(&head, "etag");
    assert!(etag.starts_with('"'), "{head}");
    let req = format!(
        "GET /chatbox/console/agent.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n"
    );
    let (status, _, body) = http(addr, &req).await;
    assert_eq!((status, body.as_str()), (304, ""));
    // The bare path moves to the slash (relative links need it); nothing else
    // is served; only GET and HEAD.
    let (status, head, _) = get(addr, "/chatbox/console").await;
    assert_eq!(
        (status, header(&head, "location")),
        (308, "/chatbox/console/".into())
    );
    for missing in [
        "/chatbox/console/nope.js",
        "/chatbox/console/../chatbox.db",
        "/chatbox/consoles",
    ] {
        assert_eq!(get(addr, missing).await.0, 404, "{missing}");
    }
    let req = "POST /chatbox/console/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(http(addr, req).await.0, 405);
    server.shutdown();
    stop(server).await;
}
