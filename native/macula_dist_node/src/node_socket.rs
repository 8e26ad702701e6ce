//! A node's one UDP socket, under one quinn endpoint: the node's relay
//! connections talk to the relays' real addresses, and each e2e session's
//! QUIC connection talks to a virtual address ([`Paths`]) that this socket
//! turns into "this relay, this session": outgoing datagrams get the
//! session header and go to the relay, incoming session datagrams lose it
//! and appear to come from the virtual address. Control and data share the
//! socket, so one NAT mapping carries both.
//!
//! A session may also go direct ([`DirectPath`]): the socket sends and
//! answers its probes, and once a probe is answered sends its datagrams
//! straight to the peer's address, under the same virtual address.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use macula_relay_proto::node::direct::{self, DirectPath, Event, Probe};
use macula_relay_proto::node::direct_paths::DirectPaths;
use macula_relay_proto::node::paths::{is_virtual, Paths, Route};
use macula_relay_proto::wire::dataplane::{self, Datagram, SessionId, HEADER_LEN, NO_BIND};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::Notify;

use macula_dist_quic::udp::{compact_slots, segments, UdpIo, Writable};

/// Received datagrams that could not stay in quinn's buffer: the rest of a
/// GRO batch whose datagrams belong to different sessions, and datagrams
/// held until their session was added.
type Pending = VecDeque<(RecvMeta, Vec<u8>)>;

/// What one receive saw besides the sessions' QUIC datagrams: probes, the
/// sessions that heard from their direct path, and those that got busy.
#[derive(Default)]
struct Received {
    probes: Vec<(SocketAddr, Vec<u8>)>,
    heard: Vec<(SessionId, SocketAddr)>,
    busy: Vec<SessionId>,
}

#[derive(Debug)]
pub struct NodeSocket {
    udp: Arc<UdpIo>,
    paths: Mutex<Paths>,
    pending: Mutex<Pending>,
    /// quinn's receive waker, to wake it when held datagrams are released.
    waker: Mutex<Option<Waker>>,
    /// Sessions looking for, or on, a direct path.
    directs: Mutex<DirectPaths<Direct>>,
    /// Wakes the task that runs the direct paths' timers.
    direct_timer: Arc<Notify>,
    direct_task: std::sync::Once,
}

/// Told when a session's path changes.
pub type OnPath = Arc<dyn Fn(Event) + Send + Sync>;

/// A session with a direct path: its virtual address, and who to tell.
#[derive(Clone)]
struct Direct {
    vaddr: SocketAddr,
    on_path: OnPath,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeSocket {
    pub fn new(udp: UdpIo) -> io::Result<Self> {
        let ipv6 = udp.local_addr()?.is_ipv6();
        Ok(NodeSocket {
            udp: Arc::new(udp),
            paths: Mutex::new(Paths::new(ipv6)),
            pending: Mutex::new(VecDeque::new()),
            waker: Mutex::new(None),
            directs: Mutex::new(DirectPaths::default()),
            direct_timer: Arc::new(Notify::new()),
            direct_task: std::sync::Once::new(),
        })
    }

    /// Starts looking for a direct path for the session at `vaddr`, with a
    /// secret both nodes hold (see [`DirectPath`]). Call from a tokio
    /// runtime: the first session starts the task that runs the timers.
    pub fn start_direct(
        self: &Arc<Self>,
        vaddr: SocketAddr,
        secret: &[u8],
        requester: bool,
        on_path: OnPath,
    ) -> bool {
        let Some(route) = self.route(&vaddr) else {
            return false;
        };
        let now = Instant::now();
        let mut path = DirectPath::new(route.session, secret, requester, now);
        if lock(&self.paths).is_busy(&vaddr) {
            path.busy(now);
        }
        let sooner =
            lock(&self.directs).insert(route.session, path, Direct { vaddr, on_path }, now);
        self.direct_task.call_once(|| {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(run_direct(Arc::downgrade(self), self.direct_timer.clone()));
            }
        });
        if sooner {
            self.direct_timer.notify_one();
        }
        true
    }

    /// The peer's candidate addresses for the session at `vaddr`.
    pub fn add_candidates(&self, vaddr: &SocketAddr, addrs: &[SocketAddr]) {
        let Some(route) = self.route(vaddr) else {
            return;
        };
        let now = Instant::now();
        let updated =
            lock(&self.directs).update(&route.session, now, |p, _| p.add_candidates(addrs, now));
        if let Some(((), true)) = updated {
            self.direct_timer.notify_one();
        }
    }

