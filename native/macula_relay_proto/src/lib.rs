//! The macula dist relay protocol without any I/O.
//!
//! - [`frame`]: the control-stream codec (4-byte length + MessagePack map).
//! - [`tunnel_id`]: the 32-hex-character tunnel ids that prefix tunnel streams.
//! - [`router`]: the relay's routing table (nodes, tunnels, replacement, cleanup).
//! - [`matcher`]: the client's tunnel matcher (pending FIFO, orphan streams, prefixes).
//! - [`packet`]: the 2/4-byte length framing of Erlang distribution in a tunnel.
//! - [`dataplane`]: the header of e2e session datagrams, told from QUIC by their first byte.
//! - [`session_auth`]: the PAKE and candidate exchange that open an e2e session's stream.
//! - [`sessions`]: the relay's e2e session table (who may send for a session, where it goes).
//! - [`paths`]: the node's map between e2e sessions and the virtual addresses quinn sees.
//! - [`admission`]: the relay's caps on unidentified connections, and when to send Retry.
//! - [`ratelimit`]: rate limits for log lines about bad input.
//!
//! Everything here is plain data in, plain data out, so relay and client
//! share one tested implementation and the async glue around it stays thin.

pub mod admission;
pub mod dataplane;
pub mod direct;
pub mod frame;
pub mod matcher;
pub mod packet;
pub mod paths;
pub mod ratelimit;
pub mod router;
pub mod session_auth;
pub mod sessions;
pub mod tunnel_id;

pub use frame::{BindKey, DecodeError, FrameDecoder, Message, Mode, DEFAULT_MAX_FRAME};
pub use tunnel_id::TunnelId;

/// ALPN protocol id spoken on every relay connection.
pub const ALPN: &[u8] = b"macula-dist";
/// ALPN protocol id of the QUIC connection of an e2e session (node to node).
pub const ALPN_E2E: &[u8] = b"macula-dist-e2e";
/// The relay's default UDP port.
pub const DEFAULT_PORT: u16 = 4434;
/// The protocol version this crate speaks (sent as `v` in identify and
/// `id_ok`): 4 = 3, but the relay forwards no candidates between nodes
/// (nodes exchange them inside their authenticated e2e session); right
/// after `id_ok` it tells a node of version 4 or more the address it sees
/// that node at (`cand` without `tid`: the node's reflexive address), and
/// again when that address changes; a node's own `cand` is ignored. 3 adds
/// direct paths (`cand`, `sess_path`); 2 adds end-to-end sessions; 1 is
/// stream tunnels only.
pub const PROTOCOL_VERSION: u64 = 4;
/// The first version with direct paths (`sess_path`, `cand`).
pub const DIRECT_VERSION: u64 = 3;
/// The first version the relay tells its reflexive address (`cand`
/// without `tid`) and forwards no candidates to.
pub const REFLEXIVE_VERSION: u64 = 4;
