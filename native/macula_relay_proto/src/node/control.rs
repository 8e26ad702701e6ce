//! What a node's relay client decides, without I/O: which control messages
//! to answer and how, which e2e sessions it carries, when one of them ends
//! because its peer left, which inbound sessions it admits, and how it takes
//! over the sessions of a relay the node lost.
//!
//! Like `quinn-proto`'s `Connection`, [`RelayControl`] is driven from
//! outside and never waits:
//!
//! - **Inputs** (events from the wire and from the node):
//!   [`identified`](RelayControl::identified) once, then
//!   [`handle`](RelayControl::handle) for each control message from the
//!   relay, [`session_up`](RelayControl::session_up) /
//!   [`session_closed`](RelayControl::session_closed) for its e2e sessions,
//!   [`path_changed`](RelayControl::path_changed) when one goes direct or
//!   back, [`inbound_routed`](RelayControl::inbound_routed),
//!   [`cookie_answered`](RelayControl::cookie_answered) and
//!   [`inbound_done`](RelayControl::inbound_done) as an inbound session
//!   comes up, [`relay_lost`](RelayControl::relay_lost) at the end, and
//!   [`expire`](RelayControl::expire) about once a second.
//! - **Commands** (from the node): [`adopt`](RelayControl::adopt) sessions
//!   another relay carried, [`release`](RelayControl::release) one to
//!   another client of the node, [`discard`](RelayControl::discard) a
//!   tunnel.
//! - **Output**: after any of those, [`poll_action`](RelayControl::poll_action)
//!   until it returns `None`: control messages to send, sessions to close or
//!   to probe, log lines. [`handle`](RelayControl::handle) also returns what
//!   the caller must do with the message itself ([`Handled`]).
//!
//! The tunnel matcher (which request a `tun_ok` answers) is the caller's
//! ([`crate::node::matcher`]): this machine tells it what to feed there.

#![warn(missing_docs)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::ratelimit::LogLimiter;
use crate::wire::frame::{BindKey, Message};
use crate::wire::tunnel_id::TunnelId;
use crate::{DIRECT_VERSION, KEEP_WAIT};

/// Inbound sessions not up yet, at most, in all and from one source: any
/// token holder can announce them.
pub const MAX_PENDING_INBOUND: usize = 256;
/// Of those, at most this many from one source.
pub const MAX_PENDING_PER_SOURCE: usize = 16;
/// An inbound session not up after this long is no longer counted (its
/// own timers have ended it by then).
pub const PENDING_INBOUND_FOR: Duration = Duration::from_secs(25);
/// How long an inbound session waits for the owner's cookie.
pub const COOKIE_WAIT: Duration = Duration::from_secs(10);
/// Log lines relays and peers can cause: at most this many per window.
const PEER_LOG_BURST: u32 = 10;
const PEER_LOG_WINDOW: Duration = Duration::from_secs(10);

/// An e2e session as the client carrying it knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// The session's bind key at its relay (what it claims it back with).
    pub bind: BindKey,
    /// The peer's node name.
    pub peer: String,
    /// When this client claimed it at its relay (`None`: opened there).
    pub claimed_at: Option<Instant>,
    /// This node asked for the session.
    pub requester: bool,
    /// The relay said the peer left it while the session was on a direct
    /// path: it ends if that path goes silent.
    pub peer_left: bool,
    /// When the relay said the peer's relay connection ended
    /// (`sess_lost`): the peer has [`KEEP_WAIT`] to claim it back, here or
    /// at another relay both share.
    pub peer_lost_at: Option<Instant>,
}

impl SessionState {
    /// A session just opened through this client's relay.
    pub fn new(bind: BindKey, peer: &str, requester: bool) -> Self {
        SessionState {
            bind,
            peer: peer.to_owned(),
            claimed_at: None,
            requester,
            peer_left: false,
            peer_lost_at: None,
        }
    }
}

/// Sessions handed between clients when a relay is lost.
pub type Sessions = Vec<(TunnelId, SessionState)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// Where a relay client is in its life.
pub enum Phase {
    /// Connecting and identifying.
    Connecting,
    /// Identified: requests and sessions run.
    Connected,
    /// The relay connection ended (or never came up).
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// How loud a log line is.
pub enum Level {
    /// Something that happened as it should (a path change).
    Info,
    /// Something that went wrong, or that a peer or relay did wrong.
    Warning,
}

/// Something the caller must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this on the control stream. A `sess_keep` that cannot be sent
    /// means the session cannot be claimed: close it.
    Send(Message),
    /// Close this session's connection (the peer is gone).
    CloseSession {
        /// The session.
        tunnel: TunnelId,
        /// Why, for the peer (the close reason).
        reason: &'static str,
    },
    /// Probe this session's direct path now: a dead peer stops answering.
    CheckDirect {
        /// The session.
        tunnel: TunnelId,
    },
    /// A log line for the node.
    Log {
        /// How loud.
        level: Level,
        /// The line.
        text: String,
    },
}

