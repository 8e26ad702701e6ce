//! The relay's async glue: accept connections, run each control stream
//! through the routing table, open and hand tunnels to the forwarder.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use macula_relay_proto::ratelimit::LogLimiter;
use macula_relay_proto::relay::admission::{Admission, Decision};
use macula_relay_proto::relay::router::{Claim, ConnId, IdentifyRefusal, KeyId, Router, Tunnel};
use macula_relay_proto::relay::sessions::{self, Claims, Kept, SessionTable};
use macula_relay_proto::{
    FrameDecoder, Message, Mode, TunnelId, MOVE_VERSION, PROTOCOL_VERSION, REFLEXIVE_VERSION,
};
use quinn::{RecvStream, SendStream, VarInt};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::forward;
use crate::metrics::{self, Events, Stats};
use macula_dist_quic::{write_control, CONTROL_QUEUE};
use macula_relay_proto::wire::close_code;

/// A new id for the routing table. Not quinn's `stable_id`: quinn reuses
/// that once a connection is gone, and a late cleanup of the old one would
/// then remove the new one's name and tunnels.
fn next_conn_id() -> ConnId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// How long a name's holder gets to show it is alive when another
/// connection claims the name.
const HOLDER_PROBE: Duration = Duration::from_secs(1);

/// The key a node showed (its client certificate), if any.
fn node_key(conn: &quinn::Connection) -> Option<KeyId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    macula_dist_quic::node_key::key_id(certs.first()?)
}

