//! A relay client: one QUIC connection to one relay, its control stream
//! run through the node's control machine
//! ([`macula_relay_proto::node::control`]) and the tunnel matcher, and the
//! tunnels and e2e sessions it hands out. Thin async glue: the decisions
//! are the machine's.
//!
//! What its owner (the NIF, for Erlang) hears comes as [`ClientEvent`]s on
//! the channel [`Client::start`] returns; answers to a request come on the
//! request's own channel.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use macula_dist_quic::Transport;
use macula_relay_proto::node::control::{
    Action, Handled, Level, Phase, RelayControl, SessionState,
};
use macula_relay_proto::node::direct::Event as PathEvent;
use macula_relay_proto::node::matcher::{Matched, RequestId, TunnelMatcher};
use macula_relay_proto::node::session_auth::MAX_CANDIDATES;
use macula_relay_proto::wire::close_code;
use macula_relay_proto::{FrameDecoder, Message, Mode, TunnelId, PROTOCOL_VERSION};
use quinn::{ConnectionError, RecvStream, SendStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::e2e_session::{self, read_prefix, SessionEvent, SessionRoute, SessionSetup};
use crate::endpoint::{self, NodeEndpoint};
use crate::identity::{Cluster, NodeIdentity, PeerCheck};
use crate::registry::{self, CarriedSession, Node, SessionCarrier, Sessions};
use crate::relay_trust::{self, Trust};
use crate::tunnel::{NewTunnel, Streams, Tunnel};

/// Streams that wait for their `tun_ok`/`tun_notify`, at most.
const MAX_ORPHANS: usize = 256;
/// How long half a tunnel may wait for its other half.
const MATCH_WAIT: Duration = Duration::from_secs(10);
/// How long a new stream may take to send its 32-byte prefix.
const PREFIX_WAIT: Duration = Duration::from_secs(10);

/// How a client connects, and what it offers.
pub struct ClientOptions {
    pub host: String,
    pub port: u16,
    pub node: String,
    pub token: Option<String>,
    pub trust: Trust,
    pub transport: Transport,
    pub connect_timeout: Duration,
    pub tunnel_timeout: Duration,
    /// E2e sessions (`true`, the default) or stream tunnels.
    pub wants_e2e: bool,
    /// The key this node shows the relay and, in cookie mode, its peers.
    pub key: Arc<NodeIdentity>,
    /// Cluster-CA mode: sessions show this identity instead.
    pub cluster: Option<Arc<Cluster>>,
    /// Look for direct paths, offering these addresses besides the local
    /// ones and the one the relay sees.
    pub direct: bool,
    pub advertise: Vec<SocketAddr>,
}

/// What the client's owner hears.
pub enum ClientEvent {
    /// The relay took the node (`id_ok`).
    Identified,
    ConnectFailed(ConnectError),
    /// The relay connection ended (after `Identified`).
    Closed(CloseReason),
    Log(Level, String),
    /// An inbound e2e session from `source` needs this node's cookie for
    /// it: answer with [`Client::cookie`] and `tag`.
    CookieWanted {
        source: String,
        tag: u64,
    },
    /// A tunnel a peer opened to this node, for the kernel.
    Inbound(NewTunnel),
}

/// Why a relay connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// This node stopped the client.
    Stopped,
    /// The relay gave this node's name to a newer connection with its key:
    /// connecting again would split the node in two.
    Replaced,
    Other(String),
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    Unreachable(String),
    Tls(String),
    /// The relay refused identify (its reason), or this node refused the
    /// relay (`relay_without_e2e`).
    Refused(String),
    Protocol(String),
    Timeout,
}

impl From<ConnectionError> for ConnectError {
    fn from(e: ConnectionError) -> Self {
        // TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100..=0x1ff.
        let crypto = |code: u64| (0x100..0x200).contains(&code);
        match &e {
            ConnectionError::TransportError(t) if crypto(u64::from(t.code)) => {
                ConnectError::Tls(e.to_string())
            }
            ConnectionError::ConnectionClosed(c) if crypto(u64::from(c.error_code)) => {
                ConnectError::Tls(e.to_string())
            }
            ConnectionError::TimedOut => ConnectError::Timeout,
            _ => ConnectError::Unreachable(e.to_string()),
        }
    }
}

/// Why a tunnel request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelFailure {
    Timeout,
    RelayClosed,
    /// The relay's or this node's reason (`target_not_connected`,
    /// `e2e_handshake_failed`, `downgrade_refused`, ...).
    Refused(String),
}

/// Why a request could not even be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    NotConnected,
    /// The relay is older than the request (`nodes` needs version 2).
    Unsupported,
}

pub type TunnelReply = Result<NewTunnel, TunnelFailure>;

struct Request {
    reply: oneshot::Sender<TunnelReply>,
    /// For an e2e session: the cookie for the target, and the target.
    e2e: Option<(Vec<u8>, String)>,
}

struct State {
    control: RelayControl,
    matcher: TunnelMatcher<Request, Streams>,
    control_tx: Option<mpsc::Sender<Message>>,
    /// The connections of the sessions `control` carries.
    session_conns: HashMap<TunnelId, quinn::Connection>,
    /// Callers waiting for `nodes_ok`, oldest first (answered in order).
    nodes_waiters: VecDeque<oneshot::Sender<Vec<String>>>,
}

