//! The blocking pool: a small tokio runtime on its own threads for storage and
//! outbound HTTP, reached from the cores through a typed, bounded request/reply bridge.
//!
//! Cores never block: they hand a future to the pool and await a oneshot reply.
//! The number of requests queued or running is capped, so a slow database turns
//! into a clear `Overloaded` error at the caller instead of unbounded memory.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("blocking pool is overloaded ({0} requests in flight)")]
    Overloaded(usize),
    #[error("blocking pool dropped the request (shutting down or the task panicked)")]
    Dropped,
}

/// Cheap to clone; every core holds one.
#[derive(Clone)]
pub struct BlockingPool {
    handle: tokio::runtime::Handle,
    in_flight: Arc<AtomicUsize>,
    in_flight_max: usize,
}

/// Owns the runtime; dropping it stops the pool's threads.
pub struct PoolRuntime {
    runtime: tokio::runtime::Runtime,
}

impl PoolRuntime {
    pub fn start(
        threads: usize,
        in_flight_max: usize,
    ) -> std::io::Result<(PoolRuntime, BlockingPool)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("chatbox-pool")
            // Time for timeouts and retries, I/O for outbound HTTP (reqwest).
            .enable_all()
            .build()?;
        let pool = BlockingPool {
            handle: runtime.handle().clone(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            in_flight_max,
        };
        Ok((PoolRuntime { runtime }, pool))
    }

    /// Stops the pool without waiting (for use from `Drop`).
    pub fn shutdown_background(self) {
        self.runtime.shutdown_background();
    }

    /// Stops the pool, waiting at most `deadline` for running tasks.
    pub fn shutdown(self, deadline: std::time::Duration) {
        self.runtime.shutdown_timeout(deadline);
    }
}

/// Decrements the in-flight count however the task ends (done, panicked, dropped).
struct InFlight(Arc<AtomicUsize>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BlockingPool {
    /// Runs `work` on the pool and returns its output to the calling core.
    /// Admission (the bound) is decided now, when `call` is made; dropping the
    /// returned future does not cancel `work` once it was spawned.
    pub fn call<F, T>(&self, work: F) -> impl Future<Output = Result<T, PoolError>> + 'static
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let admitted = self.admit();
        let handle = self.handle.clone();
        async move {
            let guard = admitted?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            handle.spawn(async move {
                let out = work.await;
                // Released before the reply, so a caller that has its answer is no
                // longer counted against the bound.
                drop(guard);
                let _ = tx.send(out);
            });
            rx.await.map_err(|_| PoolError::Dropped)
        }
    }

    fn admit(&self) -> Result<InFlight, PoolError> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.in_flight.clone());
        if before >= self.in_flight_max {
            return Err(PoolError::Overloaded(before));
        }
        Ok(guard)
    }

    /// Spawns a long-running task (a provider stream) under the same bound; the
    /// handle aborts it from any thread.
    pub fn spawn<F>(&self, work: F) -> Result<tokio::task::AbortHandle, PoolError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let guard = self.admit()?;
        let task = self.handle.spawn(async move {
            let _guard = guard;
            work.await
        });
        Ok(task.abort_handle())
    }

    /// Runs `work` on the pool's runtime and blocks this thread until it is done
    /// (start-up, command-line tools; also from inside another runtime, as tests
    /// start servers). Never call it from a core.
    pub fn block_on<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, PoolError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv().map_err(|_| PoolError::Dropped)
    }

    /// The pool's runtime, for long-lived clients that spawn their own tasks (the
    /// bus); they are not counted against the bound.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    /// Enters the pool's runtime, for building clients that must be created in it.
    pub fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.handle.enter()
    }

    /// A round trip through the pool: proves its threads are alive and not saturated.
    pub async fn ping(&self) -> Result<(), PoolError> {
        self.call(async {}).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_reach_a_monoio_core_and_the_bound_holds() {
        let (rt, pool) = PoolRuntime::start(1, 2).unwrap();
        let mut core = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        core.block_on(async {
            assert_eq!(pool.call(async { 40 + 2 }).await, Ok(42));
            // Two requests parked on the pool fill it; the third is refused at once.
            let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
            let park = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|open| *open).await;
            };
            let a = pool.call(park(gate_rx.clone()));
            let b = pool.call(park(gate_rx.clone()));
            // Admission happens when `call` is made, not when the future is polled.
            assert_eq!(pool.in_flight.load(Ordering::Acquire), 2);
            let a = monoio::spawn(a);
            let b = monoio::spawn(b);
            assert_eq!(pool.ping().await, Err(PoolError::Overloaded(2)));
            gate_tx.send(true).unwrap();
            assert_eq!(a.await, Ok(()));
            assert_eq!(b.await, Ok(()));
            assert_eq!(pool.ping().await, Ok(()));
        });
        rt.shutdown(std::time::Duration::from_secs(1));
    }
}
