//! The application: chat sessions, human takeover and the admin API, plugged into
//! the runtime as [`ChatApp`].
//!
//! Sessions live on the core of their user; [`ChatMsg`] is what one core asks of
//! another on their behalf. [`start`] opens storage, the key ring, the models and
//! the notifier, and starts the runtime with them.

pub mod admin;
mod admin_stream;
pub mod chat;
pub mod cluster;
pub mod conn;
pub mod console;
mod cors;
pub mod files;
mod files_get;
pub mod frames;
pub mod remote;

use std::rc::Rc;
use std::sync::Arc;

use hyper::{Request, Response};

use crate::auth::Identity;
use crate::config::{Config, ConfigError};
use crate::crypto::KeyRing;
use crate::pool::BlockingPool;
use crate::runtime::app::Body;
use crate::runtime::mesh::Mesh;
use crate::runtime::{App, ConnId, Hooks, StartError};
use crate::store::{Backend, StoreError};
use chat::takeover::{self, AdminOp};
use chat::{ChatCore, ChatShared};
use conn::ChatConn;

/// One core of the chat application.
pub type Core = crate::runtime::Core<ChatApp>;
/// The running server.
pub type ServerHandle = crate::runtime::ServerHandle<ChatApp>;

// Per-core state stays on its core; what crosses cores can.
crate::runtime::rules::assert_not_send!(Core);
crate::runtime::rules::assert_not_send!(ChatCore);
crate::runtime::rules::assert_not_send!(chat::session::Session);
crate::runtime::rules::assert_not_send!(ChatConn);
crate::runtime::rules::assert_send!(ChatMsg);
crate::runtime::rules::assert_send!(crate::runtime::mesh::CoreMsg<ChatMsg>);
crate::runtime::rules::assert_send!(ChatShared);

/// The chat application, as the runtime sees it.
pub struct ChatApp;

/// What one core asks of another about the sessions it owns.
pub enum ChatMsg {
    /// An admin's action on a session that the receiving core owns.
    Admin(Box<AdminOp>),
    /// Close a user's connections (and, when their data was deleted, drop their
    /// sessions from memory) on the user's core, which answers how many it closed.
    CloseUser(Box<admin::CloseUser>),
    /// An admin ended a session the receiving core owns.
    EndSession(Arc<str>),
    /// A stored session idle past `session_end_idle_secs`, found by the sweep:
    /// its owning core ends it unless it was active meanwhile.
    EndIdle(Arc<str>),
    /// Cluster: what another node asks of the connections of this core.
    Remote(Box<remote::RemoteMsg>),
}

impl App for ChatApp {
    type Shared = ChatShared;
    type CoreState = ChatCore;
    type Msg = ChatMsg;
    type Conn = ChatConn;

    fn core_state(shared: &ChatShared, core_id: usize) -> ChatCore {
        ChatCore::new(shared, core_id)
    }

    fn spawn_tasks(core: &Rc<Core>) {
        monoio::spawn(chat::expiry_loop(core.clone()));
        if core.id == 0 && core.shared.app.bus.is_some() {
            monoio::spawn(chat::lease::renew_loop(core.clone()));
        }
    }

    fn open(core: &Rc<Core>, conn: ConnId, identity: Identity) -> ChatConn {
        ChatConn::open(core.clone(), conn, identity)
    }

    fn on_msg(core: &Rc<Core>, msg: ChatMsg) {
        match msg {
            ChatMsg::Admin(op) => takeover::on_admin_op(core, *op),
            ChatMsg::EndSession(sid) => takeover::end(core, &sid),
            ChatMsg::EndIdle(sid) => chat::end_if_idle(core, &sid),
            ChatMsg::CloseUser(close) => admin::close_user_here(core, *close),
            ChatMsg::Remote(msg) => remote::on_msg(core, *msg),
        }
    }

    async fn ready(core: &Rc<Core>) -> Result<(), String> {
        core.shared.app.store.ping().await.map_err(|e| {
            tracing::warn!(error = %e, "storage unreachable");
            "storage unavailable".to_owned()
        })
    }

    fn degraded(core: &Rc<Core>) -> Option<String> {
        let bus = core.shared.app.bus.as_ref()?;
        (!bus.is_up()).then(|| {
            "the bus to the other nodes is down: what needs another node is refused until it returns"
                .to_owned()
        })
    }

