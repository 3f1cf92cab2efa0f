//! The embedded store's writer: applies each job as it comes inside one open
//! transaction and commits in groups; a job a core's journal holds was answered
//! by the journal, any other is answered once committed.
//!
//! Why: committing each batch of waiting jobs (79 on average under the chat load)
//! made the commit (WAL frames and their checksums, fsync) half of this thread's
//! time, and every ack waited for it (PERF.md, issue 17). A journaled job is
//! durable before it gets here, so the database may lag behind by up to
//! `store_commit_interval_ms` and commits far fewer, larger groups. Reads ask
//! for a commit first while anything applied is not committed, so they never see
//! less than was acknowledged. Each commit records, per journal, the last record
//! it holds (`journal_applied`): [`replay`] applies the rest at start.
//!
//! No savepoints on the way: a job that fails rolls the whole open transaction
//! back, and the jobs before it are applied again (same state, same outcomes),
//! each in a savepoint then; jobs almost never fail, and a savepoint per job
//! copies every page it touches.
//!
//! A journaled job that fails for a reason that may pass (I/O, a full disk) is
//! not stored now, and its journal is "stuck": commits stop recording how far
//! they got in it, so the next start applies its records again from there
//! (applying one twice changes nothing but an audit entry: messages are keyed
//! by id, sessions created only when missing).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tokio::sync::{mpsc, oneshot};

use super::write::{apply_job, exec, rollback, run};
use crate::store::journal::{self, Logged};
use crate::store::writer::{Answer, Job, JobResult, Jobs};
use crate::store::{Op, StoreError, WriteOp};

/// Jobs one transaction holds at most before it commits (bounds the memory kept
/// to apply them again, and a commit's size).
const GROUP_JOBS_MAX: usize = 8192;

pub(super) struct Writer {
    conn: Connection,
    /// Set by the checkpointer when the WAL is long (see `checkpoint_loop`).
    wal_big: Arc<AtomicBool>,
    /// Journaled jobs queued or applied and not committed: this writer takes off
    /// each one it settles (reads ask for a commit while any is left).
    unsettled: Arc<AtomicUsize>,
    /// How long an applied job may wait for its commit.
    interval: Duration,
    open: Option<Group>,
    /// The last commit failed: new jobs are refused once the group is full.
    failing: bool,
    /// Journals with a job that was not stored for a reason that may pass (I/O,
    /// a full disk): the commits no longer say how far they got in them, so the
    /// next start applies their records from that job on (and a segment of
    /// theirs is never deleted).
    stuck: HashSet<Arc<str>>,
}

/// A job applied in the open transaction, kept to apply it again should the
/// transaction roll back; `logged` for a journaled one.
struct Applied {
    ops: Vec<WriteOp>,
    logged: Option<Logged>,
}

