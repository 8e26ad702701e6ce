//! A relay client as Erlang holds it: the node crate's [`Client`], the
//! kernel its inbound tunnels go to, and the task that turns its events
//! into the owner's messages.
//!
//! Messages to the owner (the `macula_dist_relay_client` gen_server):
//! `{macula_client, identified}`, `{macula_client, {connect_failed, Reason}}`,
//! `{macula_client, {closed, replaced | Reason}}`,
//! `{macula_client, {log, Level, Text}}`,
//! `{macula_client, {cookie, Source, Tag}}`.
//! Tunnel answers go to the process that asked:
//! `{macula_tunnel_reply, Tag, {ok, ConnRef, Tunnel} | {error, Reason}}`.
//! Inbound tunnels go to the kernel: `{accept, AcceptPid, Tunnel, inet, macula}`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use macula_dist_node::identity::{Cluster, NodeIdentity};
use macula_dist_node::relay_client::{
    own_key, Client, ClientEvent, ClientOptions, CloseReason, ConnectError, RequestError,
    TunnelFailure, TunnelReply,
};
use macula_dist_node::relay_trust::Trust;
use macula_dist_quic::Transport;
use macula_relay_proto::node::control::{Level, Phase};
use macula_relay_proto::Mode;
use rustler::{
    Binary, Encoder, Env, LocalPid, Monitor, NifResult, OwnedEnv, Resource, ResourceArc, Term,
};
use tokio::sync::{mpsc, oneshot};

use crate::atoms;
use crate::tunnel_nif::{self, PathTerm, TunnelRes};
use crate::vm_runtime::runtime;

/// Inbound tunnels waiting for a kernel (`set_kernel`), at most.
const MAX_WAITING: usize = 64;
/// How long an inbound tunnel may wait for a kernel.
const KERNEL_WAIT: Duration = Duration::from_secs(10);

/// `client_start/1`'s options, as Erlang gives them.
#[derive(rustler::NifMap)]
pub(crate) struct ConnectOpts {
    host: String,
    port: u16,
    node: String,
    /// Empty: no token.
    token: String,
    /// One of `pin`, `ca`, `insecure` decides the trust, in that order.
    pin_sha256: String,
    ca_cert: String,
    insecure: bool,
    connect_timeout: u64,
    tunnel_timeout: u64,
    idle_timeout: u64,
    keep_alive: u64,
    /// `"e2e"` (the default) or `"stream"`.
    mode: String,
    /// `"cubic"` or `"bbr"`: the congestion controller of this node's connections.
    congestion: String,
    /// The node's key at the relay and in e2e sessions: from this PEM file
    /// (which must exist), else from `default_key_file` (made there when
    /// missing), else one made for this run.
    key_file: String,
    default_key_file: String,
    /// Cluster-CA mode (all three, or none): the CA's PEM file, and this
    /// node's certificate (naming it `macula://NODE`) and key.
    cluster_ca: String,
    node_cert: String,
    node_key: String,
    /// Look for direct paths for e2e sessions.
    direct: bool,
    /// Addresses (`ip:port`, comma-separated) to offer as direct-path
    /// candidates besides the local ones (a port forward's, say).
    advertise: String,
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

impl TryFrom<ConnectOpts> for ClientOptions {
    type Error = String;

