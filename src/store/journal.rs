//! A core's journal: the writes of one core appended to a file of its own and
//! synced (`fdatasync`) by the core itself through io_uring, so that an ack
//! waits for no other thread.
//!
//! # Why
//!
//! With every write committed by the embedded store before its ack, the commit
//! (WAL frames, checksums, fsync) was half of the store's time and each ack
//! waited for a thread shared by all cores (PERF.md, issue 17). A journaled write
//! is durable once its record is synced here, and its outcome is decided here
//! too (a resent message is found among the messages journaled and not yet
//! committed, else in the database, read on the core); the store applies and
//! commits the jobs in large groups behind the journals, and what it did not
//! commit before a crash is applied from the journals at the next start
//! (`sqlite::group::replay`).
//!
//! # Records
//!
//! `[payload bytes: u32 LE][crc32 of lsn and payload: u32 LE][lsn: u64 LE][payload]`,
//! the payload a job (`Vec<WriteOp>`) as CBOR. Record numbers (lsn) start at 1
//! and grow by one. Reading stops at the first record that is short, fails its
//! checksum or does not follow its predecessor: a write cut short by a crash was
//! never synced, so never acknowledged.
//!
//! # Files
//!
//! `{dir}/{journal}.{segment}.log`, the journal named by the process's start and
//! the core (`00001764582000000-003`), so names sort in the order they were
//! written. A segment past [`SEGMENT_BYTES_MAX`] is closed, and deleted once the
//! store has committed everything in it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{MessageRecord, Op, Store, StoreError, WriteOp, WriteOutcome};

