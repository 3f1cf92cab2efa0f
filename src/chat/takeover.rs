//! Human takeover: session states `ai` -> `waiting` (help requested) -> `human`
//! (an admin joined) -> `ai` (the last admin left), and the admin actions that
//! drive them.
//!
//! An admin's connection lives on the admin's core; the session lives on its
//! user's core. Admin actions therefore travel as [`AdminOp`] mesh messages to the
//! owning core, and the frames of the session travel back to the admin's
//! connection as `Deliver` messages. No state is shared between cores.

use std::rc::Rc;
use std::sync::Arc;

use super::frames::{error_frame, Code, ServerFrame};
use super::{now_ms, push_conn, push_session, resume_now, Target};
use crate::llm::TurnRole;
use crate::mesh::{owner_core, CoreMsg};
use crate::shard::registry::ConnId;
use crate::shard::Core;
use crate::store::{AuditAction, MessageRecord, Role, SessionState, WriteOp};

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ai,
    Waiting,
    Human,
    /// Ended by an admin: readable, but takes no new messages.
    Ended,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ai => "ai",
            State::Waiting => "waiting",
            State::Human => "human",
            State::Ended => "ended",
        }
    }
    pub fn parse(s: &str) -> State {
        match s {
            "waiting" => State::Waiting,
            "human" => State::Human,
            "ended" => State::Ended,
            _ => State::Ai,
        }
    }
}

/// The state as storage records it.
impl From<State> for SessionState {
    fn from(s: State) -> SessionState {
        match s {
            State::Ai => SessionState::Ai,
            State::Waiting => SessionState::Waiting,
            State::Human => SessionState::Human,
            State::Ended => SessionState::Ended,
        }
    }
}

/// An admin connection, wherever it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRef {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub core: usize,
    pub conn: ConnId,
}

