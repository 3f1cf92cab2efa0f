//! Starts the runtime: listeners, the blocking pool, the mesh and one thread per
//! core; and the handle that stops it and reports how it ended.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::app::{App, Hooks};
use super::core::{Core, Shared};
use super::mesh::{mesh, Inbox, Mesh, MeshError};
use crate::auth::Verifier;
use crate::config::{Config, IoDriver};
use crate::pool::{BlockingPool, PoolRuntime};

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
    /// The application could not start (its storage, say).
    #[error(transparent)]
    App(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot start the blocking pool: {0}")]
    Pool(#[source] std::io::Error),
    #[error("core {core} failed to start: {reason}")]
    Core { core: usize, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("core {0} died unexpectedly (panic outside a connection task)")]
    CoreDied(usize),
    /// Shutdown could not save everything (the storage flush failed or was cut
    /// off at the deadline).
    #[error("data could not be flushed at shutdown: {0}")]
    NotFlushed(String),
}

/// A shutdown's deadlines: answers may run until `grace`, the cores must have
/// stopped by `cores`, and all of it (the storage flush and the notifier too) must
/// be over by `deadline`.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub grace: Instant,
    pub cores: Instant,
    pub deadline: Instant,
}

impl Deadlines {
    /// From now: the last quarter of the timeout (at most 5 s) is kept for what
    /// follows the cores, so that a core cut off at its deadline still leaves the
    /// storage flush time to run.
    fn from_now(timeout: Duration, grace: Duration) -> Deadlines {
        let now = Instant::now();
        let reserve = (timeout / 4).min(Duration::from_secs(5));
        Deadlines {
            grace: now + grace.min(timeout - reserve),
            cores: now + timeout - reserve,
            deadline: now + timeout,
        }
    }
}

/// What the joining thread hears: a core ended, or shutdown began.
enum Event {
    Exit(CoreExit),
    Shutdown(Deadlines),
}

/// How long past the cores' deadline the joining thread waits for them to end.
const CORE_EXIT_MARGIN: Duration = Duration::from_millis(200);

/// Which I/O driver a core runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

/// Starts shutdown from any thread (signal handler, test, admin).
#[derive(Clone)]
pub struct ShutdownTrigger {
    stops: Arc<[async_channel::Sender<Deadlines>]>,
    timeout: Duration,
    grace: Duration,
    triggered: Arc<AtomicBool>,
    events: mpsc::Sender<Event>,
}

impl ShutdownTrigger {
    /// Begins a graceful shutdown; a second call does nothing.
    pub fn shutdown(&self) {
        if self.triggered.swap(true, Ordering::SeqCst) {
            return;
        }
        let d = Deadlines::from_now(self.timeout, self.grace);
        let _ = self.events.send(Event::Shutdown(d));
        for s in self.stops.iter() {
            let _ = s.try_send(d);
        }
    }
}

struct CoreExit {
    core: usize,
    panicked: bool,
}

pub struct ServerHandle<A: App> {
    addr: SocketAddr,
    drivers: Vec<Driver>,
    trigger: ShutdownTrigger,
    shared: Arc<Shared<A>>,
    threads: Vec<JoinHandle<()>>,
    exits: mpsc::Receiver<Event>,
    pool: Option<PoolRuntime>,
}

