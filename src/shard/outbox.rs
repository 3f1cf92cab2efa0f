//! A connection's bounded inbox of frames queued by other tasks of its core.
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

/// What other tasks ask a connection to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Send this text frame.
    Text(Arc<str>),
    /// The server is shutting down: close with 1001.
    Shutdown,
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
    frames_max: usize,
    waker: Option<Waker>,
    closed: bool,
    overflowed: bool,
}

#[derive(Clone)]
pub struct Outbox(Rc<RefCell<Inner>>);

impl Outbox {
    pub fn new(frames_max: usize) -> Outbox {
        Outbox(Rc::new(RefCell::new(Inner {
            queue: VecDeque::new(),
            frames_max,
            waker: None,
            closed: false,
            overflowed: false,
        })))
    }

    pub fn push(&self, msg: Outgoing) -> Result<(), PushError> {
        let mut inner = self.0.borrow_mut();
        if inner.closed {
            return Err(PushError::Closed);
        }
        // Control messages bypass the bound: shutdown must always get through.
        if msg != Outgoing::Shutdown && inner.queue.len() >= inner.frames_max {
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
        self.0.borrow_mut().queue.pop_front()
    }

    /// True once a push was refused for lack of room.
    pub fn overflowed(&self) -> bool {
        self.0.borrow().overflowed
    }

    /// Resolves when a message is queued or the outbox overflowed. Cancel-safe.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            let mut inner = self.0.borrow_mut();
            if !inner.queue.is_empty() || inner.overflowed {
                Poll::Ready(())
            } else {
                inner.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Refuses further pushes and drops what is queued.
    pub fn close(&self) {
        let mut inner = self.0.borrow_mut();
        inner.closed = true;
        inner.queue.clear();
        inner.waker = None;
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
        assert_eq!(o.pop(), Some(Outgoing::Text("a".into())));
        o.close();
        assert_eq!(o.push(Outgoing::Text("d".into())), Err(PushError::Closed));
        assert_eq!(o.pop(), None);
    }
}
