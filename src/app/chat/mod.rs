//! Chat sessions owned by a core: the state a core keeps for them and the commands
//! that act on them, one file per concern.
//!
//! - [`session`]: one session's state machine; decides and returns effects.
//! - [`effects`]: performs those effects and delivers frames, here or on another core.
//! - [`message`]: a user message, from a valid frame to a durable `ack`.
//! - [`answer`]: the model's streamed answer, stored when it ends.
//! - [`resume`]: history and the missed chunks of a running answer.
//! - [`takeover`]: admins joining, writing in and leaving a session; help requests.
//! - [`voice`]: a voice message's transcription, after its ack.
//!
//! A session lives on the core of its user (every connection of that user is
//! there), so its state is plain `RefCell` data. Borrows never cross an `.await`:
//! each step borrows, decides, releases, and only then awaits storage.

pub mod answer;
pub mod effects;
pub mod extra;
pub mod lease;
pub mod message;
pub mod resume;
pub mod session;
pub mod takeover;
pub mod voice;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::frames::{self, error_frame, store_read_error, Code};
use super::Core;
use crate::clock::{now_ms, Millis};
use crate::config::Config;
use crate::crypto::KeyRing;
use crate::limiter::Limiter;
use crate::llm::Models;
use crate::notify::Notifier;
use crate::pool::BlockingPool;
use crate::runtime::ConnId;
use crate::store::{MessageRecord, SessionRecord, Store};
use session::{ContextLimits, Effect, Session};

/// The refusal when a user's sessions in memory are at `sessions_per_user_max`.
pub const TOO_MANY_SESSIONS: &str = "too many open sessions; close or finish one first";
/// Idle sessions one sweep of the store ends at most (the next sweep goes on).
const IDLE_SWEEP_BATCH: usize = 1000;
/// Sessions one connection may be attached to; the oldest is detached beyond it.
const SESSIONS_PER_CONNECTION_MAX: usize = 64;
/// Users whose rate-limit state a core keeps (see [`Limiter`]).
const LIMITER_USERS_MAX: usize = 100_000;
/// Admins whose admin-API rate-limit state a core keeps.
const ADMIN_LIMITER_USERS_MAX: usize = 10_000;

/// Read-only chat settings and services, shared by every core.
pub struct ChatShared {
    pub store: Arc<dyn Store>,
    /// Shared with the file pipeline, which seals on the blocking pool.
    pub keys: Arc<KeyRing>,
    /// Uploads: where their bytes go and what they may be.
    pub files: crate::app::files::Files,
    pub limits: frames::Limits,
    pub rate_limit_per_minute: u32,
    pub admin_rate_limit_per_minute: u32,
    pub history_messages_max: usize,
    pub session_idle: Duration,
    /// Sessions with no activity for this long are ended.
    pub session_end_idle: Duration,
    /// Help requests refused after a hand-back for this long.
    pub help_cooldown: Duration,
    pub sessions_per_user_max: usize,
    pub answer_bytes_max: usize,
    pub demo_chunk_delay: Duration,
    pub models: Arc<Models>,
    /// Speech-to-text for voice messages.
    pub stt: Arc<crate::llm::stt::Stt>,
    pub context: ContextLimits,
    /// How long an answer outlives the user's last connection.
    pub grace: Duration,
    pub notifier: Arc<Notifier>,
    pub pool: BlockingPool,
    /// This node's bus to the others, in cluster mode.
    pub bus: Option<crate::runtime::bus::Bus>,
    /// Core threads; sessions are sharded over them by user.
    pub cores: usize,
    /// Rows per page of the admin transcript and export.
    pub admin_page: usize,
    /// What those streams did.
    pub pages: crate::app::admin_stream::PageStats,
    /// The LLM series, by core and model.
    pub llm: crate::metrics::LlmMetrics,
}

