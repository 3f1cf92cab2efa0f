//! Storage errors: what failed ([`Op`]) and the backend's own error as the source.
//!
//! Callers map a [`StoreError`] to the wire or HTTP once, where they use it; only
//! [`StoreError::Overloaded`] (a full write queue: back-pressure, retry soon) is
//! meant to be told apart from "storage failed".

use std::fmt;
use std::sync::Arc;

use super::WriteOp;

/// When a caller refused for a full write queue should try again.
pub const OVERLOADED_RETRY_AFTER_MS: u64 = 1000;

/// The storage operation that failed, named in every backend error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Opening the database file or directory, or starting a store's threads.
    Open,
    /// Creating or updating the schema (tables, indexes).
    Migrate,
    /// Starting, committing or undoing a transaction.
    Transaction,
    /// Appending to a core's journal, syncing it, or replaying it at start.
    Journal,
    CreateSession,
    AppendMessage,
    SetState,
    EndIdle,
    PurgeOutbox,
    IdleSessions,
    OutboxCount,
    DeleteUser,
    DropEmptySession,
    Enqueue,
    Delivered,
    DeliveryFailed,
    LoadSession,
    MessagePage,
    ListSessions,
    SessionEvents,
    WindowMetrics,
    UserSessions,
    DueNotifications,
    NextNotification,
    Ping,
    Lease,
    PutFile,
    SetContent,
    ReadFile,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Open => "open storage",
            Op::Migrate => "migrate schema",
            Op::Transaction => "transaction",
            Op::Journal => "journal",
            Op::CreateSession => "create session",
            Op::AppendMessage => "append message",
            Op::SetState => "set session state",
            Op::EndIdle => "end idle session",
            Op::PurgeOutbox => "purge notification outbox",
            Op::IdleSessions => "read idle sessions",
            Op::OutboxCount => "count notifications",
            Op::DeleteUser => "delete user",
            Op::DropEmptySession => "drop empty session",
            Op::Enqueue => "queue notification",
            Op::Delivered => "mark notification delivered",
            Op::DeliveryFailed => "record failed delivery",
            Op::LoadSession => "load session",
            Op::MessagePage => "read a page of messages",
            Op::ListSessions => "list sessions",
            Op::SessionEvents => "read audit trail",
            Op::WindowMetrics => "window metrics",
            Op::UserSessions => "read user's sessions",
            Op::DueNotifications => "read due notifications",
            Op::NextNotification => "read next notification time",
            Op::Ping => "ping",
            Op::Lease => "user lease",
            Op::PutFile => "record file",
            Op::SetContent => "set message content",
            Op::ReadFile => "read file record",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl WriteOp {
    /// The operation this change is, for errors.
    pub fn op(&self) -> Op {
        match self {
            WriteOp::CreateSession(_) => Op::CreateSession,
            WriteOp::AppendMessage { .. } => Op::AppendMessage,
            WriteOp::SetState { .. } => Op::SetState,
            WriteOp::EndIdle { .. } => Op::EndIdle,
            WriteOp::PurgeOutbox { .. } => Op::PurgeOutbox,
            WriteOp::DeleteUser { .. } => Op::DeleteUser,
            WriteOp::DropEmptySession { .. } => Op::DropEmptySession,
            WriteOp::PutFile(_) => Op::PutFile,
            WriteOp::SetContent { .. } => Op::SetContent,
            WriteOp::Enqueue { .. } => Op::Enqueue,
            WriteOp::Delivered { .. } => Op::Delivered,
            WriteOp::DeliveryFailed { .. } => Op::DeliveryFailed,
            WriteOp::TakeLease { .. }
            | WriteOp::Fence { .. }
            | WriteOp::RenewLeases { .. }
            | WriteOp::ReleaseLeases { .. } => Op::Lease,
        }
    }
}

