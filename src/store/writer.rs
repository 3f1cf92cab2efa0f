//! The write queue both backends share (bounded: a job that does not fit is
//! refused at once), and MongoDB's writer over it: group commit, a failing job
//! redone so that it fails alone, and retries while the backend asks for them.
//! The embedded store has a writer of its own (`sqlite::group`) that also takes
//! the jobs the cores' journals hold.
//!
//! Callers [`WriteQueue::submit`] a job (one `Store::write` call) and await its
//! result; a job that does not fit in the queue is refused at once with
//! [`StoreError::Overloaded`], never dropped silently. One task ([`run`]) takes
//! every job waiting (up to [`BATCH_JOBS_MAX`]) and hands them to the backend's
//! [`Commit`] as one batch, so that they share one transaction and one flush. If
//! a job's own changes are refused (a key clash, say), the jobs are redone with
//! [`Commit::commit_each`], where each one commits or fails on its own.
//!
//! How a transaction is made (MongoDB sessions), which
//! failures are worth retrying and for how long is each backend's business.

use std::future::Future;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use super::journal::Logged;
use super::{StoreError, StoreFuture, WriteOp, WriteOutcome};

/// Jobs one batch takes at most; bounds the latency a large batch adds.
pub(super) const BATCH_JOBS_MAX: usize = 256;

/// What one job came to: an outcome per change, or why none of it was stored.
pub(super) type JobResult = Result<Vec<WriteOutcome>, StoreError>;

/// Why a batch did not commit. Either way nothing of it was stored.
#[derive(Debug)]
pub(super) enum Failure {
    /// A job's own changes were refused (a constraint, a malformed change): redone
    /// job by job, the others still commit.
    Refused(StoreError),
    /// The store could not commit at all (unreachable, I/O): the backend's
    /// [`Commit::retry_pause`] decides whether to try again.
    Failed(StoreError),
}

/// What a backend does for the shared writer. The futures may do their work
/// before they are first polled (SQLite is synchronous on its own thread).
pub(super) trait Commit: Send + 'static {
    /// Commits every job in one transaction: all of them, or none (then says why).
    /// On success, one outcome list per job, in order.
    fn commit_batch(
        &mut self,
        jobs: &[&[WriteOp]],
    ) -> impl Future<Output = Result<Vec<Vec<WriteOutcome>>, Failure>> + Send;

    /// Commits the jobs so that each one commits or fails on its own, and pushes
    /// one result per job it settled to `settled`, in order. On `Err`, the jobs
    /// past the last one pushed were not stored; the writer retries or fails them.
    fn commit_each(
        &mut self,
        jobs: &[&[WriteOp]],
        settled: &mut Vec<JobResult>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// After the `tries`-th failure of a batch, `waited` after its first try: how
    /// long to pause before trying again, or `None` to give up and fail the jobs
    /// not settled yet. By default a failure is final.
    fn retry_pause(&self, _error: &StoreError, _tries: u32, _waited: Duration) -> Option<Duration> {
        None
    }

    /// Runs after each batch was answered (housekeeping off the callers' path).
    fn after_batch(&mut self) {}
}

/// One `Store::write` call waiting for the writer.
pub(super) struct Job {
    pub(super) ops: Vec<WriteOp>,
    pub(super) answer: Answer,
}

/// Who hears how a job went.
pub(super) enum Answer {
    /// The caller, once the job is committed (or failed).
    To(oneshot::Sender<JobResult>),
    /// Nobody: a core's journal holds the job ([`WriteQueue::submit_logged`]),
    /// durable there already and answered by it; the backend applies it and
    /// commits it when it will.
    Journaled(Logged),
}

impl Job {
    /// Where a journal holds the job, if one does.
    pub(super) fn logged(&self) -> Option<&Logged> {
        match &self.answer {
            Answer::Journaled(logged) => Some(logged),
            Answer::To(_) => None,
        }
    }
}

