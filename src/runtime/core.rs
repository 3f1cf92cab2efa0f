//! One core: its accept loop, connections, mesh inbox and the state it alone owns.
//!
//! Everything here is `!Send` by construction (`Rc`, `RefCell`, `Cell`) and lives
//! on one thread. Work for another core travels through the mesh as a `CoreMsg`.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use monoio::net::{TcpListener, TcpStream};
use monoio::time::Instant;

use super::addr::{AddrLimits, AddrMesh, Refused, Slot};
use super::app::{App, Hooks};
use super::gate::Gate;
use super::http::head::{read_head, Head, HeadError};
use super::http::Refuse;
use super::io::Socket;
use super::mesh::{owner_core, CoreMsg, Handover, Mesh, MeshError};
use super::outbox::{Outbox, Outgoing};
use super::registry::{ConnId, RegisterError, Registration, Registry};
use super::ws::handshake::{self, Route, Upgrade};
use crate::auth::Verifier;
use crate::config::Config;
use crate::metrics::{CoreMetrics, Refusal};
use crate::pool::BlockingPool;

/// What every core shares, read-only after start-up.
pub struct Shared<A: App> {
    pub config: Config,
    pub verifier: Verifier,
    pub metrics: Box<[CoreMetrics]>,
    pub mesh: Mesh<A::Msg>,
    pub pool: BlockingPool,
    pub hooks: Hooks,
    pub app: A::Shared,
    /// The queues into every core's per-address limits.
    pub addr_mesh: AddrMesh,
    /// Cores still draining at shutdown: every core keeps accepting (answering
    /// 503) until all of them are done, since the kernel spreads new connections
    /// over every core's listener.
    draining: AtomicUsize,
    /// Notified when `draining` reaches zero.
    all_drained: event_listener::Event,
    /// `{prefix}/ws` and `{prefix}{echo_path}`, precomputed for routing.
    ws_path: String,
    echo_path: Option<String>,
}

impl<A: App> Shared<A> {
    pub fn new(
        config: Config,
        verifier: Verifier,
        mesh: Mesh<A::Msg>,
        pool: BlockingPool,
        hooks: Hooks,
        app: A::Shared,
    ) -> Shared<A> {
        let cores = mesh.cores();
        Shared {
            ws_path: format!("{}/ws", config.path_prefix),
            echo_path: config
                .echo_path
                .as_ref()
                .map(|p| format!("{}{p}", config.path_prefix)),
            metrics: (0..cores).map(|_| CoreMetrics::default()).collect(),
            addr_mesh: AddrMesh::new(cores),
            draining: AtomicUsize::new(cores),
            all_drained: event_listener::Event::new(),
            config,
            verifier,
            mesh,
            pool,
            hooks,
            app,
        }
    }
}

/// The state one core owns.
pub struct Core<A: App> {
    pub id: usize,
    /// The I/O driver this core's runtime runs.
    pub driver: super::server::Driver,
    pub shared: Arc<Shared<A>>,
    pub gate: Rc<Gate>,
    pub registry: Rc<RefCell<Registry>>,
    /// The per-client-address limits this core keeps, and its way to the others'.
    pub addr: Rc<AddrLimits>,
    /// The application's state on this core.
    pub app: A::CoreState,
    shutdown_deadline: Cell<Option<Instant>>,
}

impl<A: App> Core<A> {
    pub fn new(id: usize, shared: Arc<Shared<A>>, driver: super::server::Driver) -> Core<A> {
        let cfg = &shared.config;
        let registry = Registry::new(
            id,
            cfg.max_connections_per_user,
            cfg.connections_per_core_max,
        );
        Core {
            id,
            driver,
            gate: Rc::new(Gate::default()),
            registry: Rc::new(RefCell::new(registry)),
            addr: AddrLimits::new(id, cfg, &shared.addr_mesh),
            app: A::core_state(&shared.app, id),
            shutdown_deadline: Cell::new(None),
            shared,
        }
    }

    pub fn metrics(&self) -> &CoreMetrics {
        &self.shared.metrics[self.id]
    }

    /// Queues a frame for a connection of this core; one that just went away is
    /// skipped (its own drop detaches it everywhere).
    pub fn push_conn(&self, conn: ConnId, frame: Arc<str>) {
        let _ = self
            .registry
            .borrow()
            .push_conn(conn, Outgoing::Text(frame));
    }

    /// Queues a frame for a connection on any core: this one directly, another
    /// through the mesh (a full queue drops it and counts the drop).
    pub fn deliver(&self, owner: usize, conn: ConnId, frame: Arc<str>) {
        if owner == self.id {
            return self.push_conn(conn, frame);
        }
        if self
            .shared
            .mesh
            .send(owner, CoreMsg::Deliver { conn, frame })
            .is_err()
        {
            self.metrics().mesh_dropped.inc();
        }
    }