/// Why a storage call failed. `Clone` because one failed commit answers every
/// job of its batch, so sources are shared (`Arc`), which also keeps the type
/// small (MongoDB's error alone is over 100 bytes).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The bounded write queue is full: storage is slow or away. Back-pressure,
    /// not failure: the write was not queued and may be sent again.
    #[error("storage is overloaded ({0} writes queued)")]
    Overloaded(usize),
    /// Every read connection stayed busy for the whole bounded wait. Back-pressure,
    /// like `Overloaded`: nothing was read, ask again after `retry_after_ms`.
    #[error("storage is busy: all {readers} read connections stayed in use; retry")]
    ReadersBusy { readers: usize, retry_after_ms: u64 },
    #[error("storage has stopped")]
    Stopped,
    #[error("{op}: {source}")]
    Sqlite {
        op: Op,
        #[source]
        source: Arc<rusqlite::Error>,
    },
    #[error("{op}: {source}")]
    Mongo {
        op: Op,
        #[source]
        source: Arc<mongodb::error::Error>,
    },
    /// MongoDB did not answer at start-up. Names the hosts only: the URI may
    /// carry a password, which must not reach logs.
    #[error("cannot reach MongoDB at {hosts}: {source}")]
    Unreachable {
        hosts: String,
        #[source]
        source: Arc<mongodb::error::Error>,
    },
    /// A `mongodb+srv://` URI whose host's DNS records (SRV for the servers, TXT
    /// for options) could not be read. Names the host only, never the URI.
    #[error("cannot resolve the MongoDB host {host} of a mongodb+srv:// URI (DNS SRV lookup of _mongodb._tcp.{host}): {source}")]
    SrvLookup {
        host: String,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op}: {source}")]
    Io {
        op: Op,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A read ran on a thread that failed (panicked or was cancelled).
    #[error("{op}: {source}")]
    Task {
        op: Op,
        #[source]
        source: Arc<tokio::task::JoinError>,
    },
    /// A storage setting is missing or malformed.
    #[error("storage setting: {0}")]
    Setting(String),
    #[error(
        "the database was written by a newer chatbox (schema {found}, this build knows {known})"
    )]
    NewerSchema { found: i64, known: i64 },
    /// Cluster: another node took the user's lease after this node's `epoch`;
    /// nothing of the job was stored.
    #[error("user {user}'s lease moved to another node (this node held epoch {epoch})")]
    Fenced { user: String, epoch: u64 },
    /// Cluster: another node holds the user's lease for `retry_after_ms` more;
    /// nothing of the job was stored.
    #[error("user {user} is served by node {node} for now; retry")]
    LeaseHeld {
        user: String,
        node: String,
        retry_after_ms: u64,
    },
    #[error("blocking pool: {0}")]
    Pool(#[from] crate::pool::PoolError),
}

impl StoreError {
    /// The store refused the change itself (a constraint: a session deleted
    /// meanwhile, a key taken): trying it again would fail again.
    pub fn is_refusal(&self) -> bool {
        match self {
            StoreError::Sqlite { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
            }
            _ => false,
        }
    }

    pub(crate) fn sqlite(op: Op) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| StoreError::Sqlite {
            op,
            source: Arc::new(source),
        }
    }

    pub(crate) fn mongo(op: Op) -> impl FnOnce(mongodb::error::Error) -> StoreError {
        move |source| StoreError::Mongo {
            op,
            source: Arc::new(source),
        }
    }

    pub(crate) fn io(op: Op) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| StoreError::Io {
            op,
            source: Arc::new(source),
        }
    }

    /// For back-pressure (a full write queue, every reader busy): when to try
    /// again. `None` for failures.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            StoreError::Overloaded(_) => Some(OVERLOADED_RETRY_AFTER_MS),
            StoreError::ReadersBusy { retry_after_ms, .. }
            | StoreError::LeaseHeld { retry_after_ms, .. } => Some(*retry_after_ms),
            StoreError::Fenced { .. } => Some(OVERLOADED_RETRY_AFTER_MS),
            _ => None,
        }
    }

    /// The operation that failed, when a backend call failed.
    pub fn op(&self) -> Option<Op> {
        match self {
            StoreError::Sqlite { op, .. }
            | StoreError::Mongo { op, .. }
            | StoreError::Io { op, .. }
            | StoreError::Task { op, .. } => Some(*op),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_operation_and_keep_the_source() {
        let e = StoreError::sqlite(Op::AppendMessage)(rusqlite::Error::InvalidQuery);
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some(&*rusqlite::Error::InvalidQuery.to_string())
        );
        assert_eq!(
            e.to_string(),
            format!("append message: {}", rusqlite::Error::InvalidQuery)
        );
        assert_eq!(e.op(), Some(Op::AppendMessage));
        assert_eq!(e.clone().to_string(), e.to_string());
        assert_eq!(StoreError::Overloaded(3).op(), None);
    }
}
