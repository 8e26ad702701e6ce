//! Direct paths for e2e sessions, sans IO: once a session is busy (it
//! carried [`BUSY_BYTES`] through its relay, or the peer's probe came),
//! the two nodes of the session probe each other's candidate addresses
//! (the address the relay saw, and the ones each node announced) at the
//! same time, which also opens the usual NAT mappings. The first address
//! that answers carries the session's datagrams from then on; the QUIC
//! connection between the nodes stays the same (its virtual address does
//! not change, see `paths`).
//! While direct, the path is probed on; when it stops answering the session
//! goes back to its relay, and probing starts again later, with backoff.
//! A session that sends nothing for a while is idle: its path is probed
//! every few seconds only (enough for NAT mappings), and once it sends
//! again it is probed at once and often, so a dead path under traffic is
//! left within about a second while an idle mesh costs little.
//!
//! A session that never gets busy stays on its relay and costs no probes:
//! in a forming mesh of seventy nodes on two cores, the probes, answers
//! and path changes of sessions that only carried `global`'s chatter took
//! a fifth of the NIF's CPU (10.6 against 8.2 CPU-s, the mesh formed in
//! 9.0 s against 7.1 s; medians of three runs).
//!
//! ```text
//! 0        1                 9        10       11                19                 35
//! +--------+-----------------+--------+--------+-----------------+------------------+
//! | 0x02   | session id (BE) | kind   | sender | nonce           | tag (16 bytes)   |
//! +--------+-----------------+--------+--------+-----------------+------------------+
//! ```
//!
//! `kind` is 0 (probe), 1 (answer) or 2 (keep probe: a probe of the path
//! its sender uses), `sender` 0 (the session's requester) or 1 (its
//! target). The tag is HMAC-SHA256 over the bytes before it,
//! keyed with a secret both nodes export from their QUIC connection's TLS
//! session (RFC 5705 exporter): nobody else can make a probe or an answer,
//! so nobody else can move a session to an address. A path is taken only
//! on an answer that comes from the address its probe went to and names
//! that probe's nonce; `sender` keeps a node from taking its own probes,
//! reflected back, for its peer's.
//!
//! Replay: a node's nonces count up, and a probe is answered only once
//! (a 64-wide window, as IPsec's anti-replay); an answer is taken once
//! (its probe is then forgotten). An address is *validated* once it
//! answered one of this node's probes, and only then are the session's
//! datagrams taken from it. Addresses learned from probes (peer-reflexive
//! candidates) are capped at [`MAX_LEARNED`], one per [`LEARN_EVERY`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::wire::dataplane::SessionId;

/// First byte of a probe datagram.
pub const PROBE_DATAGRAM: u8 = 0x02;
pub const PROBE_LEN: usize = 35;
const TAG_LEN: usize = 16;
/// Probe kinds (byte 9).
const PROBE: u8 = 0;
const ANSWER: u8 = 1;
const KEEP_PROBE: u8 = 2;

/// What a session carries through its relay (both ways, the QUIC
/// datagrams' bytes) before it looks for a direct path: a bulk transfer
/// goes direct within milliseconds, an rpc exchange of a few hundred bytes
/// a second within minutes, a mesh's chatter and ticks never.
pub const BUSY_BYTES: u64 = 256 * 1024;
/// How often each candidate is probed while looking for a path.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How long a round of probing lasts before it rests.
pub const PROBE_FOR: Duration = Duration::from_secs(2);
/// The first rest after a round that found nothing; it doubles up to
/// [`MAX_REST`].
pub const FIRST_REST: Duration = Duration::from_secs(5);
pub const MAX_REST: Duration = Duration::from_secs(60);
/// How often a direct path is probed while in use (a node with a hundred
/// busy sessions sends two hundred probes a second at this rate: one
/// round trip of probes per session a second would cost a mesh of a
/// hundred nodes more CPU than its distribution traffic).
pub const KEEP_EVERY: Duration = Duration::from_millis(500);
/// A direct path in use without an answer for this long is given up.
pub const LOST_AFTER: Duration = Duration::from_millis(1500);
/// How long the peer's session datagrams arriving on the path in use stand
/// in for answers. While they keep coming, a busy path is probed every
/// `HEARD_TRUST` instead of every [`KEEP_EVERY`] (in a forming mesh of
/// forty nodes, keep probes and their answers were a third of all
/// datagrams). The datagrams are not authenticated here (quinn drops forged
/// ones later), so someone who forges the peer's address keeps a dead path
/// at most this much longer: probes then go out again, and only answers
/// count.
pub const HEARD_TRUST: Duration = Duration::from_secs(5);
/// A session that sent nothing for this long is idle.
pub const IDLE_AFTER: Duration = Duration::from_secs(2);
/// How often an idle session's direct path is probed. The session's own
/// QUIC keep-alives (every 10 s) keep the NAT mappings open, and each wakes
/// the path (it is probed at once), so an idle path needs few probes.
pub const IDLE_KEEP_EVERY: Duration = Duration::from_secs(25);
/// An idle session's direct path without an answer for this long is given up.
pub const IDLE_LOST_AFTER: Duration = Duration::from_secs(60);
/// Candidates kept per session, at most.
pub const MAX_CANDIDATES: usize = 16;
/// Probes remembered (awaiting their answer), at most.
const MAX_SENT: usize = 64;
/// Candidates learned from the peer's probes, at most, and how often.
pub const MAX_LEARNED: usize = 4;
pub const LEARN_EVERY: Duration = Duration::from_secs(1);
/// Probe nonces older than the newest by this many are refused.
const REPLAY_WINDOW: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The session's datagrams go to this address now.
    Direct(SocketAddr),
    /// The direct path stopped answering: back through the relay.
    Relay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not busy yet (see [`BUSY_BYTES`]): no timers, no probes; the peer's
    /// probes are answered.
    Waiting,
    Probing {
        until: Instant,
    },
    /// `since`: when the path was taken, the session last became active,
    /// or the peer's traffic last proved the path; a path in use is given
    /// up [`LOST_AFTER`] after the later of it and the last answer.
    Direct {
        addr: SocketAddr,
        last_answer: Instant,
        since: Instant,
    },
    Resting {
        until: Instant,
    },
}

