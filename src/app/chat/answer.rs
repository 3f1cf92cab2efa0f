//! The model's answer to a session: streamed chunk by chunk to everyone in it,
//! kept for `resume` while it runs, stored when it ends, closed by `ai_done`.

use std::rc::Rc;
use std::sync::Arc;

use super::effects::{cancel_now, push_session};
use super::session::{CancelFlag, NewMessage};
use crate::app::frames::{Code, ServerFrame, Usage};
use crate::app::Core;
use crate::clock::{new_id, now_ms};
use crate::llm::{ErrorKind, LlmEvent, LlmStream, ModelSpec, TurnRole};
use crate::metrics::LlmCounters;
use crate::store::{Role, StoreError, WriteOp};

/// How an answer stream ended.
enum Ending {
    Finished {
        input_tokens: u64,
        output_tokens: u64,
    },
    Cancelled,
    Failed(ErrorKind),
}

/// What was said before the stream ended.
struct Said {
    text: String,
    /// Chunks sent; also the `seq` of the last one.
    chunks: u64,
}

/// Starts the answer to the session's latest turn, superseding one still running.
pub fn start(core: &Rc<Core>, sid: &Arc<str>, model: Arc<ModelSpec>) {
    let message_id = new_id("m");
    let cancel = Rc::new(CancelFlag::default());
    let turns = {
        let mut sessions = core.app.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return;
        };
        let (turns, superseded) = s.begin_answer(message_id.clone(), cancel.clone());
        if let Some(effect) = superseded {
            cancel_now(effect);
        }
        turns
    };
    let (core, sid) = (core.clone(), sid.clone());
    let message_id_for_cleanup = message_id.clone();
    super::spawn(
        &core.clone(),
        &sid.clone(),
        "answer",
        async move {
            let shared = &core.shared.app;
            let m = shared.llm.of(core.id, &model.id);
            m.requests.inc();
            let started = std::time::Instant::now();
            let mut stream = LlmStream::start(
                &shared.models,
                &shared.pool,
                model,
                turns,
                shared.demo_chunk_delay,
            );
            let (said, ending) =
                stream_chunks(&core, m, &sid, &message_id, &mut stream, &cancel, started).await;
            // Cancelled or failed: the upstream request goes now, not when the task ends.
            stream.abort();
            drop(stream);
            m.answer.observe(started.elapsed());
            finish(&core, m, &sid, &message_id, said, ending).await;
        },
        end_after_panic(message_id_for_cleanup),
    );
}

/// After a panic in the answer task: the answer counts as ended (cancelled), so
/// the session is not left waiting for it (and can go idle, or answer again).
fn end_after_panic(message_id: Arc<str>) -> impl FnOnce(&Core) {
    move |core| {
        let mut sessions = core.app.sessions.borrow_mut();
        let answers = sessions.values_mut().filter_map(|s| s.answer.as_mut());
        for a in answers.filter(|a| a.message_id == message_id && a.done.is_none()) {
            a.done = Some((Usage::default(), true));
        }
    }
}

/// Relays the model's chunks until it finishes, fails, or is cancelled.
async fn stream_chunks(
    core: &Core,
    m: &LlmCounters,
    sid: &Arc<str>,
    message_id: &Arc<str>,
    stream: &mut LlmStream,
    cancel: &CancelFlag,
    started: std::time::Instant,
) -> (Said, Ending) {
    let mut said = Said {
        text: String::new(),
        chunks: 0,
    };
    let ending = loop {
        let event = monoio::select! {
            _ = cancel.cancelled() => break Ending::Cancelled,
            e = stream.next() => e,
        };
        let chunk = match event {
            Some(LlmEvent::Chunk(chunk)) => chunk,
            Some(LlmEvent::Done {
                input_tokens,
                output_tokens,
                retries,
                malformed,
            }) => {
                m.retries.add(u64::from(retries));
                m.malformed_events.add(u64::from(malformed));
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
                m.retries.add(u64::from(retries));
                tracing::warn!(session = %sid, kind = kind.label(), %detail, "answer failed");
                break Ending::Failed(kind);
            }
            None => break Ending::Failed(ErrorKind::StreamEnded),
        };
        if said.chunks == 0 {
            m.first_token.observe(started.elapsed());
        }
        if said.text.len() + chunk.len() > core.shared.app.answer_bytes_max {
            break Ending::Finished {
                input_tokens: 0,
                output_tokens: said.chunks,
            };
        }
        said.chunks += 1;
        said.text.push_str(&chunk);
        core.shared.hooks.fault_point("answer");
        relay(core, sid, message_id, said.chunks, chunk.into());
    };
    (said, ending)
}

