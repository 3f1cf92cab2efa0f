//! Chat sessions owned by a core: from a validated frame to a durable `ack` and a
//! streamed answer; resume with history; idle expiry.
//!
//! A session lives on the core of its user (every connection of that user is
//! there), so its state is plain `RefCell` data. Borrows never cross an `.await`:
//! each step borrows, changes, releases, and only then awaits storage.

pub mod frames;
pub mod limiter;
pub mod takeover;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::auth::Identity;
use crate::crypto::KeyRing;
use crate::llm::{ErrorKind, LlmEvent, LlmStream, ModelSpec, Models, Turn, TurnRole};
use crate::shard::outbox::Outgoing;
use crate::shard::registry::ConnId;
use crate::shard::Core;
use crate::store::{
    MessageRecord, Millis, Role, SessionRecord, Store, StoreError, WriteOp, WriteOutcome,
};
use frames::{error_frame, ClientFrame, Code, HistoryItem, Incoming, ServerFrame, Usage};
use limiter::Limiter;
use takeover::{AdminAction, AdminOp, AdminRef, Seat, State};

/// Sessions one connection may be attached to; the oldest is detached beyond it.
const SESSIONS_PER_CONNECTION_MAX: usize = 64;
/// Users whose rate-limit state a core keeps (see [`Limiter`]).
const LIMITER_USERS_MAX: usize = 100_000;

/// Read-only chat settings and services, shared by every core.
pub struct ChatShared {
    pub store: Arc<dyn Store>,
    pub keys: KeyRing,
    pub limits: frames::Limits,
    pub rate_limit_per_minute: u32,
    pub history_messages_max: usize,
    pub session_idle: Duration,
    pub sessions_per_user_max: usize,
    pub answer_bytes_max: usize,
    pub demo_chunk_delay: Duration,
    pub models: Arc<Models>,
    pub context_messages_max: usize,
    pub context_chars_max: usize,
    /// How long an answer outlives the user's last connection.
    pub grace: Duration,
    pub notifier: Arc<crate::notify::Notifier>,
}

/// When a client whose message met a full storage queue should send it again.
const STORE_RETRY_AFTER_MS: u64 = 1000;

/// Wall-clock milliseconds; the one place chat reads the time.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A new id: the time in milliseconds, then 64 random bits. Time first, so ids
/// created together sort together and the store's indexes grow at one end instead
/// of at random pages (random ids made index page reads the store's top cost).
fn new_id(prefix: &str) -> Arc<str> {
    let random = hex::encode(rand::random::<[u8; 8]>());
    format!("{prefix}_{:012x}{random}", now_ms()).into()
}

