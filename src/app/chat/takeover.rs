//! Human takeover: session states `ai` -> `waiting` (help requested) -> `human`
//! (an admin joined) -> `ai` (the last admin left), and the admin actions that
//! drive them.
//!
//! An admin's connection lives on the admin's core; the session lives on its
//! user's core. Admin actions therefore travel as [`AdminOp`] mesh messages to the
//! owning core, and the frames of the session travel back to the admin's
//! connection as `Deliver` messages. No state is shared between cores.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use super::effects::{deliver, perform, push_session, reply};
use super::rehydrate;
use super::resume::resume_now;
use super::session::{refusal_frame, NewMessage, Target};
use crate::app::frames::{error_frame, Code, ServerFrame, Usage};
use crate::app::{remote, ChatMsg, Core};
use crate::auth::Identity;
use crate::clock::{new_id, now_ms};
use crate::llm::TurnRole;
use crate::runtime::ConnId;
use crate::store::{Role, WriteOp};

/// Where a session stands: `ai` -> `waiting` -> `human` -> `ai`, or `ended`. The
/// store's type, so the state in memory and the state stored are one.
pub use crate::store::SessionState as State;

/// An admin connection, wherever it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRef {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub core: usize,
    pub conn: ConnId,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum AdminAction {
    Join,
    /// Follow the session live without taking it over.
    Watch,
    Message {
        content: String,
        client_id: Option<String>,
    },
    Leave,
    /// The admin's connection closed.
    Gone,
}

/// An admin's action, sent to the core that owns the session.
#[derive(Debug)]
pub struct AdminOp {
    pub session_id: Arc<str>,
    pub admin: AdminRef,
    pub action: AdminAction,
}

/// An admin in a session, with the connections that joined it.
#[derive(Debug, Clone)]
pub struct Seat {
    pub admin_id: Arc<str>,
    pub name: Arc<str>,
    pub conns: Vec<(usize, ConnId)>,
    /// Its transcript and `admin_joined` went out. Until then the seat gets none of
    /// the session's live frames (nothing may precede its transcript), and admins
    /// joining later are told about it only once it is announced.
    pub announced: bool,
}

/// An admin connection following a session without holding it (`admin_watch`): it
/// gets the session's frames but takes no part: nobody is told, it cannot write,
/// and it neither makes the session a human's nor keeps it one. Kept per
/// connection, so one tab watching never touches another tab's seat.
#[derive(Debug, Clone)]
pub struct Watcher {
    pub conn: (usize, ConnId),
    /// Its transcript went out: it gets live frames from now on.
    pub announced: bool,
}

/// Where a joined session is held: a core of this node, or (in a cluster) the
/// node that owns the session's user, which serves the admin there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Core(usize),
    Node { node: Arc<str>, user: Arc<str> },
}

/// Sessions one admin connection may have joined or follow at once: the seats it
/// holds keep sessions in memory.
pub const SESSIONS_PER_ADMIN_CONN_MAX: usize = 256;

/// An admin connection's sessions and where each is held. Created on an admin's
/// first action, so a user's connection holds no map.
pub type Joined = Rc<JoinedMap>;

#[derive(Debug, Default)]
pub struct JoinedMap {
    pub held: RefCell<HashMap<Arc<str>, Holder>>,
    /// Joins and watches still looking their session up: they count against the
    /// bound before they are in `held`, so a burst of them cannot pass it.
    looking_up: Cell<usize>,
}

/// One lookup in flight, counted while it lives.
struct LookingUp(Joined);

impl LookingUp {
    fn start(joined: &Joined) -> LookingUp {
        joined.looking_up.set(joined.looking_up.get() + 1);
        LookingUp(joined.clone())
    }
}

impl Drop for LookingUp {
    fn drop(&mut self) {
        self.0.looking_up.set(self.0.looking_up.get() - 1);
    }
}

