//! The node's side of e2e sessions: each session's QUIC connection talks to
//! a stable virtual address, and this map says which relay and session id
//! that address stands for (iroh's "mapped addresses" work the same way).
//! quinn never sees a relay address for a session, so the path under a
//! connection can change without quinn noticing.
//!
//! Datagrams for a session the node has not heard of yet (its datagram beat
//! the `tun_notify` on the control stream) are held, a few and briefly, and
//! handed over when the session is added.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::wire::dataplane::SessionId;
use crate::wire::frame::BindKey;

/// How to send for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub relay: SocketAddr,
    pub session: SessionId,
    pub bind: BindKey,
}

/// Datagrams held for sessions not yet known, in all.
pub const MAX_EARLY: usize = 256;
/// How long a held datagram waits for its session.
pub const EARLY_WAIT: Duration = Duration::from_secs(2);

/// IPv6 virtual addresses: a unique local prefix ("fd" + "macula").
const V6_PREFIX: u64 = 0xfd6d_6163_756c_6100;

#[derive(Debug)]
pub struct Paths {
    ipv6: bool,
    next: u64,
    routes: HashMap<SocketAddr, Route>,
    inbound: HashMap<(SocketAddr, SessionId), SocketAddr>,
    /// Sessions on a direct path: where their datagrams go instead.
    direct: HashMap<SocketAddr, SocketAddr>,
    /// Sessions not busy yet, and the bytes they carried so far (see
    /// [`Paths::carried`]).
    quiet: HashMap<SocketAddr, u64>,
    early: Vec<(SocketAddr, SessionId, Vec<u8>, Instant)>,
}

/// True for addresses this module hands out (never a real peer's).
pub fn is_virtual(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.octets()[0] >= 240,
        IpAddr::V6(ip) => (u128::from(ip) >> 64) as u64 == V6_PREFIX,
    }
}

impl Paths {
    /// `ipv6`: the family of the node's socket (quinn wants addresses of it).
    pub fn new(ipv6: bool) -> Self {
        Paths {
            ipv6,
            next: 0,
            routes: HashMap::new(),
            inbound: HashMap::new(),
            direct: HashMap::new(),
            quiet: HashMap::new(),
            early: Vec::new(),
        }
    }

    fn allocate(&mut self) -> SocketAddr {
        self.next += 1;
        let n = self.next;
        if self.ipv6 {
            let ip = Ipv6Addr::from(((V6_PREFIX as u128) << 64) | n as u128);
            SocketAddr::new(ip.into(), 1)
        } else {
            // 240.0.0.0/4 is reserved: 28 bits of address and a port.
            let ip = Ipv4Addr::from(0xf000_0000 | ((n / 65535) as u32 & 0x0fff_ffff));
            SocketAddr::new(ip.into(), 1 + (n % 65535) as u16)
        }
    }

    /// Adds a session; returns its virtual address and any datagrams that
    /// arrived for it before (to deliver as if just received).
    pub fn add(&mut self, route: Route) -> (SocketAddr, Vec<Vec<u8>>) {
        let key = (route.relay, route.session);
        let vaddr = match self.inbound.get(&key) {
            Some(v) => *v,
            None => self.allocate(),
        };
        if self.routes.insert(vaddr, route).is_none() {
            self.quiet.insert(vaddr, 0);
        }
        self.inbound.insert(key, vaddr);
        let mut held = vec![];
        self.early.retain_mut(|(relay, session, d, _)| {
            if (*relay, *session) == key {
                held.push(std::mem::take(d));
                false
            } else {
                true
            }
        });
        (vaddr, held)
    }

    pub fn remove(&mut self, vaddr: &SocketAddr) -> Option<Route> {
        let route = self.routes.remove(vaddr)?;
        self.inbound.remove(&(route.relay, route.session));
        self.direct.remove(vaddr);
        self.quiet.remove(vaddr);
        // Direct addresses it was heard from (few sessions ever have one).
        self.inbound.retain(|_, v| v != vaddr);
        Some(route)
    }