impl ChatShared {
    // Each argument is a service opened (and checked) once at start-up.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        keys: KeyRing,
        models: Arc<Models>,
        stt: Arc<crate::llm::stt::Stt>,
        notifier: Arc<Notifier>,
        pool: BlockingPool,
        bus: Option<crate::runtime::bus::Bus>,
    ) -> ChatShared {
        ChatShared {
            store,
            keys: Arc::new(keys),
            // The stores are opened by the caller (they may fail start-up).
            files: crate::app::files::Files::new(config, Default::default()),
            limits: frames::Limits {
                content_chars_max: config.content_chars_max,
                metadata_bytes_max: config.metadata_bytes_max,
                ..frames::Limits::default()
            },
            rate_limit_per_minute: config.rate_limit_per_minute,
            admin_rate_limit_per_minute: config.admin_rate_limit_per_minute,
            history_messages_max: config.history_messages_max,
            session_idle: Duration::from_secs(config.session_idle_secs),
            session_end_idle: Duration::from_secs(config.session_end_idle_secs),
            help_cooldown: Duration::from_secs(config.help_cooldown_secs),
            sessions_per_user_max: config.sessions_per_user_max,
            answer_bytes_max: config.answer_bytes_max,
            demo_chunk_delay: Duration::from_millis(config.demo_chunk_delay_ms),
            models: models.clone(),
            stt,
            context: ContextLimits {
                messages_max: config.llm_context_messages_max,
                chars_max: config.llm_context_chars_max,
            },
            grace: Duration::from_secs(config.llm_grace_secs),
            notifier,
            pool,
            bus,
            cores: config.core_count(),
            admin_page: config.admin_page_messages,
            pages: Default::default(),
            llm: crate::metrics::LlmMetrics::new(models.ids(), config.core_count()),
        }
    }
}

/// The chat state one core owns (`!Send`: it never leaves its core).
pub struct ChatCore {
    pub(crate) sessions: RefCell<HashMap<Arc<str>, Session>>,
    conn_sessions: RefCell<HashMap<ConnId, Vec<Arc<str>>>>,
    limiter: RefCell<Limiter>,
    /// The admin API's rate limit, per admin, on this core.
    admin_limiter: RefCell<Limiter>,
    /// Uploads per user, on this core (an upload is served where it arrives).
    upload_limiter: RefCell<Limiter>,
    scratch: RefCell<(Vec<u8>, simd_json::Buffers)>,
    /// Cluster, owner side: connections whose sockets are on other nodes.
    pub(crate) served: RefCell<crate::app::remote::ServedMap>,
    /// Cluster, edge side: this core's sockets served by another node: which node,
    /// and whose socket it is.
    pub(crate) proxies: RefCell<crate::app::remote::ProxyMap>,
    /// Cluster: the lease epoch this node holds for each user it wrote for here
    /// (dropped with the user's last session in memory).
    pub(crate) leases: RefCell<HashMap<Arc<str>, u64>>,
    /// One node on the embedded store: this core's journal, opened with its
    /// first write (`None` when the store keeps none, or it could not open).
    journal: std::cell::OnceCell<Option<Rc<crate::store::journal::Journal>>>,
    /// This core, and how many there are: every session here must be of a user
    /// this core owns (checked in debug builds wherever a session is touched).
    core_id: usize,
    cores: usize,
}

impl ChatCore {
    pub fn new(shared: &ChatShared, core_id: usize) -> ChatCore {
        ChatCore {
            core_id,
            cores: shared.cores,
            sessions: RefCell::default(),
            conn_sessions: RefCell::default(),
            limiter: RefCell::new(Limiter::new(
                shared.rate_limit_per_minute,
                LIMITER_USERS_MAX,
            )),
            admin_limiter: RefCell::new(Limiter::new(
                shared.admin_rate_limit_per_minute,
                ADMIN_LIMITER_USERS_MAX,
            )),
            upload_limiter: RefCell::new(Limiter::new(
                shared.files.rate_per_minute,
                ADMIN_LIMITER_USERS_MAX,
            )),
            scratch: RefCell::default(),
            served: RefCell::default(),
            proxies: RefCell::default(),
            leases: RefCell::default(),
            journal: std::cell::OnceCell::new(),
        }
    }