/// Sends `op` to where its session is held, finding that from storage the first
/// time (the session id alone does not say whose it is). `here_only`: the admin
/// is served here for another node, which already chose this one.
pub fn route(core: &Rc<Core>, joined: &Joined, op: AdminOp, id: Option<String>, here_only: bool) {
    let known = joined.held.borrow().get(&op.session_id).cloned();
    // A holder node that left took the seat with it: the session is found again.
    let known = known.filter(|h| remote::reachable(core, h));
    if let Some(holder) = known {
        if matches!(op.action, AdminAction::Leave) {
            joined.held.borrow_mut().remove(&op.session_id);
        }
        return send_to(core, holder, op, id);
    }
    joined.held.borrow_mut().remove(&op.session_id);
    if !matches!(op.action, AdminAction::Join | AdminAction::Watch) {
        let frame = error_frame(Code::Forbidden, "join the session first", id.as_deref());
        return reply(core, op.admin.conn, frame);
    }
    if joined.held.borrow().len() + joined.looking_up.get() >= SESSIONS_PER_ADMIN_CONN_MAX {
        let msg = format!(
            "a connection may be in at most {SESSIONS_PER_ADMIN_CONN_MAX} sessions; leave one first"
        );
        let frame = error_frame(Code::InvalidMessage, &msg, id.as_deref());
        return reply(core, op.admin.conn, frame);
    }
    let load = core.shared.app.store.load_session(&op.session_id, 1);
    let (core, joined, looking_up) = (core.clone(), joined.clone(), LookingUp::start(joined));
    super::spawn(
        &core.clone(),
        &op.session_id.clone(),
        "admin_route",
        async move {
            let conn = op.admin.conn;
            let loaded = load.await;
            drop(looking_up);
            match loaded {
                Ok(Some((rec, _))) => {
                    let holder = remote::holder_of(&core, &rec.user_id, here_only);
                    joined
                        .held
                        .borrow_mut()
                        .insert(op.session_id.clone(), holder.clone());
                    send_to(&core, holder, op, id);
                }
                Ok(None) => reply(
                    &core,
                    conn,
                    error_frame(Code::NotFound, "no such session", id.as_deref()),
                ),
                Err(e) => {
                    tracing::error!(error = %e, "looking up a session for an admin failed");
                    let msg = "could not look up the session; retry";
                    reply(&core, conn, error_frame(Code::Internal, msg, id.as_deref()));
                }
            }
        },
        |_| {},
    );
}

fn send_to(core: &Rc<Core>, holder: Holder, op: AdminOp, id: Option<String>) {
    match holder {
        Holder::Core(owner) => send_op(core, owner, op, id),
        Holder::Node { node, user } => remote::admin_op(core, &node, &user, op, id),
    }
}

fn send_op(core: &Rc<Core>, owner: usize, op: AdminOp, id: Option<String>) {
    let conn = op.admin.conn;
    if let Err(e) = core.send_app(owner, ChatMsg::Admin(Box::new(op))) {
        tracing::warn!(error = %e, "admin action not delivered");
        reply(
            core,
            conn,
            error_frame(Code::Overloaded, "server busy; retry", id.as_deref()),
        );
    }
}

/// The owning core's side of an admin action.
pub fn on_admin_op(core: &Rc<Core>, op: AdminOp) {
    let in_memory = core.app.sessions.borrow().contains_key(&op.session_id);
    if in_memory {
        return apply(core, op);
    }
    let shared = &core.shared.app;
    let load = shared
        .store
        .load_session(&op.session_id, shared.context.messages_max);
    let core = core.clone();
    super::spawn(
        &core.clone(),
        &op.session_id.clone(),
        "admin_load",
        async move {
            let to = Target::of(&op.admin);
            match load.await {
                Ok(Some((rec, msgs))) => match rehydrate(&core, &op.session_id, &rec, &msgs) {
                    Ok(()) => apply(&core, op),
                    Err(_) if matches!(op.action, AdminAction::Gone | AdminAction::Leave) => {}
                    Err(why) => {
                        let frame = error_frame(Code::InvalidMessage, why, None);
                        deliver(&core, to, frame.into());
                    }
                },
                Ok(None) | Err(_)
                    if matches!(op.action, AdminAction::Gone | AdminAction::Leave) => {}
                Ok(None) => deliver(
                    &core,
                    to,
                    error_frame(Code::NotFound, "no such session", None).into(),
                ),
                Err(e) => {
                    tracing::error!(error = %e, "loading a session for an admin failed");
                    let frame =
                        error_frame(Code::Internal, "could not load the session; retry", None);
                    deliver(&core, to, frame.into());
                }
            }
        },
        |_| {},
    );
}

fn apply(core: &Rc<Core>, op: AdminOp) {
    if let Some(s) = core.app.sessions.borrow().get(&op.session_id) {
        core.app.assert_owner(&s.user_id);
    }
    let AdminOp {
        session_id: sid,
        admin,
        action,
    } = op;
    match action {
        AdminAction::Join => join(core, &sid, &admin),
        AdminAction::Watch => watch(core, &sid, &admin),
        AdminAction::Message { content, client_id } => {
            message(core, &sid, &admin, content, client_id)
        }
        AdminAction::Leave => leave(core, &sid, &admin, true),
        AdminAction::Gone => leave(core, &sid, &admin, false),
    }
}