    /// The session's direct address, when it has one.
    pub fn direct_of(&self, vaddr: &SocketAddr) -> Option<SocketAddr> {
        lock(&self.paths).destination(vaddr).and_then(|(_, d)| d)
    }

    /// Runs the direct paths' due timers; returns when to run them next
    /// (none: no session looks for a path).
    fn poll_directs(&self) -> Option<Instant> {
        let mut out: Vec<Probe> = vec![];
        let mut changes = vec![];
        let next = lock(&self.directs).poll(Instant::now(), &mut out, &mut changes);
        for (to, probe) in out {
            self.send_probe(to, &probe);
        }
        for (direct, e) in changes {
            self.change_path(direct, e);
        }
        next
    }

    /// Probes the direct path of the session at `vaddr` at once and often
    /// (as when it sends): its peer is said to be gone (the relay lost it),
    /// and the path will tell within about a second.
    pub fn check_direct(&self, vaddr: &SocketAddr) {
        if let Some(route) = self.route(vaddr) {
            self.note_sent(route.session);
        }
    }

    /// A direct session sends: an idle one wakes the timers, which probe
    /// its path at once.
    fn note_sent(&self, session: SessionId) {
        let now = Instant::now();
        let updated = lock(&self.directs).update(&session, now, |p, _| p.sent(now));
        if let Some((true, true)) = updated {
            self.direct_timer.notify_one();
        }
    }

    /// A session carried [`direct::BUSY_BYTES`] through its relay: it
    /// starts looking for a direct path.
    fn got_busy(&self, session: SessionId) {
        let now = Instant::now();
        let updated = lock(&self.directs).update(&session, now, |p, _| p.busy(now));
        if let Some(((), true)) = updated {
            self.direct_timer.notify_one();
        }
    }

    fn send_probe(&self, to: SocketAddr, probe: &[u8]) {
        // A probe that cannot go now is one of many.
        let _ = self.udp.try_send(&Transmit {
            destination: to,
            ecn: None,
            contents: probe,
            segment_size: None,
            src_ip: None,
        });
    }

    fn change_path(&self, direct: Direct, event: Event) {
        let addr = match event {
            Event::Direct(addr) => Some(addr),
            Event::Relay => None,
        };
        if self.route(&direct.vaddr).is_none() {
            return;
        }
        lock(&self.paths).set_direct(&direct.vaddr, addr);
        (direct.on_path)(event);
    }

    /// Probes received, and sessions that heard from their direct path
    /// (after the receive lock is let go).
    fn on_received(&self, received: Received) {
        if received.probes.is_empty() && received.heard.is_empty() && received.busy.is_empty() {
            return;
        }
        for session in received.busy {
            self.got_busy(session);
        }
        let now = Instant::now();
        if !received.heard.is_empty() {
            let mut directs = lock(&self.directs);
            for (session, from) in &received.heard {
                directs.heard(session, *from, now);
            }
        }
        for (from, d) in received.probes {
            let Some(session) = direct::probe_session(&d) else {
                continue;
            };
            let updated = lock(&self.directs).update(&session, now, |path, direct| {
                let (a, e) = path.on_datagram(from, &d, now);
                // A fresh probe from an address not validated yet: probe it
                // back now, so it is validated within a round trip.
                let back = a.as_ref().and_then(|_| path.probe_to(from));
                (a, back, e, path.validated(&from), direct.clone())
            });
            let Some(((answer, back, event, validated, direct), sooner)) = updated else {
                continue;
            };
            if validated {
                // The peer answered our probe from `from`: it may send the
                // session's datagrams from there before this side goes direct.
                lock(&self.paths).accept_from(&direct.vaddr, from);
            }
            for (to, probe) in answer.into_iter().chain(back) {
                self.send_probe(to, &probe);
            }
            if sooner {
                self.direct_timer.notify_one();
            }
            if let Some(e) = event {
                self.change_path(direct, e);
            }
        }
    }

    /// Adds a session; quinn reaches it at the returned virtual address.
    pub fn add_session(&self, route: Route) -> SocketAddr {
        self.add_session_then(route, |_| {})
    }

