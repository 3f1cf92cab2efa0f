//! The connections a core owns, and the per-user cap that only the owning core can
//! enforce without locks (every connection of a user lives on the same core).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use super::addr::Slot;
use super::outbox::{Outbox, Outgoing, PushError};

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
    admin: bool,
    outbox: Outbox,
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
                admin,
                outbox,
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

    /// The keep-alive sweep over every connection (see [`Outbox::sweep`]).
    pub fn sweep(&self, periods: super::outbox::Sweeps) {
        for c in self.conns.values() {
            c.outbox.sweep(periods);
        }
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
