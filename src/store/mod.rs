//! Storage: the trait every backend implements and the records it stores.
//!
//! Backends run on threads of their own (the blocking pool, a writer thread) and
//! hand results back as `Send` futures that a core can await without blocking.
//! Message content reaches a backend only sealed ([`crate::crypto::Sealed`]).

pub mod copy;
mod error;
pub mod files;
pub mod journal;
pub mod mongo;
pub mod sqlite;
mod writer;

pub use error::{Op, StoreError};
pub use files::{FileRecord, FileRef};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::crypto::Sealed;

/// What replaces a deleted user's ids and name in the notification outbox.
pub const SCRUBBED: &str = "[deleted]";

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    User,
    Assistant,
    Admin,
    System,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Admin => "admin",
            Role::System => "system",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "admin" => Role::Admin,
            "system" => Role::System,
            _ => return None,
        })
    }
}

/// Where a session stands, as stored (`ai`, `waiting`, `human`, `ended`: the
/// strings on disk and in MongoDB; they never change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SessionState {
    /// The AI answers.
    Ai,
    /// The user asked for a human.
    Waiting,
    /// An admin has the session.
    Human,
    /// Ended by an admin: readable, takes no new messages.
    Ended,
}

impl SessionState {
    pub const ALL: [SessionState; 4] = [
        SessionState::Ai,
        SessionState::Waiting,
        SessionState::Human,
        SessionState::Ended,
    ];
    pub const NAMES: [&'static str; 4] = ["ai", "waiting", "human", "ended"];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Ai => "ai",
            SessionState::Waiting => "waiting",
            SessionState::Human => "human",
            SessionState::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<SessionState> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// A state read back from storage. An unknown name (written by a newer
    /// build) reads as `Ai`, as sessions always did: the session stays usable.
    pub(crate) fn stored(s: &str) -> SessionState {
        Self::parse(s).unwrap_or(SessionState::Ai)
    }
}

/// What moved a session to a new state, as recorded in its audit trail (the
/// stored strings never change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AuditAction {
    /// The user asked for a human (`waiting`).
    HelpRequest,
    /// An admin joined (`human`).
    AdminJoin,
    /// The last admin left (`ai`).
    AdminLeave,
    /// An admin ended the session (`ended`).
    End,
    /// Nothing happened in the session for `session_end_idle_secs` (`ended`).
    EndedIdle,
}

impl AuditAction {
    pub const ALL: [AuditAction; 5] = [
        AuditAction::HelpRequest,
        AuditAction::AdminJoin,
        AuditAction::AdminLeave,
        AuditAction::End,
        AuditAction::EndedIdle,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::HelpRequest => "help_request",
            AuditAction::AdminJoin => "admin_join",
            AuditAction::AdminLeave => "admin_leave",
            AuditAction::End => "end",
            AuditAction::EndedIdle => "ended_idle",
        }
    }

    pub fn parse(s: &str) -> Option<AuditAction> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: String,
    pub created_at: Millis,
    pub last_activity: Millis,
    pub state: SessionState,
    pub message_count: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub ended_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MessageRecord {
    pub session_id: String,
    pub message_id: String,
    /// Position in the session, allocated by the owning core.
    pub seq: u64,
    pub role: Role,
    /// The author: the user, the admin, or empty for the assistant.
    pub author: String,
    /// The client's `id` for user messages (idempotent resend), unique per user.
    pub client_id: Option<String>,
    pub sealed: Sealed,
    pub created_at: Millis,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cancelled: bool,
    /// The uploaded file the message carries (`file_message`), if any.
    pub file: Option<FileRef>,
    /// What else the user sent with it (`file_url`, `metadata`, as JSON), sealed
    /// like the content, with its key and format: nonce, then ciphertext
    /// ([`MessageRecord::extra_sealed`]).
    #[serde(with = "serde_bytes")]
    pub extra: Option<Vec<u8>>,
}

/// Appended to a message's id in the place its extras are sealed for, so that
/// content and extras cannot stand in for each other (server-made ids have no `#`).
pub const EXTRA_PLACE_SUFFIX: &str = "#extra";

impl MessageRecord {
    /// The message's extras as the key ring opens them; `None` without any, or
    /// when the stored bytes are too short to be sealed (which fails to open).
    pub fn extra_sealed(&self) -> Option<Sealed> {
        let blob = self.extra.as_deref()?;
        let (nonce, ciphertext) = blob.split_at_checked(crate::crypto::NONCE_BYTES)?;
        Some(Sealed {
            key_id: self.sealed.key_id,
            nonce: nonce.try_into().ok()?,
            ciphertext: ciphertext.to_vec(),
            version: self.sealed.version,
        })
    }