    fn try_from(opts: ConnectOpts) -> Result<Self, String> {
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
        // The node's key: key_file, else the cluster certificate's, else
        // its own kept key. Never a function of the cookie: the relay and
        // every token holder see it.
        let key = if !opts.key_file.is_empty() {
            Arc::new(
                NodeIdentity::from_pem_file(opts.key_file.as_ref())
                    .map_err(|e| format!("{e:#}"))?,
            )
        } else if let Some(cluster) = &cluster {
            cluster.me.clone()
        } else {
            own_key(&opts.default_key_file)?
        };
        let wants_e2e = match opts.mode.as_str() {
            "e2e" => true,
            "stream" => false,
            other => return Err(format!("unknown tunnel mode {other:?}")),
        };
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
        Ok(ClientOptions {
            host: opts.host,
            port: opts.port,
            node: opts.node,
            token: (!opts.token.is_empty()).then_some(opts.token),
            trust,
            transport,
            connect_timeout: Duration::from_millis(opts.connect_timeout),
            tunnel_timeout: Duration::from_millis(opts.tunnel_timeout),
            wants_e2e,
            key,
            cluster,
            direct: opts.direct,
            advertise,
        })
    }
}

/// Where inbound tunnels go: the kernel, once `set_kernel` named it.
#[derive(Default)]
struct Kernel {
    /// (kernel, accept pid).
    pids: Option<(LocalPid, LocalPid)>,
    waiting: VecDeque<(ResourceArc<TunnelRes>, Instant)>,
}

/// The handle the gen_server holds; when it goes, the client stops.
pub(crate) struct ClientRes {
    pub(crate) client: Arc<Client>,
    kernel: Arc<Mutex<Kernel>>,
}

// rustler returns resources through catch_unwind. The client's quinn
// endpoint is not RefUnwindSafe, but no NIF call leaves it half-changed:
// its state is behind locks that recover from poisoning.
impl std::panic::RefUnwindSafe for ClientRes {}

#[rustler::resource_impl]
impl Resource for ClientRes {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: Monitor) {
        self.client.stop();
    }
}

impl Drop for ClientRes {
    fn drop(&mut self) {
        self.client.stop();
    }
}

/// The `ConnRef` handed out with tunnels: names the client, owns nothing.
pub(crate) struct ConnRef {
    _client: Arc<Client>,
}

#[rustler::resource_impl]
impl Resource for ConnRef {}

/// Relay reasons this project knows become atoms; others stay binaries
/// (atoms are never made from what a peer sends).
fn reason_term<'a>(env: Env<'a>, reason: &str) -> Term<'a> {
    match atoms::relay_reason(reason) {
        Some(atom) => atom.encode(env),
        None => reason.encode(env),
    }
}

fn level(level: Level) -> rustler::Atom {
    match level {
        Level::Info => atoms::info(),
        Level::Warning => atoms::warning(),
    }
}

fn connect_error<'a>(env: Env<'a>, e: &ConnectError) -> Term<'a> {
    match e {
        ConnectError::Unreachable(s) => (atoms::unreachable(), s.as_str()).encode(env),
        ConnectError::Tls(s) => (atoms::tls(), s.as_str()).encode(env),
        ConnectError::Refused(s) => (atoms::refused(), reason_term(env, s)).encode(env),
        ConnectError::Protocol(s) => (atoms::protocol_error(), s.as_str()).encode(env),
        ConnectError::Timeout => atoms::timeout().encode(env),
    }
}

fn request_error(e: RequestError) -> rustler::Atom {
    match e {
        RequestError::NotConnected => atoms::not_connected(),
        RequestError::Unsupported => atoms::unsupported(),
    }
}

fn send(to: &LocalPid, msg: impl for<'a> FnOnce(Env<'a>) -> Term<'a>) -> bool {
    OwnedEnv::new().send_and_clear(to, msg).is_ok()
}

fn tell_owner(owner: &LocalPid, event: impl for<'a> FnOnce(Env<'a>) -> Term<'a>) {
    send(owner, |env| {
        (atoms::macula_client(), event(env)).encode(env)
    });
}

/// Starts a client whose owner is `owner`.
pub(crate) fn start(owner: LocalPid, opts: ConnectOpts) -> Result<ClientRes, String> {
    let opts = ClientOptions::try_from(opts)?;
    let (client, events) = Client::start(opts, runtime().handle().clone())?;
    let kernel = Arc::new(Mutex::new(Kernel::default()));
    runtime().spawn(pump(owner, Arc::downgrade(&client), events, kernel.clone()));
    Ok(ClientRes { client, kernel })
}

