//! `resume`: the stored history (decrypted), then the missed chunks of the answer
//! still running and, live, the rest.

use std::rc::Rc;
use std::sync::Arc;

use super::effects::deliver;
use super::extra::Extra;
use super::session::Target;
use crate::app::frames::{error_frame, store_read_error, Code, HistoryItem, ServerFrame};
use crate::app::Core;
use crate::runtime::ConnId;
use crate::store::{MessageRecord, StoreError};

/// Sends the history and the running answer to connection `conn`, in the
/// background. The connection is detached from the session until its history is
/// read: live frames in between would reach it before the `session` frame, and
/// again in the replay of the running answer.
pub fn resume(core: &Rc<Core>, sid: &Arc<str>, conn: ConnId, after_seq: Option<u64>) {
    core.app.detach(sid, conn);
    let to = Target::Local(conn);
    let task = resume_now(core.clone(), sid.clone(), to, after_seq, Some(conn));
    // A resume that panics still leaves the connection in its session (and so
    // told of the failure, like everyone in it).
    let s = sid.clone();
    super::spawn(core, sid, "resume", task, move |c| c.app.attach(&s, conn));
}

/// [`resume`], awaited: returns once every frame is queued for `to`;
/// `attach`: the connection attached to the session once the history is read
/// (in the same synchronous step that sends it).
pub async fn resume_now(
    core: Rc<Core>,
    sid: Arc<str>,
    to: Target,
    after_seq: Option<u64>,
    attach: Option<ConnId>,
) {
    let shared = &core.shared.app;
    core.shared.hooks.fault_point("resume");
    let send = |frame: String| deliver(&core, to, frame.into());
    let attach_now = || {
        if let Some(conn) = attach {
            core.app.attach(&sid, conn);
        }
    };
    let messages = match shared
        .store
        .load_session(&sid, shared.history_messages_max)
        .await
    {
        Ok(Some((_, messages))) => messages,
        Ok(None) => Vec::new(),
        Err(e) => {
            // Live frames go on; the client may ask for the history again.
            attach_now();
            return send(history_failed(&core, &sid, &e, None));
        }
    };
    let (history, withheld) = open_history(&core, &sid, &messages);
    // From here on everything is synchronous: no chunk can slip in between.
    attach_now();
    let agents = core.app.sessions.borrow().get(&sid).map(|s| s.agents());
    let agents: Vec<&str> = agents.iter().flatten().map(|a| &**a).collect();
    let frame = ServerFrame::Session {
        session_id: &sid,
        created: false,
        messages: Some(&history),
        agents: &agents,
    };
    send(frame.to_json());
    report_withheld(&core, withheld, None, send);
    replay_running(&core, &sid, &history, after_seq, send);
}

/// The answer still streaming (not in `history`): its chunks after `after_seq`,
/// and its end if it has one; the live rest follows through the session.
fn replay_running(
    core: &Core,
    sid: &Arc<str>,
    history: &[HistoryItem],
    after_seq: Option<u64>,
    send: impl Fn(String),
) {
    let replay = core.app.sessions.borrow().get(sid).and_then(|s| {
        let a = s.answer.as_ref()?;
        let stored = history.iter().any(|h| *h.message_id == *a.message_id);
        (!stored).then(|| (a.message_id.clone(), a.chunks.clone(), a.done))
    });
    let Some((message_id, chunks, done)) = replay else {
        return;
    };
    let from = after_seq.unwrap_or(0);
    for (i, content) in chunks.iter().enumerate().skip(from as usize) {
        let seq = i as u64 + 1;
        send(
            ServerFrame::AiChunk {
                session_id: sid,
                message_id: &message_id,
                seq,
                content,
            }
            .to_json(),
        );
    }
    if let Some((usage, cancelled)) = done {
        send(
            ServerFrame::AiDone {
                session_id: sid,
                message_id: &message_id,
                usage,
                cancelled,
            }
            .to_json(),
        );
    }
}

/// `history`: up to `limit` stored messages before `before_seq`, oldest first,
/// and where the page before them starts (none when nothing older is left).
/// Seqs are allocated one by one per session, so the page is the `limit` seqs
/// below `before_seq`, read with the store's forward pager.
pub fn history_page(
    core: &Rc<Core>,
    sid: &Arc<str>,
    to: Target,
    before_seq: u64,
    limit: usize,
    id: Option<String>,
) {
    let task = history_page_now(core.clone(), sid.clone(), to, before_seq, limit, id);
    super::spawn(core, sid, "history", task, |_| {});
}

async fn history_page_now(
    core: Rc<Core>,
    sid: Arc<str>,
    to: Target,
    before_seq: u64,
    limit: usize,
    id: Option<String>,
) {
    let from = before_seq.saturating_sub(limit as u64 + 1);
    let page = core
        .shared
        .app
        .store
        .messages_after(&sid, from, limit)
        .await;
    let send = |frame: String| deliver(&core, to, frame.into());
    let mut messages = match page {
        Ok(m) => m,
        Err(e) => return send(history_failed(&core, &sid, &e, id.as_deref())),
    };
    messages.retain(|m| m.seq < before_seq);
    let (history, withheld) = open_history(&core, &sid, &messages);
    let frame = ServerFrame::History {
        id: id.as_deref(),
        session_id: &sid,
        messages: &history,
        before_seq: (from > 0).then_some(from + 1),
    };
    send(frame.to_json());
    report_withheld(&core, withheld, id.as_deref(), send);
}

/// A history read that failed: counted, logged, and the client's error.
fn history_failed(core: &Core, sid: &str, e: &StoreError, id: Option<&str>) -> String {
    core.metrics().store_errors.inc();
    tracing::error!(session = %sid, error = %e, "loading history failed");
    store_read_error(e, "could not load the history; retry", id)
}

/// Messages of a history that failed their integrity check: counted, and the
/// client told how many were withheld.
fn report_withheld(core: &Core, withheld: u64, id: Option<&str>, send: impl Fn(String)) {
    if withheld == 0 {
        return;
    }
    core.metrics().integrity_failures.add(withheld);
    let msg =
        format!("{withheld} stored message(s) failed their integrity check and were withheld");
    send(error_frame(Code::Internal, &msg, id));
}

/// A stored message's content and extras, or why they did not open.
fn open_message(
    keys: &crate::crypto::KeyRing,
    m: &MessageRecord,
) -> Result<(String, Extra), crate::crypto::CryptoError> {
    Ok((keys.open(&m.place(), &m.sealed)?, Extra::open(keys, m)?))
}

/// Decrypts stored messages; those that fail authentication are withheld,
/// counted and logged (never shown as if nothing were wrong).
fn open_history(core: &Core, sid: &str, messages: &[MessageRecord]) -> (Vec<HistoryItem>, u64) {
    let keys = &core.shared.app.keys;
    let mut withheld = 0;
    let history = messages
        .iter()
        .filter_map(|m| match open_message(keys, m) {
            Ok((content, extra)) => Some(HistoryItem {
                message_id: m.message_id.clone(),
                seq: m.seq,
                role: m.role.as_str(),
                content,
                created_at: m.created_at,
                cancelled: m.cancelled,
                file: m.file.clone(),
                extra,
            }),
            Err(e) => {
                withheld += 1;
                tracing::error!(session = %sid, message = %m.message_id, error = %e, "stored message failed its integrity check");
                None
            }
        })
        .collect();
    (history, withheld)
}