    /// This core's journal, when the store lags behind journals and the core
    /// runs io_uring (on epoll, `fdatasync` would block the core); opened on
    /// first use. Without one (reported once), this core's writes commit before
    /// they resolve.
    pub(crate) fn journal(
        &self,
        store: &Arc<dyn crate::store::Store>,
        uring: bool,
    ) -> Option<Rc<crate::store::journal::Journal>> {
        self.journal
            .get_or_init(|| {
                let backing = store.journal_backing();
                if !uring {
                    if matches!(backing, Ok(Some(_))) {
                        tracing::info!(core = self.core_id, "no journal on an epoll core (its sync would block the core): writes commit before their acks");
                    }
                    return None;
                }
                let opened = backing.and_then(|backing| {
                    backing
                        .map(|b| crate::store::journal::Journal::open(b, self.core_id, store.clone()))
                        .transpose()
                });
                opened
                    .inspect_err(|e| tracing::error!(core = self.core_id, error = %e, "cannot open this core's journal; its writes commit before their acks"))
                    .ok()
                    .flatten()
            })
            .clone()
    }

    /// Debug builds: `user`'s sessions belong on this core and nowhere else.
    pub fn assert_owner(&self, user: &str) {
        debug_assert_eq!(
            crate::runtime::mesh::owner_core(user, self.cores),
            self.core_id,
            "a session of user {user} touched on core {} that does not own it",
            self.core_id
        );
    }

    pub fn sessions_in_memory(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Parses a frame with the core's reusable buffers.
    pub fn parse(
        &self,
        text: &str,
        limits: &frames::Limits,
    ) -> Result<frames::Incoming, frames::Refused> {
        let mut s = self.scratch.borrow_mut();
        let (buf, buffers) = &mut *s;
        frames::parse(text, limits, buf, buffers)
    }

    /// Takes a token from `user`'s message bucket, or says when to retry (ms).
    pub fn rate_check(&self, user: &Arc<str>, now: Millis) -> Result<(), u64> {
        self.limiter.borrow_mut().check(user, now)
    }

    /// Takes a token from `admin`'s admin-API bucket, or says when to retry (ms).
    pub fn admin_rate_check(&self, admin: &Arc<str>, now: Millis) -> Result<(), u64> {
        self.admin_limiter.borrow_mut().check(admin, now)
    }

    /// Takes an upload token of `user`, or says how many ms until there is one.
    pub fn upload_rate_check(&self, user: &Arc<str>, now: Millis) -> Result<(), u64> {
        self.upload_limiter.borrow_mut().check(user, now)
    }

    /// Attaches a connection to a session: it gets the session's frames from now.
    pub fn attach(&self, sid: &Arc<str>, conn: ConnId) {
        let mut sessions = self.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        self.assert_owner(&s.user_id);
        if !s.attached.contains(&conn) {
            s.attached.push(conn);
        }
        let mut cs = self.conn_sessions.borrow_mut();
        let list = cs.entry(conn).or_default();
        if !list.contains(sid) {
            list.push(sid.clone());
            if list.len() > SESSIONS_PER_CONNECTION_MAX {
                let old = list.remove(0);
                if let Some(s) = sessions.get_mut(&old) {
                    s.attached.retain(|c| *c != conn);
                }
            }
        }
    }

    /// Stops sending `sid`'s live frames to `conn` (until it is attached again).
    pub fn detach(&self, sid: &Arc<str>, conn: ConnId) {
        if let Some(s) = self.sessions.borrow_mut().get_mut(sid) {
            s.attached.retain(|c| *c != conn);
        }
    }

    /// Forgets a closed connection everywhere it was attached.
    pub fn detach_conn(&self, conn: ConnId) {
        let Some(list) = self.conn_sessions.borrow_mut().remove(&conn) else {
            return;
        };
        let mut sessions = self.sessions.borrow_mut();
        for sid in list {
            if let Some(s) = sessions.get_mut(&sid) {
                s.attached.retain(|c| *c != conn);
            }
        }
    }

    /// Drops every session of `user` from memory (their data was deleted),
    /// stopping any answer still running.
    pub fn forget_user(&self, user: &str) -> usize {
        let mut sessions = self.sessions.borrow_mut();
        let before = sessions.len();
        sessions.retain(|_, s| {
            let keep = &*s.user_id != user;
            if !keep {
                for effect in s.cancel() {
                    effects::cancel_now(effect);
                }
            }
            keep
        });
        before - sessions.len()
    }

    /// Drops idle sessions (no connection, no running answer) not active for
    /// `idle_ms`; they stay in storage and come back on `resume`.
    pub fn expire(&self, now: Millis, idle_ms: i64) -> usize {
        let mut sessions = self.sessions.borrow_mut();
        let before = sessions.len();
        sessions.retain(|_, s| !(s.idle() && now - s.last_activity >= idle_ms));
        let mut leases = self.leases.borrow_mut();
        if !leases.is_empty() {
            // A lease entry lives as long as state it vouches for.
            let users: std::collections::HashSet<&Arc<str>> =
                sessions.values().map(|s| &s.user_id).collect();
            leases.retain(|u, _| users.contains(u));
        }
        before - sessions.len()
    }

    /// Adds a new session of `user`, making room among the user's idle sessions
    /// (they stay stored) when the per-user bound is reached.
    pub fn create(
        &self,
        user: &Arc<str>,
        sid: Arc<str>,
        now: Millis,
        max: usize,
    ) -> Result<usize, &'static str> {
        self.assert_owner(user);
        let mut sessions = self.sessions.borrow_mut();
        make_room(&mut sessions, user, max)?;
        sessions.insert(sid, Session::new(user.clone(), now));
        Ok(sessions.len())
    }

