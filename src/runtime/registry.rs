//! The connections a core owns, and the per-user cap that only the owning core can
//! enforce without locks (every connection of a user lives on the same core).
//! Each entry also holds its token's expiry, which the keep-alive sweep checks: a
//! live token costs no timer.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use super::addr::Slot;
use super::outbox::{Outbox, Outgoing, PushError, Sweeps, CLOSE_TOKEN_EXPIRED};

pub type ConnId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// The user already holds the configured number of connections.
    UserCap(u32),
    /// This core holds as many connections as it is allowed.
    CoreFull,
}

struct Conn {
    user: Option<Arc<str>>,
    outbox: Outbox,
    /// When the connection's token expires, in Unix seconds; 0: never (or the
    /// close was already asked for). Four bytes that fit in the entry's padding.
    expires: Cell<u32>,
    admin: bool,
}

pub struct Registry {
    core: usize,
    next_seq: u64,
    conns: HashMap<ConnId, Conn>,
    /// Open connections per user; an entry exists only while its count is > 0, so
    /// the map is bounded by the number of open connections.
    per_user: HashMap<Arc<str>, u32>,
    per_user_max: u32,
    conns_max: usize,
}

impl Registry {
    pub fn new(core: usize, per_user_max: u32, conns_max: usize) -> Registry {
        Registry {
            core,
            next_seq: 0,
            conns: HashMap::new(),
            per_user: HashMap::new(),
            per_user_max,
            conns_max,
        }
    }

    /// Registers a connection, enforcing the per-user and per-core caps.
    pub fn register(
        &mut self,
        user: Option<Arc<str>>,
        admin: bool,
        outbox: Outbox,
    ) -> Result<ConnId, RegisterError> {
        if self.conns.len() >= self.conns_max {
            return Err(RegisterError::CoreFull);
        }
        if let Some(u) = &user {
            let n = self.per_user.entry(u.clone()).or_insert(0);
            if *n >= self.per_user_max {
                return Err(RegisterError::UserCap(self.per_user_max));
            }
            *n += 1;
        }
        self.next_seq += 1;
        // The core number in the high bits makes ids unique across the process.
        let id = (self.core as u64) << 48 | self.next_seq;
        self.conns.insert(
            id,
            Conn {
                user,
                outbox,
                expires: Cell::new(0),
                admin,
            },
        );
        Ok(id)
    }

    pub fn unregister(&mut self, id: ConnId) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        conn.outbox.close();
        if let Some(u) = conn.user {
            if let Some(n) = self.per_user.get_mut(&u) {
                *n -= 1;
                if *n == 0 {
                    self.per_user.remove(&u);
                }
            }
        }
    }

    pub fn user_connections(&self, user: &str) -> u32 {
        self.per_user.get(user).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Queues `msg` on every connection; returns how many accepted it.
    pub fn push_all(&self, msg: &Outgoing) -> usize {
        self.conns
            .values()
            .filter(|c| c.outbox.push(msg.clone()).is_ok())
            .count()
    }

    /// Sets when connection `id`'s token expires (Unix seconds; a later one than
    /// `u32` can hold is taken as never). False if the connection is gone.
    pub fn set_expiry(&self, id: ConnId, exp_secs: u64) -> bool {
        let Some(c) = self.conns.get(&id) else {
            return false;
        };
        c.expires
            .set(u32::try_from(exp_secs).unwrap_or(u32::MAX).max(1));
        true
    }

    /// The keep-alive sweep over every connection (see [`Outbox::sweep`]), which
    /// also closes connections whose token expired.
    pub fn sweep(&self, periods: Sweeps) {
        self.sweep_at(periods, crate::clock::now_ms());
    }

    /// [`Registry::sweep`] at wall-clock time `now_ms`.
    pub fn sweep_at(&self, periods: Sweeps, now_ms: i64) {
        for c in self.conns.values() {
            let exp = c.expires.get();
            // `exp` passes at the start of its second: RFC 7519 wants "now" before it.
            if exp != 0 && now_ms >= i64::from(exp) * 1000 {
                c.expires.set(0);
                let _ = c
                    .outbox
                    .push(Outgoing::Close(CLOSE_TOKEN_EXPIRED, "token expired"));
            }
            c.outbox.sweep(periods);
        }
    }

    /// Asks every connection of `user` to close with `code` and `reason`; with
    /// `discard`, the text frames already queued for them are dropped, not sent.
    /// Returns how many were asked (a connection already closing is not counted).
    pub fn close_user(&self, user: &str, code: u16, reason: &'static str, discard: bool) -> usize {
        self.conns
            .values()
            .filter(|c| c.user.as_deref() == Some(user))
            .filter(|c| {
                if discard {
                    c.outbox.discard_queued();
                }
                c.outbox.push(Outgoing::Close(code, reason)).is_ok()
            })
            .count()
    }

    /// Queues `msg` on every admin connection; returns how many took it.
    pub fn push_admins(&self, msg: &Outgoing) -> usize {
        self.conns
            .values()
            .filter(|c| c.admin && c.outbox.push(msg.clone()).is_ok())
            .count()
    }

    /// Queues `msg` on one connection.
    pub fn push_conn(&self, id: ConnId, msg: Outgoing) -> Result<(), PushError> {
        self.conns
            .get(&id)
            .ok_or(PushError::Closed)?
            .outbox
            .push(msg)
    }

    /// Queues `msg` on every connection of `user`.
    pub fn push_user(&self, user: &str, msg: &Outgoing) -> Result<usize, PushError> {
        let mut n = 0;
        for c in self
            .conns
            .values()
            .filter(|c| c.user.as_deref() == Some(user))
        {
            c.outbox.push(msg.clone())?;
            n += 1;
        }
        Ok(n)
    }
}

