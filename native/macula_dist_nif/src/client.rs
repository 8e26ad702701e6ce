//! The relay client: one QUIC connection, its control stream run through
//! the proto crate's tunnel matcher, and the tunnels it hands out.
//!
//! Messages to the owner (the `macula_dist_relay_client` gen_server):
//! `{macula_client, identified}`, `{macula_client, {connect_failed, Reason}}`,
//! `{macula_client, {closed, Reason}}`, `{macula_client, {log, Level, Text}}`.
//! Tunnel answers go to the process that asked:
//! `{macula_tunnel_reply, Tag, {ok, ConnRef, Tunnel} | {error, Reason}}`.
//! Inbound tunnels go to the kernel: `{accept, AcceptPid, Tunnel, inet, macula}`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use macula_dist_node::identity::{Cluster, NodeIdentity};
use macula_dist_node::relay_trust::{self, Trust};
use macula_dist_quic::Transport;
use macula_relay_proto::node::matcher::{Matched, PrefixReader, RequestId, TunnelMatcher};
use macula_relay_proto::node::session_auth::MAX_CANDIDATES;
use macula_relay_proto::ratelimit::LogLimiter;
use macula_relay_proto::KEEP_WAIT;
use macula_relay_proto::{BindKey, FrameDecoder, Message, Mode, TunnelId, PROTOCOL_VERSION};
use quinn::{ConnectionError, RecvStream, SendStream};
use rustler::{Encoder, Env, LocalPid, Monitor, OwnedEnv, Resource, ResourceArc, Term};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::atoms;
use crate::keep::{self, SessionEntry};
use crate::runtime::{bind_endpoint, runtime, NodeEndpoint};
use crate::session::{self, Path};
use crate::tunnel::{self, Streams, TunnelRes};

/// Streams that wait for their `tun_ok`/`tun_notify`, at most.
const MAX_ORPHANS: usize = 256;
/// Inbound tunnels waiting for a kernel (`set_kernel`), at most.
const MAX_WAITING: usize = 64;
/// How long half a tunnel may wait for its other half, or for a kernel.
const MATCH_WAIT: Duration = Duration::from_secs(10);
/// How long a new stream may take to send its 32-byte prefix.
const PREFIX_WAIT: Duration = Duration::from_secs(10);

#[derive(rustler::NifMap)]
pub struct ConnectOpts {
    pub host: String,
    pub port: u16,
    pub node: String,
    /// Empty: no token.
    pub token: String,
    /// One of `pin`, `ca`, `insecure` decides the trust, in that order.
    pub pin_sha256: String,
    pub ca_cert: String,
    pub insecure: bool,
    pub connect_timeout: u64,
    pub tunnel_timeout: u64,
    pub idle_timeout: u64,
    pub keep_alive: u64,
    /// `"e2e"` (sessions end to end, when the relay offers them) or `"stream"`.
    pub mode: String,
    /// `"cubic"` or `"bbr"`: the congestion controller of this node's connections.
    pub congestion: String,
    /// The node's key at the relay and in e2e sessions: from this PEM file
    /// (which must exist), else from `default_key_file` (made there when
    /// missing), else one made for this run.
    pub key_file: String,
    pub default_key_file: String,
    /// Cluster-CA mode (all three, or none): the CA's PEM file, and this
    /// node's certificate (naming it `macula://NODE`) and key.
    pub cluster_ca: String,
    pub node_cert: String,
    pub node_key: String,
    /// Look for direct paths for e2e sessions.
    pub direct: bool,
    /// Addresses (`ip:port`, comma-separated) to offer as direct-path
    /// candidates besides the local ones (a port forward's, say).
    pub advertise: String,
}

