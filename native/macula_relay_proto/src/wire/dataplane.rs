//! The data plane of e2e sessions: QUIC datagrams between two nodes, sent
//! through the relay behind a small header.
//!
//! ```text
//! 0        1                 9                 17
//! +--------+-----------------+-----------------+----------------------+
//! | 0x01   | session id (BE) | bind key        | inner QUIC datagram  |
//! +--------+-----------------+-----------------+----------------------+
//! ```
//!
//! The relay's one UDP port carries both planes. Every QUIC v1 packet has
//! the fixed bit (0x40) set in its first byte, and the header's first byte
//! does not, so one byte tells them apart (RFC 9443 does the same for
//! STUN/DTLS/QUIC); quinn must not grease that bit (`grease_quic_bit`).
//!
//! A node puts its side's bind key (from `tun_ok` / `tun_notify`) in every
//! datagram it sends; the relay forwards only datagrams whose key matches a
//! side of the session, to the other side, with the key field zeroed so the
//! receiver never learns the sender's key. The session id is the first 8
//! bytes of the tunnel id.

use crate::wire::frame::BindKey;
use crate::wire::tunnel_id::TunnelId;

/// First byte of a session datagram.
pub const SESSION_DATAGRAM: u8 = 0x01;
/// Bytes in front of the inner QUIC datagram.
pub const HEADER_LEN: usize = 17;
/// The bind key field as the relay forwards it.
pub const NO_BIND: BindKey = [0; 8];

pub type SessionId = u64;

/// The session id of an e2e tunnel.
pub fn session_id(tunnel: &TunnelId) -> SessionId {
    let b = tunnel.as_bytes();
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// What a UDP datagram on a shared port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// A QUIC packet (fixed bit set): the endpoint's own traffic.
    Quic,
    /// A session datagram; the inner QUIC datagram follows the header.
    Session { session: SessionId, bind: BindKey },
    /// Neither (empty, too short, or an unknown first byte): dropped.
    Invalid,
}

pub fn classify(datagram: &[u8]) -> Datagram {
    match datagram.first() {
        Some(b) if b & 0x40 != 0 => Datagram::Quic,
        Some(&SESSION_DATAGRAM) if datagram.len() > HEADER_LEN => {
            let mut id = [0u8; 8];
            id.copy_from_slice(&datagram[1..9]);
            let mut bind = [0u8; 8];
            bind.copy_from_slice(&datagram[9..17]);
            Datagram::Session {
                session: SessionId::from_be_bytes(id),
                bind,
            }
        }
        _ => Datagram::Invalid,
    }
}

pub fn header(session: SessionId, bind: &BindKey) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = SESSION_DATAGRAM;
    h[1..9].copy_from_slice(&session.to_be_bytes());
    h[9..17].copy_from_slice(bind);
    h
}

/// Zeroes the bind key of a session datagram in place (the relay does this
/// before forwarding).
pub fn clear_bind(datagram: &mut [u8]) {
    if datagram.len() >= HEADER_LEN {
        datagram[9..17].copy_from_slice(&NO_BIND);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut d = header(0x0102_0304_0506_0708, &[9; 8]).to_vec();
        d.extend_from_slice(b"\x40inner");
        assert_eq!(
            classify(&d),
            Datagram::Session {
                session: 0x0102_0304_0506_0708,
                bind: [9; 8]
            }
        );
        clear_bind(&mut d);
        assert_eq!(
            classify(&d),
            Datagram::Session {
                session: 0x0102_0304_0506_0708,
                bind: NO_BIND
            }
        );
    }

    #[test]
    fn quic_and_garbage_are_told_apart() {
        assert_eq!(classify(&[0xc0, 0, 0]), Datagram::Quic); // long header
        assert_eq!(classify(&[0x41, 1, 2]), Datagram::Quic); // short header
        assert_eq!(classify(&[]), Datagram::Invalid);
        assert_eq!(classify(&[0x02; 40]), Datagram::Invalid);
        // A header with nothing inside carries nothing to forward.
        assert_eq!(classify(&header(1, &[1; 8])), Datagram::Invalid);
    }

    #[test]
    fn session_id_is_the_tunnel_prefix() {
        let t = TunnelId::from_bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(session_id(&t), 0x0102_0304_0506_0708);
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics(d in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = classify(&d);
        }
    }
}
