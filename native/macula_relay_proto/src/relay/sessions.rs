//! The relay's e2e session tables.
//!
//! [`SessionTable`] is the data plane's: for each live session, the two
//! sides' bind keys and addresses. The relay's UDP glue asks it where a
//! datagram goes; it holds no keys of the nodes' QUIC connection and no
//! stream state, and every call is O(1).
//!
//! Each side is bound to the address of its node's own (QUIC
//! path-validated) relay connection: control and data share the node's one
//! UDP socket, so one NAT mapping carries both. A datagram is forwarded
//! only when its bind key is a side's key *and* it comes from that side's
//! bound address. A datagram never moves a side: the bind key travels in
//! clear, so a replayed header from elsewhere is dropped
//! ([`DropReason::Unbound`]) and the glue checks whether the node's relay
//! connection itself moved (a NAT rebinding QUIC validated), then calls
//! [`SessionTable::rebind_side`].
//!
//! [`Claims`] is the control plane's (kept apart, under another lock): the
//! sessions that lost a side, or that a restarted relay never knew, waiting
//! for their sides' claims (`sess_keep`). It is capped per node, per source
//! address and in total, keeps room for the sessions the relay remembers
//! itself, and expires entries from a time-ordered queue in small batches.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use subtle::ConstantTimeEq;

use crate::relay::router::valid_node_name;
use crate::wire::dataplane::{session_id, SessionId};
use crate::wire::frame::BindKey;
use crate::wire::tunnel_id::TunnelId;
use crate::KEEP_WAIT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub bind: BindKey,
    pub addr: SocketAddr,
    pub datagrams: u64,
    pub bytes: u64,
    /// The path this side last reported (`sess_path`): direct or relayed.
    pub direct: bool,
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
    /// Send it to `to`.
    Forward {
        to: SocketAddr,
    },
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No such session (closed, or never opened).
    UnknownSession,
    /// The bind key matches neither side: forged, or from a stranger.
    BadBind,
    /// A side's key, from an address that is not that side's (a replayed
    /// header, or a node whose relay connection moved and is not rebound
    /// yet): forwards nothing, moves nothing.
    Unbound,
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
            DropReason::Unbound => "unbound",
            DropReason::Malformed => "malformed",
            DropReason::Overload => "overload",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionIdTaken;

/// The live sessions (the data plane's table).
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

    fn get_mut(&mut self, tunnel: &TunnelId) -> Option<&mut Session> {
        self.sessions
            .get_mut(&session_id(tunnel))
            .filter(|s| s.tunnel == *tunnel)
    }

    /// Is this session id taken (by any tunnel)?
    pub fn id_taken(&self, tunnel: &TunnelId) -> bool {
        self.sessions.contains_key(&session_id(tunnel))
    }

    /// Opens the session of `tunnel` with fresh bind keys, each side bound
    /// to its node's relay connection address. Returns `[requester, target]`
    /// keys.
    pub fn open(
        &mut self,
        tunnel: TunnelId,
        requester: SocketAddr,
        target: SocketAddr,
    ) -> Result<[BindKey; 2], SessionIdTaken> {
        let keys: [BindKey; 2] = [rand::random(), rand::random()];
        self.restore(tunnel, [(keys[0], requester), (keys[1], target)])?;
        Ok(keys)
    }

    /// Enters a session with the sides' own keys (claimed back).
    pub fn restore(
        &mut self,
        tunnel: TunnelId,
        sides: [(BindKey, SocketAddr); 2],
    ) -> Result<(), SessionIdTaken> {
        let id = session_id(&tunnel);
        if self.sessions.contains_key(&id) {
            return Err(SessionIdTaken);
        }
        let sides = sides.map(|(bind, addr)| Side {
            bind,
            addr,
            datagrams: 0,
            bytes: 0,
            direct: false,
        });
        self.sessions.insert(id, Session { tunnel, sides });
        Ok(())
    }

    pub fn close(&mut self, tunnel: &TunnelId) -> Option<Session> {
        let id = session_id(tunnel);
        if self.sessions.get(&id)?.tunnel != *tunnel {
            return None;
        }
        self.sessions.remove(&id)
    }

    /// The side of `tunnel` whose key is `bind`, if any (constant time).
    pub fn side_of(&self, tunnel: &TunnelId, bind: &BindKey) -> Option<usize> {
        let s = self.get(tunnel)?;
        let first: bool = s.sides[0].bind.ct_eq(bind).into();
        let second: bool = s.sides[1].bind.ct_eq(bind).into();
        match (first, second) {
            (true, _) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    }

    /// Side `side` of `tunnel` is now at `addr` (its node's relay
    /// connection moved, or the node claimed it from a new connection).
    /// True when it moved.
    pub fn rebind_side(&mut self, tunnel: &TunnelId, side: usize, addr: SocketAddr) -> bool {
        match self.get_mut(tunnel).and_then(|s| s.sides.get_mut(side)) {
            Some(s) if s.addr != addr => {
                s.addr = addr;
                true
            }
            _ => false,
        }
    }

    /// Side `side` of `tunnel` reports its path; true only when that
    /// changes what was stored (a repeated report counts nothing).
    pub fn set_path(&mut self, tunnel: &TunnelId, side: usize, direct: bool) -> bool {
        match self.get_mut(tunnel).and_then(|s| s.sides.get_mut(side)) {
            Some(s) if s.direct != direct => {
                s.direct = direct;
                true
            }
            _ => false,
        }
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
        if side.addr != from {
            return Verdict::Drop(DropReason::Unbound);
        }
        side.datagrams += 1;
        side.bytes += len as u64;
        Verdict::Forward {
            to: s.sides[other].addr,
        }
    }
}

