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
use std::time::{Duration, Instant};

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

/// How long a session that lost a side waits for its sides to claim it
/// back (`sess_keep`): a node's reconnect, or a relay restart.
pub const KEEP_WAIT: Duration = Duration::from_secs(10);
/// Sessions waiting to be claimed back, at most.
pub const MAX_WAITING: usize = 65_536;
/// Of those, first claimed by one node (a restarted relay knows nothing, so
/// anyone identified can make up claims: they must not crowd out others').
pub const MAX_WAITING_PER_NODE: usize = 1024;

/// One side of a session waiting to be claimed back.
#[derive(Debug, Clone)]
struct WaitingSide {
    bind: BindKey,
    addr: SocketAddr,
    name: String,
    peer: String,
    /// Claimed back with `sess_keep`.
    claimed: bool,
    /// Still connected when the other side left: it never lost the
    /// session, and counts as claiming it while its node is connected.
    stayed: bool,
}

#[derive(Debug, Clone)]
struct Waiting {
    tunnel: TunnelId,
    sides: Vec<WaitingSide>,
    since: Instant,
    /// The node whose claim made this entry (none: remembered on a departure).
    opened_by: Option<String>,
}

/// What a side's claim (`sess_keep`) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// The session is live: the claimant's side is now at its address.
    Rebound,
    /// Both sides have claimed it: it is live again, between these names.
    Restored([String; 2]),
    /// Waiting for the other side's claim.
    Waiting,
    /// Not this side's bind key or name, or too many sessions waiting.
    Refused,
}

