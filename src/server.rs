//! Starts the server: listeners, the blocking pool, the mesh and one runtime thread
//! per core; and the handle that stops it and reports how it ended.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::auth::Verifier;
use crate::chat::frames::Limits;
use crate::chat::ChatShared;
use crate::config::{Config, IoDriver};
use crate::crypto::KeyRing;
use crate::mesh::{mesh, Mesh, MeshError};
use crate::pool::PoolRuntime;
use crate::shard::{Core, Shared};
use crate::ws::handler::Hooks;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: address already in use (another chatbox or another program holds it)")]
    AddrInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open storage in {dir}")]
    Store {
        dir: std::path::PathBuf,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("cannot open MongoDB database {database}")]
    Mongo {
        database: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("cannot start the blocking pool: {0}")]
    Pool(#[source] std::io::Error),
    #[error("core {core} failed to start: {reason}")]
    Core { core: usize, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("core {0} died unexpectedly (panic outside a connection task)")]
    CoreDied(usize),
}

/// Which I/O driver a core runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

/// Starts shutdown from any thread (signal handler, test, admin).
#[derive(Clone)]
pub struct ShutdownTrigger {
    stops: Arc<[async_channel::Sender<Duration>]>,
    timeout: Duration,
    triggered: Arc<AtomicBool>,
}

impl ShutdownTrigger {
    /// Begins a graceful shutdown; a second call does nothing.
    pub fn shutdown(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        for s in self.stops.iter() {
            let _ = s.try_send(self.timeout);
        }
    }
}

struct CoreExit {
    core: usize,
    panicked: bool,
}

pub struct ServerHandle {
    addr: SocketAddr,
    drivers: Vec<Driver>,
    trigger: ShutdownTrigger,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    exits: mpsc::Receiver<CoreExit>,
    pool: Option<PoolRuntime>,
}

/// Hooks for tests; production passes `Hooks::default()`.
pub fn start(config: Config, hooks: Hooks) -> Result<ServerHandle, StartError> {
    // One TLS crypto provider (ring) for every client: LLM providers, webhooks, SMTP.
    // Installing twice (a second server in one process) is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A library caller may not have validated; a half-valid server is worse than none.
    crate::check_config(&config, false)?;
    let secret = config.jwt_secret.clone().ok_or_else(|| {
        crate::config::ConfigError::Invalid(vec!["CHATBOX_JWT_SECRET is required".into()])
    })?;
    let cores = config.core_count();
    let listeners = bind(config.listen, cores)?;
    let addr = listeners[0]
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let (pool_rt, pool) = PoolRuntime::start(config.blocking_threads, config.blocking_queue_max)
        .map_err(StartError::Pool)?;
    let (mesh, mesh_rxs) = mesh(cores, config.mesh_queue_max);
    let (stop_txs, stop_rxs): (Vec<_>, Vec<_>) =
        (0..cores).map(|_| async_channel::bounded(1)).unzip();
    let trigger = ShutdownTrigger {
        stops: stop_txs.into(),
        timeout: config.shutdown_timeout(),
        triggered: Arc::new(AtomicBool::new(false)),
    };
    let io_driver = config.io_driver;
    let chat = chat_shared(&config, pool.clone())?;
    let shared = Arc::new(Shared::new(
        config,
        Verifier::new(secret.as_bytes()),
        mesh,
        pool,
        hooks,
        chat,
    ));

    let (ready_tx, ready_rx) = mpsc::channel::<Result<Driver, String>>();
    let (exit_tx, exits) = mpsc::channel();
    let mut threads = Vec::with_capacity(cores);
    for (id, ((listener, mesh_rx), stop_rx)) in listeners
        .into_iter()
        .zip(mesh_rxs)
        .zip(stop_rxs)
        .enumerate()
    {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let exit = exit_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("chatbox-core-{id}"))
            .spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_core(id, shared, listener, mesh_rx, stop_rx, ready, io_driver)
                }));
                let _ = exit.send(CoreExit {
                    core: id,
                    panicked: run.is_err(),
                });
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                return Err(StartError::Core {
                    core: id,
                    reason: e.to_string(),
                })
            }
        }
    }
    drop(ready_tx);
    let mut drivers = Vec::with_capacity(cores);
    for core in 0..cores {
        match ready_rx.recv() {
            Ok(Ok(d)) => drivers.push(d),
            Ok(Err(reason)) => {
                trigger.shutdown();
                return Err(StartError::Core { core, reason });
            }
            Err(_) => {
                trigger.shutdown();
                return Err(StartError::Core {
                    core,
                    reason: "thread exited during start-up".into(),
                });
            }
        }
    }
    Ok(ServerHandle {
        addr,
        drivers,
        trigger,
        shared,
        threads,
        exits,
        pool: Some(pool_rt),
    })
}