    /// Where the message sits, as its sealing binds it: a row whose ids, role,
    /// author or seq were changed no longer opens.
    pub fn place(&self) -> crate::crypto::Place<'_> {
        crate::crypto::Place {
            session_id: &self.session_id,
            message_id: &self.message_id,
            role: self.role.as_str(),
            author: &self.author,
            seq: self.seq,
        }
    }
}

/// One change. A call's changes commit together or not at all. Serializable:
/// a core's journal holds them ([`journal`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum WriteOp {
    /// Creates the session if it does not exist yet.
    CreateSession(SessionRecord),
    /// Appends a message and adds it to the session's counters and last activity.
    /// A user message whose (user, client id) is already stored is not added again.
    AppendMessage {
        user_id: String,
        message: MessageRecord,
    },
    /// Moves the session to `state` and records who did it, how and when in the
    /// session's audit trail.
    SetState {
        session_id: String,
        state: SessionState,
        actor: String,
        action: AuditAction,
        at: Millis,
    },
    /// Ends the session for idleness, only if it has not ended yet and saw no
    /// activity since `idle_before`; the audit trail gets `ended_idle` (by the
    /// empty actor, the server) only when it did end. Conditional, so a sweep
    /// that raced a new message or an admin's end changes nothing.
    EndIdle {
        session_id: String,
        idle_before: Millis,
        at: Millis,
    },
    /// Deletes everything stored for a user (sessions, messages, audit trail,
    /// the records of their files).
    DeleteUser { user_id: String },
    /// Deletes a session only while it holds no message: the one a resent message
    /// would have opened, when the store found the message already stored elsewhere.
    DropEmptySession { session_id: String },
    /// Records an uploaded file (its bytes are already in the file store).
    PutFile(FileRecord),
    /// Replaces a stored message's content (a voice message's transcript),
    /// sealed again at the message's own place. A message that is not stored
    /// (deleted with its user meanwhile) changes nothing.
    SetContent {
        session_id: String,
        message_id: String,
        sealed: Sealed,
    },
    /// Queues a notification in the durable outbox.
    Enqueue {
        kind: String,
        payload: String,
        at: Millis,
    },
    /// A notification was delivered.
    Delivered { id: i64, at: Millis },
    /// A delivery attempt failed: retry at `next_at`, or give up (`dead`).
    DeliveryFailed {
        id: i64,
        error: String,
        next_at: Millis,
        dead: bool,
    },
    /// Retention: deletes delivered notifications delivered before
    /// `delivered_before` and dead letters created before `dead_before`; pending
    /// ones are never purged.
    PurgeOutbox {
        delivered_before: Millis,
        dead_before: Millis,
    },
    /// Cluster: takes `user_id`'s lease for `node` when it is free, expired at
    /// `now` or this node's already, until `until`; else the job is refused with
    /// [`StoreError::LeaseHeld`]. A grant to another node than the last holder
    /// increments the epoch; the outcome is [`WriteOutcome::Leased`].
    TakeLease {
        user_id: String,
        node: String,
        now: Millis,
        until: Millis,
    },
    /// Cluster: the job stores nothing unless `node` still holds `user_id`'s lease
    /// at `epoch` ([`StoreError::Fenced`]). It runs in the job's transaction, so a
    /// lease another node takes and this job cannot both commit.
    Fence {
        user_id: String,
        node: String,
        epoch: u64,
    },
    /// Cluster: extends every lease `node` holds to `until`.
    RenewLeases { node: String, until: Millis },
    /// Cluster: lets `node`'s leases go (all of them, or these users'), so that the
    /// next owner takes them at once instead of after they expire.
    ReleaseLeases {
        node: String,
        users: Option<Vec<String>>,
    },
}

/// A queued notification due for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub id: i64,
    pub kind: String,
    pub payload: String,
    /// Attempts made so far.
    pub attempts: u32,
}

/// Sort keys of the admin session list, translated explicitly to columns; an
/// unknown name is an error, never a silent fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    StartTime,
    EndTime,
    MessageCount,
    TotalTokens,
    UserId,
}

impl SortBy {
    pub const NAMES: [&'static str; 5] = [
        "start_time",
        "end_time",
        "message_count",
        "total_tokens",
        "user_id",
    ];

    pub fn parse(name: &str) -> Option<SortBy> {
        Some(match name {
            "start_time" => SortBy::StartTime,
            "end_time" => SortBy::EndTime,
            "message_count" => SortBy::MessageCount,
            "total_tokens" => SortBy::TotalTokens,
            "user_id" => SortBy::UserId,
            _ => return None,
        })
    }
}

