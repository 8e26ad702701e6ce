//! QUIC application close codes of a relay connection, so a node can tell
//! why its relay closed it (and, `REPLACED`, that it must not come back).

pub const NORMAL: u32 = 0;
pub const PROTOCOL_ERROR: u32 = 1;
/// Another connection with this node's name and key took the name over.
pub const REPLACED: u32 = 2;
pub const REFUSED: u32 = 3;
pub const IDENTIFY_TIMEOUT: u32 = 4;
pub const CONTROL_BACKLOG: u32 = 5;
