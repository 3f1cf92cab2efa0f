//! The configuration's own rules: declared bounds, pairs that must agree, secrets,
//! URLs and names. Rules that need other modules (the model list, notification
//! channels) live there and are composed by `crate::check_config`.

use super::{Config, ConfigError};

impl Config {
    /// Checks every value against the configuration's own rules and reports all
    /// problems at once, each with its fix. `dev` relaxes the secrets that `--dev`
    /// generates itself. Start-up runs `crate::check_config`, which adds the checks
    /// of the model list and the notification channels.
    pub fn validate(&self, dev: bool) -> Result<(), ConfigError> {
        let problems = self.problems(dev);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// What [`Config::validate`] reports, as a list to which callers can add the
    /// problems other modules find.
    pub fn problems(&self, dev: bool) -> Vec<String> {
        let mut problems = self.bound_problems();
        problems.extend(self.pair_problems());
        problems.extend(self.secret_problems(dev));
        problems.extend(self.storage_problems());
        problems.extend(self.endpoint_problems());
        problems
    }

    /// Pairs set explicitly against each other (unset ones were derived to agree).
    fn pair_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.ws_frames_per_minute_max < self.rate_limit_per_minute {
            problems.push(format!(
                "CHATBOX_WS_FRAMES_PER_MINUTE_MAX ({}) must be at least \
                 CHATBOX_RATE_LIMIT_PER_MINUTE ({}); leave it unset to derive it",
                self.ws_frames_per_minute_max, self.rate_limit_per_minute
            ));
        }
        if self.ws_message_bytes_max < self.ws_frame_bytes_max {
            problems.push(format!(
                "CHATBOX_WS_MESSAGE_BYTES_MAX ({}) must be at least CHATBOX_WS_FRAME_BYTES_MAX \
                 ({}); set only one of them and the other follows",
                self.ws_message_bytes_max, self.ws_frame_bytes_max
            ));
        }
        if self.http_request_timeout_ms < self.http_head_timeout_ms {
            problems.push(format!(
                "CHATBOX_HTTP_REQUEST_TIMEOUT_MS ({}) must be at least \
                 CHATBOX_HTTP_HEAD_TIMEOUT_MS ({}); set only one of them and the other follows",
                self.http_request_timeout_ms, self.http_head_timeout_ms
            ));
        }
        if self.session_end_idle_secs < self.session_idle_secs {
            problems.push(format!(
                "CHATBOX_SESSION_END_IDLE_SECS ({}) must be at least CHATBOX_SESSION_IDLE_SECS \
                 ({}): an idle session leaves memory no later than it ends; set only one of them and \
                 the other follows",
                self.session_end_idle_secs, self.session_idle_secs
            ));
        }
        if self.outbox_dead_retention_secs < self.outbox_delivered_retention_secs {
            problems.push(format!(
                "CHATBOX_OUTBOX_DEAD_RETENTION_SECS ({}) must be at least \
                 CHATBOX_OUTBOX_DELIVERED_RETENTION_SECS ({}): dead letters are kept longer; \
                 set only one of them and the other follows",
                self.outbox_dead_retention_secs, self.outbox_delivered_retention_secs
            ));
        }
        problems
    }

