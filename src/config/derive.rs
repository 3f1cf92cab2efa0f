//! Defaults that follow other keys. A limit that must stay on one side of another
//! takes its default from it when nobody set it, so raising one setting alone never
//! stops start-up; only a pair set explicitly against each other is refused (by
//! validation, with a message naming both).

use super::Config;

/// The frame flood guard when it is not set: room for the chat traffic the rate
/// limit allows plus the frames that are not messages (pings, resumes, cancels).
pub fn frames_per_minute_for(rate_limit_per_minute: u32) -> u32 {
    rate_limit_per_minute.saturating_mul(10).max(600)
}

/// The SMTP port when it is not set: 465 is the port of implicit TLS, which 587
/// (submission with STARTTLS) does not speak.
pub fn smtp_port_for(tls: &str) -> Option<u16> {
    (tls == "tls").then_some(465)
}

/// Where uploads go when `file_store` is not set, and the key that decided it:
/// a bucket when one is configured, GridFS in cluster mode (every node reaches
/// the same MongoDB, and local disk is not shared), else the data directory.
pub fn file_store_for(config: &Config) -> (&'static str, &'static str) {
    if config.s3_bucket.is_some() {
        ("s3", "s3_bucket")
    } else if config.cluster() && config.mongo_uri.is_some() {
        ("gridfs", "nats_url and mongo_uri")
    } else {
        ("local", "the default")
    }
}

/// Returns `(low, high)` for a pair that must satisfy `low <= high`, moving the one
/// that was not set towards the one that was; when both or neither were set it
/// leaves them alone (validation reports a contradiction).
pub fn ordered_pair<T: Ord + Copy>(low: T, low_set: bool, high: T, high_set: bool) -> (T, T) {
    match (low_set, high_set) {
        (true, false) => (low, high.max(low)),
        (false, true) => (low.min(high), high),
        _ => (low, high),
    }
}

impl Config {
    /// Fills in the defaults that depend on other keys, for the keys not in `set`
    /// (those the file or the environment gave). Returns one line per value that
    /// differs from its static default, for the log.
    pub(super) fn derive_defaults(&mut self, set: &[&str]) -> Vec<String> {
        let given = |field: &str| set.contains(&field);
        let mut notes = Vec::new();
        let mut note = |field: &str, value: String, from: &str| {
            notes.push(format!("{field} = {value} (derived from {from})"));
        };
        if !given("ws_frames_per_minute_max") {
            let frames = frames_per_minute_for(self.rate_limit_per_minute);
            if frames != self.ws_frames_per_minute_max {
                self.ws_frames_per_minute_max = frames;
                note(
                    "ws_frames_per_minute_max",
                    frames.to_string(),
                    "rate_limit_per_minute",
                );
            }
        }
        let (frame, message) = ordered_pair(
            self.ws_frame_bytes_max,
            given("ws_frame_bytes_max"),
            self.ws_message_bytes_max,
            given("ws_message_bytes_max"),
        );
        if (frame, message) != (self.ws_frame_bytes_max, self.ws_message_bytes_max) {
            let (field, value, from) = if frame != self.ws_frame_bytes_max {
                ("ws_frame_bytes_max", frame, "ws_message_bytes_max")
            } else {
                ("ws_message_bytes_max", message, "ws_frame_bytes_max")
            };
            (self.ws_frame_bytes_max, self.ws_message_bytes_max) = (frame, message);
            note(field, value.to_string(), from);
        }
        let (head, request) = ordered_pair(
            self.http_head_timeout_ms,
            given("http_head_timeout_ms"),
            self.http_request_timeout_ms,
            given("http_request_timeout_ms"),
        );
        if (head, request) != (self.http_head_timeout_ms, self.http_request_timeout_ms) {
            let (field, value, from) = if head != self.http_head_timeout_ms {
                ("http_head_timeout_ms", head, "http_request_timeout_ms")
            } else {
                ("http_request_timeout_ms", request, "http_head_timeout_ms")
            };
            (self.http_head_timeout_ms, self.http_request_timeout_ms) = (head, request);
            note(field, value.to_string(), from);
        }
        if !given("cluster_member_timeout_ms") {
            let timeout = 3 * self.cluster_heartbeat_ms;
            if timeout != self.cluster_member_timeout_ms {
                self.cluster_member_timeout_ms = timeout;
                note(
                    "cluster_member_timeout_ms",
                    timeout.to_string(),
                    "cluster_heartbeat_ms",
                );
            }
        }
        if !given("lease_ttl_ms") {
            let ttl = 2 * self.cluster_member_timeout_ms;
            if ttl != self.lease_ttl_ms {
                self.lease_ttl_ms = ttl;
                note("lease_ttl_ms", ttl.to_string(), "cluster_member_timeout_ms");
            }
        }
        if !given("sqlite_readers_max") && self.sqlite_readers_max != self.blocking_threads {
            self.sqlite_readers_max = self.blocking_threads;
            note(
                "sqlite_readers_max",
                self.blocking_threads.to_string(),
                "blocking_threads",
            );
        }
        for (low, high) in [
            ("session_idle_secs", "session_end_idle_secs"),
            (
                "outbox_delivered_retention_secs",
                "outbox_dead_retention_secs",
            ),
        ] {
            if let Some((field, value, from)) = self.order_secs(low, high, &given) {
                note(field, value.to_string(), from);
            }
        }
        if !given("file_store") {
            let (store, from) = file_store_for(self);
            self.file_store = Some(store.to_owned());
            if store != "local" {
                note("file_store", store.into(), from);
            }
        }
        if !given("notify_smtp_port") {
            if let Some(port) = smtp_port_for(&self.notify_smtp_tls) {
                self.notify_smtp_port = port;
                note("notify_smtp_port", port.to_string(), "notify_smtp_tls");
            }
        }
        notes
    }
}