/// Turns the client's events into the owner's messages, and hands inbound
/// tunnels to the kernel (or keeps them until there is one).
async fn pump(
    owner: LocalPid,
    client: Weak<Client>,
    mut events: mpsc::UnboundedReceiver<ClientEvent>,
    kernel: Arc<Mutex<Kernel>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = tick.tick() => {
                close_stale(&owner, &client, &kernel);
                continue;
            }
        };
        let Some(event) = event else {
            return;
        };
        match event {
            ClientEvent::Identified => tell_owner(&owner, |env| atoms::identified().encode(env)),
            ClientEvent::ConnectFailed(e) => tell_owner(&owner, |env| {
                (atoms::connect_failed(), connect_error(env, &e)).encode(env)
            }),
            ClientEvent::Closed(why) => {
                for (t, _) in lock(&kernel).waiting.drain(..) {
                    t.tunnel.close(false);
                }
                tell_owner(&owner, |env| {
                    let why = match &why {
                        CloseReason::Replaced => atoms::replaced().encode(env),
                        CloseReason::Stopped => "stopped".encode(env),
                        CloseReason::Other(text) => text.encode(env),
                    };
                    (atoms::closed(), why).encode(env)
                })
            }
            ClientEvent::Log(l, text) => {
                tell_owner(&owner, |env| (atoms::log(), level(l), text).encode(env))
            }
            ClientEvent::CookieWanted { source, tag } => tell_owner(&owner, |env| {
                (atoms::cookie(), source.as_str(), tag).encode(env)
            }),
            ClientEvent::Inbound(new) => {
                let id = new.tunnel.id;
                let res = tunnel_nif::start(new, None);
                let mut k = lock(&kernel);
                match k.pids {
                    Some((kernel, acceptor)) => offer(kernel, acceptor, res),
                    None if k.waiting.len() < MAX_WAITING => {
                        k.waiting.push_back((res, Instant::now()))
                    }
                    None => {
                        drop(k);
                        tell_owner(&owner, |env| {
                            let text = format!("closed inbound tunnel {id}: no kernel and {MAX_WAITING} already waiting");
                            (atoms::log(), atoms::warning(), text).encode(env)
                        });
                        res.tunnel.close(false);
                        if let Some(c) = client.upgrade() {
                            c.discard(id);
                        }
                    }
                }
            }
        }
    }
}

fn lock(kernel: &Mutex<Kernel>) -> std::sync::MutexGuard<'_, Kernel> {
    kernel.lock().unwrap_or_else(|e| e.into_inner())
}

/// Inbound tunnels no kernel took in time close.
fn close_stale(owner: &LocalPid, client: &Weak<Client>, kernel: &Mutex<Kernel>) {
    let now = Instant::now();
    let mut stale = vec![];
    {
        let mut k = lock(kernel);
        while let Some((_, at)) = k.waiting.front() {
            if now.duration_since(*at) < KERNEL_WAIT {
                break;
            }
            stale.extend(k.waiting.pop_front().map(|(t, _)| t));
        }
    }
    for t in stale {
        let text = format!(
            "closed inbound tunnel {} from {}: no kernel took it",
            t.tunnel.id, t.tunnel.peer
        );
        tell_owner(owner, |env| {
            (atoms::log(), atoms::warning(), text).encode(env)
        });
        // An e2e session tells the relay itself once its connection has
        // closed.
        if let (Mode::Stream, Some(c)) = (t.tunnel.mode, client.upgrade()) {
            c.discard(t.tunnel.id);
        }
        t.tunnel.close(false);
    }
}

fn offer(kernel: LocalPid, acceptor: LocalPid, tunnel: ResourceArc<TunnelRes>) {
    let sent = send(&kernel, |env| {
        (
            atoms::accept(),
            acceptor,
            tunnel.clone(),
            atoms::inet(),
            atoms::macula(),
        )
            .encode(env)
    });
    if !sent {
        tunnel.tunnel.close(false);
    }
}

impl ClientRes {
    /// Inbound tunnels go to `kernel` from now on, with `acceptor` as
    /// AcceptPid.
    pub(crate) fn set_kernel(&self, kernel: LocalPid, acceptor: LocalPid) {
        let waiting: Vec<_> = {
            let mut k = lock(&self.kernel);
            k.pids = Some((kernel, acceptor));
            k.waiting.drain(..).map(|(t, _)| t).collect()
        };
        // Sent from the runtime: an OwnedEnv cannot send from a scheduler thread.
        runtime().spawn(async move {
            for t in waiting {
                offer(kernel, acceptor, t);
            }
        });
    }

