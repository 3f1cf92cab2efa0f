//! A user message: rate limit, session (new, in memory, or loaded), a durable
//! `ack` once stored, then the answer, unless a human has the session.

use std::rc::Rc;
use std::sync::Arc;

use super::effects::{deliver, push_session, reply};
use super::extra::Extra;
use super::session::{refusal_frame, NewMessage, Refusal, Target};
use super::takeover::State;
use super::{answer, forbidden, with_session};
use crate::app::frames::{error_frame, Code, ServerFrame, Usage};
use crate::app::Core;
use crate::clock::{new_id, now_ms};
use crate::llm::audio::is_audio;
use crate::llm::{ModelSpec, TurnRole};
use crate::runtime::ConnId;
use crate::store::{FileRecord, FileRef, Role, SessionRecord, StoreError, WriteOp, WriteOutcome};

/// When a client whose message met a full storage queue should send it again.
const STORE_RETRY_AFTER_MS: u64 = 1000;

/// A user message on its way to storage and to the model.
pub struct Pending {
    /// The client's `id`.
    pub id: Option<String>,
    /// What the user wrote (a file message's caption, maybe empty).
    pub content: String,
    pub model: Arc<ModelSpec>,
    /// When the frame arrived: `chatbox_ack_seconds` measures from here.
    pub received: std::time::Instant,
    /// The user's uploaded file a `file_message` attaches.
    pub file: Option<FileRef>,
    /// What else the user sent with it (`file_url`, `metadata`).
    pub extra: Option<Extra>,
    /// A `voice_message`'s audio: transcribed once the message is stored.
    pub voice: Option<FileRecord>,
}

/// What a `file_message` or `voice_message` names.
pub struct Attach {
    pub file_id: String,
    /// A `voice_message`: the file must be audio, and is transcribed.
    pub voice: bool,
}

/// What the model is told of a message with a file: a short description (the
/// model sees no bytes), then the caption.
pub fn describe(file: &FileRef, caption: &str) -> String {
    let name = file.name.as_deref().unwrap_or("unnamed");
    let kib = file.size.div_ceil(1024);
    let mut text = format!(
        "[The user attached a file: \"{name}\", {}, {kib} KiB. Its content is not shown to you.]",
        file.mime
    );
    if !caption.trim().is_empty() {
        text.push('\n');
        text.push_str(caption);
    }
    text
}

/// Takes a token from `user`'s message bucket; without one, the error frame the
/// message gets (retry after the wait it names).
fn rate_limited(core: &Core, user: &Arc<str>, msg: &Pending, sid: Option<&str>) -> Option<String> {
    let wait = core.app.rate_check(user, now_ms()).err()?;
    let id = msg.id.as_deref();
    core.metrics().rate_limited.inc();
    let message = format!("rate limit reached; retry in {wait} ms");
    let frame = ServerFrame::Error {
        code: Code::RateLimited,
        message: &message,
        id,
        session_id: sid,
        retry_after_ms: Some(wait),
    };
    Some(frame.to_json())
}

/// Handles a `file_message` or `voice_message`: the rate limit first, then the
/// file, which must be one this user uploaded (anyone else's is `not_found`, as
/// a missing one is) and, for a voice message, audio; then the message goes on
/// as a user message carrying it.
pub fn file_message(
    core: &Rc<Core>,
    conn: ConnId,
    user: &Arc<str>,
    session_id: Option<String>,
    attach: Attach,
    mut msg: Pending,
) -> Option<String> {
    if let Some(refused) = rate_limited(core, user, &msg, session_id.as_deref()) {
        return Some(refused);
    }
    let read = core.shared.app.store.file(&attach.file_id);
    let (c, user) = (core.clone(), user.clone());
    let task = async move {
        let reply_now = match read.await {
            Ok(Some(rec)) if *rec.owner == *user && attach.voice && !is_audio(&rec.mime) => {
                let why = format!(
                    "a voice_message needs an audio file; this file is {}: send it as a file_message",
                    rec.mime
                );
                Some(error_frame(Code::InvalidMessage, &why, msg.id.as_deref()))
            }
            Ok(Some(rec)) if *rec.owner == *user => {
                msg.file = Some(rec.to_ref());
                msg.voice = attach.voice.then_some(rec);
                accepted(&c, conn, &user, session_id, msg)
            }
            Ok(_) => Some(error_frame(
                Code::NotFound,
                "no such file",
                msg.id.as_deref(),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "reading a file record failed");
                let frame = ServerFrame::Error {
                    code: Code::Unavailable,
                    message: "storage is busy; send the message again with the same id",
                    id: msg.id.as_deref(),
                    session_id: session_id.as_deref(),
                    retry_after_ms: Some(STORE_RETRY_AFTER_MS),
                };
                Some(frame.to_json())
            }
        };
        if let Some(frame) = reply_now {
            reply(&c, conn, frame);
        }
    };
    core.spawn_guarded(task, || {
        tracing::error!(
            task = "file_message",
            "a file message task panicked; only it stopped"
        );
    });
    None
}

