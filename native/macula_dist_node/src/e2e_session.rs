//! Setting up e2e sessions: the requester connects to the target's node
//! through the relay (its socket routes the session's virtual address),
//! the target accepts the connection the relay announced, both check the
//! other's key inside the TLS handshake ([`crate::identity`]), and then run
//! the PAKE on the session's first stream, which becomes a tunnel (the
//! same data path as a stream tunnel's).
//!
//! The outcome goes to the client that asked, as a [`SessionEvent`] on its
//! channel; when a session's connection ends, the node's registry finds
//! the client that carries it by then ([`crate::registry::Node`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use macula_dist_quic::nudge::nudge;
use macula_relay_proto::node::cookie_pake::CookiePake;
use macula_relay_proto::node::paths::Route;
use macula_relay_proto::node::session_auth::{self, Role, SessionAuth};
use macula_relay_proto::wire::dataplane::session_id;
use macula_relay_proto::{BindKey, TunnelId};
use quinn::{RecvStream, SendStream};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::endpoint::InboundTable;
use crate::identity::{self, Cluster, NodeIdentity, PeerCheck, E2E_SERVER_NAME};
use crate::node_socket::NodeSocket;
use crate::registry::Node;
use crate::tunnel::Streams;

/// How long a session may take from announcement to its first stream.
const SESSION_SETUP: Duration = Duration::from_secs(10);
/// How long a closed session's route and relay entry outlive it.
const SESSION_DRAIN: Duration = Duration::from_millis(500);
/// Bytes read ahead while looking for a handshake frame, at most.
const HANDSHAKE_BUFFER: usize = 2 * (session_auth::MAX_FRAME + 2) + 4096;

/// Cookies whose PAKE constants are kept, at most.
const COOKIES_KEPT: usize = 8;

/// Each cookie's PAKE constants, made once ([`CookiePake`]): a node has one
/// cookie, or a few set per peer with `erlang:set_cookie/2`.
#[derive(Default)]
pub struct CookiePakes(Mutex<VecDeque<(Vec<u8>, Arc<CookiePake>)>>);

impl CookiePakes {
    fn of(&self, cookie: &[u8]) -> Arc<CookiePake> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, pake)) = kept.iter().find(|(c, _)| c == cookie) {
            return pake.clone();
        }
        let pake = Arc::new(CookiePake::new(cookie));
        if kept.len() == COOKIES_KEPT {
            kept.pop_front();
        }
        kept.push_back((cookie.to_vec(), pake.clone()));
        pake
    }
}

/// What became of a session being set up, for the client that set it up.
pub enum SessionEvent {
    /// Up and authenticated: its first stream is open.
    Up {
        tunnel: TunnelId,
        conn: quinn::Connection,
        streams: Streams,
        bind: BindKey,
        peer: String,
        requester: bool,
        peer_candidates: Vec<SocketAddr>,
    },
    /// This node's request failed (the reason is logged, the request fails
    /// with `e2e_handshake_failed`).
    Failed {
        tunnel: TunnelId,
        target: String,
        error: String,
    },
    /// An inbound session was refused: a peer without the cookie ends here,
    /// and no byte of it reached Erlang.
    Refused {
        tunnel: TunnelId,
        source: String,
        error: String,
    },
    /// An inbound session's requester never came.
    NeverCame { tunnel: TunnelId },
}

/// Who this node is in its sessions, and where their outcomes go.
#[derive(Clone)]
pub struct SessionSetup {
    /// This node's name.
    pub node_name: String,
    /// The node's registry: finds who carries a session when it ends.
    pub node: Arc<Node>,
    /// The node's own key (cookie mode).
    pub key: Arc<NodeIdentity>,
    /// Cluster-CA mode: sessions use this identity, not the node's key.
    pub cluster: Option<Arc<Cluster>>,
    /// Cookie mode: the one TLS configuration of every inbound session.
    pub cookie_server_config: Option<Arc<quinn::ServerConfig>>,
    /// Cookie mode: the one TLS configuration of every outbound session.
    pub cookie_client_config: Option<quinn::ClientConfig>,
    /// Cookie mode: the PAKE's constants of each cookie.
    pub pakes: Arc<CookiePakes>,
    pub events: mpsc::UnboundedSender<SessionEvent>,
    pub rt: Handle,
}

