//! The shutdown gate of one core: every task holds a permit, shutdown closes the
//! gate and waits for the permits to come back (or for the deadline).
//!
//! Two steps: `close` starts draining (`/readyz` fails, new requests get 503,
//! running work may finish, but connections are still accepted so that `/healthz`
//! answers); `stop` ends accepting and reading new requests.

use std::cell::Cell;
use std::rc::Rc;

use event_listener::Event;

#[derive(Default)]
pub struct Gate {
    permits: Cell<usize>,
    closing: Cell<bool>,
    stopping: Cell<bool>,
    closed_event: Event,
    stopped_event: Event,
    drained_event: Event,
}

/// Held by a task for as long as it runs; returned on drop, panics included.
pub struct Permit(Rc<Gate>);

impl Drop for Permit {
    fn drop(&mut self) {
        let left = self.0.permits.get() - 1;
        self.0.permits.set(left);
        if left == 0 && self.0.closing.get() {
            self.0.drained_event.notify(usize::MAX);
        }
    }
}

impl Gate {
    pub fn enter(self: &Rc<Self>) -> Permit {
        self.permits.set(self.permits.get() + 1);
        Permit(self.clone())
    }

    pub fn permits(&self) -> usize {
        self.permits.get()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Closes the gate: waiters on [`Gate::closed`] wake up.
    pub fn close(&self) {
        self.closing.set(true);
        self.closed_event.notify(usize::MAX);
        if self.permits.get() == 0 {
            self.drained_event.notify(usize::MAX);
        }
    }

    /// Stops accepting (closing the gate first if needed): waiters on
    /// [`Gate::stopped`] wake up.
    pub fn stop(&self) {
        self.close();
        self.stopping.set(true);
        self.stopped_event.notify(usize::MAX);
    }

    /// Resolves once the gate is stopping: no new connection or request is taken.
    /// Cancel-safe.
    pub async fn stopped(&self) {
        loop {
            if self.stopping.get() {
                return;
            }
            let listener = self.stopped_event.listen();
            if self.stopping.get() {
                return;
            }
            listener.await;
        }
    }

    /// Resolves once the gate is closing. Cancel-safe.
    pub async fn closed(&self) {
        loop {
            if self.closing.get() {
                return;
            }
            let listener = self.closed_event.listen();
            if self.closing.get() {
                return;
            }
            listener.await;
        }
    }

    /// Resolves once the gate is closing and every permit is back. Cancel-safe.
    pub async fn drained(&self) {
        loop {
            if self.closing.get() && self.permits.get() == 0 {
                return;
            }
            let listener = self.drained_event.listen();
            if self.closing.get() && self.permits.get() == 0 {
                return;
            }
            listener.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_waits_for_every_permit() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async {
            let gate = Rc::new(Gate::default());
            let p1 = gate.enter();
            let p2 = gate.enter();
            let g = gate.clone();
            let closed = monoio::spawn(async move { g.closed().await });
            let g = gate.clone();
            let drained = monoio::spawn(async move { g.drained().await });
            gate.close();
            closed.await;
            drop(p1);
            assert_eq!(gate.permits(), 1);
            drop(p2);
            drained.await;
            assert_eq!(gate.permits(), 0);
        });
    }
}