/// Handles a `user_message` of `user` from `conn`. Returns an immediate reply for
/// the connection; everything else arrives through the session's outboxes.
pub fn user_message(
    core: &Rc<Core>,
    conn: ConnId,
    user: &Arc<str>,
    session_id: Option<String>,
    msg: Pending,
) -> Option<String> {
    if let Some(refused) = rate_limited(core, user, &msg, session_id.as_deref()) {
        return Some(refused);
    }
    accepted(core, conn, user, session_id, msg)
}

/// A message that passed the rate limit: into its session (a new one when none
/// is named).
fn accepted(
    core: &Rc<Core>,
    conn: ConnId,
    user: &Arc<str>,
    session_id: Option<String>,
    msg: Pending,
) -> Option<String> {
    let now = now_ms();
    if let Some(sid) = session_id {
        let user2 = user.clone();
        let id = msg.id.clone();
        with_session(core, conn, user, sid.into(), id, move |core, sid| {
            append(core, sid, conn, &user2, msg, false)
        });
        return None;
    }
    let sid = new_id("s");
    let max = core.shared.app.sessions_per_user_max;
    match core.app.create(user, sid.clone(), now, max) {
        Ok(in_memory) => {
            core.metrics().sessions_created.inc();
            core.metrics().sessions_in_memory.set(in_memory as u64);
        }
        Err(why) => return Some(error_frame(Code::InvalidMessage, why, msg.id.as_deref())),
    }
    core.app.attach(&sid, conn);
    let frame = ServerFrame::Session {
        session_id: &sid,
        created: true,
        messages: None,
        agents: &[],
    };
    reply(core, conn, frame.to_json());
    append(core, &sid, conn, user, msg, true);
    None
}

/// Seals the message into the session and submits it (with the session itself
/// when it is new); the ack and the answer follow the commit.
fn append(
    core: &Rc<Core>,
    sid: &Arc<str>,
    conn: ConnId,
    user: &Arc<str>,
    msg: Pending,
    new_session: bool,
) {
    let shared = &core.shared.app;
    let now = now_ms();
    let message_id = new_id("m");
    let (record, created_at) = {
        let mut sessions = core.app.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        if s.state == State::Ended {
            drop(sessions);
            return reply(
                core,
                conn,
                refusal_frame(Refusal::Ended, sid, msg.id.as_deref()),
            );
        }
        let new = NewMessage {
            message_id: &message_id,
            role: Role::User,
            author: user,
            client_id: msg.id.clone(),
            text: &msg.content,
            usage: Usage::default(),
            cancelled: false,
            file: msg.file.clone(),
            extra: msg.extra.as_ref(),
        };
        (s.record(sid, new, &shared.keys, now), s.created_at)
    };
    let seq = record.seq;
    let session = new_session.then(|| fresh_session(sid, user, created_at, now));
    // A new session and its first message commit together, or neither does.
    let ops = session
        .map(WriteOp::CreateSession)
        .into_iter()
        .chain([WriteOp::AppendMessage {
            user_id: user.to_string(),
            message: record,
        }])
        .collect();
    core.metrics().messages_in.inc();
    let write = super::lease::write(core, user, ops);
    let written = Written {
        sid: sid.clone(),
        conn,
        user: user.clone(),
        message_id,
        seq,
        new_session,
    };
    let task = after_write(core.clone(), written, msg, write);
    super::spawn(core, sid, "store_reply", task, |_| {});
}

/// The record of a session created by its first message.
fn fresh_session(sid: &str, user: &str, created_at: i64, now: i64) -> SessionRecord {
    SessionRecord {
        id: sid.to_owned(),
        user_id: user.to_owned(),
        created_at,
        last_activity: now,
        state: State::Ai,
        message_count: 0,
        tokens_in: 0,
        tokens_out: 0,
        ended_at: None,
    }
}

/// What a submitted user message was written as.
struct Written {
    sid: Arc<str>,
    conn: ConnId,
    user: Arc<str>,
    message_id: Arc<str>,
    /// Its place in the session (a transcript is sealed at it again).
    seq: u64,
    /// The message opened `sid`: a resend found elsewhere leaves it empty.
    new_session: bool,
}