/// Opens storage and the key ring: everything chat needs that outlives a core.
fn chat_shared(config: &Config, pool: crate::pool::BlockingPool) -> Result<ChatShared, StartError> {
    let key = config.encryption_key.as_deref().ok_or_else(|| {
        crate::config::ConfigError::Invalid(vec![
            "CHATBOX_ENCRYPTION_KEY is required; make one with `openssl rand -hex 32`".into(),
        ])
    })?;
    let keys = KeyRing::new(key, &config.encryption_previous_keys)
        .map_err(|e| crate::config::ConfigError::Invalid(vec![e.to_string()]))?;
    let backend = crate::store::Backend::configured(config);
    let store =
        crate::store::open(config, backend, pool.clone()).map_err(|source| match backend {
            crate::store::Backend::Mongo => StartError::Mongo {
                database: config.mongo_database.clone(),
                source,
            },
            crate::store::Backend::Sqlite => StartError::Store {
                dir: config.data_dir.clone(),
                source,
            },
        })?;
    let notifier = Arc::new(
        crate::notify::Notifier::new(config, store.clone(), &pool)
            .map_err(|e| crate::config::ConfigError::Invalid(vec![e]))?,
    );
    // The outbox worker runs for the life of the pool (queued rows from before a
    // restart go out too).
    pool.spawn(notifier.clone().run())
        .map_err(|e| StartError::Pool(std::io::Error::other(e)))?;
    Ok(ChatShared {
        store,
        keys,
        limits: Limits {
            content_chars_max: config.content_chars_max,
            metadata_bytes_max: config.metadata_bytes_max,
            ..Limits::default()
        },
        rate_limit_per_minute: config.rate_limit_per_minute,
        history_messages_max: config.history_messages_max,
        session_idle: Duration::from_secs(config.session_idle_secs),
        sessions_per_user_max: config.sessions_per_user_max,
        answer_bytes_max: config.answer_bytes_max,
        demo_chunk_delay: Duration::from_millis(config.demo_chunk_delay_ms),
        models: Arc::new(
            crate::llm::Models::new(config, &pool)
                .map_err(|e| crate::config::ConfigError::Invalid(vec![e]))?,
        ),
        context_messages_max: config.llm_context_messages_max,
        context_chars_max: config.llm_context_chars_max,
        grace: Duration::from_secs(config.llm_grace_secs),
        notifier,
    })
}

/// Binds one SO_REUSEPORT listener per core on the same port.
///
/// For a given port, a plain probe bind comes first: SO_REUSEPORT would otherwise
/// let us silently share a port with another process of the same user instead of
/// failing. For port 0 the first listener takes whatever port the kernel picks and
/// holds it while the others join: a probe released before they bind left a window
/// in which an outgoing connection's ephemeral port could take it (seen in CI as
/// AddrInUse on 127.0.0.1:0).
fn bind(addr: SocketAddr, cores: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    use socket2::{Domain, Socket, Type};
    let err = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            StartError::AddrInUse { addr }
        } else {
            StartError::Bind { addr, source }
        }
    };
    let listen = |at: SocketAddr| -> Result<std::net::TcpListener, StartError> {
        let s = Socket::new(Domain::for_address(at), Type::STREAM, None).map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.set_reuse_port(true).map_err(err)?;
        s.set_nonblocking(true).map_err(err)?;
        s.bind(&at.into()).map_err(err)?;
        s.listen(4096).map_err(err)?;
        Ok(s.into())
    };
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr).map_err(err)?);
    }
    let first = listen(addr)?;
    let port_addr = first.local_addr().map_err(err)?;
    let mut all = vec![first];
    for _ in 1..cores {
        all.push(listen(port_addr)?);
    }
    Ok(all)
}