    /// Sends an application message to `owner`, handled at once when that is this
    /// core. A refusal (full queue, stopped core) is counted and returned so the
    /// caller can answer its client.
    pub fn send_app(self: &Rc<Self>, owner: usize, msg: A::Msg) -> Result<(), MeshError> {
        if owner == self.id {
            A::on_msg(self, msg);
            return Ok(());
        }
        self.shared
            .mesh
            .send(owner, CoreMsg::App(msg))
            .map_err(|(e, _)| {
                self.metrics().mesh_dropped.inc();
                e
            })
    }

    /// When the current shutdown must be finished, once one has begun.
    pub fn shutdown_deadline(&self) -> Option<Instant> {
        self.shutdown_deadline.get()
    }

    /// Accepts connections until the gate stops (so, while draining too: requests
    /// then get 503, `/healthz` still 200).
    pub async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        let mut emfile_logged = false;
        loop {
            let accepted = monoio::select! {
                r = listener.accept() => r,
                _ = self.gate.stopped() => break,
            };
            match accepted {
                Ok((stream, _peer)) => {
                    emfile_logged = false;
                    self.metrics().accepted.inc();
                    if self.gate.permits() >= self.shared.config.connections_per_core_max {
                        self.metrics().refused(Refusal::Overloaded);
                        continue; // dropping the stream closes it at once
                    }
                    self.spawn_conn(conn_task(self.clone(), stream));
                }
                Err(e) => {
                    self.metrics().accept_errors.inc();
                    // Out of descriptors (or memory): back off instead of spinning on
                    // a listener that stays readable; connections that close free fds.
                    let scarce = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if scarce {
                        if !emfile_logged {
                            tracing::error!(core = self.id, error = %e, "accept failed: out of file descriptors or memory; backing off");
                            emfile_logged = true;
                        }
                        monoio::select! {
                            _ = monoio::time::sleep(Duration::from_millis(50)) => {}
                            _ = self.gate.stopped() => break,
                        }
                    } else {
                        tracing::debug!(core = self.id, error = %e, "accept failed");
                    }
                }
            }
        }
        tracing::debug!(core = self.id, "stopped accepting");
    }

    /// Runs a connection task under the gate, containing any panic to that task.
    fn spawn_conn(self: &Rc<Self>, task: impl Future<Output = ()> + 'static) {
        let permit = self.gate.enter();
        monoio::spawn(Contained {
            task,
            core: self.clone(),
            // Dropped with the task, panic or not: the permit comes back either way.
            on_panic: Some(move || drop(permit)),
        });
    }

    /// Runs a task of the application on this core. A panic in it ends only that
    /// task: it is counted, and `on_panic` runs (to tell the task's session, say);
    /// the core and everything else on it carry on.
    pub fn spawn_guarded<F, P>(self: &Rc<Self>, task: F, on_panic: P)
    where
        F: Future<Output = ()> + 'static,
        P: FnOnce() + 'static,
    {
        monoio::spawn(Contained {
            // The request a task works for stays its context (logs, outbound calls).
            task: crate::trace::Traced::inherit(task),
            core: self.clone(),
            on_panic: Some(on_panic),
        });
    }

    /// Keep-alive for every connection of this core from one timer: a connection
    /// quiet for a ping interval is asked to ping, one that leaves a ping unanswered
    /// for the pong timeout is closed. A timer per connection would cost each idle
    /// connection more memory than all its other state (PERF.md).
    pub async fn keepalive_loop(self: Rc<Self>) {
        let cfg = &self.shared.config;
        let ping = Duration::from_millis(cfg.ws_ping_interval_ms);
        let pong = Duration::from_millis(cfg.ws_pong_timeout_ms);
        // Pings go out at most a quarter of the shorter period late.
        let every = (ping.min(pong) / 4).clamp(Duration::from_millis(5), Duration::from_secs(5));
        let in_sweeps = |d: Duration| {
            d.as_millis()
                .div_ceil(every.as_millis())
                .clamp(1, u16::MAX as u128) as u16
        };
        let periods = super::outbox::Sweeps {
            ping: in_sweeps(ping),
            pong: in_sweeps(pong),
        };
        loop {
            monoio::select! {
                _ = monoio::time::sleep(every) => {}
                _ = self.gate.stopped() => return,
            }
            self.registry.borrow().sweep(periods);
        }
    }

    /// Serves messages from other cores until `stop` closes, which the core does
    /// once it has shut down, so that the loop ends, and its inbox is dropped, on
    /// this thread. Left pending, its waker stayed in the inbox; another core's
    /// later send then freed the orphaned task on the sender's thread, inside the
    /// inbox's lock, and deadlocked (seen as a core that never stopped).
    pub async fn mesh_loop(
        self: Rc<Self>,
        rx: async_channel::Receiver<CoreMsg<A::Msg>>,
        stop: async_channel::Receiver<()>,
    ) {
        loop {
            let msg = monoio::select! {
                msg = rx.recv() => msg,
                _ = stop.recv() => return,
            };
            let Ok(msg) = msg else { return };
            match msg {
                CoreMsg::Handover(h) => {
                    self.metrics().handovers_in.inc();
                    let Handover { fd, upgrade, addr } = *h;
                    // Adopted first: whatever happens next releases the slot.
                    let slot = addr.map(|c| c.adopt(&self.addr));
                    match Socket::from_owned_fd(fd) {
                        Ok(sock) => {
                            let core = self.clone();
                            self.spawn_conn(async move {
                                core.accept_upgrade(sock, upgrade, slot).await
                            });
                        }
                        Err(e) => {
                            tracing::warn!(core = self.id, error = %e, "could not adopt handed-over socket")
                        }
                    }
                }
                CoreMsg::Broadcast(text) => {
                    let n = self.registry.borrow().push_all(&Outgoing::Text(text));
                    tracing::debug!(core = self.id, connections = n, "broadcast delivered");
                }
                // The connection may have gone meanwhile; that is fine.
                CoreMsg::Deliver { conn, frame } => self.push_conn(conn, frame),
                CoreMsg::AdminFeed(frame) => {
                    self.registry.borrow().push_admins(&Outgoing::Text(frame));
                }
                CoreMsg::App(msg) => {
                    // A panic while handling one message costs that message only.
                    let handled = catch_unwind(AssertUnwindSafe(|| A::on_msg(&self, msg)));
                    if handled.is_err() {
                        self.metrics().panics.inc();
                        tracing::error!(core = self.id, "a mesh message's handler panicked");
                    }
                }
            }
        }
    }

    /// Shuts this core down by `deadline`, step by step, each step cut off at the
    /// deadline with a warning that names it:
    /// 1. draining: `/readyz` fails and new requests get 503, while the
    ///    application finishes its work (answers get until `grace`, see
    ///    [`App::drain`]); every core keeps accepting until all of them drained;
    /// 2. closing connections: no more accepting, every connection is asked to
    ///    close (1001), and we wait for them.
    pub async fn shutdown(self: &Rc<Self>, grace: Instant, deadline: Instant) {
        self.shutdown_deadline.set(Some(deadline));
        self.gate.close();
        tracing::info!(core = self.id, "draining");
        let drained = monoio::select! {
            _ = A::drain(self, grace, deadline) => true,
            _ = monoio::time::sleep_until(deadline) => false,
        };
        if !drained {
            tracing::warn!(
                core = self.id,
                step = "draining",
                "shutdown deadline reached; step cut off"
            );
        }
        let all = monoio::select! {
            _ = self.others_drained() => true,
            _ = monoio::time::sleep_until(deadline) => false,
        };
        if !all {
            tracing::warn!(
                core = self.id,
                step = "draining (other cores)",
                "shutdown deadline reached; step cut off"
            );
        }
        self.gate.stop();
        let asked = self.registry.borrow().push_all(&Outgoing::Shutdown);
        tracing::info!(core = self.id, connections = asked, "closing connections");
        monoio::select! {
            _ = self.gate.drained() => tracing::info!(core = self.id, "connections closed"),
            _ = monoio::time::sleep_until(deadline) => {
                tracing::warn!(core = self.id, step = "closing connections", left = self.gate.permits(), "shutdown deadline reached; step cut off, dropping the rest");
            }
        }
    }

    /// Marks this core drained and waits until every core is.
    async fn others_drained(&self) {
        let shared = &self.shared;
        if shared.draining.fetch_sub(1, Ordering::AcqRel) == 1 {
            shared.all_drained.notify(usize::MAX);
        }
        loop {
            if shared.draining.load(Ordering::Acquire) == 0 {
                return;
            }
            let listener = shared.all_drained.listen();
            if shared.draining.load(Ordering::Acquire) == 0 {
                return;
            }
            listener.await;
        }
    }

    /// The owning core's half of an upgrade: enforce the caps, then run the socket.
    /// `addr` is the connection's slot under its client address's limits: released
    /// before any refusal, or kept by the registration.
    async fn accept_upgrade(self: Rc<Self>, sock: Socket, up: Upgrade, addr: Option<Slot>) {
        if self.gate.is_closing() {
            drop(addr);
            return Refuse::shutting_down().send(self.metrics(), &sock).await;
        }
        let outbox = Outbox::new(self.shared.config.ws_outbox_frames_max);
        let user = up.identity.as_ref().map(|i| i.user_id.clone());
        let admin = up.identity.as_ref().is_some_and(|i| i.admin);
        let registered = self
            .registry
            .borrow_mut()
            .register(user, admin, outbox.clone());
        let id = match registered {
            Ok(id) => id,
            Err(RegisterError::UserCap(n)) => {
                drop(addr);
                let msg = format!("too many connections for this user (at most {n})");
                return Refuse::new(
                    429,
                    "too_many_connections",
                    msg,
                    Refusal::TooManyConnections,
                )
                .send(self.metrics(), &sock)
                .await;
            }
            Err(RegisterError::CoreFull) => {
                drop(addr);
                return Refuse::new(
                    503,
                    "overloaded",
                    "server is at capacity; retry later",
                    Refusal::Overloaded,
                )
                .header("Retry-After", "5")
                .send(self.metrics(), &sock)
                .await;
            }
        };
        let reg = Registration::new(id, self.registry.clone(), addr);
        if let Some(conn) = super::ws::conn::upgrade(&self, sock, up, reg, outbox).await {
            // Its own task: an idle connection then costs only the WebSocket loop's
            // state, not the head reader's or the upgrade's.
            self.spawn_conn(conn.run());
        }
    }
}