pub type Probe = (SocketAddr, [u8; PROBE_LEN]);

#[derive(Debug)]
pub struct DirectPath {
    session: SessionId,
    key: hmac::Key,
    /// 0: this node requested the session; 1: it is the target.
    me: u8,
    candidates: Vec<SocketAddr>,
    sent: VecDeque<(u64, SocketAddr)>,
    state: State,
    next_probe: Instant,
    rest: Duration,
    /// When the session last sent a datagram (see [`DirectPath::sent`]).
    last_sent: Option<Instant>,
    /// When a session datagram last came from the path in use (see
    /// [`DirectPath::heard`]).
    last_heard: Option<Instant>,
    /// This node's next probe nonce (counts up).
    next_nonce: u64,
    /// The peer's newest probe nonce, and which of the 64 before it came.
    peer_top: u64,
    peer_seen: u64,
    /// Addresses that answered a probe of this node's.
    validated: Vec<SocketAddr>,
    learned: usize,
    last_learned: Option<Instant>,
}

/// The session a probe datagram is for, if it is one.
pub fn probe_session(datagram: &[u8]) -> Option<SessionId> {
    if datagram.len() != PROBE_LEN || datagram[0] != PROBE_DATAGRAM {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&datagram[1..9]);
    Some(SessionId::from_be_bytes(id))
}

impl DirectPath {
    /// `secret`: exported from the session's TLS; `requester`: this node
    /// asked for the session.
    pub fn new(session: SessionId, secret: &[u8], requester: bool, now: Instant) -> Self {
        DirectPath {
            session,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            me: if requester { 0 } else { 1 },
            candidates: vec![],
            sent: VecDeque::new(),
            state: State::Waiting,
            next_probe: now,
            rest: FIRST_REST,
            last_sent: None,
            last_heard: None,
            next_nonce: 1,
            peer_top: 0,
            peer_seen: 0,
            validated: Vec::new(),
            learned: 0,
            last_learned: None,
        }
    }

    /// True once `addr` answered one of this node's probes: the session's
    /// datagrams may be taken from it.
    pub fn validated(&self, addr: &SocketAddr) -> bool {
        self.validated.contains(addr)
    }

    /// A probe to `to` at once, if it is a candidate not validated yet (the
    /// peer just probed from it: answering our probe validates it within a
    /// round trip, not at the next poll).
    pub fn probe_to(&mut self, to: SocketAddr) -> Option<Probe> {
        if self.validated(&to) || !self.candidates.contains(&to) {
            return None;
        }
        Some((to, self.probe(to)))
    }