impl SortBy {
    /// The value `s` sorts by (a session without an end sorts as ended at 0).
    pub fn key_of(self, s: &SessionRecord) -> CursorKey {
        let int = |n: u64| CursorKey::Int(i64::try_from(n).unwrap_or(i64::MAX));
        match self {
            SortBy::StartTime => CursorKey::Int(s.created_at),
            SortBy::EndTime => CursorKey::Int(s.ended_at.unwrap_or(0)),
            SortBy::MessageCount => int(s.message_count),
            SortBy::TotalTokens => int(s.tokens_in + s.tokens_out),
            SortBy::UserId => CursorKey::Text(s.user_id.clone()),
        }
    }
}

/// A position in a sorted list: the sort key's value and the session id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorKey {
    Int(i64),
    Text(String),
}

#[derive(Debug, Clone)]
pub struct SessionQuery {
    pub user_id: Option<String>,
    pub state: Option<SessionState>,
    /// Sessions started at or after / before this time.
    pub from: Option<Millis>,
    pub to: Option<Millis>,
    pub sort_by: SortBy,
    pub descending: bool,
    pub limit: usize,
    /// Continue after this (key, session id).
    pub after: Option<(CursorKey, String)>,
}

#[derive(Debug, Clone)]
pub struct SessionPage {
    pub sessions: Vec<SessionRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<(CursorKey, String)>,
}

impl SessionPage {
    /// The page of `q` from up to `q.limit + 1` rows read in order: the extra row
    /// only says that another page follows, which starts after this page's last.
    pub fn from_overfetch(mut sessions: Vec<SessionRecord>, q: &SessionQuery) -> SessionPage {
        let next = if sessions.len() > q.limit {
            sessions.truncate(q.limit);
            sessions.last().map(|s| (q.sort_by.key_of(s), s.id.clone()))
        } else {
            None
        };
        SessionPage { sessions, next }
    }
}

/// One entry of a session's audit trail, as stored. Action and state stay the
/// stored strings: a trail written by a newer build may name ones this build
/// does not know, and is shown (and copied, or counted as unknown) as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvent {
    pub at: Millis,
    pub actor: String,
    pub action: String,
    pub state: String,
}

/// Totals over every session started in a time window.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct WindowMetrics {
    pub sessions: u64,
    pub messages: u64,
    pub user_messages: u64,
    pub assistant_messages: u64,
    pub admin_messages: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub takeovers: u64,
    pub help_requests: u64,
    /// Replies (assistant or admin) that followed a user message.
    pub responses: u64,
    pub response_ms_avg: Option<f64>,
    pub response_ms_max: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Done,
    /// The writing node holds the user's lease at this epoch.
    Leased {
        epoch: u64,
    },
    /// The message was a resend; this is where it was stored the first time.
    Duplicate {
        message_id: String,
        session_id: String,
    },
}

pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// A session and its most recent messages, oldest first.
pub type Loaded = (SessionRecord, Vec<MessageRecord>);