/// One accepted TCP connection: count it against its client address, read the
/// head, then route it.
///
/// A direct client is counted from its first moment, so connections that never
/// finish their head count too. Behind a trusted proxy the client is known only
/// from the head; the proxy's own connections are not limited.
async fn conn_task<A: App>(core: Rc<Core<A>>, stream: TcpStream) {
    let sock = Socket::new(stream);
    let peer = match sock.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let cfg = &core.shared.config;
    let deadline = Instant::now() + Duration::from_millis(cfg.http_head_timeout_ms);
    let proxied = core.addr.trusts(peer.ip());
    let mut slot = None;
    if !proxied {
        match core.addr.acquire(peer.ip(), &core.gate, deadline).await {
            Ok(s) => slot = Some(s),
            Err(why) => return refuse_early(&core, &sock, why).await,
        }
    }
    let (buf, head) = match read_head(&sock, cfg.http_head_bytes_max, deadline, &core.gate).await {
        Ok(h) => h,
        Err(e) => {
            drop(slot);
            let Some(refuse) = head_refusal(e) else {
                return;
            };
            return refuse.send(core.metrics(), &sock).await;
        }
    };
    if proxied {
        let client = core.addr.client(peer.ip(), head.forwarded_for.as_deref());
        match core.addr.acquire(client, &core.gate, deadline).await {
            Ok(s) => slot = Some(s),
            Err(why) => return address_refusal(why).send(core.metrics(), &sock).await,
        }
    }
    route(core, sock, peer, buf, head, slot).await
}

