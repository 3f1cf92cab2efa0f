//! One authenticated WebSocket connection's chat state: parses each text frame
//! and dispatches it to the command that handles it.

use std::cell::OnceCell;
use std::rc::Rc;
use std::sync::Arc;

use super::chat::extra::Extra;
use super::chat::message::{self, Pending};
use super::chat::session::Target;
use super::chat::takeover::{self, AdminAction, AdminOp, AdminRef, Joined};
use super::chat::{resume, with_session};
use super::frames::{error_frame, ClientFrame, Code, Incoming, Refused, ServerFrame};
use super::Core;
use crate::auth::Identity;
use crate::clock::now_ms;
use crate::runtime::{AppConn, ConnId, Reply};
use tungstenite::protocol::frame::coding::CloseCode;

pub struct ChatConn {
    pub conn: ConnId,
    pub identity: Identity,
    core: Rc<Core>,
    /// For admins: the sessions this connection joined, and the core owning each.
    joined: OnceCell<Joined>,
    /// Cluster: the user is served by another node; frames go there.
    proxy: Option<super::remote::Proxy>,
}

impl AppConn for ChatConn {
    /// Each message is a span of the connection's trace: its log lines, and those
    /// of the work it starts (storage, the answer, notifications), carry
    /// `trace_id` and its own `span_id`.
    fn on_text(&mut self, text: &str) -> Reply {
        let ctx = crate::trace::current().unwrap_or_default().child();
        let span = tracing::info_span!(
            "msg",
            trace_id = %ctx.trace_id,
            span_id = %ctx.span_id,
            user = %self.identity.user_id,
        );
        crate::trace::scope(Some(ctx), || span.in_scope(|| self.handle(text)))
    }
}

impl ChatConn {
    fn handle(&mut self, text: &str) -> Reply {
        if let Some(proxy) = &self.proxy {
            return self.on_proxied_text(proxy, text);
        }
        let core = &self.core;
        match core.app.parse(text, &core.shared.app.limits) {
            Err(Refused::TooDeep) => Reply::Close(CloseCode::Policy, "JSON nested too deeply"),
            Err(Refused::Error { id, message }) => {
                core.metrics().invalid_frames.inc();
                Reply::Text(error_frame(Code::InvalidMessage, &message, id.as_deref()))
            }
            Ok(incoming) => self.dispatch(incoming).map_or(Reply::None, Reply::Text),
        }
    }

    /// A connection of this node; its user's sessions are on this core.
    pub fn new(core: Rc<Core>, conn: ConnId, identity: Identity) -> ChatConn {
        ChatConn {
            conn,
            identity,
            core,
            joined: OnceCell::new(),
            proxy: None,
        }
    }

    /// A proxied socket's token lives here, at its edge: a refresh is handled here
    /// (parsed only when the text can be one), everything else by the owner.
    fn on_proxied_text(&self, proxy: &super::remote::Proxy, text: &str) -> Reply {
        if text.contains("auth_refresh") {
            let core = &self.core;
            if let Ok(inc) = core.app.parse(text, &core.shared.app.limits) {
                if let ClientFrame::AuthRefresh { token } = &inc.frame {
                    return Reply::Text(self.refresh(token, inc.id.as_deref()));
                }
            }
        }
        proxy.on_text(text)
    }

    /// A socket that arrived here: in a cluster, served by its user's owner node
    /// when that is another one.
    pub fn open(core: Rc<Core>, conn: ConnId, identity: Identity) -> ChatConn {
        let proxy = super::remote::Proxy::for_conn(&core, conn, &identity);
        let mut chat = ChatConn::new(core, conn, identity);
        chat.proxy = proxy;
        chat
    }