    fn secret_problems(&self, dev: bool) -> Vec<String> {
        let mut problems = Vec::new();
        match &self.jwt_secret {
            None if !dev => problems.push(
                "CHATBOX_JWT_SECRET is required (or start with --dev); make one with \
                 `openssl rand -hex 32`"
                    .into(),
            ),
            Some(s) if s.len() < 32 => problems.push(format!(
                "CHATBOX_JWT_SECRET is {} bytes; HS256 needs at least 32 \
                 (make one with `openssl rand -hex 32`)",
                s.len()
            )),
            _ => {}
        }
        match &self.encryption_key {
            None if !dev => problems.push(
                "CHATBOX_ENCRYPTION_KEY is required (or start with --dev); make one with \
                 `openssl rand -hex 32`"
                    .into(),
            ),
            Some(key) => problems.extend(parse_encryption_key(key).err()),
            None => {}
        }
        for key in &self.encryption_previous_keys {
            if let Err(e) = parse_encryption_key(key) {
                problems.push(format!("CHATBOX_ENCRYPTION_PREVIOUS_KEYS: {e}"));
            }
        }
        // An empty claim to match would refuse every token: unset it instead.
        for (name, value) in [
            ("CHATBOX_JWT_ISSUER", &self.jwt_issuer),
            ("CHATBOX_JWT_AUDIENCE", &self.jwt_audience),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                problems.push(format!(
                    "{name} must not be empty; leave it unset to not check it"
                ));
            }
        }
        problems
    }

    fn storage_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(uri) = &self.mongo_uri {
            if !uri.starts_with("mongodb://") && !uri.starts_with("mongodb+srv://") {
                problems
                    .push("CHATBOX_MONGO_URI must start with mongodb:// or mongodb+srv://".into());
            }
        }
        problems.extend(self.cluster_problems());
        problems.extend(self.file_store_problems());
        for t in &self.upload_types_allowed {
            let (kind, sub) = t.split_once('/').unwrap_or(("", ""));
            if kind.is_empty() || sub.is_empty() || t.contains([' ', ';', ',']) {
                problems.push(format!(
                    "CHATBOX_UPLOAD_TYPES_ALLOWED: {t:?} is not a MIME type such as image/png"
                ));
            }
        }
        let concern = &self.mongo_write_concern;
        if concern != "majority" && !concern.parse::<u32>().is_ok_and(|n| n >= 1) {
            problems.push(
                "CHATBOX_MONGO_WRITE_CONCERN must be majority or a number of nodes (>= 1)".into(),
            );
        }
        let db = &self.mongo_database;
        if db.is_empty() || db.len() > 63 || db.contains(['/', '\\', '.', ' ', '"', '$']) {
            problems.push(
                "CHATBOX_MONGO_DATABASE must be 1-63 characters without / \\ . space \" $".into(),
            );
        }
        problems
    }

    fn cluster_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.nats_url.is_empty() && self.mongo_uri.is_none() {
            problems.push(
                "CHATBOX_NATS_URL turns cluster mode on, which needs CHATBOX_MONGO_URI: every \
                 node must reach the same store, where messages become durable and a \
                 session's owner is fenced (docs/CLUSTER.md)"
                    .into(),
            );
        }
        for url in &self.nats_url {
            if !url.starts_with("nats://") && !url.starts_with("tls://") {
                problems.push("CHATBOX_NATS_URL entries must start with nats:// or tls://".into());
            }
        }
        if let Some(id) = &self.node_id {
            if !subject_token_ok(id, 64) {
                problems.push("CHATBOX_NODE_ID must be 1-64 letters, digits, '-' or '_'".into());
            }
        }
        let prefix_ok = self
            .nats_subject_prefix
            .split('.')
            .all(|t| subject_token_ok(t, 64));
        if !prefix_ok {
            problems.push(
                "CHATBOX_NATS_SUBJECT_PREFIX must be dot-separated tokens of letters, digits, \
                 '-' or '_'"
                    .into(),
            );
        }
        if self.cluster_member_timeout_ms < 2 * self.cluster_heartbeat_ms {
            problems.push(
                "CHATBOX_CLUSTER_MEMBER_TIMEOUT_MS must be at least twice \
                 CHATBOX_CLUSTER_HEARTBEAT_MS (one lost heartbeat must not drop a node)"
                    .into(),
            );
        }
        if self.lease_ttl_ms < self.cluster_member_timeout_ms {
            problems.push(
                "CHATBOX_LEASE_TTL_MS must be at least CHATBOX_CLUSTER_MEMBER_TIMEOUT_MS (a \
                 node's users must not move before the others see it gone)"
                    .into(),
            );
        }
        problems
    }

    /// The file store: a known one, configured, and shared in cluster mode.
    fn file_store_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let (store, _) = self.file_store_choice();
        match store {
            "local" if self.cluster() => problems.push(
                "cluster mode needs shared file storage (s3 or gridfs): with CHATBOX_FILE_STORE=local \
                 a file could be fetched only from the node that took its upload; set \
                 CHATBOX_S3_BUCKET (and CHATBOX_S3_ENDPOINT) or CHATBOX_FILE_STORE=gridfs"
                    .into(),
            ),
            "local" => {}
            "s3" if self.s3_bucket.is_none() => problems.push(
                "CHATBOX_FILE_STORE=s3 needs CHATBOX_S3_BUCKET (and CHATBOX_S3_ENDPOINT for a \
                 server other than AWS)"
                    .into(),
            ),
            "gridfs" if self.mongo_uri.is_none() => {
                problems.push("CHATBOX_FILE_STORE=gridfs needs CHATBOX_MONGO_URI".into())
            }
            "s3" | "gridfs" => {}
            other => problems.push(format!(
                "CHATBOX_FILE_STORE {other:?} must be local, s3 or gridfs"
            )),
        }
        if let Some(url) = &self.s3_endpoint {
            if let Err(e) = crate::outbound::check_endpoint(url) {
                problems.push(format!("CHATBOX_S3_ENDPOINT {e}"));
            }
        }
        if let Some(b) = &self.s3_bucket {
            let ok = (3..=63).contains(&b.len())
                && b.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'
                });
            if !ok {
                problems.push(
                    "CHATBOX_S3_BUCKET must be a bucket name: 3-63 lower-case letters, digits, \
                     '-' or '.'"
                        .into(),
                );
            }
        }
        if self.s3_access_key_id.is_some() != self.s3_secret_access_key.is_some() {
            problems.push(
                "CHATBOX_S3_ACCESS_KEY_ID and CHATBOX_S3_SECRET_ACCESS_KEY go together: set both, \
                 or neither to use the instance's credentials"
                    .into(),
            );
        }
        problems
    }

    fn endpoint_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let p = &self.path_prefix;
        let prefix_ok =
            p.is_empty() || (p.starts_with('/') && !p.ends_with('/') && !p.contains(['?', '#']));
        if !prefix_ok {
            problems.push(format!(
                "CHATBOX_PATH_PREFIX {p:?} must be empty or start with '/' and not end with '/'"
            ));
        }
        if let Some(e) = &self.echo_path {
            let builtin = ["/ws", "/healthz", "/readyz", "/metrics"].contains(&e.as_str());
            if !e.starts_with('/') || e.len() < 2 || builtin {
                problems.push(format!(
                    "CHATBOX_ECHO_PATH {e:?} must start with '/' and not be a built-in endpoint"
                ));
            }
        }
        for o in &self.allowed_origins {
            if o != "*" && !valid_origin(o) {
                problems.push(format!(
                    "CHATBOX_ALLOWED_ORIGINS entry {o:?} must be `*` or scheme://host[:port] \
                     with no path, e.g. https://support.example.com"
                ));
            }
        }
        problems
    }
}

