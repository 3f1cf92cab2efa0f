//! Reads and parses one HTTP/1.1 request head, bounded in size and time.
//!
//! Routing needs only the head, and a WebSocket upgrade needs nothing else, so the
//! front door reads it itself; plain HTTP requests are then replayed into hyper.

use std::io;

use crate::runtime::gate::Gate;
use crate::runtime::io::Socket;

/// Headers a request may carry; more is refused with 431.
const HEADERS_MAX: usize = 64;

/// The parts of a request head that routing and the upgrade look at.
#[derive(Debug, Clone, Default)]
pub struct Head {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: Option<String>,
    pub http11: bool,
    pub host: Option<String>,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    pub upgrade: Option<String>,
    pub connection: Option<String>,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    /// Every `X-Forwarded-For` header, in order, joined with commas (proxies may
    /// each add their own header instead of extending one).
    pub forwarded_for: Option<String>,
    /// The W3C `traceparent` header as sent; a repeated one is kept empty (W3C:
    /// several are invalid, so the connection starts a trace of its own).
    pub traceparent: Option<String>,
    /// Length of the head in bytes (what follows it is body or early frames).
    pub len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("request head not complete within the time limit")]
    Timeout,
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error("peer closed before sending a complete head")]
    Closed,
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

impl Head {
    /// Parses a complete head; `Ok(None)` means more bytes are needed.
    pub fn parse(buf: &[u8]) -> Result<Option<Head>, HeadError> {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge(buf.len())),
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        };
        let target = req.path.unwrap_or("/");
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (target, None),
        };
        let mut head = Head {
            method: req.method.unwrap_or("").to_owned(),
            path: path.to_owned(),
            query,
            http11: req.version == Some(1),
            len,
            ..Head::default()
        };
        for h in req.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            if name == "x-forwarded-for" {
                head.add_forwarded_for(h.value)?;
                continue;
            }
            if name == "traceparent" {
                // Never a reason to refuse a request: a bad one is only ignored.
                let value = std::str::from_utf8(h.value).unwrap_or_default();
                let seen = head.traceparent.is_some();
                head.traceparent = Some(if seen { "" } else { value.trim() }.to_owned());
                continue;
            }
            let slot = match name.as_str() {
                "host" => &mut head.host,
                "origin" => &mut head.origin,
                "authorization" => &mut head.authorization,
                "upgrade" => &mut head.upgrade,
                "connection" => &mut head.connection,
                "sec-websocket-key" => &mut head.ws_key,
                "sec-websocket-version" => &mut head.ws_version,
                _ => continue,
            };
            let value = std::str::from_utf8(h.value)
                .map_err(|_| HeadError::Malformed(format!("header {} is not UTF-8", h.name)))?;
            if slot.is_some() {
                return Err(HeadError::Malformed(format!("duplicate header {}", h.name)));
            }
            *slot = Some(value.trim().to_owned());
        }
        Ok(Some(head))
    }

    fn add_forwarded_for(&mut self, value: &[u8]) -> Result<(), HeadError> {
        let value = std::str::from_utf8(value)
            .map_err(|_| HeadError::Malformed("header X-Forwarded-For is not UTF-8".into()))?;
        match &mut self.forwarded_for {
            Some(list) => {
                list.push_str(", ");
                list.push_str(value.trim());
            }
            None => self.forwarded_for = Some(value.trim().to_owned()),
        }
        Ok(())
    }

    /// The value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_deref()?.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// True if the comma-separated header `value` contains `token` (case-insensitive).
pub fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Reads until a complete head is buffered. Returns the bytes read (the head and
/// anything after it) and the parsed head.
pub async fn read_head(
    sock: &Socket,
    bytes_max: usize,
    deadline: monoio::time::Instant,
    gate: &Gate,
) -> Result<(Vec<u8>, Head), HeadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024.min(bytes_max));
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= bytes_max {
                return Err(HeadError::TooLarge(bytes_max));
            }
            buf.reserve((buf.len() * 2).min(bytes_max) - buf.len());
        }
        let start = buf.len();
        buf.resize(buf.capacity().min(bytes_max), 0);
        let got = sock.try_recv(&mut buf[start..]);
        match got {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => {
                buf.truncate(start + n);
                if let Some(head) = Head::parse(&buf)? {
                    return Ok((buf, head));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.truncate(start);
                monoio::select! {
                    r = sock.readable() => r?,
                    _ = monoio::time::sleep_until(deadline) => return Err(HeadError::Timeout),
                    _ = gate.stopped() => return Err(HeadError::ShuttingDown),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_upgrade_head() {
        let raw =
            b"GET /chatbox/ws?token=a%2Bb&x=1 HTTP/1.1\r\nHost: h:1\r\nUpgrade: websocket\r\n\
Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\nrest";
        let h = Head::parse(raw).unwrap().unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/chatbox/ws");
        assert_eq!(h.query_param("token").as_deref(), Some("a+b"));
        assert_eq!(h.query_param("y"), None);
        assert!(has_token(h.connection.as_deref(), "upgrade"));
        assert_eq!(h.ws_key.as_deref(), Some("k"));
        assert_eq!(&raw[h.len..], b"rest");
    }

    #[test]
    fn partial_malformed_and_duplicate() {
        assert!(Head::parse(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
        assert!(matches!(
            Head::parse(b"\x00\x01 nonsense\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let dup = b"GET / HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n";
        assert!(matches!(Head::parse(dup), Err(HeadError::Malformed(_))));
    }

    #[test]
    fn forwarded_for_headers_are_joined_in_order() {
        let raw = b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1, 2.2.2.2\r\n\
x-forwarded-for:  3.3.3.3 \r\n\r\n";
        let h = Head::parse(raw).unwrap().unwrap();
        assert_eq!(
            h.forwarded_for.as_deref(),
            Some("1.1.1.1, 2.2.2.2, 3.3.3.3")
        );
        let none = Head::parse(b"GET / HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(none.forwarded_for, None);
    }

    #[test]
    fn a_repeated_traceparent_is_kept_empty_and_never_refused() {
        let one = b"GET / HTTP/1.1\r\nTraceparent:  00-ab-cd-01 \r\n\r\n";
        let h = Head::parse(one).unwrap().unwrap();
        assert_eq!(h.traceparent.as_deref(), Some("00-ab-cd-01"));
        let two = b"GET / HTTP/1.1\r\ntraceparent: a\r\ntraceparent: b\r\n\r\n";
        let h = Head::parse(two).unwrap().unwrap();
        assert_eq!(h.traceparent.as_deref(), Some(""));
        let binary = b"GET / HTTP/1.1\r\ntraceparent: \xff\r\n\r\n";
        assert!(Head::parse(binary).unwrap().is_some());
    }
}