#[derive(Debug, Clone)]
pub enum AdminAction {
    Join,
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

/// Sends `op` to the core that owns its session, finding that core from storage
/// the first time (the session id alone does not say whose it is).
pub fn route(core: &Rc<Core>, joined: &super::Joined, op: AdminOp, id: Option<String>) {
    let known = joined.borrow().get(&op.session_id).copied();
    if let Some(owner) = known {
        if matches!(op.action, AdminAction::Leave) {
            joined.borrow_mut().remove(&op.session_id);
        }
        return send_op(core, owner, op, id);
    }
    if !matches!(op.action, AdminAction::Join) {
        let frame = error_frame(Code::Forbidden, "join the session first", id.as_deref());
        return push_conn(core, op.admin.conn, frame);
    }
    let load = core.shared.chat.store.load_session(&op.session_id, 1);
    let core = core.clone();
    let joined = joined.clone();
    monoio::spawn(async move {
        match load.await {
            Ok(Some((rec, _))) => {
                let owner = owner_core(&rec.user_id, core.shared.mesh.cores());
                joined.borrow_mut().insert(op.session_id.clone(), owner);
                send_op(&core, owner, op, id);
            }
            Ok(None) => push_conn(
                &core,
                op.admin.conn,
                error_frame(Code::NotFound, "no such session", id.as_deref()),
            ),
            Err(e) => {
                tracing::error!(error = %e, "looking up a session for an admin failed");
                push_conn(
                    &core,
                    op.admin.conn,
                    error_frame(
                        Code::Internal,
                        "could not look up the session; retry",
                        id.as_deref(),
                    ),
                );
            }
        }
    });
}

fn send_op(core: &Rc<Core>, owner: usize, op: AdminOp, id: Option<String>) {
    if owner == core.id {
        return on_admin_op(core, op);
    }
    let conn = op.admin.conn;
    if let Err((e, _)) = core.shared.mesh.send(owner, CoreMsg::Admin(Box::new(op))) {
        core.metrics().mesh_dropped.inc();
        tracing::warn!(error = %e, "admin action not delivered");
        push_conn(
            core,
            conn,
            error_frame(Code::Overloaded, "server busy; retry", id.as_deref()),
        );
    }
}

/// The owning core's side of an admin action.
pub fn on_admin_op(core: &Rc<Core>, op: AdminOp) {
    let in_memory = core.chat.sessions.borrow().contains_key(&op.session_id);
    if in_memory {
        return apply(core, op);
    }
    let shared = &core.shared.chat;
    let load = shared
        .store
        .load_session(&op.session_id, shared.context_messages_max);
    let core = core.clone();
    monoio::spawn(async move {
        match load.await {
            Ok(Some((rec, msgs))) => {
                super::rehydrate(&core, &op.session_id, rec, &msgs);
                apply(&core, op);
            }
            Ok(None) | Err(_) if matches!(op.action, AdminAction::Gone | AdminAction::Leave) => {}
            Ok(None) => Target::of(&op.admin)
                .deliver(&core, error_frame(Code::NotFound, "no such session", None)),
            Err(e) => {
                tracing::error!(error = %e, "loading a session for an admin failed");
                Target::of(&op.admin).deliver(
                    &core,
                    error_frame(Code::Internal, "could not load the session; retry", None),
                );
            }
        }
    });
}

fn apply(core: &Rc<Core>, op: AdminOp) {
    let AdminOp {
        session_id: sid,
        admin,
        action,
    } = op;
    match action {
        AdminAction::Join => join(core, &sid, &admin),
        AdminAction::Message { content, client_id } => {
            message(core, &sid, &admin, content, client_id)
        }
        AdminAction::Leave => leave(core, &sid, &admin, true),
        AdminAction::Gone => leave(core, &sid, &admin, false),
    }
}

/// Persists a state change with who made it.
fn record_state(core: &Rc<Core>, sid: &Arc<str>, state: State, actor: &str, action: AuditAction) {
    let op = WriteOp::SetState {
        session_id: sid.to_string(),
        state: state.into(),
        actor: actor.to_owned(),
        action,
        at: now_ms(),
    };
    let write = core.shared.chat.store.write(vec![op]);
    let core = core.clone();
    let sid = sid.clone();
    monoio::spawn(async move {
        if let Err(e) = write.await {
            core.metrics().store_errors.inc();
            tracing::error!(session = %sid, error = %e, "recording a session state failed");
        }
    });
}

fn join(core: &Rc<Core>, sid: &Arc<str>, admin: &AdminRef) {
    let newly_human = {
        let mut sessions = core.chat.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        if s.state == State::Ended {
            drop(sessions);
            let frame = error_frame(Code::InvalidMessage, "this session has ended", None);
            return Target::of(admin).deliver(core, frame);
        }
        match s.admins.iter_mut().find(|seat| seat.admin_id == admin.id) {
            Some(seat) if seat.conns.contains(&(admin.core, admin.conn)) => {}
            Some(seat) => seat.conns.push((admin.core, admin.conn)),
            None => s.admins.push(Seat {
                admin_id: admin.id.clone(),
                name: admin.name.clone(),
                conns: vec![(admin.core, admin.conn)],
                announced: false,
            }),
        }
        // The AI stops at once: a running answer is cancelled (it ends with ai_done).
        if let Some(a) = s.answer.as_ref().filter(|a| a.done.is_none()) {
            a.cancel.cancel();
        }
        let was = s.state;
        s.state = State::Human;
        was != State::Human
    };
    core.metrics().takeovers.inc();
    record_state(core, sid, State::Human, &admin.id, AuditAction::AdminJoin);
    if newly_human {
        tracing::info!(session = %sid, admin = %admin.id, "human takeover");
    }
    // The admin gets the transcript first, then who else is there, then everyone
    // hears who joined. Each admin learns of each other admin exactly once: from
    // this list if that admin was announced before, from its announcement if after.
    let (core, sid, admin) = (core.clone(), sid.clone(), admin.clone());
    monoio::spawn(async move {
        resume_now(core.clone(), sid.clone(), Target::of(&admin), None).await;
        let present: Vec<Arc<str>> = {
            let mut sessions = core.chat.sessions.borrow_mut();
            let Some(s) = sessions.get_mut(&sid) else {
                return;
            };
            let mut present = Vec::new();
            for seat in s.admins.iter_mut() {
                if seat.admin_id == admin.id {
                    seat.announced = true;
                } else if seat.announced {
                    present.push(seat.name.clone());
                }
            }
            present
        };
        for name in present {
            Target::of(&admin).deliver(
                &core,
                ServerFrame::AdminJoined {
                    session_id: &sid,
                    admin_name: &name,
                }
                .to_json(),
            );
        }
        push_session(
            &core,
            &sid,
            ServerFrame::AdminJoined {
                session_id: &sid,
                admin_name: &admin.name,
            }
            .to_json(),
        );
    });
}

fn message(
    core: &Rc<Core>,
    sid: &Arc<str>,
    admin: &AdminRef,
    content: String,
    client_id: Option<String>,
) {
    let shared = &core.shared.chat;
    let now = now_ms();
    let message_id = super::new_id("m");
    let (seq, user) = {
        let mut sessions = core.chat.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        if !s.admins.iter().any(|seat| seat.admin_id == admin.id) {
            drop(sessions);
            let frame = error_frame(
                Code::Forbidden,
                "join the session first",
                client_id.as_deref(),
            );
            return Target::of(admin).deliver(core, frame);
        }
        s.next_seq += 1;
        s.last_activity = now;
        s.remember(TurnRole::Assistant, content.as_str().into(), shared);
        (s.next_seq - 1, s.user_id.clone())
    };
    let op = WriteOp::AppendMessage {
        user_id: user.to_string(),
        message: MessageRecord {
            session_id: sid.to_string(),
            message_id: message_id.to_string(),
            seq,
            role: Role::Admin,
            author: admin.id.to_string(),
            client_id: None,
            sealed: shared.keys.seal(sid, &message_id, &content),
            created_at: now,
            tokens_in: 0,
            tokens_out: 0,
            cancelled: false,
        },
    };
    let write = shared.store.write(vec![op]);
    let core = core.clone();
    let sid = sid.clone();
    let admin = admin.clone();
    monoio::spawn(async move {
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
                let frame = error_frame(
                    Code::Internal,
                    "the message was not stored; send it again",
                    client_id.as_deref(),
                );
                Target::of(&admin).deliver(&core, frame);
            }
        }
    });
}