/// What the caller does with a control message besides the actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// For the tunnel matcher: a stream tunnel's `tun_ok` or `tun_notify`,
    /// or a `tun_err`.
    Matcher(Message),
    /// The answer to a `nodes` request (the oldest waiting).
    Nodes(Vec<String>),
    /// `tun_ok` of an e2e session: feed the matcher, and connect the
    /// session if the request it answers asked for one.
    SessionOffered {
        /// The session.
        tunnel: TunnelId,
        /// Its bind key at the relay.
        bind: BindKey,
        /// The relay's word on the path's MTU (`pmtu`), if it gave one.
        path_mtu: Option<u16>,
    },
    /// The request in front was offered a stream tunnel in e2e mode: feed
    /// the matcher its `tun_ok`, then fail it with `downgrade_refused`.
    DowngradeRefused {
        /// The tunnel offered.
        tunnel: TunnelId,
    },
    /// An inbound e2e session was admitted: tell the matcher, and ask the
    /// owner for the cookie for `source`, answered with `tag`.
    InboundAnnounced {
        /// The session.
        tunnel: TunnelId,
        /// Who asked for it (the relay's word: checked by the PAKE).
        source: String,
        /// Its bind key at the relay.
        bind: BindKey,
        /// The relay's word on the path's MTU (`pmtu`), if it gave one.
        path_mtu: Option<u16>,
        /// The tag the owner's cookie answer carries.
        tag: u64,
    },
    /// An announced inbound session will not come: the matcher forgets it,
    /// and its route (if made) goes.
    InboundWithdrawn {
        /// The session.
        tunnel: TunnelId,
        /// Where its datagrams would have come from, if routed.
        vaddr: Option<SocketAddr>,
    },
    /// The peer claimed, at this client's relay, a session another client
    /// of the node carries (`sess_claimed`): move it here.
    ClaimedHere {
        /// The session.
        tunnel: TunnelId,
        /// The claimant (the relay's word: the session moves only if its
        /// peer has this name).
        peer: String,
    },
    /// The relay lost the peer of a relayed session (`sess_lost`): it
    /// stays for now. The caller checks whether the peer is still on
    /// another relay of the node's, where it would claim the session, and
    /// calls [`peer_gone`](RelayControl::peer_gone) if it is on none.
    PeerLost {
        /// The session.
        tunnel: TunnelId,
        /// Its peer.
        peer: String,
    },
    /// Nothing else to do.
    Done,
}

#[derive(Debug)]
struct PendingInbound {
    source: String,
    vaddr: Option<SocketAddr>,
    at: Instant,
}

#[derive(Debug)]
struct CookieWait {
    tunnel: TunnelId,
    source: String,
    bind: BindKey,
    path_mtu: Option<u16>,
    at: Instant,
}

/// One relay client's decisions.
#[derive(Debug)]
pub struct RelayControl {
    wants_e2e: bool,
    phase: Phase,
    relay_version: u64,
    reflexive: Option<SocketAddr>,
    sessions: HashMap<TunnelId, SessionState>,
    pending: HashMap<TunnelId, PendingInbound>,
    cookie_waits: HashMap<u64, CookieWait>,
    next_cookie_tag: u64,
    refused_sessions: u64,
    peer_log: LogLimiter,
    actions: VecDeque<Action>,
}

impl RelayControl {
    /// A client that wants e2e sessions (`wants_e2e`) or stream tunnels.
    pub fn new(wants_e2e: bool) -> Self {
        RelayControl {
            wants_e2e,
            phase: Phase::Connecting,
            relay_version: 0,
            reflexive: None,
            sessions: HashMap::new(),
            pending: HashMap::new(),
            cookie_waits: HashMap::new(),
            next_cookie_tag: 0,
            refused_sessions: 0,
            peer_log: LogLimiter::new(PEER_LOG_BURST, PEER_LOG_WINDOW),
            actions: VecDeque::new(),
        }
    }

    /// The next thing to carry out, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Where the client is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Identified and not yet lost.
    pub fn is_connected(&self) -> bool {
        self.phase == Phase::Connected
    }

    /// The relay's protocol version (from `id_ok`; 0 before).
    pub fn relay_version(&self) -> u64 {
        self.relay_version
    }

    /// This node's address as its relay sees it (v4 relays).
    pub fn reflexive(&self) -> Option<SocketAddr> {
        self.reflexive
    }

    /// Inbound sessions refused so far (downgrades, caps, failed handshakes).
    pub fn refused_sessions(&self) -> u64 {
        self.refused_sessions
    }

    /// The e2e sessions this client carries.
    pub fn sessions(&self) -> impl Iterator<Item = (&TunnelId, &SessionState)> {
        self.sessions.iter()
    }

    /// One session this client carries.
    pub fn session(&self, tunnel: &TunnelId) -> Option<&SessionState> {
        self.sessions.get(tunnel)
    }

    /// The relay answered identify with `id_ok` of this version.
    pub fn identified(&mut self, version: u64) {
        self.phase = Phase::Connected;
        self.relay_version = version;
    }