/// Sessions waiting to be claimed back, at most.
pub const MAX_WAITING: usize = 65_536;
/// Longest `peer` name a claim may carry (as identify's names).
pub const MAX_PEER_LEN: usize = 255;
/// Queue entries one call may expire (expiry runs in small batches).
const EXPIRE_BATCH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimLimits {
    /// Entries in total (claimed and remembered).
    pub max_waiting: usize,
    /// Of those, made by claims (a restarted relay cannot check them):
    /// the rest is kept for the sessions the relay remembers itself.
    pub max_claimed: usize,
    /// Entries one node's claims may make.
    pub max_per_node: usize,
    /// Entries the claims from one IP address (IPv6: one /64) may make.
    pub max_per_ip: usize,
}

impl Default for ClaimLimits {
    fn default() -> Self {
        ClaimLimits {
            max_waiting: MAX_WAITING,
            max_claimed: 16_384,
            max_per_node: 1024,
            max_per_ip: 2048,
        }
    }
}

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
    seq: u64,
    /// Past this, the entry is gone (even before the queue gets to it).
    deadline: Instant,
    sides: Vec<WaitingSide>,
    /// The node and address whose claim made this entry (none: the relay
    /// remembered it on a departure).
    opened_by: Option<(String, IpAddr)>,
}

/// What a side's claim (`sess_keep`) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// The session is live, and `bind` is side `side`'s key: the caller
    /// checks that the claimant is that side's node before moving it.
    Live {
        side: usize,
    },
    /// Both sides have claimed it: the caller checks the sides' quotas and
    /// enters it in the [`SessionTable`] with these sides (`[requester,
    /// target]`: names, keys, addresses).
    Paired(Box<[(String, BindKey, SocketAddr); 2]>),
    /// Waiting for the other side's claim.
    Waiting,
    Refused(KeepRefusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepRefusal {
    /// `peer` is not a node name, or is the claimant's own.
    BadPeer,
    /// Not this side's bind key or name (or the id is another session's).
    NotASide,
    /// The claimant, its address, or all claims together hold too many.
    TooMany,
}

impl KeepRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            KeepRefusal::BadPeer => "bad_peer",
            KeepRefusal::NotASide => "not_a_side",
            KeepRefusal::TooMany => "too_many",
        }
    }
}

