//! What relay and node send each other, and nodes send each other through
//! a relay: formats only, no state.

pub mod close_code;
pub mod dataplane;
pub mod frame;
pub mod packet;
pub mod tunnel_id;
