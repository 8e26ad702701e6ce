#![allow(unreachable_pub)] // helpers shared by the test binaries
//! A minimal relay client for tests, on quinn and the proto crate's codec.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use macula_dist_relay::{Config, Relay};
use macula_relay_proto::{FrameDecoder, Message, TunnelId};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::Notify;
use tokio::time::timeout;

pub const WAIT: Duration = Duration::from_secs(20);

pub async fn relay() -> Relay {
    relay_with(Config::loopback()).await
}

pub async fn relay_with(config: Config) -> Relay {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    Relay::start(config).await.expect("relay starts")
}

pub async fn connect(relay: &Relay) -> Connection {
    connect_to(relay.local_addr(), relay.fingerprint()).await
}

pub async fn connect_to(addr: SocketAddr, pin: &str) -> Connection {
    connect_with(addr, pin, &macula_dist_quic::Transport::default()).await
}

pub async fn connect_with(
    addr: SocketAddr,
    pin: &str,
    transport: &macula_dist_quic::Transport,
) -> Connection {
    let mut endpoint = transport
        .client_endpoint("127.0.0.1:0".parse().unwrap())
        .unwrap();
    let config = macula_dist_node::relay_trust::client_config(
        &macula_dist_node::relay_trust::Trust::Pin(pin.into()),
        transport,
    )
    .unwrap();
    endpoint.set_default_client_config(config);
    endpoint
        .connect(addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake")
}

pub type Tunnel = (SendStream, RecvStream);

/// One node's view of the relay: its control stream, and the tunnel streams
/// the relay opened to it, indexed by the id in their prefix.
pub struct Node {
    pub conn: Connection,
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    queued: VecDeque<Message>,
    streams: Arc<(Mutex<HashMap<TunnelId, Tunnel>>, Notify)>,
}

impl Node {
    /// Connects and opens the control stream; does not identify.
    pub async fn raw(relay: &Relay) -> Node {
        Node::on(connect(relay).await).await
    }

    /// Opens the control stream on `conn`; does not identify.
    pub async fn on(conn: Connection) -> Node {
        let (send, recv) = conn.open_bi().await.unwrap();
        let streams: Arc<(Mutex<HashMap<TunnelId, Tunnel>>, Notify)> = Default::default();
        let acceptor = streams.clone();
        let c = conn.clone();
        tokio::spawn(async move {
            while let Ok((send, mut recv)) = c.accept_bi().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut prefix = [0u8; 32];
                    if recv.read_exact(&mut prefix).await.is_ok() {
                        let id = TunnelId::parse(&prefix).expect("well-formed prefix");
                        acceptor.0.lock().unwrap().insert(id, (send, recv));
                        acceptor.1.notify_waiters();
                    }
                });
            }
        });
        Node {
            conn,
            send,
            recv,
            decoder: FrameDecoder::default(),
            queued: VecDeque::new(),
            streams,
        }
    }

    pub async fn identify(relay: &Relay, name: &str) -> Node {
        Self::identify_with(relay, name, None).await
    }

    /// Identifies through another address (a proxy in front of the relay).
    pub async fn identify_at(addr: SocketAddr, pin: &str, name: &str) -> Node {
        Self::identify_on(connect_to(addr, pin).await, name).await
    }

    /// Identifies on an open connection.
    pub async fn identify_on(conn: Connection, name: &str) -> Node {
        let mut node = Node::on(conn).await;
        node.send(Message::Identify {
            node: name.into(),
            token: None,
            version: Some(1),
        })
        .await;
        assert_eq!(
            node.next().await,
            Some(Message::Identified { version: None })
        );
        node
    }

    pub async fn identify_with(relay: &Relay, name: &str, token: Option<&str>) -> Node {
        let mut node = Node::raw(relay).await;
        node.send(Message::Identify {
            node: name.into(),
            token: token.map(Into::into),
            version: Some(1),
        })
        .await;
        assert!(matches!(
            node.next().await,
            Some(Message::Identified { .. })
        ));
        node
    }

    pub async fn send(&mut self, msg: Message) {
        self.send_raw(&msg.encode()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// The next control message, or `None` once the relay ends the stream.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.queued.pop_front() {
                return Some(m);
            }
            let chunk = timeout(WAIT, self.recv.read_chunk(64 * 1024, true))
                .await
                .expect("relay answers in time");
            let Ok(Some(chunk)) = chunk else { return None };
            let mut input = &chunk.bytes[..];
            while let Some(m) = self
                .decoder
                .decode(&mut input)
                .expect("relay sends valid frames")
            {
                self.queued.push_back(m);
            }
        }
    }

    /// The tunnel stream with this id, waiting for it if need be.
    pub async fn stream(&self, id: TunnelId) -> Tunnel {
        timeout(WAIT, async {
            loop {
                let notified = self.streams.1.notified();
                if let Some(t) = self.streams.0.lock().unwrap().remove(&id) {
                    return t;
                }
                notified.await;
            }
        })
        .await
        .expect("tunnel stream arrives")
    }

    /// Asks for a tunnel to `target`; returns its id or the relay's reason.
    pub async fn request(&mut self, target: &str) -> Result<TunnelId, String> {
        self.send(Message::TunnelRequest {
            target: target.into(),
            mode: macula_relay_proto::Mode::Stream,
        })
        .await;
        match self.next().await {
            Some(Message::TunnelOk { tunnel, .. }) => Ok(tunnel),
            Some(Message::TunnelError { reason }) => Err(reason),
            other => panic!("expected a tunnel answer, got {other:?}"),
        }
    }

    /// Waits for a `tun_notify`.
    pub async fn notified(&mut self) -> (TunnelId, String) {
        match self.next().await {
            Some(Message::TunnelNotify { tunnel, source, .. }) => (tunnel, source),
            other => panic!("expected tun_notify, got {other:?}"),
        }
    }
}

/// Opens a tunnel from `a` to `b`: (a's end, b's end).
pub async fn tunnel(a: &mut Node, b: &mut Node, b_name: &str) -> (TunnelId, Tunnel, Tunnel) {
    let id = a.request(b_name).await.expect("tunnel granted");
    let (notified, _) = b.notified().await;
    assert_eq!(notified, id);
    (id, a.stream(id).await, b.stream(id).await)
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut v);
    v
}

/// Sends `data` on `send` and finishes, while reading `recv` to its end.
pub async fn exchange(send: &mut SendStream, recv: &mut RecvStream, data: &[u8]) -> Vec<u8> {
    let writer = async {
        send.write_all(data).await.unwrap();
        send.finish().unwrap();
    };
    let reader = async { recv.read_to_end(usize::MAX).await.unwrap() };
    let ((), got) = tokio::join!(writer, reader);
    got
}