/// Starts the runtime serving application `A`, whose shared state `make_app`
/// builds once the listeners are bound and the blocking pool runs. `hooks` are for
/// tests; production passes `Hooks::default()`.
pub fn start<A, F>(config: Config, hooks: Hooks, make_app: F) -> Result<ServerHandle<A>, StartError>
where
    A: App,
    F: FnOnce(&Config, &BlockingPool, &Mesh<A::Msg>) -> Result<A::Shared, StartError>,
{
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
    let (mesh, mesh_rxs) = mesh::<A::Msg>(cores, config.mesh_queue_max);
    let (stop_txs, stop_rxs): (Vec<_>, Vec<_>) =
        (0..cores).map(|_| async_channel::bounded(1)).unzip();
    let (exit_tx, exits) = mpsc::channel();
    let trigger = ShutdownTrigger {
        stops: stop_txs.into(),
        timeout: config.shutdown_timeout(),
        grace: config.shutdown_grace(),
        triggered: Arc::new(AtomicBool::new(false)),
        events: exit_tx.clone(),
    };
    let app = make_app(&config, &pool, &mesh)?;
    let checks = crate::auth::Checks {
        issuer: config.jwt_issuer.clone(),
        audience: config.jwt_audience.clone(),
        leeway_secs: config.jwt_leeway_secs,
    };
    let shared = Arc::new(Shared::<A>::new(
        config,
        Verifier::with_checks(secret.as_bytes(), &checks),
        mesh,
        pool,
        hooks,
        app,
    ));

    let Cores { threads, ready } = spawn_cores(&shared, listeners, mesh_rxs, stop_rxs, exit_tx)?;
    let drivers = await_cores(cores, &ready).inspect_err(|_| trigger.shutdown())?;
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

type Ready = mpsc::Receiver<Result<Driver, String>>;

/// The running core threads, how each ended, and their start-up reports.
struct Cores {
    threads: Vec<JoinHandle<()>>,
    ready: Ready,
}

/// Starts one thread per core, each with its listener, mesh inbox and stop signal.
fn spawn_cores<A: App>(
    shared: &Arc<Shared<A>>,
    listeners: Vec<std::net::TcpListener>,
    inboxes: Vec<Inbox<A::Msg>>,
    stops: Vec<async_channel::Receiver<Deadlines>>,
    exit_tx: mpsc::Sender<Event>,
) -> Result<Cores, StartError> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let io_driver = shared.config.io_driver;
    let mut threads = Vec::with_capacity(listeners.len());
    let per_core = listeners.into_iter().zip(inboxes).zip(stops);
    for (id, ((listener, inbox), stop)) in per_core.enumerate() {
        let (shared, ready, exit) = (shared.clone(), ready_tx.clone(), exit_tx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("chatbox-core-{id}"))
            .spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_core(id, shared, listener, inbox, stop, ready, io_driver)
                }));
                let panicked = run.is_err();
                let _ = exit.send(Event::Exit(CoreExit { core: id, panicked }));
            });
        let thread = spawned.map_err(|e| StartError::Core {
            core: id,
            reason: e.to_string(),
        })?;
        threads.push(thread);
    }
    Ok(Cores {
        threads,
        ready: ready_rx,
    })
}

