//! The relay's e2e session table: for each session, the two sides' bind
//! keys and addresses. The relay's UDP glue asks it where a datagram goes;
//! it holds no keys of the nodes' QUIC connection and no stream state.
//!
//! A side starts at the address of its node's relay connection (control and
//! data share the node's one UDP socket, so one NAT mapping carries both).
//! A datagram is forwarded only when its bind key is a side's key; if it
//! comes from another address, that side is rebound there (a NAT rebinding),
//! as WireGuard and QUIC path migration do. Anything else is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;

use subtle::ConstantTimeEq;

use crate::dataplane::{session_id, SessionId};
use crate::frame::BindKey;
use crate::tunnel_id::TunnelId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub bind: BindKey,
    pub addr: SocketAddr,
    pub datagrams: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub tunnel: TunnelId,
    /// `[requester, target]`.
    pub sides: [Side; 2],
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it to `to`. `rebound`: the sender's side moved to a new address.
    Forward {
        to: SocketAddr,
        rebound: bool,
    },
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No such session (closed, or never opened).
    UnknownSession,
    /// The bind key matches neither side: forged, or from a stranger.
    BadBind,
    /// Not a QUIC packet and not a session datagram.
    Malformed,
    /// The socket could not take it now (the relay queues nothing).
    Overload,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownSession => "unknown_session",
            DropReason::BadBind => "bad_bind",
            DropReason::Malformed => "malformed",
            DropReason::Overload => "overload",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionIdTaken;

#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: HashMap<SessionId, Session>,
}

impl SessionTable {
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn get(&self, tunnel: &TunnelId) -> Option<&Session> {
        self.sessions
            .get(&session_id(tunnel))
            .filter(|s| s.tunnel == *tunnel)
    }

    /// Opens the session of `tunnel` with fresh bind keys, each side at its
    /// node's relay connection address. Returns `[requester, target]` keys.
    pub fn open(
        &mut self,
        tunnel: TunnelId,
        requester: SocketAddr,
        target: SocketAddr,
    ) -> Result<[BindKey; 2], SessionIdTaken> {
        let id = session_id(&tunnel);
        if self.sessions.contains_key(&id) {
            return Err(SessionIdTaken);
        }
        let keys: [BindKey; 2] = [rand::random(), rand::random()];
        let side = |bind, addr| Side {
            bind,
            addr,
            datagrams: 0,
            bytes: 0,
        };
        self.sessions.insert(
            id,
            Session {
                tunnel,
                sides: [side(keys[0], requester), side(keys[1], target)],
            },
        );
        Ok(keys)
    }

    pub fn close(&mut self, tunnel: &TunnelId) -> Option<Session> {
        let id = session_id(tunnel);
        if self.sessions.get(&id)?.tunnel != *tunnel {
            return None;
        }
        self.sessions.remove(&id)
    }

    /// Decides where a session datagram of `len` bytes from `from` goes.
    pub fn route(
        &mut self,
        session: SessionId,
        bind: &BindKey,
        from: SocketAddr,
        len: usize,
    ) -> Verdict {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Verdict::Drop(DropReason::UnknownSession);
        };
        // Both sides are compared, in constant time: timing tells nothing.
        let first: bool = s.sides[0].bind.ct_eq(bind).into();
        let second: bool = s.sides[1].bind.ct_eq(bind).into();
        let (me, other) = match (first, second) {
            (true, _) => (0, 1),
            (false, true) => (1, 0),
            (false, false) => return Verdict::Drop(DropReason::BadBind),
        };
        let side = &mut s.sides[me];
        let rebound = side.addr != from;
        side.addr = from;
        side.datagrams += 1;
        side.bytes += len as u64;
        Verdict::Forward {
            to: s.sides[other].addr,
            rebound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn tid(n: u8) -> TunnelId {
        TunnelId::from_bytes([n; 16])
    }

    #[test]
    fn forwards_each_side_to_the_other() {
        let mut t = SessionTable::default();
        let [a, b] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let sid = session_id(&tid(1));
        assert_eq!(
            t.route(sid, &a, addr(1), 100),
            Verdict::Forward {
                to: addr(2),
                rebound: false
            }
        );
        assert_eq!(
            t.route(sid, &b, addr(2), 100),
            Verdict::Forward {
                to: addr(1),
                rebound: false
            }
        );
        assert_eq!(t.get(&tid(1)).unwrap().sides[0].bytes, 100);
    }

    #[test]
    fn forged_and_unknown_are_dropped() {
        let mut t = SessionTable::default();
        let [a, _] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let sid = session_id(&tid(1));
        let mut forged = a;
        forged[0] ^= 1;
        assert_eq!(
            t.route(sid, &forged, addr(1), 10),
            Verdict::Drop(DropReason::BadBind)
        );
        assert_eq!(
            t.route(sid, &[0; 8], addr(9), 10),
            Verdict::Drop(DropReason::BadBind)
        );
        assert_eq!(
            t.route(sid + 1, &a, addr(1), 10),
            Verdict::Drop(DropReason::UnknownSession)
        );
        // A stranger's datagrams never moved the side.
        assert_eq!(t.get(&tid(1)).unwrap().sides[0].addr, addr(1));
    }

    #[test]
    fn the_key_rebinds_a_side_to_a_new_address() {
        let mut t = SessionTable::default();
        let [a, b] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let sid = session_id(&tid(1));
        assert_eq!(
            t.route(sid, &a, addr(7), 10),
            Verdict::Forward {
                to: addr(2),
                rebound: true
            }
        );
        assert_eq!(
            t.route(sid, &b, addr(2), 10),
            Verdict::Forward {
                to: addr(7),
                rebound: false
            }
        );
    }

    #[test]
    fn closed_sessions_route_nothing_and_ids_are_unique() {
        let mut t = SessionTable::default();
        let [a, _] = t.open(tid(1), addr(1), addr(2)).unwrap();
        assert_eq!(t.open(tid(1), addr(3), addr(4)), Err(SessionIdTaken));
        // Same first 8 bytes, another tunnel: the id is taken too.
        let mut other = [1u8; 16];
        other[15] = 2;
        assert_eq!(
            t.open(TunnelId::from_bytes(other), addr(3), addr(4)),
            Err(SessionIdTaken)
        );
        assert!(t.close(&TunnelId::from_bytes(other)).is_none());
        assert!(t.close(&tid(1)).is_some());
        assert_eq!(
            t.route(session_id(&tid(1)), &a, addr(1), 1),
            Verdict::Drop(DropReason::UnknownSession)
        );
        assert!(t.is_empty());
    }
}