    /// A control message from the relay. `on_direct` says whether one of
    /// this client's sessions runs on a direct path now.
    pub fn handle(
        &mut self,
        msg: Message,
        now: Instant,
        on_direct: impl Fn(&TunnelId) -> bool,
    ) -> Handled {
        match msg {
            Message::TunnelOk {
                tunnel, bind: None, ..
            } if self.wants_e2e => {
                self.refuse_downgrade(
                    tunnel,
                    now,
                    "a stream tunnel instead of the e2e session asked for",
                );
                Handled::DowngradeRefused { tunnel }
            }
            Message::TunnelOk {
                tunnel,
                bind: Some(bind),
                path_mtu,
            } => Handled::SessionOffered {
                tunnel,
                bind,
                path_mtu,
            },
            Message::TunnelNotify {
                tunnel, bind: None, ..
            } if self.wants_e2e => {
                self.refuse_downgrade(tunnel, now, "an inbound stream tunnel");
                Handled::Done
            }
            Message::TunnelNotify {
                tunnel,
                source,
                bind: Some(bind),
                path_mtu,
            } => self.announced(tunnel, source, bind, path_mtu, now),
            msg @ (Message::TunnelOk { .. }
            | Message::TunnelNotify { .. }
            | Message::TunnelError { .. }) => Handled::Matcher(msg),
            Message::Nodes { nodes } => Handled::Nodes(nodes),
            Message::TunnelClose { tunnel } => match self.withdraw_pending(tunnel) {
                Some(withdrawn) => withdrawn,
                None => {
                    self.peer_left(tunnel, now, on_direct(&tunnel));
                    Handled::Done
                }
            },
            Message::SessionLost { tunnel } => match self.withdraw_pending(tunnel) {
                Some(withdrawn) => withdrawn,
                None => self.peer_lost(tunnel, now, on_direct(&tunnel)),
            },
            Message::SessionClaimed { tunnel, source } => match self.sessions.get_mut(&tunnel) {
                Some(s) => {
                    // The peer is back at this relay.
                    if s.peer == source {
                        s.peer_lost_at = None;
                    }
                    Handled::Done
                }
                None => Handled::ClaimedHere {
                    tunnel,
                    peer: source,
                },
            },
            Message::Candidates {
                tunnel: None,
                addrs,
            } => {
                self.reflexive = addrs.first().copied();
                Handled::Done
            }
            // A v3 relay's view of a peer's candidates: not taken
            // (candidates come only from the authenticated peer).
            Message::Candidates { .. } => Handled::Done,
            Message::ProtocolError { reason } => {
                self.log(
                    Level::Warning,
                    format!("the relay reported a protocol error: {reason}"),
                );
                Handled::Done
            }
            other => {
                self.log(
                    Level::Warning,
                    format!("unexpected {} from the relay", other.type_name()),
                );
                Handled::Done
            }
        }
    }

    /// An inbound session announced but not up yet will not come (its peer
    /// left): forgotten, with its cookie request.
    fn withdraw_pending(&mut self, tunnel: TunnelId) -> Option<Handled> {
        let pending = self.pending.remove(&tunnel)?;
        self.cookie_waits.retain(|_, w| w.tunnel != tunnel);
        Some(Handled::InboundWithdrawn {
            tunnel,
            vaddr: pending.vaddr,
        })
    }

    /// An inbound e2e session announced: admitted within the caps, then the
    /// owner is asked for the cookie its PAKE needs.
    fn announced(
        &mut self,
        tunnel: TunnelId,
        source: String,
        bind: BindKey,
        path_mtu: Option<u16>,
        now: Instant,
    ) -> Handled {
        let from_source = self.pending.values().filter(|p| p.source == source).count();
        if self.pending.len() >= MAX_PENDING_INBOUND || from_source >= MAX_PENDING_PER_SOURCE {
            self.refused_sessions += 1;
            self.log_peer_caused(
                now,
                format!(
                    "refused e2e session {tunnel} from {source}: too many sessions waiting to start"
                ),
            );
            self.discard(tunnel);
            return Handled::Done;
        }
        self.pending.insert(
            tunnel,
            PendingInbound {
                source: source.clone(),
                vaddr: None,
                at: now,
            },
        );
        self.next_cookie_tag += 1;
        let tag = self.next_cookie_tag;
        self.cookie_waits.insert(
            tag,
            CookieWait {
                tunnel,
                source: source.clone(),
                bind,
                path_mtu,
                at: now,
            },
        );
        Handled::InboundAnnounced {
            tunnel,
            source,
            bind,
            path_mtu,
            tag,
        }
    }

    /// The relay says a session's peer left it: it died or was cut off, so
    /// its connection ends now, not at the idle timeout. Unless this client
    /// has just claimed it (the relay is closing what the peer's old relay
    /// connection held, and the peer is claiming it back too), or the
    /// session runs on a direct path (it ends when that path goes silent).
    fn peer_left(&mut self, tunnel: TunnelId, now: Instant, on_direct: bool) {
        let Some(s) = self.sessions.get_mut(&tunnel) else {
            return;
        };
        s.peer_left = true;
        let just_claimed = s
            .claimed_at
            .is_some_and(|t| now.duration_since(t) < KEEP_WAIT);
        let action = match (just_claimed, on_direct) {
            (true, _) => return,
            (false, true) => Action::CheckDirect { tunnel },
            (false, false) => Action::CloseSession {
                tunnel,
                reason: "peer left the relay",
            },
        };
        self.actions.push_back(action);
    }

