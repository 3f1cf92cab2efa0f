//! `mongodb+srv://` URIs (what MongoDB Atlas hands out) pass validation and are
//! resolved in DNS at start-up: on a machine without DNS, or for a host without
//! records, the error names the lookup and the host, never "unsupported", and
//! never the password the URI carries.

mod common;

use std::time::{Duration, Instant};

use chatbox::store::{Backend, StoreError};
use common::*;

#[test]
fn a_srv_uri_is_accepted_and_fails_on_its_dns_lookup_clearly() {
    let cfg = chatbox::Config {
        mongo_uri: Some(
            "mongodb+srv://app:s3cret-pw@cluster0.chatbox-test.invalid/?retryWrites=true".into(),
        ),
        mongo_connect_timeout_ms: 3000,
        ..config()
    };
    chatbox::check_config(&cfg, false).expect("a mongodb+srv:// URI is a valid setting");
    let (_rt, pool) = chatbox::pool::PoolRuntime::start(1, 16).unwrap();
    let started = Instant::now();
    let err = match chatbox::store::open(&cfg, Backend::Mongo, pool) {
        Ok(_) => panic!("cluster0.chatbox-test.invalid has no DNS records"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(matches!(err, StoreError::SrvLookup { .. }), "{err:?}");
    assert!(
        text.contains("DNS SRV lookup of _mongodb._tcp.cluster0.chatbox-test.invalid"),
        "{text}"
    );
    assert!(
        !text.contains("s3cret-pw") && !text.contains("supported"),
        "{text}"
    );
    // Bounded by mongo_connect_timeout_ms, whatever the DNS server does.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn other_schemes_are_still_refused() {
    let cfg = chatbox::Config {
        mongo_uri: Some("postgres://127.0.0.1/db".into()),
        ..config()
    };
    let err = chatbox::check_config(&cfg, false).unwrap_err().to_string();
    assert!(err.contains("mongodb:// or mongodb+srv://"), "{err}");
}