    /// Sends a session's datagrams straight to `direct` (its peer's address,
    /// which answered a probe), or through its relay again (`None`). Its
    /// datagrams are taken from either. False if the session is gone.
    pub fn set_direct(&mut self, vaddr: &SocketAddr, direct: Option<SocketAddr>) -> bool {
        let Some(route) = self.routes.get(vaddr) else {
            return false;
        };
        match direct {
            Some(addr) => {
                self.inbound.insert((addr, route.session), *vaddr);
                self.direct.insert(*vaddr, addr);
            }
            None => {
                self.direct.remove(vaddr);
            }
        }
        true
    }

    /// Takes the session's datagrams from `addr` too: its peer proved to
    /// be there (a valid probe), and may go direct before this side does.
    pub fn accept_from(&mut self, vaddr: &SocketAddr, addr: SocketAddr) -> bool {
        let Some(route) = self.routes.get(vaddr) else {
            return false;
        };
        self.inbound.insert((addr, route.session), *vaddr);
        true
    }

    /// Where a session's datagrams go: its route, and its direct address
    /// when it has one.
    pub fn destination(&self, vaddr: &SocketAddr) -> Option<(Route, Option<SocketAddr>)> {
        let route = self.routes.get(vaddr)?;
        Some((*route, self.direct.get(vaddr).copied()))
    }

    /// Counts `bytes` the session at `vaddr` carried; true once, on the call
    /// that brings them to `busy` in all (the session is then no longer
    /// counted).
    pub fn carried(&mut self, vaddr: &SocketAddr, bytes: usize, busy: u64) -> bool {
        let Some(sum) = self.quiet.get_mut(vaddr) else {
            return false;
        };
        *sum += bytes as u64;
        if *sum < busy {
            return false;
        }
        self.quiet.remove(vaddr);
        true
    }

    /// True when the session at `vaddr` reached its `busy` count (see
    /// [`Paths::carried`]).
    pub fn is_busy(&self, vaddr: &SocketAddr) -> bool {
        self.routes.contains_key(vaddr) && !self.quiet.contains_key(vaddr)
    }

    /// True when `from` is the direct address the session at `vaddr` uses.
    pub fn is_direct(&self, vaddr: &SocketAddr, from: &SocketAddr) -> bool {
        self.direct.get(vaddr) == Some(from)
    }

    pub fn route(&self, vaddr: &SocketAddr) -> Option<&Route> {
        self.routes.get(vaddr)
    }