/// The open transaction.
struct Group {
    began: Instant,
    applied: Vec<Applied>,
    /// Answers that wait for the commit.
    waiting: Vec<(oneshot::Sender<JobResult>, JobResult)>,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        wal_big: Arc<AtomicBool>,
        unsettled: Arc<AtomicUsize>,
        interval: Duration,
    ) -> Writer {
        Writer {
            conn,
            wal_big,
            unsettled,
            interval,
            open: None,
            failing: false,
            stuck: HashSet::new(),
        }
    }

    /// Applies jobs until every sender is gone, then commits what is left. It
    /// takes them when woken (a job somebody waits for, or the queue a quarter
    /// full) or when the open group is due, not on each journaled job: a wake-up
    /// per job preempted the core that queued it, a fifth of the core's time.
    pub(super) async fn run(mut self, mut jobs: Jobs) {
        loop {
            let closed = loop {
                match jobs.rx.try_recv() {
                    Ok(job) => {
                        self.take(job);
                        // Also mid-drain: jobs may come as fast as they go.
                        if self.due() {
                            self.commit();
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break false,
                    Err(mpsc::error::TryRecvError::Disconnected) => break true,
                }
            };
            if closed {
                break;
            }
            let woken = jobs.wake.notified();
            if self.interval.is_zero() {
                // No journals: every job is waited for, and wakes this writer.
                woken.await;
            } else {
                // Journaled jobs wake nobody below the quarter mark: look at
                // least every interval.
                let due = self.open.as_ref().map_or(Instant::now(), |g| g.began) + self.interval;
                let _ = tokio::time::timeout_at(due.into(), woken).await;
            }
            if self.due() {
                self.commit();
            }
        }
        self.commit();
        tracing::debug!("storage writer stopped");
    }

    /// A commit is due: someone waits for it, the group is full, or its oldest
    /// job has waited `interval`.
    fn due(&self) -> bool {
        self.open.as_ref().is_some_and(|g| {
            !self.failing && (!g.waiting.is_empty() || g.applied.len() >= GROUP_JOBS_MAX)
                || g.began.elapsed() >= self.interval
        })
    }

    fn take(&mut self, job: Job) {
        let full = self.failing
            && self
                .open
                .as_ref()
                .is_some_and(|g| g.applied.len() >= GROUP_JOBS_MAX);
        let begun = match full {
            true => Err(StoreError::Overloaded(GROUP_JOBS_MAX)),
            false => self.begin(),
        };
        if let Err(e) = begun {
            return self.failed(job, e);
        }
        let Some(group) = self.open.as_mut() else {
            return;
        };
        match apply_job(&self.conn, &job.ops) {
            Ok(outcomes) => {
                let logged = match job.answer {
                    Answer::To(reply) => {
                        group.waiting.push((reply, Ok(outcomes)));
                        None
                    }
                    // The journal answered it already.
                    Answer::Journaled(logged) => Some(logged),
                };
                group.applied.push(Applied {
                    ops: job.ops,
                    logged,
                });
            }
            Err(e) => {
                // Its changes go with the transaction; the jobs before it stay.
                self.restart(|_| true);
                self.failed(job, e);
            }
        }
    }

    /// A job that was not stored, told so if anyone waits for it.
    fn failed(&mut self, job: Job, e: StoreError) {
        self.not_stored(job.logged(), &e);
        if let Answer::To(reply) = job.answer {
            let _ = reply.send(Err(e));
        }
    }

    /// A job was not stored. A journaled one was answered already: when it was
    /// refused (a change to a session deleted meanwhile: the deletion wins) it
    /// would be refused again; any other failure sticks its journal.
    fn not_stored(&mut self, logged: Option<&Logged>, e: &StoreError) {
        let Some(l) = logged else {
            tracing::debug!(error = %e, "a job failed alone");
            return;
        };
        self.unsettled.fetch_sub(1, Ordering::SeqCst);
        if e.is_refusal() {
            tracing::warn!(journal = %l.journal, lsn = l.lsn, error = %e, "a journaled job was refused; not stored");
        } else {
            tracing::error!(journal = %l.journal, lsn = l.lsn, error = %e, "a journaled job could not be stored; the next start applies it from the journal");
            self.stuck.insert(l.journal.clone());
        }
    }

    fn begin(&mut self) -> Result<(), StoreError> {
        if self.open.is_none() {
            run(&self.conn, "BEGIN IMMEDIATE")?;
            self.open = Some(Group {
                began: Instant::now(),
                applied: Vec::new(),
                waiting: Vec::new(),
            });
        }
        Ok(())
    }

    /// Rolls the open transaction back and applies the jobs `keep` keeps again
    /// in a new one (the same changes on the same state), each in a savepoint:
    /// one that fails now is taken out whole.
    fn restart(&mut self, keep: impl Fn(&Applied) -> bool) {
        rollback(&self.conn);
        let Some(mut group) = self.open.take() else {
            return;
        };
        group.applied.retain(keep);
        if let Err(e) = run(&self.conn, "BEGIN IMMEDIATE") {
            self.lost(group, &e);
            return;
        }
        let mut kept = Vec::with_capacity(group.applied.len());
        for job in std::mem::take(&mut group.applied) {
            match apply_saved(&self.conn, &job.ops) {
                Ok(()) => kept.push(job),
                Err(e) => self.not_stored(job.logged.as_ref(), &e),
            }
        }
        group.applied = kept;
        self.open = Some(group);
    }

    /// Commits the open group: its waiting answers go out, and each journal's
    /// last record in it is recorded and published. A failed commit fails the
    /// jobs waiting for it; the journaled ones are applied again, for the next try.
    fn commit(&mut self) {
        let Some(group) = self.open.as_mut() else {
            return;
        };
        let lsns = last_records(&group.applied, &self.stuck);
        let last = lsns.iter().map(|(journal, (lsn, _))| (&**journal, *lsn));
        let committed = record_lsns(&self.conn, last).and_then(|()| run(&self.conn, "COMMIT"));
        match committed {
            Ok(()) => {
                let Some(group) = self.open.take() else {
                    return;
                };
                self.failing = false;
                self.settled(&group);
                for (lsn, committed) in lsns.values() {
                    committed.fetch_max(*lsn, Ordering::Release);
                }
                for (reply, result) in group.waiting {
                    let _ = reply.send(result);
                }
                self.after_commit();
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = group.applied.len(), "storage commit failed; journaled jobs wait for the next");
                for (reply, _) in group.waiting.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
                group.began = Instant::now();
                self.failing = true;
                self.restart(|job| job.logged.is_some());
                if self.open.as_ref().is_some_and(|g| g.applied.is_empty()) {
                    rollback(&self.conn);
                    self.open = None;
                }
            }
        }
    }

    /// The transaction could not even begin again: what the group held is only
    /// in the journals now, applied at the next start.
    fn lost(&mut self, group: Group, e: &StoreError) {
        tracing::error!(error = %e, jobs = group.applied.len(), "storage cannot begin a transaction; journaled jobs are applied at the next start");
        for job in &group.applied {
            self.not_stored(job.logged.as_ref(), e);
        }
        for (reply, _) in group.waiting {
            let _ = reply.send(Err(e.clone()));
        }
    }

    /// The group's journaled jobs are no longer waiting for a commit.
    fn settled(&self, group: &Group) {
        let logged = group
            .applied
            .iter()
            .filter(|job| job.logged.is_some())
            .count();
        self.unsettled.fetch_sub(logged, Ordering::SeqCst);
    }

    fn after_commit(&mut self) {
        if self.wal_big.swap(false, Ordering::Relaxed) {
            // Copies only what the checkpointer has not (it did the rest); busy
            // (the checkpointer is at it) just means the next signal retries.
            let _ = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
    }
}

/// The last record of each journal among `applied` (jobs are applied in record
/// order), but for stuck journals; and where to publish it.
fn last_records(
    applied: &[Applied],
    stuck: &HashSet<Arc<str>>,
) -> HashMap<Arc<str>, (u64, Arc<AtomicU64>)> {
    let mut last = HashMap::new();
    for l in applied.iter().filter_map(|job| job.logged.as_ref()) {
        if !stuck.contains(&l.journal) {
            last.insert(l.journal.clone(), (l.lsn, l.committed.clone()));
        }
    }
    last
}

/// Applies one job in a savepoint: all of it, or (failing) nothing.
fn apply_saved(conn: &Connection, ops: &[WriteOp]) -> Result<(), StoreError> {
    run(conn, "SAVEPOINT job")?;
    let applied = apply_job(conn, ops);
    if applied.is_err() {
        run(conn, "ROLLBACK TO job")?;
    }
    run(conn, "RELEASE job")?;
    applied.map(|_| ())
}

/// Records, in the open transaction, the last record of each journal it holds.
fn record_lsns<'a>(
    conn: &Connection,
    lsns: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), StoreError> {
    for (journal, lsn) in lsns {
        exec(
            conn,
            "INSERT INTO journal_applied (journal, lsn) VALUES (?1, ?2)
             ON CONFLICT(journal) DO UPDATE SET lsn = max(lsn, excluded.lsn)",
            params![journal, lsn as i64],
        )
        .map_err(StoreError::sqlite(Op::Journal))?;
    }
    Ok(())
}

