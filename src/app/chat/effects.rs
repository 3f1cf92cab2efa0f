//! Performs what sessions decide: frames to connections here or on other cores,
//! state changes to storage, answers to stop.

use std::rc::Rc;
use std::sync::Arc;

use super::session::{Effect, Target};
use super::takeover::State;
use crate::app::Core;
use crate::clock::now_ms;
use crate::runtime::ConnId;
use crate::store::{AuditAction, WriteOp};

/// Performs `effects` of session `sid` in order; `actor` made the change.
pub fn perform(core: &Rc<Core>, sid: &Arc<str>, actor: &str, effects: Vec<Effect>) {
    for effect in effects {
        match effect {
            Effect::Cancel(flag) => flag.cancel(),
            Effect::Record { state, action } => record_state(core, sid, state, actor, action),
            Effect::EndIdle { idle_before } => {
                let op = WriteOp::EndIdle {
                    session_id: sid.to_string(),
                    idle_before,
                    at: now_ms(),
                };
                write_state(core, sid, op);
            }
            Effect::SetContent { message_id, sealed } => {
                let op = WriteOp::SetContent {
                    session_id: sid.to_string(),
                    message_id: message_id.to_string(),
                    sealed,
                };
                write_state(core, sid, op);
            }
            Effect::Send(targets, frame) => {
                let frame: Arc<str> = frame.into();
                for to in targets {
                    deliver(core, to, frame.clone());
                }
            }
        }
    }
}

/// Performs a cancel decided where no core is at hand (inside a borrow of the
/// sessions); any other effect would be a logic error there and is ignored.
pub fn cancel_now(effect: Effect) {
    if let Effect::Cancel(flag) = effect {
        flag.cancel();
    }
}

/// Sends a frame to one connection of this core.
pub fn reply(core: &Core, conn: ConnId, frame: String) {
    core.push_conn(conn, frame.into());
}

/// Sends a frame to a connection here or, through the mesh, on another core.
pub fn deliver(core: &Core, to: Target, frame: Arc<str>) {
    match to {
        Target::Local(conn) => core.push_conn(conn, frame),
        Target::Remote(owner, conn) => core.deliver(owner, conn, frame),
    }
}

/// Sends a frame to every connection attached to the session. This runs for every
/// `ai_chunk`: the session is read in place, never copied per frame, and pushing
/// touches the registry, the outboxes and the mesh, never the sessions.
pub fn push_session(core: &Core, sid: &str, frame: String) {
    let frame: Arc<str> = frame.into();
    let sessions = core.app.sessions.borrow();
    let Some(s) = sessions.get(sid) else { return };
    for &conn in &s.attached {
        core.push_conn(conn, frame.clone());
    }
    for (owner, conn) in s.admin_conns() {
        core.deliver(owner, conn, frame.clone());
    }
}

/// Persists a state change with who made it; a failure is counted and logged
/// (the change already holds in memory).
fn record_state(core: &Rc<Core>, sid: &Arc<str>, state: State, actor: &str, action: AuditAction) {
    let at = now_ms();
    // A state change is activity, in memory as in storage (which moves the
    // session's last activity with it): idle-ending judges both alike.
    if let Ok(mut sessions) = core.app.sessions.try_borrow_mut() {
        if let Some(s) = sessions.get_mut(sid) {
            s.last_activity = s.last_activity.max(at);
        }
    }
    let op = WriteOp::SetState {
        session_id: sid.to_string(),
        state,
        actor: actor.to_owned(),
        action,
        at,
    };
    write_state(core, sid, op);
}

/// Writes a state change (or a transcript) in the background; a failure is
/// counted and logged.
fn write_state(core: &Rc<Core>, sid: &Arc<str>, op: WriteOp) {
    let user = core
        .app
        .sessions
        .borrow()
        .get(sid)
        .map(|s| s.user_id.clone());
    let write = match user {
        Some(user) => super::lease::write(core, &user, vec![op]),
        None => core.shared.app.store.write(vec![op]),
    };
    let core = core.clone();
    let sid = sid.clone();
    super::spawn(
        &core.clone(),
        &sid.clone(),
        "record_state",
        async move {
            if let Err(e) = write.await {
                core.metrics().store_errors.inc();
                tracing::error!(session = %sid, error = %e, "recording a session change failed");
            }
        },
        |_| {},
    );
}
