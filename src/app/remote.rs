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

use super::chat::takeover::{AdminAction, AdminOp, Holder};
use super::cluster::NodeMsg;
use super::conn::ChatConn;
use super::frames::unavailable_frame;
use super::Core;
use crate::auth::Identity;
use crate::runtime::bus::Bus;
use crate::runtime::mesh::owner_core;
use crate::runtime::outbox::{Outbox, Outgoing};
use crate::runtime::{AppConn, ConnId, Reply};

/// Close code the owner sends when it cannot take a connection (cap reached).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code when the owner node went away: reconnect, another node serves you.
pub const CLOSE_RESTART: u16 = 1012;
/// When a client may retry what needed a node it cannot reach now: about the time
/// the bus takes to reconnect, or the views to settle after a node left.
const BUS_RETRY_AFTER_MS: u64 = 1_000;

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
            Err(e) => Reply::Text(unavailable_frame(
                &format!("this conversation is served by another node, which cannot be reached now ({e})"),
                None,
                BUS_RETRY_AFTER_MS,
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
    let user: Arc<str> = who.user_id.as_str().into();
    let identity = Identity {
        user_id: user.clone(),
        name: who.name.as_str().into(),
        admin: false,
    };
    match serve(core, &edge, Some(user), identity) {
        Ok(served) => {
            core.app.served.borrow_mut().insert(edge, served);
        }
        Err(code) => close_edge_of(core, &edge, code),
    }
}

/// Registers a socket of another node on this core, its outbox drained to the bus;
/// `user` counts it against that user's cap. Refused with the close code to send.
fn serve(
    core: &Rc<Core>,
    edge: &ConnRef,
    user: Option<Arc<str>>,
    identity: Identity,
) -> Result<Served, u16> {
    let Some(bus) = core.shared.app.bus.clone() else {
        return Err(CLOSE_RESTART);
    };
    if core.gate.is_closing() {
        // Stopping: the edge's client reconnects to a node that stays.
        return Err(CLOSE_RESTART);
    }
    let outbox = Outbox::new(core.shared.config.ws_outbox_frames_max);
    let registered = core
        .registry
        .borrow_mut()
        .register(user, false, outbox.clone());
    let conn = registered.map_err(|_| CLOSE_POLICY)?;
    let chat = ChatConn::new(core.clone(), conn, identity);
    monoio::spawn(drain(core.clone(), bus, edge.clone(), outbox));
    Ok(Served { conn, chat })
}

/// The owner's side of an admin's action from another node. The admin's socket is
/// registered on this core on its first action (as no user's connection, so it
/// counts against no cap and gets no help request twice) and the action is served
/// exactly as the admin's own node would serve it.
pub fn admin_served(core: &Rc<Core>, edge: ConnRef, who: RemoteIdentity, act: RemoteAdminAct) {
    let taken = core.app.served.borrow_mut().remove(&edge);
    let served = match taken {
        Some(served) => served,
        None if matches!(act.action, AdminAction::Leave | AdminAction::Gone) => return,
        None => {
            let identity = Identity {
                user_id: who.user_id.as_str().into(),
                name: who.name.as_str().into(),
                admin: true,
            };
            match serve(core, &edge, None, identity) {
                Ok(served) => served,
                Err(_) => {
                    let why = "the node holding this session is stopping or full; retry";
                    let frame = unavailable_frame(why, act.id.as_deref(), BUS_RETRY_AFTER_MS);
                    return deliver_edge(core, &edge, frame);
                }
            }
        }
    };
    let RemoteAdminAct {
        session_id,
        action,
        id,
    } = act;
    served
        .chat
        .admin_action(session_id.into(), action, id, true);
    core.app.served.borrow_mut().insert(edge, served);
}

/// What an admin asks of a session held by another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteAdminAct {
    pub session_id: String,
    #[serde(flatten)]
    pub action: AdminAction,
    pub id: Option<String>,
}

/// Where an admin's action on `user`'s session goes: the owner node when that is
/// another one (unless `here_only`: this node was chosen already), else the
/// user's core here.
pub fn holder_of(core: &Core, user: &str, here_only: bool) -> Holder {
    if let (false, Some(bus)) = (here_only, &core.shared.app.bus) {
        let owner = bus.owner(user);
        if owner != *bus.node_id() {
            return Holder::Node {
                node: owner,
                user: user.into(),
            };
        }
    }
    Holder::Core(owner_core(user, core.shared.mesh.cores()))
}

/// A holder that can still be reached: a core always, a node while it is live.
pub fn reachable(core: &Core, holder: &Holder) -> bool {
    match (holder, &core.shared.app.bus) {
        (Holder::Node { node, .. }, Some(bus)) => bus.others().contains(node),
        _ => true,
    }
}