    /// Moves a session to another relay (failover): its virtual address,
    /// and so its QUIC connection, stay the same. False if it is gone.
    pub fn reroute(&mut self, vaddr: &SocketAddr, relay: SocketAddr) -> bool {
        let Some(route) = self.routes.get_mut(vaddr) else {
            return false;
        };
        let old = (route.relay, route.session);
        route.relay = relay;
        let new = (relay, route.session);
        if self.inbound.get(&old) == Some(vaddr) {
            self.inbound.remove(&old);
        }
        self.inbound.insert(new, *vaddr);
        true
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The virtual address of a session datagram from `relay`.
    pub fn inbound(&self, relay: SocketAddr, session: SessionId) -> Option<SocketAddr> {
        self.inbound.get(&(relay, session)).copied()
    }

    /// Holds a datagram of a session not added yet; false when full (dropped).
    pub fn hold(
        &mut self,
        relay: SocketAddr,
        session: SessionId,
        inner: &[u8],
        now: Instant,
    ) -> bool {
        self.early
            .retain(|(_, _, _, at)| now.saturating_duration_since(*at) < EARLY_WAIT);
        if self.early.len() >= MAX_EARLY {
            return false;
        }
        self.early.push((relay, session, inner.to_vec(), now));
        true
    }

    pub fn held_count(&self) -> usize {
        self.early.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4434))
    }

    fn route(session: SessionId) -> Route {
        Route {
            relay: relay(),
            session,
            bind: [session as u8; 8],
        }
    }

    #[test]
    fn virtual_addresses_map_both_ways() {
        for ipv6 in [false, true] {
            let mut p = Paths::new(ipv6);
            let (v1, _) = p.add(route(1));
            let (v2, _) = p.add(route(2));
            assert_ne!(v1, v2);
            assert_eq!(v1.is_ipv6(), ipv6);
            assert!(is_virtual(&v1) && is_virtual(&v2));
            assert!(!is_virtual(&relay()));
            assert_eq!(p.route(&v2), Some(&route(2)));
            assert_eq!(p.inbound(relay(), 1), Some(v1));
            assert_eq!(p.inbound(SocketAddr::from(([127, 0, 0, 2], 4434)), 1), None);
            assert_eq!(p.remove(&v1), Some(route(1)));
            assert_eq!(p.inbound(relay(), 1), None);
            assert_eq!(p.len(), 1);
        }
    }

    #[test]
    fn a_rerouted_session_keeps_its_address_and_hears_only_its_new_relay() {
        let other = SocketAddr::from(([127, 0, 0, 2], 4434));
        let mut p = Paths::new(false);
        let (v1, _) = p.add(route(1));
        assert!(p.reroute(&v1, other));
        assert_eq!(p.route(&v1).map(|r| r.relay), Some(other));
        assert_eq!(p.inbound(other, 1), Some(v1));
        assert_eq!(p.inbound(relay(), 1), None);
        assert_eq!(p.remove(&v1).map(|r| r.relay), Some(other));
        assert_eq!(p.inbound(other, 1), None);
        assert!(!p.reroute(&v1, relay()));
    }

    #[test]
    fn a_direct_session_sends_to_its_peer_and_hears_both_paths() {
        let peer = SocketAddr::from(([10, 0, 0, 2], 5000));
        let mut p = Paths::new(false);
        let (v, _) = p.add(route(3));
        assert_eq!(p.destination(&v), Some((route(3), None)));
        assert!(p.set_direct(&v, Some(peer)));
        assert_eq!(p.destination(&v), Some((route(3), Some(peer))));
        assert_eq!(p.inbound(peer, 3), Some(v));
        assert_eq!(p.inbound(relay(), 3), Some(v));
        // Back to the relay: late direct datagrams are still taken.
        assert!(p.set_direct(&v, None));
        assert_eq!(p.destination(&v), Some((route(3), None)));
        assert_eq!(p.inbound(peer, 3), Some(v));
        assert!(p.set_direct(&v, Some(peer)));
        let other = SocketAddr::from(([10, 0, 0, 3], 5000));
        assert!(p.accept_from(&v, other));
        assert_eq!(p.inbound(other, 3), Some(v));
        p.remove(&v);
        assert_eq!(p.inbound(other, 3), None);
        assert_eq!(p.inbound(peer, 3), None);
        assert!(!p.set_direct(&v, Some(peer)));
    }

    #[test]
    fn early_datagrams_wait_for_their_session_within_bounds() {
        let mut p = Paths::new(false);
        let now = Instant::now();
        assert!(p.hold(relay(), 5, b"first", now));
        assert!(p.hold(relay(), 6, b"other", now));
        let (_, held) = p.add(route(5));
        assert_eq!(held, vec![b"first".to_vec()]);
        for _ in 0..MAX_EARLY {
            p.hold(relay(), 7, b"x", now);
        }
        assert!(!p.hold(relay(), 7, b"x", now));
        // Stale ones make room.
        assert!(p.hold(relay(), 7, b"x", now + EARLY_WAIT));
        assert_eq!(p.held_count(), 1);
    }

    #[test]
    fn a_session_is_busy_once_it_carried_enough() {
        let mut paths = Paths::new(false);
        let (a, _) = paths.add(route(1));
        let (b, _) = paths.add(route(2));
        assert!(!paths.is_busy(&a));
        assert!(!paths.carried(&a, 600, 1000));
        assert!(paths.carried(&a, 400, 1000));
        // Told once; another session counts on its own.
        assert!(!paths.carried(&a, 5000, 1000));
        assert!(paths.is_busy(&a));
        assert!(!paths.carried(&b, 999, 1000));
        // Added again (a relay's claim): the count goes on.
        paths.add(route(2));
        assert!(paths.carried(&b, 1, 1000));
        paths.remove(&b);
        assert!(!paths.is_busy(&b));
        assert!(!paths.carried(&b, 5000, 1000));
    }
}
