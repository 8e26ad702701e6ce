//! A client's e2e sessions: the requester connects to the target's node
//! through the relay (its socket routes the session's virtual address),
//! the target accepts the connection the relay announced, and both check
//! the other's key inside the TLS handshake ([`macula_dist_node::identity`]).
//! The session's first stream becomes a tunnel, the same data path as a
//! stream tunnel's.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use macula_dist_node::identity::{self, NodeIdentity, PeerCheck, E2E_SERVER_NAME};
use macula_dist_node::node_socket::NodeSocket;
use macula_relay_proto::node::paths::Route;
use macula_relay_proto::node::session_auth::{self, Role, SessionAuth};
use macula_relay_proto::wire::dataplane::session_id;
use macula_relay_proto::{BindKey, TunnelId};
use tokio::time::timeout;

use crate::atoms;
use crate::client::{read_prefix, Client};
use crate::keep;
use crate::runtime::{runtime, InboundTable};
use crate::tunnel::Streams;

/// How long a session may take from announcement to its first stream.
const SESSION_SETUP: Duration = Duration::from_secs(10);
/// How long a closed session's route and relay entry outlive it.
const SESSION_DRAIN: Duration = Duration::from_millis(500);
/// Bytes read ahead while looking for a handshake frame, at most.
const HANDSHAKE_BUFFER: usize = 2 * (session_auth::MAX_FRAME + 2) + 4096;

/// This node's identity in a session with `peer`, and what `peer` must
/// show in TLS: the cluster CA's, or (cookie mode) its own key and any
/// key, the cookie being proved by the PAKE that follows.
fn identities(client: &Client, peer: &str) -> (Arc<NodeIdentity>, PeerCheck) {
    match &client.cluster {
        Some(cluster) => (cluster.me.clone(), cluster.check_of(peer)),
        None => (client.key.clone(), PeerCheck::AnyKey),
    }
}

/// The cookie the PAKE uses: none in cluster-CA mode.
fn pake_cookie<'a>(client: &Client, cookie: &'a [u8]) -> Option<&'a [u8]> {
    client.cluster.is_none().then_some(cookie)
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

/// Where a client's sessions run: its endpoint's socket and its relay.
#[derive(Clone)]
pub struct Path {
    pub endpoint: quinn::Endpoint,
    pub socket: Arc<NodeSocket>,
    pub inbound: InboundTable,
    pub relay: SocketAddr,
    pub transport: macula_dist_quic::Transport,
}

impl Path {
    fn route(&self, tunnel: &TunnelId, bind: BindKey) -> Route {
        Route {
            relay: self.relay,
            session: session_id(tunnel),
            bind,
        }
    }
}

