//! Help-request notifications through a durable outbox: a webhook (timestamp and
//! body signed with HMAC-SHA256) and e-mail over SMTP, retried with jittered
//! backoff and dead-lettered after `notify_max_attempts`.
//!
//! Chat only writes an outbox row (in the same commit path as everything else);
//! a worker on the blocking pool delivers. A slow or broken receiver therefore
//! never delays a user, and queued notifications survive a restart.
//!
//! The webhook URL is treated as a secret (many receivers put a token in it): it
//! never appears in a log line or in a stored error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::config::Config;
use crate::store::{Millis, Notification, Store, WriteOp};

/// Notifications one worker pass takes.
const BATCH: usize = 32;
/// The longest the worker sleeps before looking again (new rows also wake it).
const IDLE_POLL: Duration = Duration::from_secs(5);
/// One delivery attempt's time limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds of how often delivered rows and dead letters past retention are purged.
const PURGE_EVERY_MIN: Duration = Duration::from_secs(1);
const PURGE_EVERY_MAX: Duration = Duration::from_secs(3600);
/// The longest wait between two attempts.
const RETRY_WAIT_MAX: Duration = Duration::from_secs(3600);

pub const KIND_WEBHOOK: &str = "webhook";
pub const KIND_EMAIL: &str = "email";

/// What is known of a help request when it is announced.
#[derive(Debug, Clone)]
pub struct HelpEvent {
    pub session_id: String,
    pub user_id: String,
    pub user_name: String,
    pub at: Millis,
    /// The request that asked for help: its trace id goes into the payload
    /// (`trace_id`), and deliveries send it on as `traceparent`.
    pub trace: Option<crate::trace::TraceCtx>,
}

#[derive(Default)]
pub struct NotifyMetrics {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dead: AtomicU64,
}

struct Smtp {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
    to: Vec<lettre::message::Mailbox>,
}

/// Where webhooks go and the key that signs them.
struct Webhook {
    url: String,
    secret: String,
    client: reqwest::Client,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::secret::Redacted;
        f.debug_struct("Webhook")
            .field("url", &Redacted(&self.url))
            .field("secret", &Redacted(&self.secret))
            .finish_non_exhaustive()
    }
}

pub struct Notifier {
    store: Arc<dyn Store>,
    webhook: Option<Webhook>,
    smtp: Option<Smtp>,
    max_attempts: u32,
    retry_base: Duration,
    wake: tokio::sync::Notify,
    pub metrics: NotifyMetrics,
    /// How long delivered rows and dead letters stay in the outbox.
    delivered_retention: Duration,
    dead_retention: Duration,
}

/// Problems with the notification settings, for `crate::check_config`.
pub fn validate(cfg: &Config) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(url) = &cfg.notify_webhook_url {
        if let Err(e) = crate::outbound::check_endpoint(url) {
            errs.push(format!("CHATBOX_NOTIFY_WEBHOOK_URL {e}"));
        }
        if cfg
            .notify_webhook_secret
            .as_deref()
            .is_none_or(|s| s.len() < 16)
        {
            errs.push(
                "CHATBOX_NOTIFY_WEBHOOK_SECRET (16+ characters) is required with a webhook URL"
                    .into(),
            );
        }
    }
    if cfg.notify_smtp_host.is_some() {
        if cfg.notify_email_from.is_none() || cfg.notify_email_to.is_empty() {
            errs.push("CHATBOX_NOTIFY_EMAIL_FROM and CHATBOX_NOTIFY_EMAIL_TO are required with an SMTP host".into());
        }
        for a in cfg.notify_email_from.iter().chain(&cfg.notify_email_to) {
            if a.parse::<lettre::message::Mailbox>().is_err() {
                errs.push(format!("{a:?} is not an e-mail address"));
            }
        }
        if !["none", "starttls", "tls"].contains(&cfg.notify_smtp_tls.as_str()) {
            errs.push("CHATBOX_NOTIFY_SMTP_TLS must be none, starttls or tls".into());
        }
        errs.extend(clear_text_credentials(cfg));
    }
    if cfg.notify_max_attempts == 0 {
        errs.push("CHATBOX_NOTIFY_MAX_ATTEMPTS must be at least 1".into());
    }
    errs
}

