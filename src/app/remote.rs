//! Connections whose socket is on one node (the edge) and whose user is owned by
//! another (the owner), as docs/CLUSTER.md describes.
//!
//! The owner registers such a connection in its core's registry like a local one,
//! so that sessions, the per-user cap and admin delivery treat it exactly as a
//! socket of its own; its outbox is drained to the bus instead of a socket. The
//! edge keeps the socket, the handshake, the token and the codec, and forwards each
//! text frame to the owner. Messages from one node reach another in the order they
//! were sent, so the edge never waits for the owner's answer to an attach.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cluster::NodeMsg;
use super::conn::ChatConn;
use super::Core;
use crate::auth::Identity;
use crate::runtime::bus::Bus;
use crate::runtime::outbox::{Outbox, Outgoing};
use crate::runtime::{AppConn, ConnId, Reply};

/// Close code the owner sends when it cannot take a connection (cap reached).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code when the owner node went away: reconnect, another node serves you.
pub const CLOSE_RESTART: u16 = 1012;

/// A connection anywhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnRef {
    pub node: String,
    pub core: usize,
    pub conn: ConnId,
}

/// The identity of a remote connection, as the edge verified it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteIdentity {
    pub user_id: String,
    pub name: String,
}

/// One remote connection served on this core: its local id and chat state.
pub struct Served {
    conn: ConnId,
    chat: ChatConn,
}

/// This core's remote connections, by where their sockets are.
pub type ServedMap = HashMap<ConnRef, Served>;

/// The edge's sockets served by other nodes: which node, and whose socket.
pub type ProxyMap = HashMap<ConnId, (Arc<str>, Arc<str>)>;

/// The edge's half of a proxied connection: where the owner is.
pub struct Proxy {
    pub owner: Arc<str>,
    pub user_id: Arc<str>,
    pub edge: ConnRef,
    pub bus: Bus,
}

impl Proxy {
    /// A proxy when `identity`'s owner is another node; `None` to serve it here.
    /// Admins are served where they connect: their actions are routed one by one.
    pub fn for_conn(core: &Core, conn: ConnId, identity: &Identity) -> Option<Proxy> {
        let bus = core.shared.app.bus.as_ref()?;
        if identity.admin {
            return None;
        }
        let owner = bus.owner(&identity.user_id);
        if owner == *bus.node_id() {
            return None;
        }
        let edge = ConnRef {
            node: bus.node_id().to_string(),
            core: core.id,
            conn,
        };
        let proxy = Proxy {
            owner,
            user_id: identity.user_id.clone(),
            edge,
            bus: bus.clone(),
        };
        let attach = NodeMsg::Attach {
            edge: proxy.edge.clone(),
            identity: RemoteIdentity {
                user_id: identity.user_id.to_string(),
                name: identity.name.to_string(),
            },
        };
        // Sent even while the bus is down (it is then refused here): the socket
        // still belongs to the owner, and its frames get `unavailable` until the
        // owner, hearing a frame of a socket it never attached, closes it (1012).
        let _ = proxy.send(&attach);
        let mapped = (proxy.owner.clone(), proxy.user_id.clone());
        core.app.proxies.borrow_mut().insert(conn, mapped);
        Some(proxy)
    }

    /// Forwards a text frame to the owner; a bus that is down is a clear error.
    pub fn on_text(&self, text: &str) -> Reply {
        let msg = NodeMsg::Text {
            edge: self.edge.clone(),
            user_id: self.user_id.to_string(),
            text: text.to_owned(),
        };
        match self.send(&msg) {
            Ok(()) => Reply::None,
            Err(e) => Reply::Text(super::frames::error_frame(
                super::frames::Code::Unavailable,
                &format!("this conversation is served by another node, which cannot be reached now ({e})"),
                None,
            )),
        }
    }

    fn send(&self, msg: &NodeMsg) -> Result<(), crate::runtime::bus::BusError> {
        self.bus.publish_to(&self.owner, msg.encode())
    }

    /// The socket closed: the owner forgets the connection.
    pub fn detach(&self, core: &Core) {
        core.app.proxies.borrow_mut().remove(&self.edge.conn);
        let _ = self.send(&NodeMsg::Detach {
            edge: self.edge.clone(),
            user_id: self.user_id.to_string(),
        });
    }
}

/// The owner's half: registers the edge's connection here and starts draining its
/// outbox to the bus. At the per-user cap the edge is told to close.
pub fn attach(core: &Rc<Core>, edge: ConnRef, who: RemoteIdentity) {
    let Some(bus) = core.shared.app.bus.clone() else {
        return;
    };
    if core.gate.is_closing() {
        // Stopping: the edge's client reconnects to a node that stays.
        return close_edge(&bus, &edge, CLOSE_RESTART);
    }
    let outbox = Outbox::new(core.shared.config.ws_outbox_frames_max);
    let user: Arc<str> = who.user_id.as_str().into();
    let registered = core
        .registry
        .borrow_mut()
        .register(Some(user.clone()), false, outbox.clone());
    let Ok(conn) = registered else {
        return close_edge(&bus, &edge, CLOSE_POLICY);
    };
    let identity = Identity {
        user_id: user,
        name: who.name.as_str().into(),
        admin: false,
    };
    let chat = ChatConn::new(core.clone(), conn, identity);
    core.app
        .served
        .borrow_mut()
        .insert(edge.clone(), Served { conn, chat });
    monoio::spawn(drain(core.clone(), bus, edge, conn, outbox));
}

