//! The relay's one UDP socket: QUIC packets go to quinn (the control plane),
//! e2e session datagrams are forwarded on the spot (the data plane), told
//! apart by their first byte ([`macula_relay_proto::wire::dataplane`]).
//!
//! Forwarding happens while quinn polls for input: each received batch is
//! routed through the session table, datagrams of one GRO batch that go to
//! the same place leave in one GSO send, and the buffer is reused in place
//! (only the bind key is zeroed). Nothing is queued: a send the kernel
//! cannot take now is dropped and counted, and the nodes' congestion
//! control reacts, as with any router.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use macula_relay_proto::relay::sessions::{DropReason, SessionTable, Verdict};
use macula_relay_proto::wire::dataplane::{self, Datagram, SessionId};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use macula_dist_quic::udp::{compact_slots, segments, UdpIo, Writable};

/// Batches of session datagrams forwarded in one poll before quinn gets
/// its turn again (its timers and control connections must not starve).
const FORWARD_BATCHES_PER_POLL: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Keep,
    Forward(SocketAddr),
    Drop(DropReason),
}

/// Data-plane counters.
#[derive(Debug, Default)]
pub struct DataStats {
    pub forwarded_datagrams: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    pub dropped_unknown_session: AtomicU64,
    pub dropped_bad_bind: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub dropped_overload: AtomicU64,
    /// A side's key from an address that is not that side's (a replayed
    /// header, or a node whose relay connection moved: rebound by the
    /// control plane, never by a datagram).
    pub dropped_unbound: AtomicU64,
    /// Session sides moved to their node's new relay connection address.
    pub rebinds: AtomicU64,
}

