//! Records and helpers the embedded store's tests share.

use crate::crypto::KeyRing;
use crate::store::{MessageRecord, Role, SessionRecord, SessionState, StoreError, StoreFuture};

/// Awaits a store future from a plain test thread.
pub(super) fn block<T>(f: StoreFuture<T>) -> Result<T, StoreError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

pub(super) fn msg(
    ring: &KeyRing,
    session: &str,
    seq: u64,
    id: &str,
    client: Option<&str>,
    text: &str,
) -> MessageRecord {
    MessageRecord {
        session_id: session.into(),
        message_id: id.into(),
        seq,
        role: Role::User,
        author: "u1".into(),
        client_id: client.map(str::to_owned),
        sealed: ring.seal(
            &crate::crypto::Place {
                session_id: session,
                message_id: id,
                role: "user",
                author: "u1",
                seq,
            },
            text,
        ),
        created_at: 1000 + seq as i64,
        tokens_in: 0,
        tokens_out: 0,
        cancelled: false,
        file: None,
        extra: None,
    }
}

pub(super) fn session(id: &str) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        user_id: "u1".into(),
        created_at: 1000,
        last_activity: 1000,
        state: SessionState::Ai,
        message_count: 0,
        tokens_in: 0,
        tokens_out: 0,
        ended_at: None,
    }
}
