//! Copies everything one store holds into another (`chatbox copy`): sessions with
//! their messages (still sealed: no key is needed) and audit trails, and the
//! notifications still pending. Works between any two backends, through the
//! [`Store`] trait only.
//!
//! Each session is one write, so it lands whole or not at all; a session the
//! target already has is counted and left alone, so a copy that stopped half-way
//! can simply be run again. Pending notifications are copied only into a target
//! that has none pending.

use super::{
    AuditAction, Millis, SessionQuery, SessionRecord, SessionState, SortBy, Store, StoreError,
    WriteOp, WriteOutcome,
};

/// Sessions read per page of the source.
const PAGE_SESSIONS: usize = 200;
/// Messages one session may have; larger ones are reported, not truncated.
const SESSION_MESSAGES_MAX: usize = 1_000_000;
/// Pending notifications copied at most.
const NOTIFICATIONS_MAX: usize = 100_000;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    pub sessions: u64,
    pub messages: u64,
    pub events: u64,
    /// Sessions the target had already (left as they were).
    pub sessions_present: u64,
    /// Audit entries whose state or action this build does not know.
    pub events_unknown: u64,
    pub notifications: u64,
}

/// The state and action of an audit entry, if this build knows them.
fn known(state: &str, action: &str) -> Option<(SessionState, AuditAction)> {
    Some((SessionState::parse(state)?, AuditAction::parse(action)?))
}

pub async fn copy(from: &dyn Store, to: &dyn Store) -> Result<CopyReport, StoreError> {
    let mut report = CopyReport::default();
    let mut query = SessionQuery {
        user_id: None,
        state: None,
        from: None,
        to: None,
        sort_by: SortBy::StartTime,
        descending: false,
        limit: PAGE_SESSIONS,
        after: None,
    };
    loop {
        let page = from.list_sessions(query.clone()).await?;
        for s in &page.sessions {
            copy_session(from, to, s, &mut report).await?;
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    for n in from
        .due_notifications(Millis::MAX, NOTIFICATIONS_MAX)
        .await?
    {
        to.write(vec![WriteOp::Enqueue {
            kind: n.kind,
            payload: n.payload,
            at: 0,
        }])
        .await?;
        report.notifications += 1;
    }
    Ok(report)
}

async fn copy_session(
    from: &dyn Store,
    to: &dyn Store,
    s: &SessionRecord,
    report: &mut CopyReport,
) -> Result<(), StoreError> {
    if to.load_session(&s.id, 0).await?.is_some() {
        report.sessions_present += 1;
        return Ok(());
    }
    let Some((_, messages)) = from.load_session(&s.id, SESSION_MESSAGES_MAX).await? else {
        return Ok(()); // deleted meanwhile
    };
    let events = from.session_events(&s.id).await?;
    // Counters and last activity are rebuilt by the appends, as they were built.
    let mut ops = vec![WriteOp::CreateSession(SessionRecord {
        message_count: 0,
        tokens_in: 0,
        tokens_out: 0,
        last_activity: s.created_at,
        state: SessionState::Ai,
        ended_at: None,
        ..s.clone()
    })];
    let n = messages.len() as u64;
    ops.extend(messages.into_iter().map(|m| WriteOp::AppendMessage {
        user_id: s.user_id.clone(),
        message: m,
    }));
    let mut copied_events = 0;
    for e in events {
        match known(&e.state, &e.action) {
            Some((state, action)) => {
                ops.push(WriteOp::SetState {
                    session_id: s.id.clone(),
                    state,
                    actor: e.actor,
                    action,
                    at: e.at,
                });
                copied_events += 1;
            }
            None => report.events_unknown += 1,
        }
    }
    let outcomes = to.write(ops).await?;
    if outcomes
        .iter()
        .any(|o| matches!(o, WriteOutcome::Duplicate { .. }))
    {
        // A message's client id is in the target under another session already.
        report.sessions_present += 1;
        return Ok(());
    }
    report.sessions += 1;
    report.messages += n;
    report.events += copied_events;
    Ok(())
}