impl DataStats {
    fn dropped(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::UnknownSession => &self.dropped_unknown_session,
            DropReason::BadBind => &self.dropped_bad_bind,
            DropReason::Malformed => &self.dropped_malformed,
            DropReason::Overload => &self.dropped_overload,
            DropReason::Unbound => &self.dropped_unbound,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A test hook: corrupt forwarded datagrams, or forge new ones, to prove
/// that the nodes never accept what the relay changed or made up.
#[derive(Debug, Default)]
pub struct Tamper {
    /// Flip one byte of the inner datagram of the next N forwarded.
    pub flip_next: u32,
    /// Datagrams flipped so far.
    pub flipped: u64,
}

#[derive(Debug)]
pub struct RelaySocket {
    udp: Arc<UdpIo>,
    sessions: Arc<Mutex<SessionTable>>,
    pub stats: DataStats,
    tamper: Mutex<Tamper>,
    /// Woken when a side's key comes from an address not bound to it: the
    /// control plane checks whether that node's relay connection moved.
    pub(crate) moved: Arc<tokio::sync::Notify>,
}

impl RelaySocket {
    pub fn new(udp: UdpIo, sessions: Arc<Mutex<SessionTable>>) -> Self {
        RelaySocket {
            udp: Arc::new(udp),
            sessions,
            stats: DataStats::default(),
            tamper: Mutex::new(Tamper::default()),
            moved: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn tamper(&self) -> MutexGuard<'_, Tamper> {
        self.tamper.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a datagram of the relay's own making to `to` (the forging half
    /// of the test hook): `inner` behind a session header.
    pub fn forge(&self, to: SocketAddr, session: SessionId, inner: &[u8]) -> io::Result<()> {
        let mut d = dataplane::header(session, &dataplane::NO_BIND).to_vec();
        d.extend_from_slice(inner);
        self.udp.try_send(&Transmit {
            destination: to,
            ecn: None,
            contents: &d,
            segment_size: None,
            src_ip: None,
        })
    }

    fn send(&self, to: SocketAddr, meta: &RecvMeta, contents: &[u8], stride: usize) {
        let max = self.udp.max_transmit_segments().max(1);
        // A GRO batch may hold more datagrams than one GSO send takes.
        for chunk in contents.chunks(stride * max) {
            let datagrams = chunk.len().div_ceil(stride);
            let sent = self.udp.try_send(&Transmit {
                destination: to,
                ecn: meta.ecn,
                contents: chunk,
                segment_size: (datagrams > 1).then_some(stride),
                src_ip: None,
            });
            match sent {
                Ok(()) => {
                    self.stats
                        .forwarded_datagrams
                        .fetch_add(datagrams as u64, Ordering::Relaxed);
                    self.stats
                        .forwarded_bytes
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    self.stats
                        .dropped_overload
                        .fetch_add(datagrams as u64, Ordering::Relaxed);
                }
            }
        }
    }

    /// Forwards the session datagrams of one received slot and moves its
    /// QUIC packets to the front. Returns the bytes of QUIC left for quinn.
    fn demux(&self, buf: &mut [u8], meta: &RecvMeta) -> usize {
        let stride = if meta.stride == 0 {
            meta.len
        } else {
            meta.stride
        };
        let mut kept = 0;
        // Consecutive datagrams going to one place: (start offset, destination).
        let mut run: Option<(usize, SocketAddr)> = None;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for (off, len) in segments(meta.len, stride) {
            let datagram = &mut buf[off..off + len];
            let action = match dataplane::classify(datagram) {
                Datagram::Quic => Action::Keep,
                Datagram::Invalid => Action::Drop(DropReason::Malformed),
                Datagram::Session { session, bind } => {
                    match sessions.route(session, &bind, meta.addr, len) {
                        Verdict::Forward { to } => {
                            dataplane::clear_bind(datagram);
                            self.tamper_with(datagram);
                            Action::Forward(to)
                        }
                        Verdict::Drop(DropReason::Unbound) => {
                            self.moved.notify_one();
                            Action::Drop(DropReason::Unbound)
                        }
                        Verdict::Drop(reason) => Action::Drop(reason),
                    }
                }
            };
            if let Some((start, dest)) = run {
                if action == Action::Forward(dest) {
                    continue;
                }
                self.send(dest, meta, &buf[start..off], stride);
                run = None;
            }
            match action {
                Action::Forward(to) => run = Some((off, to)),
                Action::Drop(reason) => self.stats.dropped(reason),
                Action::Keep => {
                    // A QUIC packet for quinn: to the front, where nothing
                    // unsent lies any more.
                    buf.copy_within(off..off + len, kept);
                    kept += len;
                }
            }
        }
        drop(sessions);
        if let Some((start, dest)) = run {
            self.send(dest, meta, &buf[start..meta.len], stride);
        }
        kept
    }

    fn tamper_with(&self, datagram: &mut [u8]) {
        let mut t = self.tamper();
        if t.flip_next > 0 {
            t.flip_next -= 1;
            t.flipped += 1;
            let last = datagram.len() - 1;
            datagram[last] ^= 0x01;
        }
    }
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self.udp.clone()))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.udp.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        for _ in 0..FORWARD_BATCHES_PER_POLL {
            let n = match self.udp.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            for i in 0..n {
                let len = meta[i].len;
                meta[i].len = self.demux(&mut bufs[i][..len], &meta[i]);
                // What is left is whole QUIC packets of one stride.
            }
            let kept = compact_slots(bufs, meta, n);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
        // Only forwarding so far: let quinn's driver run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.max_receive_segments()
    }
}

/// A relay's endpoint: QUIC for the control plane, session datagrams
/// forwarded by the socket itself (see [`RelaySocket`]).
pub fn relay_endpoint(
    transport: &macula_dist_quic::Transport,
    config: quinn::ServerConfig,
    addr: SocketAddr,
    sessions: Arc<Mutex<SessionTable>>,
) -> anyhow::Result<(quinn::Endpoint, Arc<RelaySocket>)> {
    let socket = Arc::new(RelaySocket::new(UdpIo::bind(addr)?, sessions));
    let endpoint = transport.abstract_endpoint(Some(config), socket.clone())?;
    Ok((endpoint, socket))
}