/// Decodes a 64-hex-character key, or says how to make a right one.
pub fn parse_encryption_key(key: &str) -> Result<[u8; 32], String> {
    let how = "make one with `openssl rand -hex 32`";
    let bytes = hex::decode(key.trim()).map_err(|_| {
        format!("CHATBOX_ENCRYPTION_KEY must be 64 hex characters (32 bytes); {how}")
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "CHATBOX_ENCRYPTION_KEY is {} bytes; it must be exactly 32 (64 hex characters); {how}",
            b.len()
        )
    })
}

/// `scheme://host[:port]` with nothing after it.
/// A NATS subject token chatbox accepts: no dots, wildcards or spaces.
pub fn subject_token_ok(token: &str, len_max: usize) -> bool {
    (1..=len_max).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '@', ' '])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_required_outside_dev_and_errors_are_collected() {
        let c = Config {
            path_prefix: "chatbox/".into(),
            max_connections_per_user: 0,
            ..Config::default()
        };
        let e = c.validate(false).unwrap_err().to_string();
        assert!(e.contains("CHATBOX_JWT_SECRET is required"), "{e}");
        assert!(e.contains("openssl rand -hex 32"), "{e}");
        assert!(e.contains("CHATBOX_PATH_PREFIX"), "{e}");
        assert!(e.contains("CHATBOX_MAX_CONNECTIONS_PER_USER"), "{e}");
        assert!(e.contains("CHATBOX_ENCRYPTION_KEY is required"), "{e}");
        let dev = Config::default();
        dev.validate(true).unwrap();
    }

    #[test]
    fn bounds_come_from_the_declarations_with_their_units() {
        let c = Config {
            mongo_write_retry_secs: 0,
            ws_ping_interval_ms: 5,
            cores: 2000,
            ..Config::default()
        };
        let e = c.validate(true).unwrap_err().to_string();
        assert!(
            e.contains("CHATBOX_MONGO_WRITE_RETRY_SECS must be between 1 and 3600 s; it is 0"),
            "{e}"
        );
        assert!(
            e.contains("CHATBOX_WS_PING_INTERVAL_MS must be at least 10 ms; it is 5"),
            "{e}"
        );
        assert!(
            e.contains("CHATBOX_CORES must be between 0 and 1024"),
            "{e}"
        );
    }

    #[test]
    fn cluster_mode_needs_mongodb_and_subject_safe_names() {
        let c = Config {
            nats_url: vec!["nats://127.0.0.1:4222".into(), "http://x".into()],
            node_id: Some("node.1".into()),
            nats_subject_prefix: "acme.chat*".into(),
            cluster_heartbeat_ms: 1000,
            cluster_member_timeout_ms: 1500,
            ..Config::default()
        };
        let e = c.validate(true).unwrap_err().to_string();
        for needle in [
            "CHATBOX_NATS_URL turns cluster mode on, which needs CHATBOX_MONGO_URI",
            "entries must start with nats://",
            "CHATBOX_NODE_ID must be",
            "CHATBOX_NATS_SUBJECT_PREFIX must be",
            "at least twice",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let ok = Config {
            nats_url: vec!["nats://127.0.0.1:4222".into()],
            mongo_uri: Some("mongodb://127.0.0.1:27017".into()),
            node_id: Some("node-1".into()),
            nats_subject_prefix: "acme.chat".into(),
            ..Config::default()
        };
        assert!(ok.validate(true).is_ok());
    }

    #[test]
    fn encryption_key_must_be_32_bytes_of_hex() {
        assert!(parse_encryption_key(&"ab".repeat(32)).is_ok());
        let e = parse_encryption_key(&"ab".repeat(16)).unwrap_err();
        assert!(
            e.contains("16 bytes") && e.contains("openssl rand -hex 32"),
            "{e}"
        );
        assert!(parse_encryption_key("not hex")
            .unwrap_err()
            .contains("64 hex"));
    }

    #[test]
    fn origins_must_be_bare_origins() {
        for ok in ["https://a.example", "http://localhost:3000", "*"] {
            let c = Config {
                allowed_origins: vec![ok.into()],
                ..Config::default()
            };
            c.validate(true).unwrap();
        }
        for bad in [
            "a.example",
            "https://a.example/",
            "https://a.example/path",
            "https://",
        ] {
            let c = Config {
                allowed_origins: vec![bad.into()],
                ..Config::default()
            };
            assert!(c.validate(true).is_err(), "{bad} accepted");
        }
    }
}