pub trait Store: Send + Sync + 'static {
    /// Applies `ops` atomically and durably; resolves after the commit.
    fn write(&self, ops: Vec<WriteOp>) -> StoreFuture<Vec<WriteOutcome>>;
    /// Queues `ops`, which a core's journal holds durably already, to be applied
    /// and committed behind it (`logged.committed` then tells how far); refused
    /// at once when the queue is full. Asked only of a store that gives
    /// [`Store::journal_backing`].
    fn write_logged(&self, logged: journal::Logged, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        let _ = (logged, ops);
        Err(StoreError::Setting("this store keeps no journals".into()))
    }
    /// What a core's journal needs when this store lags behind journals (the
    /// embedded store with `store_commit_interval_ms` above 0); `None`: every
    /// write is durable when it resolves.
    fn journal_backing(&self) -> Result<Option<journal::Backing>, StoreError> {
        Ok(None)
    }
    /// Resolves once every write applied before the call is committed.
    fn commit(&self) -> StoreFuture<()> {
        Box::pin(async { Ok(()) })
    }
    /// Writes waiting for the writer, and how many fit (`store_queue_max`), for
    /// `/metrics`. Test doubles without a queue keep the default (none).
    fn write_queue(&self) -> (usize, usize) {
        (0, 0)
    }
    /// A session with at most `messages_max` of its latest messages.
    fn load_session(&self, id: &str, messages_max: usize) -> StoreFuture<Option<Loaded>>;
    /// Up to `limit` messages of a session after `after_seq`, in order: one page
    /// of a history read in pages (admin transcript and export).
    fn messages_after(
        &self,
        session_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<Vec<MessageRecord>>;
    /// Succeeds when the store can serve requests.
    fn ping(&self) -> StoreFuture<()>;
    /// One page of the admin session list.
    fn list_sessions(&self, query: SessionQuery) -> StoreFuture<SessionPage>;
    /// A session's audit trail, oldest first.
    fn session_events(&self, id: &str) -> StoreFuture<Vec<SessionEvent>>;
    /// Totals over all sessions started in `[from, to)`.
    fn window_metrics(
        &self,
        from: Option<Millis>,
        to: Option<Millis>,
    ) -> StoreFuture<WindowMetrics>;
    /// Every session of a user with all its messages (at most `sessions_max`).
    fn user_sessions(&self, user_id: &str, sessions_max: usize) -> StoreFuture<Vec<Loaded>>;
    /// Pending notifications due at `now`, oldest first.
    fn due_notifications(&self, now: Millis, limit: usize) -> StoreFuture<Vec<Notification>>;
    /// When the next pending notification is due, if any.
    fn next_notification_at(&self) -> StoreFuture<Option<Millis>>;
    /// Sessions not ended whose last activity is before `before`, least recent
    /// first, at most `limit`: (session id, user id). Both backends implement it;
    /// the default (none) serves test doubles that store no sessions.
    fn idle_sessions(&self, before: Millis, limit: usize) -> StoreFuture<Vec<(String, String)>> {
        let _ = (before, limit);
        Box::pin(async { Ok(Vec::new()) })
    }
    /// The record of an uploaded file. Both backends implement it; the default
    /// (none) serves test doubles.
    fn file(&self, file_id: &str) -> StoreFuture<Option<FileRecord>> {
        let _ = file_id;
        Box::pin(async { Ok(None) })
    }
    /// Bytes of every file `owner` uploaded, for the quota.
    fn files_bytes(&self, owner: &str) -> StoreFuture<u64> {
        let _ = owner;
        Box::pin(async { Ok(0) })
    }
    /// The ids of every file `owner` uploaded, to delete their bytes with them.
    fn user_file_ids(&self, owner: &str) -> StoreFuture<Vec<String>> {
        let _ = owner;
        Box::pin(async { Ok(Vec::new()) })
    }
    /// How many notifications are in the outbox in `state` (`pending`,
    /// `delivered`, `dead`): for retention checks and tests. Both backends
    /// implement it; the default (0) serves test doubles.
    fn outbox_count(&self, state: &str) -> StoreFuture<u64> {
        let _ = state;
        Box::pin(async { Ok(0) })
    }
}

/// Which backend to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store in `data_dir`.
    Sqlite,
    /// MongoDB at `mongo_uri`.
    Mongo,
}

impl Backend {
    /// The backend the configuration selects: MongoDB when `mongo_uri` is set.
    pub fn configured(config: &crate::config::Config) -> Backend {
        match config.mongo_uri {
            Some(_) => Backend::Mongo,
            None => Backend::Sqlite,
        }
    }

    pub fn parse(name: &str) -> Option<Backend> {
        match name {
            "sqlite" | "embedded" => Some(Backend::Sqlite),
            "mongo" | "mongodb" => Some(Backend::Mongo),
            _ => None,
        }
    }
}

/// Opens a backend, creating or migrating its schema (SQLite tables, MongoDB
/// indexes) first; idempotent, so it is also `chatbox migrate`.
pub fn open(
    config: &crate::config::Config,
    backend: Backend,
    pool: crate::pool::BlockingPool,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match backend {
        Backend::Sqlite => Arc::new(
            sqlite::SqliteStore::open_with(
                &config.data_dir,
                pool,
                config.sqlite_readers_max,
                config.store_queue_max,
                std::time::Duration::from_millis(config.store_commit_interval_ms),
            )?
            .with_read_wait(std::time::Duration::from_millis(config.store_read_wait_ms)),
        ),
        Backend::Mongo => {
            let settings = mongo::MongoSettings::from_config(config)
                .ok_or_else(|| StoreError::Setting("MongoDB needs CHATBOX_MONGO_URI".into()))?;
            Arc::new(mongo::MongoStore::open(
                &settings,
                pool,
                config.store_queue_max,
            )?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_actions_keep_their_stored_names() {
        let states: Vec<&str> = SessionState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(states, SessionState::NAMES);
        assert_eq!(states, ["ai", "waiting", "human", "ended"]);
        let actions: Vec<&str> = AuditAction::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(
            actions,
            [
                "help_request",
                "admin_join",
                "admin_leave",
                "end",
                "ended_idle"
            ]
        );
        for s in SessionState::ALL {
            assert_eq!(SessionState::parse(s.as_str()), Some(s));
        }
        for a in AuditAction::ALL {
            assert_eq!(AuditAction::parse(a.as_str()), Some(a));
        }
        assert_eq!(SessionState::parse("Waiting"), None);
        assert_eq!(AuditAction::parse("join"), None);
        assert_eq!(SessionState::stored("from-a-newer-build"), SessionState::Ai);
    }
}