/// The requester's side: connect, open the tunnel's stream, hand it on.
pub fn connect(
    client: &Arc<Client>,
    path: Path,
    tunnel: TunnelId,
    bind: BindKey,
    cookie: Vec<u8>,
    target: String,
) {
    let client = client.clone();
    runtime().spawn(async move {
        let vaddr = path.socket.add_session(path.route(&tunnel, bind));
        let opened = timeout(SESSION_SETUP, async {
            let (me, expected) = identities(&client, &target);
            let config = identity::client_config(&me, expected, &path.transport)?;
            let conn = path
                .endpoint
                .connect_with(config, vaddr, E2E_SERVER_NAME)?
                .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut auth = SessionAuth::new(
                Role::Requester,
                pake_cookie(&client, &cookie),
                client.node(),
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
            let confirm = auth.confirmation(&client.local_candidates())?;
            send.write_all(&session_auth::frame(&confirm)?).await?;
            anyhow::Ok((conn, send, recv, buf.freeze(), peer_candidates))
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("session setup timed out")));
        match opened {
            Ok((conn, send, recv, early, peer_candidates)) => {
                watch(
                    &client,
                    &path,
                    tunnel,
                    conn.clone(),
                    bind,
                    &target,
                    true,
                    &peer_candidates,
                );
                let mut streams = streams(conn, send, recv, &path.socket);
                streams.early = early;
                client.session_stream(tunnel, streams);
            }
            Err(e) => {
                path.socket.remove_session(&vaddr);
                client.log(
                    atoms::warning(),
                    format!("e2e session {tunnel} to {target} failed: {e:#}"),
                );
                client.session_failed(tunnel, "e2e_handshake_failed");
            }
        }
    });
}

/// An inbound session the target is ready for: accepted (with its own
/// server config) when its first datagram arrives.
pub struct Inbound {
    client: Weak<Client>,
    path: Path,
    tunnel: TunnelId,
    bind: BindKey,
    source: String,
    vaddr: SocketAddr,
    cookie: Vec<u8>,
}

/// The target's side: ready the session, then route it, so its connection
/// is accepted as it comes. Its TLS configuration is made only then.
pub fn expect(
    client: &Arc<Client>,
    path: Path,
    tunnel: TunnelId,
    source: String,
    bind: BindKey,
    cookie: &[u8],
) -> SocketAddr {
    let cookie = cookie.to_vec();
    let route = path.route(&tunnel, bind);
    let weak = Arc::downgrade(client);
    let socket = path.socket.clone();
    let inbound = path.inbound.clone();
    let vaddr = socket.add_session_then(route, |vaddr| {
        path.inbound.clone().expect(
            vaddr,
            Inbound {
                client: weak,
                path,
                tunnel,
                bind,
                source,
                vaddr,
                cookie,
            },
        )
    });
    // A session whose requester never comes is forgotten.
    let client = Arc::downgrade(client);
    runtime().spawn(async move {
        tokio::time::sleep(SESSION_SETUP).await;
        if inbound.forget(&vaddr).is_some() {
            socket.remove_session(&vaddr);
            if let Some(client) = client.upgrade() {
                client.inbound_done(&tunnel);
            }
        }
    });
    vaddr
}

impl Inbound {
    pub fn accept(self, incoming: quinn::Incoming) {
        runtime().spawn(async move {
            let Some(client) = self.client.upgrade() else {
                incoming.refuse();
                self.path.socket.remove_session(&self.vaddr);
                return;
            };
            let accepted = timeout(SESSION_SETUP, async {
                let config = client.server_config(&self.source, &self.path.transport)?;
                let conn = incoming.accept_with(config)?.await?;
                let (send, recv) = conn.accept_bi().await?;
                let (tunnel, mut streams) = read_prefix(send, recv).await?;
                anyhow::ensure!(
                    tunnel == self.tunnel,
                    "the session's stream names tunnel {tunnel}"
                );
                let mut auth = SessionAuth::new(
                    Role::Target,
                    pake_cookie(&client, &self.cookie),
                    &self.source,
                    client.node(),
                    &tunnel,
                    exporter(&conn, &tunnel)?,
                );
                let mut buf = BytesMut::from(&streams.early[..]);
                auth.on_pake(&read_frame(&mut streams.recv, &mut buf).await?)?;
                let mut reply = session_auth::frame(auth.pake_message())?;
                reply.extend(session_auth::frame(
                    &auth.confirmation(&client.local_candidates())?,
                )?);
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
            client.inbound_done(&self.tunnel);
            match accepted {
                Ok((conn, streams, peer_candidates)) => {
                    let bind = self.bind;
                    watch(
                        &client,
                        &self.path,
                        self.tunnel,
                        conn,
                        bind,
                        &self.source,
                        false,
                        &peer_candidates,
                    );
                    client.session_stream(self.tunnel, streams);
                }
                Err(e) => {
                    // A peer without the cookie ends here: no byte of it
                    // reached Erlang.
                    self.path.socket.remove_session(&self.vaddr);
                    client.count_refused_session();
                    client.log_peer_caused(
                        atoms::warning(),
                        format!(
                            "refused e2e session {} from {}: {e:#}",
                            self.tunnel, self.source
                        ),
                    );
                    client.discard(self.tunnel);
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
#[allow(clippy::too_many_arguments)]
fn watch(
    client: &Arc<Client>,
    path: &Path,
    tunnel: TunnelId,
    conn: quinn::Connection,
    bind: BindKey,
    peer: &str,
    requester: bool,
    peer_candidates: &[SocketAddr],
) {
    // The session's virtual address: where quinn sees its peer.
    let vaddr = conn.remote_address();
    if !client.track_session(tunnel, &conn, bind, peer, requester, peer_candidates) {
        conn.close(0u32.into(), b"relay connection closed");
    }
    let node = client.node().to_owned();
    let socket = path.socket.clone();
    runtime().spawn(async move {
        conn.closed().await;
        // The connection's last packets (its CONNECTION_CLOSE) still go
        // through the relay: tell it to forget the session only after they
        // had time to get there.
        tokio::time::sleep(SESSION_DRAIN).await;
        socket.remove_session(&vaddr);
        // The client holding it now: the one that opened it, or another
        // that took it over when that one's relay went.
        keep::session_closed(&node, &tunnel);
    });
}
