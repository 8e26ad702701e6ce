//! The client's tunnel matcher.
//!
//! A tunnel shows up on two paths that race each other: a control message
//! (`tun_ok` for our own request, `tun_notify` for a peer's) and a new QUIC
//! stream that starts with the 32-byte tunnel id. The matcher pairs them in
//! either order. `tun_ok`/`tun_err` carry no request id: the relay answers
//! requests in order, so they are matched first-in first-out.
//!
//! `R` is whatever the caller needs to answer a request (a reply handle),
//! `S` is the caller's stream (with any bytes read past the prefix).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::wire::tunnel_id::{BadTunnelId, TunnelId, TUNNEL_ID_LEN};

/// Reads the tunnel-id prefix of a stream, whatever the read sizes.
#[derive(Debug, Default)]
pub struct PrefixReader {
    buf: [u8; TUNNEL_ID_LEN],
    len: usize,
}

impl PrefixReader {
    /// Feeds one read. Once 32 bytes are in, returns the id and the rest of
    /// this read (the peer's first bytes, which must not be lost).
    pub fn feed<'a>(
        &mut self,
        data: &'a [u8],
    ) -> Result<Option<(TunnelId, &'a [u8])>, BadTunnelId> {
        let take = (TUNNEL_ID_LEN - self.len).min(data.len());
        self.buf[self.len..self.len + take].copy_from_slice(&data[..take]);
        self.len += take;
        if self.len < TUNNEL_ID_LEN {
            return Ok(None);
        }
        Ok(Some((TunnelId::parse(&self.buf)?, &data[take..])))
    }
}

/// Handle of one request in the FIFO, to abandon it later.
pub type RequestId = u64;

/// What the caller must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched<R, S> {
    /// Our request got its tunnel: hand `stream` to whoever asked.
    Outbound {
        request: R,
        tunnel: TunnelId,
        stream: S,
    },
    /// A peer opened a tunnel to us: hand `stream` to the acceptor.
    Inbound {
        source: String,
        tunnel: TunnelId,
        stream: S,
    },
    /// Our request failed: answer it with `reason`.
    Failed { request: R, reason: String },
    /// A tunnel nobody will use: send `tun_close` and drop the stream, if any.
    Discard { tunnel: TunnelId, stream: Option<S> },
}

#[derive(Debug)]
enum Expected<R> {
    Outbound(RequestId, Option<R>),
    Inbound(String),
}

#[derive(Debug)]
pub struct TunnelMatcher<R, S> {
    next_id: RequestId,
    /// Requests awaiting `tun_ok`/`tun_err`, oldest first; `None` once abandoned.
    pending: VecDeque<(RequestId, Option<R>)>,
    /// Tunnels announced on the control stream whose stream has not come yet.
    expected: HashMap<TunnelId, (Expected<R>, Instant)>,
    /// Streams whose announcement has not come yet.
    orphans: HashMap<TunnelId, (S, Instant)>,
    max_orphans: usize,
}

impl<R, S> TunnelMatcher<R, S> {
    pub fn new(max_orphans: usize) -> Self {
        TunnelMatcher {
            next_id: 0,
            pending: VecDeque::new(),
            expected: HashMap::new(),
            orphans: HashMap::new(),
            max_orphans,
        }
    }

    /// Requests sent and not yet answered with a stream (abandoned ones too).
    pub fn pending_count(&self) -> usize {
        self.pending.len()
            + self
                .expected
                .values()
                .filter(|(e, _)| matches!(e, Expected::Outbound(..)))
                .count()
    }

    pub fn orphan_count(&self) -> usize {
        self.orphans.len()
    }

    /// Call when sending a `tun_req`.
    pub fn request(&mut self, request: R) -> RequestId {
        self.next_id += 1;
        self.pending.push_back((self.next_id, Some(request)));
        self.next_id
    }

    /// The requester gave up (a timeout). Its answer, when it comes, is discarded.
    pub fn abandon(&mut self, id: RequestId) -> Option<R> {
        if let Some((_, slot)) = self.pending.iter_mut().find(|(i, _)| *i == id) {
            return slot.take();
        }
        self.expected.values_mut().find_map(|(e, _)| match e {
            Expected::Outbound(i, slot) if *i == id => slot.take(),
            _ => None,
        })
    }