/// Credentials sent without TLS can be read on the way: only to this machine.
fn clear_text_credentials(cfg: &Config) -> Option<String> {
    let host = cfg.notify_smtp_host.as_deref()?;
    let login = cfg.notify_smtp_username.is_some() || cfg.notify_smtp_password.is_some();
    if cfg.notify_smtp_tls != "none" || !login || crate::outbound::is_loopback_host(host) {
        return None;
    }
    Some(format!(
        "CHATBOX_NOTIFY_SMTP_TLS=none would send the SMTP login in clear text to {host:?}: \
         use starttls or tls (plain SMTP with a login only to a loopback host)"
    ))
}

/// The `X-Chatbox-Signature` value: `sha256=<hex HMAC-SHA256 over "<timestamp>.<body>">`,
/// `timestamp` being the `X-Chatbox-Timestamp` sent with it (Unix seconds). Signing
/// the time too lets a receiver refuse a replayed delivery.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Notifier {
    /// Builds the configured channels (inside the pool's runtime, as reqwest needs).
    pub fn new(
        cfg: &Config,
        store: Arc<dyn Store>,
        pool: &crate::pool::BlockingPool,
    ) -> Result<Notifier, String> {
        let _rt = pool.enter();
        let webhook = match (&cfg.notify_webhook_url, &cfg.notify_webhook_secret) {
            (Some(url), Some(secret)) => {
                let client = crate::outbound::client_builder()
                    .timeout(ATTEMPT_TIMEOUT)
                    .build()
                    .map_err(|e| {
                        format!(
                            "cannot build the webhook client: {}",
                            crate::outbound::error_text(e)
                        )
                    })?;
                Some(Webhook {
                    url: url.clone(),
                    secret: secret.clone(),
                    client,
                })
            }
            _ => None,
        };
        let smtp = match &cfg.notify_smtp_host {
            Some(host) => Some(smtp(cfg, host)?),
            None => None,
        };
        Ok(Notifier {
            store,
            webhook,
            smtp,
            max_attempts: cfg.notify_max_attempts,
            retry_base: Duration::from_millis(cfg.notify_retry_base_ms),
            wake: tokio::sync::Notify::new(),
            metrics: NotifyMetrics::default(),
            delivered_retention: Duration::from_secs(cfg.outbox_delivered_retention_secs),
            dead_retention: Duration::from_secs(cfg.outbox_dead_retention_secs),
        })
    }

    /// The retention purge as of `now`: delivered rows older than
    /// `outbox_delivered_retention_secs` (since delivery) and dead letters older than
    /// `outbox_dead_retention_secs` (since queued) go; pending rows always stay.
    pub fn purge_op(&self, now: Millis) -> WriteOp {
        let ago =
            |d: Duration| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        WriteOp::PurgeOutbox {
            delivered_before: ago(self.delivered_retention),
            dead_before: ago(self.dead_retention),
        }
    }

    /// How often the worker purges: a quarter of the shorter retention, so a row
    /// outlives its retention by at most that, between a second and an hour.
    fn purge_every(&self) -> Duration {
        (self.delivered_retention / 4).clamp(PURGE_EVERY_MIN, PURGE_EVERY_MAX)
    }

    async fn purge(&self) {
        let op = self.purge_op(crate::clock::now_ms());
        if let Err(e) = self.store.write(vec![op]).await {
            tracing::warn!(error = %e, "purging the notification outbox failed; the next purge retries");
        }
    }

    /// The outbox rows that announce `event` on every configured channel.
    pub fn enqueue_ops(&self, event: &HelpEvent) -> Vec<WriteOp> {
        let mut payload = json!({
            "event": "help_requested",
            "session_id": event.session_id,
            "user_id": event.user_id,
            "user_name": event.user_name,
            "at": event.at,
        });
        if let Some(ctx) = &event.trace {
            payload["trace_id"] = ctx.trace_id.to_string().into();
        }
        let payload = payload.to_string();
        let kinds = [
            self.webhook.as_ref().map(|_| KIND_WEBHOOK),
            self.smtp.as_ref().map(|_| KIND_EMAIL),
        ];
        kinds
            .into_iter()
            .flatten()
            .map(|kind| WriteOp::Enqueue {
                kind: kind.into(),
                payload: payload.clone(),
                at: event.at,
            })
            .collect()
    }

    /// Tells the worker new rows are there.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        format!(
            "# HELP chatbox_notifications_delivered_total Notifications delivered.\n\
             # TYPE chatbox_notifications_delivered_total counter\n\
             chatbox_notifications_delivered_total {}\n\
             # HELP chatbox_notification_failures_total Failed delivery attempts that will be retried.\n\
             # TYPE chatbox_notification_failures_total counter\n\
             chatbox_notification_failures_total {}\n\
             # HELP chatbox_notifications_dead_total Notifications given up after the last attempt.\n\
             # TYPE chatbox_notifications_dead_total counter\n\
             chatbox_notifications_dead_total {}\n",
            m.delivered.load(Ordering::Relaxed),
            m.failed_attempts.load(Ordering::Relaxed),
            m.dead.load(Ordering::Relaxed),
        )
    }

    /// The worker: delivers due rows, sleeps until the next is due or it is woken,
    /// and purges the outbox of rows past their retention now and then.
    pub async fn run(self: Arc<Self>) {
        let mut next_purge = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_purge {
                self.purge().await;
                next_purge = tokio::time::Instant::now() + self.purge_every();
            }
            let now = crate::clock::now_ms();
            let due = match self.store.due_notifications(now, BATCH).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the notification outbox");
                    Vec::new()
                }
            };
            for n in &due {
                let (ctx, span) = delivery_trace(n);
                crate::trace::Traced::new(self.attempt(n), ctx, span).await;
            }
            if due.len() == BATCH {
                continue;
            }
            let next = self.store.next_notification_at().await.ok().flatten();
            let wait = next.map_or(IDLE_POLL, |at| {
                Duration::from_millis((at - crate::clock::now_ms()).max(0) as u64).min(IDLE_POLL)
            });
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn attempt(&self, n: &Notification) {
        let result = match n.kind.as_str() {
            KIND_WEBHOOK => self.post_webhook(n).await,
            KIND_EMAIL => self.send_email(n).await,
            other => Err(format!("unknown notification kind {other:?}")),
        };
        let now = crate::clock::now_ms();
        let attempts = n.attempts + 1;
        let (op, counter) = match result {
            Ok(()) => (
                WriteOp::Delivered { id: n.id, at: now },
                &self.metrics.delivered,
            ),
            Err(error) => {
                let dead = attempts >= self.max_attempts;
                if dead {
                    tracing::error!(id = n.id, kind = %n.kind, attempts, %error, "notification dead-lettered");
                } else {
                    tracing::warn!(id = n.id, kind = %n.kind, attempts, %error, "notification attempt failed; will retry");
                }
                let next_at = now + self.backoff(attempts).as_millis() as Millis;
                let counter = if dead {
                    &self.metrics.dead
                } else {
                    &self.metrics.failed_attempts
                };
                (
                    WriteOp::DeliveryFailed {
                        id: n.id,
                        error,
                        next_at,
                        dead,
                    },
                    counter,
                )
            }
        };
        // Counted once recorded, so the metrics never run ahead of the outbox.
        match self.store.write(vec![op]).await {
            Ok(_) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(id = n.id, error = %e, "cannot record a delivery result"),
        }
    }

    /// Exponential backoff with jitter: base, 2 x base, 4 x base, ...
    fn backoff(&self, attempts: u32) -> Duration {
        crate::clock::backoff(self.retry_base, attempts.saturating_sub(1), RETRY_WAIT_MAX)
    }

    async fn post_webhook(&self, n: &Notification) -> Result<(), String> {
        let hook = self
            .webhook
            .as_ref()
            .ok_or("no webhook is configured any more")?;
        // Each attempt is signed afresh: a retry is a new delivery of the same body.
        let timestamp = crate::clock::now_secs();
        let resp = hook
            .client
            .post(&hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Chatbox-Event", "help_requested")
            .header("X-Chatbox-Delivery", n.id.to_string())
            .header("X-Chatbox-Timestamp", timestamp.to_string())
            .header("traceparent", delivery_traceparent())
            .header(
                "X-Chatbox-Signature",
                signature(&hook.secret, timestamp, n.payload.as_bytes()),
            )
            .body(n.payload.clone())
            .send()
            .await
            // reqwest's errors name the URL; this message is logged and stored.
            .map_err(|e| format!("webhook request failed: {}", crate::outbound::error_text(e)))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            // Redirects are not followed (crate::outbound::client_builder): a 3xx
            // ends up here too.
            Err(format!("webhook answered {}", resp.status()))
        }
    }

    async fn send_email(&self, n: &Notification) -> Result<(), String> {
        use lettre::AsyncTransport;
        let smtp = self
            .smtp
            .as_ref()
            .ok_or("no SMTP server is configured any more")?;
        let v: serde_json::Value = serde_json::from_str(&n.payload).map_err(|e| e.to_string())?;
        let (sid, user, name) = (
            v["session_id"].as_str(),
            v["user_id"].as_str(),
            v["user_name"].as_str(),
        );
        let body = format!(
            "{} ({}) asked for a human in session {}.\n\nJoin it from the admin console, or with an admin \
             WebSocket frame: {{\"type\":\"admin_join\",\"session_id\":\"{}\"}}\n",
            name.unwrap_or("A user"),
            user.unwrap_or("?"),
            sid.unwrap_or("?"),
            sid.unwrap_or("?"),
        );
        let mut builder = lettre::Message::builder()
            .from(smtp.from.clone())
            .subject(format!("Help requested in session {}", sid.unwrap_or("?")))
            .header(lettre::message::header::ContentType::TEXT_PLAIN);
        for to in &smtp.to {
            builder = builder.to(to.clone());
        }
        let email = builder
            .body(body)
            .map_err(|e| format!("cannot build the e-mail: {e}"))?;
        tokio::time::timeout(ATTEMPT_TIMEOUT, smtp.transport.send(email))
            .await
            .map_err(|_| "SMTP timed out".to_string())?
            .map(|_| ())
            .map_err(|e| format!("SMTP failed: {e}"))
    }
}