/// One claim (`sess_keep`), from an identified node.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub tunnel: TunnelId,
    pub bind: BindKey,
    /// The address of the claimant's relay connection.
    pub addr: SocketAddr,
    /// The claimant's authenticated name (its connection's).
    pub name: &'a str,
    pub peer: &'a str,
}

/// What one source is, for the per-address cap: an IPv4 address, or an
/// IPv6 /64 (one host usually holds a whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Sessions waiting for their sides' claims.
#[derive(Debug, Default)]
pub struct Claims {
    limits: ClaimLimits,
    waiting: HashMap<TunnelId, Waiting>,
    /// Entries made by claims, oldest first: `(deadline, tunnel, seq)`; an
    /// entry whose seq no longer matches was removed or replaced.
    claimed_queue: VecDeque<(Instant, TunnelId, u64)>,
    /// Entries the relay remembered, oldest first.
    remembered_queue: VecDeque<(Instant, TunnelId, u64)>,
    seq: u64,
    claimed: usize,
    by_node: HashMap<String, usize>,
    by_ip: HashMap<IpAddr, usize>,
}

impl Claims {
    pub fn new(limits: ClaimLimits) -> Self {
        Claims {
            limits,
            ..Default::default()
        }
    }

    /// Sessions waiting to be claimed back.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// This session waits to be claimed back.
    pub fn contains(&self, tunnel: &TunnelId) -> bool {
        self.waiting.contains_key(tunnel)
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Of those, made by claims.
    pub fn claimed_count(&self) -> usize {
        self.claimed
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Keeps a session closed because a side left, so that the sides can
    /// claim it back for [`KEEP_WAIT`]: `names` are its sides' node names,
    /// `present` says which sides are still connected (they count as
    /// claiming it for as long as they stay connected). False when there
    /// was no room (the table is full of remembered sessions).
    pub fn remember(
        &mut self,
        session: &Session,
        names: [String; 2],
        present: [bool; 2],
        now: Instant,
    ) -> bool {
        self.expire(now);
        if !self.waiting.contains_key(&session.tunnel)
            && self.waiting.len() >= self.limits.max_waiting
            && !self.evict_a_claim()
        {
            return false;
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
        let seq = self.next_seq();
        self.remove(&session.tunnel);
        self.waiting.insert(
            session.tunnel,
            Waiting {
                seq,
                deadline: now + KEEP_WAIT,
                sides,
                opened_by: None,
            },
        );
        self.remembered_queue
            .push_back((now + KEEP_WAIT, session.tunnel, seq));
        true
    }

    /// Makes room for a remembered session: the oldest entry made by a
    /// claim goes (a bounded look through the queue).
    fn evict_a_claim(&mut self) -> bool {
        for _ in 0..EXPIRE_BATCH {
            let Some((_, tunnel, seq)) = self.claimed_queue.pop_front() else {
                return false;
            };
            if self.waiting.get(&tunnel).is_some_and(|w| w.seq == seq) {
                self.remove(&tunnel);
                return true;
            }
        }
        false
    }

    fn remove(&mut self, tunnel: &TunnelId) -> Option<Waiting> {
        let w = self.waiting.remove(tunnel)?;
        if let Some((name, ip)) = &w.opened_by {
            self.claimed = self.claimed.saturating_sub(1);
            for n in [self.by_node.get_mut(name.as_str()), self.by_ip.get_mut(ip)]
                .into_iter()
                .flatten()
            {
                *n = n.saturating_sub(1);
            }
            if self.by_node.get(name.as_str()) == Some(&0) {
                self.by_node.remove(name.as_str());
            }
            if self.by_ip.get(ip) == Some(&0) {
                self.by_ip.remove(ip);
            }
        }
        Some(w)
    }

    /// Forgets entries past their time, at most a small batch per call
    /// (both queues are in deadline order). True when more are due: the
    /// caller may call again (after letting others have the lock).
    pub fn expire(&mut self, now: Instant) -> bool {
        for _ in 0..EXPIRE_BATCH {
            let Some(&(deadline, tunnel, seq)) = self.claimed_queue.front() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.claimed_queue.pop_front();
            if self.waiting.get(&tunnel).is_some_and(|w| w.seq == seq) {
                self.remove(&tunnel);
            }
        }
        for _ in 0..EXPIRE_BATCH {
            let Some(&(deadline, tunnel, seq)) = self.remembered_queue.front() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.remembered_queue.pop_front();
            if self.waiting.get(&tunnel).is_some_and(|w| w.seq == seq) {
                self.remove(&tunnel);
            }
        }
        // Stale queue entries (removed early) are bounded too: a queue
        // longer than the table's cap holds mostly stale ones; drop the
        // oldest (a live one among them only expires a little early).
        while self.claimed_queue.len() > 2 * self.limits.max_waiting {
            if let Some((_, tunnel, seq)) = self.claimed_queue.pop_front() {
                if self.waiting.get(&tunnel).is_some_and(|w| w.seq == seq) {
                    self.remove(&tunnel);
                }
            }
        }
        while self.remembered_queue.len() > 2 * self.limits.max_waiting {
            if let Some((_, tunnel, seq)) = self.remembered_queue.pop_front() {
                if self.waiting.get(&tunnel).is_some_and(|w| w.seq == seq) {
                    self.remove(&tunnel);
                }
            }
        }
        let due = |q: &VecDeque<(Instant, TunnelId, u64)>| q.front().is_some_and(|e| e.0 <= now);
        due(&self.claimed_queue) || due(&self.remembered_queue)
    }

    /// Node `claim.name` claims the session `claim.tunnel` with `peer`
    /// under its bind key. Only a side's own key and name pass: the tunnel
    /// id and the keys are secrets of the two nodes (and this relay).
    /// `connected` tells whether a node is connected now. A live session
    /// is looked up in `live` (read only: the caller acts on the answer).
    pub fn keep(
        &mut self,
        live: &SessionTable,
        claim: Claim<'_>,
        now: Instant,
        connected: &dyn Fn(&str) -> bool,
    ) -> Kept {
        let Claim {
            tunnel,
            bind,
            addr,
            name,
            peer,
        } = claim;
        if name == peer || !valid_node_name(peer, MAX_PEER_LEN) {
            return Kept::Refused(KeepRefusal::BadPeer);
        }
        self.expire(now);
        if live.id_taken(&tunnel) {
            return match live.side_of(&tunnel, &bind) {
                Some(side) => Kept::Live { side },
                None => Kept::Refused(KeepRefusal::NotASide),
            };
        }
        let new_side = WaitingSide {
            bind,
            addr,
            name: name.to_owned(),
            peer: peer.to_owned(),
            claimed: true,
            stayed: false,
        };
        if self.waiting.get(&tunnel).is_some_and(|w| w.deadline <= now) {
            self.remove(&tunnel);
        }
        let Some(w) = self.waiting.get_mut(&tunnel) else {
            let ip = source(addr.ip());
            let l = &self.limits;
            if self.waiting.len() >= l.max_waiting
                || self.claimed >= l.max_claimed
                || self.by_node.get(name).copied().unwrap_or(0) >= l.max_per_node
                || self.by_ip.get(&ip).copied().unwrap_or(0) >= l.max_per_ip
            {
                return Kept::Refused(KeepRefusal::TooMany);
            }
            *self.by_node.entry(name.to_owned()).or_default() += 1;
            *self.by_ip.entry(ip).or_default() += 1;
            self.claimed += 1;
            let seq = self.next_seq();
            self.waiting.insert(
                tunnel,
                Waiting {
                    seq,
                    deadline: now + KEEP_WAIT,
                    sides: vec![new_side],
                    opened_by: Some((name.to_owned(), ip)),
                },
            );
            self.claimed_queue.push_back((now + KEEP_WAIT, tunnel, seq));
            return Kept::Waiting;
        };
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
            Some(_) => return Kept::Refused(KeepRefusal::NotASide),
            // The other side's first claim: it must name the same pair.
            None if pairs_up => w.sides.push(new_side),
            None => return Kept::Refused(KeepRefusal::NotASide),
        }
        let holds = |side: &WaitingSide| side.claimed || (side.stayed && connected(&side.name));
        if w.sides.len() < 2 || !w.sides.iter().all(holds) {
            return Kept::Waiting;
        }
        let Some(w) = self.remove(&tunnel) else {
            return Kept::Refused(KeepRefusal::NotASide);
        };
        let [a, b] = [&w.sides[0], &w.sides[1]];
        Kept::Paired(Box::new([
            (a.name.clone(), a.bind, a.addr),
            (b.name.clone(), b.bind, b.addr),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn ip_addr(ip: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, ip], port))
    }

    fn tid(n: u8) -> TunnelId {
        TunnelId::from_bytes([n; 16])
    }

    fn many(n: usize) -> TunnelId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(n as u64 + 1000).to_be_bytes());
        TunnelId::from_bytes(b)
    }

    #[test]
    fn forwards_each_side_to_the_other() {
        let mut t = SessionTable::default();
        let [a, b] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let sid = session_id(&tid(1));
        assert_eq!(
            t.route(sid, &a, addr(1), 100),
            Verdict::Forward { to: addr(2) }
        );
        assert_eq!(
            t.route(sid, &b, addr(2), 100),
            Verdict::Forward { to: addr(1) }
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
        assert_eq!(t.get(&tid(1)).unwrap().sides[0].addr, addr(1));
    }

    /// The review's attack: a's header replayed from a third socket used to
    /// rebind a's side there and pull b's datagrams to the attacker.
    #[test]
    fn a_datagram_never_moves_a_side() {
        let mut t = SessionTable::default();
        let [a, b] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let sid = session_id(&tid(1));
        assert_eq!(
            t.route(sid, &a, addr(7), 10),
            Verdict::Drop(DropReason::Unbound)
        );
        assert_eq!(
            t.route(sid, &b, addr(2), 10),
            Verdict::Forward { to: addr(1) }
        );
        assert_eq!(t.get(&tid(1)).unwrap().sides[0].datagrams, 0);
        // The node's relay connection moved (the glue saw it): now it is.
        assert!(t.rebind_side(&tid(1), 0, addr(7)));
        assert!(!t.rebind_side(&tid(1), 0, addr(7)));
        assert_eq!(
            t.route(sid, &a, addr(7), 10),
            Verdict::Forward { to: addr(2) }
        );
        assert_eq!(
            t.route(sid, &b, addr(2), 10),
            Verdict::Forward { to: addr(7) }
        );
        assert!(!t.rebind_side(&tid(9), 0, addr(7)));
        assert!(!t.rebind_side(&tid(1), 5, addr(7)));
    }

    #[test]
    fn a_path_counts_only_when_it_changes() {
        let mut t = SessionTable::default();
        t.open(tid(1), addr(1), addr(2)).unwrap();
        assert!(t.set_path(&tid(1), 0, true));
        for _ in 0..1000 {
            assert!(!t.set_path(&tid(1), 0, true));
        }
        assert!(t.set_path(&tid(1), 1, true));
        assert!(t.set_path(&tid(1), 0, false));
        assert!(!t.set_path(&tid(2), 0, true));
    }

    #[test]
    fn closed_sessions_route_nothing_and_ids_are_unique() {
        let mut t = SessionTable::default();
        let [a, _] = t.open(tid(1), addr(1), addr(2)).unwrap();
        assert_eq!(t.open(tid(1), addr(3), addr(4)), Err(SessionIdTaken));
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

    fn claim<'a>(
        tunnel: TunnelId,
        bind: BindKey,
        at: SocketAddr,
        name: &'a str,
        peer: &'a str,
    ) -> Claim<'a> {
        Claim {
            tunnel,
            bind,
            addr: at,
            name,
            peer,
        }
    }

    /// Claims into `c` (the live table empty), everyone connected, now.
    fn keep(
        c: &mut Claims,
        tunnel: TunnelId,
        bind: BindKey,
        port: u16,
        name: &str,
        peer: &str,
    ) -> Kept {
        c.keep(
            &SessionTable::default(),
            claim(tunnel, bind, addr(port), name, peer),
            Instant::now(),
            &|_| true,
        )
    }

    fn paired(names: [&str; 2], sides: [(BindKey, u16); 2]) -> Kept {
        Kept::Paired(Box::new([
            (names[0].into(), sides[0].0, addr(sides[0].1)),
            (names[1].into(), sides[1].0, addr(sides[1].1)),
        ]))
    }

    /// A node whose relay connection ended claims its session back, and
    /// the other side (still here) counts as having claimed it.
    #[test]
    fn a_side_that_left_claims_its_session_back() {
        let mut t = SessionTable::default();
        let mut c = Claims::default();
        let [a, b] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let s = t.close(&tid(1)).unwrap();
        assert!(c.remember(&s, ["a".into(), "b".into()], [false, true], Instant::now()));
        assert_eq!(
            keep(&mut c, tid(1), [9; 8], 5, "a", "b"),
            Kept::Refused(KeepRefusal::NotASide)
        );
        assert_eq!(
            keep(&mut c, tid(1), b, 5, "m", "a"),
            Kept::Refused(KeepRefusal::NotASide)
        );
        assert_eq!(
            keep(&mut c, tid(1), a, 3, "a", "b"),
            paired(["a", "b"], [(a, 3), (b, 2)])
        );
        assert!(c.is_empty());
        // Live: the claim names the side; the caller decides.
        t.restore(tid(1), [(a, addr(3)), (b, addr(2))]).unwrap();
        let live = c.keep(
            &t,
            claim(tid(1), b, addr(4), "b", "a"),
            Instant::now(),
            &|_| true,
        );
        assert_eq!(live, Kept::Live { side: 1 });
        let wrong = c.keep(
            &t,
            claim(tid(1), [0; 8], addr(4), "b", "a"),
            Instant::now(),
            &|_| true,
        );
        assert_eq!(wrong, Kept::Refused(KeepRefusal::NotASide));
    }

    /// A restarted relay knows nothing: the two sides' claims make the
    /// session, and only claims that name each other pair up.
    #[test]
    fn a_restarted_relay_rebuilds_a_session_from_both_claims() {
        let mut c = Claims::default();
        let (a, b) = ([1; 8], [2; 8]);
        assert_eq!(keep(&mut c, tid(7), a, 1, "a", "b"), Kept::Waiting);
        assert_eq!(
            keep(&mut c, tid(7), b, 2, "m", "a"),
            Kept::Refused(KeepRefusal::NotASide)
        );
        assert_eq!(
            keep(&mut c, tid(7), b, 2, "b", "x"),
            Kept::Refused(KeepRefusal::NotASide)
        );
        assert_eq!(
            keep(&mut c, tid(7), b, 2, "b", "a"),
            paired(["a", "b"], [(a, 1), (b, 2)])
        );
        assert_eq!(c.len(), 0);
        assert_eq!(c.claimed_count(), 0);
    }

    /// The review's attack: a node paired its own claims (`name == peer`)
    /// into sessions outside every quota; `peer` was stored unchecked.
    #[test]
    fn a_claim_must_name_another_valid_node() {
        let mut c = Claims::default();
        assert_eq!(
            keep(&mut c, tid(1), [1; 8], 1, "m@h", "m@h"),
            Kept::Refused(KeepRefusal::BadPeer)
        );
        let long = "x".repeat(MAX_PEER_LEN + 1);
        assert_eq!(
            keep(&mut c, tid(1), [1; 8], 1, "m@h", &long),
            Kept::Refused(KeepRefusal::BadPeer)
        );
        assert_eq!(
            keep(&mut c, tid(1), [1; 8], 1, "m@h", "a b"),
            Kept::Refused(KeepRefusal::BadPeer)
        );
        assert!(c.is_empty());
    }

    #[test]
    fn unclaimed_sessions_are_forgotten() {
        let mut c = Claims::default();
        let live = SessionTable::default();
        let t0 = Instant::now();
        let all = |_: &str| true;
        assert_eq!(
            c.keep(&live, claim(tid(7), [1; 8], addr(1), "a", "b"), t0, &all),
            Kept::Waiting
        );
        let later = t0 + KEEP_WAIT;
        assert_eq!(
            c.keep(&live, claim(tid(8), [1; 8], addr(1), "a", "b"), later, &all),
            Kept::Waiting
        );
        assert_eq!(c.len(), 1);
        assert_eq!(
            c.keep(&live, claim(tid(7), [2; 8], addr(2), "b", "a"), later, &all),
            Kept::Waiting
        );
    }

    /// Expiry pops a small batch per call, never the whole table.
    #[test]
    fn expiry_is_in_small_batches() {
        let mut c = Claims::new(ClaimLimits {
            max_per_node: usize::MAX,
            max_per_ip: usize::MAX,
            ..ClaimLimits::default()
        });
        let live = SessionTable::default();
        let t0 = Instant::now();
        for n in 0..1000 {
            c.keep(
                &live,
                claim(many(n), [1; 8], addr(1), "a", "b"),
                t0,
                &|_| true,
            );
        }
        assert_eq!(c.len(), 1000);
        assert!(c.expire(t0 + KEEP_WAIT), "more are due");
        assert_eq!(c.len(), 1000 - EXPIRE_BATCH);
        let mut calls = 1;
        while c.expire(t0 + KEEP_WAIT) {
            calls += 1;
        }
        assert_eq!(calls, 1000 / EXPIRE_BATCH);
        assert!(c.is_empty());
        assert_eq!(c.claimed_count(), 0);
    }

    /// An entry past its time that the queue has not reached yet is gone
    /// all the same: a late claim starts afresh.
    #[test]
    fn a_late_claim_pairs_nothing() {
        let mut c = Claims::default();
        let live = SessionTable::default();
        let t0 = Instant::now();
        let all = |_: &str| true;
        assert_eq!(
            c.keep(&live, claim(tid(7), [1; 8], addr(1), "a", "b"), t0, &all),
            Kept::Waiting
        );
        // (no expire call in between)
        let late = t0 + KEEP_WAIT;
        assert_eq!(
            c.keep(&live, claim(tid(7), [2; 8], addr(2), "b", "a"), late, &all),
            Kept::Waiting
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c.claimed_count(), 1);
    }

    /// Both sides' relay connections ended (the relay stalled): the side
    /// that had stayed when the first left has left too, so both must claim.
    #[test]
    fn a_side_that_stayed_but_left_too_must_claim() {
        let mut t = SessionTable::default();
        let mut c = Claims::default();
        let [a, b] = t.open(tid(1), addr(1), addr(2)).unwrap();
        let s = t.close(&tid(1)).unwrap();
        c.remember(&s, ["a".into(), "b".into()], [true, false], Instant::now());
        let only_b = |n: &str| n == "b";
        let now = Instant::now();
        assert_eq!(
            c.keep(&t, claim(tid(1), b, addr(4), "b", "a"), now, &only_b),
            Kept::Waiting
        );
        assert_eq!(
            c.keep(&t, claim(tid(1), a, addr(3), "a", "b"), now, &|_| true),
            paired(["a", "b"], [(a, 3), (b, 4)])
        );
    }

    /// Anyone identified can make up claims a restarted relay cannot check:
    /// one node's flood stops at its own cap, one address's at its cap, all
    /// claims at theirs, and another node's real claims still pair up.
    #[test]
    fn made_up_claims_cannot_crowd_out_real_ones() {
        let limits = ClaimLimits::default();
        let mut c = Claims::new(limits.clone());
        let live = SessionTable::default();
        let now = Instant::now();
        let all = |_: &str| true;
        for n in 0..limits.max_per_node {
            assert_eq!(
                c.keep(
                    &live,
                    claim(many(n), [1; 8], ip_addr(1, 1), "m", "x"),
                    now,
                    &all
                ),
                Kept::Waiting
            );
        }
        let over = c.keep(
            &live,
            claim(many(limits.max_per_node), [1; 8], ip_addr(1, 1), "m", "x"),
            now,
            &all,
        );
        assert_eq!(over, Kept::Refused(KeepRefusal::TooMany));
        // A second name from the same address: the address's cap.
        for n in 0..limits.max_per_ip - limits.max_per_node {
            assert_eq!(
                c.keep(
                    &live,
                    claim(many(5000 + n), [1; 8], ip_addr(1, 2), "m2", "x"),
                    now,
                    &all
                ),
                Kept::Waiting
            );
        }
        assert_eq!(
            c.keep(
                &live,
                claim(many(9999), [1; 8], ip_addr(1, 2), "m3", "x"),
                now,
                &all
            ),
            Kept::Refused(KeepRefusal::TooMany)
        );
        // Made-up claims with the same session id do not block real ones:
        // entries are by full tunnel id.
        let mut fake = *tid(1).as_bytes();
        fake[15] ^= 0xff;
        assert_eq!(
            c.keep(
                &live,
                claim(TunnelId::from_bytes(fake), [1; 8], ip_addr(9, 1), "z", "a"),
                now,
                &all
            ),
            Kept::Waiting
        );
        assert_eq!(
            c.keep(
                &live,
                claim(tid(1), [2; 8], ip_addr(2, 1), "a", "b"),
                now,
                &all
            ),
            Kept::Waiting
        );
        assert!(matches!(
            c.keep(
                &live,
                claim(tid(1), [3; 8], ip_addr(3, 1), "b", "a"),
                now,
                &all
            ),
            Kept::Paired(_)
        ));
        // Once they expire, the quotas are free again.
        let later = now + KEEP_WAIT;
        for _ in 0..100 {
            c.expire(later);
        }
        assert!(c.is_empty());
        assert_eq!(
            c.keep(
                &live,
                claim(many(0), [1; 8], ip_addr(1, 1), "m", "x"),
                later,
                &all
            ),
            Kept::Waiting
        );
    }

    #[test]
    fn one_ipv6_host_is_one_source() {
        let mut c = Claims::new(ClaimLimits {
            max_per_ip: 2,
            ..ClaimLimits::default()
        });
        let live = SessionTable::default();
        let now = Instant::now();
        let v6 = |host: u16| SocketAddr::from(([0x2001, 0xdb8, 0, 1, 0, 0, 0, host], 1));
        for n in 0..2 {
            let from = v6(n as u16 + 1);
            assert_eq!(
                c.keep(&live, claim(many(n), [1; 8], from, "m", "x"), now, &|_| {
                    true
                }),
                Kept::Waiting
            );
        }
        assert_eq!(
            c.keep(
                &live,
                claim(many(9), [1; 8], v6(99), "n", "x"),
                now,
                &|_| true
            ),
            Kept::Refused(KeepRefusal::TooMany)
        );
    }

    /// All claims together stop at `max_claimed`: the rest of the table is
    /// the relay's own, and a remembered session evicts a made-up claim
    /// when the table is full.
    #[test]
    fn room_is_kept_for_remembered_sessions() {
        let mut c = Claims::new(ClaimLimits {
            max_waiting: 8,
            max_claimed: 4,
            max_per_node: 100,
            max_per_ip: 100,
        });
        let mut t = SessionTable::default();
        let now = Instant::now();
        for n in 0..4 {
            assert_eq!(
                c.keep(
                    &t,
                    claim(many(n), [1; 8], ip_addr(1, 1), "m", "x"),
                    now,
                    &|_| true
                ),
                Kept::Waiting
            );
        }
        assert_eq!(
            c.keep(
                &t,
                claim(many(4), [1; 8], ip_addr(2, 1), "n", "x"),
                now,
                &|_| true
            ),
            Kept::Refused(KeepRefusal::TooMany)
        );
        for n in 0..6u8 {
            t.open(tid(100 + n), addr(1), addr(2)).unwrap();
            let s = t.close(&tid(100 + n)).unwrap();
            assert!(c.remember(&s, ["a".into(), "b".into()], [false, true], now));
        }
        assert_eq!(c.len(), 8);
        assert_eq!(c.claimed_count(), 2);
    }
}
