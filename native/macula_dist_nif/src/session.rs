//! A client's e2e sessions: the requester connects to the target's node
//! through the relay (its socket routes the session's virtual address),
//! the target accepts the connection the relay announced, and both check
//! the other's key inside the TLS handshake ([`macula_dist_relay::identity`]).
//! The session's first stream becomes a tunnel, the same data path as a
//! stream tunnel's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use macula_dist_relay::identity::{self, NodeIdentity, PeerCheck, E2E_SERVER_NAME};
use macula_dist_relay::node_socket::NodeSocket;
use macula_relay_proto::dataplane::session_id;
use macula_relay_proto::paths::Route;
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
/// Derived keys kept, at most (one per (cookie, node name) in use).
const MAX_KEYS: usize = 256;

type KeyCache = HashMap<(Vec<u8>, String), Arc<NodeIdentity>>;
static KEYS: OnceLock<Mutex<KeyCache>> = OnceLock::new();

/// The key of `node` under `cookie` (derived once, then cached: deriving
/// signs a certificate).
fn key(cookie: &[u8], node: &str) -> anyhow::Result<Arc<NodeIdentity>> {
    let cache = KEYS.get_or_init(Default::default);
    let k = (cookie.to_vec(), node.to_string());
    if let Some(id) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&k) {
        return Ok(id.clone());
    }
    let id = Arc::new(NodeIdentity::derive(cookie, node)?);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= MAX_KEYS {
        cache.clear();
    }
    cache.insert(k, id.clone());
    Ok(id)
}

/// This node's identity in a session with `peer`, and what `peer` must
/// show: the cluster CA's, or the keys derived from the cookie.
fn identities(
    client: &Client,
    cookie: &[u8],
    peer: &str,
) -> anyhow::Result<(Arc<NodeIdentity>, PeerCheck)> {
    match &client.cluster {
        Some(cluster) => Ok((cluster.me.clone(), cluster.check_of(peer))),
        None => Ok((
            key(cookie, client.node())?,
            PeerCheck::Key(key(cookie, peer)?.spki.clone()),
        )),
    }
}

/// Where a client's sessions run: its endpoint's socket and its relay.
#[derive(Clone)]
pub struct Path {
    pub endpoint: quinn::Endpoint,
    pub socket: Arc<NodeSocket>,
    pub inbound: InboundTable,
    pub relay: SocketAddr,
    pub transport: macula_dist_relay::tls::Transport,
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
            let (me, expected) = identities(&client, &cookie, &target)?;
            let config = identity::client_config(&me, expected, &path.transport)?;
            let conn = path
                .endpoint
                .connect_with(config, vaddr, E2E_SERVER_NAME)?
                .await?;
            let (mut send, recv) = conn.open_bi().await?;
            // The stream starts with the tunnel id, as a stream tunnel's
            // does: the target sees the stream at once and checks the id.
            send.write_all(&tunnel.to_hex()).await?;
            anyhow::Ok((conn, send, recv))
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("session setup timed out")));
        match opened {
            Ok((conn, send, recv)) => {
                watch(&client, &path, tunnel, conn.clone(), bind, &target, true);
                client.session_stream(tunnel, streams(conn, send, recv, &path.socket));
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
    config: Arc<quinn::ServerConfig>,
}

/// The target's side: ready the session (keys for `source` under
/// `cookie`), then route it, so its connection is accepted as it comes.
pub fn expect(
    client: &Arc<Client>,
    path: Path,
    tunnel: TunnelId,
    source: String,
    bind: BindKey,
    cookie: &[u8],
) -> anyhow::Result<()> {
    let (me, expected) = identities(client, cookie, &source)?;
    let config = Arc::new(identity::server_config(&me, expected, &path.transport)?);
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
                config,
            },
        )
    });
    // A session whose requester never comes is forgotten.
    runtime().spawn(async move {
        tokio::time::sleep(SESSION_SETUP).await;
        if inbound.forget(&vaddr).is_some() {
            socket.remove_session(&vaddr);
        }
    });
    Ok(())
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
                let conn = incoming.accept_with(self.config.clone())?.await?;
                let (send, recv) = conn.accept_bi().await?;
                let (tunnel, mut streams) = read_prefix(send, recv).await?;
                anyhow::ensure!(
                    tunnel == self.tunnel,
                    "the session's stream names tunnel {tunnel}"
                );
                streams.conn = Some(conn.clone());
                streams.socket = Some(self.path.socket.clone());
                anyhow::Ok((conn, streams))
            })
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("session setup timed out")));
            match accepted {
                Ok((conn, streams)) => {
                    let bind = self.bind;
                    watch(
                        &client,
                        &self.path,
                        self.tunnel,
                        conn,
                        bind,
                        &self.source,
                        false,
                    );
                    client.session_stream(self.tunnel, streams);
                }
                Err(e) => {
                    // A peer without the cookie ends here: no byte of it
                    // reached Erlang.
                    self.path.socket.remove_session(&self.vaddr);
                    client.count_refused_session();
                    client.log(
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
fn watch(
    client: &Arc<Client>,
    path: &Path,
    tunnel: TunnelId,
    conn: quinn::Connection,
    bind: BindKey,
    peer: &str,
    requester: bool,
) {
    // The session's virtual address: where quinn sees its peer.
    let vaddr = conn.remote_address();
    if !client.track_session(tunnel, &conn, bind, peer, requester) {
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