fn join(core: &Rc<Core>, sid: &Arc<str>, admin: &AdminRef) {
    let decided = match core.app.sessions.borrow_mut().get_mut(sid) {
        Some(s) => s.join(admin),
        None => return,
    };
    let newly_human = match decided {
        Ok((newly_human, effects)) => {
            perform(core, sid, &admin.id, effects);
            newly_human
        }
        Err(why) => {
            return deliver(
                core,
                Target::of(admin),
                refusal_frame(why, sid, None).into(),
            )
        }
    };
    core.metrics().takeovers.inc();
    if newly_human {
        tracing::info!(session = %sid, admin = %admin.id, "human takeover");
    }
    // The admin gets the transcript first, then who else is there, then everyone
    // hears who joined. Each admin learns of each other admin exactly once: from
    // this list if that admin was announced before, from its announcement if after.
    let (core, sid, admin) = (core.clone(), sid.clone(), admin.clone());
    super::spawn(
        &core.clone(),
        &sid.clone(),
        "takeover",
        async move {
            resume_now(core.clone(), sid.clone(), Target::of(&admin), None, None).await;
            core.shared.hooks.fault_point("takeover");
            let Some(present) = core
                .app
                .sessions
                .borrow_mut()
                .get_mut(&sid)
                .map(|s| s.announce(&admin.id))
            else {
                return;
            };
            let joined = |admin_name: &str, you| {
                let frame = ServerFrame::AdminJoined {
                    session_id: &sid,
                    admin_name,
                    you,
                };
                Arc::<str>::from(frame.to_json())
            };
            for name in present {
                deliver(&core, Target::of(&admin), joined(&name, false));
            }
            // The joining connection hears its own join as its own; everyone else
            // (its other tabs included) as anyone's.
            let me = Target::of(&admin);
            let others = core.app.sessions.borrow().get(&sid).map(|s| s.everyone());
            let (mine, theirs) = (joined(&admin.name, true), joined(&admin.name, false));
            deliver(&core, me, mine);
            for to in others.into_iter().flatten().filter(|to| *to != me) {
                deliver(&core, to, theirs.clone());
            }
        },
        |_| {},
    );
}

/// An admin follows the session: its transcript and the running answer so far,
/// then every live frame, in that order and nothing twice (as for a join).
fn watch(core: &Rc<Core>, sid: &Arc<str>, admin: &AdminRef) {
    match core.app.sessions.borrow_mut().get_mut(sid) {
        Some(s) => s.watch(admin),
        None => return,
    }
    let (core, sid, admin) = (core.clone(), sid.clone(), admin.clone());
    super::spawn(
        &core.clone(),
        &sid.clone(),
        "admin_watch",
        async move {
            resume_now(core.clone(), sid.clone(), Target::of(&admin), None, None).await;
            if let Some(s) = core.app.sessions.borrow_mut().get_mut(&sid) {
                s.announce_watcher((admin.core, admin.conn));
            }
        },
        |_| {},
    );
}

fn message(
    core: &Rc<Core>,
    sid: &Arc<str>,
    admin: &AdminRef,
    content: String,
    client_id: Option<String>,
) {
    let shared = &core.shared.app;
    let message_id = new_id("m");
    let (op, user) = {
        let mut sessions = core.app.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        if let Err(why) = s.seated(&admin.id) {
            drop(sessions);
            let frame = refusal_frame(why, sid, client_id.as_deref());
            return deliver(core, Target::of(admin), frame.into());
        }
        s.remember(TurnRole::Assistant, content.as_str().into(), shared.context);
        let new = NewMessage {
            message_id: &message_id,
            role: Role::Admin,
            author: &admin.id,
            client_id: None,
            text: &content,
            usage: Usage::default(),
            cancelled: false,
            file: None,
            extra: None,
        };
        let op = WriteOp::AppendMessage {
            user_id: s.user_id.to_string(),
            message: s.record(sid, new, &shared.keys, now_ms()),
        };
        (op, s.user_id.clone())
    };
    let write = super::lease::write(core, &user, vec![op]);
    let (core, sid, admin) = (core.clone(), sid.clone(), admin.clone());
    super::spawn(
        &core.clone(),
        &sid.clone(),
        "admin_message",
        async move {
            match write.await {
                Ok(_) => {
                    let frame = ServerFrame::AdminMessage {
                        session_id: &sid,
                        admin_name: &admin.name,
                        message_id: &message_id,
                        content: &content,
                        id: client_id.as_deref(),
                    };
                    push_session(&core, &sid, frame.to_json());
                }
                Err(e) => {
                    core.metrics().store_errors.inc();
                    tracing::error!(session = %sid, error = %e, "storing an admin message failed");
                    let msg = "the message was not stored; send it again";
                    let frame = error_frame(Code::Internal, msg, client_id.as_deref());
                    deliver(&core, Target::of(&admin), frame.into());
                }
            }
        },
        |_| {},
    );
}