    // Long: one arm per client frame type, the dispatch table of the protocol.
    /// Handles one valid frame. Returns an immediate reply for this connection;
    /// everything else arrives through the outboxes of the session's connections.
    fn dispatch(&self, inc: Incoming) -> Option<String> {
        let (core, user, id) = (&self.core, &self.identity.user_id, inc.id);
        match inc.frame {
            ClientFrame::UserMessage {
                session_id,
                content,
                model_id,
                metadata,
                file_url,
            } => match core.shared.app.models.pick(model_id.as_deref()) {
                Ok(model) => {
                    let msg = Pending {
                        id,
                        content,
                        model,
                        received: std::time::Instant::now(),
                        file: None,
                        extra: Extra::from_frame(file_url, metadata),
                        voice: None,
                    };
                    message::user_message(core, self.conn, user, session_id, msg)
                }
                Err(why) => Some(error_frame(Code::InvalidMessage, &why, id.as_deref())),
            },
            ClientFrame::Resume {
                session_id,
                after_seq,
            } => {
                let conn = self.conn;
                with_session(
                    core,
                    self.conn,
                    user,
                    session_id.into(),
                    id,
                    move |core, sid| resume::resume(core, sid, conn, after_seq),
                );
                None
            }
            ClientFrame::History {
                session_id,
                before_seq,
                limit,
            } => {
                let to = Target::Local(self.conn);
                with_session(core, self.conn, user, session_id.into(), id.clone(), {
                    move |core, sid| resume::history_page(core, sid, to, before_seq, limit, id)
                });
                None
            }
            ClientFrame::Cancel { session_id } => {
                message::cancel(core, user, &session_id, id.as_deref())
            }
            ClientFrame::AdminJoin { .. }
            | ClientFrame::AdminWatch { .. }
            | ClientFrame::AdminMessage { .. }
            | ClientFrame::AdminLeave { .. }
                if !self.identity.admin =>
            {
                Some(error_frame(
                    Code::Forbidden,
                    "admin frames need the admin role",
                    id.as_deref(),
                ))
            }
            ClientFrame::AdminJoin { session_id } => self.admin(session_id, AdminAction::Join, id),
            ClientFrame::AdminWatch { session_id } => {
                self.admin(session_id, AdminAction::Watch, id)
            }
            ClientFrame::AdminMessage {
                session_id,
                content,
            } => {
                let action = AdminAction::Message {
                    content,
                    client_id: id.clone(),
                };
                self.admin(session_id, action, id)
            }
            ClientFrame::AdminLeave { session_id } => {
                self.admin(session_id, AdminAction::Leave, id)
            }
            ClientFrame::HelpRequest { session_id } => {
                let (me, conn) = (self.identity.clone(), self.conn);
                with_session(core, conn, user, session_id.into(), id, move |core, sid| {
                    takeover::help_request(core, sid, &me, conn)
                });
                None
            }
            ClientFrame::AuthRefresh { token } => Some(self.refresh(&token, id.as_deref())),
            ClientFrame::FileMessage {
                session_id,
                file_id,
                content,
                voice,
            } => match core.shared.app.models.pick(None) {
                Ok(model) => {
                    let msg = Pending {
                        id,
                        // A voice message's content is its transcript, once made.
                        content: content.filter(|_| !voice).unwrap_or_default(),
                        model,
                        received: std::time::Instant::now(),
                        file: None,
                        extra: None,
                        voice: None,
                    };
                    let attach = message::Attach { file_id, voice };
                    message::file_message(core, self.conn, user, session_id, attach, msg)
                }
                Err(why) => Some(error_frame(Code::InvalidMessage, &why, id.as_deref())),
            },
        }
    }

    /// `auth_refresh`: a valid token for the same user (keeping the admin role if
    /// the connection has it) moves the connection's expiry to its `exp`. Anything
    /// else is one `unauthorized` error and the old expiry stands. Roles are those
    /// of the token the connection opened with: a refresh cannot add one.
    fn refresh(&self, token: &str, id: Option<&str>) -> String {
        let core = &self.core;
        let refused = match core.shared.verifier.verify_until(token) {
            Err(e) => {
                tracing::debug!(conn = self.conn, error = %e, "auth_refresh refused");
                "the token is not valid"
            }
            Ok((who, _)) if who.user_id != self.identity.user_id => "the token is for another user",
            Ok((who, _)) if self.identity.admin && !who.admin => {
                "the token lacks the admin role this connection has"
            }
            // Accepted within the leeway but already past: it could not extend anything.
            Ok((_, exp))
                if i64::try_from(exp).is_ok_and(|e| e.saturating_mul(1000) <= now_ms()) =>
            {
                "the token is expired"
            }
            Ok((_, exp)) => {
                core.registry.borrow().set_expiry(self.conn, exp);
                tracing::debug!(conn = self.conn, exp, "token refreshed");
                return ServerFrame::AuthRefreshed {
                    expires_at: exp,
                    id,
                }
                .to_json();
            }
        };
        error_frame(Code::Unauthorized, refused, id)
    }

    fn admin_ref(&self) -> AdminRef {
        AdminRef {
            id: self.identity.user_id.clone(),
            name: self.identity.name.clone(),
            core: self.core.id,
            conn: self.conn,
        }
    }

    fn admin(&self, session_id: String, action: AdminAction, id: Option<String>) -> Option<String> {
        self.admin_action(session_id.into(), action, id, false);
        None
    }

    /// Routes an admin's action; `here_only` when this node serves it for the
    /// admin's own node, which found the session's owner already.
    pub fn admin_action(
        &self,
        session_id: Arc<str>,
        action: AdminAction,
        id: Option<String>,
        here_only: bool,
    ) {
        let op = AdminOp {
            session_id,
            admin: self.admin_ref(),
            action,
        };
        let joined = self.joined.get_or_init(Rc::default);
        takeover::route(&self.core, joined, op, id, here_only);
    }
}

impl Drop for ChatConn {
    fn drop(&mut self) {
        if let Some(proxy) = &self.proxy {
            return proxy.detach(&self.core);
        }
        self.core.app.detach_conn(self.conn);
        let joined: Vec<(Arc<str>, takeover::Holder)> = self
            .joined
            .get()
            .map(|j| j.held.borrow_mut().drain().collect())
            .unwrap_or_default();
        if !joined.is_empty() {
            takeover::admin_gone(&self.core, self.admin_ref(), joined);
        }
        super::chat::answer::orphaned(&self.core);
    }
}