    async fn http(
        core: &Rc<Core>,
        req: Request<hyper::body::Incoming>,
        path: &str,
    ) -> Response<Body> {
        if files::serves(path) {
            if let Some(r) = files::handle(core, req, path).await {
                return r;
            }
            core.metrics().refused(crate::metrics::Refusal::NotFound);
            return crate::runtime::http::not_found();
        }
        if let Some(r) = console::handle(&req, path) {
            return r;
        }
        match path.strip_prefix("/admin") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                admin::handle(core, &req, rest).await
            }
            _ => {
                core.metrics().refused(crate::metrics::Refusal::NotFound);
                crate::runtime::http::not_found()
            }
        }
    }

    fn request_timeout(core: &Rc<Core>, path: &str) -> std::time::Duration {
        let cfg = &core.shared.config;
        let ms = if files::serves(path) {
            cfg.file_transfer_timeout_ms
        } else {
            cfg.http_request_timeout_ms
        };
        std::time::Duration::from_millis(ms)
    }

    fn body_bytes_max(core: &Rc<Core>, path: &str) -> u64 {
        match path {
            // The upload enforces its own limit while it streams, multipart
            // framing included.
            "/upload" => core
                .shared
                .app
                .files
                .bytes_max
                .saturating_add(files::MULTIPART_SLACK_BYTES),
            _ => core.shared.config.http_body_bytes_max as u64,
        }
    }

    fn render_metrics(shared: &ChatShared) -> String {
        let mut out = shared.notifier.render_metrics() + &shared.pages.render();
        shared.llm.render(&mut out);
        let (depth, max) = shared.store.write_queue();
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "# HELP chatbox_store_queue_depth Writes waiting for the storage writer.\n\
                 # TYPE chatbox_store_queue_depth gauge\nchatbox_store_queue_depth {depth}\n\
                 # HELP chatbox_store_queue_capacity Writes the storage queue holds (store_queue_max).\n\
                 # TYPE chatbox_store_queue_capacity gauge\nchatbox_store_queue_capacity {max}\n"
            ),
        );
        if let Some(bus) = &shared.bus {
            bus.render_metrics(&mut out);
        }
        out
    }

    async fn drain(core: &Rc<Core>, grace: monoio::time::Instant, deadline: monoio::time::Instant) {
        // One node-wide step, taken by core 0: the other nodes stop routing users
        // here and close the sockets this node served for them (1012), so those
        // users reconnect to a node that stays while this one finishes its work.
        if let (0, Some(bus)) = (core.id, &core.shared.app.bus) {
            bus.announce_leaving();
        }
        chat::answer::drain(core, grace, deadline).await;
    }

    fn stopped(
        shared: &ChatShared,
        hooks: &Hooks,
        deadline: std::time::Instant,
    ) -> Result<(), String> {
        if let Some(bus) = &shared.bus {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            bus.leave(&shared.pool, left.min(std::time::Duration::from_secs(1)));
        }
        flush_storage(shared, hooks.clone(), deadline)
    }
}

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppStartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open storage in {dir}")]
    Store {
        dir: std::path::PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("cannot open MongoDB database {database}")]
    Mongo {
        database: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot connect to the bus")]
    Bus(#[source] crate::runtime::bus::BusError),
    #[error("cannot start the notifier: {0}")]
    Pool(String),
    #[error("cannot open file storage")]
    Files(#[source] crate::store::files::FileStoreError),
    #[error("cannot create the data directory {dir}")]
    DataDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<AppStartError> for StartError {
    fn from(e: AppStartError) -> StartError {
        match e {
            AppStartError::Config(c) => StartError::Config(c),
            other => StartError::App(Box::new(other)),
        }
    }
}

/// Every start-up check of a configuration, reported together: the configuration's
/// own rules, then the model list ([`crate::llm::validate`]) and the notification
/// channels ([`crate::notify::validate`]), which need those modules and so cannot
/// live in `config`. `dev` relaxes the secrets that `--dev` generates itself.
/// [`start`] runs it too.
pub fn check_config(config: &Config, dev: bool) -> Result<(), ConfigError> {
    let mut problems = config.problems(dev);
    problems.extend(crate::llm::validate(config));
    problems.extend(crate::llm::stt::validate(config));
    problems.extend(crate::notify::validate(config));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Starts chatbox: the runtime, serving the chat application.
pub fn start(config: Config, hooks: Hooks) -> Result<ServerHandle, StartError> {
    // A library caller may not have validated; a half-valid server is worse than none.
    check_config(&config, false)?;
    // One TLS crypto provider (ring) for every client: LLM providers, webhooks, SMTP.
    // Installing twice (a second server in one process) is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::runtime::start::<ChatApp, _>(config, hooks, |config, pool, mesh| {
        Ok(chat_shared(config, pool, mesh)?)
    })
}

/// Opens storage and the key ring: everything chat needs that outlives a core.
fn chat_shared(
    config: &Config,
    pool: &BlockingPool,
    mesh: &Mesh<ChatMsg>,
) -> Result<ChatShared, AppStartError> {
    let invalid = |e: String| ConfigError::Invalid(vec![e]);
    let key = config.encryption_key.as_deref().ok_or_else(|| {
        invalid("CHATBOX_ENCRYPTION_KEY is required; make one with `openssl rand -hex 32`".into())
    })?;
    let keys =
        KeyRing::new(key, &config.encryption_previous_keys).map_err(|e| invalid(e.to_string()))?;
    let backend = Backend::configured(config);
    if backend == Backend::Sqlite {
        private_data_dir(&config.data_dir)?;
    }
    let store =
        crate::store::open(config, backend, pool.clone()).map_err(|source| match backend {
            Backend::Mongo => AppStartError::Mongo {
                database: config.mongo_database.clone(),
                source,
            },
            Backend::Sqlite => AppStartError::Store {
                dir: config.data_dir.clone(),
                source,
            },
        })?;
    let notifier =
        Arc::new(crate::notify::Notifier::new(config, store.clone(), pool).map_err(invalid)?);
    // The outbox worker runs for the life of the pool (queued rows from before a
    // restart go out too).
    pool.spawn(notifier.clone().run())
        .map_err(|e| AppStartError::Pool(e.to_string()))?;
    let models = crate::llm::Models::new(config, pool).map_err(invalid)?;
    let stt = crate::llm::stt::Stt::new(config, pool).map_err(invalid)?;
    let bus = cluster::start_bus(config, pool, mesh).map_err(AppStartError::Bus)?;
    let files =
        crate::store::files::FileStores::open(config, pool).map_err(AppStartError::Files)?;
    let mut shared = ChatShared::new(
        config,
        store,
        keys,
        Arc::new(models),
        Arc::new(stt),
        notifier,
        pool.clone(),
        bus,
    );
    shared.files.stores = files;
    Ok(shared)
}

/// Creates the embedded store's directory readable by its owner only (0700)
/// before the store opens it: it holds every sealed message, and with `--dev`
/// the keys that open them. A looser existing directory is logged, not changed.
fn private_data_dir(dir: &std::path::Path) -> Result<(), AppStartError> {
    match crate::secret::private_dir(dir) {
        Ok(warning) => {
            if let Some(w) = warning {
                tracing::warn!("{w}");
            }
            Ok(())
        }
        Err(source) => Err(AppStartError::DataDir {
            dir: dir.to_owned(),
            source,
        }),
    }
}

/// Waits until every write submitted before now is committed: an empty write is
/// a barrier, since the writer commits in order. On a thread of its own, so that
/// the wait is cut off at `deadline` whatever the storage does (hangs included).
fn flush_storage(
    shared: &ChatShared,
    hooks: Hooks,
    deadline: std::time::Instant,
) -> Result<(), String> {
    const STEP: &str = "storage flush";
    let store = shared.store.clone();
    // In a cluster the barrier also lets this node's leases go, after its last
    // write: the nodes that take its users over need not wait for them to expire.
    let release: Vec<crate::store::WriteOp> = (shared.bus.iter())
        .map(|bus| crate::store::WriteOp::ReleaseLeases {
            node: bus.node_id().to_string(),
            users: None,
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("chatbox-flush".into())
        .spawn(move || {
            hooks.fault_point("flush");
            let barrier = store.write(release);
            let flushed = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| format!("cannot wait for the storage flush: {e}"))
                .and_then(|rt| rt.block_on(barrier).map_err(|e| e.to_string()));
            let _ = tx.send(flushed);
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start the storage flush: {e}"));
    }
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    match rx.recv_timeout(left) {
        Ok(Ok(_)) => {
            tracing::info!("storage flushed");
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::error!(step = STEP, error = %e, "storage flush failed; recent writes may be lost");
            Err(format!("the storage flush failed: {e}"))
        }
        Err(_) => {
            tracing::warn!(
                step = STEP,
                "shutdown deadline reached; step cut off, recent writes may be lost"
            );
            Err("the storage flush was cut off at the shutdown deadline".into())
        }
    }
}