/// Applies what the journals in `dir` hold and the database does not (it
/// stopped before committing them), then deletes the journals: one transaction
/// per segment, each job in a savepoint so that one that fails (as it failed
/// when it was first applied) is skipped alone. Runs at open, before any writer.
/// Journals go one after another, oldest start first: within one start, two
/// journals never hold changes to one session (a user's writes all go through
/// the journal of the core that owns the user).
pub(super) fn replay(conn: &Connection, dir: &Path) -> Result<usize, StoreError> {
    let segments = journal::segments(dir)?;
    let mut applied = 0;
    for (name, path) in &segments {
        let bytes = std::fs::read(path).map_err(StoreError::io(Op::Journal))?;
        let (records, rest) = journal::decode(&bytes);
        if rest > 0 {
            tracing::info!(file = %path.display(), bytes = rest, "journal ends in a record never synced (or zeros); ignored");
        }
        let done: i64 = conn
            .query_row(
                "SELECT coalesce(max(lsn), 0) FROM journal_applied WHERE journal = ?1",
                params![name],
                |r| r.get(0),
            )
            .map_err(StoreError::sqlite(Op::Journal))?;
        let todo: Vec<_> = records.iter().filter(|r| r.lsn as i64 > done).collect();
        let Some(last) = todo.last().map(|r| r.lsn) else {
            continue;
        };
        run(conn, "BEGIN IMMEDIATE")?;
        for record in &todo {
            if let Err(e) = apply_saved(conn, &record.ops) {
                tracing::warn!(journal = %name, lsn = record.lsn, error = %e, "a journaled job fails again; skipped");
            }
        }
        let committed =
            record_lsns(conn, [(name.as_str(), last)]).and_then(|()| run(conn, "COMMIT"));
        if let Err(e) = committed {
            rollback(conn);
            return Err(e);
        }
        applied += todo.len();
    }
    for (_, path) in &segments {
        std::fs::remove_file(path).map_err(StoreError::io(Op::Journal))?;
    }
    if !segments.is_empty() {
        journal::sync_dir(dir)?;
        tracing::info!(
            jobs = applied,
            segments = segments.len(),
            "journals replayed"
        );
    }
    // Rows of journals whose files are gone name nothing any more.
    exec(conn, "DELETE FROM journal_applied", []).map_err(StoreError::sqlite(Op::Journal))?;
    Ok(applied)
}