/// Once the write is settled: the ack (or the original ack of a resend) and the
/// answer, or the one error the client gets.
async fn after_write(core: Rc<Core>, w: Written, msg: Pending, write: super::lease::Write) {
    let written = write.await;
    core.shared.hooks.fault_point("store_reply");
    match written {
        Ok(outcomes) => match outcomes.last() {
            Some(WriteOutcome::Duplicate {
                message_id,
                session_id,
            }) => {
                if w.new_session && **session_id != *w.sid {
                    drop_empty(&core, &w.sid, &w.user).await;
                }
                acked_again(&core, w.conn, msg.id.as_deref(), session_id, message_id)
            }
            _ => stored(&core, &w, msg),
        },
        Err(e) => not_stored(&core, &w.sid, w.conn, msg.id.as_deref(), e),
    }
}

/// A resend opened `sid` for nothing (the message is stored in another session):
/// the empty session goes, from memory and from the store, before the resend's
/// ack tells the client where its message is.
async fn drop_empty(core: &Rc<Core>, sid: &Arc<str>, user: &Arc<str>) {
    core.app.sessions.borrow_mut().remove(sid);
    let drop = WriteOp::DropEmptySession {
        session_id: sid.to_string(),
    };
    if let Err(e) = super::lease::write(core, user, vec![drop]).await {
        tracing::warn!(session = %sid, error = %e, "an empty session opened by a resend stays stored");
    }
}

/// A resend: the original was stored (and answered) already; only the sender
/// hears the original ack again.
fn acked_again(core: &Core, conn: ConnId, id: Option<&str>, sid: &str, message_id: &str) {
    core.metrics().duplicates.inc();
    let ack = ServerFrame::Ack {
        id,
        session_id: sid,
        message_id,
        duplicate: true,
    };
    reply(core, conn, ack.to_json());
}

/// The message is durable: everyone in the session gets the ack, admins see
/// what the user wrote, and the AI answers unless a human has the session.
fn stored(core: &Rc<Core>, w: &Written, msg: Pending) {
    let (sid, user, message_id) = (&w.sid, &*w.user, &*w.message_id);
    core.metrics().acks.inc();
    core.metrics().ack_latency.observe(msg.received.elapsed());
    let ack = ServerFrame::Ack {
        id: msg.id.as_deref(),
        session_id: sid,
        message_id,
        duplicate: false,
    };
    push_session(core, sid, ack.to_json());
    // The model is told a voice message's transcript once there is one.
    let told = match (&msg.voice, &msg.file) {
        (Some(_), _) => None,
        (None, Some(f)) => Some(describe(f, &msg.content)),
        (None, None) => Some(msg.content.clone()),
    };
    let (human, admins) = match core.app.sessions.borrow_mut().get_mut(sid) {
        Some(s) => {
            if let Some(told) = told {
                s.remember(TurnRole::User, told.into(), core.shared.app.context);
            }
            let admins: Vec<(usize, ConnId)> = s.admin_conns().collect();
            (s.state == State::Human, admins)
        }
        None => (false, Vec::new()),
    };
    if !admins.is_empty() {
        let relay: Arc<str> = ServerFrame::UserMessage {
            session_id: sid,
            message_id,
            user_id: user,
            content: &msg.content,
            file: msg.file.as_ref(),
            extra: msg.extra.as_ref(),
        }
        .to_json()
        .into();
        for (owner, conn) in admins {
            deliver(core, Target::Remote(owner, conn), relay.clone());
        }
    }
    if let Some(audio) = msg.voice {
        let voice = super::voice::Voice {
            sid: sid.clone(),
            user: w.user.clone(),
            message_id: w.message_id.clone(),
            seq: w.seq,
            audio,
            model: msg.model,
        };
        return super::voice::transcribe(core, voice);
    }
    // While a human has the session, the AI stays silent.
    if !human {
        answer::start(core, sid, msg.model);
    }
}

/// The write failed: one error to the sender. A full write queue (storage slow or
/// away) is backpressure: say so, and when to try again.
fn not_stored(core: &Core, sid: &str, conn: ConnId, id: Option<&str>, e: StoreError) {
    core.metrics().store_errors.inc();
    tracing::error!(session = %sid, error = %e, "storing a user message failed");
    let (code, message, retry_after_ms) = match e {
        StoreError::LeaseHeld { .. } | StoreError::Fenced { .. } => (
            Code::Unavailable,
            "this conversation is moving to another node; the message was not stored: send it again with the same id",
            e.retry_after_ms(),
        ),
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
    let frame = ServerFrame::Error {
        code,
        message,
        id,
        session_id: Some(sid),
        retry_after_ms,
    };
    reply(core, conn, frame.to_json());
}

/// A user's `cancel`; only the session's own user may cancel.
pub fn cancel(core: &Rc<Core>, user: &str, sid: &str, id: Option<&str>) -> Option<String> {
    let sessions = core.app.sessions.borrow();
    match sessions.get(sid) {
        Some(s) if *s.user_id == *user => {
            s.cancel().into_iter().for_each(super::effects::cancel_now);
            None
        }
        _ => Some(forbidden(id, Some(sid))),
    }
}