/// A text frame from the edge, handled as the socket's own would be here.
pub fn text(core: &Rc<Core>, edge: ConnRef, text: &str) {
    // Taken out while it runs: handling may reach the map (a close, say).
    let Some(mut served) = core.app.served.borrow_mut().remove(&edge) else {
        // Its attach was lost (the bus was down): the edge closes it, the client
        // reconnects and attaches again.
        if let Some(bus) = &core.shared.app.bus {
            close_edge(bus, &edge, CLOSE_RESTART);
        }
        return;
    };
    let reply = served.chat.on_text(text);
    let conn = served.conn;
    core.app.served.borrow_mut().insert(edge, served);
    let reply = match reply {
        Reply::Text(t) => Outgoing::Text(t.into()),
        Reply::Close(_, reason) => Outgoing::Close(CLOSE_POLICY, reason),
        Reply::None | Reply::Binary(_) => return,
    };
    let _ = core.registry.borrow().push_conn(conn, reply);
}

/// The edge's socket closed, or its node left: the connection ends here.
pub fn detach(core: &Rc<Core>, edge: &ConnRef) {
    let served = core.app.served.borrow_mut().remove(edge);
    if let Some(served) = served {
        core.registry.borrow_mut().unregister(served.conn);
        drop(served.chat);
    }
}

/// Ends every connection served here for `node` (it left the cluster).
pub fn node_gone(core: &Rc<Core>, node: &str) {
    let gone: Vec<ConnRef> = core
        .app
        .served
        .borrow()
        .keys()
        .filter(|e| e.node == node)
        .cloned()
        .collect();
    for edge in gone {
        detach(core, &edge);
    }
}

/// Sends what the session queues for a remote connection to its edge, until the
/// connection closes here or there.
async fn drain(core: Rc<Core>, bus: Bus, edge: ConnRef, conn: ConnId, outbox: Outbox) {
    loop {
        outbox.ready().await;
        if outbox.is_closed() {
            break;
        }
        // The edge runs the keep-alive of the socket; here there is none.
        let _ = outbox.take_keepalive();
        outbox.touch();
        if outbox.overflowed() {
            close_edge(&bus, &edge, 1013);
            break;
        }
        let mut closed = false;
        while let Some(out) = outbox.pop() {
            match out {
                Outgoing::Text(frame) => {
                    let msg = NodeMsg::Deliver {
                        to: edge.clone(),
                        frame: frame.to_string(),
                    };
                    let _ = bus.publish_to(&edge.node, msg.encode());
                }
                Outgoing::Close(code, _) => {
                    close_edge(&bus, &edge, code);
                    closed = true;
                }
                Outgoing::Shutdown => {
                    close_edge(&bus, &edge, CLOSE_RESTART);
                    closed = true;
                }
            }
        }
        if closed || !core.app.served.borrow().contains_key(&edge) {
            break;
        }
    }
    debug_assert!(conn != 0, "a registered connection has a non-zero id");
    detach(&core, &edge);
}

fn close_edge(bus: &Bus, edge: &ConnRef, code: u16) {
    let msg = NodeMsg::CloseConn {
        to: edge.clone(),
        code,
    };
    let _ = bus.publish_to(&edge.node, msg.encode());
}

/// Ends, without a word to their edges, the connections this core serves for
/// `user`'s sockets on other nodes (their edges close the sockets themselves).
pub fn end_served_user(core: &Rc<Core>, user: &str) {
    let edges: Vec<ConnRef> = core
        .app
        .served
        .borrow()
        .iter()
        .filter(|(_, s)| *s.chat.identity.user_id == *user)
        .map(|(edge, _)| edge.clone())
        .collect();
    for edge in edges {
        detach(core, &edge);
    }
}

/// The reason sent with a close the owner asked for.
pub fn close_reason(code: u16) -> &'static str {
    match code {
        CLOSE_POLICY => "too many connections for this user",
        CLOSE_RESTART => "the node serving this conversation went away; reconnect",
        1013 => "slow consumer",
        4001 => "token expired",
        4003 => "disconnected by an admin",
        _ => "closed by the server",
    }
}

/// A cross-node connection request for one core.
pub enum RemoteMsg {
    Attach(ConnRef, RemoteIdentity),
    Text(ConnRef, String),
    Detach(ConnRef),
    /// Close this core's socket with this code (its owner asked).
    Close(ConnId, u16),
    /// A node left: end what this core serves for it, close what it served.
    NodeGone(String),
}

/// Runs a cross-node connection request on the core it was sent to.
pub fn on_msg(core: &Rc<Core>, msg: RemoteMsg) {
    match msg {
        RemoteMsg::Attach(edge, who) => attach(core, edge, who),
        RemoteMsg::Text(edge, t) => text(core, edge, &t),
        RemoteMsg::Detach(edge) => detach(core, &edge),
        RemoteMsg::Close(conn, code) => {
            let close = Outgoing::Close(code, close_reason(code));
            let _ = core.registry.borrow().push_conn(conn, close);
        }
        RemoteMsg::NodeGone(node) => {
            node_gone(core, &node);
            let proxied: Vec<ConnId> = core
                .app
                .proxies
                .borrow()
                .iter()
                .filter(|(_, (owner, _))| **owner == *node)
                .map(|(conn, _)| *conn)
                .collect();
            for conn in proxied {
                let close = Outgoing::Close(CLOSE_RESTART, close_reason(CLOSE_RESTART));
                let _ = core.registry.borrow().push_conn(conn, close);
            }
        }
    }
}