/// A delivery's context: a new span of the trace of the request that asked for
/// help (the payload's `trace_id`), or a trace of its own for rows without one.
fn delivery_trace(n: &Notification) -> (Option<crate::trace::TraceCtx>, tracing::Span) {
    use crate::trace::{TraceCtx, TraceId};
    let trace_id = serde_json::from_str::<serde_json::Value>(&n.payload)
        .ok()
        .and_then(|v| v["trace_id"].as_str()?.parse::<TraceId>().ok());
    let ctx = trace_id.map_or_else(TraceCtx::new, TraceCtx::within);
    let span = tracing::info_span!("notify", trace_id = %ctx.trace_id, id = n.id, kind = %n.kind);
    (Some(ctx), span)
}

/// The `traceparent` of an outbound delivery: a child of the current context.
fn delivery_traceparent() -> String {
    crate::trace::current()
        .unwrap_or_default()
        .child()
        .traceparent()
}

fn smtp(cfg: &Config, host: &str) -> Result<Smtp, String> {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::AsyncSmtpTransport;
    let builder = match cfg.notify_smtp_tls.as_str() {
        "tls" => AsyncSmtpTransport::<lettre::Tokio1Executor>::relay(host),
        "starttls" => AsyncSmtpTransport::<lettre::Tokio1Executor>::starttls_relay(host),
        _ => Ok(AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(host)),
    }
    .map_err(|e| format!("SMTP host {host:?}: {e}"))?;
    let mut builder = builder
        .port(cfg.notify_smtp_port)
        .timeout(Some(ATTEMPT_TIMEOUT));
    if let (Some(u), Some(p)) = (&cfg.notify_smtp_username, &cfg.notify_smtp_password) {
        builder = builder.credentials(Credentials::new(u.clone(), p.clone()));
    }
    let parse = |a: &str| {
        a.parse::<lettre::message::Mailbox>()
            .map_err(|e| format!("{a:?}: {e}"))
    };
    Ok(Smtp {
        transport: builder.build(),
        from: parse(cfg.notify_email_from.as_deref().unwrap_or_default())?,
        to: cfg
            .notify_email_to
            .iter()
            .map(|a| parse(a))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_hex_over_timestamp_dot_body() {
        // Python: hmac.new(b"Jefe", b"1700000000.what do ya want for nothing?",
        // hashlib.sha256).hexdigest() (the key and body of RFC 4231 case 2).
        let body = b"what do ya want for nothing?";
        assert_eq!(
            super::signature("Jefe", 1_700_000_000, body),
            "sha256=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
        assert_ne!(
            super::signature("Jefe", 1_700_000_001, body),
            super::signature("Jefe", 1_700_000_000, body),
            "another time is another signature"
        );
    }

    #[test]
    fn the_webhook_url_and_secret_stay_out_of_debug() {
        // What chatbox::start installs before any client is built.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let hook = super::Webhook {
            url: "https://hooks.example.com/T0P-S3CRET".into(),
            secret: "webhook-secret-0123456789".into(),
            client: reqwest::Client::new(),
        };
        let shown = format!("{hook:?}");
        assert!(
            !shown.contains("T0P-S3CRET") && !shown.contains("0123456789"),
            "{shown}"
        );
    }
}