    pub fn on_tunnel_ok(&mut self, tunnel: TunnelId, now: Instant) -> Option<Matched<R, S>> {
        let Some((id, request)) = self.pending.pop_front() else {
            // An answer to nothing we asked: the relay is confused; drop the tunnel.
            return Some(Matched::Discard {
                tunnel,
                stream: self.orphans.remove(&tunnel).map(|(s, _)| s),
            });
        };
        self.announce(tunnel, Expected::Outbound(id, request), now)
    }

    /// The request the next `tun_ok`/`tun_err` answers (`None`: abandoned
    /// or nothing pending).
    pub fn front(&self) -> Option<&R> {
        self.pending.front()?.1.as_ref()
    }

    /// An announced outbound tunnel could not be completed (an e2e session
    /// whose handshake failed): its request fails with `reason`.
    pub fn fail(&mut self, tunnel: &TunnelId, reason: String) -> Option<Matched<R, S>> {
        match self.expected.remove(tunnel) {
            Some((Expected::Outbound(_, Some(request)), _)) => {
                Some(Matched::Failed { request, reason })
            }
            Some((Expected::Inbound(source), at)) => {
                self.expected
                    .insert(*tunnel, (Expected::Inbound(source), at));
                None
            }
            _ => None,
        }
    }

    pub fn on_tunnel_error(&mut self, reason: String) -> Option<Matched<R, S>> {
        let (_, request) = self.pending.pop_front()?;
        Some(Matched::Failed {
            request: request?,
            reason,
        })
    }

    pub fn on_tunnel_notify(
        &mut self,
        tunnel: TunnelId,
        source: String,
        now: Instant,
    ) -> Option<Matched<R, S>> {
        self.announce(tunnel, Expected::Inbound(source), now)
    }

    /// A stream's prefix has been read.
    pub fn on_stream(
        &mut self,
        tunnel: TunnelId,
        stream: S,
        now: Instant,
    ) -> Option<Matched<R, S>> {
        if let Some((expected, _)) = self.expected.remove(&tunnel) {
            return Some(complete(tunnel, expected, stream));
        }
        if self.orphans.len() >= self.max_orphans || self.orphans.contains_key(&tunnel) {
            return Some(Matched::Discard {
                tunnel,
                stream: Some(stream),
            });
        }
        self.orphans.insert(tunnel, (stream, now));
        None
    }

    /// An announced inbound tunnel that will never come (the relay closed
    /// it first): forgotten at once. True if it was expected.
    pub fn forget_inbound(&mut self, tunnel: &TunnelId) -> bool {
        match self.expected.get(tunnel) {
            Some((Expected::Inbound(_), _)) => self.expected.remove(tunnel).is_some(),
            _ => false,
        }
    }

    /// A tunnel ended before it was matched (its stream was reset, say).
    pub fn forget(&mut self, tunnel: &TunnelId) -> Option<S> {
        self.orphans.remove(tunnel).map(|(s, _)| s)
    }

    /// Gives up on halves that waited longer than `max_wait` for their pair.
    pub fn expire(&mut self, now: Instant, max_wait: Duration) -> Vec<Matched<R, S>> {
        let old = |at: &Instant| now.saturating_duration_since(*at) > max_wait;
        let stale_streams: Vec<TunnelId> = self
            .orphans
            .iter()
            .filter(|(_, (_, at))| old(at))
            .map(|(t, _)| *t)
            .collect();
        let stale_announcements: Vec<TunnelId> = self
            .expected
            .iter()
            .filter(|(_, (_, at))| old(at))
            .map(|(t, _)| *t)
            .collect();
        let mut out = vec![];
        for tunnel in stale_streams {
            let stream = self.orphans.remove(&tunnel).map(|(s, _)| s);
            out.push(Matched::Discard { tunnel, stream });
        }
        for tunnel in stale_announcements {
            if let Some((expected, _)) = self.expected.remove(&tunnel) {
                out.extend(give_up(tunnel, expected, "stream_timeout"));
            }
        }
        out
    }

    /// The relay connection is gone: fail every request, drop every stream.
    pub fn drain(&mut self, reason: &str) -> Vec<Matched<R, S>> {
        let mut out: Vec<Matched<R, S>> = self
            .pending
            .drain(..)
            .filter_map(|(_, r)| r)
            .map(|request| Matched::Failed {
                request,
                reason: reason.to_owned(),
            })
            .collect();
        for (tunnel, (expected, _)) in std::mem::take(&mut self.expected) {
            out.extend(give_up(tunnel, expected, reason));
        }
        for (tunnel, (stream, _)) in std::mem::take(&mut self.orphans) {
            out.push(Matched::Discard {
                tunnel,
                stream: Some(stream),
            });
        }
        out
    }