    /// Asks for a tunnel; the answer goes to `caller` tagged `tag`.
    pub(crate) fn request_tunnel(
        &self,
        target: String,
        caller: LocalPid,
        tag: u64,
        cookie: Option<Vec<u8>>,
    ) -> Result<(), rustler::Atom> {
        let answer = self
            .client
            .request_tunnel(target, cookie)
            .map_err(request_error)?;
        let client = self.client.clone();
        runtime().spawn(reply_tunnel(client, answer, caller, tag));
        Ok(())
    }

    /// Asks which nodes the relay has; the caller hears
    /// `{macula_nodes_reply, Tag, {ok, [Name]}}`.
    pub(crate) fn request_nodes(&self, caller: LocalPid, tag: u64) -> Result<(), rustler::Atom> {
        let answer = self.client.request_nodes().map_err(request_error)?;
        runtime().spawn(async move {
            if let Ok(nodes) = answer.await {
                send(&caller, |env| {
                    (atoms::macula_nodes_reply(), tag, (atoms::ok(), nodes)).encode(env)
                });
            }
        });
        Ok(())
    }

    pub(crate) fn status(&self) -> ClientStatusMap {
        let s = self.client.status();
        let kernel_set = lock(&self.kernel).pids.is_some();
        ClientStatusMap {
            node: s.node,
            connection: match s.phase {
                Phase::Connecting => atoms::connecting(),
                Phase::Connected => atoms::connected(),
                Phase::Closed => atoms::closed(),
            },
            identified: s.phase == Phase::Connected,
            pending_tunnels: s.pending_tunnels,
            active_tunnels: s.active_tunnels,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            rtt_us: s.rtt_us,
            kernel_set,
            mode: if s.e2e { atoms::e2e() } else { atoms::stream() },
            key_id: s.key_id,
            e2e_sessions: if s.e2e { s.sessions.len() } else { 0 },
            sessions: s
                .sessions
                .into_iter()
                .map(|x| SessionMap {
                    peer: x.peer,
                    id: x.id,
                    rtt_us: x.rtt_us,
                    path: PathTerm(x.direct),
                })
                .collect(),
            session_identity: if s.cluster_ca {
                atoms::cluster_ca()
            } else {
                atoms::cookie()
            },
            refused_sessions: s.refused_sessions,
        }
    }
}

/// Answers a tunnel request: `{macula_tunnel_reply, Tag, Result}`.
async fn reply_tunnel(
    client: Arc<Client>,
    answer: oneshot::Receiver<TunnelReply>,
    caller: LocalPid,
    tag: u64,
) {
    let reply = |result: &dyn Fn(Env) -> Term| {
        send(&caller, |env| {
            (atoms::macula_tunnel_reply(), tag, result(env)).encode(env)
        })
    };
    match answer.await {
        Ok(Ok(new)) => {
            let res = tunnel_nif::start(new, Some(caller));
            let conn = ResourceArc::new(ConnRef { _client: client });
            if !reply(&|env| (atoms::ok(), conn.clone(), res.clone()).encode(env)) {
                res.tunnel.close(false);
            }
        }
        Ok(Err(TunnelFailure::Refused(reason))) => {
            reply(&|env| {
                (
                    atoms::error(),
                    (atoms::tunnel_error(), reason_term(env, &reason)),
                )
                    .encode(env)
            });
        }
        Ok(Err(TunnelFailure::Timeout)) => {
            reply(&|env| (atoms::error(), atoms::timeout()).encode(env));
        }
        Ok(Err(TunnelFailure::RelayClosed)) | Err(_) => {
            reply(&|env| (atoms::error(), atoms::relay_closed()).encode(env));
        }
    }
}