impl Config {
    /// The seconds field `name`, for the pairs [`Config::order_secs`] keeps ordered.
    fn secs_mut(&mut self, name: &str) -> Option<&mut u64> {
        Some(match name {
            "session_idle_secs" => &mut self.session_idle_secs,
            "session_end_idle_secs" => &mut self.session_end_idle_secs,
            "outbox_delivered_retention_secs" => &mut self.outbox_delivered_retention_secs,
            "outbox_dead_retention_secs" => &mut self.outbox_dead_retention_secs,
            _ => return None,
        })
    }

    /// Keeps `low <= high` for two seconds keys by moving the one not given;
    /// returns (moved key, its value, the key it followed) when one moved.
    fn order_secs(
        &mut self,
        low: &'static str,
        high: &'static str,
        given: &dyn Fn(&str) -> bool,
    ) -> Option<(&'static str, u64, &'static str)> {
        let lo = *self.secs_mut(low)?;
        let hi = *self.secs_mut(high)?;
        let (new_lo, new_hi) = ordered_pair(lo, given(low), hi, given(high));
        if new_lo != lo {
            *self.secs_mut(low)? = new_lo;
            return Some((low, new_lo, high));
        }
        if new_hi != hi {
            *self.secs_mut(high)? = new_hi;
            return Some((high, new_hi, low));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(set: &[&str], cfg: Config) -> (Config, Vec<String>) {
        let mut cfg = cfg;
        let notes = cfg.derive_defaults(set);
        (cfg, notes)
    }

    #[test]
    fn frame_guard_follows_the_rate_limit() {
        assert_eq!(frames_per_minute_for(1), 600);
        assert_eq!(frames_per_minute_for(60), 600);
        assert_eq!(frames_per_minute_for(61), 610);
        assert_eq!(frames_per_minute_for(100_000), 1_000_000);
        assert_eq!(frames_per_minute_for(u32::MAX), u32::MAX);
        let raised = Config {
            rate_limit_per_minute: 1000,
            ..Config::default()
        };
        let (c, notes) = derived(&["rate_limit_per_minute"], raised.clone());
        assert_eq!(c.ws_frames_per_minute_max, 10_000);
        assert!(
            notes[0].contains("ws_frames_per_minute_max = 10000"),
            "{notes:?}"
        );
        c.validate(true).unwrap();
        // Set explicitly, the guard is left as it is, and a contradiction is refused.
        let both = Config {
            ws_frames_per_minute_max: 700,
            ..raised
        };
        let (c, notes) = derived(&["rate_limit_per_minute", "ws_frames_per_minute_max"], both);
        assert_eq!(c.ws_frames_per_minute_max, 700);
        assert!(notes.is_empty());
        let e = c.validate(true).unwrap_err().to_string();
        assert!(e.contains("CHATBOX_WS_FRAMES_PER_MINUTE_MAX (700)"), "{e}");
    }

    #[test]
    fn defaults_derive_nothing() {
        let (c, notes) = derived(&[], Config::default());
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(c.ws_frames_per_minute_max, 600);
        assert_eq!(c.notify_smtp_port, 587);
    }

    #[test]
    fn the_member_timeout_follows_the_heartbeat_unless_set() {
        let cfg = Config {
            cluster_heartbeat_ms: 200,
            ..Config::default()
        };
        let (c, notes) = derived(&["cluster_heartbeat_ms"], cfg.clone());
        assert_eq!(c.cluster_member_timeout_ms, 600);
        assert_eq!(c.lease_ttl_ms, 1200, "the lease follows the member timeout");
        assert_eq!(
            notes,
            [
                "cluster_member_timeout_ms = 600 (derived from cluster_heartbeat_ms)",
                "lease_ttl_ms = 1200 (derived from cluster_member_timeout_ms)"
            ]
        );
        let (c, _) = derived(&["cluster_heartbeat_ms", "cluster_member_timeout_ms"], cfg);
        assert_eq!(c.cluster_member_timeout_ms, 3000, "a set value stays");
    }

    #[test]
    fn ordered_pairs_move_the_side_nobody_set() {
        assert_eq!(ordered_pair(10, true, 5, false), (10, 10));
        assert_eq!(ordered_pair(10, false, 5, true), (5, 5));
        assert_eq!(ordered_pair(10, true, 5, true), (10, 5));
        assert_eq!(ordered_pair(10, false, 5, false), (10, 5));
        assert_eq!(ordered_pair(3, true, 5, false), (3, 5));
    }

    #[test]
    fn frame_and_message_sizes_follow_each_other() {
        let big_frame = Config {
            ws_frame_bytes_max: 1 << 20,
            ..Config::default()
        };
        let (c, _) = derived(&["ws_frame_bytes_max"], big_frame);
        assert_eq!(c.ws_message_bytes_max, 1 << 20);
        c.validate(true).unwrap();
        let small_message = Config {
            ws_message_bytes_max: 1000,
            ..Config::default()
        };
        let (c, notes) = derived(&["ws_message_bytes_max"], small_message);
        assert_eq!(c.ws_frame_bytes_max, 1000);
        assert!(
            notes[0].starts_with("ws_frame_bytes_max = 1000"),
            "{notes:?}"
        );
        c.validate(true).unwrap();
        let contradiction = Config {
            ws_frame_bytes_max: 2000,
            ws_message_bytes_max: 1000,
            ..Config::default()
        };
        let (c, _) = derived(
            &["ws_frame_bytes_max", "ws_message_bytes_max"],
            contradiction,
        );
        let e = c.validate(true).unwrap_err().to_string();
        assert!(e.contains("CHATBOX_WS_MESSAGE_BYTES_MAX (1000)"), "{e}");
    }

    #[test]
    fn head_and_request_timeouts_follow_each_other() {
        let slow_head = Config {
            http_head_timeout_ms: 60_000,
            ..Config::default()
        };
        let (c, _) = derived(&["http_head_timeout_ms"], slow_head);
        assert_eq!(c.http_request_timeout_ms, 60_000);
        c.validate(true).unwrap();
        let quick_request = Config {
            http_request_timeout_ms: 2_000,
            ..Config::default()
        };
        let (c, _) = derived(&["http_request_timeout_ms"], quick_request);
        assert_eq!(c.http_head_timeout_ms, 2_000);
        c.validate(true).unwrap();
    }

    #[test]
    fn ending_idle_sessions_and_evicting_them_follow_each_other() {
        let quick_end = Config {
            session_end_idle_secs: 60,
            ..Config::default()
        };
        let (c, notes) = derived(&["session_end_idle_secs"], quick_end);
        assert_eq!(c.session_idle_secs, 60);
        assert!(
            notes[0].starts_with("session_idle_secs = 60 (derived from session_end_idle_secs)"),
            "{notes:?}"
        );
        c.validate(true).unwrap();
        let slow_evict = Config {
            session_idle_secs: 200_000,
            ..Config::default()
        };
        let (c, _) = derived(&["session_idle_secs"], slow_evict);
        assert_eq!(c.session_end_idle_secs, 200_000);
        c.validate(true).unwrap();
        let contradiction = Config {
            session_idle_secs: 100,
            session_end_idle_secs: 50,
            ..Config::default()
        };
        let (c, _) = derived(
            &["session_idle_secs", "session_end_idle_secs"],
            contradiction,
        );
        let e = c.validate(true).unwrap_err().to_string();
        assert!(e.contains("CHATBOX_SESSION_END_IDLE_SECS (50)"), "{e}");
    }

    #[test]
    fn dead_letters_are_kept_at_least_as_long_as_delivered_rows() {
        let long_delivered = Config {
            outbox_delivered_retention_secs: 90 * 86_400,
            ..Config::default()
        };
        let (c, notes) = derived(&["outbox_delivered_retention_secs"], long_delivered);
        assert_eq!(c.outbox_dead_retention_secs, 90 * 86_400);
        assert!(
            notes[0].starts_with("outbox_dead_retention_secs = 7776000"),
            "{notes:?}"
        );
        let contradiction = Config {
            outbox_delivered_retention_secs: 100,
            outbox_dead_retention_secs: 10,
            ..Config::default()
        };
        let (c, _) = derived(
            &[
                "outbox_delivered_retention_secs",
                "outbox_dead_retention_secs",
            ],
            contradiction,
        );
        let e = c.validate(true).unwrap_err().to_string();
        assert!(e.contains("CHATBOX_OUTBOX_DEAD_RETENTION_SECS (10)"), "{e}");
    }

    #[test]
    fn implicit_tls_uses_its_own_port_unless_one_is_given() {
        let tls = Config {
            notify_smtp_tls: "tls".into(),
            ..Config::default()
        };
        let (c, _) = derived(&["notify_smtp_tls"], tls.clone());
        assert_eq!(c.notify_smtp_port, 465);
        let (c, _) = derived(
            &["notify_smtp_tls", "notify_smtp_port"],
            Config {
                notify_smtp_port: 2465,
                ..tls
            },
        );
        assert_eq!(c.notify_smtp_port, 2465);
    }

    #[test]
    fn the_file_store_follows_the_bucket_and_cluster_mode_unless_set() {
        let cluster = Config {
            nats_url: vec!["nats://127.0.0.1:4222".into()],
            mongo_uri: Some("mongodb://127.0.0.1".into()),
            ..Config::default()
        };
        let (c, notes) = derived(&["nats_url", "mongo_uri"], cluster.clone());
        assert_eq!(c.file_store.as_deref(), Some("gridfs"));
        assert!(
            notes.iter().any(|n| n.contains("file_store = gridfs")),
            "{notes:?}"
        );
        let bucket = Config {
            s3_bucket: Some("files".into()),
            ..cluster.clone()
        };
        let (c, _) = derived(&["s3_bucket"], bucket);
        assert_eq!(c.file_store_choice(), ("s3", "s3_bucket"));
        let (c, notes) = derived(&[], Config::default());
        assert_eq!(c.file_store.as_deref(), Some("local"));
        assert!(notes.is_empty(), "{notes:?}");
        // Set against cluster mode: kept, and refused by validation.
        let local = Config {
            file_store: Some("local".into()),
            ..cluster
        };
        let (c, _) = derived(&["file_store"], local);
        assert_eq!(c.file_store_choice(), ("local", "set by file_store"));
        let e = c.validate(true).unwrap_err().to_string();
        assert!(
            e.contains("cluster mode needs shared file storage (s3 or gridfs)"),
            "{e}"
        );
    }
}
