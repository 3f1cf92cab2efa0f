//! WebSocket connections: the upgrade decision and the per-connection driver.

pub mod codec;
pub mod conn;
pub mod handler;
pub mod handshake;
