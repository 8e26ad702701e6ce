//! A minimal e2e node for tests and benchmarks: one endpoint on a
//! [`NodeSocket`], identified on a relay, that asks for sessions and
//! connects them end to end. (The NIF is the full client: tunnel matching,
//! Erlang ownership, timeouts.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use macula_relay_proto::node::paths::Route;
use macula_relay_proto::wire::dataplane::session_id;
use macula_relay_proto::{BindKey, FrameDecoder, Message, Mode, TunnelId, PROTOCOL_VERSION};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::time::timeout;

use crate::identity::{self, NodeIdentity, PeerCheck, E2E_SERVER_NAME};
use crate::node_socket::node_endpoint;
use crate::node_socket::NodeSocket;
use crate::relay_trust;
use macula_dist_quic::Transport;

const WAIT: Duration = Duration::from_secs(20);

pub struct E2eNode {
    pub name: String,
    pub endpoint: Endpoint,
    pub socket: Arc<NodeSocket>,
    pub relay_addr: SocketAddr,
    pub relay_conn: Connection,
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    queued: Vec<Message>,
    /// The peer candidates a relay of version 3 sent (`cand`), by session.
    pub candidates: std::collections::HashMap<TunnelId, Vec<SocketAddr>>,
    /// The address the relay sees this node at (`cand` without `tid`,
    /// version 4): what a peer may try for a direct path.
    pub reflexive: Option<SocketAddr>,
}

/// The two ends of a session, as each side's handshake ended.
pub struct Session {
    pub tunnel: TunnelId,
    pub requester: Result<Connection, quinn::ConnectionError>,
    pub target: Result<Connection, quinn::ConnectionError>,
    /// `[requester, target]` bind keys (tests replay them from elsewhere).
    pub binds: [BindKey; 2],
    /// `[requester, target]`: the path MTU the relay told each (`pmtu`).
    pub path_mtus: [Option<u16>; 2],
}

impl E2eNode {
    /// Joins the relay at `relay` (certificate pinned) as `name`.
    pub async fn join(relay: SocketAddr, pin: &str, name: &str) -> anyhow::Result<E2eNode> {
        Self::join_keyed(relay, pin, name, None).await
    }