    /// A probe nonce of the peer's, seen for the first time (then noted).
    fn fresh(&mut self, nonce: u64) -> bool {
        if nonce > self.peer_top {
            let shift = nonce - self.peer_top;
            self.peer_seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.peer_seen << shift
            };
            self.peer_seen |= 1;
            self.peer_top = nonce;
            return true;
        }
        let age = self.peer_top - nonce;
        if age >= REPLAY_WINDOW || self.peer_seen & (1 << age) != 0 {
            return false;
        }
        self.peer_seen |= 1 << age;
        true
    }

    fn active(&self, now: Instant) -> bool {
        self.last_sent
            .is_some_and(|t| now.saturating_duration_since(t) < IDLE_AFTER)
    }

    /// The session sent a datagram. True when it was idle on a direct path
    /// until now: run [`poll`](Self::poll) at once (it probes the path).
    pub fn sent(&mut self, now: Instant) -> bool {
        let woke = !self.active(now);
        self.last_sent = Some(now);
        match (&mut self.state, woke) {
            (State::Direct { since, .. }, true) => {
                *since = now;
                self.next_probe = now;
                true
            }
            _ => false,
        }
    }

    /// A session datagram came from `from`: on the path in use, it stands
    /// in for an answer for a while (see [`HEARD_TRUST`]).
    pub fn heard(&mut self, from: SocketAddr, now: Instant) {
        if self.direct() == Some(from) {
            self.last_heard = Some(now);
        }
    }

    /// The peer's session datagrams on the path in use answer this side's
    /// traffic: the last one came at most [`KEEP_EVERY`] before this side
    /// last sent (the last datagram of an exchange is often a bare
    /// acknowledgement, which nothing answers), and the last answer to a
    /// probe is recent enough to trust them.
    fn proven(&self, last_answer: Instant, now: Instant) -> bool {
        let (Some(heard), Some(sent)) = (self.last_heard, self.last_sent) else {
            return false;
        };
        heard + KEEP_EVERY >= sent && now < last_answer + HEARD_TRUST
    }

    /// When a direct path with these timestamps counts as lost.
    fn lost_at(&self, last_answer: Instant, since: Instant, now: Instant) -> Instant {
        if self.active(now) {
            last_answer.max(since) + LOST_AFTER
        } else {
            last_answer + IDLE_LOST_AFTER
        }
    }

    /// The address the session's datagrams go to, when direct.
    pub fn direct(&self) -> Option<SocketAddr> {
        match self.state {
            State::Direct { addr, .. } => Some(addr),
            _ => None,
        }
    }

    /// Adds the peer's candidates; a new one ends a rest (it may work).
    pub fn add_candidates(&mut self, addrs: &[SocketAddr], now: Instant) {
        let mut added = false;
        for a in addrs {
            if !self.candidates.contains(a) && self.candidates.len() < MAX_CANDIDATES {
                self.candidates.push(*a);
                added = true;
            }
        }
        if added && matches!(self.state, State::Resting { .. }) {
            self.start_probing(now);
        }
    }

    /// The session got busy: it starts looking for a direct path (once;
    /// afterwards this does nothing).
    pub fn busy(&mut self, now: Instant) {
        if self.state == State::Waiting {
            self.start_probing(now);
        }
    }

    fn start_probing(&mut self, now: Instant) {
        self.state = State::Probing {
            until: now + PROBE_FOR,
        };
        self.next_probe = now;
    }

    /// When [`poll`](Self::poll) has something to do next, as of `now`
    /// (a session that turns idle meanwhile only makes it early).
    pub fn next_timeout(&self, now: Instant) -> Instant {
        match self.state {
            State::Waiting => now + MAX_REST,
            State::Probing { until } => self.next_probe.min(until),
            State::Direct {
                last_answer, since, ..
            } => self.next_probe.min(self.lost_at(last_answer, since, now)),
            State::Resting { until } => until,
        }
    }

    /// Runs the timers: probes to send (into `out`), and a change of path.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Probe>) -> Option<Event> {
        let mut event = None;
        match self.state {
            State::Probing { until } if now >= until => {
                self.state = State::Resting {
                    until: now + self.rest,
                };
                self.rest = (self.rest * 2).min(MAX_REST);
                return None;
            }
            State::Direct {
                last_answer, since, ..
            } if now >= self.lost_at(last_answer, since, now) => {
                self.state = State::Resting {
                    until: now + FIRST_REST,
                };
                self.last_heard = None;
                event = Some(Event::Relay);
            }
            State::Resting { until } if now >= until => self.start_probing(now),
            _ => {}
        }
        if now < self.next_probe {
            return event;
        }
        match self.state {
            State::Probing { .. } => {
                for i in 0..self.candidates.len() {
                    let to = self.candidates[i];
                    out.push((to, self.probe(to)));
                }
                self.next_probe = now + PROBE_EVERY;
            }
            State::Direct {
                addr, last_answer, ..
            } => {
                let active = self.active(now);
                if active && self.proven(last_answer, now) {
                    // No probe this time; the path counts as answering
                    // from now (as when the session wakes).
                    self.state = State::Direct {
                        addr,
                        last_answer,
                        since: now,
                    };
                } else {
                    out.push((addr, self.probe_of(KEEP_PROBE, addr)));
                }
                let every = match active {
                    true => KEEP_EVERY,
                    false => IDLE_KEEP_EVERY,
                };
                self.next_probe = now + every;
            }
            State::Waiting | State::Resting { .. } => {}
        }
        event
    }

    fn probe(&mut self, to: SocketAddr) -> [u8; PROBE_LEN] {
        self.probe_of(PROBE, to)
    }

    fn probe_of(&mut self, kind: u8, to: SocketAddr) -> [u8; PROBE_LEN] {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        if self.sent.len() >= MAX_SENT {
            self.sent.pop_front();
        }
        self.sent.push_back((nonce, to));
        self.datagram(kind, nonce)
    }

    fn datagram(&self, kind: u8, nonce: u64) -> [u8; PROBE_LEN] {
        let mut d = [0u8; PROBE_LEN];
        d[0] = PROBE_DATAGRAM;
        d[1..9].copy_from_slice(&self.session.to_be_bytes());
        d[9] = kind;
        d[10] = self.me;
        d[11..19].copy_from_slice(&nonce.to_be_bytes());
        let tag = hmac::sign(&self.key, &d[..PROBE_LEN - TAG_LEN]);
        d[PROBE_LEN - TAG_LEN..].copy_from_slice(&tag.as_ref()[..TAG_LEN]);
        d
    }

    fn verify(&self, d: &[u8]) -> bool {
        // A truncated tag: recomputed, and compared in constant time.
        let tag = hmac::sign(&self.key, &d[..PROBE_LEN - TAG_LEN]);
        bool::from(tag.as_ref()[..TAG_LEN].ct_eq(&d[PROBE_LEN - TAG_LEN..]))
    }

    /// A probe datagram from `from`: the answer to send back (for a probe),
    /// and a change of path (for an answer to one of ours). Anything not
    /// made by the session's peer is ignored.
    pub fn on_datagram(
        &mut self,
        from: SocketAddr,
        d: &[u8],
        now: Instant,
    ) -> (Option<Probe>, Option<Event>) {
        if probe_session(d) != Some(self.session) || d[10] != 1 - self.me || !self.verify(d) {
            return (None, None);
        }
        let mut nonce = [0u8; 8];
        nonce.copy_from_slice(&d[11..19]);
        let nonce = u64::from_be_bytes(nonce);
        match d[9] {
            kind @ (PROBE | KEEP_PROBE) => {
                if !self.fresh(nonce) {
                    return (None, None);
                }
                // The peer is busy (it looks for a path): so is this side.
                // Both must probe for their NATs to open to each other.
                if kind == PROBE {
                    self.busy(now);
                }
                // The peer reaches us from `from`: probe it back (it is
                // where its NAT mapping is), and answer.
                let learn = self.learned < MAX_LEARNED
                    && self
                        .last_learned
                        .is_none_or(|t| now.saturating_duration_since(t) >= LEARN_EVERY);
                if !self.candidates.contains(&from) && learn {
                    self.learned += 1;
                    self.last_learned = Some(now);
                    self.add_candidates(&[from], now);
                }
                // A fresh keep probe from the path in use: the peer uses it
                // too, and it carries the peer's datagrams as well as an
                // answer would, so this side's own probe can wait (one side
                // probes a busy pair's path, not both). A path that only
                // works the other way is given up by the peer first, whose
                // keep probes then stop (its probes while looking for a path
                // again are kind 0, and count for nothing here).
                if let State::Direct { addr, since, .. } = self.state {
                    if addr == from && kind == KEEP_PROBE {
                        self.state = State::Direct {
                            addr,
                            last_answer: now,
                            since,
                        };
                        self.next_probe = self.next_probe.max(now + KEEP_EVERY);
                    }
                }
                (Some((from, self.datagram(ANSWER, nonce))), None)
            }
            ANSWER => {
                let Some(i) = self
                    .sent
                    .iter()
                    .position(|&(n, to)| n == nonce && to == from)
                else {
                    return (None, None);
                };
                self.sent.remove(i);
                if !self.validated.contains(&from) {
                    if self.validated.len() >= MAX_CANDIDATES {
                        self.validated.remove(0);
                    }
                    self.validated.push(from);
                }
                match self.state {
                    State::Direct { addr, since, .. } if addr == from => {
                        self.state = State::Direct {
                            addr,
                            last_answer: now,
                            since,
                        };
                        (None, None)
                    }
                    State::Direct { .. } => (None, None),
                    _ => {
                        self.state = State::Direct {
                            addr: from,
                            last_answer: now,
                            since: now,
                        };
                        self.last_heard = None;
                        self.next_probe = now + KEEP_EVERY;
                        self.rest = FIRST_REST;
                        (None, Some(Event::Direct(from)))
                    }
                }
            }
            _ => (None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    /// The requester (at addr 1) and the target (at addr 2) of session 7.
    fn pair(now: Instant) -> (DirectPath, DirectPath) {
        let mut a = DirectPath::new(7, b"secret", true, now);
        let mut b = DirectPath::new(7, b"secret", false, now);
        a.add_candidates(&[addr(2)], now);
        b.add_candidates(&[addr(1)], now);
        a.busy(now);
        b.busy(now);
        (a, b)
    }

    /// Delivers `probes` sent from `from`, as far as `reachable` lets them.
    fn deliver(
        to: &mut DirectPath,
        from: SocketAddr,
        probes: Vec<Probe>,
        now: Instant,
    ) -> (Vec<Probe>, Vec<Event>) {
        let mut replies = vec![];
        let mut events = vec![];
        for (_, d) in probes {
            let (r, e) = to.on_datagram(from, &d, now);
            replies.extend(r);
            events.extend(e);
        }
        (replies, events)
    }

    #[test]
    fn both_sides_go_direct_on_the_first_answer() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        let mut out = vec![];
        assert_eq!(a.poll(now, &mut out), None);
        assert_eq!(out.len(), 1);
        let (answers, events) = deliver(&mut b, addr(1), out, now);
        assert!(events.is_empty());
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].0, addr(1));
        let (_, events) = deliver(&mut a, addr(2), answers, now);
        assert_eq!(events, vec![Event::Direct(addr(2))]);
        assert_eq!(a.direct(), Some(addr(2)));
        // B goes direct on its own probes' answers.
        let mut out = vec![];
        b.poll(now, &mut out);
        let (answers, _) = deliver(&mut a, addr(2), out, now);
        let (_, events) = deliver(&mut b, addr(1), answers, now);
        assert_eq!(events, vec![Event::Direct(addr(1))]);
    }

    #[test]
    fn a_session_probes_once_busy_and_its_peer_follows() {
        let now = Instant::now();
        let mut a = DirectPath::new(7, b"secret", true, now);
        let mut b = DirectPath::new(7, b"secret", false, now);
        a.add_candidates(&[addr(2)], now);
        b.add_candidates(&[addr(1)], now);
        // Not busy: a minute of timers sends nothing.
        let mut t = now;
        while t < now + Duration::from_secs(60) {
            let mut out = vec![];
            assert_eq!(a.poll(t, &mut out), None);
            assert!(out.is_empty());
            t = a.next_timeout(t).max(t + Duration::from_millis(1));
        }
        // A probe made with another key (anyone but the peer) makes B
        // nothing: it stays quiet.
        let mut mallory = DirectPath::new(7, b"guess", true, now);
        mallory.add_candidates(&[addr(2)], now);
        mallory.busy(t);
        let mut forged = vec![];
        mallory.poll(t, &mut forged);
        assert_eq!(forged.len(), 1);
        assert_eq!(deliver(&mut b, addr(1), forged, t), (vec![], vec![]));
        assert_eq!(b.next_timeout(t), t + MAX_REST);
        // A gets busy and probes at once; B, still under BUSY_BYTES,
        // answers and starts probing too, so both go direct.
        a.busy(t);
        assert_eq!(a.next_timeout(t), t);
        let mut out = vec![];
        a.poll(t, &mut out);
        assert_eq!(out.len(), 1);
        let (answers, _) = deliver(&mut b, addr(1), out, t);
        deliver(&mut a, addr(2), answers, t);
        assert_eq!(a.direct(), Some(addr(2)));
        assert_eq!(b.next_timeout(t), t);
        let mut out = vec![];
        b.poll(t, &mut out);
        let (answers, _) = deliver(&mut a, addr(2), out, t);
        let (_, events) = deliver(&mut b, addr(1), answers, t);
        assert_eq!(events, vec![Event::Direct(addr(1))]);
    }

    #[test]
    fn replayed_probes_and_answers_are_ignored() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        let mut out = vec![];
        a.poll(now, &mut out);
        let probe = out[0].1;
        let (answer, _) = b.on_datagram(addr(1), &probe, now);
        let answer = answer.unwrap().1;
        // The same probe again, from anywhere: no answer, nothing learned.
        for port in [1, 9, 10] {
            assert_eq!(b.on_datagram(addr(port), &probe, now), (None, None));
        }
        assert!(!b.candidates.contains(&addr(9)));
        // The answer is taken once; its replay moves nothing.
        assert_eq!(
            a.on_datagram(addr(2), &answer, now).1,
            Some(Event::Direct(addr(2)))
        );
        assert!(a.validated(&addr(2)));
        assert!(!a.validated(&addr(9)));
        a.state = State::Resting { until: now };
        assert_eq!(a.on_datagram(addr(2), &answer, now), (None, None));
        // Older probes inside the window, seen for the first time, pass.
        let mut c = DirectPath::new(7, b"secret", true, now);
        let probes: Vec<_> = (0..3).map(|_| c.probe(addr(2))).collect();
        let (mut b2, _) = (DirectPath::new(7, b"secret", false, now), ());
        assert!(b2.on_datagram(addr(1), &probes[2], now).0.is_some());
        assert!(b2.on_datagram(addr(1), &probes[0], now).0.is_some());
        assert!(b2.on_datagram(addr(1), &probes[0], now).0.is_none());
        assert!(b2.on_datagram(addr(1), &probes[1], now).0.is_some());
    }

    #[test]
    fn learned_candidates_are_capped_and_rate_limited() {
        let now = Instant::now();
        let mut a = DirectPath::new(7, b"secret", true, now);
        let mut b = DirectPath::new(7, b"secret", false, now);
        // Fresh probes from 20 addresses at once: one learned.
        for port in 100..120 {
            let p = a.probe(addr(2));
            assert!(b.on_datagram(addr(port), &p, now).0.is_some());
        }
        assert_eq!(b.candidates.len(), 1);
        // One a second after that, up to MAX_LEARNED.
        for s in 1..20u64 {
            let p = a.probe(addr(2));
            b.on_datagram(addr(200 + s as u16), &p, now + Duration::from_secs(s));
        }
        assert_eq!(b.candidates.len(), MAX_LEARNED);
    }

    #[test]
    fn forged_reflected_and_misrouted_answers_move_nothing() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        let mut out = vec![];
        a.poll(now, &mut out);
        // A's own probe reflected back to it.
        assert_eq!(a.on_datagram(addr(2), &out[0].1, now), (None, None));
        // Another key (a third party that saw the session id).
        let mut mallory = DirectPath::new(7, b"guess", false, now);
        let (answer, _) = mallory.on_datagram(addr(1), &out[0].1, now);
        assert!(answer.is_none());
        let forged = mallory.datagram(ANSWER, 1);
        assert_eq!(a.on_datagram(addr(9), &forged, now), (None, None));
        // A real answer, but from an address the probe did not go to.
        let (answers, _) = deliver(&mut b, addr(1), out, now);
        assert_eq!(a.on_datagram(addr(9), &answers[0].1, now), (None, None));
        // A flipped bit.
        let mut bent = answers[0].1;
        bent[12] ^= 1;
        assert_eq!(a.on_datagram(addr(2), &bent, now), (None, None));
        assert_eq!(a.direct(), None);
        // Garbage of every length.
        for len in 0..64 {
            assert_eq!(a.on_datagram(addr(2), &vec![2u8; len], now), (None, None));
        }
    }

    #[test]
    fn a_silent_path_falls_back_then_probing_rests_and_retries() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        let mut out = vec![];
        a.poll(now, &mut out);
        let (answers, _) = deliver(&mut b, addr(1), out, now);
        deliver(&mut a, addr(2), answers, now);
        assert_eq!(a.direct(), Some(addr(2)));
        // The session sends all along; keep-alive probes go out, no answer
        // comes.
        let mut t = now;
        let mut event = None;
        while event.is_none() {
            a.sent(t);
            t = a.next_timeout(t);
            let mut out = vec![];
            event = a.poll(t, &mut out);
        }
        assert_eq!(event, Some(Event::Relay));
        assert!(t.duration_since(now) <= LOST_AFTER + KEEP_EVERY);
        assert_eq!(a.direct(), None);
        // It rests, then probes again.
        assert_eq!(a.next_timeout(t), t + FIRST_REST);
        let mut out = vec![];
        a.poll(t + FIRST_REST, &mut out);
        assert_eq!(out.len(), 1);
    }

    /// Runs `a`'s timers from `from` to `to`, answering its probes when
    /// `answered`; the probes it sent and the first change of path.
    fn run(
        a: &mut DirectPath,
        b: &mut DirectPath,
        from: Instant,
        to: Instant,
        answered: bool,
    ) -> (usize, Option<(Instant, Event)>) {
        let mut t = from;
        let mut probes = 0;
        while t < to {
            let mut out = vec![];
            if let Some(e) = a.poll(t, &mut out) {
                return (probes, Some((t, e)));
            }
            probes += out.len();
            if answered {
                let (answers, _) = deliver(b, addr(1), out, t);
                if let Some(e) = deliver(a, addr(2), answers, t).1.first() {
                    return (probes, Some((t, *e)));
                }
            }
            t = a.next_timeout(t).max(t + Duration::from_millis(1));
        }
        (probes, None)
    }

    #[test]
    fn an_idle_session_probes_seldom_and_a_busy_one_notices_a_dead_path_at_once() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        let (_, change) = run(&mut a, &mut b, now, now + Duration::from_millis(10), true);
        assert_eq!(change.map(|(_, e)| e), Some(Event::Direct(addr(2))));
        // Idle for a minute, answered: about one probe per IDLE_KEEP_EVERY.
        let later = now + Duration::from_secs(60);
        let (probes, change) = run(&mut a, &mut b, now + Duration::from_millis(10), later, true);
        assert_eq!(change, None);
        assert!(
            probes <= (60 / IDLE_KEEP_EVERY.as_secs() + 2) as usize,
            "{probes}"
        );
        // It sends again, on a path that went dead while it was idle: probed
        // at once, given up within LOST_AFTER (not IDLE_LOST_AFTER).
        assert!(a.sent(later));
        assert_eq!(a.next_timeout(later), later);
        let mut t = later;
        let event = loop {
            a.sent(t);
            if let Some(e) = a.poll(t, &mut vec![]) {
                break e;
            }
            t = a.next_timeout(t).max(t + Duration::from_millis(1));
        };
        assert_eq!(event, Event::Relay);
        assert!(t.duration_since(later) <= LOST_AFTER + KEEP_EVERY);
    }

    #[test]
    fn a_session_that_wakes_on_a_live_path_keeps_it() {
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        run(&mut a, &mut b, now, now + Duration::from_millis(10), true);
        let later = now + Duration::from_secs(4);
        run(&mut a, &mut b, now + Duration::from_millis(10), later, true);
        // Its last answer is seconds old, but the path answers at once.
        assert!(a.sent(later));
        let mut t = later;
        while t < later + Duration::from_secs(3) {
            a.sent(t);
            let mut out = vec![];
            assert_eq!(a.poll(t, &mut out), None);
            let (answers, _) = deliver(&mut b, addr(1), out, t);
            deliver(&mut a, addr(2), answers, t);
            t = a.next_timeout(t).max(t + Duration::from_millis(1));
        }
        assert_eq!(a.direct(), Some(addr(2)));
    }

    /// Runs both sides' timers from `from` to `to`, both sending all
    /// along, with datagrams getting through as `a_to_b` and `b_to_a` say,
    /// and each side hearing the other's session datagrams when `heard`:
    /// the probes each side sent (answers not counted), and each side's
    /// first change of path.
    fn run_busy_pair(
        a: &mut DirectPath,
        b: &mut DirectPath,
        (from, to): (Instant, Instant),
        (a_to_b, b_to_a): (bool, bool),
        heard: bool,
    ) -> ([usize; 2], [Option<(Instant, Event)>; 2]) {
        let mut t = from;
        let mut probes = [0; 2];
        let mut changes = [None; 2];
        let mut note = |side: usize, e: Option<Event>, t: Instant| {
            if let (None, Some(e)) = (changes[side], e) {
                changes[side] = Some((t, e));
            }
        };
        while t < to {
            a.sent(t);
            b.sent(t);
            // A side's session datagrams take the direct path while it has one.
            if heard && a_to_b && a.direct().is_some() {
                b.heard(addr(1), t);
            }
            if heard && b_to_a && b.direct().is_some() {
                a.heard(addr(2), t);
            }
            for side in [0, 1] {
                let (me, peer, there, back, my_addr, peer_addr) = match side {
                    0 => (&mut *a, &mut *b, a_to_b, b_to_a, addr(1), addr(2)),
                    _ => (&mut *b, &mut *a, b_to_a, a_to_b, addr(2), addr(1)),
                };
                let mut out = vec![];
                note(side, me.poll(t, &mut out), t);
                probes[side] += out.len();
                if there {
                    let (answers, events) = deliver(peer, my_addr, out, t);
                    note(1 - side, events.first().copied(), t);
                    if back {
                        let (_, events) = deliver(me, peer_addr, answers, t);
                        note(side, events.first().copied(), t);
                    }
                }
            }
            t = a
                .next_timeout(t)
                .min(b.next_timeout(t))
                .max(t + Duration::from_millis(1));
        }
        (probes, changes)
    }

    /// Two sides busy from `now`, both gone direct within 10 ms (hearing
    /// each other's datagrams when `heard`).
    fn busy_pair_gone_direct(now: Instant, heard: bool) -> (DirectPath, DirectPath) {
        let (mut a, mut b) = pair(now);
        let start = (now, now + Duration::from_millis(10));
        let (_, changes) = run_busy_pair(&mut a, &mut b, start, (true, true), heard);
        assert!(changes
            .iter()
            .all(|c| matches!(c, Some((_, Event::Direct(_))))));
        (a, b)
    }

    #[test]
    fn one_side_probes_a_busy_pairs_path() {
        let now = Instant::now();
        let (mut a, mut b) = busy_pair_gone_direct(now, false);
        // Ten busy seconds, neither hearing the other's datagrams: about one
        // probe per KEEP_EVERY in all, not one per side.
        let busy = (
            now + Duration::from_millis(10),
            now + Duration::from_secs(10),
        );
        let (probes, changes) = run_busy_pair(&mut a, &mut b, busy, (true, true), false);
        assert_eq!(changes, [None, None]);
        let per_side = (10_000 / KEEP_EVERY.as_millis()) as usize;
        assert!(probes[0] + probes[1] <= per_side + 4, "{probes:?}");
    }

    #[test]
    fn the_peers_traffic_on_the_path_spares_most_probes() {
        let now = Instant::now();
        let (mut a, mut b) = busy_pair_gone_direct(now, true);
        // Twenty busy seconds, each side hearing the other: a probe round
        // per HEARD_TRUST, and the path kept.
        let busy = (
            now + Duration::from_millis(10),
            now + Duration::from_secs(20),
        );
        let (probes, changes) = run_busy_pair(&mut a, &mut b, busy, (true, true), true);
        assert_eq!(changes, [None, None]);
        let rounds = (20 / HEARD_TRUST.as_secs()) as usize;
        assert!(probes[0] + probes[1] <= 2 * rounds + 2, "{probes:?}");
        assert_eq!((a.direct(), b.direct()), (Some(addr(2)), Some(addr(1))));
    }

    #[test]
    fn datagrams_from_the_path_keep_a_dead_path_only_so_long() {
        // The path stops answering, but datagrams keep coming from the
        // peer's address (forged, say): probes start again once the last
        // answer is HEARD_TRUST old, and the path is given up LOST_AFTER
        // later.
        let now = Instant::now();
        let (mut a, mut b) = pair(now);
        run(&mut a, &mut b, now, now + Duration::from_millis(10), true);
        assert_eq!(a.direct(), Some(addr(2)));
        let mut t = now + Duration::from_millis(10);
        let mut probes = 0;
        let event = loop {
            a.sent(t);
            a.heard(addr(2), t);
            let mut out = vec![];
            if let Some(e) = a.poll(t, &mut out) {
                break e;
            }
            probes += out.len();
            t = a.next_timeout(t).max(t + Duration::from_millis(1));
        };
        assert_eq!(event, Event::Relay);
        assert!(t.duration_since(now) <= HEARD_TRUST + LOST_AFTER + KEEP_EVERY);
        assert!(t.duration_since(now) >= HEARD_TRUST);
        assert!((2..=4).contains(&probes), "{probes}");
    }

    #[test]
    fn a_path_that_works_one_way_only_is_given_up_by_both() {
        let now = Instant::now();
        let (mut a, mut b) = busy_pair_gone_direct(now, true);
        // B's datagrams stop reaching A; A's still reach B, and A keeps
        // probing (kind 0) after it gives the path up.
        let later = now + Duration::from_millis(10);
        let span = (later, later + Duration::from_secs(20));
        let (_, changes) = run_busy_pair(&mut a, &mut b, span, (true, false), true);
        for (t, e) in changes.map(Option::unwrap) {
            assert_eq!(e, Event::Relay);
            assert!(t.duration_since(later) <= 2 * LOST_AFTER + KEEP_EVERY);
        }
        assert_eq!((a.direct(), b.direct()), (None, None));
    }

    #[test]
    fn an_unanswered_round_rests_longer_each_time() {
        let now = Instant::now();
        let (mut a, _) = pair(now);
        let mut t = now;
        let mut rests = vec![];
        let mut probes = 0;
        while rests.len() < 4 {
            let mut out = vec![];
            let before = matches!(a.state, State::Probing { .. });
            a.poll(t, &mut out);
            probes += out.len();
            if before {
                if let State::Resting { until } = a.state {
                    rests.push(until - t);
                }
            }
            t = a.next_timeout(t);
        }
        assert_eq!(
            rests,
            vec![FIRST_REST, FIRST_REST * 2, FIRST_REST * 4, FIRST_REST * 8]
        );
        // About PROBE_FOR / PROBE_EVERY probes per round, one candidate.
        assert!(probes <= 4 * (PROBE_FOR.as_millis() / PROBE_EVERY.as_millis() + 1) as usize);
    }

    #[test]
    fn candidates_are_bounded_and_a_new_one_ends_a_rest() {
        let now = Instant::now();
        let mut a = DirectPath::new(1, b"k", true, now);
        let many: Vec<SocketAddr> = (0..100).map(addr).collect();
        a.add_candidates(&many, now);
        assert_eq!(a.candidates.len(), MAX_CANDIDATES);
        let mut b = DirectPath::new(2, b"k", true, now);
        b.busy(now);
        let mut out = vec![];
        b.poll(now + PROBE_FOR, &mut out);
        assert!(matches!(b.state, State::Resting { .. }));
        b.add_candidates(&[addr(5)], now + PROBE_FOR);
        assert!(matches!(b.state, State::Probing { .. }));
    }
}