    /// Puts a stored session back in memory, unless a load that finished first
    /// already did. It counts against `sessions_per_user_max` as a new one does
    /// (the user's idle sessions make room, or it is refused with the same error).
    /// Returns the number of sessions in memory.
    pub fn restore(
        &self,
        sid: &Arc<str>,
        rec: &SessionRecord,
        messages: &[MessageRecord],
        shared: &ChatShared,
    ) -> Result<usize, &'static str> {
        self.assert_owner(&rec.user_id);
        let mut sessions = self.sessions.borrow_mut();
        if !sessions.contains_key(sid) {
            let user: Arc<str> = rec.user_id.as_str().into();
            make_room(&mut sessions, &user, shared.sessions_per_user_max)?;
            // A message that fails authentication is reported on resume, not used here.
            let opened = messages.iter().filter_map(|m| {
                let text = shared.keys.open(&m.place(), &m.sealed).ok()?;
                // The model is told of a file as it was when the message came.
                let text = match &m.file {
                    Some(f) => message::describe(f, &text),
                    None => text,
                };
                Some((m.role, text))
            });
            let last_seq = messages.last().map_or(0, |m| m.seq);
            let session = Session::restore(rec, last_seq, opened, shared.context);
            sessions.insert(sid.clone(), session);
        }
        Ok(sessions.len())
    }

    /// Ends every session here that saw no activity for `idle_ms`; returns each
    /// one's id and the effects to perform.
    pub fn end_idle(&self, now: Millis, idle_ms: i64) -> Vec<(Arc<str>, Vec<Effect>)> {
        let mut sessions = self.sessions.borrow_mut();
        sessions
            .iter_mut()
            .filter_map(|(sid, s)| Some((sid.clone(), s.end_idle(sid, now, idle_ms)?)))
            .collect()
    }
}

