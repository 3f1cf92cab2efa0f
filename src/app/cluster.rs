//! What one node asks of the others over the bus, and how a node answers.
//!
//! The cross-node twin of [`super::ChatMsg`]: a help request for every admin of
//! every node, and closing a user's connections wherever they are. A message that
//! arrives is handed to the right core over the mesh, exactly as a core would hand
//! it; docs/CLUSTER.md says what each one may lose and why that is safe.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::admin::CloseUser;
use super::remote::{ConnRef, RemoteAdminAct, RemoteIdentity, RemoteMsg};
use super::ChatMsg;
use crate::config::Config;
use crate::pool::BlockingPool;
use crate::runtime::bus::{Bus, BusError, BusSettings, Handler, Inbound};
use crate::runtime::mesh::{owner_core, CoreMsg, Mesh};

/// A message between nodes, as JSON on the bus.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeMsg {
    /// A frame for every admin connection of the receiving node (`help_requested`).
    AdminFeed { frame: String },
    /// Close a user's connections on the receiving node; `deleted`: their data was
    /// deleted, so their sessions leave memory too. Answered with [`Closed`].
    CloseUser { user_id: String, deleted: bool },
    /// An admin ended this session: the node holding it in memory stops taking
    /// messages for it and tells its connections (the store already says ended).
    EndSession { session_id: String, user_id: String },
    /// Edge to owner: serve this socket's user here (docs/CLUSTER.md, delivery).
    Attach {
        edge: ConnRef,
        identity: RemoteIdentity,
    },
    /// Edge to owner: an admin's action on a session of `user_id`, whom the
    /// receiving node owns (docs/CLUSTER.md, admins).
    AdminOp {
        edge: ConnRef,
        admin: RemoteIdentity,
        user_id: String,
        act: RemoteAdminAct,
    },
    /// Edge to owner: a text frame from the socket.
    Text {
        edge: ConnRef,
        user_id: String,
        text: String,
    },
    /// Edge to owner: the socket closed.
    Detach { edge: ConnRef, user_id: String },
    /// Owner to edge: a frame for the socket.
    Deliver { to: ConnRef, frame: String },
    /// Owner to edge: close the socket with this code.
    CloseConn { to: ConnRef, code: u16 },
}

/// A node's answer to [`NodeMsg::CloseUser`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Closed {
    pub closed: usize,
}