    /// The relay lost the session's peer, which may be dead or cut off
    /// from this relay alone: the session waits [`KEEP_WAIT`] for the
    /// peer's claim, here or at another relay. On a direct path its path
    /// is probed at once (a dead peer stops answering, and the session
    /// ends when the path is lost); a relayed one's peer is looked for on
    /// the node's other relays ([`Handled::PeerLost`]).
    fn peer_lost(&mut self, tunnel: TunnelId, now: Instant, on_direct: bool) -> Handled {
        let Some(s) = self.sessions.get_mut(&tunnel) else {
            return Handled::Done;
        };
        s.peer_lost_at.get_or_insert(now);
        if on_direct {
            self.actions.push_back(Action::CheckDirect { tunnel });
            return Handled::Done;
        }
        Handled::PeerLost {
            tunnel,
            peer: s.peer.clone(),
        }
    }

    /// The peer of a session whose relay lost it is on none of the node's
    /// other relays: it is gone, and the session ends now. Nothing if the
    /// session has moved or its peer came back meanwhile.
    pub fn peer_gone(&mut self, tunnel: &TunnelId) {
        if self
            .sessions
            .get(tunnel)
            .is_some_and(|s| s.peer_lost_at.is_some())
        {
            self.actions.push_back(Action::CloseSession {
                tunnel: *tunnel,
                reason: "peer lost the relay and is on no other",
            });
        }
    }

    /// Whether this session's peer is lost to this relay and has not come
    /// back.
    pub fn is_peer_lost(&self, tunnel: &TunnelId) -> bool {
        self.sessions
            .get(tunnel)
            .is_some_and(|s| s.peer_lost_at.is_some())
    }

    /// A stream tunnel offered to a node in e2e mode: the relay could read
    /// and write it, so no byte of it reaches Erlang.
    fn refuse_downgrade(&mut self, tunnel: TunnelId, now: Instant, what: &str) {
        self.refused_sessions += 1;
        self.log_peer_caused(
            now,
            format!("refused {what} (tunnel {tunnel}): this node is in e2e mode, and a stream tunnel is readable by the relay"),
        );
        self.discard(tunnel);
    }

    /// The owner's cookie for an announced session arrived: the session to
    /// ready (tunnel, source, bind key, path MTU), if it is still expected.
    pub fn cookie_answered(
        &mut self,
        tag: u64,
    ) -> Option<(TunnelId, String, BindKey, Option<u16>)> {
        let wait = self.cookie_waits.remove(&tag)?;
        self.pending.contains_key(&wait.tunnel).then_some((
            wait.tunnel,
            wait.source,
            wait.bind,
            wait.path_mtu,
        ))
    }

    /// An announced session's route: where its datagrams come from.
    pub fn inbound_routed(&mut self, tunnel: &TunnelId, vaddr: SocketAddr) {
        if let Some(p) = self.pending.get_mut(tunnel) {
            p.vaddr = Some(vaddr);
        }
    }

    /// An inbound session failed its handshake (a peer without the cookie
    /// ends here): counted, logged within the peer-caused limit, and the
    /// relay told.
    pub fn inbound_refused(&mut self, tunnel: TunnelId, text: &str, now: Instant) {
        self.pending.remove(&tunnel);
        self.refused_sessions += 1;
        self.log_peer_caused(now, text.to_owned());
        self.discard(tunnel);
    }

    /// An inbound session is up, failed, or never came: no longer pending.
    pub fn inbound_done(&mut self, tunnel: &TunnelId) {
        self.pending.remove(tunnel);
    }

    /// A session is up on this client; `false` if the client is closed
    /// (the caller then closes it).
    pub fn session_up(&mut self, tunnel: TunnelId, state: SessionState) -> bool {
        if self.phase == Phase::Closed {
            return false;
        }
        self.sessions.insert(tunnel, state);
        true
    }

    /// A session's connection ended: forgotten, and the relay told, if
    /// this client held it.
    pub fn session_closed(&mut self, tunnel: &TunnelId) -> bool {
        let held = self.sessions.remove(tunnel).is_some();
        if held {
            self.discard(*tunnel);
        }
        held
    }

    /// A session went direct (`Some(address)`) or back through the relay:
    /// the relay counts it (v3 on), the owner logs it, and a session whose
    /// peer had left the relay ends once its direct path is gone too.
    pub fn path_changed(&mut self, tunnel: &TunnelId, direct: Option<SocketAddr>) {
        let Some(s) = self.sessions.get(tunnel) else {
            return;
        };
        let peer = s.peer.clone();
        if direct.is_none() && (s.peer_left || s.peer_lost_at.is_some()) {
            self.actions.push_back(Action::CloseSession {
                tunnel: *tunnel,
                reason: "peer left the relay and the direct path",
            });
        }
        if self.relay_version >= DIRECT_VERSION {
            self.actions.push_back(Action::Send(Message::SessionPath {
                tunnel: *tunnel,
                direct: direct.is_some(),
            }));
        }
        let text = match direct {
            Some(addr) => format!("e2e session with {peer} went direct, to {addr}"),
            None => format!("e2e session with {peer}: direct path lost, back through the relay"),
        };
        self.log(Level::Info, text);
    }