/// The journals' folder under `data_dir`.
pub const DIR: &str = "journal";
/// Bytes after which a segment is closed and the next one begun.
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Bytes waiting for the next flush at most: past it, writes are refused as
/// overload (the disk is not keeping up) rather than held in memory.
const PENDING_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The largest record read back: a job is one message (an answer is at most
/// `answer_bytes_max`) and its session; anything longer is damage.
const RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;
const HEADER_BYTES: usize = 16;

/// A job as read back from a journal.
#[derive(Debug)]
pub struct Record {
    pub lsn: u64,
    pub ops: Vec<WriteOp>,
}

/// Appends record `lsn` holding `ops` to `out`.
pub fn encode(lsn: u64, ops: &[WriteOp], out: &mut Vec<u8>) -> Result<(), StoreError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    ciborium::into_writer(ops, &mut *out).map_err(|e| {
        out.truncate(start);
        StoreError::io(Op::Journal)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })?;
    let payload = out.len() - start - HEADER_BYTES;
    let Ok(len) = u32::try_from(payload) else {
        out.truncate(start);
        return Err(StoreError::io(Op::Journal)(
            std::io::ErrorKind::FileTooLarge.into(),
        ));
    };
    out[start + 8..start + 16].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The records of one segment, in order, up to the first that is not whole and
/// sound; and how many bytes followed them (a torn tail, or zeros).
pub fn decode(bytes: &[u8]) -> (Vec<Record>, usize) {
    let (mut records, mut at, mut last) = (Vec::new(), 0usize, 0u64);
    while let Some(header) = bytes.get(at..at + HEADER_BYTES) {
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (len, crc) = (word(0) as usize, word(4));
        let Some(body) = bytes.get(at + 8..at + HEADER_BYTES + len) else {
            break;
        };
        let lsn = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
        let follows = last == 0 || lsn == last + 1;
        if len > RECORD_BYTES_MAX || crc32fast::hash(body) != crc || lsn == 0 || !follows {
            break;
        }
        let Ok(ops) = ciborium::from_reader::<Vec<WriteOp>, _>(&body[8..]) else {
            break;
        };
        records.push(Record { lsn, ops });
        (last, at) = (lsn, at + HEADER_BYTES + len);
    }
    (records, bytes.len() - at)
}

/// A segment's file name.
fn file_name(journal: &str, segment: u32) -> String {
    format!("{journal}.{segment:06}.log")
}

/// Every segment in `dir`, oldest first: (journal name, path).
pub fn segments(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(Op::Journal)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(StoreError::io(Op::Journal))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some((journal, _segment)) =
            name.strip_suffix(".log").and_then(|n| n.rsplit_once('.'))
        {
            found.push((journal.to_owned(), path.clone()));
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(found)
}

/// Makes the entries of `dir` (files created or removed) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(Op::Journal))
}

/// A job's place in a core's journal (see [`Store::write_logged`]).
#[derive(Debug, Clone)]
pub struct Logged {
    pub journal: Arc<str>,
    pub lsn: u64,
    /// The last record of this journal the store has committed (set by the store).
    pub committed: Arc<AtomicU64>,
}

/// Looks up where a user's message with a client id is stored, on the core
/// itself: one indexed read and no thread in between, because it is on every
/// user message's path and almost always finds nothing.
pub trait Resends {
    /// (message id, session id) of the message `user` sent as `client_id`.
    fn find(&mut self, user: &str, client_id: &str) -> Result<Found, StoreError>;
}

/// Where a message is stored, when it is: (message id, session id).
pub type Found = Option<(String, String)>;

/// What a store that lags behind journals gives each core's journal.
pub struct Backing {
    pub dir: PathBuf,
    pub resends: Box<dyn Resends>,
}

/// A write through a journal, settled on its core.
pub type Write = Pin<Box<dyn Future<Output = Result<Vec<WriteOutcome>, StoreError>>>>;

/// (user, client id) of a user message.
type ClientId = (String, String);
/// Where a journaled message is (message id, session id) and its record.
type Unsettled = (String, String, u64);

/// Client ids journaled and not yet committed, per core, at most: past it the
/// store is not keeping up and writes are refused as overload.
const UNSETTLED_MAX: usize = 64 * 1024;

/// One core's journal (`!Send`: it never leaves its core). It answers its
/// writes itself: each change's outcome is decided here (a resent message is
/// found among the messages journaled and not committed yet, else in the
/// store), and a write resolves once its record is synced; the store applies
/// and commits it behind.
pub struct Journal {
    name: Arc<str>,
    dir: PathBuf,
    store: Arc<dyn Store>,
    committed: Arc<AtomicU64>,
    resends: RefCell<Box<dyn Resends>>,
    /// (user, client id) of user messages journaled and not committed yet:
    /// (message id, session id, record).
    unsettled: RefCell<HashMap<ClientId, Unsettled>>,
    /// The committed record `unsettled` was last pruned at.
    pruned_at: Cell<u64>,
    state: RefCell<State>,
}

struct State {
    file: Rc<monoio::fs::File>,
    segment: u32,
    /// Bytes of the current segment written or being written.
    written: u64,
    next_lsn: u64,
    /// The last record synced.
    synced_lsn: u64,
    /// Records not yet handed to a flush, and who waits for them.
    pending: Vec<u8>,
    waiting: Vec<oneshot::Sender<Result<(), StoreError>>>,
    /// A flush task is running (it takes `pending` until none is left).
    flushing: bool,
    /// The last flush's buffer, kept to take the next group.
    spare: Vec<u8>,
    /// A write or sync failed: the file's state is unknown (a failed fsync may
    /// have dropped dirty pages), so this journal takes nothing more and the
    /// core's writes commit before they resolve, as without journals.
    broken: Option<StoreError>,
}

impl Journal {
    /// Opens a new journal for `core`. Must run on the core's runtime.
    pub fn open(
        backing: Backing,
        core: usize,
        store: Arc<dyn Store>,
    ) -> Result<Rc<Journal>, StoreError> {
        let dir = backing.dir;
        std::fs::create_dir_all(&dir).map_err(StoreError::io(Op::Journal))?;
        let name: Arc<str> = format!("{:017}-{core:03}", crate::clock::now_ms()).into();
        let file = create(&dir, &name, 0)?;
        Ok(Rc::new(Journal {
            name,
            dir,
            store,
            committed: Arc::default(),
            resends: RefCell::new(backing.resends),
            unsettled: RefCell::default(),
            pruned_at: Cell::new(0),
            state: RefCell::new(State {
                file: Rc::new(file),
                segment: 0,
                written: 0,
                next_lsn: 1,
                synced_lsn: 0,
                pending: Vec::new(),
                waiting: Vec::new(),
                flushing: false,
                spare: Vec::new(),
                broken: None,
            }),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes `ops` as one job: decided and appended now, handed to the store;
    /// resolves to the outcomes once the record is synced.
    pub fn write(self: &Rc<Self>, ops: Vec<WriteOp>) -> Write {
        if self.state.borrow().broken.is_some() {
            // Given up (see `flush`): the store commits before it answers.
            return self.store.write(ops);
        }
        let appended = self
            .outcomes(&ops)
            .and_then(|outcomes| Ok((self.append(ops, &outcomes)?, outcomes)));
        Box::pin(async move {
            let (synced, outcomes) = appended?;
            synced.await.map_err(|_| StoreError::Stopped)??;
            Ok(outcomes)
        })
    }

    /// What the store will make of each change, as it would answer it.
    fn outcomes(&self, ops: &[WriteOp]) -> Result<Vec<WriteOutcome>, StoreError> {
        self.prune();
        let outcome = |op: &WriteOp| match op {
            WriteOp::AppendMessage {
                user_id,
                message:
                    MessageRecord {
                        client_id: Some(id),
                        ..
                    },
            } => Ok(match self.stored_as(user_id, id)? {
                Some((message_id, session_id)) => WriteOutcome::Duplicate {
                    message_id,
                    session_id,
                },
                None => WriteOutcome::Done,
            }),
            WriteOp::TakeLease { .. } | WriteOp::Fence { .. } => {
                Ok(WriteOutcome::Leased { epoch: 0 })
            }
            _ => Ok(WriteOutcome::Done),
        };
        ops.iter().map(outcome).collect()
    }

    fn stored_as(
        &self,
        user: &str,
        client_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let key = (user.to_owned(), client_id.to_owned());
        if let Some((message_id, session_id, _)) = self.unsettled.borrow().get(&key) {
            return Ok(Some((message_id.clone(), session_id.clone())));
        }
        self.resends.borrow_mut().find(user, client_id)
    }

    /// Forgets the client ids the store has committed since the last prune: from
    /// now on the store's lookup finds them (it reads after that commit).
    fn prune(&self) {
        let committed = self.committed.load(Ordering::Acquire);
        if committed > self.pruned_at.replace(committed) {
            self.unsettled
                .borrow_mut()
                .retain(|_, (_, _, lsn)| *lsn > committed);
        }
    }

    fn append(
        self: &Rc<Self>,
        ops: Vec<WriteOp>,
        outcomes: &[WriteOutcome],
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let mut s = self.state.borrow_mut();
        if let Some(e) = &s.broken {
            return Err(e.clone());
        }
        if s.pending.len() >= PENDING_BYTES_MAX || self.unsettled.borrow().len() >= UNSETTLED_MAX {
            return Err(StoreError::Overloaded(s.waiting.len()));
        }
        let (lsn, mark) = (s.next_lsn, s.pending.len());
        encode(lsn, &ops, &mut s.pending)?;
        let fresh: Vec<_> = ops
            .iter()
            .zip(outcomes)
            .filter_map(|(op, outcome)| match (op, outcome) {
                (WriteOp::AppendMessage { user_id, message }, WriteOutcome::Done) => {
                    let key = (user_id.clone(), message.client_id.clone()?);
                    Some((
                        key,
                        (message.message_id.clone(), message.session_id.clone(), lsn),
                    ))
                }
                _ => None,
            })
            .collect();
        let logged = Logged {
            journal: self.name.clone(),
            lsn,
            committed: self.committed.clone(),
        };
        // Handed over in record order (the store applies a journal's jobs in it);
        // refused, the record leaves the buffer it has not left yet.
        if let Err(e) = self.store.write_logged(logged, ops) {
            s.pending.truncate(mark);
            return Err(e);
        }
        s.next_lsn += 1;
        self.unsettled.borrow_mut().extend(fresh);
        let (tx, rx) = oneshot::channel();
        s.waiting.push(tx);
        if !s.flushing {
            s.flushing = true;
            monoio::spawn(flush(self.clone()));
        }
        Ok(rx)
    }

    /// Closes a full segment and begins the next; the closed one is deleted once
    /// the store says it committed its last record (each of its jobs was handed
    /// over before this, so a commit asked for now covers them, unless one could
    /// not be stored: then the segment stays for the next start).
    fn rotate_if_full(&self) {
        let mut s = self.state.borrow_mut();
        if s.written < SEGMENT_BYTES_MAX || s.broken.is_some() {
            return;
        }
        let file = match create(&self.dir, &self.name, s.segment + 1) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(journal = %self.name, error = %e, "cannot begin a new journal segment; the current one grows");
                return;
            }
        };
        let closed = self.dir.join(file_name(&self.name, s.segment));
        (s.file, s.segment, s.written) = (Rc::new(file), s.segment + 1, 0);
        let (last, published) = (s.synced_lsn, self.committed.clone());
        let committed = self.store.commit();
        monoio::spawn(async move {
            let covered = |()| match published.load(Ordering::Acquire) >= last {
                true => Ok(()),
                false => Err(StoreError::Stopped),
            };
            match committed.await.and_then(covered) {
                Ok(()) => {
                    if let Err(e) = std::fs::remove_file(&closed) {
                        tracing::warn!(file = %closed.display(), error = %e, "a committed journal segment stays");
                    }
                }
                Err(e) => {
                    tracing::warn!(file = %closed.display(), error = %e, "journal segment kept: the store did not commit (it is replayed at start)")
                }
            }
        });
    }
}

/// A new, empty segment file, its name made durable in the folder.
fn create(dir: &Path, journal: &str, segment: u32) -> Result<monoio::fs::File, StoreError> {
    let path = dir.join(file_name(journal, segment));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(StoreError::io(Op::Journal))?;
    sync_dir(dir)?;
    monoio::fs::File::from_std(file).map_err(StoreError::io(Op::Journal))
}

/// Writes and syncs the pending records a group at a time until none is left:
/// whatever is appended while one group syncs goes in the next.
async fn flush(journal: Rc<Journal>) {
    loop {
        let (file, at, bytes, waiting, last) = {
            let mut s = journal.state.borrow_mut();
            if let Some(e) = s.broken.clone() {
                s.pending.clear();
                s.waiting
                    .drain(..)
                    .for_each(|w| drop(w.send(Err(e.clone()))));
            }
            if s.pending.is_empty() {
                s.flushing = false;
                return;
            }
            let spare = std::mem::take(&mut s.spare);
            let bytes = std::mem::replace(&mut s.pending, spare);
            let last = s.next_lsn - 1;
            let at = s.written;
            s.written += bytes.len() as u64;
            (
                s.file.clone(),
                at,
                bytes,
                std::mem::take(&mut s.waiting),
                last,
            )
        };
        let (wrote, mut bytes) = file.write_all_at(bytes, at).await;
        let synced = match wrote {
            Ok(()) => file.sync_data().await,
            Err(e) => Err(e),
        };
        let synced = synced.map_err(StoreError::io(Op::Journal));
        bytes.clear();
        {
            let mut s = journal.state.borrow_mut();
            if bytes.capacity() <= PENDING_BYTES_MAX {
                s.spare = bytes;
            }
            if synced.is_ok() {
                s.synced_lsn = last;
            }
            if let Err(e) = &synced {
                tracing::error!(journal = %journal.name, error = %e, "journal write failed: this core's writes now commit before their acks");
                s.broken = Some(e.clone());
            }
        }
        for w in waiting {
            let _ = w.send(synced.clone());
        }
        journal.rotate_if_full();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(user: &str) -> Vec<WriteOp> {
        vec![WriteOp::DeleteUser {
            user_id: user.into(),
        }]
    }

    fn user(r: &Record) -> &str {
        match &r.ops[..] {
            [WriteOp::DeleteUser { user_id }] => user_id,
            _ => "",
        }
    }

    fn log(users: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, u) in users.iter().enumerate() {
            encode(i as u64 + 1, &job(u), &mut out).unwrap();
        }
        out
    }

    #[test]
    fn records_read_back_in_order() {
        let bytes = log(&["a", "b", "c"]);
        let (records, rest) = decode(&bytes);
        let users: Vec<&str> = records.iter().map(user).collect();
        assert_eq!(users, ["a", "b", "c"]);
        assert_eq!(records.iter().map(|r| r.lsn).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rest, 0);
    }

    #[test]
    fn a_torn_or_damaged_record_ends_the_log() {
        let bytes = log(&["a", "b", "c"]);
        // Cut in the middle of the last record: a write a crash interrupted.
        let (records, rest) = decode(&bytes[..bytes.len() - 3]);
        assert_eq!(records.len(), 2);
        assert!(rest > 0);
        // A flipped byte in the second record's payload fails its checksum.
        let mut damaged = bytes.clone();
        damaged[log(&["a"]).len() + HEADER_BYTES + 1] ^= 0x40;
        assert_eq!(decode(&damaged).0.len(), 1);
        // Zeros after the records (a preallocated tail) are not records.
        let mut zeros = bytes.clone();
        zeros.extend_from_slice(&[0; 64]);
        let (records, rest) = decode(&zeros);
        assert_eq!((records.len(), rest), (3, 64));
    }

    #[test]
    fn a_record_out_of_sequence_ends_the_log() {
        let mut bytes = log(&["a"]);
        encode(3, &job("c"), &mut bytes).unwrap();
        assert_eq!(decode(&bytes).0.len(), 1, "2 is missing: 3 does not follow");
    }

    #[test]
    fn segments_sort_oldest_first_and_ignore_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "00000000000000002-000.000000.log",
            "00000000000000001-001.000001.log",
            "00000000000000001-001.000000.log",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let found: Vec<String> = segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(j, p)| format!("{j} {}", p.file_name().unwrap().to_str().unwrap()))
            .collect();
        assert_eq!(
            found,
            [
                "00000000000000001-001 00000000000000001-001.000000.log",
                "00000000000000001-001 00000000000000001-001.000001.log",
                "00000000000000002-000 00000000000000002-000.000000.log"
            ]
        );
    }
}