/// One relay client of a node.
pub struct Client {
    node: Arc<Node>,
    tunnel_timeout: Duration,
    wants_e2e: bool,
    direct: bool,
    advertise: Vec<SocketAddr>,
    key: Arc<NodeIdentity>,
    cluster: Option<Arc<Cluster>>,
    state: Mutex<State>,
    conn: OnceLock<quinn::Connection>,
    /// The node's endpoint (its one UDP socket), once connected.
    endpoint: OnceLock<Arc<NodeEndpoint>>,
    /// Set once connected to a relay that offers e2e sessions.
    route: OnceLock<SessionRoute>,
    setup: OnceLock<SessionSetup>,
    events: mpsc::UnboundedSender<ClientEvent>,
    open_tunnels: Arc<AtomicUsize>,
    shutdown: CancellationToken,
    rt: Handle,
}

/// Live clients in this process, for leak checks.
pub static LIVE_CLIENTS: AtomicUsize = AtomicUsize::new(0);

impl Drop for Client {
    fn drop(&mut self) {
        LIVE_CLIENTS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's state, for status reports.
pub struct ClientStatus {
    pub node: String,
    pub phase: Phase,
    pub pending_tunnels: usize,
    pub active_tunnels: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rtt_us: u64,
    /// Runs e2e sessions (its relay offers them).
    pub e2e: bool,
    pub key_id: String,
    pub sessions: Vec<SessionStatus>,
    pub cluster_ca: bool,
    pub refused_sessions: u64,
}

pub struct SessionStatus {
    pub peer: String,
    pub id: String,
    pub rtt_us: u64,
    /// `Some(address)` once it went direct.
    pub direct: Option<SocketAddr>,
}

/// The key made for this run when there is no place to keep one: all of
/// the node's clients (one per relay) show it.
static RUN_KEY: Mutex<Option<Arc<NodeIdentity>>> = Mutex::new(None);

/// The node's own key: kept in `file` (made there on first use), or, with
/// no file, one made for this run.
pub fn own_key(file: &str) -> Result<Arc<NodeIdentity>, String> {
    if !file.is_empty() {
        return NodeIdentity::load_or_create(file.as_ref())
            .map(Arc::new)
            .map_err(|e| format!("node key {file}: {e:#}"));
    }
    let mut run_key = RUN_KEY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(key) = run_key.as_ref() {
        return Ok(key.clone());
    }
    let key = Arc::new(NodeIdentity::generate().map_err(|e| format!("{e:#}"))?);
    *run_key = Some(key.clone());
    Ok(key)
}

impl Client {
    /// Starts connecting on `rt`; the events channel hears `Identified` or
    /// `ConnectFailed`, then the rest.
    pub fn start(
        opts: ClientOptions,
        rt: Handle,
    ) -> Result<(Arc<Client>, mpsc::UnboundedReceiver<ClientEvent>), String> {
        if opts.cluster.is_some() && !opts.wants_e2e {
            return Err("cluster CA mode needs e2e sessions (tunnel e2e)".into());
        }
        let config = relay_trust::client_config_with_key(
            &opts.trust,
            &relay_transport(&opts),
            Some(&opts.key),
        )
        .map_err(|e| format!("{e:#}"))?;
        let (events, events_rx) = mpsc::unbounded_channel();
        LIVE_CLIENTS.fetch_add(1, Ordering::Relaxed);
        let node = registry::node(&opts.node);
        let client = Arc::new(Client {
            node: node.clone(),
            tunnel_timeout: opts.tunnel_timeout,
            wants_e2e: opts.wants_e2e,
            direct: opts.direct,
            advertise: opts.advertise.clone(),
            key: opts.key.clone(),
            cluster: opts.cluster.clone(),
            state: Mutex::new(State {
                control: RelayControl::new(opts.wants_e2e),
                matcher: TunnelMatcher::new(MAX_ORPHANS),
                control_tx: None,
                session_conns: HashMap::new(),
                nodes_waiters: VecDeque::new(),
            }),
            conn: OnceLock::new(),
            endpoint: OnceLock::new(),
            route: OnceLock::new(),
            setup: OnceLock::new(),
            events,
            open_tunnels: Arc::new(AtomicUsize::new(0)),
            shutdown: CancellationToken::new(),
            rt: rt.clone(),
        });
        let carrier: Arc<dyn SessionCarrier> = client.clone();
        node.join(Arc::downgrade(&carrier));
        rt.spawn(run(client.clone(), opts, config));
        Ok((client, events_rx))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tell(&self, event: ClientEvent) {
        let _ = self.events.send(event);
    }

    fn log(&self, level: Level, text: String) {
        self.tell(ClientEvent::Log(level, text));
    }

    pub fn node_name(&self) -> &str {
        self.node.name()
    }

    /// Carries out what the control machine decided. Control messages go
    /// out under the lock (so they keep the order they were decided in);
    /// the rest after it.
    fn act(&self, mut state: MutexGuard<'_, State>) {
        let mut later = Vec::new();
        while let Some(action) = state.control.poll_action() {
            match action {
                Action::Send(msg) => {
                    let keep = match &msg {
                        Message::SessionKeep { tunnel, .. } => Some(*tunnel),
                        _ => None,
                    };
                    let sent = state
                        .control_tx
                        .as_ref()
                        .is_some_and(|tx| tx.try_send(msg).is_ok());
                    // A session that cannot be claimed cannot go on.
                    if let (false, Some(tunnel)) = (sent, keep) {
                        if let Some(conn) = state.session_conns.get(&tunnel) {
                            conn.close(0u32.into(), b"relay control queue full");
                        }
                    }
                }
                other => later.push(other),
            }
        }
        let conns: Vec<_> = later
            .iter()
            .map(|a| match a {
                Action::CloseSession { tunnel, .. } | Action::CheckDirect { tunnel } => {
                    state.session_conns.get(tunnel).cloned()
                }
                _ => None,
            })
            .collect();
        drop(state);
        for (action, conn) in later.into_iter().zip(conns) {
            match (action, conn) {
                (Action::CloseSession { reason, .. }, Some(conn)) => {
                    conn.close(0u32.into(), reason.as_bytes())
                }
                (Action::CheckDirect { .. }, Some(conn)) => {
                    if let Some(route) = self.route.get() {
                        route.socket.check_direct(&conn.remote_address());
                    }
                }
                (Action::Log { level, text }, _) => self.log(level, text),
                _ => {}
            }
        }
    }

    fn on_control(self: &Arc<Self>, msg: Message) {
        let now = Instant::now();
        let mut state = self.lock();
        let State {
            control,
            session_conns,
            ..
        } = &mut *state;
        let route = self.route.get();
        let handled = control.handle(msg, now, |t| on_direct(route, session_conns, t));
        let matched = match handled {
            Handled::Matcher(Message::TunnelOk { tunnel, .. }) => {
                state.matcher.on_tunnel_ok(tunnel, now)
            }
            Handled::Matcher(Message::TunnelNotify { tunnel, source, .. }) => {
                state.matcher.on_tunnel_notify(tunnel, source, now)
            }
            Handled::Matcher(Message::TunnelError { reason }) => {
                state.matcher.on_tunnel_error(reason)
            }
            Handled::Matcher(_) | Handled::Done => None,
            Handled::Nodes(nodes) => {
                if let Some(waiter) = state.nodes_waiters.pop_front() {
                    let _ = waiter.send(nodes);
                }
                None
            }
            Handled::DowngradeRefused { tunnel } => {
                state.matcher.on_tunnel_ok(tunnel, now);
                state.matcher.fail(&tunnel, "downgrade_refused".into())
            }
            Handled::SessionOffered {
                tunnel,
                bind,
                path_mtu,
            } => {
                let e2e = state.matcher.front().and_then(|r| r.e2e.clone());
                let matched = state.matcher.on_tunnel_ok(tunnel, now);
                match (e2e, self.route.get(), self.setup.get()) {
                    (Some((cookie, target)), Some(route), Some(setup)) => {
                        let candidates = self.local_candidates(&state.control);
                        e2e_session::connect(
                            setup,
                            route.clone(),
                            tunnel,
                            bind,
                            path_mtu,
                            cookie,
                            target,
                            candidates,
                        );
                    }
                    // Abandoned meanwhile (or not asked as e2e): never used.
                    _ => state.control.discard(tunnel),
                }
                matched
            }
            Handled::InboundAnnounced {
                tunnel,
                source,
                tag,
                ..
            } => {
                if self.route.get().is_none() {
                    // A relay without e2e sessions announced one.
                    state.control.inbound_done(&tunnel);
                    state.control.discard(tunnel);
                    None
                } else {
                    // The session's PAKE needs the cookie for `source`,
                    // which Erlang knows: ask the owner for it.
                    let matched = state.matcher.on_tunnel_notify(tunnel, source.clone(), now);
                    self.tell(ClientEvent::CookieWanted { source, tag });
                    matched
                }
            }
            Handled::PeerLost { tunnel, peer } => {
                self.rt.spawn(look_for_peer(self.clone(), tunnel, peer));
                None
            }
            Handled::ClaimedHere { tunnel, peer } => {
                self.act(state);
                self.node.claimed_at(self.as_ref(), &tunnel, &peer);
                return;
            }
            Handled::InboundWithdrawn { tunnel, vaddr } => {
                state.matcher.forget_inbound(&tunnel);
                if let (Some(vaddr), Some(route)) = (vaddr, self.route.get()) {
                    if route.inbound.forget(&vaddr).is_some() {
                        route.socket.remove_session(&vaddr);
                    }
                }
                None
            }
        };
        self.act(state);
        if let Some(m) = matched {
            self.dispatch(m);
        }
    }

    /// Carries out what the matcher decided.
    fn dispatch(self: &Arc<Self>, matched: Matched<Request, Streams>) {
        match matched {
            Matched::Outbound {
                request,
                tunnel,
                stream,
            } => {
                let new = Tunnel::create(
                    tunnel,
                    String::new(),
                    true,
                    stream,
                    self.open_tunnels.clone(),
                    self.rt.clone(),
                );
                if let Err(Ok(new)) = request.reply.send(Ok(new)) {
                    // Its caller is gone.
                    new.discard();
                    self.discard(tunnel);
                }
            }
            Matched::Inbound {
                source,
                tunnel,
                stream,
            } => {
                let new = Tunnel::create(
                    tunnel,
                    source,
                    false,
                    stream,
                    self.open_tunnels.clone(),
                    self.rt.clone(),
                );
                self.tell(ClientEvent::Inbound(new));
            }
            Matched::Failed { request, reason } => {
                let _ = request.reply.send(Err(TunnelFailure::Refused(reason)));
            }
            Matched::Discard { tunnel, stream } => {
                if let Some(s) = stream {
                    s.discard();
                }
                self.discard(tunnel);
            }
        }
    }

    /// What became of a session this client set up.
    fn on_session(self: &Arc<Self>, event: SessionEvent) {
        match event {
            SessionEvent::Up {
                tunnel,
                conn,
                streams,
                bind,
                peer,
                requester,
                peer_candidates,
            } => {
                let mut state = self.lock();
                state.control.inbound_done(&tunnel);
                let carried = state
                    .control
                    .session_up(tunnel, SessionState::new(bind, &peer, requester));
                if carried {
                    state.session_conns.insert(tunnel, conn.clone());
                }
                let matched = state.matcher.on_stream(tunnel, streams, Instant::now());
                drop(state);
                if !carried {
                    conn.close(0u32.into(), b"relay connection closed");
                } else {
                    self.start_direct(tunnel, &conn, requester, &peer_candidates);
                }
                if let Some(m) = matched {
                    self.dispatch(m);
                }
            }
            SessionEvent::Failed {
                tunnel,
                target,
                error,
            } => {
                self.log(
                    Level::Warning,
                    format!("e2e session {tunnel} to {target} failed: {error}"),
                );
                let mut state = self.lock();
                let matched = state.matcher.fail(&tunnel, "e2e_handshake_failed".into());
                state.control.discard(tunnel);
                self.act(state);
                if let Some(m) = matched {
                    self.dispatch(m);
                }
            }
            SessionEvent::Refused {
                tunnel,
                source,
                error,
            } => {
                let mut state = self.lock();
                state.control.inbound_refused(
                    tunnel,
                    &format!("refused e2e session {tunnel} from {source}: {error}"),
                    Instant::now(),
                );
                self.act(state);
            }
            SessionEvent::NeverCame { tunnel } => self.lock().control.inbound_done(&tunnel),
        }
    }

    /// Where this node may be reached, for its peers' direct paths: the
    /// address its relay sees, its local addresses on its socket's port,
    /// and `advertise`. Sent only inside authenticated sessions.
    fn local_candidates(&self, control: &RelayControl) -> Vec<SocketAddr> {
        let (true, Some(route)) = (self.direct, self.route.get()) else {
            return Vec::new();
        };
        let Ok(local) = quinn::AsyncUdpSocket::local_addr(route.socket.as_ref()) else {
            return Vec::new();
        };
        // A relay on loopback serves nodes on this host: the address it sees
        // is the one to use, and no other interface is probed.
        let relay_on_loopback = route.relay.ip().is_loopback();
        let interfaces = match relay_on_loopback {
            true => vec![],
            false => if_addrs::get_if_addrs().unwrap_or_default(),
        };
        let mut addrs: Vec<SocketAddr> = control.reflexive().into_iter().collect();
        addrs.extend(
            interfaces
                .into_iter()
                .map(|i| SocketAddr::new(i.ip(), local.port()))
                .filter(|a| a.is_ipv4() == local.is_ipv4()),
        );
        addrs.extend(self.advertise.iter().copied());
        usable_candidates(addrs, relay_on_loopback)
    }

    /// Starts looking for a direct path for a session just up, at the
    /// candidates its peer sent inside it.
    fn start_direct(
        &self,
        tunnel: TunnelId,
        conn: &quinn::Connection,
        requester: bool,
        peer_candidates: &[SocketAddr],
    ) {
        let (Some(route), true) = (self.route.get(), self.direct) else {
            return;
        };
        let addrs = usable_candidates(peer_candidates.to_vec(), route.relay.ip().is_loopback());
        if addrs.is_empty() {
            return;
        }
        // A secret only the two nodes have: exported from their session's
        // TLS, bound to the session.
        let mut secret = [0u8; 32];
        if conn
            .export_keying_material(&mut secret, b"macula direct path v1", tunnel.as_bytes())
            .is_err()
        {
            return;
        }
        let vaddr = conn.remote_address();
        let node = self.node.clone();
        let on_path: crate::node_socket::OnPath = Arc::new(move |event| {
            let direct = match event {
                PathEvent::Direct(addr) => Some(addr),
                PathEvent::Relay => None,
            };
            node.path_changed(&tunnel, direct);
        });
        if route
            .socket
            .start_direct(vaddr, &secret, requester, on_path)
        {
            route.socket.add_candidates(&vaddr, &addrs);
        }
    }

    /// The owner's answer to a cookie request: ready the inbound session.
    pub fn cookie(self: &Arc<Self>, tag: u64, cookie: &[u8]) {
        let mut state = self.lock();
        let Some((tunnel, source, bind, path_mtu)) = state.control.cookie_answered(tag) else {
            return;
        };
        let (Some(route), Some(setup)) = (self.route.get(), self.setup.get()) else {
            return;
        };
        let candidates = self.local_candidates(&state.control);
        let vaddr = e2e_session::expect(
            setup,
            route.clone(),
            tunnel,
            source,
            bind,
            path_mtu,
            cookie,
            candidates,
        );
        state.control.inbound_routed(&tunnel, vaddr);
    }

    /// Asks for a tunnel to `target`. With e2e mode, an e2e session keyed
    /// by `cookie` (none: an empty one, which no peer with a cookie accepts).
    pub fn request_tunnel(
        self: &Arc<Self>,
        target: String,
        cookie: Option<Vec<u8>>,
    ) -> Result<oneshot::Receiver<TunnelReply>, RequestError> {
        let e2e = self
            .wants_e2e
            .then(|| (cookie.unwrap_or_default(), target.clone()));
        let mode = if e2e.is_some() {
            Mode::E2e
        } else {
            Mode::Stream
        };
        let (reply, answer) = oneshot::channel();
        let id: RequestId = {
            let mut state = self.lock();
            if !state.control.is_connected() {
                return Err(RequestError::NotConnected);
            }
            let Some(tx) = state.control_tx.clone() else {
                return Err(RequestError::NotConnected);
            };
            // Pushed and sent under one lock, so the FIFO matches the wire.
            let id = state.matcher.request(Request { reply, e2e });
            if tx
                .try_send(Message::TunnelRequest { target, mode })
                .is_err()
            {
                state.matcher.abandon(id);
                return Err(RequestError::NotConnected);
            }
            id
        };
        // Weak: a stopped client is not kept alive by its pending timers.
        let client = Arc::downgrade(self);
        let wait = self.tunnel_timeout;
        self.rt.spawn(async move {
            tokio::time::sleep(wait).await;
            let Some(client) = client.upgrade() else {
                return;
            };
            let abandoned = client.lock().matcher.abandon(id);
            if let Some(request) = abandoned {
                let _ = request.reply.send(Err(TunnelFailure::Timeout));
            }
        });
        Ok(answer)
    }

    /// Asks the relay which nodes this node may reach there.
    pub fn request_nodes(&self) -> Result<oneshot::Receiver<Vec<String>>, RequestError> {
        let mut state = self.lock();
        if state.control.relay_version() < 2 {
            return Err(RequestError::Unsupported);
        }
        let Some(tx) = state.control_tx.clone() else {
            return Err(RequestError::NotConnected);
        };
        // Queued and sent under one lock, so the FIFO matches the wire.
        if tx.try_send(Message::NodesRequest).is_err() {
            return Err(RequestError::NotConnected);
        }
        let (reply, answer) = oneshot::channel();
        state.nodes_waiters.push_back(reply);
        Ok(answer)
    }

    /// Closes a tunnel by id. An e2e session's connection is closed (the
    /// peer hears it end to end, and the relay is told once it has
    /// drained); a stream tunnel is closed at the relay.
    pub fn close_tunnel(&self, tunnel: TunnelId) -> bool {
        let state = self.lock();
        if let Some(conn) = state.session_conns.get(&tunnel) {
            conn.close(0u32.into(), b"tunnel closed");
            return true;
        }
        let Some(tx) = state.control_tx.as_ref() else {
            return false;
        };
        tx.try_send(Message::TunnelClose { tunnel }).is_ok()
    }

    /// Tells the relay this node will not use the tunnel.
    pub fn discard(&self, tunnel: TunnelId) {
        let mut state = self.lock();
        state.control.discard(tunnel);
        self.act(state);
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
        if let Some(conn) = self.conn.get() {
            conn.close(0u32.into(), b"client stopping");
        }
    }

    /// The relay connection is gone: every request fails, and the e2e
    /// sessions move to another relay (or wait for the next client).
    fn closed(&self, why: CloseReason) {
        let (drained, sessions) = {
            let mut state = self.lock();
            state.control_tx = None;
            let states = state.control.relay_lost();
            let mut conns = std::mem::take(&mut state.session_conns);
            let sessions: Sessions = states
                .into_iter()
                .filter_map(|(tunnel, s)| {
                    let conn = conns.remove(&tunnel)?;
                    Some((tunnel, CarriedSession { conn, state: s }))
                })
                .collect();
            (state.matcher.drain("relay_closed"), sessions)
        };
        // The relay is lost, not this node: its sessions' connections go
        // on, through another relay of the node's or its next client. A
        // client stopped closes them.
        match self.endpoint.get() {
            Some(endpoint) if !self.shutdown.is_cancelled() => {
                self.node
                    .relay_lost(self, endpoint.clone(), sessions, &self.rt)
            }
            _ => {
                for (_, s) in sessions {
                    s.conn.close(0u32.into(), b"relay connection closed");
                }
            }
        }
        for m in drained {
            if let Matched::Failed { request, .. } = m {
                let _ = request.reply.send(Err(TunnelFailure::RelayClosed));
            }
        }
        self.tell(ClientEvent::Closed(why));
    }

    /// Sessions that waited for a client of this node (its relays were all
    /// lost): claim them at this one's relay.
    fn claim_waiting_sessions(&self) {
        let waiting = self.node.take_waiting();
        if waiting.is_empty() {
            return;
        }
        if let Err(unclaimed) = self.adopt(waiting) {
            for (_, s) in unclaimed {
                s.conn.close(0u32.into(), b"relay without e2e sessions");
            }
        }
    }

    pub fn status(&self) -> ClientStatus {
        let state = self.lock();
        let route = self.route.get();
        let sessions = state
            .control
            .sessions()
            .filter_map(|(tunnel, s)| {
                let conn = state.session_conns.get(tunnel)?;
                Some(SessionStatus {
                    peer: s.peer.clone(),
                    id: tunnel.to_string(),
                    rtt_us: conn.rtt().as_micros() as u64,
                    direct: route.and_then(|r| r.socket.direct_of(&conn.remote_address())),
                })
            })
            .collect();
        let (rtt_us, bytes_in, bytes_out) = match self.conn.get() {
            Some(c) => {
                let s = c.stats();
                (c.rtt().as_micros() as u64, s.udp_rx.bytes, s.udp_tx.bytes)
            }
            None => (0, 0, 0),
        };
        ClientStatus {
            node: self.node.name().to_owned(),
            phase: state.control.phase(),
            pending_tunnels: state.matcher.pending_count(),
            active_tunnels: self.open_tunnels.load(Ordering::Relaxed),
            bytes_in,
            bytes_out,
            rtt_us,
            e2e: route.is_some(),
            key_id: hex::encode(self.key.key_id()),
            sessions,
            cluster_ca: self.cluster.is_some(),
            refused_sessions: state.control.refused_sessions(),
        }
    }
}

impl SessionCarrier for Client {
    fn is_connected(&self) -> bool {
        self.lock().control.is_connected()
    }

    /// Takes sessions another relay connection of this node carried: each
    /// is claimed at this client's relay (`sess_keep`) and routed there.
    fn adopt(&self, sessions: Sessions) -> Result<(), Sessions> {
        let Some(route) = self.route.get() else {
            return Err(sessions);
        };
        let mut state = self.lock();
        let mut conns: HashMap<TunnelId, quinn::Connection> =
            sessions.iter().map(|(t, s)| (*t, s.conn.clone())).collect();
        let states = sessions.into_iter().map(|(t, s)| (t, s.state)).collect();
        match state.control.adopt(states, Instant::now()) {
            Ok(claimed) => {
                let mut moved = Vec::with_capacity(claimed.len());
                for tunnel in claimed {
                    if let Some(conn) = conns.remove(&tunnel) {
                        route.socket.reroute(&conn.remote_address(), route.relay);
                        state.session_conns.insert(tunnel, conn.clone());
                        moved.push(conn);
                    }
                }
                self.act(state);
                for conn in moved {
                    e2e_session::nudge_after_move(conn, &self.rt);
                }
                Ok(())
            }
            Err(states) => Err(states
                .into_iter()
                .filter_map(|(t, s)| {
                    Some((
                        t,
                        CarriedSession {
                            conn: conns.remove(&t)?,
                            state: s,
                        },
                    ))
                })
                .collect()),
        }
    }

    fn nodes(&self) -> Option<oneshot::Receiver<Vec<String>>> {
        self.request_nodes().ok()
    }

    fn release(&self, tunnel: &TunnelId, peer: &str) -> Option<CarriedSession> {
        let mut state = self.lock();
        let conn = state.session_conns.get(tunnel)?.clone();
        let session = state.control.release(tunnel, peer, Instant::now())?;
        state.session_conns.remove(tunnel);
        self.act(state);
        Some(CarriedSession {
            conn,
            state: session,
        })
    }

    fn session_closed(&self, tunnel: &TunnelId) -> bool {
        let mut state = self.lock();
        state.session_conns.remove(tunnel);
        let held = state.control.session_closed(tunnel);
        self.act(state);
        held
    }

    fn path_changed(&self, tunnel: &TunnelId, direct: Option<SocketAddr>) -> bool {
        let mut state = self.lock();
        if state.control.session(tunnel).is_none() {
            return false;
        }
        state.control.path_changed(tunnel, direct);
        self.act(state);
        true
    }
}

async fn run(client: Arc<Client>, opts: ClientOptions, config: quinn::ClientConfig) {
    let connected = tokio::select! {
        _ = client.shutdown.cancelled() => return,
        r = timeout(opts.connect_timeout, connect(&client, &opts, config)) => r.unwrap_or(Err(ConnectError::Timeout)),
    };
    let Connected {
        conn,
        send,
        recv,
        decoder,
        node_endpoint,
        relay_version,
        early,
    } = match connected {
        Ok(parts) => parts,
        Err(e) => {
            client.lock().control.relay_lost();
            client.tell(ClientEvent::ConnectFailed(e));
            return;
        }
    };
    let _ = client.conn.set(conn.clone());
    let (session_events, mut session_rx) = mpsc::unbounded_channel();
    // (A relay without e2e sessions was refused in e2e mode.)
    if client.wants_e2e {
        // Cookie mode: every session shows the node's key and takes any
        // key (the PAKE checks the cookie), so one TLS configuration each
        // way serves them all (building one loads the key: curve work).
        let (cookie_server_config, cookie_client_config) = match &client.cluster {
            Some(_) => (None, None),
            None => (
                crate::identity::server_config(&client.key, PeerCheck::AnyKey, &opts.transport)
                    .ok()
                    .map(Arc::new),
                crate::identity::client_config(&client.key, PeerCheck::AnyKey, &opts.transport)
                    .ok(),
            ),
        };
        let _ = client.route.set(SessionRoute {
            endpoint: node_endpoint.endpoint.clone(),
            socket: node_endpoint.socket.clone(),
            inbound: node_endpoint.inbound.clone(),
            relay: conn.remote_address(),
            transport: opts.transport.clone(),
        });
        let _ = client.setup.set(SessionSetup {
            node_name: client.node.name().to_owned(),
            node: client.node.clone(),
            key: client.key.clone(),
            cluster: client.cluster.clone(),
            cookie_server_config,
            cookie_client_config,
            pakes: Default::default(),
            events: session_events,
            rt: client.rt.clone(),
        });
    }
    let _ = client.endpoint.set(node_endpoint);
    let (control_tx, control_rx) = mpsc::channel(macula_dist_quic::CONTROL_QUEUE);
    {
        let mut state = client.lock();
        state.control.identified(relay_version);
        state.control_tx = Some(control_tx);
    }
    client.claim_waiting_sessions();
    for msg in early {
        client.on_control(msg);
    }
    client.tell(ClientEvent::Identified);
    client
        .rt
        .spawn(macula_dist_quic::write_control(send, control_rx));
    // Streams the relay opens carry stream tunnels: only in stream mode.
    if !client.wants_e2e {
        client
            .rt
            .spawn(accept_streams(client.clone(), conn.clone()));
    } else {
        client.rt.spawn(drop_probe_streams(conn.clone()));
    }
    client.rt.spawn(housekeeping(client.clone()));
    // Weak, and ended by the shutdown: the client itself holds the
    // channel's sender (in its session setup).
    let sessions = Arc::downgrade(&client);
    let shutdown = client.shutdown.clone();
    client.rt.spawn(async move {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = session_rx.recv() => event,
            };
            match (event, sessions.upgrade()) {
                (Some(event), Some(client)) => client.on_session(event),
                _ => return,
            }
        }
    });
    let why = tokio::select! {
        _ = client.shutdown.cancelled() => CloseReason::Stopped,
        why = read_control(&client, recv, decoder) => why,
    };
    conn.close(0u32.into(), b"client stopping");
    client.closed(why);
}

/// A relay connection just identified: its control stream, the relay's
/// version, and the messages that came in the same read as `id_ok`.
struct Connected {
    conn: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    node_endpoint: Arc<NodeEndpoint>,
    relay_version: u64,
    early: Vec<Message>,
}

async fn connect(
    client: &Client,
    opts: &ClientOptions,
    config: quinn::ClientConfig,
) -> Result<Connected, ConnectError> {
    let addr = tokio::net::lookup_host((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| ConnectError::Unreachable(format!("resolving {}: {e}", opts.host)))?
        .next()
        .ok_or_else(|| ConnectError::Unreachable(format!("{} has no address", opts.host)))?;
    // All of the node's clients connect from one endpoint: its sessions
    // outlive a relay connection, and move between relays, on its socket.
    let rt = client.rt.clone();
    let node_endpoint = client
        .node
        .endpoint(addr.is_ipv6(), || endpoint::bind(addr, &rt))
        .map_err(ConnectError::Unreachable)?;
    // An IP-literal URL is checked against the certificate's IP SANs (in
    // CA mode; a pin names one certificate whatever its names).
    let conn = node_endpoint
        .endpoint
        .connect_with(config, addr, opts.host.as_str())
        .map_err(|e| ConnectError::Unreachable(e.to_string()))?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let identify = Message::Identify {
        node: client.node.name().to_owned(),
        token: opts.token.clone(),
        version: Some(PROTOCOL_VERSION),
    };
    send.write_all(&identify.encode())
        .await
        .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
    let mut decoder = FrameDecoder::default();
    loop {
        let chunk = recv
            .read_chunk(64 * 1024, true)
            .await
            .map_err(|e| match e {
                quinn::ReadError::ConnectionLost(c) => ConnectError::from(c),
                other => ConnectError::Protocol(other.to_string()),
            })?
            .ok_or_else(|| ConnectError::Protocol("relay ended the control stream".into()))?;
        let mut input = &chunk.bytes[..];
        match decoder.decode(&mut input) {
            Ok(None) => continue,
            Ok(Some(Message::Identified { version })) => {
                let version = version.unwrap_or(1);
                // In e2e mode distribution never runs where the relay can
                // read it: a relay without e2e sessions is refused, not
                // fallen back from.
                if client.wants_e2e && version < 2 {
                    conn.close(0u32.into(), b"relay without e2e sessions");
                    return Err(ConnectError::Refused("relay_without_e2e".into()));
                }
                // What followed id_ok in the same read (a v4 relay's `cand`).
                let mut early = Vec::new();
                loop {
                    match decoder.decode(&mut input) {
                        Ok(Some(msg)) => early.push(msg),
                        Ok(None) => break,
                        Err(e) if e.is_fatal() => {
                            return Err(ConnectError::Protocol(e.to_string()))
                        }
                        Err(_) => {}
                    }
                }
                return Ok(Connected {
                    conn,
                    send,
                    recv,
                    decoder,
                    node_endpoint,
                    relay_version: version,
                    early,
                });
            }
            Ok(Some(Message::IdentifyRefused { reason })) => {
                return Err(ConnectError::Refused(reason))
            }
            Ok(Some(other)) => {
                return Err(ConnectError::Protocol(format!(
                    "expected id_ok, got {}",
                    other.type_name()
                )))
            }
            Err(e) => return Err(ConnectError::Protocol(e.to_string())),
        }
    }
}

/// Why the relay connection ended, from how its control stream ended.
fn close_reason(e: &quinn::ReadError) -> CloseReason {
    match e {
        quinn::ReadError::ConnectionLost(ConnectionError::ApplicationClosed(c))
            if c.error_code == close_code::REPLACED.into() =>
        {
            CloseReason::Replaced
        }
        other => CloseReason::Other(other.to_string()),
    }
}

/// Runs the control stream until it ends; returns why it ended.
async fn read_control(
    client: &Arc<Client>,
    mut recv: RecvStream,
    mut decoder: FrameDecoder,
) -> CloseReason {
    loop {
        let chunk = match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return CloseReason::Other("relay ended the control stream".into()),
            Err(e) => return close_reason(&e),
        };
        let mut input = &chunk.bytes[..];
        loop {
            match decoder.decode(&mut input) {
                Ok(None) => break,
                Ok(Some(msg)) => client.on_control(msg),
                Err(e) if e.is_fatal() => {
                    return CloseReason::Other(format!("bad control frame from the relay: {e}"))
                }
                Err(e) => client.log(Level::Warning, format!("ignored a control frame: {e}")),
            }
        }
    }
}

/// Streams the relay may have open on an e2e node's connection at once.
/// quinn makes room for every stream the peer may open when the connection
/// starts: the 4096 a stream-mode node allows took about 400 KiB a relay
/// connection, for streams an e2e node never reads.
const E2E_RELAY_STREAMS: u32 = 4;

/// The settings of this node's relay connection: in e2e mode the relay
/// opens streams only as liveness probes ([`drop_probe_streams`]).
fn relay_transport(opts: &ClientOptions) -> macula_dist_quic::Transport {
    let mut transport = opts.transport.clone();
    if opts.wants_e2e {
        transport.max_streams = transport.max_streams.min(E2E_RELAY_STREAMS);
    }
    transport
}

/// An e2e node's answer to the streams the relay opens: the relay opens
/// one (and resets it) only to see that the node still answers when its
/// name is claimed again. Each is taken and dropped at once, so that
/// probes never use up the few streams the node allows the relay.
async fn drop_probe_streams(conn: quinn::Connection) {
    while let Ok(stream) = conn.accept_bi().await {
        drop(stream);
    }
}

/// Accepts the relay's tunnel streams and reads their prefixes.
async fn accept_streams(client: Arc<Client>, conn: quinn::Connection) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let client = client.clone();
        let rt = client.rt.clone();
        rt.spawn(async move {
            if let Ok(Ok((tunnel, streams))) = timeout(PREFIX_WAIT, read_prefix(send, recv)).await {
                let matched = client
                    .lock()
                    .matcher
                    .on_stream(tunnel, streams, Instant::now());
                if let Some(m) = matched {
                    client.dispatch(m);
                }
            }
        });
    }
}