/// `whole`: the admin leaves (all its connections); otherwise one connection went.
fn leave(core: &Rc<Core>, sid: &Arc<str>, admin: &AdminRef, whole: bool) {
    let (left, back_to_ai) = {
        let mut sessions = core.chat.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        let Some(i) = s.admins.iter().position(|seat| seat.admin_id == admin.id) else {
            return;
        };
        let seat = &mut s.admins[i];
        seat.conns.retain(|c| *c != (admin.core, admin.conn));
        let left = whole || seat.conns.is_empty();
        if left {
            s.admins.remove(i);
        }
        let back = left && s.admins.is_empty() && s.state == State::Human;
        if back {
            s.state = State::Ai;
        }
        (left, back)
    };
    if left {
        // The leaving admin hears it too, though no longer seated.
        let frame = ServerFrame::AdminLeft {
            session_id: sid,
            admin_name: &admin.name,
        }
        .to_json();
        if whole {
            Target::of(admin).deliver(core, frame.clone());
        }
        push_session(core, sid, frame);
    }
    if back_to_ai {
        record_state(core, sid, State::Ai, &admin.id, AuditAction::AdminLeave);
        tracing::info!(session = %sid, "handed back to the AI");
    }
}

/// A user asks for a human: the session waits (unless a human is already there),
/// every connected admin is told, and the notifications go out.
pub fn help_request(core: &Rc<Core>, sid: &Arc<str>, user: &crate::auth::Identity, conn: ConnId) {
    let changed = {
        let mut sessions = core.chat.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        if s.state == State::Ended {
            drop(sessions);
            return push_conn(core, conn, super::ended_error(None, sid));
        }
        let changed = s.state == State::Ai;
        if changed {
            s.state = State::Waiting;
        }
        changed
    };
    if changed {
        record_state(
            core,
            sid,
            State::Waiting,
            &user.user_id,
            AuditAction::HelpRequest,
        );
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
    super::notify_help(core, sid, user, at);
}

/// Tells the owning cores that an admin connection closed.
pub fn admin_gone(
    core: &Rc<Core>,
    admin: AdminRef,
    joined: impl IntoIterator<Item = (Arc<str>, usize)>,
) {
    for (sid, owner) in joined {
        let op = AdminOp {
            session_id: sid,
            admin: admin.clone(),
            action: AdminAction::Gone,
        };
        send_op(core, owner, op, None);
    }
}

/// An admin ended the session (admin API): it takes no new messages; a running
/// answer stops; everyone in it is told, and the admins leave it.
pub fn end(core: &Rc<Core>, sid: &Arc<str>) {
    {
        let mut sessions = core.chat.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        s.state = State::Ended;
        if let Some(a) = s.answer.as_ref().filter(|a| a.done.is_none()) {
            a.cancel.cancel();
        }
    }
    push_session(
        core,
        sid,
        ServerFrame::SessionEnded { session_id: sid }.to_json(),
    );
    if let Some(s) = core.chat.sessions.borrow_mut().get_mut(sid) {
        s.admins.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::State;

    #[test]
    fn states_round_trip_through_storage_names() {
        for s in [State::Ai, State::Waiting, State::Human, State::Ended] {
            assert_eq!(State::parse(s.as_str()), s);
        }
    }
}