impl SessionSetup {
    /// This node's identity in a session with `peer`, and what `peer` must
    /// show in TLS: the cluster CA's, or (cookie mode) its own key and any
    /// key, the cookie being proved by the PAKE that follows.
    fn identities(&self, peer: &str) -> (Arc<NodeIdentity>, PeerCheck) {
        match &self.cluster {
            Some(cluster) => (cluster.me.clone(), cluster.check_of(peer)),
            None => (self.key.clone(), PeerCheck::AnyKey),
        }
    }

    /// The PAKE of `cookie`: none in cluster-CA mode.
    fn cookie_pake(&self, cookie: &[u8]) -> Option<Arc<CookiePake>> {
        self.cluster.is_none().then(|| self.pakes.of(cookie))
    }

    /// The TLS configuration that accepts a session from `source`: one for
    /// all in cookie mode (any key; the PAKE follows), one per source in
    /// cluster-CA mode (its certificate must name it).
    fn server_config(
        &self,
        source: &str,
        transport: &macula_dist_quic::Transport,
    ) -> anyhow::Result<Arc<quinn::ServerConfig>> {
        match (&self.cluster, &self.cookie_server_config) {
            (Some(cluster), _) => Ok(Arc::new(identity::server_config(
                &cluster.me,
                cluster.check_of(source),
                transport,
            )?)),
            (None, Some(config)) => Ok(config.clone()),
            (None, None) => Ok(Arc::new(identity::server_config(
                &self.key,
                PeerCheck::AnyKey,
                transport,
            )?)),
        }
    }

    /// The TLS configuration that connects to `target`: one for all in
    /// cookie mode, one per target in cluster-CA mode (its certificate
    /// must name it).
    fn client_config(
        &self,
        target: &str,
        transport: &macula_dist_quic::Transport,
    ) -> anyhow::Result<quinn::ClientConfig> {
        match (&self.cluster, &self.cookie_client_config) {
            (None, Some(config)) => Ok(config.clone()),
            _ => {
                let (me, expected) = self.identities(target);
                identity::client_config(&me, expected, transport)
            }
        }
    }

    fn tell(&self, event: SessionEvent) {
        let _ = self.events.send(event);
    }
}

/// 32 bytes only the two ends of `conn` share, bound to `tunnel`.
fn exporter(conn: &quinn::Connection, tunnel: &TunnelId) -> anyhow::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, session_auth::EXPORTER_LABEL, tunnel.as_bytes())
        .map_err(|_| anyhow::anyhow!("TLS exporter unavailable"))?;
    Ok(out)
}