/// Makes room for one more session of `user` within `max`: when the bound is
/// reached the user's idle sessions leave memory (they stay stored); when none
/// is idle, the new one is refused.
fn make_room(
    sessions: &mut HashMap<Arc<str>, Session>,
    user: &Arc<str>,
    max: usize,
) -> Result<(), &'static str> {
    let mine = |sessions: &HashMap<Arc<str>, Session>| {
        sessions.values().filter(|s| s.user_id == *user).count()
    };
    if mine(sessions) >= max {
        sessions.retain(|_, s| s.user_id != *user || !s.evictable());
        if mine(sessions) >= max {
            return Err(TOO_MANY_SESSIONS);
        }
    }
    Ok(())
}

/// Runs a task of session `sid`. A panic in it ends that task only: it is logged
/// with the session id and counted, and everyone in the session gets an `internal`
/// error; `cleanup` then mends what the task left half done.
pub fn spawn(
    core: &Rc<Core>,
    sid: &Arc<str>,
    what: &'static str,
    task: impl std::future::Future<Output = ()> + 'static,
    cleanup: impl FnOnce(&Core) + 'static,
) {
    let (c, s) = (core.clone(), sid.clone());
    core.spawn_guarded(task, move || {
        tracing::error!(session = %s, task = what, "a session task panicked; only that task stopped");
        cleanup(&c);
        let frame = super::frames::ServerFrame::Error {
            code: Code::Internal,
            message: "internal error; please retry",
            id: None,
            session_id: Some(&s),
            retry_after_ms: None,
        };
        effects::push_session(&c, &s, frame.to_json());
    });
}

/// Runs `then` once the session is in memory and known to belong to `user`,
/// loading it from storage first if needed. Refuses with `forbidden` otherwise.
pub fn with_session(
    core: &Rc<Core>,
    conn: ConnId,
    user: &Arc<str>,
    sid: Arc<str>,
    id: Option<String>,
    then: impl FnOnce(&Rc<Core>, &Arc<str>) + 'static,
) {
    let owner = core
        .app
        .sessions
        .borrow()
        .get(&sid)
        .map(|s| s.user_id.clone());
    match owner {
        Some(o) if o == *user => {
            core.app.attach(&sid, conn);
            then(core, &sid)
        }
        Some(_) => effects::reply(core, conn, forbidden(id.as_deref(), Some(&sid))),
        None => {
            let core = core.clone();
            let user = user.clone();
            let shared = &core.shared.app;
            let load = shared.store.load_session(&sid, shared.context.messages_max);
            spawn(
                &core.clone(),
                &sid.clone(),
                "load_session",
                async move {
                    match load.await {
                        Ok(Some((rec, msgs))) if *rec.user_id == *user => {
                            if let Err(why) = rehydrate(&core, &sid, &rec, &msgs) {
                                let frame = error_frame(Code::InvalidMessage, why, id.as_deref());
                                return effects::reply(&core, conn, frame);
                            }
                            core.app.attach(&sid, conn);
                            then(&core, &sid)
                        }
                        Ok(_) => effects::reply(&core, conn, forbidden(id.as_deref(), Some(&sid))),
                        Err(e) => {
                            core.metrics().store_errors.inc();
                            tracing::error!(session = %sid, error = %e, "loading a session failed");
                            let msg = "could not load the session; retry";
                            effects::reply(&core, conn, store_read_error(&e, msg, id.as_deref()));
                        }
                    }
                },
                |_| {},
            );
        }
    }
}

/// Puts a stored session back in memory and counts it. A session that has been
/// idle past `session_end_idle_secs` (a sweep has not come around to it yet, or
/// raced this load) is ended at once. Refused at the per-user bound.
pub fn rehydrate(
    core: &Rc<Core>,
    sid: &Arc<str>,
    rec: &SessionRecord,
    messages: &[MessageRecord],
) -> Result<(), &'static str> {
    let n = core.app.restore(sid, rec, messages, &core.shared.app)?;
    core.metrics().sessions_in_memory.set(n as u64);
    end_if_idle(core, sid);
    Ok(())
}

