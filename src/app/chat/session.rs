//! One session's state and the decisions it makes. Plain data and functions that
//! return what must happen ([`Effect`]s, or the records to store); no I/O, no
//! core, no clock of their own, so every transition is unit-tested on its own.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use crate::app::frames::{Code, ServerFrame, Usage};
use crate::clock::Millis;
use crate::crypto::KeyRing;
use crate::llm::{Turn, TurnRole};
use crate::runtime::ConnId;
use crate::store::{AuditAction, MessageRecord, Role, SessionRecord};

use super::takeover::{AdminRef, Seat, State, Watcher};

/// How much of a conversation is sent upstream as context.
#[derive(Debug, Clone, Copy)]
pub struct ContextLimits {
    pub messages_max: usize,
    pub chars_max: usize,
}

/// A connection on this core or on another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Local(ConnId),
    Remote(usize, ConnId),
}

impl Target {
    pub fn of(admin: &AdminRef) -> Target {
        Target::Remote(admin.core, admin.conn)
    }
}

/// What a decision asks its executor to do, in order.
pub enum Effect {
    /// Stop the running answer now; it still ends with `ai_done` {cancelled}.
    Cancel(Rc<CancelFlag>),
    /// Persist the session's new state and who changed it (the audit trail).
    Record { state: State, action: AuditAction },
    /// A frame for these connections.
    Send(Vec<Target>, String),
    /// Persist that the session ended for idleness, only if the stored session
    /// saw no activity since `idle_before` and has not ended (audit `ended_idle`).
    EndIdle { idle_before: Millis },
    /// Persist a message's new content (a voice message's transcript), sealed
    /// at the message's place.
    SetContent {
        message_id: Arc<str>,
        sealed: crate::crypto::Sealed,
    },
}

/// Seals a user's message text at its place in session `sid`: what a voice
/// message's transcript is stored as, where its empty content was.
pub fn seal_user_text(
    keys: &KeyRing,
    sid: &str,
    message_id: &str,
    user: &str,
    seq: u64,
    text: &str,
) -> crate::crypto::Sealed {
    let place = crate::crypto::Place {
        session_id: sid,
        message_id,
        role: Role::User.as_str(),
        author: user,
        seq,
    };
    keys.seal(&place, text)
}

/// A voice message whose transcript is awaited: where it is stored.
pub struct VoicePlace<'a> {
    pub sid: &'a str,
    pub message_id: &'a Arc<str>,
    pub seq: u64,
}

/// Cancels an answer; the answer task waits on it between chunks.
#[derive(Default)]
pub struct CancelFlag {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl CancelFlag {
    pub fn cancel(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub async fn cancelled(&self) {
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
pub struct Answer {
    pub message_id: Arc<str>,
    pub chunks: Vec<Arc<str>>,
    pub cancel: Rc<CancelFlag>,
    /// Set when `ai_done` has been sent.
    pub done: Option<(Usage, bool)>,
}

/// A message about to be stored: everything but its place in the session.
pub struct NewMessage<'a> {
    pub message_id: &'a str,
    pub role: Role,
    pub author: &'a str,
    pub client_id: Option<String>,
    pub text: &'a str,
    pub usage: Usage,
    pub cancelled: bool,
    /// The uploaded file a `file_message` carries.
    pub file: Option<crate::store::FileRef>,
    /// What else the user sent with it, sealed beside the content.
    pub extra: Option<&'a super::extra::Extra>,
}

/// Why a session refuses what was asked of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Ended by an admin: readable, but takes nothing new.
    Ended,
    /// The admin has not joined the session.
    NotJoined,
    /// A help request too soon after an admin handed the session back.
    Cooldown { retry_after_ms: u64 },
}

pub struct Session {
    pub user_id: Arc<str>,
    /// This core's connections of the user that created, wrote to or resumed it.
    pub attached: Vec<ConnId>,
    next_seq: u64,
    pub created_at: Millis,
    pub last_activity: Millis,
    pub answer: Option<Answer>,
    /// The latest turns, sent upstream as context; bounded by count and size.
    context: VecDeque<Turn>,
    pub state: State,
    /// Admins in the session (takeover); their connections may be on other cores.
    pub admins: Vec<Seat>,
    /// Admin connections following the session without holding it (`admin_watch`).
    pub watchers: Vec<Watcher>,
    /// Until when a help request is refused: set when the last admin hands the
    /// session back, so a user cannot page the admins again at once.
    pub help_open_at: Millis,
}

impl Session {
    pub fn new(user_id: Arc<str>, now: Millis) -> Session {
        Session {
            user_id,
            attached: Vec::new(),
            next_seq: 1,
            created_at: now,
            last_activity: now,
            answer: None,
            context: VecDeque::new(),
            state: State::Ai,
            admins: Vec::new(),
            watchers: Vec::new(),
            help_open_at: 0,
        }
    }