    /// Takes sessions another relay connection of this node carried: each
    /// is claimed at this relay (`sess_keep`); the caller routes the ones
    /// returned here. Gives them all back when this client is not
    /// connected.
    pub fn adopt(&mut self, sessions: Sessions, now: Instant) -> Result<Vec<TunnelId>, Sessions> {
        if self.phase != Phase::Connected {
            return Err(sessions);
        }
        let mut claimed = Vec::with_capacity(sessions.len());
        for (tunnel, mut s) in sessions {
            self.actions.push_back(Action::Send(Message::SessionKeep {
                tunnel,
                bind: s.bind,
                peer: s.peer.clone(),
            }));
            s.claimed_at = Some(now);
            s.peer_lost_at = None;
            self.sessions.insert(tunnel, s);
            claimed.push(tunnel);
        }
        Ok(claimed)
    }

    /// Gives up a session this client carries with `peer`, for another
    /// client of the node (its peer claimed it at that one's relay); the
    /// relay is told. `None` if this client does not carry it with `peer`,
    /// or if this side is the session's target and has itself just
    /// claimed it here: when both sides lost the relay and claimed at
    /// different relays, the requester follows the target, never both
    /// each other.
    pub fn release(&mut self, tunnel: &TunnelId, peer: &str, now: Instant) -> Option<SessionState> {
        let s = self.sessions.get(tunnel)?;
        let just_claimed = s
            .claimed_at
            .is_some_and(|t| now.duration_since(t) < KEEP_WAIT);
        if s.peer != peer || (just_claimed && !s.requester) {
            return None;
        }
        let s = self.sessions.remove(tunnel)?;
        self.discard(*tunnel);
        Some(s)
    }

    /// Tells the relay this node will not use the tunnel.
    pub fn discard(&mut self, tunnel: TunnelId) {
        self.actions
            .push_back(Action::Send(Message::TunnelClose { tunnel }));
    }

    /// The relay connection is gone: the sessions it carried, for another
    /// client of the node to take. Nothing pending survives it.
    pub fn relay_lost(&mut self) -> Sessions {
        self.phase = Phase::Closed;
        self.pending.clear();
        self.cookie_waits.clear();
        self.sessions.drain().collect()
    }

