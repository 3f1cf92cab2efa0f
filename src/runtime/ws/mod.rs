//! WebSocket connections: the upgrade decision, the RFC 6455 codec, and the
//! per-connection driver with its flood guard.

pub mod codec;
pub mod conn;
pub mod handler;
pub mod handshake;