/// A job the queue did not take: why.
fn not_queued(e: mpsc::error::TrySendError<Job>, max: usize) -> StoreError {
    match e {
        mpsc::error::TrySendError::Full(_) => StoreError::Overloaded(max),
        mpsc::error::TrySendError::Closed(_) => StoreError::Stopped,
    }
}

/// The sending side: cheap, lock-free, usable from any thread.
pub(super) struct WriteQueue {
    jobs: mpsc::Sender<Job>,
    max: usize,
    wake: Arc<Notify>,
    unsettled: Arc<AtomicUsize>,
}

/// The receiving side, for [`run`] (or a backend's own loop).
pub(super) struct Jobs {
    pub(super) rx: mpsc::Receiver<Job>,
    /// Notified when a job somebody waits for is queued, or journaled jobs fill
    /// a quarter of the queue: a writer that takes jobs only when woken (not on
    /// each one, which would preempt the core that queued it) waits on it.
    pub(super) wake: Arc<Notify>,
    /// Journaled jobs queued or applied and not committed (or failed) yet: the
    /// writer takes off each one it settles.
    pub(super) unsettled: Arc<AtomicUsize>,
}

/// A queue holding at most `max` jobs (at least one).
pub(super) fn queue(max: usize) -> (WriteQueue, Jobs) {
    let max = max.max(1);
    let (jobs, rx) = mpsc::channel(max);
    let wake = Arc::new(Notify::new());
    let unsettled = Arc::new(AtomicUsize::new(0));
    let queue = WriteQueue {
        jobs,
        max,
        wake: wake.clone(),
        unsettled: unsettled.clone(),
    };
    (
        queue,
        Jobs {
            rx,
            wake,
            unsettled,
        },
    )
}

impl WriteQueue {
    /// Journaled jobs not committed yet: a read must ask for a commit first.
    pub(super) fn unsettled(&self) -> usize {
        self.unsettled.load(Ordering::SeqCst)
    }

    /// (jobs waiting, capacity). A job the writer took off the queue no longer
    /// counts, even while its batch commits.
    pub(super) fn depth(&self) -> (usize, usize) {
        let max = self.jobs.max_capacity();
        (max - self.jobs.capacity(), max)
    }

    /// Queues `ops` as one job; resolves once it is committed (or failed). A full
    /// queue refuses it now, with `Overloaded`.
    pub(super) fn submit(&self, ops: Vec<WriteOp>) -> StoreFuture<Vec<WriteOutcome>> {
        let (reply, rx) = oneshot::channel();
        let answer = Answer::To(reply);
        let sent = self.jobs.try_send(Job { ops, answer });
        self.wake.notify_one();
        let sent = sent.map_err(|e| not_queued(e, self.max));
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::Stopped)?
        })
    }

    /// Queues `ops`, which a journal holds already: nobody waits for them (the
    /// journal answers for them); refused now, with `Overloaded`, when the queue
    /// is full.
    pub(super) fn submit_logged(
        &self,
        logged: Logged,
        ops: Vec<WriteOp>,
    ) -> Result<(), StoreError> {
        let answer = Answer::Journaled(logged);
        // Counted before it is queued, so that no read slips between.
        self.unsettled.fetch_add(1, Ordering::SeqCst);
        self.jobs.try_send(Job { ops, answer }).map_err(|e| {
            self.unsettled.fetch_sub(1, Ordering::SeqCst);
            not_queued(e, self.max)
        })?;
        if self.depth().0 >= self.max / 4 {
            self.wake.notify_one();
        }
        Ok(())
    }
}

/// Commits jobs until every [`WriteQueue`] is dropped and the queue is empty.
pub(super) async fn run<C: Commit>(mut backend: C, mut jobs: Jobs) {
    let mut batch = Vec::with_capacity(BATCH_JOBS_MAX);
    while jobs.rx.recv_many(&mut batch, BATCH_JOBS_MAX).await > 0 {
        tracing::trace!(jobs = batch.len(), "write batch");
        let ops: Vec<&[WriteOp]> = batch.iter().map(|j: &Job| j.ops.as_slice()).collect();
        let results = settle(&mut backend, &ops).await;
        debug_assert_eq!(results.len(), batch.len(), "one result per job");
        for (job, result) in batch.drain(..).zip(results) {
            // The caller may have stopped waiting; its write stands anyway.
            // (MongoDB keeps no journals: every job here has a caller.)
            if let Answer::To(reply) = job.answer {
                let _ = reply.send(result);
            }
        }
        backend.after_batch();
    }
    tracing::debug!("storage writer stopped");
}

