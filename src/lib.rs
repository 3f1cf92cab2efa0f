//! chatbox: a thread-per-core WebSocket chat backend for AI customer support.
//!
//! # Layout
//!
//! Layers, lowest first; a layer imports only from layers below it (and a module
//! never reaches itself: `tests/layers.rs` keeps both rules). docs/ARCHITECTURE.md
//! says the rest.
//!
//! 1. Leaves, importing no other layer:
//!    [`clock`] (time, ids), [`config`] (the one typed configuration),
//!    [`crypto`] (AES-256-GCM per message, key ids for rotation), [`auth`] (HS256
//!    JWTs, bearer tokens), [`limiter`] (token buckets), [`media`] (location
//!    metadata removed from images as they stream past), [`metrics`] (per-core
//!    single-writer counters, Prometheus text), [`pool`] (the blocking pool),
//!    [`outbound`] (which URLs may be called, and clients that follow no
//!    redirect), [`secret`] (redacted `Debug`, constant-time comparison, private
//!    files), [`trace`] (W3C trace context: the request ids of connections and
//!    messages, and `traceparent` on outbound requests).
//! 2. [`runtime`]: thread-per-core machinery that knows nothing of chat: one
//!    SO_REUSEPORT listener and accept loop per core, the socket handover to the
//!    core that owns the user, the per-core connection registry and outboxes, the
//!    cross-core mesh, the WebSocket codec and connection loop, the HTTP front
//!    door. An application plugs in through [`runtime::App`].
//! 3. Services: [`store`] (embedded SQLite or MongoDB), [`llm`] (model providers
//!    behind one cancellable stream), [`notify`] (help-request webhooks and
//!    e-mail through a durable outbox).
//! 4. [`app`]: the chat application: sessions owned by the user's core (a state
//!    machine that decides, executors that act), human takeover, the admin API.
//! 5. The binary (`src/main.rs`): command line, logging, signals.
//!
//! A connection is accepted by whichever core the kernel picks; once its JWT names
//! the user, the socket moves to core `hash(user) % cores`, which owns that user's
//! connections and sessions for their whole life. No lock is taken on the way.

pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod limiter;
pub mod llm;
pub mod media;
pub mod metrics;
pub mod notify;
pub mod outbound;
pub mod pool;
pub mod runtime;
pub mod secret;
pub mod store;
pub mod trace;

pub use app::{check_config, start, ServerHandle};
pub use config::Config;
pub use runtime::{Hooks, ShutdownTrigger};