    /// Adds a session and calls `ready` with its virtual address before any
    /// datagram that arrived early for it is handed to quinn (so whoever
    /// accepts its connection knows of it first).
    pub fn add_session_then(&self, route: Route, ready: impl FnOnce(SocketAddr)) -> SocketAddr {
        // `ready` runs before the session's datagrams can be read: one read
        // between the two would reach quinn before its session is expected
        // (and be refused).
        let (vaddr, held) = {
            let mut paths = lock(&self.paths);
            let (vaddr, held) = paths.add(route);
            ready(vaddr);
            (vaddr, held)
        };
        if !held.is_empty() {
            let mut pending = lock(&self.pending);
            for d in held {
                let meta = RecvMeta {
                    addr: vaddr,
                    len: d.len(),
                    stride: d.len(),
                    ecn: None,
                    dst_ip: None,
                };
                pending.push_back((meta, d));
            }
            drop(pending);
            if let Some(w) = lock(&self.waker).take() {
                w.wake();
            }
        }
        vaddr
    }

    pub fn remove_session(&self, vaddr: &SocketAddr) -> Option<Route> {
        let route = lock(&self.paths).remove(vaddr)?;
        lock(&self.directs).remove(&route.session);
        Some(route)
    }

    /// Sends a session through another relay from now on (see
    /// [`Paths::reroute`]); false if the session is gone.
    pub fn reroute(&self, vaddr: &SocketAddr, relay: SocketAddr) -> bool {
        lock(&self.paths).reroute(vaddr, relay)
    }

    pub fn route(&self, vaddr: &SocketAddr) -> Option<Route> {
        lock(&self.paths).route(vaddr).copied()
    }

    fn send_session(
        &self,
        route: Route,
        direct: Option<SocketAddr>,
        transmit: &Transmit,
    ) -> io::Result<()> {
        // Straight to the peer, the bind key (the relay's secret) stays out.
        let (destination, bind) = match direct {
            Some(addr) => (addr, NO_BIND),
            None => (route.relay, route.bind),
        };
        let header = dataplane::header(route.session, &bind);
        let stride = transmit.segment_size.unwrap_or(transmit.contents.len());
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            buf.clear();
            for datagram in transmit.contents.chunks(stride.max(1)) {
                buf.extend_from_slice(&header);
                buf.extend_from_slice(datagram);
            }
            self.udp.try_send(&Transmit {
                destination,
                ecn: transmit.ecn,
                contents: &buf,
                segment_size: transmit.segment_size.map(|s| s + HEADER_LEN),
                src_ip: None,
            })
        })
    }

    /// Fills slots from the pending queue; returns how many.
    fn take_pending(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut pending = lock(&self.pending);
        let mut n = 0;
        while n < bufs.len() {
            let Some((m, data)) = pending.pop_front() else {
                break;
            };
            if data.len() > bufs[n].len() {
                continue; // cannot happen with quinn's buffers; never panic
            }
            bufs[n][..data.len()].copy_from_slice(&data);
            meta[n] = m;
            n += 1;
        }
        n
    }

    /// Rewrites one received slot in place: session datagrams lose their
    /// header and take their session's virtual address. A slot keeps its
    /// first run of datagrams of one origin; later runs of another origin
    /// go to the pending queue. Returns the bytes left in the slot.
    fn demux(&self, buf: &mut [u8], meta: &mut RecvMeta, received: &mut Received) -> usize {
        let stride = if meta.stride == 0 {
            meta.len
        } else {
            meta.stride
        };
        let mut paths = lock(&self.paths);
        // The slot's run: origin, write offset, stride of its datagrams.
        let mut kept: Option<(SocketAddr, usize, usize)> = None;
        let mut spill: Vec<(RecvMeta, Vec<u8>)> = vec![];
        let now = Instant::now();
        for (off, len) in segments(meta.len, stride) {
            if direct::probe_session(&buf[off..off + len]).is_some() {
                received
                    .probes
                    .push((meta.addr, buf[off..off + len].to_vec()));
                continue;
            }
            let (origin, inner) = match dataplane::classify(&buf[off..off + len]) {
                Datagram::Quic => (meta.addr, off..off + len),
                Datagram::Invalid => continue,
                Datagram::Session { session, .. } => {
                    let inner = off + HEADER_LEN..off + len;
                    match paths.inbound(meta.addr, session) {
                        Some(vaddr) => {
                            let heard = (session, meta.addr);
                            if paths.is_direct(&vaddr, &meta.addr) {
                                if received.heard.last() != Some(&heard) {
                                    received.heard.push(heard);
                                }
                            } else if paths.carried(&vaddr, inner.len(), direct::BUSY_BYTES) {
                                received.busy.push(session);
                            }
                            (vaddr, inner)
                        }
                        None => {
                            paths.hold(meta.addr, session, &buf[inner], now);
                            continue;
                        }
                    }
                }
            };
            match kept {
                None => {
                    buf.copy_within(inner.clone(), 0);
                    kept = Some((origin, inner.len(), inner.len()));
                }
                Some((o, at, s)) if o == origin && spill.is_empty() && inner.len() <= s => {
                    buf.copy_within(inner.clone(), at);
                    kept = Some((o, at + inner.len(), s));
                }
                Some(_) => {
                    let d = buf[inner].to_vec();
                    let m = RecvMeta {
                        addr: origin,
                        len: d.len(),
                        stride: d.len(),
                        ..*meta
                    };
                    spill.push((m, d));
                }
            }
        }
        drop(paths);
        if !spill.is_empty() {
            lock(&self.pending).extend(spill);
        }
        match kept {
            Some((origin, len, stride)) => {
                meta.addr = origin;
                meta.stride = stride;
                len
            }
            None => 0,
        }
    }
}