/// One result per job: the batch in one transaction if it commits; else job by
/// job, each failing alone. A failure of the store itself is retried while the
/// backend says so, for the jobs not settled yet only (a job committed on its
/// own before the store went away is never applied twice).
pub(super) async fn settle<C: Commit>(backend: &mut C, jobs: &[&[WriteOp]]) -> Vec<JobResult> {
    let started = Instant::now();
    let mut settled: Vec<JobResult> = Vec::with_capacity(jobs.len());
    let (mut one_by_one, mut tries) = (false, 0u32);
    loop {
        let error = if one_by_one {
            match backend
                .commit_each(&jobs[settled.len()..], &mut settled)
                .await
            {
                Ok(()) => return settled,
                Err(e) => e,
            }
        } else {
            match backend.commit_batch(jobs).await {
                Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
                Err(Failure::Refused(e)) => {
                    tracing::debug!(error = %e, jobs = jobs.len(), "a job failed; redoing the batch job by job");
                    one_by_one = true;
                    continue;
                }
                Err(Failure::Failed(e)) => e,
            }
        };
        tries += 1;
        let left = jobs.len() - settled.len();
        match backend.retry_pause(&error, tries, started.elapsed()) {
            Some(pause) => {
                tracing::warn!(error = %error, jobs = left, retry_in_ms = pause.as_millis() as u64, "storage write failed; retrying");
                tokio::time::sleep(pause).await;
            }
            None => {
                tracing::error!(error = %error, jobs = left, "storage write failed");
                settled.resize(jobs.len(), Err(error));
                return settled;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Op;

    /// A backend that refuses jobs whose first change is `DeleteUser` for user
    /// "bad", fails (store away) the first `fail` batches, and fails once in a
    /// redo when `each_fails_at` jobs are settled.
    #[derive(Default)]
    struct Fake {
        fail: u32,
        each_fails_at: Option<usize>,
        retries: bool,
        batches: usize,
        committed: Vec<String>,
    }

    fn name(ops: &[WriteOp]) -> &str {
        match ops.first() {
            Some(WriteOp::DeleteUser { user_id }) => user_id,
            _ => "",
        }
    }

    fn away() -> StoreError {
        StoreError::io(Op::Transaction)(std::io::ErrorKind::ConnectionRefused.into())
    }

    fn refused() -> StoreError {
        StoreError::io(Op::DeleteUser)(std::io::ErrorKind::InvalidData.into())
    }

    impl Commit for Fake {
        fn commit_batch(
            &mut self,
            jobs: &[&[WriteOp]],
        ) -> impl Future<Output = Result<Vec<Vec<WriteOutcome>>, Failure>> + Send {
            self.batches += 1;
            let r = if self.fail > 0 {
                self.fail -= 1;
                Err(Failure::Failed(away()))
            } else if jobs.iter().any(|j| name(j) == "bad") {
                Err(Failure::Refused(refused()))
            } else {
                self.committed
                    .extend(jobs.iter().map(|j| name(j).to_owned()));
                Ok(jobs
                    .iter()
                    .map(|j| vec![WriteOutcome::Done; j.len()])
                    .collect())
            };
            std::future::ready(r)
        }

        fn commit_each(
            &mut self,
            jobs: &[&[WriteOp]],
            settled: &mut Vec<JobResult>,
        ) -> impl Future<Output = Result<(), StoreError>> + Send {
            let mut r = Ok(());
            for job in jobs {
                if self.each_fails_at == Some(settled.len()) {
                    self.each_fails_at = None;
                    r = Err(away());
                    break;
                }
                if name(job) == "bad" {
                    settled.push(Err(refused()));
                } else {
                    self.committed.push(name(job).to_owned());
                    settled.push(Ok(vec![WriteOutcome::Done; job.len()]));
                }
            }
            std::future::ready(r)
        }

        fn retry_pause(&self, _: &StoreError, tries: u32, _: Duration) -> Option<Duration> {
            (self.retries && tries < 5).then_some(Duration::ZERO)
        }
    }

    fn job(user: &str) -> Vec<WriteOp> {
        vec![WriteOp::DeleteUser {
            user_id: user.into(),
        }]
    }

    fn block<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn settle_all(fake: &mut Fake, users: &[&str]) -> Vec<JobResult> {
        let jobs: Vec<Vec<WriteOp>> = users.iter().map(|u| job(u)).collect();
        let refs: Vec<&[WriteOp]> = jobs.iter().map(Vec::as_slice).collect();
        block(settle(fake, &refs))
    }

    #[test]
    fn a_batch_commits_together() {
        let mut fake = Fake::default();
        let r = settle_all(&mut fake, &["a", "b"]);
        assert!(r.iter().all(Result::is_ok));
        assert_eq!((fake.batches, fake.committed.len()), (1, 2));
    }

    #[test]
    fn a_refused_job_fails_alone() {
        let mut fake = Fake::default();
        let r = settle_all(&mut fake, &["a", "bad", "c"]);
        assert!(r[0].is_ok() && r[1].is_err() && r[2].is_ok(), "{r:?}");
        assert_eq!(fake.committed, ["a", "c"]);
    }

    #[test]
    fn without_retries_a_failed_store_fails_every_job() {
        let mut fake = Fake {
            fail: 1,
            ..Fake::default()
        };
        let r = settle_all(&mut fake, &["a", "b"]);
        assert!(
            r.iter().all(|r| matches!(r, Err(StoreError::Io { .. }))),
            "{r:?}"
        );
        assert!(fake.committed.is_empty());
    }

    #[test]
    fn retries_resume_after_the_jobs_already_settled() {
        // The batch is refused, then the store goes away mid-redo: "a" and "bad"
        // are settled, so only "c" is tried again.
        let mut fake = Fake {
            retries: true,
            each_fails_at: Some(2),
            ..Fake::default()
        };
        let r = settle_all(&mut fake, &["a", "bad", "c"]);
        assert!(r[0].is_ok() && r[1].is_err() && r[2].is_ok(), "{r:?}");
        assert_eq!(fake.committed, ["a", "c"], "each once");
        assert_eq!(fake.batches, 1, "the retry went on job by job");
    }

    #[test]
    fn a_failed_batch_is_retried_while_the_backend_asks() {
        let mut fake = Fake {
            retries: true,
            fail: 2,
            ..Fake::default()
        };
        let r = settle_all(&mut fake, &["a", "b"]);
        assert!(r.iter().all(Result::is_ok), "{r:?}");
        assert_eq!((fake.batches, fake.committed.len()), (3, 2));
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_gone_writer_is_stopped() {
        let (queue, jobs) = queue(1);
        let first = queue.submit(job("a"));
        let second = block(queue.submit(job("b")));
        assert!(
            matches!(second, Err(StoreError::Overloaded(1))),
            "{second:?}"
        );
        drop(jobs);
        assert!(matches!(block(first), Err(StoreError::Stopped)));
        assert!(matches!(
            block(queue.submit(job("c"))),
            Err(StoreError::Stopped)
        ));
    }

    #[test]
    fn the_writer_answers_every_job_and_stops_with_its_queue() {
        let (queue, jobs) = queue(8);
        let waiting: Vec<_> = ["a", "bad", "c"]
            .iter()
            .map(|u| queue.submit(job(u)))
            .collect();
        drop(queue);
        let results = block(async move {
            run(Fake::default(), jobs).await;
            let mut out = Vec::new();
            for w in waiting {
                out.push(w.await);
            }
            out
        });
        assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
    }
}
