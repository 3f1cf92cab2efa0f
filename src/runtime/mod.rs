//! The thread-per-core runtime: accepting, handing sockets to their owning core,
//! the per-core connection registry and outboxes, the cross-core mesh, the
//! WebSocket codec and connection loop, the HTTP front door and socket I/O.
//!
//! It knows nothing of chat, storage, models or notifications. An application
//! plugs in through the [`App`] trait: it gets each authenticated connection's
//! text frames, its own typed message on the mesh, the HTTP paths the runtime does
//! not serve itself, and a hook per core for its background tasks.

pub mod addr;
pub mod app;
pub mod bus;
pub mod core;
pub mod gate;
pub mod http;
pub mod io;
pub mod mesh;
pub mod outbox;
pub mod registry;
pub(crate) mod rules;
pub mod server;
pub mod ws;

pub use app::{App, AppConn, Hooks, Reply};
pub use core::{Core, Shared};
pub use registry::ConnId;
pub use server::{start, Driver, RunError, ServerHandle, ShutdownTrigger, StartError};
