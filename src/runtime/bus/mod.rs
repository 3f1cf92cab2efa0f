//! The mesh's second tier: messages between nodes over NATS, and the live members.
//!
//! A core never talks to NATS itself. The client (`async-nats`, a tokio library)
//! lives on the blocking pool's runtime; a core hands it a payload and goes on, and
//! what arrives is given to the application's handler on a pool thread, which
//! forwards it into the cores over the mesh. Core NATS is at-most-once: nothing
//! that must not be lost may depend on it (the store is the durability point;
//! docs/CLUSTER.md says what each message may lose and how it is recovered).
//!
//! Subjects, all under one prefix so that several clusters can share a bus:
//! `{prefix}.members` (heartbeats), `{prefix}.all` (every node),
//! `{prefix}.node.{id}` (one node).

pub mod members;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

use crate::clock::now_ms;
use crate::pool::BlockingPool;
pub use members::{owner_among, Heartbeat, Members};

/// The header naming the node that sent a reply.
const NODE_HEADER: &str = "Chatbox-Node";

/// Publishes in flight at once before a send is refused as `Full`.
const IN_FLIGHT_MAX: usize = 4096;

/// How a bus is set up; built from the configuration by the application.
#[derive(Debug, Clone)]
pub struct BusSettings {
    pub servers: Vec<String>,
    pub node_id: Arc<str>,
    pub prefix: String,
    pub heartbeat: Duration,
    pub member_timeout: Duration,
    /// How long a request to every node waits for their replies.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("the bus is down (reconnecting)")]
    Down,
    #[error("too many bus messages in flight ({0})")]
    Full(usize),
    #[error("the bus request failed: {0}")]
    Request(String),
}

/// One message from another node, given to the application's handler.
pub struct Inbound {
    pub payload: bytes::Bytes,
    reply: Option<async_nats::Subject>,
    bus: Bus,
}

impl Inbound {
    /// Answers a request made with [`Bus::gather`]; a message that asked for no
    /// reply ignores it.
    pub fn reply(&self, payload: Vec<u8>) {
        if let Some(subject) = self.reply.clone() {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(NODE_HEADER, &*self.bus.inner.settings.node_id);
            self.bus.spawn_publish(subject, Some(headers), payload);
        }
    }
}

/// The application's handler for what other nodes send (runs on a pool thread).
pub type Handler = Arc<dyn Fn(Inbound) + Send + Sync>;

/// The replies of a request to every node.
#[derive(Debug, Default)]
pub struct Gathered {
    pub replies: Vec<(Arc<str>, bytes::Bytes)>,
    /// Live members that did not answer in time.
    pub missing: Vec<Arc<str>>,
}

/// A node's counters, rendered into `/metrics`.
#[derive(Default)]
pub struct Stats {
    messages_out: AtomicU64,
    messages_in: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    errors: AtomicU64,
    refused: AtomicU64,
    /// Round trips of requests to every node (`gather`).
    requests: crate::metrics::SharedHistogram,
}

/// One publish waiting for its turn.
struct Out {
    subject: async_nats::Subject,
    headers: Option<async_nats::HeaderMap>,
    payload: Vec<u8>,
}

struct Inner {
    settings: BusSettings,
    client: async_nats::Client,
    handle: tokio::runtime::Handle,
    /// Connected with this node's subscriptions in place (see [`Bus::follow_connection`]).
    up: AtomicBool,
    in_flight: AtomicUsize,
    /// Every publish goes through this one queue, drained by one task, so that
    /// one node's messages to another arrive in the order they were sent (an
    /// attach before the frames that follow it). Bounded by `in_flight`.
    out: tokio::sync::mpsc::UnboundedSender<Out>,
    /// This node is stopping: every heartbeat says so from now on.
    leaving: AtomicBool,
    /// Cold path: written once per heartbeat, read per cross-node request.
    members: Mutex<Members>,
    /// The other live nodes, republished whenever the set changes.
    view: tokio::sync::watch::Sender<Vec<Arc<str>>>,
    stats: Stats,
}