#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: HashMap<SessionId, Session>,
    /// Sessions that lost a side (or that a restarted relay never knew),
    /// by the claims of their sides so far.
    waiting: HashMap<SessionId, Waiting>,
    /// Waiting entries each node's claim made.
    waiting_by: HashMap<String, usize>,
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
        self.insert(tunnel, [(keys[0], requester), (keys[1], target)]);
        Ok(keys)
    }

    fn insert(&mut self, tunnel: TunnelId, sides: [(BindKey, SocketAddr); 2]) {
        let sides = sides.map(|(bind, addr)| Side {
            bind,
            addr,
            datagrams: 0,
            bytes: 0,
        });
        self.sessions
            .insert(session_id(&tunnel), Session { tunnel, sides });
    }

    pub fn close(&mut self, tunnel: &TunnelId) -> Option<Session> {
        let id = session_id(tunnel);
        if self.sessions.get(&id)?.tunnel != *tunnel {
            return None;
        }
        self.sessions.remove(&id)
    }

    /// Keeps a session closed because a side left, so that the sides can
    /// claim it back for [`KEEP_WAIT`]: `names` are its sides' node names,
    /// `present` says which sides are still connected (they count as
    /// claiming it for as long as they stay connected).
    pub fn remember(
        &mut self,
        session: Session,
        names: [String; 2],
        present: [bool; 2],
        now: Instant,
    ) {
        self.expire(now);
        if self.waiting.len() >= MAX_WAITING {
            return;
        }
        let sides = (0..2)
            .map(|i| WaitingSide {
                bind: session.sides[i].bind,
                addr: session.sides[i].addr,
                name: names[i].clone(),
                peer: names[1 - i].clone(),
                claimed: false,
                stayed: present[i],
            })
            .collect();
        let replaced = self.waiting.insert(
            session_id(&session.tunnel),
            Waiting {
                tunnel: session.tunnel,
                sides,
                since: now,
                opened_by: None,
            },
        );
        if let Some(old) = replaced {
            self.forget_opener(&old);
        }
    }

    /// Node `name`, now at `addr`, claims the session `tunnel` with `peer`
    /// under its bind key. Only a side's own key and name pass: the session
    /// id and the keys are secrets of the two nodes (and this relay).
    /// `connected` tells whether a node is connected now.
    #[allow(clippy::too_many_arguments)]
    pub fn keep(
        &mut self,
        tunnel: TunnelId,
        bind: BindKey,
        addr: SocketAddr,
        name: &str,
        peer: &str,
        now: Instant,
        connected: &dyn Fn(&str) -> bool,
    ) -> Kept {
        self.expire(now);
        let id = session_id(&tunnel);
        if let Some(s) = self.sessions.get_mut(&id) {
            if s.tunnel != tunnel {
                return Kept::Refused;
            }
            return match s
                .sides
                .iter_mut()
                .find(|side| bool::from(side.bind.ct_eq(&bind)))
            {
                Some(side) => {
                    side.addr = addr;
                    Kept::Rebound
                }
                None => Kept::Refused,
            };
        }
        let claim = WaitingSide {
            bind,
            addr,
            name: name.to_owned(),
            peer: peer.to_owned(),
            claimed: true,
            stayed: false,
        };
        let Some(w) = self.waiting.get_mut(&id) else {
            let by = self.waiting_by.entry(name.to_owned()).or_default();
            if self.waiting.len() >= MAX_WAITING || *by >= MAX_WAITING_PER_NODE {
                return Kept::Refused;
            }
            *by += 1;
            self.waiting.insert(
                id,
                Waiting {
                    tunnel,
                    sides: vec![claim],
                    since: now,
                    opened_by: Some(name.to_owned()),
                },
            );
            return Kept::Waiting;
        };
        if w.tunnel != tunnel {
            return Kept::Refused;
        }
        let pairs_up = w.sides.len() == 1 && w.sides[0].peer == name && w.sides[0].name == peer;
        match w
            .sides
            .iter()
            .position(|side| bool::from(side.bind.ct_eq(&bind)))
        {
            Some(i) if w.sides[i].name == name => {
                w.sides[i].addr = addr;
                w.sides[i].claimed = true;
            }
            Some(_) => return Kept::Refused,
            // The other side's first claim: it must name the same pair.
            None if pairs_up => w.sides.push(claim),
            None => return Kept::Refused,
        }
        let holds = |side: &WaitingSide| side.claimed || (side.stayed && connected(&side.name));
        if w.sides.len() < 2 || !w.sides.iter().all(holds) {
            return Kept::Waiting;
        }
        let Some(w) = self.waiting.remove(&id) else {
            return Kept::Refused;
        };
        self.forget_opener(&w);
        let [a, b] = [&w.sides[0], &w.sides[1]];
        self.insert(tunnel, [(a.bind, a.addr), (b.bind, b.addr)]);
        Kept::Restored([a.name.clone(), b.name.clone()])
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<SessionId> = self
            .waiting
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.since) >= KEEP_WAIT)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(w) = self.waiting.remove(&id) {
                self.forget_opener(&w);
            }
        }
    }

    fn forget_opener(&mut self, w: &Waiting) {
        if let Some(name) = &w.opened_by {
            if let Some(n) = self.waiting_by.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    self.waiting_by.remove(name);
                }
            }
        }
    }

    /// Sessions waiting to be claimed back.
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
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

    fn keep(
        t: &mut SessionTable,
        tunnel: TunnelId,
        bind: BindKey,
        port: u16,
        name: &str,
        peer: &str,
    ) -> Kept {
        t.keep(
            tunnel,
            bind,
            addr(port),
            name,
            peer,
            Instant::now(),
            &|_| true,
        )
    }

    /// A node whose relay connection ended claims its session back, and
    /// the other side (still here) counts as having claimed it.
    #[test]
    fn a_side_that_left_claims_its_session_back() {
        let mut t = SessionTable::default();
        let [a, b] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let s = t.close(&tid(1)).unwrap();
        t.remember(s, ["a".into(), "b".into()], [false, true], Instant::now());
        // A stranger with a made-up key, or b's key under another name: no.
        assert_eq!(keep(&mut t, tid(1), [9; 8], 5, "a", "b"), Kept::Refused);
        assert_eq!(keep(&mut t, tid(1), b, 5, "m", "a"), Kept::Refused);
        assert_eq!(
            keep(&mut t, tid(1), a, 3, "a", "b"),
            Kept::Restored(["a".into(), "b".into()])
        );
        let sid = session_id(&tid(1));
        assert_eq!(
            t.route(sid, &b, addr(2), 10),
            Verdict::Forward {
                to: addr(3),
                rebound: false
            }
        );
        // Claimed while live: the side moves.
        assert_eq!(keep(&mut t, tid(1), b, 4, "b", "a"), Kept::Rebound);
        assert_eq!(
            t.route(sid, &a, addr(3), 10),
            Verdict::Forward {
                to: addr(4),
                rebound: false
            }
        );
    }

    /// A restarted relay knows nothing: the two sides' claims make the
    /// session, and only claims that name each other pair up.
    #[test]
    fn a_restarted_relay_rebuilds_a_session_from_both_claims() {
        let mut t = SessionTable::default();
        let (a, b) = ([1; 8], [2; 8]);
        assert_eq!(keep(&mut t, tid(7), a, 1, "a", "b"), Kept::Waiting);
        assert_eq!(keep(&mut t, tid(7), b, 2, "m", "a"), Kept::Refused);
        assert_eq!(keep(&mut t, tid(7), b, 2, "b", "x"), Kept::Refused);
        assert_eq!(
            keep(&mut t, tid(7), b, 2, "b", "a"),
            Kept::Restored(["a".into(), "b".into()])
        );
        assert_eq!(t.waiting_count(), 0);
        assert_eq!(
            t.route(session_id(&tid(7)), &a, addr(1), 10),
            Verdict::Forward {
                to: addr(2),
                rebound: false
            }
        );
    }

    #[test]
    fn unclaimed_sessions_are_forgotten() {
        let mut t = SessionTable::default();
        let t0 = Instant::now();
        let all = |_: &str| true;
        assert_eq!(
            t.keep(tid(7), [1; 8], addr(1), "a", "b", t0, &all),
            Kept::Waiting
        );
        let later = t0 + KEEP_WAIT;
        assert_eq!(
            t.keep(tid(8), [1; 8], addr(1), "a", "b", later, &all),
            Kept::Waiting
        );
        assert_eq!(t.waiting_count(), 1);
        assert_eq!(
            t.keep(tid(7), [2; 8], addr(2), "b", "a", later, &all),
            Kept::Waiting
        );
    }

    /// Both sides' relay connections ended (the relay stalled): the side
    /// that had stayed when the first left has left too, so both must claim.
    #[test]
    fn a_side_that_stayed_but_left_too_must_claim() {
        let mut t = SessionTable::default();
        let [a, b] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let s = t.close(&tid(1)).unwrap();
        t.remember(s, ["a".into(), "b".into()], [true, false], Instant::now());
        let only_b = |n: &str| n == "b";
        let now = Instant::now();
        assert_eq!(
            t.keep(tid(1), b, addr(4), "b", "a", now, &only_b),
            Kept::Waiting
        );
        assert_eq!(
            t.keep(tid(1), a, addr(3), "a", "b", now, &|_| true),
            Kept::Restored(["a".into(), "b".into()])
        );
    }

    /// Anyone identified can make up claims a restarted relay cannot check:
    /// one node's flood of them stops at its own cap, and another node's
    /// real claims still pair up.
    #[test]
    fn made_up_claims_cannot_crowd_out_real_ones() {
        let mut t = SessionTable::default();
        let now = Instant::now();
        let all = |_: &str| true;
        let made_up = |n: usize| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&(n as u64 + 1000).to_be_bytes());
            TunnelId::from_bytes(b)
        };
        for n in 0..MAX_WAITING_PER_NODE {
            assert_eq!(
                t.keep(made_up(n), [1; 8], addr(1), "m", "x", now, &all),
                Kept::Waiting
            );
        }
        let over = t.keep(
            made_up(MAX_WAITING_PER_NODE),
            [1; 8],
            addr(1),
            "m",
            "x",
            now,
            &all,
        );
        assert_eq!(over, Kept::Refused);
        assert_eq!(t.waiting_count(), MAX_WAITING_PER_NODE);
        assert_eq!(
            t.keep(tid(1), [2; 8], addr(2), "a", "b", now, &all),
            Kept::Waiting
        );
        assert_eq!(
            t.keep(tid(1), [3; 8], addr(3), "b", "a", now, &all),
            Kept::Restored(["a".into(), "b".into()])
        );
        // Once they expire, the flooder's quota is free again.
        let later = now + KEEP_WAIT;
        assert_eq!(
            t.keep(made_up(0), [1; 8], addr(1), "m", "x", later, &all),
            Kept::Waiting
        );
        assert_eq!(t.waiting_count(), 1);
    }
}
