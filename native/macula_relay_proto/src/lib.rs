//! The macula dist relay protocol without any I/O.
//!
//! - [`frame`]: the control-stream codec (4-byte length + MessagePack map).
//! - [`tunnel_id`]: the 32-hex-character tunnel ids that prefix tunnel streams.
//! - [`router`]: the relay's routing table (nodes, tunnels, replacement, cleanup).
//! - [`matcher`]: the client's tunnel matcher (pending FIFO, orphan streams, prefixes).
//! - [`packet`]: the 2/4-byte length framing of Erlang distribution in a tunnel.
//!
//! Everything here is plain data in, plain data out, so relay and client
//! share one tested implementation and the async glue around it stays thin.

pub mod frame;
pub mod matcher;
pub mod packet;
pub mod router;
pub mod tunnel_id;

pub use frame::{DecodeError, FrameDecoder, Message, DEFAULT_MAX_FRAME};
pub use tunnel_id::TunnelId;

/// ALPN protocol id spoken on every relay connection.
pub const ALPN: &[u8] = b"macula-dist";
/// The relay's default UDP port.
pub const DEFAULT_PORT: u16 = 4434;
/// The protocol version this crate speaks (sent as `v` in identify).
pub const PROTOCOL_VERSION: u64 = 1;