/// Sends chunk `seq` to the session and keeps it for `resume`.
fn relay(core: &Core, sid: &Arc<str>, message_id: &Arc<str>, seq: u64, chunk: Arc<str>) {
    let frame = ServerFrame::AiChunk {
        session_id: sid,
        message_id,
        seq,
        content: &chunk,
    }
    .to_json();
    let mut sessions = core.app.sessions.borrow_mut();
    let answer = sessions.get_mut(sid).and_then(|s| s.answer.as_mut());
    if let Some(a) = answer.filter(|a| a.message_id == *message_id) {
        a.chunks.push(chunk);
    }
    drop(sessions);
    core.metrics().answer_chunks.inc();
    push_session(core, sid, frame);
}

/// Counts the ending, stores what was said, and closes the answer with
/// `ai_done` (and the errors it owes the session).
async fn finish(
    core: &Rc<Core>,
    llm: &LlmCounters,
    sid: &Arc<str>,
    message_id: &Arc<str>,
    said: Said,
    ending: Ending,
) {
    let (usage, cancelled, failed) = count(core, llm, &ending, said.chunks);
    if failed && said.chunks == 0 {
        // Nothing was said: no answer to store or close, just the error.
        if let Some(s) = core.app.sessions.borrow_mut().get_mut(sid) {
            s.answer = None;
        }
        return push_session(core, sid, unavailable(sid));
    }
    let stored = store(core, sid, message_id, &said.text, usage, cancelled).await;
    if let Some(s) = core.app.sessions.borrow_mut().get_mut(sid) {
        if let Some(a) = s.answer.as_mut().filter(|a| a.message_id == *message_id) {
            a.done = Some((usage, cancelled));
        }
        s.remember(
            TurnRole::Assistant,
            said.text.into(),
            core.shared.app.context,
        );
    }
    let done = ServerFrame::AiDone {
        session_id: sid,
        message_id,
        usage,
        cancelled,
    };
    push_session(core, sid, done.to_json());
    if failed {
        push_session(core, sid, unavailable(sid));
    }
    if let Err(e) = stored {
        core.metrics().store_errors.inc();
        tracing::error!(session = %sid, error = %e, "storing an answer failed");
        let frame = ServerFrame::Error {
            code: Code::Internal,
            message: "the answer could not be saved",
            id: None,
            session_id: Some(sid),
            retry_after_ms: None,
        };
        push_session(core, sid, frame.to_json());
    }
}

/// Counts how the answer ended; returns its usage, whether it counts as
/// cancelled, and whether it failed.
fn count(core: &Core, llm: &LlmCounters, ending: &Ending, chunks: u64) -> (Usage, bool, bool) {
    let m = core.metrics();
    let partial = Usage {
        input_tokens: 0,
        output_tokens: chunks,
    };
    let counted = match *ending {
        Ending::Finished {
            input_tokens,
            output_tokens,
        } => {
            m.answers_done.inc();
            let usage = Usage {
                input_tokens,
                output_tokens,
            };
            (usage, false, false)
        }
        Ending::Cancelled => {
            m.answers_cancelled.inc();
            (partial, true, false)
        }
        Ending::Failed(kind) => {
            llm.error(kind.index());
            (partial, true, true)
        }
    };
    llm.input_tokens.add(counted.0.input_tokens);
    llm.output_tokens.add(counted.0.output_tokens);
    counted
}