/// Serves plain HTTP, or checks an upgrade and runs it here or on its user's core.
async fn route<A: App>(
    core: Rc<Core<A>>,
    sock: Socket,
    peer: SocketAddr,
    buf: Vec<u8>,
    head: Head,
    slot: Option<Slot>,
) {
    let shared = &core.shared;
    let route = if head.path == shared.ws_path {
        Route::Chat
    } else if shared.echo_path.as_deref() == Some(head.path.as_str()) {
        Route::Echo
    } else {
        return super::http::serve(core.clone(), sock, buf, slot, &head.path).await;
    };
    let cfg = &shared.config;
    let up = match handshake::check(
        &head,
        &buf,
        route,
        &shared.verifier,
        &cfg.allowed_origins,
        peer,
    ) {
        Ok(up) => up,
        Err(refuse) => {
            drop(slot);
            return refuse.send(core.metrics(), &sock).await;
        }
    };
    // The head and its buffer (a kilobyte or more, the token included) would
    // otherwise live in this task for the connection's whole life.
    drop((head, buf));
    let owner = match &up.identity {
        Some(id) => owner_core(&id.user_id, shared.mesh.cores()),
        None => core.id,
    };
    if owner == core.id {
        return core.accept_upgrade(sock, up, slot).await;
    }
    hand_over(&core, sock, up, slot, owner).await;
}