    /// A stored session back in memory, with its real last activity and its
    /// latest turns (`messages`, oldest first, already opened) as context.
    pub fn restore(
        rec: &SessionRecord,
        last_seq: u64,
        messages: impl IntoIterator<Item = (Role, String)>,
        limits: ContextLimits,
    ) -> Session {
        let mut s = Session::new(rec.user_id.as_str().into(), rec.created_at);
        s.last_activity = rec.last_activity;
        s.next_seq = last_seq + 1;
        s.state = rec.state;
        for (role, text) in messages {
            let role = match role {
                Role::User => TurnRole::User,
                Role::Assistant | Role::Admin => TurnRole::Assistant,
                Role::System => continue,
            };
            s.remember(role, text.into(), limits);
        }
        s
    }

    /// Adds a turn to the context, dropping the oldest beyond its bounds.
    pub fn remember(&mut self, role: TurnRole, text: Arc<str>, limits: ContextLimits) {
        self.context.push_back(Turn { role, text });
        let mut chars: usize = self.context.iter().map(|t| t.text.len()).sum();
        while self.context.len() > limits.messages_max
            || (chars > limits.chars_max && self.context.len() > 1)
        {
            if let Some(t) = self.context.pop_front() {
                chars -= t.text.len();
            }
        }
    }

    /// No connection here, no admin in it or following it, and no answer
    /// running: it may leave memory (seats and watchers live only there).
    pub fn idle(&self) -> bool {
        self.evictable() && self.watchers.is_empty()
    }

    /// [`Session::idle`] but for watchers: it may leave memory to make room for
    /// its user's next session. Watching never takes a user's place.
    pub fn evictable(&self) -> bool {
        self.attached.is_empty() && self.admins.is_empty() && self.running().is_none()
    }

    /// The names of the admins who have taken the session over and been
    /// announced (watchers are nobody's business).
    pub fn agents(&self) -> Vec<Arc<str>> {
        self.admins
            .iter()
            .filter(|seat| seat.announced)
            .map(|seat| seat.name.clone())
            .collect()
    }

    /// The connections of admins in the session that get its live frames (those
    /// whose transcript and announcement went out), watchers included.
    pub fn admin_conns(&self) -> impl Iterator<Item = (usize, ConnId)> + '_ {
        let seated = self.admins.iter().filter(|seat| seat.announced);
        let watching = self.watchers.iter().filter(|w| w.announced);
        seated
            .flat_map(|seat| seat.conns.iter().copied())
            .chain(watching.map(|w| w.conn))
    }

    /// Everyone who gets the session's frames now.
    pub fn everyone(&self) -> Vec<Target> {
        let local = self.attached.iter().map(|&c| Target::Local(c));
        let admins = self.admin_conns().map(|(core, c)| Target::Remote(core, c));
        local.chain(admins).collect()
    }

    /// Takes the next place in the session and builds the sealed record of a
    /// message at it; the session counts as active from `now`.
    pub fn record(
        &mut self,
        sid: &str,
        msg: NewMessage<'_>,
        keys: &KeyRing,
        now: Millis,
    ) -> MessageRecord {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_activity = now;
        let place = crate::crypto::Place {
            session_id: sid,
            message_id: msg.message_id,
            role: msg.role.as_str(),
            author: msg.author,
            seq,
        };
        MessageRecord {
            session_id: sid.to_owned(),
            message_id: msg.message_id.to_owned(),
            seq,
            role: msg.role,
            author: msg.author.to_owned(),
            client_id: msg.client_id,
            sealed: keys.seal(&place, msg.text),
            created_at: now,
            tokens_in: msg.usage.input_tokens,
            tokens_out: msg.usage.output_tokens,
            cancelled: msg.cancelled,
            file: msg.file,
            extra: msg.extra.map(|e| e.seal(keys, &place)),
        }
    }

    /// A voice message's transcript is ready: everyone in the session sees it
    /// (`transcript`), it becomes the message's stored content, and the model is
    /// told it. Returns the effects and whether the AI answers it (not while a
    /// human has the session, nor once it ended).
    pub fn transcribed(
        &mut self,
        at: VoicePlace<'_>,
        text: &str,
        keys: &KeyRing,
        limits: ContextLimits,
    ) -> (Vec<Effect>, bool) {
        let frame = ServerFrame::Transcript {
            session_id: at.sid,
            message_id: at.message_id,
            content: text,
        }
        .to_json();
        let sealed = seal_user_text(keys, at.sid, at.message_id, &self.user_id, at.seq, text);
        self.remember(TurnRole::User, text.into(), limits);
        let effects = vec![
            Effect::Send(self.everyone(), frame),
            Effect::SetContent {
                message_id: at.message_id.clone(),
                sealed,
            },
        ];
        (effects, !matches!(self.state, State::Human | State::Ended))
    }