/// Waits until every core runs; returns the driver each one chose.
fn await_cores(cores: usize, ready: &Ready) -> Result<Vec<Driver>, StartError> {
    (0..cores)
        .map(|core| match ready.recv() {
            Ok(Ok(driver)) => Ok(driver),
            Ok(Err(reason)) => Err(StartError::Core { core, reason }),
            Err(_) => Err(StartError::Core {
                core,
                reason: "thread exited during start-up".into(),
            }),
        })
        .collect()
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
fn run_core<A: App>(
    id: usize,
    shared: Arc<Shared<A>>,
    listener: std::net::TcpListener,
    mesh_rx: Inbox<A::Msg>,
    stop_rx: async_channel::Receiver<Deadlines>,
    ready: mpsc::Sender<Result<Driver, String>>,
    io_driver: IoDriver,
) {
    let ready_fail = ready.clone();
    let body = move |driver: Driver| async move {
        let core = Rc::new(Core::new(id, shared, driver));
        let listener = match monoio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot adopt listener: {e}")));
                return;
            }
        };
        monoio::spawn(core.clone().accept_loop(listener));
        let (mesh_stop, mesh_stopped) = async_channel::bounded::<()>(1);
        let mesh = monoio::spawn(core.clone().mesh_loop(mesh_rx, mesh_stopped));
        monoio::spawn(core.clone().keepalive_loop());
        let addr_limits = monoio::spawn(core.addr.clone().serve());
        A::spawn_tasks(&core);
        tracing::info!(core = id, ?driver, "core running");
        let _ = ready.send(Ok(driver));
        let d = stop_rx
            .recv()
            .await
            .unwrap_or_else(|_| Deadlines::from_now(Duration::ZERO, Duration::ZERO));
        let at = monoio::time::Instant::from_std;
        core.shutdown(at(d.grace), at(d.cores)).await;
        // Finished here, on this thread: see `Core::mesh_loop` and `AddrLimits::serve`.
        drop(mesh_stop);
        mesh.await;
        core.addr.stop();
        addr_limits.await;
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

impl<A: App> ServerHandle<A> {
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

    pub fn mesh(&self) -> &Mesh<A::Msg> {
        &self.shared.mesh
    }

    /// Sends a text frame to every connection on every core.
    pub fn broadcast(&self, text: &str) -> Vec<MeshError> {
        self.shared.mesh.broadcast(text)
    }

    /// What every core shares, the application's part included.
    pub fn shared(&self) -> &Shared<A> {
        &self.shared
    }

    /// The Prometheus text of all cores.
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(&self.shared.metrics)
    }

    pub fn metrics(&self) -> &[crate::metrics::CoreMetrics] {
        &self.shared.metrics
    }

    /// Waits for every core to stop, then flushes what the application must not
    /// lose, all by the shutdown deadline: a step that overruns it is cut off
    /// with a warning naming the step. A core that dies on its own (not through
    /// shutdown) stops the others and makes this an error: the process should exit
    /// and be restarted rather than run with a core missing. Data that could not
    /// be flushed is an error too.
    pub fn join(mut self) -> Result<(), RunError> {
        let (result, deadline) = self.wait_cores();
        // Cores that ended are joined; one still running past the deadline is left.
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        let flushed = A::stopped(&self.shared.app, &self.shared.hooks, deadline);
        if let Some(pool) = self.pool.take() {
            // The notifier and whatever else runs on the pool; never past the deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(step = "notifier", "shutdown deadline reached; step cut off");
                pool.shutdown_background();
            } else {
                pool.shutdown(left.min(Duration::from_secs(1)));
            }
        }
        result?;
        flushed.map_err(RunError::NotFlushed)
    }

    /// Waits for the cores' exits, until shutdown's deadline once it began.
    /// Returns how it went and the deadline (now, if shutdown never began).
    fn wait_cores(&mut self) -> (Result<(), RunError>, Instant) {
        let mut result = Ok(());
        let mut deadline: Option<Deadlines> = None;
        let mut running = self.threads.len();
        while running > 0 {
            let event = match deadline {
                None => self.exits.recv().ok(),
                Some(d) => {
                    // A core cut off at its deadline needs a moment to end.
                    let by = (d.cores + CORE_EXIT_MARGIN).min(d.deadline);
                    let left = by.saturating_duration_since(Instant::now());
                    match self.exits.recv_timeout(left) {
                        Ok(e) => Some(e),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            tracing::warn!(
                                step = "stopping cores",
                                cores = running,
                                "shutdown deadline reached; step cut off"
                            );
                            result = result.and(Err(RunError::NotFlushed(format!(
                                "{running} core(s) did not stop in time; their work under way was not stored"
                            ))));
                            break;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => None,
                    }
                }
            };
            let Some(event) = event else { break };
            let exit = match event {
                Event::Shutdown(d) => {
                    deadline = Some(d);
                    continue;
                }
                Event::Exit(exit) => exit,
            };
            running -= 1;
            let unexpected = exit.panicked || !self.trigger.triggered.load(Ordering::SeqCst);
            if unexpected && result.is_ok() {
                tracing::error!(core = exit.core, "core died; shutting down the others");
                result = Err(RunError::CoreDied(exit.core));
                self.trigger.shutdown();
            }
        }
        (result, deadline.map_or_else(Instant::now, |d| d.deadline))
    }
}

impl<A: App> Drop for ServerHandle<A> {
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