impl AsyncUdpSocket for NodeSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable(self.udp.clone()))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if !is_virtual(&transmit.destination) {
            return self.udp.try_send(transmit);
        }
        let (destination, busy) = {
            let mut paths = lock(&self.paths);
            let destination = paths.destination(&transmit.destination);
            let relayed = matches!(destination, Some((_, None)));
            let len = transmit.contents.len();
            let busy = relayed && paths.carried(&transmit.destination, len, direct::BUSY_BYTES);
            (destination, busy)
        };
        match destination {
            Some((route, direct)) => {
                if direct.is_some() {
                    self.note_sent(route.session);
                }
                if busy {
                    self.got_busy(route.session);
                }
                self.send_session(route, direct, transmit)
            }
            // A closed session: drop, as a network would.
            None => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = self.take_pending(bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            {
                let mut waker = lock(&self.waker);
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
            }
            let n = match self.udp.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let mut received = Received::default();
            for i in 0..n {
                let len = meta[i].len;
                meta[i].len = self.demux(&mut bufs[i][..len], &mut meta[i], &mut received);
            }
            self.on_received(received);
            let kept = compact_slots(bufs, meta, n);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
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

/// The least time between two runs of the direct paths' timers.
const DIRECT_TICK: Duration = Duration::from_millis(25);

/// Runs the direct paths' timers while the socket lives.
async fn run_direct(socket: Weak<NodeSocket>, wake: Arc<Notify>) {
    loop {
        let next = match socket.upgrade() {
            Some(s) => s.poll_directs(),
            None => return,
        };
        // At most one run a tick: a node's paths fall due at scattered
        // instants, and waking for each cost more than the probes.
        let wait = next
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .max(DIRECT_TICK);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
        }
    }
}

/// A node's endpoint: one socket for its relay connections and its e2e
/// sessions (see [`NodeSocket`]). It accepts e2e sessions only, each with
/// its own server config (`Incoming::accept_with`).
pub fn node_endpoint(
    transport: &macula_dist_quic::Transport,
    addr: SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, Arc<NodeSocket>)> {
    let socket = Arc::new(NodeSocket::new(UdpIo::bind(addr)?)?);
    let endpoint = transport.abstract_endpoint(Some(refusing_server_config()?), socket.clone())?;
    Ok((endpoint, socket))
}

/// A node's endpoint needs a server config to see incoming connections at
/// all; each is then accepted with its session's config or refused. This
/// one is never used to accept: its key is throwaway.
fn refusing_server_config() -> anyhow::Result<quinn::ServerConfig> {
    let throwaway = crate::identity::NodeIdentity::generate()?;
    crate::identity::server_config(
        &throwaway,
        crate::identity::PeerCheck::AnyKey,
        &macula_dist_quic::Transport::default(),
    )
}
