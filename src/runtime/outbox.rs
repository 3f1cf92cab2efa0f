//! A connection's bounded inbox of frames queued by other tasks of its core, and its
//! keep-alive state, which the core's sweep reads (no timer per connection).
//!
//! Pushing never blocks and never panics, even when the connection has just gone
//! away: a full outbox marks the connection as a slow consumer (it gets closed with
//! 1013), a closed one reports `Closed` to the sender.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

/// Close code: the connection's token expired and was not refreshed.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;
/// Close code: an admin disconnected the user (or deleted their data).
pub const CLOSE_DISCONNECTED: u16 = 4003;

/// What other tasks ask a connection to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Send this text frame.
    Text(Arc<str>),
    /// The server is shutting down: close with 1001.
    Shutdown,
    /// Close with this code and reason once the frames queued before are out.
    Close(u16, &'static str),
}

impl Outgoing {
    /// Control messages bypass the outbox's bound: a close must always get through.
    fn is_control(&self) -> bool {
        matches!(self, Outgoing::Shutdown | Outgoing::Close(..))
    }
}

/// What the keep-alive sweep asks of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keepalive {
    Nothing,
    /// Quiet for a ping interval: send a ping.
    Ping,
    /// Pinged and silent for the pong timeout: close.
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The connection is gone.
    Closed,
    /// The connection is not keeping up; it will be closed.
    Full,
}

struct Inner {
    queue: VecDeque<Outgoing>,
    waker: Option<Waker>,
    frames_max: u32,
    /// Keep-alive sweeps since bytes last arrived from the peer (counted, not
    /// timed: two bytes instead of a timestamp on every idle connection).
    quiet_sweeps: u16,
    /// Sweeps since the ping that no bytes have answered yet.
    ping_sweeps: Option<u16>,
    keepalive: Keepalive,
    closed: bool,
    /// A close (or shutdown) is queued: nothing after it would be sent.
    closing: bool,
    overflowed: bool,
}

/// The keep-alive periods in sweeps of the core's keep-alive loop.
#[derive(Clone, Copy, Debug)]
pub struct Sweeps {
    /// Quiet sweeps before a ping.
    pub ping: u16,
    /// Sweeps a ping may stay unanswered.
    pub pong: u16,
}

#[derive(Clone)]
pub struct Outbox(Rc<RefCell<Inner>>);

impl Outbox {
    pub fn new(frames_max: u32) -> Outbox {
        Outbox(Rc::new(RefCell::new(Inner {
            queue: VecDeque::new(),
            waker: None,
            frames_max,
            quiet_sweeps: 0,
            ping_sweeps: None,
            keepalive: Keepalive::Nothing,
            closed: false,
            closing: false,
            overflowed: false,
        })))
    }