/// Ends session `sid` if it is idle past `session_end_idle_secs`: in memory by
/// its own decision (its connections hear `session_ended`), or, when only
/// stored, by a conditional write that changes nothing if it saw activity since.
pub fn end_if_idle(core: &Rc<Core>, sid: &Arc<str>) {
    let now = now_ms();
    let idle_ms = core.shared.app.session_end_idle.as_millis() as i64;
    let decided = core
        .app
        .sessions
        .borrow_mut()
        .get_mut(sid)
        .map(|s| s.end_idle(sid, now, idle_ms));
    let effects = match decided {
        Some(Some(effects)) => effects,
        Some(None) => return,
        None => vec![Effect::EndIdle {
            idle_before: now - idle_ms,
        }],
    };
    tracing::info!(session = %sid, "ended after being idle");
    effects::perform(core, sid, "", effects);
}

/// The refusal for a session that is someone else's or does not exist: the same
/// answer for both, so ids cannot be probed.
pub fn forbidden(id: Option<&str>, session_id: Option<&str>) -> String {
    super::frames::ServerFrame::Error {
        code: Code::Forbidden,
        message: "no such session for this user",
        id,
        session_id,
        retry_after_ms: None,
    }
    .to_json()
}

/// Until the gate closes: ends sessions idle past `session_end_idle_secs` and
/// lets idle ones leave memory after `session_idle_secs`. Core 0 also finds the
/// idle sessions only stored and sends each to its owning core to be ended.
pub async fn expiry_loop(core: Rc<Core>) {
    let idle = core.shared.app.session_idle;
    let end_idle = core.shared.app.session_end_idle;
    let every = (idle.min(end_idle) / 4).clamp(Duration::from_millis(50), Duration::from_secs(60));
    let mut store_sweep: Option<monoio::task::JoinHandle<()>> = None;
    loop {
        monoio::select! {
            _ = monoio::time::sleep(every) => {}
            _ = core.gate.closed() => return,
        }
        let swept = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            core.shared.hooks.fault_point("expiry");
            let now = now_ms();
            let ended = core.app.end_idle(now, end_idle.as_millis() as i64);
            for (sid, effects) in ended {
                tracing::info!(session = %sid, "ended after being idle");
                effects::perform(&core, &sid, "", effects);
            }
            core.app.expire(now, idle.as_millis() as i64)
        }));
        // A panic costs one sweep, never the loop: the next one runs as usual.
        let Ok(n) = swept else {
            core.metrics().panics.inc();
            tracing::error!(
                core = core.id,
                "an expiry sweep panicked; the next one runs as usual"
            );
            continue;
        };
        core.metrics()
            .sessions_in_memory
            .set(core.app.sessions_in_memory() as u64);
        if n > 0 {
            tracing::debug!(core = core.id, expired = n, "idle sessions left memory");
        }
        if core.id == 0 && store_sweep.as_ref().is_none_or(|h| h.is_finished()) {
            store_sweep = Some(monoio::spawn(sweep_stored(core.clone(), end_idle)));
        }
    }
}

/// Finds stored sessions idle past `end_idle` and asks each one's owning core to
/// end it (that core alone knows whether it is active in memory).
async fn sweep_stored(core: Rc<Core>, end_idle: Duration) {
    let before = now_ms() - end_idle.as_millis() as i64;
    let idle = match core
        .shared
        .app
        .store
        .idle_sessions(before, IDLE_SWEEP_BATCH)
        .await
    {
        Ok(idle) => idle,
        Err(e) => {
            core.metrics().store_errors.inc();
            tracing::warn!(error = %e, "reading idle sessions failed; the next sweep retries");
            return;
        }
    };
    let cores = core.shared.mesh.cores();
    for (sid, user) in idle {
        let owner = crate::runtime::mesh::owner_core(&user, cores);
        if let Err(e) = core.send_app(owner, super::ChatMsg::EndIdle(sid.as_str().into())) {
            tracing::warn!(error = %e, session = %sid, "an idle session was not handed to its core; the next sweep retries");
        }
    }
}

#[cfg(test)]
mod tests;