    /// Forgets cookie requests and pending sessions that waited too long,
    /// and ends sessions whose peer lost the relay and did not come back
    /// within [`KEEP_WAIT`] (one on a direct path then ends when that path
    /// goes silent). `on_direct` as for [`handle`](RelayControl::handle).
    pub fn expire(&mut self, now: Instant, on_direct: impl Fn(&TunnelId) -> bool) {
        self.cookie_waits
            .retain(|_, w| now.duration_since(w.at) < COOKIE_WAIT);
        self.pending
            .retain(|_, p| now.duration_since(p.at) < PENDING_INBOUND_FOR);
        let gone: Vec<TunnelId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.peer_lost_at
                    .is_some_and(|t| now.duration_since(t) >= KEEP_WAIT)
            })
            .map(|(t, _)| *t)
            .collect();
        for tunnel in gone {
            if let Some(s) = self.sessions.get_mut(&tunnel) {
                s.peer_lost_at = None;
                s.peer_left = true;
            }
            let action = match on_direct(&tunnel) {
                true => Action::CheckDirect { tunnel },
                false => Action::CloseSession {
                    tunnel,
                    reason: "peer lost the relay and did not come back",
                },
            };
            self.actions.push_back(action);
        }
    }

    fn log(&mut self, level: Level, text: String) {
        self.actions.push_back(Action::Log { level, text });
    }

    /// A line that a relay or peer can cause at will: rate-limited, so they
    /// cannot fill the node's log.
    fn log_peer_caused(&mut self, now: Instant, text: String) {
        match self.peer_log.allow(now) {
            Some(0) => self.log(Level::Warning, text),
            Some(held) => self.log(
                Level::Warning,
                format!("{text} ({held} similar lines held back)"),
            ),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(n: u8) -> TunnelId {
        TunnelId::from_bytes([n; 16])
    }

    const BIND: BindKey = [7; 8];

    fn connected(e2e: bool) -> RelayControl {
        let mut c = RelayControl::new(e2e);
        c.identified(crate::PROTOCOL_VERSION);
        c
    }

    fn actions(c: &mut RelayControl) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn sends(c: &mut RelayControl) -> Vec<Message> {
        actions(c)
            .into_iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    fn not_direct(_: &TunnelId) -> bool {
        false
    }

    #[test]
    fn a_stream_tunnel_offered_in_e2e_mode_is_refused_and_closed_at_the_relay() {
        let mut c = connected(true);
        let now = Instant::now();
        let h = c.handle(
            Message::TunnelOk {
                tunnel: tid(1),
                bind: None,
                path_mtu: None,
            },
            now,
            not_direct,
        );
        assert_eq!(h, Handled::DowngradeRefused { tunnel: tid(1) });
        let h = c.handle(
            Message::TunnelNotify {
                tunnel: tid(2),
                source: "mallory@h".into(),
                bind: None,
                path_mtu: None,
            },
            now,
            not_direct,
        );
        assert_eq!(h, Handled::Done);
        assert_eq!(
            sends(&mut c),
            vec![
                Message::TunnelClose { tunnel: tid(1) },
                Message::TunnelClose { tunnel: tid(2) }
            ]
        );
        assert_eq!(c.refused_sessions(), 2);
    }

    #[test]
    fn stream_mode_feeds_stream_tunnels_to_the_matcher() {
        let mut c = connected(false);
        let msg = Message::TunnelNotify {
            tunnel: tid(1),
            source: "a@h".into(),
            bind: None,
            path_mtu: None,
        };
        let h = c.handle(msg.clone(), Instant::now(), not_direct);
        assert_eq!(h, Handled::Matcher(msg));
        assert!(actions(&mut c).is_empty());
    }

    #[test]
    fn inbound_sessions_are_capped_per_source_and_withdrawn_ones_free_their_slot() {
        let mut c = connected(true);
        let now = Instant::now();
        let announce = |c: &mut RelayControl, n: u8, source: &str| {
            c.handle(
                Message::TunnelNotify {
                    tunnel: tid(n),
                    source: source.into(),
                    bind: Some(BIND),
                    path_mtu: None,
                },
                now,
                not_direct,
            )
        };
        for n in 0..MAX_PENDING_PER_SOURCE as u8 {
            assert!(matches!(
                announce(&mut c, n, "mallory@h"),
                Handled::InboundAnnounced { .. }
            ));
        }
        assert_eq!(announce(&mut c, 100, "mallory@h"), Handled::Done);
        assert_eq!(
            sends(&mut c),
            vec![Message::TunnelClose { tunnel: tid(100) }]
        );
        // Another source still gets in.
        assert!(matches!(
            announce(&mut c, 101, "alice@h"),
            Handled::InboundAnnounced { .. }
        ));
        // A withdrawn one frees a slot, and its route goes.
        let vaddr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        c.inbound_routed(&tid(0), vaddr);
        let h = c.handle(Message::TunnelClose { tunnel: tid(0) }, now, not_direct);
        assert_eq!(
            h,
            Handled::InboundWithdrawn {
                tunnel: tid(0),
                vaddr: Some(vaddr)
            }
        );
        assert!(matches!(
            announce(&mut c, 102, "mallory@h"),
            Handled::InboundAnnounced { .. }
        ));
    }

    #[test]
    fn the_total_of_pending_inbound_sessions_is_capped_and_they_expire() {
        let mut c = connected(true);
        let now = Instant::now();
        for n in 0..MAX_PENDING_INBOUND {
            let h = c.handle(
                Message::TunnelNotify {
                    tunnel: TunnelId::from_bytes([
                        (n % 256) as u8,
                        (n / 256) as u8,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                        1,
                    ]),
                    source: format!("n{}@h", n / 10),
                    bind: Some(BIND),
                    path_mtu: None,
                },
                now,
                not_direct,
            );
            assert!(matches!(h, Handled::InboundAnnounced { .. }));
        }
        let over = Message::TunnelNotify {
            tunnel: tid(200),
            source: "new@h".into(),
            bind: Some(BIND),
            path_mtu: None,
        };
        assert_eq!(c.handle(over.clone(), now, not_direct), Handled::Done);
        c.expire(now + PENDING_INBOUND_FOR, not_direct);
        assert!(matches!(
            c.handle(over, now + PENDING_INBOUND_FOR, not_direct),
            Handled::InboundAnnounced { .. }
        ));
    }

    #[test]
    fn a_cookie_answer_readies_only_a_session_still_expected() {
        let mut c = connected(true);
        let now = Instant::now();
        let Handled::InboundAnnounced { tag, .. } = c.handle(
            Message::TunnelNotify {
                tunnel: tid(1),
                source: "a@h".into(),
                bind: Some(BIND),
                path_mtu: Some(1472),
            },
            now,
            not_direct,
        ) else {
            panic!("not announced")
        };
        // The relay's path MTU waits with the session for the cookie.
        assert_eq!(
            c.cookie_answered(tag),
            Some((tid(1), "a@h".to_string(), BIND, Some(1472)))
        );
        assert_eq!(c.cookie_answered(tag), None, "answered once");
        let Handled::InboundAnnounced { tag, .. } = c.handle(
            Message::TunnelNotify {
                tunnel: tid(2),
                source: "a@h".into(),
                bind: Some(BIND),
                path_mtu: None,
            },
            now,
            not_direct,
        ) else {
            panic!("not announced")
        };
        c.expire(now + COOKIE_WAIT, not_direct);
        assert_eq!(c.cookie_answered(tag), None, "too late");
    }

    #[test]
    fn a_peer_leaving_the_relay_closes_its_session_unless_direct_or_just_claimed() {
        let mut c = connected(true);
        let now = Instant::now();
        assert!(c.session_up(tid(1), SessionState::new(BIND, "a@h", true)));
        assert!(c.session_up(tid(2), SessionState::new(BIND, "b@h", true)));
        c.handle(Message::TunnelClose { tunnel: tid(1) }, now, not_direct);
        c.handle(Message::TunnelClose { tunnel: tid(2) }, now, |t| {
            *t == tid(2)
        });
        assert_eq!(
            actions(&mut c),
            vec![
                Action::CloseSession {
                    tunnel: tid(1),
                    reason: "peer left the relay"
                },
                Action::CheckDirect { tunnel: tid(2) }
            ]
        );
        // The direct path then goes silent: the session ends.
        c.path_changed(&tid(2), None);
        let acts = actions(&mut c);
        assert!(acts.contains(&Action::CloseSession {
            tunnel: tid(2),
            reason: "peer left the relay and the direct path"
        }));
        assert!(acts.contains(&Action::Send(Message::SessionPath {
            tunnel: tid(2),
            direct: false
        })));
    }

    #[test]
    fn failover_claims_each_session_and_keeps_it_through_the_old_relays_close() {
        let mut lost = connected(true);
        lost.session_up(tid(1), SessionState::new(BIND, "a@h", true));
        lost.session_up(tid(2), SessionState::new(BIND, "b@h", false));
        let sessions = lost.relay_lost();
        assert_eq!(lost.phase(), Phase::Closed);
        assert!(!lost.session_up(tid(3), SessionState::new(BIND, "c@h", true)));

        // A sibling not connected gives them back.
        let mut connecting = RelayControl::new(true);
        let sessions = connecting.adopt(sessions, Instant::now()).unwrap_err();
        assert_eq!(sessions.len(), 2);

        let mut sibling = connected(true);
        let now = Instant::now();
        let mut claimed = sibling.adopt(sessions, now).unwrap();
        claimed.sort_by_key(|t| *t.as_bytes());
        assert_eq!(claimed, vec![tid(1), tid(2)]);
        let mut keeps: Vec<_> = sends(&mut sibling)
            .into_iter()
            .map(|m| match m {
                Message::SessionKeep { tunnel, bind, peer } => (tunnel, bind, peer),
                other => panic!("sent {other:?}"),
            })
            .collect();
        keeps.sort_by_key(|k| *k.0.as_bytes());
        assert_eq!(
            keeps,
            vec![(tid(1), BIND, "a@h".into()), (tid(2), BIND, "b@h".into())]
        );
        // The relay closes what the peer's old connection held: kept.
        sibling.handle(Message::TunnelClose { tunnel: tid(1) }, now, not_direct);
        assert!(actions(&mut sibling).is_empty());
        // Later the peer really leaves: closed.
        sibling.handle(
            Message::TunnelClose { tunnel: tid(1) },
            now + KEEP_WAIT,
            not_direct,
        );
        assert_eq!(
            actions(&mut sibling),
            vec![Action::CloseSession {
                tunnel: tid(1),
                reason: "peer left the relay"
            }]
        );
    }

    #[test]
    fn a_peer_that_lost_the_relay_has_keep_wait_to_come_back() {
        let mut c = connected(true);
        let now = Instant::now();
        for n in 1..=3 {
            c.session_up(tid(n), SessionState::new(BIND, "a@h", true));
            let h = c.handle(Message::SessionLost { tunnel: tid(n) }, now, not_direct);
            assert_eq!(
                h,
                Handled::PeerLost {
                    tunnel: tid(n),
                    peer: "a@h".into()
                },
                "look for the peer on the other relays"
            );
        }
        assert!(actions(&mut c).is_empty(), "not closed at once");
        // Session 1's peer claims it back here: it stays.
        let back = Message::SessionClaimed {
            tunnel: tid(1),
            source: "a@h".into(),
        };
        assert_eq!(c.handle(back, now, not_direct), Handled::Done);
        // A claim in another node's name does not count.
        let other = Message::SessionClaimed {
            tunnel: tid(2),
            source: "m@h".into(),
        };
        assert_eq!(c.handle(other, now, not_direct), Handled::Done);
        c.expire(now + KEEP_WAIT / 2, not_direct);
        assert!(actions(&mut c).is_empty());
        // The others did not come back: closed, or checked if direct.
        c.expire(now + KEEP_WAIT, |t| *t == tid(3));
        let acts = actions(&mut c);
        assert_eq!(acts.len(), 2, "{acts:?}");
        assert!(acts.contains(&Action::CloseSession {
            tunnel: tid(2),
            reason: "peer lost the relay and did not come back"
        }));
        assert!(acts.contains(&Action::CheckDirect { tunnel: tid(3) }));
        c.expire(now + 2 * KEEP_WAIT, not_direct);
        assert!(actions(&mut c).is_empty(), "once");
    }

    #[test]
    fn a_lost_peer_on_no_other_relay_ends_its_session_and_a_direct_one_is_probed() {
        let mut c = connected(true);
        let now = Instant::now();
        c.session_up(tid(1), SessionState::new(BIND, "a@h", true));
        c.session_up(tid(2), SessionState::new(BIND, "b@h", true));
        c.handle(Message::SessionLost { tunnel: tid(1) }, now, not_direct);
        assert!(c.is_peer_lost(&tid(1)));
        c.peer_gone(&tid(1));
        assert_eq!(
            actions(&mut c),
            vec![Action::CloseSession {
                tunnel: tid(1),
                reason: "peer lost the relay and is on no other"
            }]
        );
        // On a direct path: probed now, and ended when the path is lost.
        let h = c.handle(Message::SessionLost { tunnel: tid(2) }, now, |_| true);
        assert_eq!(h, Handled::Done);
        assert_eq!(
            actions(&mut c),
            vec![Action::CheckDirect { tunnel: tid(2) }]
        );
        c.path_changed(&tid(2), None);
        assert!(actions(&mut c).contains(&Action::CloseSession {
            tunnel: tid(2),
            reason: "peer left the relay and the direct path"
        }));
    }

    #[test]
    fn a_session_claimed_at_another_relay_moves_there() {
        let mut here = connected(true);
        let mut there = connected(true);
        let now = Instant::now();
        here.session_up(tid(1), SessionState::new(BIND, "a@h", true));
        here.handle(Message::SessionLost { tunnel: tid(1) }, now, not_direct);
        // The other relay says a@h claimed it there: that client asks the
        // node to move it.
        let h = there.handle(
            Message::SessionClaimed {
                tunnel: tid(1),
                source: "a@h".into(),
            },
            now,
            not_direct,
        );
        assert_eq!(
            h,
            Handled::ClaimedHere {
                tunnel: tid(1),
                peer: "a@h".into()
            }
        );
        // Only to the peer it has.
        assert_eq!(here.release(&tid(1), "m@h", now), None);
        let s = here.release(&tid(1), "a@h", now).expect("released");
        assert_eq!(
            sends(&mut here),
            vec![Message::TunnelClose { tunnel: tid(1) }]
        );
        assert!(here.session(&tid(1)).is_none());
        assert_eq!(there.adopt(vec![(tid(1), s)], now), Ok(vec![tid(1)]));
        assert_eq!(
            sends(&mut there),
            vec![Message::SessionKeep {
                tunnel: tid(1),
                bind: BIND,
                peer: "a@h".into()
            }]
        );
        // Claimed afresh: the old relay's loss no longer counts.
        there.expire(now + KEEP_WAIT, not_direct);
        assert!(actions(&mut there).is_empty());
    }

    #[test]
    fn after_claims_at_two_relays_the_requester_follows_the_target() {
        let now = Instant::now();
        let claimed = |requester| {
            let mut c = connected(true);
            let s = SessionState::new(BIND, "p@h", requester);
            c.adopt(vec![(tid(1), s)], now).unwrap();
            c
        };
        // The target just claimed it at its relay: it stays there.
        assert_eq!(claimed(false).release(&tid(1), "p@h", now), None);
        // Later (its peer never came), or as the requester, it follows.
        assert!(claimed(false)
            .release(&tid(1), "p@h", now + KEEP_WAIT)
            .is_some());
        assert!(claimed(true).release(&tid(1), "p@h", now).is_some());
    }

    #[test]
    fn path_changes_are_told_to_relays_that_count_them() {
        let mut c = RelayControl::new(true);
        c.identified(2);
        c.session_up(tid(1), SessionState::new(BIND, "a@h", true));
        c.path_changed(&tid(1), Some("10.0.0.1:4000".parse().unwrap()));
        let acts = actions(&mut c);
        assert!(
            acts.iter().all(|a| !matches!(a, Action::Send(_))),
            "v2 relay"
        );
        assert!(
            matches!(&acts[..], [Action::Log { level: Level::Info, text }] if text.contains("went direct"))
        );
        c.identified(DIRECT_VERSION);
        c.path_changed(&tid(1), Some("10.0.0.1:4000".parse().unwrap()));
        assert_eq!(
            sends(&mut c),
            vec![Message::SessionPath {
                tunnel: tid(1),
                direct: true
            }]
        );
    }

    #[test]
    fn a_closed_session_is_forgotten_and_told_to_the_relay_once() {
        let mut c = connected(true);
        c.session_up(tid(1), SessionState::new(BIND, "a@h", true));
        assert!(c.session_closed(&tid(1)));
        assert!(!c.session_closed(&tid(1)));
        assert_eq!(sends(&mut c), vec![Message::TunnelClose { tunnel: tid(1) }]);
    }

    #[test]
    fn the_reflexive_address_comes_only_from_a_cand_without_tunnel() {
        let mut c = connected(true);
        let me: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        c.handle(
            Message::Candidates {
                tunnel: Some(tid(1)),
                addrs: vec!["192.0.2.9:1".parse().unwrap()],
            },
            Instant::now(),
            not_direct,
        );
        assert_eq!(c.reflexive(), None);
        c.handle(
            Message::Candidates {
                tunnel: None,
                addrs: vec![me],
            },
            Instant::now(),
            not_direct,
        );
        assert_eq!(c.reflexive(), Some(me));
    }

    #[test]
    fn peer_caused_lines_are_rate_limited() {
        let mut c = connected(true);
        let now = Instant::now();
        for n in 0..100u8 {
            c.handle(
                Message::TunnelNotify {
                    tunnel: tid(n),
                    source: "m@h".into(),
                    bind: None,
                    path_mtu: None,
                },
                now,
                not_direct,
            );
        }
        let logs = actions(&mut c)
            .into_iter()
            .filter(|a| matches!(a, Action::Log { .. }))
            .count();
        assert_eq!(logs, PEER_LOG_BURST as usize);
    }
}