/// Unregisters its connection when dropped, also when the task panicked, and
/// then releases its client address's slot: both before the connection's FIN.
pub struct Registration {
    pub id: ConnId,
    registry: Rc<RefCell<Registry>>,
    _addr: Option<Slot>,
}

impl Registration {
    pub fn new(id: ConnId, registry: Rc<RefCell<Registry>>, addr: Option<Slot>) -> Self {
        Registration {
            id,
            registry,
            _addr: addr,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        match self.registry.try_borrow_mut() {
            Ok(mut r) => r.unregister(self.id),
            // Only possible if a panic unwound while the registry was borrowed.
            Err(_) => tracing::error!(
                conn = self.id,
                "registry busy while unregistering; entry leaked"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_cap_and_cleanup() {
        let mut r = Registry::new(1, 2, 100);
        let u: Arc<str> = "alice".into();
        let a = r.register(Some(u.clone()), false, Outbox::new(4)).unwrap();
        let b = r.register(Some(u.clone()), false, Outbox::new(4)).unwrap();
        assert_ne!(a, b);
        assert_eq!(a >> 48, 1);
        assert_eq!(
            r.register(Some(u.clone()), false, Outbox::new(4)),
            Err(RegisterError::UserCap(2))
        );
        r.register(Some("bob".into()), false, Outbox::new(4))
            .unwrap();
        r.register(None, false, Outbox::new(4)).unwrap();
        r.unregister(a);
        assert_eq!(r.user_connections("alice"), 1);
        r.register(Some(u.clone()), false, Outbox::new(4)).unwrap();
        r.unregister(b);
        r.unregister(b);
        assert_eq!(r.user_connections("alice"), 1);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn an_expired_token_closes_its_connection_once() {
        let periods = Sweeps {
            ping: 100,
            pong: 100,
        };
        let mut r = Registry::new(0, 10, 100);
        let (early, late, never) = (Outbox::new(4), Outbox::new(4), Outbox::new(4));
        let a = r.register(Some("a".into()), false, early.clone()).unwrap();
        let b = r.register(Some("b".into()), false, late.clone()).unwrap();
        r.register(Some("c".into()), false, never.clone()).unwrap();
        assert!(r.set_expiry(a, 1_000));
        assert!(r.set_expiry(b, 2_000));
        r.sweep_at(periods, 999_999);
        assert_eq!(early.pop(), None, "not before exp");
        r.sweep_at(periods, 1_000_000);
        let expired = Some(Outgoing::Close(CLOSE_TOKEN_EXPIRED, "token expired"));
        assert_eq!(early.pop(), expired);
        r.sweep_at(periods, 1_500_000);
        assert_eq!(early.pop(), None, "asked once");
        assert_eq!(late.pop(), None);
        // A refresh moves the expiry.
        assert!(r.set_expiry(b, 3_000));
        r.sweep_at(periods, 2_500_000);
        assert_eq!(late.pop(), None);
        r.sweep_at(periods, 3_000_000);
        assert_eq!(late.pop(), expired);
        assert_eq!(never.pop(), None);
        r.unregister(a);
        assert!(!r.set_expiry(a, 5_000), "gone");
    }

    #[test]
    fn close_user_reaches_only_that_user_once() {
        let mut r = Registry::new(0, 10, 100);
        let (a1, a2, b) = (Outbox::new(1), Outbox::new(1), Outbox::new(1));
        r.register(Some("a".into()), false, a1.clone()).unwrap();
        r.register(Some("a".into()), false, a2.clone()).unwrap();
        r.register(Some("b".into()), false, b.clone()).unwrap();
        a1.push(Outgoing::Text("queued".into())).unwrap();
        assert_eq!(
            r.close_user("a", 4003, "bye", false),
            2,
            "even past a full outbox"
        );
        assert_eq!(r.close_user("a", 4003, "bye", false), 0, "already closing");
        assert_eq!(a1.pop(), Some(Outgoing::Text("queued".into())));
        assert_eq!(a1.pop(), Some(Outgoing::Close(4003, "bye")));
        assert_eq!(a2.pop(), Some(Outgoing::Close(4003, "bye")));
        assert_eq!(b.pop(), None);
        assert_eq!(r.close_user("nobody", 4003, "bye", false), 0);

        // A deleted user's queued frames are dropped, not sent.
        b.push(Outgoing::Text("private".into())).unwrap();
        assert_eq!(r.close_user("b", 4003, "gone", true), 1);
        assert_eq!(b.pop(), Some(Outgoing::Close(4003, "gone")));
        assert_eq!(b.pop(), None);
    }

    #[test]
    fn core_cap() {
        let mut r = Registry::new(0, 10, 1);
        r.register(None, false, Outbox::new(1)).unwrap();
        assert_eq!(
            r.register(Some("x".into()), false, Outbox::new(1)),
            Err(RegisterError::CoreFull)
        );
        assert_eq!(r.user_connections("x"), 0, "a refused user leaves no entry");
    }
}
