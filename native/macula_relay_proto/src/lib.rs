//! The macula dist relay protocol without any I/O, grouped by who uses it:
//!
//! - [`wire`]: the formats on the wire, shared by relay and node: the
//!   control-stream codec ([`wire::frame`]), tunnel ids
//!   ([`wire::tunnel_id`]), the e2e datagram header ([`wire::dataplane`]),
//!   the 2/4-byte packet framing of Erlang distribution ([`wire::packet`]),
//!   and the close codes of relay connections ([`wire::close_code`]).
//! - [`relay`]: the relay's tables: routing ([`relay::router`]), e2e
//!   sessions ([`relay::sessions`]), admission of unidentified connections
//!   ([`relay::admission`]).
//! - [`node`]: the node's machines: what a relay client does with each
//!   control message ([`node::control`]), the tunnel matcher
//!   ([`node::matcher`]), the session map quinn sees ([`node::paths`]),
//!   direct paths ([`node::direct`]), and the PAKE that opens an e2e
//!   session ([`node::session_auth`]).
//! - [`ratelimit`]: rate limits for log lines bad input can cause (both).
//!
//! Everything here is plain data in, plain data out, so relay and client
//! share one tested implementation and the async glue around it stays thin.

pub mod node;
pub mod ratelimit;
pub mod relay;
pub mod wire;

pub use wire::frame::{BindKey, DecodeError, FrameDecoder, Message, Mode, DEFAULT_MAX_FRAME};
pub use wire::tunnel_id::TunnelId;

/// ALPN protocol id spoken on every relay connection.
pub const ALPN: &[u8] = b"macula-dist";
/// ALPN protocol id of the QUIC connection of an e2e session (node to
/// node). `/2`: the data phase runs on lanes by sender
/// ([`node::dist_route`]); a node of the first e2e version has no lanes,
/// so it fails the TLS handshake rather than stall.
pub const ALPN_E2E: &[u8] = b"macula-dist-e2e/2";
/// The relay's default UDP port.
pub const DEFAULT_PORT: u16 = 4434;
/// The protocol version this crate speaks (sent as `v` in identify and
/// `id_ok`): 5 = 4, but when a node's relay connection ends, the relay
/// tells its sessions' other sides `sess_lost` (not `tun_close`), and
/// when a node claims a session (`sess_keep`) the relay tells the peer
/// named, if it is here, `sess_claimed`: so a session whose one side lost
/// a relay meets again at another relay both share. 4 = 3, but the relay forwards no candidates between nodes
/// (nodes exchange them inside their authenticated e2e session); right
/// after `id_ok` it tells a node of version 4 or more the address it sees
/// that node at (`cand` without `tid`: the node's reflexive address), and
/// again when that address changes; a node's own `cand` is ignored. 3 adds
/// direct paths (`cand`, `sess_path`); 2 adds end-to-end sessions; 1 is
/// stream tunnels only.
pub const PROTOCOL_VERSION: u64 = 5;
/// The first version with direct paths (`sess_path`, `cand`).
pub const DIRECT_VERSION: u64 = 3;
/// The first version the relay tells its reflexive address (`cand`
/// without `tid`) and forwards no candidates to.
pub const REFLEXIVE_VERSION: u64 = 4;
/// The first version told `sess_lost` and `sess_claimed`.
pub const MOVE_VERSION: u64 = 5;

/// How long a session that lost a side waits for its sides to claim it
/// back (`sess_keep`): a node's reconnect, or a relay restart.
pub const KEEP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