struct Request {
    caller: LocalPid,
    tag: u64,
    /// For an e2e session: the cookie for the target, and the target.
    e2e: Option<(Vec<u8>, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Connected,
    Closed,
}

struct State {
    phase: Phase,
    matcher: TunnelMatcher<Request, Streams>,
    /// (kernel, accept pid) from `set_kernel`.
    kernel: Option<(LocalPid, LocalPid)>,
    waiting: VecDeque<(ResourceArc<TunnelRes>, Instant)>,
    control: Option<mpsc::Sender<Message>>,
    /// Inbound e2e sessions waiting for the cookie of their source, by tag.
    cookie_waits: HashMap<u64, (TunnelId, String, BindKey, Instant)>,
    next_cookie_tag: u64,
    /// Live e2e sessions (connection, bind key, peer): they run through this client's
    /// relay, and end with it.
    sessions: HashMap<TunnelId, SessionEntry>,
    /// Callers waiting for `nodes_ok`, oldest first (answered in order).
    nodes_waiters: VecDeque<(LocalPid, u64)>,
    /// The relay's protocol version (from `id_ok`).
    relay_version: u64,
    /// This node's address as its relay sees it (`cand` from a v4 relay).
    reflexive: Option<std::net::SocketAddr>,
    /// Inbound e2e sessions announced and not up yet (waiting for the
    /// cookie, their first datagram or their handshake): capped in all
    /// and per source, since any token holder can announce them.
    inbound_pending: HashMap<TunnelId, PendingInbound>,
}

struct PendingInbound {
    source: String,
    /// Its virtual address, once routed.
    vaddr: Option<std::net::SocketAddr>,
    at: Instant,
}

/// Inbound sessions not up yet, at most, in all and from one source.
const MAX_PENDING_INBOUND: usize = 256;
const MAX_PENDING_PER_SOURCE: usize = 16;
/// An inbound session not up after this long is no longer counted (its
/// own timers have ended it by then).
const PENDING_INBOUND_FOR: Duration = Duration::from_secs(25);

/// Log lines relays and peers can cause: at most this many per window.
const PEER_LOG_BURST: u32 = 10;
const PEER_LOG_WINDOW: Duration = Duration::from_secs(10);

pub struct Client {
    owner: LocalPid,
    node: String,
    tunnel_timeout: Duration,
    /// Asked for e2e sessions (`mode`); they run once the relay offers them.
    wants_e2e: bool,
    /// Looks for direct paths (`direct`), offering these addresses too.
    direct: bool,
    advertise: Vec<std::net::SocketAddr>,
    /// The key this node shows the relay (SHA-256 of its public key).
    key_id: Option<[u8; 32]>,
    /// The node's key, shown in its e2e sessions too (cookie mode).
    pub key: Arc<NodeIdentity>,
    /// Cluster-CA mode: sessions use this identity, not cookie keys.
    pub cluster: Option<Arc<Cluster>>,
    state: Mutex<State>,
    conn: OnceLock<quinn::Connection>,
    /// This node's endpoint (its one UDP socket), once connected.
    endpoint: OnceLock<Arc<NodeEndpoint>>,
    /// Set once connected to a relay that offers e2e sessions.
    path: OnceLock<Path>,
    /// Cookie mode: the TLS configuration of every inbound session.
    server_config: OnceLock<Arc<quinn::ServerConfig>>,
    open_tunnels: Arc<AtomicUsize>,
    refused_sessions: AtomicU64,
    /// Limits the log lines relays and peers can cause.
    peer_log: Mutex<LogLimiter>,
    shutdown: CancellationToken,
}

/// The handle the gen_server holds; when it goes, the client stops.
pub struct ClientRes(pub Arc<Client>);

// rustler returns resources through catch_unwind. The client's quinn
// endpoint is not RefUnwindSafe, but no NIF call leaves it half-changed:
// its state is behind locks that recover from poisoning.
impl std::panic::RefUnwindSafe for ClientRes {}

/// The `ConnRef` handed out with tunnels: names the client, owns nothing.
pub struct ConnRef {
    _client: Arc<Client>,
}

#[rustler::resource_impl]
impl Resource for ClientRes {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: Monitor) {
        self.0.stop();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        crate::LIVE_CLIENTS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for ClientRes {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[rustler::resource_impl]
impl Resource for ConnRef {}

/// Why a connection attempt failed, for `{error, Reason}`.
enum ConnectError {
    Unreachable(String),
    Tls(String),
    Refused(String),
    Protocol(String),
    Timeout,
}

impl ConnectError {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match self {
            ConnectError::Unreachable(s) => (atoms::unreachable(), s.as_str()).encode(env),
            ConnectError::Tls(s) => (atoms::tls(), s.as_str()).encode(env),
            ConnectError::Refused(s) => (atoms::refused(), reason_term(env, s)).encode(env),
            ConnectError::Protocol(s) => (atoms::protocol_error(), s.as_str()).encode(env),
            ConnectError::Timeout => atoms::timeout().encode(env),
        }
    }
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

/// Relay reasons this project knows become atoms; others stay binaries
/// (atoms are never made from what a peer sends).
pub fn reason_term<'a>(env: Env<'a>, reason: &str) -> Term<'a> {
    match atoms::relay_reason(reason) {
        Some(atom) => atom.encode(env),
        None => reason.encode(env),
    }
}

/// Cluster-CA mode's files, read here (not by Erlang's file server).
fn cluster(opts: &ConnectOpts) -> Result<Option<Cluster>, String> {
    let files = [&opts.cluster_ca, &opts.node_cert, &opts.node_key];
    match files.iter().filter(|f| !f.is_empty()).count() {
        0 => Ok(None),
        3 => Cluster::from_pem_files(
            opts.cluster_ca.as_ref(),
            opts.node_cert.as_ref(),
            opts.node_key.as_ref(),
        )
        .map(Some)
        .map_err(|e| format!("cluster CA mode: {e:#}")),
        _ => Err("cluster CA mode needs all of cluster_ca, node_cert and node_key".into()),
    }
}

/// The key made for this run when there is no place to keep one: all of
/// the node's clients (one per relay) show it.
static RUN_KEY: Mutex<Option<Arc<NodeIdentity>>> = Mutex::new(None);

/// The node's own key: kept in `file` (made there on first use), or, with
/// no file, one made for this run.
fn own_key(file: &str) -> Result<Arc<NodeIdentity>, String> {
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

/// Starts connecting; the owner hears `identified` or `connect_failed`.
pub fn start(owner: LocalPid, opts: ConnectOpts) -> Result<Arc<Client>, String> {
    let trust = if !opts.pin_sha256.is_empty() {
        Trust::Pin(opts.pin_sha256.clone())
    } else if !opts.ca_cert.is_empty() {
        Trust::CaFile(opts.ca_cert.clone().into())
    } else if opts.insecure {
        Trust::Insecure
    } else {
        return Err("no relay trust given: set pin_sha256, ca_cert, or verify => none".into());
    };
    let transport = Transport {
        idle_timeout: Duration::from_millis(opts.idle_timeout),
        keep_alive: Duration::from_millis(opts.keep_alive),
        congestion: opts.congestion.parse().map_err(|e| format!("{e:#}"))?,
        ..Transport::default()
    };
    let cluster = cluster(&opts)?.map(Arc::new);
    // The node's key: key_file, else the cluster certificate's, else its
    // own kept key. Never a function of the cookie: the relay and every
    // token holder see it.
    let key = if !opts.key_file.is_empty() {
        Arc::new(NodeIdentity::from_pem_file(opts.key_file.as_ref()).map_err(|e| format!("{e:#}"))?)
    } else if let Some(cluster) = &cluster {
        cluster.me.clone()
    } else {
        own_key(&opts.default_key_file)?
    };
    let config = relay_trust::client_config_with_key(&trust, &transport, Some(&key))
        .map_err(|e| format!("{e:#}"))?;
    let key_id = Some(key.key_id());
    let wants_e2e = match opts.mode.as_str() {
        "e2e" => true,
        "stream" => false,
        other => return Err(format!("unknown tunnel mode {other:?}")),
    };
    if cluster.is_some() && !wants_e2e {
        return Err("cluster CA mode needs e2e sessions (tunnel e2e)".into());
    }
    let advertise = opts
        .advertise
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse()
                .map_err(|_| format!("advertise: {a:?} is not an ip:port address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    crate::LIVE_CLIENTS.fetch_add(1, Ordering::Relaxed);
    let client = Arc::new(Client {
        owner,
        node: opts.node.clone(),
        tunnel_timeout: Duration::from_millis(opts.tunnel_timeout),
        wants_e2e,
        direct: opts.direct,
        advertise,
        key_id,
        key,
        cluster,
        state: Mutex::new(State {
            phase: Phase::Connecting,
            matcher: TunnelMatcher::new(MAX_ORPHANS),
            kernel: None,
            waiting: VecDeque::new(),
            control: None,
            cookie_waits: HashMap::new(),
            next_cookie_tag: 0,
            sessions: HashMap::new(),
            nodes_waiters: VecDeque::new(),
            relay_version: 0,
            reflexive: None,
            inbound_pending: HashMap::new(),
        }),
        conn: OnceLock::new(),
        endpoint: OnceLock::new(),
        path: OnceLock::new(),
        server_config: OnceLock::new(),
        open_tunnels: Arc::new(AtomicUsize::new(0)),
        refused_sessions: AtomicU64::new(0),
        peer_log: Mutex::new(LogLimiter::new(PEER_LOG_BURST, PEER_LOG_WINDOW)),
        shutdown: CancellationToken::new(),
    });
    keep::join(&opts.node, &client);
    runtime().spawn(run(client.clone(), opts, config, transport));
    Ok(client)
}

async fn run(
    client: Arc<Client>,
    opts: ConnectOpts,
    config: quinn::ClientConfig,
    transport: Transport,
) {
    let connect_timeout = Duration::from_millis(opts.connect_timeout);
    let connected = tokio::select! {
        _ = client.shutdown.cancelled() => return,
        r = timeout(connect_timeout, connect(&client, &opts, config)) => r.unwrap_or(Err(ConnectError::Timeout)),
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
            client.lock().phase = Phase::Closed;
            client.tell_owner(|env| (atoms::connect_failed(), e.encode(env)).encode(env));
            return;
        }
    };
    let _ = client.conn.set(conn.clone());
    if client.wants_e2e {
        let _ = client.path.set(Path {
            endpoint: node_endpoint.endpoint.clone(),
            socket: node_endpoint.socket.clone(),
            inbound: node_endpoint.inbound.clone(),
            relay: conn.remote_address(),
            transport,
        });
    }
    let _ = client.endpoint.set(node_endpoint);
    let (control_tx, control_rx) = mpsc::channel(macula_dist_quic::CONTROL_QUEUE);
    {
        let mut state = client.lock();
        state.phase = Phase::Connected;
        state.control = Some(control_tx);
        state.relay_version = relay_version;
    }
    client.claim_kept_sessions();
    for msg in early {
        if let Some(m) = client.on_control(msg) {
            client.dispatch(m);
        }
    }
    client.tell_owner(|env| atoms::identified().encode(env));
    let rt = runtime();
    rt.spawn(macula_dist_quic::write_control(send, control_rx));
    // Streams the relay opens carry stream tunnels: only in stream mode.
    if !client.wants_e2e {
        rt.spawn(accept_streams(client.clone(), conn.clone()));
    }
    rt.spawn(housekeeping(client.clone()));
    let why = tokio::select! {
        _ = client.shutdown.cancelled() => "stopped".to_string(),
        why = read_control(&client, recv, decoder) => why,
    };
    conn.close(0u32.into(), b"client stopping");
    client.closed(&why);
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
    opts: &ConnectOpts,
    config: quinn::ClientConfig,
) -> Result<Connected, ConnectError> {
    let addr = tokio::net::lookup_host((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| ConnectError::Unreachable(format!("resolving {}: {e}", opts.host)))?
        .next()
        .ok_or_else(|| ConnectError::Unreachable(format!("{} has no address", opts.host)))?;
    // All of the node's clients connect from one endpoint: its sessions
    // outlive a relay connection, and move between relays, on its socket.
    let node_endpoint = keep::endpoint(&client.node, addr.is_ipv6(), || bind_endpoint(addr))
        .map_err(ConnectError::Unreachable)?;
    let endpoint = &node_endpoint.endpoint;
    // An IP-literal URL is checked against the certificate's IP SANs (in
    // CA mode; a pin names one certificate whatever its names).
    let server_name = opts.host.as_str();
    let conn = endpoint
        .connect_with(config, addr, server_name)
        .map_err(|e| ConnectError::Unreachable(e.to_string()))?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let identify = Message::Identify {
        node: client.node.clone(),
        token: (!opts.token.is_empty()).then(|| opts.token.clone()),
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

/// Runs the control stream until it ends; returns why it ended.
async fn read_control(
    client: &Arc<Client>,
    mut recv: RecvStream,
    mut decoder: FrameDecoder,
) -> String {
    loop {
        let chunk = match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return "relay ended the control stream".into(),
            Err(quinn::ReadError::ConnectionLost(e)) => return e.to_string(),
            Err(e) => return e.to_string(),
        };
        let mut input = &chunk.bytes[..];
        loop {
            let matched = match decoder.decode(&mut input) {
                Ok(None) => break,
                Ok(Some(msg)) => client.on_control(msg),
                Err(e) if e.is_fatal() => return format!("bad control frame from the relay: {e}"),
                Err(e) => {
                    client.log(atoms::warning(), format!("ignored a control frame: {e}"));
                    None
                }
            };
            if let Some(m) = matched {
                client.dispatch(m);
            }
        }
    }
}

/// Accepts the relay's tunnel streams and reads their prefixes.
async fn accept_streams(client: Arc<Client>, conn: quinn::Connection) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let client = client.clone();
        runtime().spawn(async move {
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

pub(crate) async fn read_prefix(
    send: SendStream,
    mut recv: RecvStream,
) -> anyhow::Result<(TunnelId, Streams)> {
    let mut prefix = PrefixReader::default();
    loop {
        let chunk = recv
            .read_chunk(64 * 1024, true)
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended inside its prefix"))?;
        if let Some((tunnel, rest)) = prefix.feed(&chunk.bytes)? {
            let early = chunk.bytes.slice(chunk.bytes.len() - rest.len()..);
            return Ok((
                tunnel,
                Streams {
                    send,
                    recv,
                    early,
                    conn: None,
                    socket: None,
                },
            ));
        }
    }
}

/// Gives up on halves that never met, and on inbound tunnels no kernel took.
async fn housekeeping(client: Arc<Client>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = client.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let (expired, stale) = {
            let mut state = client.lock();
            let expired = state.matcher.expire(now, MATCH_WAIT);
            state
                .cookie_waits
                .retain(|_, (_, _, _, at)| now.duration_since(*at) < MATCH_WAIT);
            state
                .inbound_pending
                .retain(|_, p| now.duration_since(p.at) < PENDING_INBOUND_FOR);
            let mut stale = vec![];
            while let Some((_, at)) = state.waiting.front() {
                if now.duration_since(*at) < MATCH_WAIT {
                    break;
                }
                stale.extend(state.waiting.pop_front().map(|(t, _)| t));
            }
            (expired, stale)
        };
        for m in expired {
            client.dispatch(m);
        }
        for t in stale {
            client.log(
                atoms::warning(),
                format!(
                    "closed inbound tunnel {} from {}: no kernel took it",
                    t.0.id, t.0.peer
                ),
            );
            // An e2e session tells the relay itself once its connection
            // has closed (see session::watch).
            if t.0.mode == Mode::Stream {
                client.discard(t.0.id);
            }
            t.0.close(false);
        }
    }
}

impl Client {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tell_owner(&self, event: impl for<'a> FnOnce(Env<'a>) -> Term<'a>) {
        let _ = OwnedEnv::new().send_and_clear(&self.owner, |env| {
            (atoms::macula_client(), event(env)).encode(env)
        });
    }

    pub fn log(&self, level: rustler::Atom, text: String) {
        self.tell_owner(|env| (atoms::log(), level, text).encode(env));
    }

    /// A line that a relay or peer can cause at will: rate-limited, so they
    /// cannot fill the node's log or its client's mailbox.
    pub fn log_peer_caused(&self, level: rustler::Atom, text: String) {
        let allowed = self
            .peer_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(Instant::now());
        match allowed {
            Some(0) => self.log(level, text),
            Some(held) => self.log(level, format!("{text} ({held} similar lines held back)")),
            None => {}
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn count_refused_session(&self) {
        self.refused_sessions.fetch_add(1, Ordering::Relaxed);
    }

    fn on_control(self: &Arc<Self>, msg: Message) -> Option<Matched<Request, Streams>> {
        let now = Instant::now();
        let mut state = self.lock();
        match msg {
            Message::TunnelOk { tunnel, bind: None } if self.wants_e2e => {
                // Asked for an e2e session, offered a stream the relay
                // can read: refused.
                state.matcher.on_tunnel_ok(tunnel, now);
                let failed = state.matcher.fail(&tunnel, "downgrade_refused".into());
                drop(state);
                self.refuse_downgrade(
                    tunnel,
                    "a stream tunnel instead of the e2e session asked for",
                );
                failed
            }
            Message::TunnelOk { tunnel, bind: None } => state.matcher.on_tunnel_ok(tunnel, now),
            Message::TunnelOk {
                tunnel,
                bind: Some(bind),
            } => {
                let e2e = state.matcher.front().and_then(|r| r.e2e.clone());
                let matched = state.matcher.on_tunnel_ok(tunnel, now);
                drop(state);
                match (e2e, self.path.get()) {
                    (Some((cookie, target)), Some(path)) => {
                        session::connect(self, path.clone(), tunnel, bind, cookie, target)
                    }
                    // Abandoned meanwhile (or not asked as e2e): never used.
                    _ => self.discard(tunnel),
                }
                matched
            }
            Message::TunnelError { reason } => state.matcher.on_tunnel_error(reason),
            Message::Nodes { nodes } => {
                if let Some((caller, tag)) = state.nodes_waiters.pop_front() {
                    drop(state);
                    let _ = OwnedEnv::new().send_and_clear(&caller, |env| {
                        (atoms::macula_nodes_reply(), tag, (atoms::ok(), nodes)).encode(env)
                    });
                }
                None
            }
            Message::TunnelNotify {
                tunnel,
                source: _,
                bind: None,
            } if self.wants_e2e => {
                drop(state);
                self.refuse_downgrade(tunnel, "an inbound stream tunnel");
                None
            }
            Message::TunnelNotify {
                tunnel,
                source,
                bind: None,
            } => state.matcher.on_tunnel_notify(tunnel, source, now),
            Message::TunnelNotify {
                tunnel,
                source,
                bind: Some(bind),
            } => {
                if self.path.get().is_none() {
                    drop(state);
                    self.discard(tunnel);
                    return None;
                }
                let from_source = state
                    .inbound_pending
                    .values()
                    .filter(|p| p.source == source)
                    .count();
                if state.inbound_pending.len() >= MAX_PENDING_INBOUND
                    || from_source >= MAX_PENDING_PER_SOURCE
                {
                    drop(state);
                    self.count_refused_session();
                    self.log_peer_caused(
                        atoms::warning(),
                        format!("refused e2e session {tunnel} from {source}: too many sessions waiting to start"),
                    );
                    self.discard(tunnel);
                    return None;
                }
                state.inbound_pending.insert(
                    tunnel,
                    PendingInbound {
                        source: source.clone(),
                        vaddr: None,
                        at: now,
                    },
                );
                // The session's PAKE needs the cookie for `source`, which
                // Erlang knows: ask the owner for it.
                state.next_cookie_tag += 1;
                let tag = state.next_cookie_tag;
                state
                    .cookie_waits
                    .insert(tag, (tunnel, source.clone(), bind, now));
                let matched = state.matcher.on_tunnel_notify(tunnel, source.clone(), now);
                drop(state);
                self.tell_owner(|env| (atoms::cookie(), source.as_str(), tag).encode(env));
                matched
            }
            Message::TunnelClose { tunnel } if state.inbound_pending.contains_key(&tunnel) => {
                // An announced session that will not come: freed now.
                let pending = state.inbound_pending.remove(&tunnel);
                state.cookie_waits.retain(|_, (t, ..)| *t != tunnel);
                state.matcher.forget_inbound(&tunnel);
                drop(state);
                if let (Some(vaddr), Some(path)) = (pending.and_then(|p| p.vaddr), self.path.get())
                {
                    if path.inbound.forget(&vaddr).is_some() {
                        path.socket.remove_session(&vaddr);
                    }
                }
                None
            }
            Message::TunnelClose { tunnel } => {
                // The session's peer left the relay: it died or was cut
                // off. Its connection ends now, not at the idle timeout.
                // Unless this client has just claimed it back: then the
                // relay is closing what the peer's old relay connection
                // held, and the peer is claiming it back too. Or unless
                // the session is on a direct path that still answers: it
                // ends when that path does (see session_path).
                let direct = self.path.get().and_then(|p| {
                    let s = state.sessions.get(&tunnel)?;
                    p.socket.direct_of(&s.conn.remote_address())
                });
                let s = state.sessions.get_mut(&tunnel)?;
                s.peer_left = true;
                let s = s.clone();
                drop(state);
                match (s.claimed_at, direct, self.path.get()) {
                    (Some(t), _, _) if t.elapsed() < KEEP_WAIT => {}
                    // Ask the direct path now: a dead peer stops answering.
                    (_, Some(_), Some(p)) => p.socket.check_direct(&s.conn.remote_address()),
                    _ => s.conn.close(0u32.into(), b"peer left the relay"),
                }
                None
            }
            // The relay's view of this node's address: offered to peers,
            // inside sessions, as a direct-path candidate.
            Message::Candidates {
                tunnel: None,
                addrs,
            } => {
                state.reflexive = addrs.first().copied();
                None
            }
            // A relay of v3 sends its view of the peer's candidates: not
            // taken (candidates come only from the authenticated peer).
            Message::Candidates { .. } => None,
            Message::ProtocolError { reason } => {
                drop(state);
                self.log(
                    atoms::warning(),
                    format!("the relay reported a protocol error: {reason}"),
                );
                None
            }
            other => {
                drop(state);
                self.log(
                    atoms::warning(),
                    format!("unexpected {} from the relay", other.type_name()),
                );
                None
            }
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
                let res = tunnel::start(
                    tunnel,
                    String::new(),
                    true,
                    stream,
                    Some(request.caller),
                    self.open_tunnels.clone(),
                );
                let conn = ResourceArc::new(ConnRef {
                    _client: self.clone(),
                });
                reply(&request, |env| (atoms::ok(), conn, res).encode(env));
            }
            Matched::Inbound {
                source,
                tunnel,
                stream,
            } => {
                let res = tunnel::start(
                    tunnel,
                    source,
                    false,
                    stream,
                    None,
                    self.open_tunnels.clone(),
                );
                let mut state = self.lock();
                match state.kernel {
                    Some((kernel, acceptor)) => offer(kernel, acceptor, res),
                    None if state.waiting.len() < MAX_WAITING => {
                        state.waiting.push_back((res, Instant::now()))
                    }
                    None => {
                        drop(state);
                        self.log(atoms::warning(), format!("closed inbound tunnel {tunnel}: no kernel and {MAX_WAITING} already waiting"));
                        res.0.close(false);
                        self.discard(tunnel);
                    }
                }
            }
            Matched::Failed { request, reason } => {
                reply(&request, |env| {
                    (
                        atoms::error(),
                        (atoms::tunnel_error(), reason_term(env, &reason)),
                    )
                        .encode(env)
                });
            }
            Matched::Discard { tunnel, stream } => {
                if let Some(s) = stream {
                    s.discard();
                }
                self.discard(tunnel);
            }
        }
    }

    /// The owner's answer to a cookie request: ready the inbound session.
    pub fn cookie(self: &Arc<Self>, tag: u64, cookie: &[u8]) {
        let Some((tunnel, source, bind, _)) = self.lock().cookie_waits.remove(&tag) else {
            return;
        };
        let Some(path) = self.path.get().cloned() else {
            return;
        };
        if !self.lock().inbound_pending.contains_key(&tunnel) {
            return;
        }
        let vaddr = session::expect(self, path, tunnel, source, bind, cookie);
        if let Some(p) = self.lock().inbound_pending.get_mut(&tunnel) {
            p.vaddr = Some(vaddr);
        }
    }

    /// An inbound session is up, or failed, or never came.
    pub fn inbound_done(&self, tunnel: &TunnelId) {
        self.lock().inbound_pending.remove(tunnel);
    }

    /// An e2e session's connection is up and its stream open.
    pub fn session_stream(self: &Arc<Self>, tunnel: TunnelId, streams: Streams) {
        let matched = self
            .lock()
            .matcher
            .on_stream(tunnel, streams, Instant::now());
        if let Some(m) = matched {
            self.dispatch(m);
        }
    }

    /// Tracks a live session; `false` if the client is closed (the caller
    /// then closes it).
    pub fn track_session(
        &self,
        tunnel: TunnelId,
        conn: &quinn::Connection,
        bind: BindKey,
        peer: &str,
        requester: bool,
        peer_candidates: &[std::net::SocketAddr],
    ) -> bool {
        {
            let mut state = self.lock();
            if state.phase == Phase::Closed {
                return false;
            }
            let entry = SessionEntry {
                conn: conn.clone(),
                bind,
                peer: peer.to_owned(),
                claimed_at: None,
                requester,
                peer_left: false,
            };
            state.sessions.insert(tunnel, entry);
        }
        self.start_direct(tunnel, peer_candidates);
        true
    }

    /// Where this node may be reached, for its peers' direct paths: the
    /// address its relay sees, its local addresses on its socket's port,
    /// and `advertise`. Sent only inside authenticated sessions.
    pub fn local_candidates(&self) -> Vec<std::net::SocketAddr> {
        let (true, Some(path)) = (self.direct, self.path.get()) else {
            return Vec::new();
        };
        let Ok(local) = quinn::AsyncUdpSocket::local_addr(path.socket.as_ref()) else {
            return Vec::new();
        };
        // A relay on loopback serves nodes on this host: the address it sees
        // is the one to use, and no other interface is probed.
        let relay_on_loopback = path.relay.ip().is_loopback();
        let interfaces = match relay_on_loopback {
            true => vec![],
            false => if_addrs::get_if_addrs().unwrap_or_default(),
        };
        let mut addrs: Vec<std::net::SocketAddr> = self.lock().reflexive.into_iter().collect();
        addrs.extend(
            interfaces
                .into_iter()
                .map(|i| std::net::SocketAddr::new(i.ip(), local.port()))
                .filter(|a| a.is_ipv4() == local.is_ipv4()),
        );
        addrs.extend(self.advertise.iter().copied());
        usable_candidates(addrs, relay_on_loopback)
    }

    /// Starts looking for a direct path for a session just up, at the
    /// candidates its peer sent inside it.
    fn start_direct(&self, tunnel: TunnelId, peer_candidates: &[std::net::SocketAddr]) {
        let (Some(path), true) = (self.path.get(), self.direct) else {
            return;
        };
        let Some(entry) = self.lock().sessions.get(&tunnel).cloned() else {
            return;
        };
        let addrs = usable_candidates(peer_candidates.to_vec(), path.relay.ip().is_loopback());
        if addrs.is_empty() {
            return;
        }
        // A secret only the two nodes have: exported from their session's
        // TLS, bound to the session.
        let mut secret = [0u8; 32];
        if entry
            .conn
            .export_keying_material(&mut secret, b"macula direct path v1", tunnel.as_bytes())
            .is_err()
        {
            return;
        }
        let vaddr = entry.conn.remote_address();
        let node = self.node.clone();
        let on_path: macula_dist_node::node_socket::OnPath = Arc::new(move |event| {
            keep::session_path(&node, &tunnel, event);
        });
        if path
            .socket
            .start_direct(vaddr, &secret, entry.requester, on_path)
        {
            path.socket.add_candidates(&vaddr, &addrs);
        }
    }

    /// The TLS configuration that accepts a session from `source`: one for
    /// all in cookie mode (any key; the PAKE follows), one per source in
    /// cluster-CA mode (its certificate must name it).
    pub fn server_config(
        &self,
        source: &str,
        transport: &Transport,
    ) -> anyhow::Result<Arc<quinn::ServerConfig>> {
        use macula_dist_node::identity::{server_config, PeerCheck};
        match &self.cluster {
            Some(cluster) => Ok(Arc::new(server_config(
                &cluster.me,
                cluster.check_of(source),
                transport,
            )?)),
            None => {
                if let Some(config) = self.server_config.get() {
                    return Ok(config.clone());
                }
                let config = Arc::new(server_config(&self.key, PeerCheck::AnyKey, transport)?);
                Ok(self.server_config.get_or_init(|| config).clone())
            }
        }
    }

    /// A session's path changed: the relay counts it, the owner logs it.
    pub fn session_path(&self, tunnel: &TunnelId, event: macula_relay_proto::node::direct::Event) {
        use macula_relay_proto::node::direct::Event;
        let Some(session) = self.lock().sessions.get(tunnel).cloned() else {
            return;
        };
        let peer = session.peer;
        // The peer left the relay, and now its direct path is silent too.
        if event == Event::Relay && session.peer_left {
            session
                .conn
                .close(0u32.into(), b"peer left the relay and the direct path");
        }
        if self.lock().relay_version >= macula_relay_proto::DIRECT_VERSION {
            self.send_control(Message::SessionPath {
                tunnel: *tunnel,
                direct: matches!(event, Event::Direct(_)),
            });
        }
        let text = match event {
            Event::Direct(addr) => format!("e2e session with {peer} went direct, to {addr}"),
            Event::Relay => {
                format!("e2e session with {peer}: direct path lost, back through the relay")
            }
        };
        self.log(atoms::info(), text);
    }

    pub fn holds_session(&self, tunnel: &TunnelId) -> bool {
        self.lock().sessions.contains_key(tunnel)
    }

    /// Sessions that waited for a client of this node (its relays were
    /// all lost): claim them at this one's relay.
    fn claim_kept_sessions(self: &Arc<Self>) {
        let kept = keep::take(&self.node);
        if kept.is_empty() {
            return;
        }
        if let Err(unclaimed) = self.adopt(kept) {
            for (_, s) in unclaimed {
                s.conn.close(0u32.into(), b"relay without e2e sessions");
            }
        }
    }

    /// Takes sessions another relay connection of this node carried: each
    /// is claimed at this client's relay (`sess_keep`) and routed there.
    /// Gives them back if this client cannot carry e2e sessions now.
    pub fn adopt(&self, sessions: keep::Sessions) -> Result<(), keep::Sessions> {
        let mut state = self.lock();
        let (Some(tx), Some(path), Phase::Connected) =
            (state.control.clone(), self.path.get(), state.phase)
        else {
            return Err(sessions);
        };
        let now = Instant::now();
        for (tunnel, mut s) in sessions {
            let claim = Message::SessionKeep {
                tunnel,
                bind: s.bind,
                peer: s.peer.clone(),
            };
            if tx.try_send(claim).is_err() {
                s.conn.close(0u32.into(), b"relay control queue full");
                continue;
            }
            path.socket.reroute(&s.conn.remote_address(), path.relay);
            s.claimed_at = Some(now);
            state.sessions.insert(tunnel, s);
        }
        Ok(())
    }

    /// Forgets a session; true if this client held it.
    pub fn untrack_session(&self, tunnel: &TunnelId) -> bool {
        self.lock().sessions.remove(tunnel).is_some()
    }

    pub fn is_connected(&self) -> bool {
        self.lock().phase == Phase::Connected
    }

    /// An outbound e2e session could not be made.
    pub fn session_failed(self: &Arc<Self>, tunnel: TunnelId, reason: &str) {
        let matched = self.lock().matcher.fail(&tunnel, reason.into());
        if let Some(m) = matched {
            self.dispatch(m);
        }
        self.discard(tunnel);
    }

    /// A stream tunnel offered to a node in e2e mode: the relay could read
    /// and write it, so no byte of it reaches Erlang.
    fn refuse_downgrade(&self, tunnel: TunnelId, what: &str) {
        self.count_refused_session();
        self.log_peer_caused(
            atoms::warning(),
            format!("refused {what} (tunnel {tunnel}): this node is in e2e mode, and a stream tunnel is readable by the relay"),
        );
        self.discard(tunnel);
    }

    /// Tells the relay we will not use this tunnel.
    pub fn discard(&self, tunnel: TunnelId) {
        self.send_control(Message::TunnelClose { tunnel });
    }

    fn send_control(&self, msg: Message) -> bool {
        match &self.lock().control {
            Some(tx) => tx.try_send(msg).is_ok(),
            None => false,
        }
    }

    /// Asks for a tunnel; the answer goes to `caller` tagged `tag`.
    /// With a cookie, and a relay that offers them, an e2e session.
    pub fn request_tunnel(
        self: &Arc<Self>,
        target: String,
        caller: LocalPid,
        tag: u64,
        cookie: Option<Vec<u8>>,
    ) -> Result<(), rustler::Atom> {
        // e2e mode asks for e2e sessions only (no cookie: an empty one,
        // which no peer with a cookie accepts).
        let e2e = self
            .wants_e2e
            .then(|| (cookie.unwrap_or_default(), target.clone()));
        let mode = if e2e.is_some() {
            Mode::E2e
        } else {
            Mode::Stream
        };
        let id: RequestId = {
            let mut state = self.lock();
            if state.phase != Phase::Connected {
                return Err(atoms::not_connected());
            }
            let Some(tx) = state.control.clone() else {
                return Err(atoms::not_connected());
            };
            // Pushed and sent under one lock, so the FIFO matches the wire.
            let id = state.matcher.request(Request { caller, tag, e2e });
            if tx
                .try_send(Message::TunnelRequest { target, mode })
                .is_err()
            {
                state.matcher.abandon(id);
                return Err(atoms::not_connected());
            }
            id
        };
        // Weak: a stopped client is not kept alive by its pending timers.
        let client = Arc::downgrade(self);
        let wait = self.tunnel_timeout;
        runtime().spawn(async move {
            tokio::time::sleep(wait).await;
            let Some(client) = client.upgrade() else {
                return;
            };
            let abandoned = client.lock().matcher.abandon(id);
            if let Some(request) = abandoned {
                reply(&request, |env| {
                    (atoms::error(), atoms::timeout()).encode(env)
                });
            }
        });
        Ok(())
    }

    /// Closes a tunnel by id. An e2e session's connection is closed (the
    /// peer hears it end to end, and the relay is told once it has drained);
    /// a stream tunnel is closed at the relay.
    /// Asks the relay which nodes this node may reach there; the caller
    /// hears `{macula_nodes_reply, Tag, {ok, [Name]}}`.
    pub fn request_nodes(&self, caller: LocalPid, tag: u64) -> Result<(), rustler::Atom> {
        let mut state = self.lock();
        if state.relay_version < 2 {
            return Err(atoms::unsupported());
        }
        let Some(tx) = state.control.clone() else {
            return Err(atoms::not_connected());
        };
        // Queued and sent under one lock, so the FIFO matches the wire.
        if tx.try_send(Message::NodesRequest).is_err() {
            return Err(atoms::not_connected());
        }
        state.nodes_waiters.push_back((caller, tag));
        Ok(())
    }

    pub fn close_tunnel(&self, tunnel: TunnelId) -> bool {
        let session = self.lock().sessions.get(&tunnel).map(|s| s.conn.clone());
        match session {
            Some(conn) => {
                conn.close(0u32.into(), b"tunnel closed");
                true
            }
            None => self.send_control(Message::TunnelClose { tunnel }),
        }
    }

    /// Inbound tunnels go to `kernel` from now on, with `acceptor` as AcceptPid.
    pub fn set_kernel(&self, kernel: LocalPid, acceptor: LocalPid) {
        let waiting: Vec<_> = {
            let mut state = self.lock();
            state.kernel = Some((kernel, acceptor));
            state.waiting.drain(..).map(|(t, _)| t).collect()
        };
        // Sent from the runtime: an OwnedEnv cannot send from a scheduler thread.
        runtime().spawn(async move {
            for t in waiting {
                offer(kernel, acceptor, t);
            }
        });
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
        if let Some(conn) = self.conn.get() {
            conn.close(0u32.into(), b"client stopping");
        }
    }

    /// The relay connection is gone: every request fails, every stream
    /// tunnel closes, and e2e sessions move to another relay.
    fn closed(&self, why: &str) {
        let (drained, sessions) = {
            let mut state = self.lock();
            state.phase = Phase::Closed;
            state.control = None;
            for (t, _) in state.waiting.drain(..) {
                t.0.close(false);
            }
            let sessions: Vec<_> = state.sessions.drain().collect();
            (state.matcher.drain("relay_closed"), sessions)
        };
        // The relay is lost, not this node: its sessions' connections go
        // on, through another relay of the node's or its next client (see
        // keep.rs). A client stopped closes them.
        match self.endpoint.get() {
            Some(endpoint) if !self.shutdown.is_cancelled() => {
                keep::leave(self, endpoint.clone(), sessions)
            }
            _ => {
                for (_, s) in sessions {
                    s.conn.close(0u32.into(), b"relay connection closed");
                }
            }
        }
        for m in drained {
            if let Matched::Failed { request, .. } = m {
                reply(&request, |env| {
                    (atoms::error(), atoms::relay_closed()).encode(env)
                });
            }
        }
        self.tell_owner(|env| (atoms::closed(), why).encode(env));
    }

    pub fn status<'a>(&self, env: Env<'a>) -> Term<'a> {
        let state = self.lock();
        let phase = match state.phase {
            Phase::Connecting => atoms::connecting(),
            Phase::Connected => atoms::connected(),
            Phase::Closed => atoms::closed(),
        };
        let connected = state.phase == Phase::Connected;
        let pending = state.matcher.pending_count();
        let kernel_set = state.kernel.is_some();
        // The e2e sessions this relay carries now, by peer.
        let peers: Vec<Term> = state
            .sessions
            .iter()
            .map(|(tunnel, s)| {
                let direct = self
                    .path
                    .get()
                    .and_then(|p| p.socket.direct_of(&s.conn.remote_address()));
                let path = match direct {
                    Some(addr) => (atoms::direct(), addr.to_string()).encode(env),
                    None => atoms::relay().encode(env),
                };
                let pairs = [
                    (atoms::peer().encode(env), s.peer.as_str().encode(env)),
                    (atoms::id().encode(env), tunnel.to_string().encode(env)),
                    (
                        atoms::rtt_us().encode(env),
                        (s.conn.rtt().as_micros() as u64).encode(env),
                    ),
                    (atoms::path().encode(env), path),
                ];
                Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
            })
            .collect();
        drop(state);
        let (mode, sessions) = match self.path.get() {
            Some(_) => (atoms::e2e(), peers.len()),
            None => (atoms::stream(), 0),
        };
        let (rtt_us, bytes_in, bytes_out) = match self.conn.get() {
            Some(c) => {
                let s = c.stats();
                (c.rtt().as_micros() as u64, s.udp_rx.bytes, s.udp_tx.bytes)
            }
            None => (0, 0, 0),
        };
        let pairs: Vec<(Term, Term)> = vec![
            (atoms::node().encode(env), self.node.as_str().encode(env)),
            (atoms::connection().encode(env), phase.encode(env)),
            (atoms::identified().encode(env), connected.encode(env)),
            (atoms::pending_tunnels().encode(env), pending.encode(env)),
            (
                atoms::active_tunnels().encode(env),
                self.open_tunnels.load(Ordering::Relaxed).encode(env),
            ),
            (atoms::bytes_in().encode(env), bytes_in.encode(env)),
            (atoms::bytes_out().encode(env), bytes_out.encode(env)),
            (atoms::rtt_us().encode(env), rtt_us.encode(env)),
            (atoms::kernel_set().encode(env), kernel_set.encode(env)),
            (atoms::mode().encode(env), mode.encode(env)),
            (
                atoms::key_id().encode(env),
                match self.key_id {
                    Some(k) => k
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                        .encode(env),
                    None => atoms::undefined().encode(env),
                },
            ),
            (atoms::e2e_sessions().encode(env), sessions.encode(env)),
            (atoms::sessions().encode(env), peers.encode(env)),
            (
                atoms::session_identity().encode(env),
                match self.cluster {
                    Some(_) => atoms::cluster_ca(),
                    None => atoms::cookie(),
                }
                .encode(env),
            ),
            (
                atoms::refused_sessions().encode(env),
                self.refused_sessions.load(Ordering::Relaxed).encode(env),
            ),
        ];
        Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
    }
}

fn reply(request: &Request, result: impl for<'a> FnOnce(Env<'a>) -> Term<'a>) {
    let _ = OwnedEnv::new().send_and_clear(&request.caller, |env| {
        (atoms::macula_tunnel_reply(), request.tag, result(env)).encode(env)
    });
}

fn offer(kernel: LocalPid, acceptor: LocalPid, tunnel: ResourceArc<TunnelRes>) {
    let sent = OwnedEnv::new().send_and_clear(&kernel, |env| {
        (
            atoms::accept(),
            acceptor,
            tunnel.clone(),
            atoms::inet(),
            atoms::macula(),
        )
            .encode(env)
    });
    if sent.is_err() {
        tunnel.0.close(false);
    }
}

/// Candidates worth probing: no unspecified, multicast, broadcast or
/// port-0 address, and loopback only when the relay itself is on loopback
/// (then the nodes share this host); at most [`MAX_CANDIDATES`], no repeats.
pub fn usable_candidates(
    addrs: Vec<std::net::SocketAddr>,
    relay_on_loopback: bool,
) -> Vec<std::net::SocketAddr> {
    use std::net::IpAddr;
    let mut out: Vec<std::net::SocketAddr> = Vec::new();
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