impl NodeMsg {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a plain enum of strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Connects this node to the bus when cluster mode is on.
pub fn start_bus(
    config: &Config,
    pool: &BlockingPool,
    mesh: &Mesh<ChatMsg>,
) -> Result<Option<Bus>, BusError> {
    if !config.cluster() {
        return Ok(None);
    }
    let settings = BusSettings {
        servers: config.nats_url.clone(),
        node_id: config.node_name().into(),
        prefix: config.nats_subject_prefix.clone(),
        heartbeat: Duration::from_millis(config.cluster_heartbeat_ms),
        member_timeout: Duration::from_millis(config.cluster_member_timeout_ms),
        request_timeout: Duration::from_millis(config.bus_request_timeout_ms),
    };
    tracing::info!(node = %settings.node_id, prefix = %settings.prefix, "cluster mode");
    let inbound = mesh.clone();
    let handler: Handler = Arc::new(move |msg| on_inbound(&inbound, msg));
    let bus = Bus::start(settings, pool, handler)?;
    pool.handle().spawn(watch_leaves(bus.clone(), mesh.clone()));
    Ok(Some(bus))
}

/// Runs on a pool thread for every message another node sent this one.
fn on_inbound(mesh: &Mesh<ChatMsg>, msg: Inbound) {
    let parsed = serde_json::from_slice::<NodeMsg>(&msg.payload);
    match parsed {
        Ok(NodeMsg::AdminFeed { frame }) => {
            for e in mesh.admin_feed(&frame) {
                tracing::warn!(error = %e, "a help request from another node missed one core");
            }
        }
        Ok(NodeMsg::CloseUser { user_id, deleted }) => close_here(mesh, msg, &user_id, deleted),
        Ok(NodeMsg::EndSession {
            session_id,
            user_id,
        }) => {
            let core = owner_core(&user_id, mesh.cores());
            let end = CoreMsg::App(ChatMsg::EndSession(session_id.into()));
            if let Err((e, _)) = mesh.send(core, end) {
                tracing::warn!(error = %e, "an end from another node missed its core");
            }
        }
        Ok(other) => on_connection_msg(mesh, other),
        Err(e) => tracing::warn!(error = %e, "an unreadable bus message was ignored"),
    }
}

/// Hands a remote connection's message to the core it concerns.
fn on_connection_msg(mesh: &Mesh<ChatMsg>, msg: NodeMsg) {
    let owner = |user: &str| owner_core(user, mesh.cores());
    let (core, msg) = match msg {
        NodeMsg::Attach { edge, identity } => (
            owner(&identity.user_id),
            CoreMsg::App(ChatMsg::Remote(Box::new(RemoteMsg::Attach(edge, identity)))),
        ),
        NodeMsg::AdminOp {
            edge,
            admin,
            user_id,
            act,
        } => (
            owner(&user_id),
            CoreMsg::App(ChatMsg::Remote(Box::new(RemoteMsg::AdminOp(
                edge, admin, act,
            )))),
        ),
        NodeMsg::Text {
            edge,
            user_id,
            text,
        } => (
            owner(&user_id),
            CoreMsg::App(ChatMsg::Remote(Box::new(RemoteMsg::Text(edge, text)))),
        ),
        NodeMsg::Detach { edge, user_id } => (
            owner(&user_id),
            CoreMsg::App(ChatMsg::Remote(Box::new(RemoteMsg::Detach(edge)))),
        ),
        NodeMsg::Deliver { to, frame } => (
            to.core,
            CoreMsg::Deliver {
                conn: to.conn,
                frame: frame.into(),
            },
        ),
        NodeMsg::CloseConn { to, code } => (
            to.core,
            CoreMsg::App(ChatMsg::Remote(Box::new(RemoteMsg::Close(to.conn, code)))),
        ),
        _ => return,
    };
    if core >= mesh.cores() {
        return tracing::warn!(core, "a bus message for a core this node does not have");
    }
    if let Err((e, _)) = mesh.send(core, msg) {
        tracing::warn!(error = %e, "a connection message from another node was dropped");
    }
}

/// Tells every core when a node leaves, so that what it served or was served by
/// it ends (runs on the pool for the life of the bus).
async fn watch_leaves(bus: Bus, mesh: Mesh<ChatMsg>) {
    let mut view = bus.watch_members();
    let mut before: Vec<Arc<str>> = view.borrow().clone();
    while view.changed().await.is_ok() {
        let now: Vec<Arc<str>> = view.borrow().clone();
        for gone in before.iter().filter(|n| !now.contains(n)) {
            tracing::info!(node = %gone, "a node left; its connections end here");
            mesh.send_all(|| {
                CoreMsg::App(ChatMsg::Remote(Box::new(RemoteMsg::NodeGone(
                    gone.to_string(),
                ))))
            });
        }
        // After the leaves: what a gone node served is closed before users move.
        mesh.send_all(|| CoreMsg::App(ChatMsg::Remote(Box::new(RemoteMsg::ViewChanged))));
        before = now;
    }
}

/// Hands a close to the user's core and answers the asking node once it is done;
/// no answer (the core is stuck or stopping) is what the asker reports.
fn close_here(mesh: &Mesh<ChatMsg>, msg: Inbound, user_id: &str, deleted: bool) {
    let (close, answer) = CloseUser::new(user_id.into(), deleted);
    let core = owner_core(user_id, mesh.cores());
    if mesh
        .send(core, CoreMsg::App(ChatMsg::CloseUser(Box::new(close))))
        .is_err()
    {
        return;
    }
    tokio::spawn(async move {
        if let Ok(closed) = answer.recv().await {
            let reply = serde_json::to_vec(&Closed { closed }).unwrap_or_default();
            msg.reply(reply);
        }
    });
}

/// Sends a help request's frame to the admins of every other node.
pub fn admin_feed(bus: &Bus, frame: &str) -> Result<(), BusError> {
    let msg = NodeMsg::AdminFeed {
        frame: frame.to_owned(),
    };
    bus.publish_all(msg.encode())
}

/// Tells every other node that an admin ended a session.
pub fn end_session(bus: &Bus, session_id: &str, user_id: &str) -> Result<(), BusError> {
    let msg = NodeMsg::EndSession {
        session_id: session_id.to_owned(),
        user_id: user_id.to_owned(),
    };
    bus.publish_all(msg.encode())
}

/// Closes a user's connections on every other node: how many were closed, or
/// which nodes did not confirm.
pub async fn close_user_elsewhere(
    bus: &Bus,
    user_id: &str,
    deleted: bool,
) -> Result<usize, String> {
    let msg = NodeMsg::CloseUser {
        user_id: user_id.to_owned(),
        deleted,
    };
    let gathered = bus
        .gather(msg.encode())
        .await
        .map_err(|e| format!("the other nodes were not asked ({e})"))?;
    let mut closed = 0;
    for (node, body) in &gathered.replies {
        match serde_json::from_slice::<Closed>(body) {
            Ok(c) => closed += c.closed,
            Err(_) => return Err(format!("node {node} answered what is not a count")),
        }
    }
    if !gathered.missing.is_empty() {
        let names: Vec<&str> = gathered.missing.iter().map(|n| &**n).collect();
        return Err(format!(
            "node(s) {} did not confirm closing the user's connections",
            names.join(", ")
        ));
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::chat::takeover::AdminAction;

    #[test]
    fn node_messages_round_trip_as_tagged_json() {
        for msg in [
            NodeMsg::AdminFeed {
                frame: r#"{"type":"help_requested"}"#.into(),
            },
            NodeMsg::CloseUser {
                user_id: "josé".into(),
                deleted: true,
            },
            NodeMsg::EndSession {
                session_id: "s_1".into(),
                user_id: "u".into(),
            },
            NodeMsg::AdminOp {
                edge: ConnRef {
                    node: "n1".into(),
                    core: 1,
                    conn: 7,
                },
                admin: RemoteIdentity {
                    user_id: "agent".into(),
                    name: "Ann".into(),
                },
                user_id: "u".into(),
                act: RemoteAdminAct {
                    session_id: "s_1".into(),
                    action: AdminAction::Message {
                        content: "hi".into(),
                        client_id: Some("c".into()),
                    },
                    id: Some("c".into()),
                },
            },
        ] {
            let bytes = msg.encode();
            assert_eq!(serde_json::from_slice::<NodeMsg>(&bytes).unwrap(), msg);
        }
        let wire = br#"{"kind":"close_user","user_id":"u","deleted":false}"#;
        assert!(serde_json::from_slice::<NodeMsg>(wire).is_ok());
        assert!(serde_json::from_slice::<NodeMsg>(br#"{"kind":"nope"}"#).is_err());
    }
}