    pub fn push(&self, msg: Outgoing) -> Result<(), PushError> {
        let mut inner = self.0.borrow_mut();
        if inner.closed || inner.closing {
            return Err(PushError::Closed);
        }
        if msg.is_control() {
            inner.closing = true;
        } else if inner.queue.len() >= inner.frames_max as usize {
            inner.overflowed = true;
            if let Some(w) = inner.waker.take() {
                w.wake();
            }
            return Err(PushError::Full);
        }
        inner.queue.push_back(msg);
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Takes the next queued message.
    pub fn pop(&self) -> Option<Outgoing> {
        let mut inner = self.0.borrow_mut();
        let out = inner.queue.pop_front();
        // A burst's queue is freed once drained: idle connections hold none.
        if out.is_none() && inner.queue.capacity() > 0 {
            inner.queue = VecDeque::new();
        }
        out
    }

    /// Drops the text frames queued so far (a deleted user's connection gets none
    /// of them); a close already queued stays.
    pub fn discard_queued(&self) {
        let mut inner = self.0.borrow_mut();
        inner.queue.retain(Outgoing::is_control);
        if inner.queue.is_empty() {
            inner.queue = VecDeque::new();
        }
    }

    /// True once a push was refused for lack of room.
    pub fn overflowed(&self) -> bool {
        self.0.borrow().overflowed
    }

    /// Bytes arrived from the peer: it is alive.
    pub fn touch(&self) {
        let mut inner = self.0.borrow_mut();
        inner.quiet_sweeps = 0;
        inner.ping_sweeps = None;
    }

    /// One keep-alive sweep of the core: flags a connection quiet for `ping` sweeps
    /// for a ping, and one that left the ping unanswered for `pong` sweeps for
    /// closing; wakes it if so.
    pub fn sweep(&self, periods: Sweeps) {
        let mut inner = self.0.borrow_mut();
        if inner.closed || inner.keepalive != Keepalive::Nothing {
            return;
        }
        inner.quiet_sweeps = inner.quiet_sweeps.saturating_add(1);
        inner.keepalive = match inner.ping_sweeps {
            Some(n) if n + 1 >= periods.pong => Keepalive::TimedOut,
            Some(n) => {
                inner.ping_sweeps = Some(n + 1);
                return;
            }
            None if inner.quiet_sweeps >= periods.ping => {
                inner.ping_sweeps = Some(0);
                Keepalive::Ping
            }
            None => return,
        };
        if let Some(w) = inner.waker.take() {
            w.wake();
        }
    }

    /// What the sweep asked for since the last call.
    pub fn take_keepalive(&self) -> Keepalive {
        std::mem::replace(&mut self.0.borrow_mut().keepalive, Keepalive::Nothing)
    }

    /// Resolves when a message is queued, the outbox overflowed or closed, or the
    /// sweep asked for something. Cancel-safe.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            let mut inner = self.0.borrow_mut();
            if !inner.queue.is_empty()
                || inner.overflowed
                || inner.closed
                || inner.keepalive != Keepalive::Nothing
            {
                Poll::Ready(())
            } else {
                inner.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Refuses further pushes and drops what is queued; a task waiting in
    /// [`Outbox::ready`] wakes and finds it closed.
    pub fn close(&self) {
        let waker = {
            let mut inner = self.0.borrow_mut();
            inner.closed = true;
            inner.queue.clear();
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.0.borrow().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_safe_after_close() {
        let o = Outbox::new(2);
        assert_eq!(o.push(Outgoing::Text("a".into())), Ok(()));
        assert_eq!(o.push(Outgoing::Text("b".into())), Ok(()));
        assert_eq!(o.push(Outgoing::Text("c".into())), Err(PushError::Full));
        assert!(o.overflowed());
        assert_eq!(
            o.push(Outgoing::Shutdown),
            Ok(()),
            "control bypasses the bound"
        );
        assert_eq!(
            o.push(Outgoing::Close(4003, "bye")),
            Err(PushError::Closed),
            "a connection closing takes nothing more"
        );
        assert_eq!(o.pop(), Some(Outgoing::Text("a".into())));
        o.close();
        assert_eq!(o.push(Outgoing::Text("d".into())), Err(PushError::Closed));
        assert_eq!(o.pop(), None);
    }

    #[test]
    fn an_idle_outbox_stays_small() {
        // Every idle connection holds one of these (PERF.md: <= 1 KiB in all).
        assert!(
            std::mem::size_of::<Inner>() <= 64,
            "{}",
            std::mem::size_of::<Inner>()
        );
    }

    #[test]
    fn a_close_goes_through_a_full_outbox_once() {
        let o = Outbox::new(1);
        o.push(Outgoing::Text("a".into())).unwrap();
        assert_eq!(o.push(Outgoing::Close(4001, "token expired")), Ok(()));
        assert_eq!(
            o.push(Outgoing::Close(4003, "again")),
            Err(PushError::Closed)
        );
        assert_eq!(o.push(Outgoing::Text("b".into())), Err(PushError::Closed));
        assert!(!o.overflowed(), "a close is not a slow reader");
        assert_eq!(o.pop(), Some(Outgoing::Text("a".into())));
        assert_eq!(o.pop(), Some(Outgoing::Close(4001, "token expired")));
    }

    #[test]
    fn keepalive_pings_once_then_times_out_unless_touched() {
        let periods = Sweeps { ping: 3, pong: 2 };
        let o = Outbox::new(2);
        let sweeps = |n: usize| {
            (0..n).for_each(|_| o.sweep(periods));
            o.take_keepalive()
        };
        assert_eq!(sweeps(2), Keepalive::Nothing, "not quiet long enough");
        assert_eq!(sweeps(1), Keepalive::Ping);
        assert_eq!(sweeps(1), Keepalive::Nothing, "one ping per silence");
        assert_eq!(sweeps(1), Keepalive::TimedOut);

        // Bytes from the peer reset the count.
        o.touch();
        assert_eq!(sweeps(2), Keepalive::Nothing);
        o.touch();
        assert_eq!(sweeps(2), Keepalive::Nothing);
        assert_eq!(sweeps(1), Keepalive::Ping);
        o.touch();
        assert_eq!(
            sweeps(2),
            Keepalive::Nothing,
            "an answer cancels the timeout"
        );
    }
}
