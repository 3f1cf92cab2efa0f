//! The owner node's lease on each user it writes for (docs/CLUSTER.md,
//! ownership): every write of a user's sessions carries it, and a user whose
//! lease is gone (fenced off, held elsewhere, or moved by a membership change) is
//! let go here: forgotten in memory, their connections told to reconnect.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::app::remote::{self, CLOSE_RESTART};
use crate::app::Core;
use crate::clock::now_ms;
use crate::store::{StoreError, WriteOp, WriteOutcome};

/// A write of a user's sessions, settled on the user's core.
pub use crate::store::journal::Write;

/// Submits `ops` (changes to `user`'s sessions) now, behind the user's lease in a
/// cluster: the lease this core holds as a fence, or a request for it. Resolves
/// to the outcomes of `ops`. A lease lost on the way lets the user go here.
pub fn write(core: &Rc<Core>, user: &Arc<str>, ops: Vec<WriteOp>) -> Write {
    let store = &core.shared.app.store;
    let Some(bus) = &core.shared.app.bus else {
        // One node: through this core's journal when the store keeps them (the
        // ack then waits for this core's own sync), else the store's future.
        let uring = core.driver == crate::runtime::server::Driver::IoUring;
        return match core.app.journal(store, uring) {
            Some(journal) => journal.write(ops),
            None => store.write(ops),
        };
    };
    let node = bus.node_id().to_string();
    let held = core.app.leases.borrow().get(user).copied();
    let lease = match held {
        Some(epoch) => WriteOp::Fence {
            user_id: user.to_string(),
            node,
            epoch,
        },
        None => {
            let now = now_ms();
            WriteOp::TakeLease {
                user_id: user.to_string(),
                node,
                now,
                until: now + ttl_ms(core),
            }
        }
    };
    let write = store.write(std::iter::once(lease).chain(ops).collect());
    let (core, user) = (core.clone(), user.clone());
    Box::pin(async move {
        match write.await {
            Ok(mut outcomes) => {
                if let Some(WriteOutcome::Leased { epoch }) = outcomes.first() {
                    core.app.leases.borrow_mut().insert(user, *epoch);
                }
                outcomes.remove(0);
                Ok(outcomes)
            }
            Err(e) => {
                match &e {
                    StoreError::Fenced { .. } => let_go(&core, &user, true),
                    StoreError::LeaseHeld { .. } => let_go(&core, &user, false),
                    _ => {}
                }
                Err(e)
            }
        }
    })
}

fn ttl_ms(core: &Core) -> i64 {
    i64::try_from(core.shared.config.lease_ttl_ms).unwrap_or(i64::MAX)
}

/// Forgets `user` on this core (what is in memory may be older than the store);
/// `close`: their connections, here and at their edges, are told to reconnect,
/// which brings them to the node that owns the user now.
pub fn let_go(core: &Rc<Core>, user: &str, close: bool) {
    core.app.leases.borrow_mut().remove(user);
    let sessions = core.app.forget_user(user);
    let mut closed = 0;
    if close {
        let reason = remote::close_reason(CLOSE_RESTART);
        closed = core
            .registry
            .borrow()
            .close_user(user, CLOSE_RESTART, reason, false);
        closed += remote::close_served_user(core, user, CLOSE_RESTART);
        core.metrics().users_let_go.inc();
    }
    tracing::info!(
        core = core.id,
        user,
        sessions,
        closed,
        "let a user go: another node serves them now"
    );
}

/// After the cluster's membership changed: lets go of the users in memory here
/// that another node owns now, then their leases, so that the new owner takes
/// them at once (in the writer's order: after every write already submitted).
pub fn rebalance(core: &Rc<Core>) {
    let Some(bus) = core.shared.app.bus.clone() else {
        return;
    };
    let me = bus.node_id();
    let mut users: HashSet<Arc<str>> = core.app.leases.borrow().keys().cloned().collect();
    users.extend(
        core.app
            .sessions
            .borrow()
            .values()
            .map(|s| s.user_id.clone()),
    );
    let moved: Vec<Arc<str>> = users.into_iter().filter(|u| bus.owner(u) != *me).collect();
    if moved.is_empty() {
        return;
    }
    for user in &moved {
        let_go(core, user, true);
    }
    let release = WriteOp::ReleaseLeases {
        node: me.to_string(),
        users: Some(moved.iter().map(|u| u.to_string()).collect()),
    };
    let released = core.shared.app.store.write(vec![release]);
    let count = moved.len();
    monoio::spawn(async move {
        match released.await {
            Ok(_) => tracing::info!(users = count, "released the leases of users that moved"),
            Err(e) => tracing::warn!(error = %e, "releasing leases failed; they expire instead"),
        }
    });
}

/// Core 0, in a cluster: renews every lease this node holds, every third of their
/// time to live, until the core stops.
pub async fn renew_loop(core: Rc<Core>) {
    let Some(bus) = core.shared.app.bus.clone() else {
        return;
    };
    let every = Duration::from_millis(core.shared.config.lease_ttl_ms / 3);
    loop {
        monoio::select! {
            _ = monoio::time::sleep(every) => {}
            _ = core.gate.closed() => return,
        }
        let renew = WriteOp::RenewLeases {
            node: bus.node_id().to_string(),
            until: now_ms() + ttl_ms(&core),
        };
        if let Err(e) = core.shared.app.store.write(vec![renew]).await {
            tracing::warn!(error = %e, "renewing this node's leases failed; retrying next round");
        }
    }
}
