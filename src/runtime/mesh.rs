//! The typed cross-core mesh: one bounded queue into each core, one message enum.
//!
//! Nothing a core owns is ever touched by another thread; to act on another core's
//! state, send it a [`CoreMsg`]. Sends never block: a full queue is an error the
//! sender turns into a clear refusal (`503`, `overloaded`), never a stall.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::addr::Claim;
use super::registry::ConnId;
use super::ws::handshake::Upgrade;

/// Everything one core can ask of another: the runtime's own requests, and the
/// application's message type `M`.
pub enum CoreMsg<M> {
    /// A WebSocket upgrade accepted by another core for a user this core owns.
    /// The socket moves here; the upgrade response has not been written yet.
    Handover(Box<Handover>),
    /// Send this text frame to every connection of the receiving core.
    Broadcast(Arc<str>),
    /// Send a frame to one connection of the receiving core (an admin watching a
    /// session that another core owns).
    Deliver { conn: ConnId, frame: Arc<str> },
    /// Send a frame to every admin connection of the receiving core.
    AdminFeed(Arc<str>),
    /// The application's own message (see [`super::App::on_msg`]).
    App(M),
}

pub struct Handover {
    pub fd: OwnedFd,
    pub upgrade: Upgrade,
    /// The connection's slot under its client address's limits.
    pub addr: Option<Claim>,
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("core {0}'s queue is full")]
    Full(usize),
    #[error("core {0} has stopped")]
    Stopped(usize),
}

/// The sending half to every core. Cheap to clone, `Send`.
pub struct Mesh<M> {
    senders: Arc<[async_channel::Sender<CoreMsg<M>>]>,
}

impl<M> Clone for Mesh<M> {
    fn clone(&self) -> Self {
        Mesh {
            senders: self.senders.clone(),
        }
    }
}

/// The receiving end of one core's queue.
pub type Inbox<M> = async_channel::Receiver<CoreMsg<M>>;

/// Creates the mesh and the receiving end of each core's queue.
pub fn mesh<M>(cores: usize, queue_max: usize) -> (Mesh<M>, Vec<Inbox<M>>) {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..cores)
        .map(|_| async_channel::bounded(queue_max))
        .unzip();
    (
        Mesh {
            senders: senders.into(),
        },
        receivers,
    )
}

impl<M> Mesh<M> {
    pub fn cores(&self) -> usize {
        self.senders.len()
    }

    /// Queues `msg` for `core`; on failure the message comes back so the caller
    /// can still answer the client (for a handover, through its socket).
    pub fn send(&self, core: usize, msg: CoreMsg<M>) -> Result<(), (MeshError, CoreMsg<M>)> {
        self.senders[core].try_send(msg).map_err(|e| match e {
            async_channel::TrySendError::Full(m) => (MeshError::Full(core), m),
            async_channel::TrySendError::Closed(m) => (MeshError::Stopped(core), m),
        })
    }

    /// Sends a message made by `make` to every core. Returns the cores that could
    /// not take it (their queues were full or they had stopped).
    pub fn send_all(&self, make: impl Fn() -> CoreMsg<M>) -> Vec<MeshError> {
        (0..self.cores())
            .filter_map(|core| self.send(core, make()).err().map(|(e, _)| e))
            .collect()
    }

    /// Sends `frame` to every admin connection on every core (the help feed).
    pub fn admin_feed(&self, frame: &str) -> Vec<MeshError> {
        let frame: Arc<str> = frame.into();
        self.send_all(|| CoreMsg::AdminFeed(frame.clone()))
    }

    /// Sends `text` to every connection on every core.
    pub fn broadcast(&self, text: &str) -> Vec<MeshError> {
        let text: Arc<str> = text.into();
        self.send_all(|| CoreMsg::Broadcast(text.clone()))
    }
}

/// The core that owns `user_id`: FNV-1a, stable across runs and platforms, so a
/// user's connections always meet on one core.
pub fn owner_core(user_id: &str, cores: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % cores as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_stable_and_spreads() {
        assert_eq!(owner_core("alice", 4), owner_core("alice", 4));
        let mut seen = [0usize; 4];
        for i in 0..1000 {
            seen[owner_core(&format!("user-{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }

    #[test]
    fn full_queue_returns_the_message() {
        let (mesh, rx) = mesh::<()>(2, 1);
        assert!(mesh.send(1, CoreMsg::Broadcast("a".into())).is_ok());
        match mesh.send(1, CoreMsg::Broadcast("b".into())) {
            Err((MeshError::Full(1), CoreMsg::Broadcast(t))) => assert_eq!(&*t, "b"),
            _ => panic!("expected Full with the message back"),
        }
        let failed = mesh.broadcast("c");
        assert_eq!(failed.len(), 1, "core 1 is full, core 0 is not");
        assert!(matches!(rx[0].try_recv(), Ok(CoreMsg::Broadcast(t)) if &*t == "c"));
        drop(rx);
        assert!(matches!(
            mesh.send(0, CoreMsg::Broadcast("d".into())),
            Err((MeshError::Stopped(0), _))
        ));
    }
}