/// The body of one core thread.
fn run_core(
    id: usize,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    mesh_rx: async_channel::Receiver<crate::mesh::CoreMsg>,
    stop_rx: async_channel::Receiver<Duration>,
    ready: mpsc::Sender<Result<Driver, String>>,
    io_driver: IoDriver,
) {
    let ready_fail = ready.clone();
    let body = move |driver: Driver| async move {
        let core = Rc::new(Core::new(id, shared));
        let listener = match monoio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot adopt listener: {e}")));
                return;
            }
        };
        monoio::spawn(core.clone().accept_loop(listener));
        monoio::spawn(core.clone().mesh_loop(mesh_rx));
        monoio::spawn(core.clone().keepalive_loop());
        monoio::spawn(crate::chat::expiry_loop(core.clone()));
        tracing::info!(core = id, ?driver, "core running");
        let _ = ready.send(Ok(driver));
        let timeout = stop_rx.recv().await.unwrap_or(Duration::ZERO);
        core.shutdown(monoio::time::Instant::now() + timeout).await;
    };
    let want_uring = match io_driver {
        IoDriver::Auto => monoio::utils::detect_uring(),
        IoDriver::Iouring => true,
        IoDriver::Epoll => false,
    };
    if want_uring {
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(1024)
            .enable_timer()
            .build()
        {
            Ok(mut rt) => return rt.block_on(body(Driver::IoUring)),
            // ENOMEM from a low `ulimit -l`, or io_uring disabled by seccomp/sysctl.
            Err(e) => {
                tracing::warn!(core = id, error = %e, "io_uring unavailable; falling back to epoll")
            }
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
    {
        Ok(mut rt) => rt.block_on(body(Driver::Epoll)),
        Err(e) => {
            let _ = ready_fail.send(Err(format!("cannot build a runtime: {e}")));
        }
    }
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The driver each core runs, in core order.
    pub fn drivers(&self) -> &[Driver] {
        &self.drivers
    }

    pub fn trigger(&self) -> ShutdownTrigger {
        self.trigger.clone()
    }

    /// Begins a graceful shutdown (see [`ServerHandle::join`] to wait for it).
    pub fn shutdown(&self) {
        self.trigger.shutdown();
    }

    pub fn mesh(&self) -> &Mesh {
        &self.shared.mesh
    }

    /// Sends a text frame to every connection on every core.
    pub fn broadcast(&self, text: &str) -> Vec<MeshError> {
        self.shared.mesh.broadcast(text)
    }

    /// The Prometheus text of all cores.
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(&self.shared.metrics)
    }

    pub fn metrics(&self) -> &[crate::metrics::CoreMetrics] {
        &self.shared.metrics
    }

    /// Waits for every core to stop. A core that dies on its own (not through
    /// shutdown) stops the others and makes this an error: the process should exit
    /// and be restarted rather than run with a core missing.
    pub fn join(mut self) -> Result<(), RunError> {
        let mut result = Ok(());
        for _ in 0..self.threads.len() {
            let Ok(exit) = self.exits.recv() else { break };
            let unexpected = exit.panicked || !self.trigger.triggered.load(Ordering::SeqCst);
            if unexpected && result.is_ok() {
                tracing::error!(core = exit.core, "core died; shutting down the others");
                result = Err(RunError::CoreDied(exit.core));
                self.trigger.shutdown();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.flush_storage();
        if let Some(pool) = self.pool.take() {
            pool.shutdown(Duration::from_secs(1));
        }
        result
    }

    /// Waits until every write submitted before now is committed: an empty write
    /// is a barrier, since the writer commits in order. Bounded by a deadline.
    fn flush_storage(&self) {
        const FLUSH_WAIT: Duration = Duration::from_secs(5);
        let barrier = self.shared.chat.store.write(Vec::new());
        let flushed = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            // The timer must be created inside the runtime, hence the async block.
            .map(|rt| rt.block_on(async { tokio::time::timeout(FLUSH_WAIT, barrier).await }));
        match flushed {
            Ok(Ok(Ok(_))) => tracing::info!("storage flushed"),
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "storage flush failed"),
            Ok(Err(_)) => tracing::error!("storage flush did not finish in time"),
            Err(e) => tracing::error!(error = %e, "cannot wait for the storage flush"),
        }
    }
}

impl Drop for ServerHandle {
    /// A handle dropped without `join` (a failed test, say) still stops the server.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.trigger.shutdown();
        }
        if let Some(pool) = self.pool.take() {
            pool.shutdown_background();
        }
    }
}
