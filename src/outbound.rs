//! Which outbound URLs chatbox may call, and the one way its HTTP clients are
//! built: https anywhere, plain http only to a loopback host (a model server or a
//! webhook receiver on the same machine), and never a redirect.
//!
//! URLs are read with the `url` crate, the parser reqwest itself uses, so the host
//! checked here is the host connected to: `http://127.0.0.1:1@example.com` is a
//! request to example.com (with user `127.0.0.1`), and is refused.

use std::net::IpAddr;

use url::{Host, Url};

/// Why an outbound URL is refused. Messages name the scheme or host, never the
/// whole URL: paths and queries of webhook URLs are often secrets themselves.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("is not a URL ({0})")]
    NotAUrl(#[from] url::ParseError),
    #[error("must be https (plain http only for loopback); {0}:// is not allowed")]
    Scheme(String),
    #[error(
        "must be https: plain http is allowed only to loopback (127.0.0.0/8, ::1, localhost), \
         not to {0}"
    )]
    NotLoopback(String),
    #[error("has no host")]
    NoHost,
}

/// Endpoints (model APIs, webhooks) must be https, except on a loopback host.
pub fn check_endpoint(url: &str) -> Result<(), Refused> {
    let parsed = Url::parse(url)?;
    let host = parsed.host().ok_or(Refused::NoHost)?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if host_is_loopback(&host) => Ok(()),
        "http" => Err(Refused::NotLoopback(host.to_string())),
        other => Err(Refused::Scheme(other.to_owned())),
    }
}

fn host_is_loopback(host: &Host<&str>) -> bool {
    match host {
        // The parser lower-cases domains; `localhost.` and `localhost.evil.com` are
        // other names.
        Host::Domain(d) => *d == "localhost",
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// Whether a bare host name or address (an SMTP server's, say) is this machine:
/// `localhost`, 127.0.0.0/8 or `::1` (bracketed or not).
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An HTTP client builder for outbound calls. Redirects are never followed: an
/// endpoint that answers 3xx fails like any other error status, so a receiver
/// cannot send our request (its signature, an API key) somewhere that was never
/// checked, such as a plain-http or internal address.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
}

/// `e` with its causes (`: `-separated) and without the URL reqwest attaches to
/// its errors, for messages that are logged and stored.
pub fn error_text(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https_except_loopback() {
        for ok in [
            "https://api.openai.com/v1",
            "HTTPS://api.openai.com/v1",
            "https://10.0.0.1/v1",
            "http://127.0.0.1:11434/v1",
            "http://127.3.4.5/v1",
            "http://localhost:8000",
            "http://LOCALHOST:8000/x",
            "http://[::1]:80/v1",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://api.openai.com/v1",
            "http://10.0.0.1/v1",
            "ftp://x",
            "http://localhost.evil.com/v1",
            "http://localhost./v1",
            "http://[::ffff:10.0.0.1]/v1",
            "http:///v1",
            "not a url",
            "file:///etc/passwd",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    /// The user-info part of a URL is not its host.
    #[test]
    fn userinfo_that_looks_like_loopback_is_not_the_host() {
        for bad in [
            "http://127.0.0.1:1@example.com",
            "http://127.0.0.1:1@example.com/v1",
            "http://localhost@example.com/",
            "http://[::1]@example.com/",
            "http://127.0.0.1%3A1@example.com/",
        ] {
            assert_eq!(
                check_endpoint(bad),
                Err(Refused::NotLoopback("example.com".into())),
                "{bad}"
            );
        }
        // Over https the user-info is the receiver's business.
        assert_eq!(check_endpoint("https://127.0.0.1:1@example.com"), Ok(()));
    }

    #[test]
    fn refusals_do_not_repeat_the_url() {
        let e = check_endpoint("http://hooks.example.com/T0P-S3CRET?k=v")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be https") && e.contains("hooks.example.com"));
        assert!(!e.contains("T0P-S3CRET"), "{e}");
    }

    #[test]
    fn loopback_hosts() {
        for yes in ["localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]"] {
            assert!(is_loopback_host(yes), "{yes}");
        }
        for no in ["smtp.example.com", "10.0.0.1", "localhost.", "", "[::2]"] {
            assert!(!is_loopback_host(no), "{no}");
        }
    }
}