/// `whole`: the admin leaves (all its connections); otherwise one connection went.
fn leave(core: &Rc<Core>, sid: &Arc<str>, admin: &AdminRef, whole: bool) {
    let Some(effects) = core.app.sessions.borrow_mut().get_mut(sid).map(|s| {
        let cooldown = core.shared.app.help_cooldown.as_millis() as i64;
        s.leave(sid, admin, whole, now_ms() + cooldown)
    }) else {
        return;
    };
    let back_to_ai = effects
        .iter()
        .any(|e| matches!(e, super::session::Effect::Record { .. }));
    perform(core, sid, &admin.id, effects);
    if back_to_ai {
        tracing::info!(session = %sid, "handed back to the AI");
    }
}

/// A user asks for a human: the session waits, every connected admin is told, and
/// the notifications go out. On a session already waiting or with a human it
/// changes nothing and notifies no one (no frame, no webhook, no e-mail).
pub fn help_request(core: &Rc<Core>, sid: &Arc<str>, user: &Identity, conn: ConnId) {
    let decided = match core.app.sessions.borrow_mut().get_mut(sid) {
        Some(s) => s.help(now_ms()),
        None => return,
    };
    match decided {
        Ok(Some(effects)) => perform(core, sid, &user.user_id, effects),
        Ok(None) => return,
        Err(why) => return reply(core, conn, refusal_frame(why, sid, None)),
    }
    core.metrics().help_requests.inc();
    let at = now_ms();
    let frame = ServerFrame::HelpRequested {
        session_id: sid,
        user_id: &user.user_id,
        user_name: &user.name,
        at,
    }
    .to_json();
    push_session(core, sid, frame.clone());
    for e in core.shared.mesh.admin_feed(&frame) {
        core.metrics().mesh_dropped.inc();
        tracing::warn!(error = %e, "help request not delivered to one core's admins");
    }
    if let Some(bus) = &core.shared.app.bus {
        if let Err(e) = crate::app::cluster::admin_feed(bus, &frame) {
            tracing::warn!(error = %e, "help request not sent to the other nodes' admins");
        }
    }
    notify_help(core, sid, user, at);
}

/// Queues the notifications of a help request in the outbox; the notifier's
/// worker delivers them, so chat never waits on a webhook or a mail server.
fn notify_help(core: &Rc<Core>, sid: &Arc<str>, user: &Identity, at: crate::clock::Millis) {
    let notifier = &core.shared.app.notifier;
    let event = crate::notify::HelpEvent {
        session_id: sid.to_string(),
        user_id: user.user_id.to_string(),
        user_name: user.name.to_string(),
        at,
        trace: crate::trace::current(),
    };
    let ops = notifier.enqueue_ops(&event);
    tracing::info!(session = %sid, user = %user.user_id, channels = ops.len(), "help requested");
    if ops.is_empty() {
        return;
    }
    let write = core.shared.app.store.write(ops);
    let core = core.clone();
    super::spawn(
        &core.clone(),
        &sid.clone(),
        "notify_help",
        async move {
            match write.await {
                Ok(_) => core.shared.app.notifier.wake(),
                Err(e) => {
                    core.metrics().store_errors.inc();
                    tracing::error!(error = %e, "queueing help-request notifications failed");
                }
            }
        },
        |_| {},
    );
}

/// Tells the owning cores that an admin connection closed.
pub fn admin_gone(
    core: &Rc<Core>,
    admin: AdminRef,
    joined: impl IntoIterator<Item = (Arc<str>, Holder)>,
) {
    for (sid, holder) in joined {
        let op = AdminOp {
            session_id: sid,
            admin: admin.clone(),
            action: AdminAction::Gone,
        };
        send_to(core, holder, op, None);
    }
}

/// An admin ended the session (admin API): it takes no new messages; a running
/// answer stops; everyone in it is told, and the admins leave it.
pub fn end(core: &Rc<Core>, sid: &Arc<str>) {
    let Some(effects) = core
        .app
        .sessions
        .borrow_mut()
        .get_mut(sid)
        .map(|s| s.end(sid))
    else {
        return;
    };
    perform(core, sid, "", effects);
}