/// The edge's side: sends an admin's action to the node holding the session. A
/// bus that is down is `unavailable`; the admin's socket closing (`Gone`) ends its
/// registration there, which leaves every session it joined on that core.
pub fn admin_op(core: &Rc<Core>, node: &str, user: &str, op: AdminOp, id: Option<String>) {
    let Some(bus) = &core.shared.app.bus else {
        return;
    };
    let conn = op.admin.conn;
    let edge = ConnRef {
        node: bus.node_id().to_string(),
        core: core.id,
        conn,
    };
    let msg = match op.action {
        AdminAction::Gone => NodeMsg::Detach {
            edge,
            user_id: user.to_owned(),
        },
        action => NodeMsg::AdminOp {
            edge,
            admin: RemoteIdentity {
                user_id: op.admin.id.to_string(),
                name: op.admin.name.to_string(),
            },
            user_id: user.to_owned(),
            act: RemoteAdminAct {
                session_id: op.session_id.to_string(),
                action,
                id: id.clone(),
            },
        },
    };
    let gone = matches!(msg, NodeMsg::Detach { .. });
    if let Err(e) = bus.publish_to(node, msg.encode()) {
        if gone {
            return tracing::warn!(error = %e, node, "an admin's seats there end with its lease");
        }
        let why = format!("the node holding this session cannot be reached now ({e})");
        let frame = unavailable_frame(&why, id.as_deref(), BUS_RETRY_AFTER_MS);
        let _ = core
            .registry
            .borrow()
            .push_conn(conn, Outgoing::Text(frame.into()));
    }
}

/// A text frame from the edge, handled as the socket's own would be here.
pub fn text(core: &Rc<Core>, edge: ConnRef, text: &str) {
    // Taken out while it runs: handling may reach the map (a close, say).
    let Some(mut served) = core.app.served.borrow_mut().remove(&edge) else {
        // Its attach was lost (the bus was down): the edge closes it, the client
        // reconnects and attaches again.
        return close_edge_of(core, &edge, CLOSE_RESTART);
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
    end_served(core, |edge, _| edge.node == node, None);
}

/// Ends the connections served here that `which` picks, first telling their edges
/// to close them with `close` when given; returns how many.
fn end_served(
    core: &Rc<Core>,
    which: impl Fn(&ConnRef, &Served) -> bool,
    close: Option<u16>,
) -> usize {
    let edges: Vec<ConnRef> = core
        .app
        .served
        .borrow()
        .iter()
        .filter(|(edge, served)| which(edge, served))
        .map(|(edge, _)| edge.clone())
        .collect();
    for edge in &edges {
        if let Some(code) = close {
            close_edge_of(core, edge, code);
        }
        detach(core, edge);
    }
    edges.len()
}

/// Sends what the session queues for a remote connection to its edge, until the
/// connection closes here or there.
async fn drain(core: Rc<Core>, bus: Bus, edge: ConnRef, outbox: Outbox) {
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
                Outgoing::Text(frame) => send_edge(&bus, &edge, frame.to_string()),
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
    detach(&core, &edge);
}

fn send_edge(bus: &Bus, edge: &ConnRef, frame: String) {
    let msg = NodeMsg::Deliver {
        to: edge.clone(),
        frame,
    };
    let _ = bus.publish_to(&edge.node, msg.encode());
}

fn deliver_edge(core: &Core, edge: &ConnRef, frame: String) {
    if let Some(bus) = &core.shared.app.bus {
        send_edge(bus, edge, frame);
    }
}

fn close_edge_of(core: &Core, edge: &ConnRef, code: u16) {
    if let Some(bus) = &core.shared.app.bus {
        close_edge(bus, edge, code);
    }
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
    end_served(core, |_, s| *s.chat.identity.user_id == *user, None);
}

/// Tells the edges of `user`'s connections served here to close them with `code`
/// and ends them here; returns how many.
pub fn close_served_user(core: &Rc<Core>, user: &str, code: u16) -> usize {
    let users =
        |_: &ConnRef, s: &Served| *s.chat.identity.user_id == *user && !s.chat.identity.admin;
    end_served(core, users, Some(code))
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
    /// An admin's action from another node on a session this core holds.
    AdminOp(ConnRef, RemoteIdentity, RemoteAdminAct),
    Text(ConnRef, String),
    Detach(ConnRef),
    /// Close this core's socket with this code (its owner asked).
    Close(ConnId, u16),
    /// A node left: end what this core serves for it, close what it served.
    NodeGone(String),
    /// The set of live nodes changed: users another node owns now move there.
    ViewChanged,
}

/// Runs a cross-node connection request on the core it was sent to.
pub fn on_msg(core: &Rc<Core>, msg: RemoteMsg) {
    match msg {
        RemoteMsg::Attach(edge, who) => attach(core, edge, who),
        RemoteMsg::AdminOp(edge, who, act) => admin_served(core, edge, who, act),
        RemoteMsg::Text(edge, t) => text(core, edge, &t),
        RemoteMsg::Detach(edge) => detach(core, &edge),
        RemoteMsg::Close(conn, code) => {
            let close = Outgoing::Close(code, close_reason(code));
            let _ = core.registry.borrow().push_conn(conn, close);
        }
        RemoteMsg::ViewChanged => super::chat::lease::rebalance(core),
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