/// Cancels an answer; the answer task waits on it between chunks.
#[derive(Default)]
struct CancelFlag {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl CancelFlag {
    fn cancel(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
    async fn cancelled(&self) {
        poll_fn(|cx| {
            if self.set.get() {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// The current (or last) answer of a session, kept for `resume`.
struct Answer {
    message_id: Arc<str>,
    chunks: Vec<Arc<str>>,
    cancel: Rc<CancelFlag>,
    /// Set when `ai_done` has been sent.
    done: Option<(Usage, bool)>,
}

struct Session {
    user_id: Arc<str>,
    attached: Vec<ConnId>,
    next_seq: u64,
    created_at: Millis,
    last_activity: Millis,
    answer: Option<Answer>,
    /// The latest turns, sent upstream as context; bounded by count and size.
    context: VecDeque<Turn>,
    state: State,
    /// Admins in the session (takeover); their connections may be on other cores.
    admins: Vec<Seat>,
}

impl Session {
    /// The connections of admins in the session that get its live frames (those
    /// whose transcript and announcement went out).
    fn admin_conns(&self) -> impl Iterator<Item = (usize, ConnId)> + '_ {
        self.admins
            .iter()
            .filter(|seat| seat.announced)
            .flat_map(|seat| seat.conns.iter().copied())
    }

    fn remember(&mut self, role: TurnRole, text: Arc<str>, shared: &ChatShared) {
        self.context.push_back(Turn { role, text });
        let mut chars: usize = self.context.iter().map(|t| t.text.len()).sum();
        while self.context.len() > shared.context_messages_max
            || (chars > shared.context_chars_max && self.context.len() > 1)
        {
            if let Some(t) = self.context.pop_front() {
                chars -= t.text.len();
            }
        }
    }

    fn idle(&self) -> bool {
        self.attached.is_empty() && self.answer.as_ref().is_none_or(|a| a.done.is_some())
    }
}

/// The chat state one core owns.
#[derive(Default)]
pub struct ChatCore {
    sessions: RefCell<HashMap<Arc<str>, Session>>,
    conn_sessions: RefCell<HashMap<ConnId, Vec<Arc<str>>>>,
    limiter: RefCell<Option<Limiter>>,
    scratch: RefCell<(Vec<u8>, simd_json::Buffers)>,
}

impl ChatCore {
    pub fn sessions_in_memory(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Parses a frame with the core's reusable buffers.
    pub fn parse(&self, text: &str, limits: &frames::Limits) -> Result<Incoming, frames::Refused> {
        let mut s = self.scratch.borrow_mut();
        let (buf, buffers) = &mut *s;
        frames::parse(text, limits, buf, buffers)
    }

    fn rate_check(&self, shared: &ChatShared, user: &Arc<str>, now: Millis) -> Result<(), u64> {
        let mut l = self.limiter.borrow_mut();
        l.get_or_insert_with(|| Limiter::new(shared.rate_limit_per_minute, LIMITER_USERS_MAX))
            .check(user, now)
    }

    fn attach(&self, sid: &Arc<str>, conn: ConnId) {
        let mut sessions = self.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
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
                if let Some(a) = &s.answer {
                    a.cancel.cancel();
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
        before - sessions.len()
    }
}

/// The per-connection chat state, owned by the connection's handler.
/// The sessions an admin connection joined, and the core owning each.
pub type Joined = Rc<RefCell<HashMap<Arc<str>, usize>>>;

pub struct ChatConn {
    pub conn: ConnId,
    pub identity: Identity,
    core: Rc<Core>,
    /// For admins: the sessions this connection joined, and the core owning each.
    /// Created on an admin's first action, so a user's connection holds no map.
    joined: std::cell::OnceCell<Joined>,
}

impl ChatConn {
    pub fn new(core: Rc<Core>, conn: ConnId, identity: Identity) -> ChatConn {
        ChatConn {
            conn,
            identity,
            core,
            joined: std::cell::OnceCell::new(),
        }
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Handles one valid frame. Returns an immediate reply for this connection;
    /// everything else arrives through the outboxes of the session's connections.
    pub fn dispatch(&self, inc: Incoming) -> Option<String> {
        let id = inc.id;
        match inc.frame {
            ClientFrame::UserMessage {
                session_id,
                content,
                model_id,
                ..
            } => match self.core.shared.chat.models.pick(model_id.as_deref()) {
                Ok(model) => self.user_message(id, session_id, content, model),
                Err(msg) => Some(error_frame(Code::InvalidMessage, &msg, id.as_deref())),
            },
            ClientFrame::Resume {
                session_id,
                after_seq,
            } => {
                let sid: Arc<str> = session_id.into();
                with_session(
                    &self.core,
                    self.conn,
                    &self.identity.user_id,
                    sid,
                    id,
                    move |core, sid, conn, _| resume(core, sid, Target::Local(conn), after_seq),
                );
                None
            }
            ClientFrame::Cancel { session_id } => self.cancel(id, &session_id),
            ClientFrame::AdminJoin { .. }
            | ClientFrame::AdminMessage { .. }
            | ClientFrame::AdminLeave { .. }
                if !self.identity.admin =>
            {
                Some(error_frame(
                    Code::Forbidden,
                    "admin frames need the admin role",
                    id.as_deref(),
                ))
            }
            ClientFrame::AdminJoin { session_id } => self.admin(session_id, AdminAction::Join, id),
            ClientFrame::AdminMessage {
                session_id,
                content,
            } => {
                let action = AdminAction::Message {
                    content,
                    client_id: id.clone(),
                };
                self.admin(session_id, action, id)
            }
            ClientFrame::AdminLeave { session_id } => {
                self.admin(session_id, AdminAction::Leave, id)
            }
            ClientFrame::HelpRequest { session_id } => {
                let me = self.identity.clone();
                with_session(
                    &self.core,
                    self.conn,
                    &self.identity.user_id,
                    session_id.into(),
                    id,
                    move |core, sid, conn, _| takeover::help_request(core, sid, &me, conn),
                );
                None
            }
            ClientFrame::FileMessage { .. } => Some(error_frame(
                Code::InvalidMessage,
                "file and voice messages are not available yet",
                id.as_deref(),
            )),
        }
    }

    fn admin_ref(&self) -> AdminRef {
        AdminRef {
            id: self.identity.user_id.clone(),
            name: self.identity.name.clone(),
            core: self.core.id,
            conn: self.conn,
        }
    }

    fn admin(&self, session_id: String, action: AdminAction, id: Option<String>) -> Option<String> {
        let op = AdminOp {
            session_id: session_id.into(),
            admin: self.admin_ref(),
            action,
        };
        takeover::route(&self.core, self.joined.get_or_init(Rc::default), op, id);
        None
    }

    fn user_message(
        &self,
        id: Option<String>,
        session_id: Option<String>,
        content: String,
        model: Arc<ModelSpec>,
    ) -> Option<String> {
        let core = &self.core;
        let shared = &core.shared.chat;
        let user = &self.identity.user_id;
        let now = now_ms();
        if let Err(wait) = core.chat.rate_check(shared, user, now) {
            core.metrics().rate_limited.inc();
            let msg = format!("rate limit reached; retry in {} ms", wait);
            return Some(
                ServerFrame::Error {
                    code: Code::RateLimited,
                    message: &msg,
                    id: id.as_deref(),
                    session_id: session_id.as_deref(),
                    retry_after_ms: Some(wait),
                }
                .to_json(),
            );
        }
        match session_id {
            Some(sid) => {
                with_session(
                    core,
                    self.conn,
                    user,
                    sid.into(),
                    id.clone(),
                    move |core, sid, conn, user| {
                        append_user_message(
                            core,
                            sid,
                            conn,
                            user,
                            Pending { id, content, model },
                            false,
                        )
                    },
                );
                None
            }
            None => {
                let sid = match create_session(core, user, now) {
                    Ok(sid) => sid,
                    Err(msg) => return Some(error_frame(Code::InvalidMessage, msg, id.as_deref())),
                };
                core.chat.attach(&sid, self.conn);
                let frame = ServerFrame::Session {
                    session_id: &sid,
                    created: true,
                    messages: None,
                }
                .to_json();
                push_conn(core, self.conn, frame);
                append_user_message(
                    core,
                    &sid,
                    self.conn,
                    user,
                    Pending { id, content, model },
                    true,
                );
                None
            }
        }
    }

    fn cancel(&self, id: Option<String>, session_id: &str) -> Option<String> {
        let sessions = self.core.chat.sessions.borrow();
        match sessions.get(session_id) {
            Some(s) if s.user_id == self.identity.user_id => {
                // Nothing running is fine: cancel is idempotent.
                if let Some(a) = s.answer.as_ref().filter(|a| a.done.is_none()) {
                    a.cancel.cancel();
                }
                None
            }
            _ => Some(forbidden(id.as_deref(), Some(session_id))),
        }
    }
}

impl Drop for ChatConn {
    fn drop(&mut self) {
        self.core.chat.detach_conn(self.conn);
        let joined: Vec<(Arc<str>, usize)> = self
            .joined
            .get()
            .map(|j| j.borrow_mut().drain().collect())
            .unwrap_or_default();
        if !joined.is_empty() {
            takeover::admin_gone(&self.core, self.admin_ref(), joined);
        }
        // Answers left with nobody listening keep going for the grace period, so a
        // quick reconnect can resume them; after it they are dropped upstream.
        let orphaned: Vec<(Arc<str>, Arc<str>)> = self
            .core
            .chat
            .sessions
            .borrow()
            .iter()
            .filter(|(_, s)| s.attached.is_empty())
            .filter_map(|(sid, s)| {
                let a = s.answer.as_ref().filter(|a| a.done.is_none())?;
                Some((sid.clone(), a.message_id.clone()))
            })
            .collect();
        for (sid, message_id) in orphaned {
            let core = self.core.clone();
            monoio::spawn(async move {
                monoio::time::sleep(core.shared.chat.grace).await;
                let sessions = core.chat.sessions.borrow();
                let Some(s) = sessions.get(&sid).filter(|s| s.attached.is_empty()) else {
                    return;
                };
                if let Some(a) = s
                    .answer
                    .as_ref()
                    .filter(|a| a.message_id == message_id && a.done.is_none())
                {
                    tracing::debug!(session = %sid, "nobody came back within the grace period; dropping the answer");
                    a.cancel.cancel();
                }
            });
        }
    }
}

fn forbidden(id: Option<&str>, session_id: Option<&str>) -> String {
    ServerFrame::Error {
        code: Code::Forbidden,
        // The same answer whether the session is someone else's or does not exist.
        message: "no such session for this user",
        id,
        session_id,
        retry_after_ms: None,
    }
    .to_json()
}

/// The error for a message to a session an admin ended.
fn ended_error(id: Option<&str>, sid: &str) -> String {
    ServerFrame::Error {
        code: Code::InvalidMessage,
        message: "this session has ended; start a new one",
        id,
        session_id: Some(sid),
        retry_after_ms: None,
    }
    .to_json()
}

fn push_conn(core: &Core, conn: ConnId, frame: String) {
    let _ = core
        .registry
        .borrow()
        .push_conn(conn, Outgoing::Text(frame.into()));
}

/// A connection on this core or on another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Local(ConnId),
    Remote(usize, ConnId),
}

impl Target {
    fn of(admin: &AdminRef) -> Target {
        Target::Remote(admin.core, admin.conn)
    }

    /// Sends a frame; a frame for another core travels through the mesh.
    fn deliver(self, core: &Core, frame: String) {
        self.deliver_arc(core, frame.into());
    }

    fn deliver_arc(self, core: &Core, frame: Arc<str>) {
        match self {
            Target::Local(conn) => {
                let _ = core
                    .registry
                    .borrow()
                    .push_conn(conn, Outgoing::Text(frame));
            }
            Target::Remote(owner, conn) if owner == core.id => {
                let _ = core
                    .registry
                    .borrow()
                    .push_conn(conn, Outgoing::Text(frame));
            }
            Target::Remote(owner, conn) => {
                if core
                    .shared
                    .mesh
                    .send(owner, crate::mesh::CoreMsg::Deliver { conn, frame })
                    .is_err()
                {
                    core.metrics().mesh_dropped.inc();
                }
            }
        }
    }
}

/// Sends a frame to every connection attached to the session.
fn push_session(core: &Core, sid: &str, frame: String) {
    let frame: Arc<str> = frame.into();
    // Read in place, not copied per frame (this runs for every ai_chunk): pushing
    // touches the registry, the outboxes and the mesh, never the sessions.
    let sessions = core.chat.sessions.borrow();
    let Some(s) = sessions.get(sid) else { return };
    {
        let registry = core.registry.borrow();
        for &conn in &s.attached {
            // A connection that just went away is detached by its own drop.
            let _ = registry.push_conn(conn, Outgoing::Text(frame.clone()));
        }
    }
    for (owner, conn) in s.admin_conns() {
        Target::Remote(owner, conn).deliver_arc(core, frame.clone());
    }
}

fn create_session(core: &Core, user: &Arc<str>, now: Millis) -> Result<Arc<str>, &'static str> {
    let max = core.shared.chat.sessions_per_user_max;
    let mut sessions = core.chat.sessions.borrow_mut();
    let mine = sessions.values().filter(|s| s.user_id == *user).count();
    if mine >= max {
        // Make room by forgetting this user's idle sessions (they stay stored).
        sessions.retain(|_, s| s.user_id != *user || !s.idle());
        if sessions.values().filter(|s| s.user_id == *user).count() >= max {
            return Err("too many open sessions; close or finish one first");
        }
    }
    let sid = new_id("s");
    core.metrics().sessions_created.inc();
    core.metrics()
        .sessions_in_memory
        .set(sessions.len() as u64 + 1);
    sessions.insert(
        sid.clone(),
        Session {
            user_id: user.clone(),
            attached: Vec::new(),
            next_seq: 1,
            created_at: now,
            last_activity: now,
            answer: None,
            context: VecDeque::new(),
            state: State::Ai,
            admins: Vec::new(),
        },
    );
    Ok(sid)
}

/// Runs `then` once the session is in memory and known to belong to `user`,
/// loading it from storage first if needed. Refuses with `forbidden` otherwise.
fn with_session(
    core: &Rc<Core>,
    conn: ConnId,
    user: &Arc<str>,
    sid: Arc<str>,
    id: Option<String>,
    then: impl FnOnce(&Rc<Core>, &Arc<str>, ConnId, &Arc<str>) + 'static,
) {
    let owner = core
        .chat
        .sessions
        .borrow()
        .get(&sid)
        .map(|s| s.user_id.clone());
    match owner {
        Some(o) if o == *user => {
            core.chat.attach(&sid, conn);
            then(core, &sid, conn, user)
        }
        Some(_) => push_conn(core, conn, forbidden(id.as_deref(), Some(&sid))),
        None => {
            let core = core.clone();
            let user = user.clone();
            let shared = &core.shared.chat;
            let load = shared.store.load_session(&sid, shared.context_messages_max);
            monoio::spawn(async move {
                let loaded = load.await;
                match loaded {
                    Ok(Some((rec, msgs))) if *rec.user_id == *user => {
                        rehydrate(&core, &sid, rec, &msgs);
                        core.chat.attach(&sid, conn);
                        then(&core, &sid, conn, &user)
                    }
                    Ok(_) => push_conn(&core, conn, forbidden(id.as_deref(), Some(&sid))),
                    Err(e) => {
                        core.metrics().store_errors.inc();
                        tracing::error!(session = %sid, error = %e, "loading a session failed");
                        push_conn(
                            &core,
                            conn,
                            error_frame(
                                Code::Internal,
                                "could not load the session; retry",
                                id.as_deref(),
                            ),
                        );
                    }
                }
            });
        }
    }
}

/// Puts a stored session back in memory with its real last activity and its
/// latest turns as context for the model.
fn rehydrate(core: &Core, sid: &Arc<str>, rec: SessionRecord, messages: &[MessageRecord]) {
    let shared = &core.shared.chat;
    let mut sessions = core.chat.sessions.borrow_mut();
    // Another load may have finished first; keep what is there.
    if sessions.contains_key(sid) {
        return;
    }
    let mut session = Session {
        user_id: rec.user_id.into(),
        attached: Vec::new(),
        next_seq: messages.last().map_or(0, |m| m.seq) + 1,
        created_at: rec.created_at,
        last_activity: rec.last_activity,
        answer: None,
        context: VecDeque::new(),
        state: State::parse(rec.state.as_str()),
        admins: Vec::new(),
    };
    for m in messages {
        let role = match m.role {
            Role::User => TurnRole::User,
            Role::Assistant | Role::Admin => TurnRole::Assistant,
            Role::System => continue,
        };
        // A message that fails authentication is reported on resume, not used here.
        if let Ok(text) = shared.keys.open(&m.session_id, &m.message_id, &m.sealed) {
            session.remember(role, text.into(), shared);
        }
    }
    sessions.insert(sid.clone(), session);
    core.metrics().sessions_in_memory.set(sessions.len() as u64);
}

/// A user message on its way to storage and to the model.
struct Pending {
    /// The client's `id`.
    id: Option<String>,
    content: String,
    model: Arc<ModelSpec>,
}

fn append_user_message(
    core: &Rc<Core>,
    sid: &Arc<str>,
    conn: ConnId,
    user: &Arc<str>,
    msg: Pending,
    new_session: bool,
) {
    let Pending { id, content, model } = msg;
    let ended = core
        .chat
        .sessions
        .borrow()
        .get(sid)
        .is_some_and(|s| s.state == State::Ended);
    if ended {
        return push_conn(core, conn, ended_error(id.as_deref(), sid));
    }
    let shared = &core.shared.chat;
    let now = now_ms();
    let message_id = new_id("m");
    let (seq, created_at) = {
        let mut sessions = core.chat.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        s.next_seq += 1;
        s.last_activity = now;
        (s.next_seq - 1, s.created_at)
    };
    let mut ops = Vec::with_capacity(2);
    if new_session {
        ops.push(WriteOp::CreateSession(SessionRecord {
            id: sid.to_string(),
            user_id: user.to_string(),
            created_at,
            last_activity: now,
            state: crate::store::SessionState::Ai,
            message_count: 0,
            tokens_in: 0,
            tokens_out: 0,
            ended_at: None,
        }));
    }
    ops.push(WriteOp::AppendMessage {
        user_id: user.to_string(),
        message: MessageRecord {
            session_id: sid.to_string(),
            message_id: message_id.to_string(),
            seq,
            role: Role::User,
            author: user.to_string(),
            client_id: id.clone(),
            sealed: shared.keys.seal(sid, &message_id, &content),
            created_at: now,
            tokens_in: 0,
            tokens_out: 0,
            cancelled: false,
        },
    });
    core.metrics().messages_in.inc();
    let write = shared.store.write(ops);
    let core = core.clone();
    let sid = sid.clone();
    let user = user.clone();
    monoio::spawn(async move {
        match write.await {
            Ok(outcomes) => {
                let duplicate = match outcomes.last() {
                    Some(WriteOutcome::Duplicate {
                        message_id,
                        session_id,
                    }) => Some((message_id.clone(), session_id.clone())),
                    _ => None,
                };
                let (mid, ack_sid) = duplicate
                    .clone()
                    .unwrap_or_else(|| (message_id.to_string(), sid.to_string()));
                let ack = ServerFrame::Ack {
                    id: id.as_deref(),
                    session_id: &ack_sid,
                    message_id: &mid,
                    duplicate: duplicate.is_some(),
                }
                .to_json();
                if duplicate.is_some() {
                    // A resend: the original was stored (and answered) already.
                    core.metrics().duplicates.inc();
                    push_conn(&core, conn, ack);
                } else {
                    core.metrics().acks.inc();
                    push_session(&core, &sid, ack);
                    let (human, admins) = match core.chat.sessions.borrow_mut().get_mut(&sid) {
                        Some(s) => {
                            s.remember(TurnRole::User, content.as_str().into(), &core.shared.chat);
                            let admins: Vec<(usize, ConnId)> = s.admin_conns().collect();
                            (s.state == State::Human, admins)
                        }
                        None => (false, Vec::new()),
                    };
                    if !admins.is_empty() {
                        let relay: Arc<str> = ServerFrame::UserMessage {
                            session_id: &sid,
                            message_id: &mid,
                            user_id: &user,
                            content: &content,
                        }
                        .to_json()
                        .into();
                        for (owner, conn) in admins {
                            Target::Remote(owner, conn).deliver_arc(&core, relay.clone());
                        }
                    }
                    // While a human has the session, the AI stays silent.
                    if !human {
                        start_answer(&core, &sid, model);
                    }
                }
            }
            Err(e) => {
                core.metrics().store_errors.inc();
                tracing::error!(session = %sid, error = %e, "storing a user message failed");
                // A full write queue (storage slow or away) is backpressure: say so,
                // and when to try again.
                let (code, message, retry_after_ms) = match e {
                    StoreError::Overloaded(_) => (
                        Code::Overloaded,
                        "storage is busy; the message was not stored: send it again with the same id",
                        Some(STORE_RETRY_AFTER_MS),
                    ),
                    _ => (
                        Code::Internal,
                        "the message was not stored; send it again with the same id",
                        None,
                    ),
                };
                push_conn(
                    &core,
                    conn,
                    ServerFrame::Error {
                        code,
                        message,
                        id: id.as_deref(),
                        session_id: Some(&sid),
                        retry_after_ms,
                    }
                    .to_json(),
                );
            }
        }
    });
}

/// How an answer stream ended.
enum Ending {
    Finished {
        input_tokens: u64,
        output_tokens: u64,
    },
    Cancelled,
    Failed(ErrorKind),
}

/// Streams the model's answer to every attached connection, buffering it for
/// `resume`, then stores it and sends `ai_done`.
fn start_answer(core: &Rc<Core>, sid: &Arc<str>, model: Arc<ModelSpec>) {
    let message_id = new_id("m");
    let cancel = Rc::new(CancelFlag::default());
    let turns: Vec<Turn> = {
        let mut sessions = core.chat.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        // A new message supersedes the answer still running for the previous one.
        if let Some(old) = s.answer.as_ref().filter(|a| a.done.is_none()) {
            old.cancel.cancel();
        }
        s.answer = Some(Answer {
            message_id: message_id.clone(),
            chunks: Vec::new(),
            cancel: cancel.clone(),
            done: None,
        });
        s.context.iter().cloned().collect()
    };
    let core = core.clone();
    let sid = sid.clone();
    monoio::spawn(async move {
        let shared = &core.shared.chat;
        let m = core.metrics();
        m.llm_requests.inc();
        let started = std::time::Instant::now();
        let mut stream = LlmStream::start(
            &shared.models,
            &core.shared.pool,
            model,
            turns,
            shared.demo_chunk_delay,
        );
        let mut text = String::new();
        let mut seq = 0u64;
        let ending = loop {
            let event = monoio::select! {
                _ = cancel.cancelled() => break Ending::Cancelled,
                e = stream.next() => e,
            };
            match event {
                Some(LlmEvent::Chunk(chunk)) => {
                    if seq == 0 {
                        m.llm_first_token_ms
                            .observe(started.elapsed().as_millis() as u64);
                    }
                    if text.len() + chunk.len() > shared.answer_bytes_max {
                        break Ending::Finished {
                            input_tokens: 0,
                            output_tokens: seq,
                        };
                    }
                    seq += 1;
                    text.push_str(&chunk);
                    let chunk: Arc<str> = chunk.into();
                    let frame = ServerFrame::AiChunk {
                        session_id: &sid,
                        message_id: &message_id,
                        seq,
                        content: &chunk,
                    }
                    .to_json();
                    if let Some(mut a) = current_answer(&core, &sid, &message_id) {
                        a.chunks.push(chunk);
                    }
                    m.answer_chunks.inc();
                    push_session(&core, &sid, frame);
                }
                Some(LlmEvent::Done {
                    input_tokens,
                    output_tokens,
                    retries,
                    malformed,
                }) => {
                    m.llm_retries.add(u64::from(retries));
                    m.llm_malformed_events.add(u64::from(malformed));
                    break Ending::Finished {
                        input_tokens,
                        output_tokens,
                    };
                }
                Some(LlmEvent::Failed {
                    kind,
                    detail,
                    retries,
                }) => {
                    m.llm_retries.add(u64::from(retries));
                    tracing::warn!(session = %sid, kind = kind.label(), %detail, "answer failed");
                    break Ending::Failed(kind);
                }
                None => break Ending::Failed(ErrorKind::StreamEnded),
            }
        };
        // Cancelled or failed: the upstream request goes now, not when the task ends.
        stream.abort();
        drop(stream);
        m.llm_total_ms.observe(started.elapsed().as_millis() as u64);
        let (usage, cancelled, failed) = match ending {
            Ending::Finished {
                input_tokens,
                output_tokens,
            } => {
                m.answers_done.inc();
                (
                    Usage {
                        input_tokens,
                        output_tokens,
                    },
                    false,
                    None,
                )
            }
            Ending::Cancelled => {
                m.answers_cancelled.inc();
                (
                    Usage {
                        input_tokens: 0,
                        output_tokens: seq,
                    },
                    true,
                    None,
                )
            }
            Ending::Failed(kind) => {
                m.llm_error(kind);
                (
                    Usage {
                        input_tokens: 0,
                        output_tokens: seq,
                    },
                    true,
                    Some(kind),
                )
            }
        };
        m.llm_tokens_in.add(usage.input_tokens);
        m.llm_tokens_out.add(usage.output_tokens);
        let unavailable = || {
            ServerFrame::Error {
                code: Code::LlmUnavailable,
                message: "the assistant is unavailable right now; please try again",
                id: None,
                session_id: Some(&sid),
                retry_after_ms: None,
            }
            .to_json()
        };
        if failed.is_some() && seq == 0 {
            // Nothing was said: no answer to store or close, just the error.
            if let Some(s) = core.chat.sessions.borrow_mut().get_mut(&sid) {
                s.answer = None;
            }
            return push_session(&core, &sid, unavailable());
        }
        let stored = store_answer(&core, &sid, &message_id, &text, usage, cancelled).await;
        if let Some(mut a) = current_answer(&core, &sid, &message_id) {
            a.done = Some((usage, cancelled));
        }
        if let Some(s) = core.chat.sessions.borrow_mut().get_mut(&sid) {
            s.remember(TurnRole::Assistant, text.into(), shared);
        }
        let done = ServerFrame::AiDone {
            session_id: &sid,
            message_id: &message_id,
            usage,
            cancelled,
        }
        .to_json();
        push_session(&core, &sid, done);
        if failed.is_some() {
            push_session(&core, &sid, unavailable());
        }
        if let Err(e) = stored {
            m.store_errors.inc();
            tracing::error!(session = %sid, error = %e, "storing an answer failed");
            let frame = ServerFrame::Error {
                code: Code::Internal,
                message: "the answer could not be saved",
                id: None,
                session_id: Some(&sid),
                retry_after_ms: None,
            };
            push_session(&core, &sid, frame.to_json());
        }
    });
}

/// The session's answer if it is still `message_id`, borrowed for a moment.
fn current_answer<'a>(
    core: &'a Core,
    sid: &str,
    message_id: &str,
) -> Option<std::cell::RefMut<'a, Answer>> {
    let sessions = core.chat.sessions.borrow_mut();
    std::cell::RefMut::filter_map(sessions, |s| {
        s.get_mut(sid)
            .and_then(|s| s.answer.as_mut())
            .filter(|a| &*a.message_id == message_id)
    })
    .ok()
}

async fn store_answer(
    core: &Rc<Core>,
    sid: &Arc<str>,
    message_id: &str,
    text: &str,
    usage: Usage,
    cancelled: bool,
) -> Result<(), crate::store::StoreError> {
    let shared = &core.shared.chat;
    let now = now_ms();
    let (seq, user) = {
        let mut sessions = core.chat.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return Ok(());
        };
        s.next_seq += 1;
        s.last_activity = now;
        (s.next_seq - 1, s.user_id.clone())
    };
    let op = WriteOp::AppendMessage {
        user_id: user.to_string(),
        message: MessageRecord {
            session_id: sid.to_string(),
            message_id: message_id.to_owned(),
            seq,
            role: Role::Assistant,
            author: String::new(),
            client_id: None,
            sealed: shared.keys.seal(sid, message_id, text),
            created_at: now,
            tokens_in: usage.input_tokens,
            tokens_out: usage.output_tokens,
            cancelled,
        },
    };
    shared.store.write(vec![op]).await.map(|_| ())
}

/// Answers `resume`: the stored history (decrypted), then the missed chunks of the
/// current answer and, live, the rest.
fn resume(core: &Rc<Core>, sid: &Arc<str>, to: Target, after_seq: Option<u64>) {
    monoio::spawn(resume_now(core.clone(), sid.clone(), to, after_seq));
}

/// [`resume`], awaited: returns once every frame is queued for `to`.
async fn resume_now(core: Rc<Core>, sid: Arc<str>, to: Target, after_seq: Option<u64>) {
    let shared = &core.shared.chat;
    let load = shared.store.load_session(&sid, shared.history_messages_max);
    let (_, messages) = match load.await {
        Ok(Some(l)) => l,
        Ok(None) => (SessionRecord::empty(), Vec::new()),
        Err(e) => {
            core.metrics().store_errors.inc();
            tracing::error!(session = %sid, error = %e, "loading history failed");
            return to.deliver(
                &core,
                error_frame(Code::Internal, "could not load the history; retry", None),
            );
        }
    };
    let keys = &core.shared.chat.keys;
    let mut withheld = 0;
    let history: Vec<HistoryItem> = messages
        .iter()
        .filter_map(|m| match keys.open(&m.session_id, &m.message_id, &m.sealed) {
            Ok(content) => Some(HistoryItem {
                message_id: m.message_id.clone(),
                role: m.role.as_str(),
                content,
                created_at: m.created_at,
                cancelled: m.cancelled,
            }),
            Err(e) => {
                withheld += 1;
                tracing::error!(session = %sid, message = %m.message_id, error = %e, "stored message failed its integrity check");
                None
            }
        })
        .collect();
    // From here on everything is synchronous: no chunk can slip in between.
    to.deliver(
        &core,
        ServerFrame::Session {
            session_id: &sid,
            created: false,
            messages: Some(&history),
        }
        .to_json(),
    );
    if withheld > 0 {
        core.metrics().integrity_failures.add(withheld);
        let msg =
            format!("{withheld} stored message(s) failed their integrity check and were withheld");
        to.deliver(&core, error_frame(Code::Internal, &msg, None));
    }
    let replay = {
        let sessions = core.chat.sessions.borrow();
        sessions
            .get(&sid)
            .and_then(|s| s.answer.as_ref())
            .and_then(|a| {
                let stored = history.iter().any(|h| *h.message_id == *a.message_id);
                (!stored).then(|| (a.message_id.clone(), a.chunks.clone(), a.done))
            })
    };
    if let Some((message_id, chunks, done)) = replay {
        let from = after_seq.unwrap_or(0);
        for (i, c) in chunks.iter().enumerate().skip(from as usize) {
            let seq = i as u64 + 1;
            to.deliver(
                &core,
                ServerFrame::AiChunk {
                    session_id: &sid,
                    message_id: &message_id,
                    seq,
                    content: c,
                }
                .to_json(),
            );
        }
        if let Some((usage, cancelled)) = done {
            to.deliver(
                &core,
                ServerFrame::AiDone {
                    session_id: &sid,
                    message_id: &message_id,
                    usage,
                    cancelled,
                }
                .to_json(),
            );
        }
    }
}

impl SessionRecord {
    fn empty() -> SessionRecord {
        SessionRecord {
            id: String::new(),
            user_id: String::new(),
            created_at: 0,
            last_activity: 0,
            state: crate::store::SessionState::Ai,
            message_count: 0,
            tokens_in: 0,
            tokens_out: 0,
            ended_at: None,
        }
    }
}

/// Queues the notifications of a help request in the outbox; the notifier's
/// worker delivers them, so chat never waits on a webhook or a mail server.
fn notify_help(core: &Rc<Core>, sid: &Arc<str>, user: &Identity, at: Millis) {
    let notifier = &core.shared.chat.notifier;
    let event = crate::notify::HelpEvent {
        session_id: sid.to_string(),
        user_id: user.user_id.to_string(),
        user_name: user.name.to_string(),
        at,
    };
    let ops = notifier.enqueue_ops(&event);
    tracing::info!(session = %sid, user = %user.user_id, channels = ops.len(), "help requested");
    if ops.is_empty() {
        return;
    }
    let write = core.shared.chat.store.write(ops);
    let core = core.clone();
    monoio::spawn(async move {
        match write.await {
            Ok(_) => core.shared.chat.notifier.wake(),
            Err(e) => {
                core.metrics().store_errors.inc();
                tracing::error!(error = %e, "queueing help-request notifications failed");
            }
        }
    });
}

/// Expires idle sessions of this core until the gate closes.
pub async fn expiry_loop(core: Rc<Core>) {
    let idle = core.shared.chat.session_idle;
    let every = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(60));
    loop {
        monoio::select! {
            _ = monoio::time::sleep(every) => {}
            _ = core.gate.closed() => return,
        }
        let n = core.chat.expire(now_ms(), idle.as_millis() as i64);
        core.metrics()
            .sessions_in_memory
            .set(core.chat.sessions_in_memory() as u64);
        if n > 0 {
            tracing::debug!(core = core.id, expired = n, "idle sessions left memory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, last: Millis, attached: Vec<ConnId>) -> Session {
        Session {
            user_id: user.into(),
            attached,
            next_seq: 1,
            created_at: 0,
            last_activity: last,
            answer: None,
            context: VecDeque::new(),
            state: State::Ai,
            admins: Vec::new(),
        }
    }

    #[test]
    fn expiry_keeps_attached_and_recent_sessions() {
        let chat = ChatCore::default();
        {
            let mut s = chat.sessions.borrow_mut();
            s.insert("old".into(), session("u", 0, vec![]));
            s.insert("recent".into(), session("u", 9_000, vec![]));
            s.insert("attached".into(), session("u", 0, vec![7]));
        }
        assert_eq!(chat.expire(10_000, 5_000), 1);
        let s = chat.sessions.borrow();
        assert!(!s.contains_key("old") && s.contains_key("recent") && s.contains_key("attached"));
    }

    #[test]
    fn detach_forgets_a_connection_everywhere() {
        let chat = ChatCore::default();
        chat.sessions
            .borrow_mut()
            .insert("a".into(), session("u", 0, vec![]));
        chat.sessions
            .borrow_mut()
            .insert("b".into(), session("u", 0, vec![]));
        chat.attach(&"a".into(), 1);
        chat.attach(&"b".into(), 1);
        chat.attach(&"b".into(), 2);
        chat.detach_conn(1);
        let s = chat.sessions.borrow();
        assert!(s["a"].attached.is_empty());
        assert_eq!(s["b"].attached, [2]);
        assert!(chat.conn_sessions.borrow().get(&1).is_none());
    }
}
