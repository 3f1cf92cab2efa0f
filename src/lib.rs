//! chatbox: a thread-per-core WebSocket chat backend for AI customer support.
//!
//! # Layout
//!
//! - [`config`]: the one typed configuration (TOML + `CHATBOX_*`), every key declared
//!   once; a leaf that uses nothing else of the crate. [`check_config`] composes its
//!   validation with the checks of the modules that use it.
//! - [`server`]: binds one SO_REUSEPORT listener per core, starts the core threads
//!   and the blocking pool, and stops them all (graceful shutdown, core death).
//! - [`shard`]: one core's runtime and everything it owns: the accept loop, the
//!   connection [`shard::registry`] with the per-user cap, per-connection
//!   [`shard::outbox`]es, and the shutdown [`shard::gate`].
//! - [`mesh`]: the typed cross-core messages (socket handover, broadcast) over
//!   bounded queues; the only way cores talk.
//! - [`http`]: the front door: request [`http::head`] reading and routing, plain
//!   endpoints served by hyper, JSON errors.
//! - [`ws`]: the upgrade decision ([`ws::handshake`]: origin, JWT), the connection
//!   driver ([`ws::conn`]: keep-alive, close codes), the RFC 6455 codec
//!   ([`ws::codec`]: buffers only while bytes move) and what a
//!   connection does with messages ([`ws::handler`]).
//! - [`io`]: readiness-driven non-blocking socket I/O shared by all of the above.
//! - [`chat`]: sessions owned by the user's core: the message pipeline (validated
//!   [`chat::frames`], per-user [`chat::limiter`], durable ack, streamed answer from
//!   the offline [`llm::demo`] provider), resume with history, idle expiry.
//! - [`store`]: the storage trait and its backends: embedded SQLite
//!   ([`store::sqlite`]: one writer with group commit, concurrent readers) and
//!   MongoDB ([`store::mongo`]: one writer, a transaction per batch, held writes
//!   while it is away), and [`store::copy`] between them.
//! - [`crypto`]: AES-256-GCM per message with key ids for rotation.
//! - [`notify`]: help-request notifications (signed webhook, SMTP) through a
//!   durable outbox with retries and dead letters.
//! - [`llm`]: providers behind one cancellable stream: OpenAI-compatible and
//!   Anthropic over SSE ([`llm::sse`]) on the blocking pool, and the offline
//!   [`llm::demo`]; retries, timeouts, fallback, abort.
//! - [`auth`]: HS256 JWT verification and minting.
//! - [`pool`]: the blocking pool (tokio) and its typed request/reply bridge.
//! - [`metrics`]: per-core single-writer counters rendered for Prometheus.
//!
//! A connection is accepted by whichever core the kernel picks; once its JWT names
//! the user, the socket moves to core `hash(user) % cores`, which owns that user's
//! connections for their whole life. No lock is taken on the way.

pub mod auth;
pub mod chat;
pub mod config;
pub mod crypto;
pub mod http;
pub mod io;
pub mod llm;
pub mod mesh;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod server;
pub mod shard;
pub mod store;
pub mod ws;

pub use config::Config;
pub use server::{start, ServerHandle, ShutdownTrigger};
pub use ws::handler::Hooks;

/// Every start-up check of a configuration, reported together: the configuration's
/// own rules, then the model list ([`llm::validate`]) and the notification channels
/// ([`notify::validate`]), which need those modules and so cannot live in `config`.
/// `dev` relaxes the secrets that `--dev` generates itself. [`start`] runs it too.
pub fn check_config(config: &Config, dev: bool) -> Result<(), config::ConfigError> {
    let mut problems = config.problems(dev);
    problems.extend(llm::validate(config));
    problems.extend(notify::validate(config));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(config::ConfigError::Invalid(problems))
    }
}