    /// A voice message could not be transcribed: one `transcription_failed` to
    /// the user's connections here; the message keeps its audio and no answer
    /// follows.
    pub fn transcription_failed(&self, sid: &str, message: &str) -> Vec<Effect> {
        let frame = ServerFrame::Error {
            code: Code::TranscriptionFailed,
            message,
            id: None,
            session_id: Some(sid),
            retry_after_ms: None,
        }
        .to_json();
        let to = self.attached.iter().map(|&c| Target::Local(c)).collect();
        vec![Effect::Send(to, frame)]
    }

    /// The answer still streaming, if any.
    pub fn running(&self) -> Option<&Answer> {
        self.answer.as_ref().filter(|a| a.done.is_none())
    }

    /// The effect that stops the running answer, if one runs.
    fn cancel_running(&self) -> Option<Effect> {
        self.running().map(|a| Effect::Cancel(a.cancel.clone()))
    }

    /// Starts tracking a new answer and returns the context to send upstream. A
    /// new answer supersedes the one still running for the previous message.
    pub fn begin_answer(
        &mut self,
        message_id: Arc<str>,
        cancel: Rc<CancelFlag>,
    ) -> (Vec<Turn>, Option<Effect>) {
        let superseded = self.cancel_running();
        self.answer = Some(Answer {
            message_id,
            chunks: Vec::new(),
            cancel,
            done: None,
        });
        (self.context.iter().cloned().collect(), superseded)
    }

    /// A user's `cancel`: stops the running answer; nothing running is fine.
    pub fn cancel(&self) -> Vec<Effect> {
        self.cancel_running().into_iter().collect()
    }

    /// An admin joins: the AI stops at once and the session is a human's.
    /// Returns whether it just became one, and the effects.
    pub fn join(&mut self, admin: &AdminRef) -> Result<(bool, Vec<Effect>), Refusal> {
        if self.state == State::Ended {
            return Err(Refusal::Ended);
        }
        let conn = (admin.core, admin.conn);
        // From watcher to agent: its transcript goes out again, and nothing may
        // precede it.
        self.watchers.retain(|w| w.conn != conn);
        match self
            .admins
            .iter_mut()
            .find(|seat| seat.admin_id == admin.id)
        {
            Some(seat) if seat.conns.contains(&conn) => {}
            Some(seat) => seat.conns.push(conn),
            None => self.admins.push(Seat {
                admin_id: admin.id.clone(),
                name: admin.name.clone(),
                conns: vec![conn],
                announced: false,
            }),
        }
        let mut effects: Vec<Effect> = self.cancel_running().into_iter().collect();
        let newly_human = self.state != State::Human;
        self.state = State::Human;
        effects.push(Effect::Record {
            state: State::Human,
            action: AuditAction::AdminJoin,
        });
        Ok((newly_human, effects))
    }

    /// An admin connection follows the session. One already in it (seated or
    /// watching) stays as it is.
    pub fn watch(&mut self, admin: &AdminRef) {
        let conn = (admin.core, admin.conn);
        let seated = self.admins.iter().any(|seat| seat.conns.contains(&conn));
        if !seated && !self.watchers.iter().any(|w| w.conn == conn) {
            self.watchers.push(Watcher {
                conn,
                announced: false,
            });
        }
    }

    /// A watcher's transcript went out: from now on it gets live frames.
    pub fn announce_watcher(&mut self, conn: (usize, ConnId)) {
        if let Some(w) = self.watchers.iter_mut().find(|w| w.conn == conn) {
            w.announced = true;
        }
    }

    /// The admin's transcript went out: from now on its seat gets live frames.
    /// Returns the names of the admins announced before it, each of whom it must
    /// be told about once (later ones it hears of from their own announcement).
    pub fn announce(&mut self, admin_id: &str) -> Vec<Arc<str>> {
        let mut present = Vec::new();
        for seat in self.admins.iter_mut() {
            if *seat.admin_id == *admin_id {
                seat.announced = true;
            } else if seat.announced {
                present.push(seat.name.clone());
            }
        }
        present
    }

    /// Whether `admin_id` may write in the session.
    pub fn seated(&self, admin_id: &str) -> Result<(), Refusal> {
        match self.admins.iter().any(|seat| *seat.admin_id == *admin_id) {
            true => Ok(()),
            false => Err(Refusal::NotJoined),
        }
    }