/// The node's bus. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Bus {
    /// Connects (in the background: a bus that is down at start-up is retried for
    /// ever, and the node serves what it can meanwhile), subscribes, and starts the
    /// heartbeat. Must not be called from a core.
    pub fn start(
        settings: BusSettings,
        pool: &BlockingPool,
        handler: Handler,
    ) -> Result<Bus, BusError> {
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let client = pool
            .block_on(connect(settings.clone(), events_tx))
            .map_err(|e| BusError::Request(e.to_string()))??;
        let timeout_ms = settings.member_timeout.as_millis() as i64;
        let (out, queued) = tokio::sync::mpsc::unbounded_channel();
        let bus = Bus {
            inner: Arc::new(Inner {
                members: Mutex::new(Members::new(settings.node_id.clone(), timeout_ms)),
                view: tokio::sync::watch::channel(Vec::new()).0,
                settings,
                client,
                handle: pool.handle(),
                up: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                out,
                leaving: AtomicBool::new(false),
                stats: Stats::default(),
            }),
        };
        pool.handle().spawn(bus.clone().publish_in_order(queued));
        let spawned = bus.clone();
        pool.block_on(async move { spawned.subscribe_all(handler).await })
            .map_err(|e| BusError::Request(e.to_string()))??;
        pool.handle().spawn(bus.clone().follow_connection(events));
        Ok(bus)
    }

    pub fn node_id(&self) -> &Arc<str> {
        &self.inner.settings.node_id
    }

    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// The other live nodes, sorted.
    pub fn others(&self) -> Vec<Arc<str>> {
        self.members().others(now_ms())
    }

    /// The node that owns `user` in this node's current view.
    pub fn owner(&self, user: &str) -> Arc<str> {
        self.members().owner(user, now_ms())
    }

    /// Follows the set of other live nodes (for readiness, and for tests to wait on
    /// a join or a leave instead of sleeping).
    pub fn watch_members(&self) -> tokio::sync::watch::Receiver<Vec<Arc<str>>> {
        self.inner.view.subscribe()
    }

    /// Republishes the view when it changed.
    fn publish_view(&self) {
        let now = self.others();
        self.inner.view.send_if_modified(|seen| {
            let changed = *seen != now;
            if changed {
                *seen = now;
            }
            changed
        });
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        // A panic while holding it cannot leave the table half-written (every
        // update is one insert or remove), so a poisoned lock is still usable.
        self.inner.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subject(&self, tail: &str) -> String {
        format!("{}.{tail}", self.inner.settings.prefix)
    }

    /// Sends `payload` to every other node; refused at once when the bus is down
    /// or too many sends are in flight.
    pub fn publish_all(&self, payload: Vec<u8>) -> Result<(), BusError> {
        self.send(self.subject("all"), payload)
    }

    /// Sends `payload` to one node.
    pub fn publish_to(&self, node: &str, payload: Vec<u8>) -> Result<(), BusError> {
        self.send(self.subject(&format!("node.{node}")), payload)
    }

    fn send(&self, subject: String, payload: Vec<u8>) -> Result<(), BusError> {
        if !self.is_up() {
            self.inner.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(BusError::Down);
        }
        let before = self.inner.in_flight.load(Ordering::Acquire);
        if before >= IN_FLIGHT_MAX {
            self.inner.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(BusError::Full(before));
        }
        self.spawn_publish(subject.into(), None, payload);
        Ok(())
    }

    fn spawn_publish(
        &self,
        subject: async_nats::Subject,
        headers: Option<async_nats::HeaderMap>,
        payload: Vec<u8>,
    ) {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let out = Out {
            subject,
            headers,
            payload,
        };
        if self.inner.out.send(out).is_err() {
            // The publisher stopped with the pool: the node is going away.
            self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The one task that publishes, in the order the sends were made.
    async fn publish_in_order(self, mut queued: tokio::sync::mpsc::UnboundedReceiver<Out>) {
        while let Some(Out {
            subject,
            headers,
            payload,
        }) = queued.recv().await
        {
            let len = payload.len() as u64;
            let client = &self.inner.client;
            let sent = match headers {
                Some(h) => {
                    client
                        .publish_with_headers(subject, h, payload.into())
                        .await
                }
                None => client.publish(subject, payload.into()).await,
            };
            self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.count_out(len, sent.is_ok());
        }
    }

    fn count_out(&self, len: u64, ok: bool) {
        let stats = &self.inner.stats;
        if ok {
            stats.messages_out.fetch_add(1, Ordering::Relaxed);
            stats.bytes_out.fetch_add(len, Ordering::Relaxed);
        } else {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends `payload` to every other node and collects their replies until each
    /// live member answered or the request timeout passed. Callable from a core:
    /// the work runs on the pool's runtime.
    pub fn gather(
        &self,
        payload: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Gathered, BusError>> + 'static {
        let bus = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let up = self.is_up();
        if up {
            self.inner.handle.spawn(async move {
                let _ = tx.send(bus.gather_here(payload).await);
            });
        }
        async move {
            if !up {
                return Err(BusError::Down);
            }
            rx.await
                .map_err(|_| BusError::Request("the bus stopped".into()))?
        }
    }

    async fn gather_here(&self, payload: Vec<u8>) -> Result<Gathered, BusError> {
        let started = std::time::Instant::now();
        let gathered = self.gather_replies(payload).await;
        self.inner.stats.requests.observe(started.elapsed());
        gathered
    }

    async fn gather_replies(&self, payload: Vec<u8>) -> Result<Gathered, BusError> {
        let client = &self.inner.client;
        let failed = |e: &dyn std::fmt::Display| BusError::Request(e.to_string());
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| failed(&e))?;
        let mut waiting = self.others();
        let len = payload.len() as u64;
        let sent = client
            .publish_with_reply(self.subject("all"), inbox, payload.into())
            .await;
        self.count_out(len, sent.is_ok());
        sent.map_err(|e| failed(&e))?;
        let mut out = Gathered::default();
        let deadline = tokio::time::Instant::now() + self.inner.settings.request_timeout;
        while !waiting.is_empty() {
            let next = tokio::time::timeout_at(deadline, replies.next()).await;
            let Ok(Some(msg)) = next else { break };
            self.count_in(msg.payload.len());
            let node = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(NODE_HEADER))
                .map(|v| Arc::<str>::from(v.as_str()));
            let Some(node) = node else { continue };
            waiting.retain(|n| *n != node);
            out.replies.push((node, msg.payload));
        }
        out.missing = waiting;
        Ok(out)
    }

    fn count_in(&self, len: usize) {
        let stats = &self.inner.stats;
        stats.messages_in.fetch_add(1, Ordering::Relaxed);
        stats.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Tells the other nodes, without waiting, that this one is stopping: they stop
    /// sending it users at once (their next view has it gone), while it finishes
    /// what it serves. Later heartbeats repeat it. Callable from a core.
    pub fn announce_leaving(&self) {
        self.inner.leaving.store(true, Ordering::Release);
        let beat = self.heartbeat(true, false);
        self.spawn_publish(self.subject("members").into(), None, beat);
    }

    /// Tells the other nodes this one is stopping, waiting at most `deadline`.
    pub fn leave(&self, pool: &BlockingPool, deadline: Duration) {
        let bus = self.clone();
        let left = pool.block_on(async move {
            let beat = bus.heartbeat(true, false);
            let client = &bus.inner.client;
            tokio::time::timeout(deadline, async {
                client
                    .publish(bus.subject("members"), beat.into())
                    .await
                    .ok();
                client.flush().await.ok();
            })
            .await
        });
        if !matches!(left, Ok(Ok(()))) {
            tracing::warn!("could not tell the other nodes this one is leaving");
        }
    }

    fn heartbeat(&self, leaving: bool, sync: bool) -> Vec<u8> {
        let beat = Heartbeat {
            node: self.inner.settings.node_id.to_string(),
            leaving,
            sync,
        };
        serde_json::to_vec(&beat).unwrap_or_default()
    }

    /// The bus's lines for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        render_metrics(
            &self.inner.stats,
            self.is_up(),
            self.others().len() + 1,
            out,
        );
    }
}

/// The bus's lines for `/metrics`; public so that checks can list every bus
/// series without a cluster (`render_metrics(&Stats::default(), ..)`).
pub fn render_metrics(s: &Stats, up: bool, members: usize, out: &mut String) {
    use std::fmt::Write;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let _ = write!(
        out,
        "# HELP chatbox_bus_up Whether this node's bus connection is up.\n\
         # TYPE chatbox_bus_up gauge\nchatbox_bus_up {}\n\
         # HELP chatbox_cluster_members Live nodes this node sees, itself included.\n\
         # TYPE chatbox_cluster_members gauge\nchatbox_cluster_members {}\n\
         # HELP chatbox_bus_messages_total Messages through the bus.\n\
         # TYPE chatbox_bus_messages_total counter\n\
         chatbox_bus_messages_total{{direction=\"out\"}} {}\n\
         chatbox_bus_messages_total{{direction=\"in\"}} {}\n\
         # HELP chatbox_bus_bytes_total Payload bytes through the bus.\n\
         # TYPE chatbox_bus_bytes_total counter\n\
         chatbox_bus_bytes_total{{direction=\"out\"}} {}\n\
         chatbox_bus_bytes_total{{direction=\"in\"}} {}\n\
         # HELP chatbox_bus_errors_total Bus sends that failed or were refused.\n\
         # TYPE chatbox_bus_errors_total counter\n\
         chatbox_bus_errors_total{{kind=\"failed\"}} {}\n\
         chatbox_bus_errors_total{{kind=\"refused\"}} {}\n",
        u8::from(up),
        members,
        get(&s.messages_out),
        get(&s.messages_in),
        get(&s.bytes_out),
        get(&s.bytes_in),
        get(&s.errors),
        get(&s.refused),
    );
    let name = "chatbox_bus_request_seconds";
    crate::metrics::header(
        out,
        name,
        "Round trips of requests to every node (until each answered or the request timed out).",
        "histogram",
    );
    s.requests.snapshot().write(out, name, "");
}

/// Connects in the background; the connection's events go to `events`.
async fn connect(
    settings: BusSettings,
    events: tokio::sync::mpsc::UnboundedSender<async_nats::Event>,
) -> Result<async_nats::Client, BusError> {
    async_nats::ConnectOptions::new()
        .name(format!("chatbox {}", settings.node_id))
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(settings.request_timeout)
        .event_callback(move |event| {
            tracing::info!(%event, "bus");
            // The receiver lives as long as the bus; after it, nothing listens.
            let _ = events.send(event);
            async {}
        })
        .connect(settings.servers.as_slice())
        .await
        .map_err(|e| BusError::Request(e.to_string()))
}

impl Bus {
    /// Keeps `up` true exactly while the connection is up *with this node's
    /// subscriptions renewed*. async-nats reports `Connected` before it sends them
    /// again after a reconnect, so a node that called itself up at that event was
    /// told it could be reached while messages to it were still dropped; a flush
    /// (a ping queued after the subscriptions) confirms the server has them.
    async fn follow_connection(
        self,
        mut events: tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
    ) {
        while let Some(event) = events.recv().await {
            match event {
                async_nats::Event::Connected => self.confirm_subscribed(&mut events).await,
                async_nats::Event::Disconnected | async_nats::Event::Closed => {
                    self.inner.up.store(false, Ordering::Release)
                }
                _ => {}
            }
        }
    }

    /// Flushes until the server confirmed (then the bus is up) or another event
    /// came (which decides instead).
    async fn confirm_subscribed(
        &self,
        events: &mut tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
    ) {
        let settings = &self.inner.settings;
        while events.is_empty() {
            let flushed = tokio::time::timeout(settings.request_timeout, self.inner.client.flush());
            match flushed.await {
                Ok(Ok(())) => return self.inner.up.store(true, Ordering::Release),
                // Refused at once (the connection dropped again): not a busy loop.
                Ok(Err(_)) => tokio::time::sleep(settings.heartbeat).await,
                Err(_) => {}
            }
        }
    }

    /// Subscribes to this node's subjects and starts the heartbeat.
    async fn subscribe_all(&self, handler: Handler) -> Result<(), BusError> {
        let client = &self.inner.client;
        let failed = |e: async_nats::SubscribeError| BusError::Request(e.to_string());
        let node = format!("node.{}", self.inner.settings.node_id);
        for tail in ["all", node.as_str()] {
            let sub = client.subscribe(self.subject(tail)).await.map_err(failed)?;
            tokio::spawn(self.clone().deliver(sub, handler.clone()));
        }
        let sub = client
            .subscribe(self.subject("members"))
            .await
            .map_err(failed)?;
        tokio::spawn(self.clone().hear(sub));
        tokio::spawn(self.clone().beat());
        Ok(())
    }

    async fn deliver(self, mut sub: async_nats::Subscriber, handler: Handler) {
        while let Some(msg) = sub.next().await {
            self.count_in(msg.payload.len());
            handler(Inbound {
                payload: msg.payload,
                reply: msg.reply,
                bus: self.clone(),
            });
        }
    }

    async fn hear(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            self.count_in(msg.payload.len());
            let Ok(beat) = serde_json::from_slice::<Heartbeat>(&msg.payload) else {
                tracing::warn!("a heartbeat that is not one was ignored");
                continue;
            };
            if self.members().heard(&beat, now_ms()) {
                tracing::info!(node = %beat.node, "a node joined");
            }
            self.publish_view();
            if beat.sync && beat.node != *self.inner.settings.node_id {
                let mine = self.heartbeat(false, false);
                self.spawn_publish(self.subject("members").into(), None, mine);
            }
        }
    }

    /// Publishes a heartbeat every interval, and one asking for everyone's at once
    /// whenever the connection (re)starts.
    async fn beat(self) {
        let mut tick = tokio::time::interval(self.inner.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_up = false;
        loop {
            tick.tick().await;
            let now_up = self.is_up();
            if now_up {
                let leaving = self.inner.leaving.load(Ordering::Acquire);
                let beat = self.heartbeat(leaving, !was_up && !leaving);
                self.spawn_publish(self.subject("members").into(), None, beat);
            }
            was_up = now_up;
            self.members().forget_dead(now_ms());
            self.publish_view();
        }
    }
}