    /// Joins showing `key` to the relay (the name is then that key's).
    pub async fn join_keyed(
        relay: SocketAddr,
        pin: &str,
        name: &str,
        key: Option<&NodeIdentity>,
    ) -> anyhow::Result<E2eNode> {
        let transport = Transport::default();
        let (mut endpoint, socket) = node_endpoint(&transport, "127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(relay_trust::client_config_with_key(
            &relay_trust::Trust::Pin(pin.into()),
            &transport,
            key,
        )?);
        let relay_conn = endpoint.connect(relay, "localhost")?.await?;
        let (send, recv) = relay_conn.open_bi().await?;
        let mut node = E2eNode {
            name: name.into(),
            endpoint,
            socket,
            relay_addr: relay,
            relay_conn,
            send,
            recv,
            decoder: FrameDecoder::default(),
            queued: vec![],
            candidates: Default::default(),
            reflexive: None,
        };
        node.send(Message::Identify {
            node: name.into(),
            token: None,
            version: Some(PROTOCOL_VERSION),
        })
        .await?;
        match node.next().await? {
            Message::Identified {
                version: Some(v), ..
            } if v >= 2 => Ok(node),
            other => bail!("expected id_ok of version 2, got {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: Message) -> anyhow::Result<()> {
        Ok(self.send.write_all(&msg.encode()).await?)
    }

    /// Writes control frames already encoded (tests send many at once).
    pub async fn send_frames(&mut self, frames: &[u8]) -> anyhow::Result<()> {
        Ok(self.send.write_all(frames).await?)
    }

    /// The next control message (a session's `cand` is kept aside, in
    /// `candidates`).
    pub async fn next(&mut self) -> anyhow::Result<Message> {
        loop {
            if !self.queued.is_empty() {
                match self.queued.remove(0) {
                    Message::Candidates {
                        tunnel: Some(t),
                        addrs,
                    } => {
                        self.candidates.insert(t, addrs);
                        continue;
                    }
                    Message::Candidates {
                        tunnel: None,
                        addrs,
                    } => {
                        self.reflexive = addrs.first().copied();
                        continue;
                    }
                    other => return Ok(other),
                }
            }
            self.read_more().await?;
        }
    }

    /// Reads the next chunk of the control stream into `queued`.
    async fn read_more(&mut self) -> anyhow::Result<()> {
        let chunk = timeout(WAIT, self.recv.read_chunk(65536, true))
            .await
            .context("control message in time")??
            .context("control stream ended")?;
        let mut input = &chunk.bytes[..];
        while let Some(m) = self.decoder.decode(&mut input)? {
            self.queued.push(m);
        }
        Ok(())
    }

    /// The peer's candidates the relay sent for `tunnel` (`cand`, right
    /// after `tun_ok` / `tun_notify`).
    pub async fn peer_candidates(&mut self, tunnel: &TunnelId) -> anyhow::Result<Vec<SocketAddr>> {
        loop {
            if let Some(c) = self.candidates.get(tunnel) {
                return Ok(c.clone());
            }
            if let Some(i) = self.queued.iter().position(
                |m| matches!(m, Message::Candidates { tunnel: Some(t), .. } if t == tunnel),
            ) {
                if let Message::Candidates { addrs, .. } = self.queued.remove(i) {
                    return Ok(addrs);
                }
            }
            self.read_more().await?;
        }
    }

    /// The address the relay sees this node at (`cand` without `tid`,
    /// sent right after `id_ok` by a relay of version 4).
    pub async fn reflexive_address(&mut self) -> anyhow::Result<SocketAddr> {
        loop {
            if let Some(a) = self.reflexive {
                return Ok(a);
            }
            if let Some(i) = self
                .queued
                .iter()
                .position(|m| matches!(m, Message::Candidates { tunnel: None, .. }))
            {
                if let Message::Candidates { addrs, .. } = self.queued.remove(i) {
                    self.reflexive = addrs.first().copied();
                    continue;
                }
            }
            self.read_more().await?;
        }
    }

    /// Routes a session through this node's socket; quinn reaches it at
    /// the returned address.
    pub fn route(&self, tunnel: &TunnelId, bind: BindKey) -> SocketAddr {
        self.socket.add_session(Route {
            relay: self.relay_addr,
            session: session_id(tunnel),
            bind,
        })
    }
}

/// Opens a session from `a` to `b`, each side keyed with its own cookie.
pub async fn session(
    a: &mut E2eNode,
    b: &mut E2eNode,
    a_cookie: &[u8],
    b_cookie: &[u8],
) -> anyhow::Result<Session> {
    a.send(Message::TunnelRequest {
        target: b.name.clone(),
        mode: Mode::E2e,
    })
    .await?;
    let Message::TunnelNotify {
        tunnel,
        source,
        bind: Some(b_bind),
        path_mtu: b_path_mtu,
    } = b.next().await?
    else {
        bail!("expected an e2e tun_notify")
    };
    ensure!(source == a.name, "tun_notify from {source}");
    let Message::TunnelOk {
        tunnel: granted,
        bind: Some(a_bind),
        path_mtu: a_path_mtu,
    } = a.next().await?
    else {
        bail!("expected an e2e tun_ok")
    };
    ensure!(tunnel == granted);
    let transport = Transport::default();
    // Each side computes its own key and the key it expects of the other.
    let a_me = NodeIdentity::derive(a_cookie, &a.name)?;
    let a_expects = PeerCheck::Key(NodeIdentity::derive(a_cookie, &b.name)?.spki);
    let b_me = NodeIdentity::derive(b_cookie, &b.name)?;
    let b_expects = PeerCheck::Key(NodeIdentity::derive(b_cookie, &a.name)?.spki);
    let b_vaddr = b.route(&tunnel, b_bind);
    let a_vaddr = a.route(&tunnel, a_bind);
    // As a node's sessions do: started at the path MTU the relay gave.
    let mut server_config = identity::server_config(&b_me, b_expects, &transport)?;
    if let Some(t) = transport.e2e_session_quinn_config(b_path_mtu)? {
        server_config.transport_config(t);
    }
    let server_config = Arc::new(server_config);
    let b_endpoint = b.endpoint.clone();
    let accept = tokio::spawn(async move {
        let incoming = timeout(WAIT, b_endpoint.accept())
            .await
            .context("incoming session in time")?
            .context("endpoint closed")?;
        ensure!(
            incoming.remote_address() == b_vaddr,
            "session from elsewhere"
        );
        Ok(incoming.accept_with(server_config)?.await)
    });
    let mut client_config = identity::client_config(&a_me, a_expects, &transport)?;
    if let Some(t) = transport.e2e_session_quinn_config(a_path_mtu)? {
        client_config.transport_config(t);
    }
    let requester = a
        .endpoint
        .connect_with(client_config, a_vaddr, E2E_SERVER_NAME)?
        .await;
    let target = accept.await??;
    Ok(Session {
        tunnel,
        requester,
        target,
        binds: [a_bind, b_bind],
        path_mtus: [a_path_mtu, b_path_mtu],
    })
}