    /// An admin leaves (`whole`: every connection of it), or one of its
    /// connections went. The last admin out hands the session back to the AI, and
    /// help requests are refused until `help_open_at` (the cooldown's end). A
    /// connection that was only watching stops, silently, and nothing else.
    pub fn leave(
        &mut self,
        sid: &str,
        admin: &AdminRef,
        whole: bool,
        help_open_at: Millis,
    ) -> Vec<Effect> {
        let conn = (admin.core, admin.conn);
        let watchers = self.watchers.len();
        self.watchers.retain(|w| w.conn != conn);
        if whole && self.watchers.len() < watchers {
            return Vec::new();
        }
        let Some(i) = self
            .admins
            .iter()
            .position(|seat| seat.admin_id == admin.id)
        else {
            return Vec::new();
        };
        let seat = &mut self.admins[i];
        seat.conns.retain(|c| *c != (admin.core, admin.conn));
        if !whole && !seat.conns.is_empty() {
            return Vec::new();
        }
        let left = |you| {
            ServerFrame::AdminLeft {
                session_id: sid,
                admin_name: &admin.name,
                you,
            }
            .to_json()
        };
        let mut effects = Vec::new();
        // The leaving admin hears it too, though no longer seated: as its own.
        if whole {
            effects.push(Effect::Send(vec![Target::of(admin)], left(true)));
        }
        self.admins.remove(i);
        effects.push(Effect::Send(self.everyone(), left(false)));
        if self.admins.is_empty() && self.state == State::Human {
            self.state = State::Ai;
            self.help_open_at = help_open_at;
            effects.push(Effect::Record {
                state: State::Ai,
                action: AuditAction::AdminLeave,
            });
        }
        effects
    }

    /// A user asks for a human: the session waits. Returns `None` when it already
    /// waits or a human has it: then nothing changes and nobody is told again.
    /// Within the cooldown after a hand-back it is refused, with when to retry.
    pub fn help(&mut self, now: Millis) -> Result<Option<Vec<Effect>>, Refusal> {
        match self.state {
            State::Ended => Err(Refusal::Ended),
            State::Ai if now < self.help_open_at => Err(Refusal::Cooldown {
                retry_after_ms: (self.help_open_at - now) as u64,
            }),
            State::Ai => {
                self.state = State::Waiting;
                Ok(Some(vec![Effect::Record {
                    state: State::Waiting,
                    action: AuditAction::HelpRequest,
                }]))
            }
            State::Waiting | State::Human => Ok(None),
        }
    }

    /// An admin ended the session: it takes nothing new, a running answer stops,
    /// everyone in it is told, and the admins leave it.
    pub fn end(&mut self, sid: &str) -> Vec<Effect> {
        self.state = State::Ended;
        let mut effects: Vec<Effect> = self.cancel_running().into_iter().collect();
        let frame = ServerFrame::SessionEnded { session_id: sid }.to_json();
        effects.push(Effect::Send(self.everyone(), frame));
        self.admins.clear();
        self.watchers.clear();
        effects
    }

    /// Ends the session if nothing happened in it for `idle_ms` (no answer running,
    /// no message, no state change since `now - idle_ms`). Everyone in it hears
    /// `session_ended`, as when an admin ends it. `None`: it is not idle, or ended.
    pub fn end_idle(&mut self, sid: &str, now: Millis, idle_ms: i64) -> Option<Vec<Effect>> {
        let idle_before = now - idle_ms;
        if self.state == State::Ended
            || self.running().is_some()
            || self.last_activity >= idle_before
        {
            return None;
        }
        self.state = State::Ended;
        let frame = ServerFrame::SessionEnded { session_id: sid }.to_json();
        let effects = vec![
            Effect::Send(self.everyone(), frame),
            Effect::EndIdle { idle_before },
        ];
        self.admins.clear();
        self.watchers.clear();
        Some(effects)
    }
}

/// The refusal a client sees.
pub fn refusal_frame(why: Refusal, sid: &str, id: Option<&str>) -> String {
    let (code, message) = match why {
        Refusal::Ended => (
            Code::InvalidMessage,
            "this session has ended; start a new one",
        ),
        Refusal::NotJoined => (Code::Forbidden, "join the session first"),
        Refusal::Cooldown { .. } => (
            Code::RateLimited,
            "an admin just handed this session back; ask for a human again later",
        ),
    };
    let retry_after_ms = match why {
        Refusal::Cooldown { retry_after_ms } => Some(retry_after_ms),
        _ => None,
    };
    ServerFrame::Error {
        code,
        message,
        id,
        session_id: Some(sid),
        retry_after_ms,
    }
    .to_json()
}