/// Does the peer answer within `wait`? Something it must acknowledge is
/// sent (a stream opened and reset at once: QUIC frames every version of
/// the client ignores), and its next packet is awaited.
async fn answers(conn: &quinn::Connection, wait: Duration) -> bool {
    if conn.close_reason().is_some() {
        return false;
    }
    let before = conn.stats().udp_rx.datagrams;
    let probe = async {
        if let Ok((mut send, _)) = conn.open_bi().await {
            let _ = send.reset(VarInt::from_u32(0));
        }
        loop {
            if conn.stats().udp_rx.datagrams > before {
                return true;
            }
            if conn.close_reason().is_some() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(wait, probe).await.unwrap_or(false)
}

/// Control messages one connection's task handles before it yields.
const MESSAGES_PER_YIELD: u32 = 8;

/// How long opening a tunnel's two streams may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused node gets to read its refusal before the close.
const LINGER: Duration = Duration::from_secs(2);

pub(crate) struct Shared {
    state: Mutex<State>,
    token: Option<String>,
    max_frame: usize,
    identify_timeout: Duration,
    /// The data plane's table; the relay socket reads it for every datagram.
    sessions: Arc<Mutex<SessionTable>>,
    /// Connections that have not identified yet, capped.
    admission: Mutex<Admission>,
    /// Log lines about a peer's bad input, rate-limited.
    bad_input_log: Mutex<LogLimiter>,
    /// Every other line a peer can cause (identify, sessions, paths),
    /// rate-limited alike.
    peer_log: Mutex<LogLimiter>,
    /// Where name→key bindings are kept across restarts.
    names_file: Option<std::path::PathBuf>,
    /// Connection receive window once a node has identified.
    identified_window: u64,
    pub(crate) events: Arc<Events>,
}

/// Lines about bad input, at most this many per window.
const BAD_INPUT_LOG_BURST: u32 = 20;
const BAD_INPUT_LOG_WINDOW: Duration = Duration::from_secs(10);
/// Other lines a peer can cause, at most this many per window.
const PEER_LOG_BURST: u32 = 50;
const PEER_LOG_WINDOW: Duration = Duration::from_secs(10);

/// A connection's slot among the unidentified ones; freed on identify or
/// when the connection ends, whichever comes first.
struct Unidentified {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for Unidentified {
    fn drop(&mut self) {
        lock(&self.shared.admission).release(self.ip);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Logs a warning about bad input unless too many were logged lately.
macro_rules! warn_bad_input {
    ($shared:expr, $($arg:tt)+) => {
        if let Some(held) = lock(&$shared.bad_input_log).allow(std::time::Instant::now()) {
            if held > 0 {
                warn!(held, "log lines about bad input were held back (rate limit)");
            }
            warn!($($arg)+);
        }
    };
}

/// Logs an info line a peer's message caused, unless too many were lately.
macro_rules! info_peer {
    ($shared:expr, $($arg:tt)+) => {
        if let Some(held) = $shared.peer_log_allows() {
            if held > 0 {
                tracing::info!(held, "log lines about node messages were held back (rate limit)");
            }
            tracing::info!($($arg)+);
        }
    };
}

/// An identified node: its connection, its control queue, and the protocol
/// version it said it speaks (2 or more: it can take e2e sessions).
struct Node {
    conn: quinn::Connection,
    control: mpsc::Sender<Message>,
    version: u64,
    /// Its relay connection's remote address when last looked at: its
    /// sessions' sides are bound there, and a node of version 4 or more
    /// was told it (`cand` without `tid`).
    seen: SocketAddr,
}

struct State {
    router: Router,
    nodes: HashMap<ConnId, Node>,
    tunnels: HashMap<TunnelId, CancellationToken>,
    /// Sessions waiting for their sides' claims (kept out of the data
    /// plane's lock: nothing here delays a datagram).
    claims: Claims,
    /// Name→key bindings changed since they were last written.
    bindings_dirty: bool,
}

impl Shared {
    /// The relay's shared state, from its configuration (`identity` and
    /// `listen` are the endpoint's business).
    pub(crate) fn new(
        config: &crate::Config,
        sessions: Arc<Mutex<SessionTable>>,
        events: Arc<Events>,
    ) -> Self {
        Shared {
            state: Mutex::new(State {
                router: {
                    let mut router = Router::new(config.limits.clone());
                    if let Some(nodes) = &config.nodes {
                        router.allow_only(nodes.clone());
                    }
                    if let Some(path) = &config.names_file {
                        let bindings = crate::bindings::load(path);
                        if !bindings.is_empty() {
                            info!(
                                names = bindings.len(),
                                "name bindings of recently seen nodes restored"
                            );
                        }
                        router.load_bindings(bindings, std::time::Instant::now());
                    }
                    router
                },
                nodes: HashMap::new(),
                tunnels: HashMap::new(),
                claims: Claims::default(),
                bindings_dirty: false,
            }),
            token: config.token.clone(),
            max_frame: config.max_frame,
            identify_timeout: config.identify_timeout,
            sessions,
            admission: Mutex::new(Admission::new(config.admission)),
            bad_input_log: Mutex::new(LogLimiter::new(BAD_INPUT_LOG_BURST, BAD_INPUT_LOG_WINDOW)),
            peer_log: Mutex::new(LogLimiter::new(PEER_LOG_BURST, PEER_LOG_WINDOW)),
            names_file: config.names_file.clone(),
            identified_window: config.transport.connection_window(),
            events,
        }
    }

    /// `Some(lines held back before)` when a line a peer caused may be
    /// logged now (see `info_peer!`).
    pub(crate) fn peer_log_allows(&self) -> Option<u64> {
        lock(&self.peer_log).allow(std::time::Instant::now())
    }

    pub(crate) fn unidentified(&self) -> usize {
        lock(&self.admission).unidentified()
    }

    fn sessions(&self) -> MutexGuard<'_, SessionTable> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the relay down with a poisoned lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The forwarder is done with a tunnel (for whatever reason).
    pub(crate) fn tunnel_ended(&self, id: &TunnelId) {
        let mut state = self.lock();
        state.router.remove_tunnel(id);
        state.tunnels.remove(id);
        drop(state);
        self.sessions().close(id);
    }

    /// The relay's housekeeping: follows nodes whose relay connection
    /// moved, expires claims and held names (small batches). Returns the
    /// nodes that moved.
    pub(crate) fn housekeep(&self) -> usize {
        let now = std::time::Instant::now();
        let moved = self.lock().follow_moves(&self.sessions);
        // Expiry in small batches, the lock let go between them.
        loop {
            let mut state = self.lock();
            let more = state.claims.expire(now) | state.router.expire_held(now);
            drop(state);
            if !more {
                break;
            }
            std::thread::yield_now();
        }
        moved
    }

    /// Writes the name→key bindings to the state directory when they
    /// changed (or `always`).
    pub(crate) fn save_bindings(&self, always: bool) {
        let Some(path) = &self.names_file else {
            return;
        };
        let bindings = {
            let mut state = self.lock();
            if !state.bindings_dirty && !always {
                return;
            }
            state.bindings_dirty = false;
            state.router.bindings(std::time::Instant::now())
        };
        if let Err(e) = crate::bindings::save(path, &bindings) {
            warn!(path = %path.display(), error = %e, "could not write the name bindings");
        }
    }

    fn token_matches(&self, given: Option<&str>) -> bool {
        match (&self.token, given) {
            (None, _) => true,
            (Some(expected), Some(given)) => expected.as_bytes().ct_eq(given.as_bytes()).into(),
            (Some(_), None) => false,
        }
    }
}

impl metrics::StatsSource for Shared {
    fn stats(&self) -> Stats {
        let state = self.lock();
        Stats {
            nodes: state.router.node_count(),
            tunnels: state.router.tunnel_count(),
            sessions: self.sessions().len(),
            unidentified: self.unidentified(),
            waiting: state.claims.len(),
        }
    }
}

impl State {
    /// Ends tunnels the router has forgotten: a stream tunnel's forwarder
    /// stops (which resets its streams at both ends), an e2e session leaves
    /// the data plane's table and each side still here hears `tun_close`,
    /// so a node learns at once that its peer left (died, was cut off, was
    /// replaced) instead of waiting out the session's idle timeout.
    ///
    /// `departed`: a side's relay connection ended (not a `tun_close`), so
    /// the session is remembered for a while: if that side comes back (a
    /// reconnect, not a death), both can claim it back with `sess_keep`.
    fn cancel_tunnels(
        &mut self,
        closed: Vec<Tunnel>,
        sessions: &Mutex<SessionTable>,
        departed: bool,
    ) {
        if closed.is_empty() {
            return;
        }
        // The data plane's lock only for the removals (O(1) each); what the
        // relay remembers goes to the claims table, under this lock only.
        let gone: Vec<(Tunnel, sessions::Session)> = {
            let mut table = sessions.lock().unwrap_or_else(|e| e.into_inner());
            closed
                .iter()
                .filter_map(|t| Some((t.clone(), table.close(&t.id)?)))
                .collect()
        };
        for t in &closed {
            if let Some(token) = self.tunnels.remove(&t.id) {
                token.cancel();
            }
        }
        let now = std::time::Instant::now();
        for (t, session) in gone {
            let remembered = departed && {
                let present = [t.requester, t.target].map(|c| self.nodes.contains_key(&c));
                let names = [t.requester_name.clone(), t.target_name.clone()];
                self.claims.remember(&session, names, present, now)
            };
            for side in [t.requester, t.target] {
                // The relay cannot tell a dead peer from one that lost only
                // its path here: a side that can follow the session to
                // another relay hears `sess_lost`, and keeps it a while.
                let msg = match self.nodes.get(&side) {
                    Some(n) if remembered && n.version >= MOVE_VERSION => {
                        Message::SessionLost { tunnel: t.id }
                    }
                    _ => Message::TunnelClose { tunnel: t.id },
                };
                self.send_to(side, msg);
            }
        }
    }

    /// `claimant` claimed `tunnel` naming `peer`: the peer, if it is here
    /// and can follow, hears of it (once per claim entry or pairing, so
    /// no more often than claims are capped).
    fn tell_claimed(&self, tunnel: TunnelId, claimant: &str, peer: &str) {
        let Some(conn) = self.router.conn_of(peer) else {
            return;
        };
        if self
            .nodes
            .get(&conn)
            .is_some_and(|n| n.version >= MOVE_VERSION)
        {
            self.send_to(
                conn,
                Message::SessionClaimed {
                    tunnel,
                    source: claimant.to_owned(),
                },
            );
        }
    }

    /// Nodes whose relay connection moved (QUIC migrated it: a NAT
    /// rebinding): their sessions' sides follow, and a node of version 4
    /// or more hears its new address. Returns how many moved.
    fn follow_moves(&mut self, sessions: &Mutex<SessionTable>) -> usize {
        let moved: Vec<(ConnId, SocketAddr)> = self
            .nodes
            .iter_mut()
            .filter_map(|(id, node)| {
                let now = node.conn.remote_address();
                (now != node.seen).then(|| {
                    node.seen = now;
                    (*id, now)
                })
            })
            .collect();
        for (conn, addr) in &moved {
            let sides = self.router.tunnels_of(*conn);
            {
                let mut table = sessions.lock().unwrap_or_else(|e| e.into_inner());
                for (tunnel, side) in sides {
                    table.rebind_side(&tunnel, side, *addr);
                }
            }
            if self
                .nodes
                .get(conn)
                .is_some_and(|n| n.version >= REFLEXIVE_VERSION)
            {
                self.send_to(
                    *conn,
                    Message::Candidates {
                        tunnel: None,
                        addrs: vec![*addr],
                    },
                );
            }
        }
        moved.len()
    }

    /// Queues a control message for `conn`; a node that lets its queue fill
    /// up is not reading its control stream and is disconnected.
    fn send_to(&self, conn: ConnId, msg: Message) {
        if let Some(node) = self.nodes.get(&conn) {
            if node.control.try_send(msg).is_err() {
                node.conn
                    .close(close_code::CONTROL_BACKLOG.into(), b"control_backlog");
            }
        }
    }
}

/// Housekeeping until shutdown: at least twice a second, and soon after
/// the data plane saw a side's key from an address not bound to it (at
/// most every 20 ms however often that happens).
pub(crate) async fn housekeeping(
    shared: Arc<Shared>,
    socket: Arc<crate::relay_socket::RelaySocket>,
    shutdown: CancellationToken,
) {
    let moved = socket.moved.clone();
    let mut saved = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = moved.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let n = shared.housekeep();
        socket
            .stats
            .rebinds
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if saved.elapsed() >= Duration::from_secs(1) {
            let shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || shared.save_bindings(false)).await;
            saved = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let remote = incoming.remote_address();
        let decision =
            lock(&shared.admission).decide(remote.ip(), incoming.remote_address_validated());
        match decision {
            Decision::Accept => {}
            Decision::Retry => {
                let _ = incoming.retry();
                continue;
            }
            Decision::Refuse(reason) => {
                shared
                    .events
                    .connections_refused
                    .get_or_create(&metrics::reason(reason.as_str()))
                    .inc();
                warn_bad_input!(shared, %remote, reason = reason.as_str(), "connection refused");
                incoming.refuse();
                continue;
            }
        }
        let slot = Unidentified {
            shared: shared.clone(),
            ip: remote.ip(),
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(incoming, shared, slot).await {
                debug!(%remote, error = %e, "connection ended");
            }
        });
    }
}

/// How a control session ended.
enum End {
    /// The node went away or finished its control stream.
    Gone(String),
    /// The relay closes the connection, after a last message.
    Close { code: u32, reason: &'static str },
}

struct Session {
    shared: Arc<Shared>,
    conn: quinn::Connection,
    conn_id: ConnId,
    remote: SocketAddr,
    control: mpsc::Sender<Message>,
    name: Option<String>,
    /// Held until the node identifies.
    slot: Option<Unidentified>,
    /// Answers to tunnel requests, in request order.
    answers: mpsc::UnboundedSender<oneshot::Receiver<Message>>,
    /// Cleaned up already.
    left: bool,
}

async fn serve(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    slot: Unidentified,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + shared.identify_timeout;
    let remote = incoming.remote_address();
    let conn = timeout_at(deadline, incoming).await??;
    let (send, mut recv) = match timeout_at(deadline, conn.accept_bi()).await {
        Ok(streams) => streams?,
        Err(_) => {
            conn.close(close_code::IDENTIFY_TIMEOUT.into(), b"identify_timeout");
            return Ok(());
        }
    };
    let (control, queue) = mpsc::channel(CONTROL_QUEUE);
    let writer = tokio::spawn(write_control(send, queue));
    let (answers, ordered) = mpsc::unbounded_channel();
    tokio::spawn(order_answers(ordered, control.clone(), conn.clone()));
    let mut session = Session {
        shared: shared.clone(),
        conn_id: next_conn_id(),
        conn: conn.clone(),
        remote,
        control,
        name: None,
        slot: Some(slot),
        answers,
        left: false,
    };
    let end = session.read_loop(&mut recv, deadline).await;
    drop(session); // leaves (and would on any other way out)
    match end {
        End::Gone(why) => debug!(%remote, why, "control stream ended"),
        End::Close { code, reason } => {
            // Let the last message (id_err, err) reach the node before closing.
            let _ = timeout(LINGER, writer).await;
            conn.close(code.into(), reason.as_bytes());
        }
    }
    Ok(())
}

impl Session {
    async fn read_loop(&mut self, recv: &mut RecvStream, deadline: Instant) -> End {
        let mut decoder = FrameDecoder::new(self.shared.max_frame);
        loop {
            let read = if self.name.is_none() {
                match timeout_at(deadline, recv.read_chunk(64 * 1024, true)).await {
                    Ok(read) => read,
                    Err(_) => return self.refuse("identify_timeout", close_code::IDENTIFY_TIMEOUT),
                }
            } else {
                recv.read_chunk(64 * 1024, true).await
            };
            let chunk = match read {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return End::Gone("finished".into()),
                Err(e) => return End::Gone(e.to_string()),
            };
            let mut input = &chunk.bytes[..];
            let mut handled = 0u32;
            loop {
                match decoder.decode(&mut input) {
                    Ok(Some(msg)) => {
                        if let Err(end) = self.handle(msg).await {
                            return end;
                        }
                        // A node that sends without pause must not hold a
                        // worker: the endpoint's driver (the data plane)
                        // and other nodes get their turn.
                        handled += 1;
                        if handled.is_multiple_of(MESSAGES_PER_YIELD) {
                            tokio::task::yield_now().await;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn_bad_input!(self.shared, remote = %self.remote, node = ?self.name, error = %e, "bad control frame");
                        self.reply(Message::ProtocolError {
                            reason: e.reason().into(),
                        });
                        if e.is_fatal() {
                            return End::Close {
                                code: close_code::PROTOCOL_ERROR,
                                reason: e.reason(),
                            };
                        }
                    }
                }
            }
        }
    }

    async fn handle(&mut self, msg: Message) -> Result<(), End> {
        match msg {
            Message::Identify {
                node,
                token,
                version,
            } => self.identify(node, token, version).await,
            Message::TunnelRequest {
                target,
                mode: Mode::Stream,
            } => {
                self.request_tunnel(target);
                Ok(())
            }
            Message::TunnelRequest {
                target,
                mode: Mode::E2e,
            } => {
                self.request_session(target);
                Ok(())
            }
            Message::SessionKeep { tunnel, bind, peer } => {
                self.keep_session(tunnel, bind, peer);
                Ok(())
            }
            // A node's own candidates: the relay forwards candidates to
            // nobody any more (nodes exchange them inside their e2e
            // session), so they are accepted, counted and dropped.
            Message::Candidates { tunnel: None, .. } => {
                self.shared.events.candidates_ignored.inc();
                Ok(())
            }
            Message::SessionPath { tunnel, direct } => {
                // Counted only for a live session of this node's, and only
                // when its side's path changes.
                let state = self.shared.lock();
                let side = state.router.tunnel(&tunnel).and_then(|t| {
                    if t.requester == self.conn_id {
                        Some(0)
                    } else if t.target == self.conn_id {
                        Some(1)
                    } else {
                        None
                    }
                });
                let changed =
                    side.is_some_and(|side| self.shared.sessions().set_path(&tunnel, side, direct));
                drop(state);
                if changed {
                    let path = if direct { "direct" } else { "relay" };
                    info_peer!(self.shared, %tunnel, node = ?self.name, path, "e2e session path");
                    self.shared
                        .events
                        .session_paths
                        .get_or_create(&vec![("path", path)])
                        .inc();
                }
                Ok(())
            }
            Message::NodesRequest => {
                let state = self.shared.lock();
                let msg = if self.name.is_some() {
                    Message::Nodes {
                        nodes: state.router.other_names(self.conn_id),
                    }
                } else {
                    Message::ProtocolError {
                        reason: "not_identified".into(),
                    }
                };
                drop(state);
                self.reply(msg);
                Ok(())
            }
            Message::TunnelClose { tunnel } => {
                let mut state = self.shared.lock();
                if let Some(t) = state.router.close_tunnel(self.conn_id, &tunnel) {
                    debug!(tunnel = %t.id, by = ?self.name, "tun_close");
                    state.cancel_tunnels(vec![t], &self.shared.sessions, false);
                }
                Ok(())
            }
            other => {
                warn_bad_input!(self.shared, remote = %self.remote, t = other.type_name(), "message only the relay sends");
                self.reply(Message::ProtocolError {
                    reason: "unexpected_type".into(),
                });
                Ok(())
            }
        }
    }

    async fn identify(
        &mut self,
        node: String,
        token: Option<String>,
        version: Option<u64>,
    ) -> Result<(), End> {
        if !self.shared.token_matches(token.as_deref()) {
            warn_bad_input!(self.shared, remote = %self.remote, node, "identify refused: bad_token");
            return Err(self.refuse_identify("bad_token"));
        }
        let key = node_key(&self.conn);
        let version = version.unwrap_or(1);
        // The claim and the node's entry are made under one lock: nobody
        // ever sees the name without its node.
        let contested = {
            let mut state = self.shared.lock();
            let now = std::time::Instant::now();
            match state.router.claim_at(self.conn_id, &node, key, now) {
                Ok(Claim::Granted(identified)) => {
                    self.enter(&mut state, identified, version, key.is_some());
                    None
                }
                // The name is live with this key (a restart?) or with no
                // key: replaced only if its holder no longer answers.
                Ok(Claim::Contested { holder }) => {
                    Some((holder, state.nodes.get(&holder).map(|n| n.conn.clone())))
                }
                Err(refusal) => {
                    drop(state);
                    return Err(self.identify_refused(&node, refusal));
                }
            }
        };
        if let Some((holder, holder_conn)) = contested {
            let alive = match holder_conn {
                Some(conn) => answers(&conn, HOLDER_PROBE).await,
                None => false,
            };
            if alive {
                info_peer!(self.shared, node, remote = %self.remote, "name is live elsewhere: refused");
                return Err(self.identify_refused(&node, IdentifyRefusal::NameTaken));
            }
            let mut state = self.shared.lock();
            let now = std::time::Instant::now();
            match state
                .router
                .replace_at(self.conn_id, &node, key, holder, now)
            {
                Ok(identified) => self.enter(&mut state, identified, version, key.is_some()),
                Err(refusal) => {
                    drop(state);
                    return Err(self.identify_refused(&node, refusal));
                }
            }
        }
        info_peer!(self.shared, node, remote = %self.remote, version, keyed = key.is_some(), "node identified");
        self.name = Some(node);
        // An identified node carries tunnels: the full receive window, and
        // its slot among the unidentified is free.
        self.slot = None;
        if let Ok(window) = VarInt::from_u64(self.shared.identified_window) {
            self.conn.set_receive_window(window);
        }
        Ok(())
    }

    fn identify_refused(&self, node: &str, refusal: IdentifyRefusal) -> End {
        warn_bad_input!(self.shared, remote = %self.remote, node, reason = refusal.as_str(), "identify refused");
        self.refuse_identify(refusal.as_str())
    }

    /// The router has granted this connection its name: the node's entry,
    /// under the same lock, then `id_ok` (and, for version 4 or more, the
    /// address the relay sees it at).
    fn enter(
        &self,
        state: &mut State,
        identified: macula_relay_proto::relay::router::Identified,
        version: u64,
        keyed: bool,
    ) {
        if let Some(old) = identified.replaced.and_then(|old| state.nodes.remove(&old)) {
            info_peer!(
                self.shared,
                "node re-identified: closing its older connection, which no longer answered"
            );
            old.conn.close(close_code::REPLACED.into(), b"replaced");
        }
        state.cancel_tunnels(identified.closed, &self.shared.sessions, true);
        let seen = self.conn.remote_address();
        state.nodes.insert(
            self.conn_id,
            Node {
                conn: self.conn.clone(),
                control: self.control.clone(),
                version,
                seen,
            },
        );
        if keyed {
            state.bindings_dirty = true;
        }
        // id_ok is queued before the lock is released: any tun_notify for
        // this node (queued under the same lock) comes after it.
        // A v1 client gets the v1 answer, unchanged; a v2 one learns that
        // this relay offers e2e sessions.
        self.reply(Message::Identified {
            version: (version >= 2).then_some(PROTOCOL_VERSION),
        });
        if version >= REFLEXIVE_VERSION {
            self.reply(Message::Candidates {
                tunnel: None,
                addrs: vec![seen],
            });
        }
    }

    fn refuse_identify(&self, reason: &'static str) -> End {
        self.refused_count(reason);
        self.refuse(reason, close_code::REFUSED)
    }

    /// A stream tunnel: the relay opens a stream to each side. That may
    /// take long when a side is slow to grant streams, so it runs on its
    /// own, and the answer takes its place in the ordered answers: other
    /// requests on this control stream are not held up behind it.
    fn request_tunnel(&mut self, target: String) {
        let started = std::time::Instant::now();
        let id = TunnelId::random();
        let token = CancellationToken::new();
        let (tunnel, target_conn) = {
            let mut state = self.shared.lock();
            let tunnel = match state.router.request_tunnel(self.conn_id, &target, id) {
                Ok(tunnel) => tunnel,
                Err(refusal) => {
                    drop(state);
                    debug!(from = ?self.name, target, reason = refusal.as_str(), "tunnel refused");
                    return self.answer(Message::TunnelError {
                        reason: refusal.as_str().into(),
                    });
                }
            };
            let Some(target_conn) = state.nodes.get(&tunnel.target).map(|n| n.conn.clone()) else {
                state.router.remove_tunnel(&id);
                drop(state);
                return self.answer(Message::TunnelError {
                    reason: "target_not_connected".into(),
                });
            };
            state.tunnels.insert(id, token.clone());
            (tunnel, target_conn)
        };
        let (answer, later) = oneshot::channel();
        let _ = self.answers.send(later);
        let shared = self.shared.clone();
        let requester_conn = self.conn.clone();
        tokio::spawn(async move {
            let opened = timeout(OPEN_TIMEOUT, async {
                let requester_end = open_prefixed(&requester_conn, id).await?;
                let target_end = open_prefixed(&target_conn, id).await?;
                anyhow::Ok((requester_end, target_end))
            })
            .await;
            let (requester_end, target_end) = match opened {
                Ok(Ok(ends)) => ends,
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timeout".into(),
                    };
                    warn_bad_input!(shared, tunnel = %id, from = %tunnel.requester_name, to = %tunnel.target_name, why, "tunnel streams could not be opened");
                    shared.tunnel_ended(&id);
                    let _ = answer.send(Message::TunnelError {
                        reason: "open_failed".into(),
                    });
                    return;
                }
            };
            info_peer!(shared, tunnel = %id, from = %tunnel.requester_name, to = %tunnel.target_name, "tunnel opened");
            opened_metrics(&shared, Mode::Stream, started);
            let _ = answer.send(Message::TunnelOk {
                tunnel: id,
                bind: None,
                path_mtu: None,
            });
            shared.lock().send_to(
                tunnel.target,
                Message::TunnelNotify {
                    tunnel: id,
                    source: tunnel.requester_name.clone(),
                    bind: None,
                    path_mtu: None,
                },
            );
            let counted = shared.events.stream_bytes.clone();
            let (bytes_up, bytes_down) =
                forward::run(requester_end, target_end, token, counted).await;
            shared.tunnel_ended(&tunnel.id);
            info_peer!(
                shared,
                tunnel = %tunnel.id,
                from = %tunnel.requester_name,
                to = %tunnel.target_name,
                bytes_up,
                bytes_down,
                "tunnel closed"
            );
        });
    }

    /// An e2e session: no streams at the relay, only an entry in the data
    /// plane's table with a bind key for each side. The target hears of it
    /// first, so it knows the session before the requester's first datagram.
    fn request_session(&mut self, target: String) {
        let started = std::time::Instant::now();
        let mut state = self.shared.lock();
        if let Some(node) = state
            .router
            .conn_of(&target)
            .and_then(|c| state.nodes.get(&c))
        {
            if node.version < 2 {
                drop(state);
                return self.answer(Message::TunnelError {
                    reason: "mode_unsupported".into(),
                });
            }
        }
        // A session id is the tunnel id's first 8 bytes: draw again on a clash.
        let mut id = TunnelId::random();
        while self.shared.sessions().id_taken(&id) {
            id = TunnelId::random();
        }
        let tunnel = match state.router.request_tunnel(self.conn_id, &target, id) {
            Ok(tunnel) => tunnel,
            Err(refusal) => {
                drop(state);
                debug!(from = ?self.name, target, reason = refusal.as_str(), "session refused");
                return self.answer(Message::TunnelError {
                    reason: refusal.as_str().into(),
                });
            }
        };
        // Each side is bound to its node's relay connection address. No
        // candidates go anywhere: nodes exchange them inside the session.
        let ends = state
            .nodes
            .get(&tunnel.target)
            .zip(state.nodes.get(&self.conn_id))
            .map(|(t, r)| (r.seen, t.seen, path_mtu(&r.conn, &t.conn)));
        let path_mtu = ends.map(|(_, _, mtu)| mtu);
        let opened = match ends {
            Some((requester_addr, target_addr, _)) => {
                self.shared.sessions().open(id, requester_addr, target_addr)
            }
            None => Err(sessions::SessionIdTaken),
        };
        let Ok([requester_key, target_key]) = opened else {
            state.router.remove_tunnel(&id);
            drop(state);
            return self.answer(Message::TunnelError {
                reason: "open_failed".into(),
            });
        };
        state.send_to(
            tunnel.target,
            Message::TunnelNotify {
                tunnel: id,
                source: tunnel.requester_name.clone(),
                bind: Some(target_key),
                path_mtu,
            },
        );
        drop(state);
        info_peer!(self.shared, tunnel = %id, from = %tunnel.requester_name, to = %tunnel.target_name, "e2e session opened");
        opened_metrics(&self.shared, Mode::E2e, started);
        self.answer(Message::TunnelOk {
            tunnel: id,
            bind: Some(requester_key),
            path_mtu,
        });
    }

    /// A session this node held through its previous relay connection (or
    /// through this relay before a restart): it flows again once both
    /// sides have claimed it, each with its own bind key.
    fn keep_session(&mut self, tunnel: TunnelId, bind: macula_relay_proto::BindKey, peer: String) {
        let Some(name) = self.name.clone() else {
            return self.reply(Message::ProtocolError {
                reason: "not_identified".into(),
            });
        };
        let now = std::time::Instant::now();
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        // The claimant is its connection's node, at its relay connection's
        // address: a claim names no one else and binds nowhere else.
        let addr = state
            .nodes
            .get(&self.conn_id)
            .map_or(self.remote, |n| n.seen);
        let first_claim = !state.claims.contains(&tunnel);
        let kept = {
            let live = self.shared.sessions();
            let router = &state.router;
            state.claims.keep(
                &live,
                sessions::Claim {
                    tunnel,
                    bind,
                    addr,
                    name: &name,
                    peer: &peer,
                },
                now,
                &|node| router.conn_of(node).is_some(),
            )
        };
        let outcome: Result<&'static str, &'static str> = match kept {
            Kept::Live { side } => {
                // Only that side's own node may move it (to itself).
                let owner = state.router.tunnel(&tunnel).map(|t| {
                    if side == 0 {
                        t.requester_name.clone()
                    } else {
                        t.target_name.clone()
                    }
                });
                if owner.as_deref() == Some(name.as_str()) {
                    if self.shared.sessions().rebind_side(&tunnel, side, addr) {
                        debug!(%tunnel, node = name, "e2e session side moved by its node's claim");
                    }
                    state.router.reattach(&tunnel, &name, self.conn_id);
                    Ok("live")
                } else {
                    Err("not_a_side")
                }
            }
            Kept::Paired(sides) => {
                let [(a, a_key, _), (b, b_key, _)] = *sides;
                let ends = state.router.conn_of(&a).zip(state.router.conn_of(&b));
                match ends {
                    Some((ca, cb)) => {
                        let restored = state.router.restore_claimed(Tunnel {
                            id: tunnel,
                            requester: ca,
                            requester_name: a.clone(),
                            target: cb,
                            target_name: b.clone(),
                        });
                        let addrs = state.nodes.get(&ca).zip(state.nodes.get(&cb));
                        match (restored, addrs) {
                            (Ok(()), Some((na, nb))) => {
                                let entered = self
                                    .shared
                                    .sessions()
                                    .restore(tunnel, [(a_key, na.seen), (b_key, nb.seen)]);
                                if entered.is_ok() {
                                    Ok("restored")
                                } else {
                                    state.router.remove_tunnel(&tunnel);
                                    Err("id_taken")
                                }
                            }
                            (Ok(()), None) => {
                                state.router.remove_tunnel(&tunnel);
                                Err("side_left")
                            }
                            (Err(refusal), _) => Err(refusal.as_str()),
                        }
                    }
                    // A side left again meanwhile: the session goes.
                    None => Err("side_left"),
                }
            }
            Kept::Waiting => Ok("waiting"),
            Kept::Refused(refusal) => Err(refusal.as_str()),
        };
        // The peer may carry the session through another relay (it did not
        // lose this one's predecessor), or wait for it here: either way it
        // follows now, not after its own detection.
        if outcome == Ok("restored") || (outcome == Ok("waiting") && first_claim) {
            state.tell_claimed(tunnel, &name, &peer);
        }
        drop(guard);
        let label = match outcome {
            Ok(o) | Err(o) => o,
        };
        self.shared
            .events
            .session_claims
            .get_or_create(&vec![("outcome", label)])
            .inc();
        match outcome {
            Ok(outcome) => {
                info_peer!(self.shared, %tunnel, node = name, outcome, "e2e session claimed back")
            }
            Err(reason) => {
                warn_bad_input!(self.shared, remote = %self.remote, node = name, reason, "sess_keep refused")
            }
        }
    }

    fn refused_count(&self, reason: &'static str) {
        self.shared
            .events
            .identify_refused
            .get_or_create(&metrics::reason(reason))
            .inc();
    }

    /// Answers a tunnel request, in request order (see [`order_answers`]).
    fn answer(&self, msg: Message) {
        let (now, ready) = oneshot::channel();
        let _ = now.send(msg);
        let _ = self.answers.send(ready);
    }

    fn reply(&self, msg: Message) {
        if self.control.try_send(msg).is_err() {
            self.conn
                .close(close_code::CONTROL_BACKLOG.into(), b"control_backlog");
        }
    }

    fn refuse(&self, reason: &'static str, code: u32) -> End {
        self.reply(Message::IdentifyRefused {
            reason: reason.into(),
        });
        End::Close { code, reason }
    }

    /// The connection is done: forget the node and close its tunnels.
    /// Runs once, on every way out (see the `Drop` below).
    fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        let mut state = self.shared.lock();
        let closed = state.router.disconnect(self.conn_id);
        if state.nodes.remove(&self.conn_id).is_some() {
            state.bindings_dirty = true;
        }
        let tunnels = closed.len();
        state.cancel_tunnels(closed, &self.shared.sessions, true);
        drop(state);
        if let Some(node) = &self.name {
            info_peer!(self.shared, node, remote = %self.remote, tunnels, "node left");
        }
    }
}

/// A connection's cleanup runs however its task ends (a return, an error,
/// a panic): no name or tunnel outlives it.
impl Drop for Session {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The MTU both relay connections of a session carry, each as the relay
/// found it (its sending direction, which paths mostly share with the
/// other): a session's datagrams cross both, so it may start there
/// instead of probing its way up (a node clamps the value to its own
/// bounds; too large costs it a black hole detection, no more).
fn path_mtu(requester: &quinn::Connection, target: &quinn::Connection) -> u16 {
    requester
        .stats()
        .path
        .current_mtu
        .min(target.stats().path.current_mtu)
}

/// A tunnel was granted `started` ago.
fn opened_metrics(shared: &Shared, mode: Mode, started: std::time::Instant) {
    let labels = metrics::mode(mode);
    shared.events.tunnels_opened.get_or_create(&labels).inc();
    shared
        .events
        .tunnel_setup
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
}

/// Writes the answers to one node's tunnel requests in the order the
/// requests came, each as soon as it and those before it are ready.
async fn order_answers(
    mut answers: mpsc::UnboundedReceiver<oneshot::Receiver<Message>>,
    control: mpsc::Sender<Message>,
    conn: quinn::Connection,
) {
    while let Some(next) = answers.recv().await {
        let Ok(msg) = next.await else { continue };
        if control.try_send(msg).is_err() {
            conn.close(close_code::CONTROL_BACKLOG.into(), b"control_backlog");
            return;
        }
    }
}

async fn open_prefixed(
    conn: &quinn::Connection,
    id: TunnelId,
) -> anyhow::Result<(SendStream, RecvStream)> {
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&id.to_hex()).await?;
    Ok((send, recv))
}