/// Reads the next handshake frame, after the bytes already in `buf`.
async fn read_frame(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> anyhow::Result<Vec<u8>> {
    loop {
        if let Some((body, rest)) = session_auth::take_frame(buf)? {
            let body = body.to_vec();
            let used = buf.len() - rest.len();
            buf.advance(used);
            return Ok(body);
        }
        anyhow::ensure!(buf.len() <= HANDSHAKE_BUFFER, "oversized session handshake");
        let chunk = recv
            .read_chunk(4096, true)
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended in the session handshake"))?;
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// Reads a tunnel stream's 32-character id prefix.
pub async fn read_prefix(
    send: SendStream,
    mut recv: RecvStream,
) -> anyhow::Result<(TunnelId, Streams)> {
    let mut prefix = macula_relay_proto::node::matcher::PrefixReader::default();
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

/// Where a client's sessions run: its endpoint's socket and its relay.
#[derive(Clone)]
pub struct SessionRoute {
    pub endpoint: quinn::Endpoint,
    pub socket: Arc<NodeSocket>,
    pub inbound: InboundTable,
    pub relay: SocketAddr,
    pub transport: macula_dist_quic::Transport,
}

impl SessionRoute {
    fn route(&self, tunnel: &TunnelId, bind: BindKey) -> Route {
        Route {
            relay: self.relay,
            session: session_id(tunnel),
            bind,
        }
    }
}

/// The requester's side: connect, open the tunnel's stream, run the PAKE
/// (offering `candidates`), and tell the client.
#[allow(clippy::too_many_arguments)]
pub fn connect(
    setup: &SessionSetup,
    path: SessionRoute,
    tunnel: TunnelId,
    bind: BindKey,
    path_mtu: Option<u16>,
    cookie: Vec<u8>,
    target: String,
    candidates: Vec<SocketAddr>,
) {
    let setup = setup.clone();
    setup.rt.clone().spawn(async move {
        let vaddr = path.socket.add_session(path.route(&tunnel, bind));
        let opened = timeout(SESSION_SETUP, async {
            let mut config = setup.client_config(&target, &path.transport)?;
            if let Some(transport) = path.transport.e2e_session_quinn_config(path_mtu)? {
                config.transport_config(transport);
            }
            let conn = path
                .endpoint
                .connect_with(config, vaddr, E2E_SERVER_NAME)?
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut auth = SessionAuth::new(
                Role::Requester,
                setup.cookie_pake(&cookie).as_deref(),
                &setup.node_name,
                &target,
                &tunnel,
                exporter(&conn, &tunnel)?,
            );
            // The stream starts with the tunnel id, as a stream tunnel's
            // does (the target checks it), then the PAKE.
            let mut hello = tunnel.to_hex().to_vec();
            hello.extend(session_auth::frame(auth.pake_message())?);
            send.write_all(&hello).await?;
            let mut buf = BytesMut::new();
            auth.on_pake(&read_frame(&mut recv, &mut buf).await?)?;
            let peer_candidates =
                auth.check_confirmation(&read_frame(&mut recv, &mut buf).await?)?;
            let confirm = auth.confirmation(&candidates)?;
            send.write_all(&session_auth::frame(&confirm)?).await?;
            anyhow::Ok((conn, send, recv, buf.freeze(), peer_candidates))
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("session setup timed out")));
        match opened {
            Ok((conn, send, recv, early, peer_candidates)) => {
                watch(&setup, &path, tunnel, conn.clone());
                let mut streams = streams(conn.clone(), send, recv, &path.socket);
                streams.early = early;
                setup.tell(SessionEvent::Up {
                    tunnel,
                    conn,
                    streams,
                    bind,
                    peer: target,
                    requester: true,
                    peer_candidates,
                });
            }
            Err(e) => {
                path.socket.remove_session(&vaddr);
                setup.tell(SessionEvent::Failed {
                    tunnel,
                    target,
                    error: format!("{e:#}"),
                });
            }
        }
    });
}

/// An inbound session the target is ready for: accepted (with its own
/// server config) when its first datagram arrives.
struct Inbound {
    setup: SessionSetup,
    path: SessionRoute,
    tunnel: TunnelId,
    bind: BindKey,
    path_mtu: Option<u16>,
    source: String,
    vaddr: SocketAddr,
    cookie: Vec<u8>,
    candidates: Vec<SocketAddr>,
}

/// The target's side: ready the session, then route it, so its connection
/// is accepted as it comes. Returns the session's virtual address.
#[allow(clippy::too_many_arguments)]
pub fn expect(
    setup: &SessionSetup,
    path: SessionRoute,
    tunnel: TunnelId,
    source: String,
    bind: BindKey,
    path_mtu: Option<u16>,
    cookie: &[u8],
    candidates: Vec<SocketAddr>,
) -> SocketAddr {
    let route = path.route(&tunnel, bind);
    let socket = path.socket.clone();
    let inbound = path.inbound.clone();
    let setup = setup.clone();
    let cookie = cookie.to_vec();
    let timer = setup.clone();
    let vaddr = socket.add_session_then(route, |vaddr| {
        let session = Inbound {
            setup,
            path: path.clone(),
            tunnel,
            bind,
            path_mtu,
            source,
            vaddr,
            cookie,
            candidates,
        };
        path.inbound
            .expect(vaddr, Box::new(move |incoming| session.accept(incoming)))
    });
    // A session whose requester never comes is forgotten.
    timer.rt.clone().spawn(async move {
        tokio::time::sleep(SESSION_SETUP).await;
        if inbound.forget(&vaddr).is_some() {
            socket.remove_session(&vaddr);
            timer.tell(SessionEvent::NeverCame { tunnel });
        }
    });
    vaddr
}

impl Inbound {
    fn accept(self, incoming: quinn::Incoming) {
        // Its client stopped meanwhile: nobody would take the session.
        if self.setup.events.is_closed() {
            incoming.refuse();
            self.path.socket.remove_session(&self.vaddr);
            return;
        }
        let rt = self.setup.rt.clone();
        rt.spawn(async move {
            let setup = &self.setup;
            let accepted = timeout(SESSION_SETUP, async {
                let mut config = setup.server_config(&self.source, &self.path.transport)?;
                if let Some(transport) = self
                    .path
                    .transport
                    .e2e_session_quinn_config(self.path_mtu)?
                {
                    Arc::make_mut(&mut config).transport_config(transport);
                }
                let conn = incoming.accept_with(config)?.await?;
                let (send, recv) = conn.accept_bi().await?;
                let (tunnel, mut streams) = read_prefix(send, recv).await?;
                anyhow::ensure!(
                    tunnel == self.tunnel,
                    "the session's stream names tunnel {tunnel}"
                );
                let mut auth = SessionAuth::new(
                    Role::Target,
                    setup.cookie_pake(&self.cookie).as_deref(),
                    &self.source,
                    &setup.node_name,
                    &tunnel,
                    exporter(&conn, &tunnel)?,
                );
                let mut buf = BytesMut::from(&streams.early[..]);
                auth.on_pake(&read_frame(&mut streams.recv, &mut buf).await?)?;
                let mut reply = session_auth::frame(auth.pake_message())?;
                reply.extend(session_auth::frame(&auth.confirmation(&self.candidates)?)?);
                streams.send.write_all(&reply).await?;
                let peer_candidates =
                    auth.check_confirmation(&read_frame(&mut streams.recv, &mut buf).await?)?;
                streams.early = buf.freeze();
                streams.conn = Some(conn.clone());
                streams.socket = Some(self.path.socket.clone());
                anyhow::Ok((conn, streams, peer_candidates))
            })
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("session setup timed out")));
            match accepted {
                Ok((conn, streams, peer_candidates)) => {
                    watch(setup, &self.path, self.tunnel, conn.clone());
                    setup.tell(SessionEvent::Up {
                        tunnel: self.tunnel,
                        conn,
                        streams,
                        bind: self.bind,
                        peer: self.source,
                        requester: false,
                        peer_candidates,
                    });
                }
                Err(e) => {
                    self.path.socket.remove_session(&self.vaddr);
                    setup.tell(SessionEvent::Refused {
                        tunnel: self.tunnel,
                        source: self.source,
                        error: format!("{e:#}"),
                    });
                }
            }
        });
    }
}

fn streams(
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    socket: &Arc<NodeSocket>,
) -> Streams {
    Streams {
        socket: Some(socket.clone()),
        send,
        recv,
        early: Bytes::new(),
        conn: Some(conn),
    }
}

/// When the session's connection ends (the tunnel closed it, the peer did,
/// or it timed out), its route goes and the relay forgets it.
fn watch(setup: &SessionSetup, path: &SessionRoute, tunnel: TunnelId, conn: quinn::Connection) {
    // The session's virtual address: where quinn sees its peer.
    let vaddr = conn.remote_address();
    let node = setup.node.clone();
    let socket = path.socket.clone();
    setup.rt.spawn(async move {
        conn.closed().await;
        // The connection's last packets (its CONNECTION_CLOSE) still go
        // through the relay: tell it to forget the session only after they
        // had time to get there.
        tokio::time::sleep(SESSION_DRAIN).await;
        socket.remove_session(&vaddr);
        // The client carrying it now: the one that opened it, or another
        // that took it over when that one's relay went.
        node.session_closed(&tunnel);
    });
}

/// When a session's datagrams are rerouted (its relay lost), every packet
/// sent meanwhile still counts as in flight: the congestion window is
/// full, and QUIC would wait for its backed-off probe timeout (seconds).
/// A tiny datagram sent now past the window ([`nudge`]), and again a little
/// later (the new route opens once both sides have claimed the session),
/// is acknowledged as soon as the route works: that marks what was lost
/// meanwhile as lost, so it goes out again at once.
pub fn nudge_after_move(conn: quinn::Connection, rt: &Handle) {
    const AFTER_MS: [u64; 8] = [0, 25, 25, 50, 100, 200, 400, 800];
    rt.spawn(async move {
        for ms in AFTER_MS {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if conn.close_reason().is_some() || !nudge(&conn) {
                return;
            }
            if conn.send_datagram(Bytes::new()).is_err() {
                return;
            }
        }
    });
}