/// Gives up on halves that never met, and on inbound sessions that waited
/// too long.
async fn housekeeping(client: Arc<Client>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = client.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let expired = {
            let mut state = client.lock();
            let State {
                control,
                session_conns,
                matcher,
                ..
            } = &mut *state;
            let route = client.route.get();
            control.expire(now, |t| on_direct(route, session_conns, t));
            let expired = matcher.expire(now, MATCH_WAIT);
            client.act(state);
            expired
        };
        for m in expired {
            client.dispatch(m);
        }
    }
}

/// How often a lost peer is looked for on the node's other relays.
const PEER_LOOK_EVERY: Duration = Duration::from_millis(500);

/// The relay lost a relayed session's peer. While the session waits for
/// the peer's claim, the peer is looked for on the node's other relays
/// (a dead one leaves them all within their idle timeout); on none of
/// them, the session ends now rather than after the wait.
async fn look_for_peer(client: Arc<Client>, tunnel: TunnelId, peer: String) {
    while client.lock().control.is_peer_lost(&tunnel) {
        if !client.node.peer_elsewhere(client.as_ref(), &peer).await {
            let mut state = client.lock();
            state.control.peer_gone(&tunnel);
            client.act(state);
            return;
        }
        tokio::time::sleep(PEER_LOOK_EVERY).await;
    }
}

/// Whether a session of this client runs on a direct path now.
fn on_direct(
    route: Option<&SessionRoute>,
    conns: &HashMap<TunnelId, quinn::Connection>,
    tunnel: &TunnelId,
) -> bool {
    route
        .zip(conns.get(tunnel))
        .is_some_and(|(r, c)| r.socket.direct_of(&c.remote_address()).is_some())
}

/// Candidates worth probing: no unspecified, multicast, broadcast or
/// port-0 address, and loopback only when the relay itself is on loopback
/// (then the nodes share this host); at most [`MAX_CANDIDATES`], no repeats.
pub fn usable_candidates(addrs: Vec<SocketAddr>, relay_on_loopback: bool) -> Vec<SocketAddr> {
    use std::net::IpAddr;
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in addrs {
        let ip = a.ip();
        let bad = ip.is_unspecified()
            || ip.is_multicast()
            || a.port() == 0
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
            || matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
            || (ip.is_loopback() && !relay_on_loopback);
        if !bad && !out.contains(&a) && out.len() < MAX_CANDIDATES {
            out.push(a);
        }
    }
    out
}