    fn announce(
        &mut self,
        tunnel: TunnelId,
        expected: Expected<R>,
        now: Instant,
    ) -> Option<Matched<R, S>> {
        match self.orphans.remove(&tunnel) {
            Some((stream, _)) => Some(complete(tunnel, expected, stream)),
            None => {
                self.expected.insert(tunnel, (expected, now));
                None
            }
        }
    }
}

fn complete<R, S>(tunnel: TunnelId, expected: Expected<R>, stream: S) -> Matched<R, S> {
    match expected {
        Expected::Outbound(_, Some(request)) => Matched::Outbound {
            request,
            tunnel,
            stream,
        },
        Expected::Outbound(_, None) => Matched::Discard {
            tunnel,
            stream: Some(stream),
        },
        Expected::Inbound(source) => Matched::Inbound {
            source,
            tunnel,
            stream,
        },
    }
}

fn give_up<R, S>(tunnel: TunnelId, expected: Expected<R>, reason: &str) -> Vec<Matched<R, S>> {
    let mut out = vec![Matched::Discard {
        tunnel,
        stream: None,
    }];
    if let Expected::Outbound(_, Some(request)) = expected {
        out.push(Matched::Failed {
            request,
            reason: reason.to_owned(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    type M = TunnelMatcher<&'static str, &'static str>;

    fn id(n: u8) -> TunnelId {
        TunnelId::from_bytes([n; 16])
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn ok_before_stream() {
        let mut m = M::new(8);
        let now = t0();
        m.request("r1");
        assert_eq!(m.on_tunnel_ok(id(1), now), None);
        assert_eq!(m.pending_count(), 1);
        assert_eq!(
            m.on_stream(id(1), "s1", now),
            Some(Matched::Outbound {
                request: "r1",
                tunnel: id(1),
                stream: "s1"
            })
        );
        assert_eq!(m.pending_count(), 0);
    }

    #[test]
    fn stream_before_ok() {
        let mut m = M::new(8);
        let now = t0();
        m.request("r1");
        assert_eq!(m.on_stream(id(1), "s1", now), None);
        assert_eq!(m.orphan_count(), 1);
        assert_eq!(
            m.on_tunnel_ok(id(1), now),
            Some(Matched::Outbound {
                request: "r1",
                tunnel: id(1),
                stream: "s1"
            })
        );
        assert_eq!(m.orphan_count(), 0);
    }

    #[test]
    fn answers_are_matched_first_in_first_out() {
        let mut m = M::new(8);
        let now = t0();
        m.request("r1");
        m.request("r2");
        m.request("r3");
        assert_eq!(
            m.on_tunnel_error("target_not_connected".into()),
            Some(Matched::Failed {
                request: "r1",
                reason: "target_not_connected".into()
            })
        );
        m.on_stream(id(3), "s3", now);
        m.on_tunnel_ok(id(2), now);
        assert!(matches!(
            m.on_tunnel_ok(id(3), now),
            Some(Matched::Outbound { request: "r3", .. })
        ));
        assert!(matches!(
            m.on_stream(id(2), "s2", now),
            Some(Matched::Outbound { request: "r2", .. })
        ));
    }

    #[test]
    fn notify_in_either_order() {
        let mut m = M::new(8);
        let now = t0();
        assert_eq!(m.on_tunnel_notify(id(1), "a@h".into(), now), None);
        assert_eq!(
            m.on_stream(id(1), "s1", now),
            Some(Matched::Inbound {
                source: "a@h".into(),
                tunnel: id(1),
                stream: "s1"
            })
        );
        assert_eq!(m.on_stream(id(2), "s2", now), None);
        assert!(matches!(
            m.on_tunnel_notify(id(2), "b@h".into(), now),
            Some(Matched::Inbound { stream: "s2", .. })
        ));
    }

    #[test]
    fn abandoned_requests_discard_their_tunnel() {
        let mut m = M::new(8);
        let now = t0();
        let r1 = m.request("r1");
        m.request("r2");
        assert_eq!(m.abandon(r1), Some("r1"));
        assert_eq!(
            m.on_tunnel_ok(id(1), now),
            None,
            "waits for the stream to close it"
        );
        assert_eq!(
            m.on_stream(id(1), "s1", now),
            Some(Matched::Discard {
                tunnel: id(1),
                stream: Some("s1")
            })
        );
        // r2 still gets the next answer.
        assert!(matches!(
            m.on_tunnel_error("x".into()),
            Some(Matched::Failed { request: "r2", .. })
        ));
        // Abandoning after tun_ok, before the stream.
        let r3 = m.request("r3");
        m.on_tunnel_ok(id(3), now);
        assert_eq!(m.abandon(r3), Some("r3"));
        assert!(matches!(
            m.on_stream(id(3), "s3", now),
            Some(Matched::Discard { .. })
        ));
    }

    #[test]
    fn orphans_are_bounded_and_expire() {
        let mut m = M::new(1);
        let now = t0();
        assert_eq!(m.on_stream(id(1), "s1", now), None);
        assert_eq!(
            m.on_stream(id(2), "s2", now),
            Some(Matched::Discard {
                tunnel: id(2),
                stream: Some("s2")
            })
        );
        m.request("r9");
        m.on_tunnel_ok(id(9), now);
        assert!(m.expire(now, Duration::from_secs(5)).is_empty());
        let later = now + Duration::from_secs(6);
        let mut out = m.expire(later, Duration::from_secs(5));
        out.sort_by_key(|x| format!("{x:?}"));
        assert_eq!(
            out,
            vec![
                Matched::Discard {
                    tunnel: id(1),
                    stream: Some("s1")
                },
                Matched::Discard {
                    tunnel: id(9),
                    stream: None
                },
                Matched::Failed {
                    request: "r9",
                    reason: "stream_timeout".into()
                },
            ]
        );
        assert_eq!(m.orphan_count(), 0);
        assert_eq!(m.pending_count(), 0);
    }

    #[test]
    fn drain_fails_everything() {
        let mut m = M::new(8);
        let now = t0();
        m.request("r1");
        m.request("r2");
        m.on_tunnel_ok(id(1), now);
        m.on_stream(id(5), "s5", now);
        let out = m.drain("relay_closed");
        assert_eq!(out.len(), 4);
        assert!(out.contains(&Matched::Failed {
            request: "r1",
            reason: "relay_closed".into()
        }));
        assert!(out.contains(&Matched::Failed {
            request: "r2",
            reason: "relay_closed".into()
        }));
        assert_eq!(m.pending_count(), 0);
    }

    #[test]
    fn unexpected_answers_are_harmless() {
        let mut m = M::new(8);
        let now = t0();
        assert_eq!(m.on_tunnel_error("x".into()), None);
        assert_eq!(
            m.on_tunnel_ok(id(1), now),
            Some(Matched::Discard {
                tunnel: id(1),
                stream: None
            })
        );
    }

    #[test]
    fn prefix_split_across_reads_keeps_the_rest() {
        let hex = id(0xab).to_hex();
        let mut wire = hex.to_vec();
        wire.extend_from_slice(b"hello");
        for cut in 0..wire.len() {
            let mut p = PrefixReader::default();
            let (first, second) = wire.split_at(cut);
            let got = match p.feed(first).unwrap() {
                Some((t, rest)) => (t, [rest, second].concat()),
                None => {
                    let (t, rest) = p.feed(second).unwrap().unwrap();
                    (t, rest.to_vec())
                }
            };
            assert_eq!(got, (id(0xab), b"hello".to_vec()), "cut at {cut}");
        }
    }

    #[test]
    fn bad_prefix_is_an_error() {
        let mut p = PrefixReader::default();
        assert!(p.feed(&[b'Z'; 40]).is_err());
    }

    #[test]
    fn a_failed_outbound_answers_its_request() {
        let mut m: TunnelMatcher<u32, &str> = TunnelMatcher::new(8);
        let now = Instant::now();
        m.request(7);
        assert_eq!(m.front(), Some(&7));
        let t = TunnelId::from_bytes([3; 16]);
        assert_eq!(m.on_tunnel_ok(t, now), None);
        assert_eq!(m.front(), None);
        assert_eq!(
            m.fail(&t, "handshake".into()),
            Some(Matched::Failed {
                request: 7,
                reason: "handshake".into()
            })
        );
        assert_eq!(m.pending_count(), 0);
        // An inbound announcement is not a request: nothing to fail.
        let u = TunnelId::from_bytes([4; 16]);
        assert_eq!(m.on_tunnel_notify(u, "a@h".into(), now), None);
        assert_eq!(m.fail(&u, "x".into()), None);
        assert_eq!(
            m.on_stream(u, "s", now),
            Some(Matched::Inbound {
                source: "a@h".into(),
                tunnel: u,
                stream: "s"
            })
        );
    }
}