/// The answer to a head that could not be read; `None` when the peer is gone.
fn head_refusal(e: HeadError) -> Option<Refuse> {
    Some(match e {
        HeadError::Timeout => Refuse::new(
            408,
            "timeout",
            "request head not received in time",
            Refusal::HeadTimeout,
        ),
        HeadError::TooLarge(n) => Refuse::new(
            431,
            "head_too_large",
            format!("request head over {n} bytes"),
            Refusal::HeadTooLarge,
        ),
        HeadError::Malformed(m) => Refuse::new(400, "bad_request", m, Refusal::BadRequest),
        HeadError::ShuttingDown => Refuse::shutting_down(),
        HeadError::Closed | HeadError::Io(_) => return None,
    })
}

/// Seconds a client whose address holds all its connections is asked to wait:
/// long-lived WebSockets rarely free a slot within a second.
const RETRY_AFTER_FULL_SECS: u64 = 5;

/// The answer to a client address over its limits.
fn address_refusal(why: Refused) -> Refuse {
    match why {
        Refused::Full(n) => Refuse::new(
            429,
            "too_many_connections",
            format!("too many connections from this address (at most {n})"),
            Refusal::AddressConnections,
        )
        .header("Retry-After", RETRY_AFTER_FULL_SECS.to_string()),
        Refused::Rate(ms) => Refuse::new(
            429,
            "rate_limited",
            "too many new connections from this address; retry later",
            Refusal::AddressRate,
        )
        .header("Retry-After", ms.div_ceil(1000).max(1).to_string()),
        Refused::ShuttingDown => Refuse::shutting_down(),
        Refused::Busy => Refuse::new(
            503,
            "overloaded",
            "server is busy; retry later",
            Refusal::Overloaded,
        )
        .header("Retry-After", "1"),
    }
}

/// Refuses a direct client before its head was read. What it already sent is
/// read and dropped first: closing with unread bytes would send a reset, which can
/// reach the client before it reads the refusal.
async fn refuse_early<A: App>(core: &Core<A>, sock: &Socket, why: Refused) {
    let mut scratch = [0u8; 2048];
    for _ in 0..8 {
        match sock.try_recv(&mut scratch) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    address_refusal(why).send(core.metrics(), sock).await;
}

/// Moves an authenticated upgrade to the core that owns its user. The socket itself
/// moves; no bytes are ever proxied between cores.
async fn hand_over<A: App>(
    core: &Core<A>,
    sock: Socket,
    up: Upgrade,
    slot: Option<Slot>,
    owner: usize,
) {
    let fd = match sock.into_owned_fd() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "could not detach socket for handover");
            return;
        }
    };
    let addr = slot.map(Slot::into_claim);
    let msg = CoreMsg::Handover(Box::new(Handover {
        fd,
        upgrade: up,
        addr,
    }));
    match core.shared.mesh.send(owner, msg) {
        Ok(()) => core.metrics().handovers_out.inc(),
        Err((e, msg)) => {
            core.metrics().mesh_dropped.inc();
            tracing::warn!(error = %e, "handover refused");
            let CoreMsg::Handover(h) = msg else { return };
            drop(h.addr.map(|c| c.adopt(&core.addr)));
            if let Ok(sock) = Socket::from_owned_fd(h.fd) {
                Refuse::new(
                    503,
                    "overloaded",
                    "server is busy; retry later",
                    Refusal::Overloaded,
                )
                .header("Retry-After", "1")
                .send(core.metrics(), &sock)
                .await;
            }
        }
    }
}

/// A task with any panic contained to it: the panic is counted and logged, and
/// `on_panic` runs; the core and its other tasks carry on.
///
/// A hand-written future rather than an `async` block around the task: such a block
/// keeps the task twice (captured, and again while awaited), and an idle
/// connection's task is most of what it costs (PERF.md). A connection's gate permit
/// rides in its `on_panic` closure, so it costs no more room than before.
struct Contained<F, A: App, P> {
    task: F,
    core: Rc<Core<A>>,
    on_panic: Option<P>,
}

impl<F: Future<Output = ()>, A: App, P: FnOnce()> Future for Contained<F, A, P> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: structural pinning of `task`; it is never moved out. The other
        // fields are not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: `this` is pinned, so `task` is too (see above).
        let task = unsafe { Pin::new_unchecked(&mut this.task) };
        match catch_unwind(AssertUnwindSafe(|| task.poll(cx))) {
            Ok(p) => p,
            Err(_) => {
                this.core.metrics().panics.inc();
                tracing::error!(core = this.core.id, "a task panicked; only it stopped");
                if let Some(tell) = this.on_panic.take() {
                    // The task's own state may be broken; telling must not be.
                    let _ = catch_unwind(AssertUnwindSafe(tell));
                }
                Poll::Ready(())
            }
        }
    }
}