/// What `client_status/1` answers.
#[derive(rustler::NifMap)]
pub(crate) struct ClientStatusMap {
    node: String,
    connection: rustler::Atom,
    identified: bool,
    pending_tunnels: usize,
    active_tunnels: usize,
    bytes_in: u64,
    bytes_out: u64,
    rtt_us: u64,
    kernel_set: bool,
    mode: rustler::Atom,
    key_id: String,
    e2e_sessions: usize,
    sessions: Vec<SessionMap>,
    session_identity: rustler::Atom,
    refused_sessions: u64,
}

/// One e2e session in a client's status.
#[derive(rustler::NifMap)]
pub(crate) struct SessionMap {
    peer: String,
    id: String,
    rtt_us: u64,
    path: PathTerm,
}

// ---- the NIFs on a client ----

/// Starts a client; the calling process is its owner and hears
/// `{macula_client, identified}` or `{macula_client, {connect_failed, R}}`.
#[rustler::nif]
fn client_start(env: Env, opts: ConnectOpts) -> NifResult<(rustler::Atom, ResourceArc<ClientRes>)> {
    let owner = env.pid();
    let client =
        start(owner, opts).map_err(|e| rustler::Error::Term(Box::new((atoms::tls_config(), e))))?;
    let res = ResourceArc::new(client);
    if env.monitor(&res, &owner).is_none() {
        res.client.stop();
    }
    Ok((atoms::ok(), res))
}

#[rustler::nif]
fn client_stop(client: ResourceArc<ClientRes>) -> rustler::Atom {
    client.client.stop();
    atoms::ok()
}

/// Asks for a tunnel to `target`; the caller hears
/// `{macula_tunnel_reply, Tag, {ok, ConnRef, Tunnel} | {error, Reason}}`.
/// With a cookie (not empty) it is an e2e session when the relay offers
/// them; the cookie keys both ends.
#[rustler::nif]
fn client_request_tunnel<'a>(
    env: Env<'a>,
    client: ResourceArc<ClientRes>,
    target: String,
    tag: u64,
    cookie: Binary<'a>,
) -> Term<'a> {
    let cookie = (!cookie.is_empty()).then(|| cookie.as_slice().to_vec());
    match client.request_tunnel(target, env.pid(), tag, cookie) {
        Ok(()) => atoms::ok().encode(env),
        Err(reason) => (atoms::error(), reason).encode(env),
    }
}

#[rustler::nif]
fn client_close_tunnel<'a>(
    env: Env<'a>,
    client: ResourceArc<ClientRes>,
    tunnel_id: Binary<'a>,
) -> Term<'a> {
    match macula_relay_proto::TunnelId::parse(tunnel_id.as_slice()) {
        Ok(id) if client.client.close_tunnel(id) => atoms::ok().encode(env),
        Ok(_) => (atoms::error(), atoms::not_connected()).encode(env),
        Err(_) => (atoms::error(), atoms::badarg()).encode(env),
    }
}

/// The owner's answer to `{macula_client, {cookie, Source, Tag}}`: the
/// cookie this node uses with `Source`, for an inbound e2e session.
#[rustler::nif]
fn client_cookie(client: ResourceArc<ClientRes>, tag: u64, cookie: Binary) -> rustler::Atom {
    client.client.cookie(tag, cookie.as_slice());
    atoms::ok()
}

/// Asks which nodes this node may reach on its relay; the caller hears
/// `{macula_nodes_reply, Tag, {ok, [Name]}}`.
#[rustler::nif]
fn client_nodes(env: Env, client: ResourceArc<ClientRes>, tag: u64) -> Term {
    match client.request_nodes(env.pid(), tag) {
        Ok(()) => atoms::ok().encode(env),
        Err(reason) => (atoms::error(), reason).encode(env),
    }
}

#[rustler::nif]
fn client_set_kernel(
    client: ResourceArc<ClientRes>,
    kernel: LocalPid,
    acceptor: LocalPid,
) -> rustler::Atom {
    client.set_kernel(kernel, acceptor);
    atoms::ok()
}

#[rustler::nif]
fn client_status(client: ResourceArc<ClientRes>) -> ClientStatusMap {
    client.status()
}