fn unavailable(sid: &str) -> String {
    ServerFrame::Error {
        code: Code::LlmUnavailable,
        message: "the assistant is unavailable right now; please try again",
        id: None,
        session_id: Some(sid),
        retry_after_ms: None,
    }
    .to_json()
}

/// Stores the answer as the session's next message.
async fn store(
    core: &Rc<Core>,
    sid: &Arc<str>,
    message_id: &str,
    text: &str,
    usage: Usage,
    cancelled: bool,
) -> Result<(), StoreError> {
    let shared = &core.shared.app;
    let (op, user) = {
        let mut sessions = core.app.sessions.borrow_mut();
        let Some(s) = sessions.get_mut(sid) else {
            return Ok(());
        };
        let new = NewMessage {
            message_id,
            role: Role::Assistant,
            author: "",
            client_id: None,
            text,
            usage,
            cancelled,
            file: None,
            extra: None,
        };
        let op = WriteOp::AppendMessage {
            user_id: s.user_id.to_string(),
            message: s.record(sid, new, &shared.keys, now_ms()),
        };
        (op, s.user_id.clone())
    };
    super::lease::write(core, &user, vec![op]).await.map(|_| ())
}

/// Answers left with nobody listening keep going for the grace period, so a quick
/// reconnect can resume them; after it they are dropped upstream.
pub fn orphaned(core: &Rc<Core>) {
    let orphans: Vec<(Arc<str>, Arc<str>)> = core
        .app
        .sessions
        .borrow()
        .iter()
        .filter(|(_, s)| s.attached.is_empty())
        .filter_map(|(sid, s)| Some((sid.clone(), s.running()?.message_id.clone())))
        .collect();
    for (sid, message_id) in orphans {
        let core = core.clone();
        super::spawn(
            &core.clone(),
            &sid.clone(),
            "grace",
            async move {
                monoio::time::sleep(core.shared.app.grace).await;
                let sessions = core.app.sessions.borrow();
                let Some(s) = sessions.get(&sid).filter(|s| s.attached.is_empty()) else {
                    return;
                };
                if let Some(a) = s.running().filter(|a| a.message_id == message_id) {
                    tracing::debug!(session = %sid, "nobody came back within the grace period; dropping the answer");
                    a.cancel.cancel();
                }
            },
            |_| {},
        );
    }
}

/// Shutdown's draining step on one core: answers still streaming may finish until
/// `grace`; then those left are cancelled, which stores each with the text already
/// sent (as cancelled, so a `resume` after the restart shows it) and closes it with
/// `ai_done {cancelled: true}`; we wait for that until `deadline`.
pub async fn drain(core: &Rc<Core>, grace: monoio::time::Instant, deadline: monoio::time::Instant) {
    if ended_by(core, grace).await {
        return;
    }
    let cancelled = {
        let sessions = core.app.sessions.borrow();
        let running = sessions.values().filter_map(|s| s.running());
        running.map(|a| a.cancel.cancel()).count()
    };
    tracing::info!(
        core = core.id,
        answers = cancelled,
        "shutdown grace over: answers still streaming are stopped and stored as cancelled"
    );
    if !ended_by(core, deadline).await {
        tracing::warn!(
            core = core.id,
            step = "storing cancelled answers",
            left = running_answers(core),
            "shutdown deadline reached; step cut off"
        );
    }
}

fn running_answers(core: &Core) -> usize {
    let sessions = core.app.sessions.borrow();
    sessions.values().filter(|s| s.running().is_some()).count()
}

/// Waits until no answer runs on this core (true) or `until` passes (false).
/// Polled: answers end on their own tasks, and a check every few milliseconds for
/// at most the shutdown's grace costs less than an event every answer would carry.
async fn ended_by(core: &Core, until: monoio::time::Instant) -> bool {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(10);
    loop {
        if running_answers(core) == 0 {
            return true;
        }
        let now = monoio::time::Instant::now();
        if now >= until {
            return false;
        }
        monoio::time::sleep((until - now).min(EVERY)).await;
    }
}
