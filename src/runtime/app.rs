//! The seam between the runtime and the application it serves: one trait for the
//! application, one for each of its connections, and the test hooks.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use tungstenite::protocol::frame::coding::CloseCode;

use super::core::Core;
use super::registry::ConnId;
use crate::auth::Identity;

/// An HTTP response body: whole ([`full`]), or sent page by page as another
/// thread produces it ([`super::http::paged`]).
pub type Body = http_body_util::Either<Full<Bytes>, super::http::PagedBody>;

/// A whole response body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Either::Left(Full::new(bytes.into()))
}

/// An application served by the runtime. Every method runs on a core thread;
/// `core` is the core that calls, and all state reached through it is that core's.
pub trait App: Sized + 'static {
    /// Read-only state every core shares (settings, storage handles).
    type Shared: Send + Sync + 'static;
    /// State one core owns; `!Send` is expected (plain `RefCell` data).
    type CoreState: 'static;
    /// The application's own cross-core message, carried by the mesh.
    type Msg: Send + 'static;
    /// One authenticated WebSocket connection's application state.
    type Conn: AppConn;

    /// Creates a core's application state when the core starts.
    fn core_state(shared: &Self::Shared, core_id: usize) -> Self::CoreState;
    /// Starts the core's background tasks (they stop when `core.gate` closes).
    fn spawn_tasks(core: &Rc<Core<Self>>);
    /// An authenticated WebSocket connection opened on its owning core.
    fn open(core: &Rc<Core<Self>>, conn: ConnId, identity: Identity) -> Self::Conn;
    /// A message another core (or this one) sent through the mesh.
    fn on_msg(core: &Rc<Core<Self>>, msg: Self::Msg);
    /// `/readyz`: `Err(reason)` while a dependency is unreachable.
    fn ready(core: &Rc<Core<Self>>) -> impl Future<Output = Result<(), String>>;
    /// `/readyz` while ready: what the node serves only in part (its bus to the
    /// other nodes is down, say). A degraded node stays ready: taking it out of the
    /// load balancer would cost its users more than the part it cannot serve.
    fn degraded(_core: &Rc<Core<Self>>) -> Option<String> {
        None
    }
    /// The largest request body the front door lets through to `path` (prefix
    /// stripped), refused with 413 when `Content-Length` says more; an endpoint
    /// with a limit of its own (uploads) enforces it while it reads.
    fn body_bytes_max(core: &Rc<Core<Self>>, _path: &str) -> u64 {
        core.shared.config.http_body_bytes_max as u64
    }
    /// How long a plain HTTP request to `path` (prefix stripped) may take in all,
    /// head, body and response.
    fn request_timeout(core: &Rc<Core<Self>>, _path: &str) -> std::time::Duration {
        std::time::Duration::from_millis(core.shared.config.http_request_timeout_ms)
    }
    /// Every HTTP request under the prefix that the runtime does not serve itself
    /// (`path` has the prefix stripped). Answers 404 for what it does not know.
    fn http(
        core: &Rc<Core<Self>>,
        req: Request<hyper::body::Incoming>,
        path: &str,
    ) -> impl Future<Output = Response<Body>>;
    /// Prometheus text the application adds to `/metrics`.
    fn render_metrics(shared: &Self::Shared) -> String;
    /// Shutdown's first step on each core, while requests get 503: finish or stop
    /// the work under way, giving it until `grace` to end on its own. The runtime
    /// cuts it off at `deadline`.
    fn drain(
        core: &Rc<Core<Self>>,
        grace: monoio::time::Instant,
        deadline: monoio::time::Instant,
    ) -> impl Future<Output = ()>;
    /// Runs once after every core stopped: flush what must not be lost, by
    /// `deadline`. `Err` says what could not be saved (the process exits non-zero).
    fn stopped(
        shared: &Self::Shared,
        hooks: &Hooks,
        deadline: std::time::Instant,
    ) -> Result<(), String>;
}

/// What one authenticated connection does with its messages. The runtime has
/// already applied the flood guard and the size limits.
pub trait AppConn: 'static {
    /// A text message; the reply goes out in the same write as the others of
    /// this read.
    fn on_text(&mut self, text: &str) -> Reply;
    /// A binary message. Refused unless the application says otherwise.
    fn on_binary(&mut self, _data: &[u8]) -> Reply {
        Reply::Close(CloseCode::Unsupported, "binary frames are not supported")
    }
}

/// What the connection loop should do after a message.
pub enum Reply {
    None,
    Text(String),
    Binary(Vec<u8>),
    Close(CloseCode, &'static str),
}

/// A callback shared by every core.
pub type TextHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Test seams injected at start-up; `Hooks::default()` in production.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called with every text message before it is handled (a test makes it panic).
    pub on_text: Option<TextHook>,
    /// Debug builds only: called with the name of each fault point a task passes
    /// (`answer`, `store_reply`, `takeover`, `resume`, `expiry`, `flush`), so a test can make
    /// that task panic. Release builds have no such field and no such calls.
    #[cfg(debug_assertions)]
    pub fault: Option<TextHook>,
}

impl Hooks {
    /// Passes fault point `point` (see [`Hooks::fault`]); nothing in release builds.
    #[inline]
    pub fn fault_point(&self, point: &str) {
        #[cfg(debug_assertions)]
        if let Some(hook) = &self.fault {
            hook(point);
        }
        let _ = point;
    }
}
