//! Version 2: end-to-end QUIC between two nodes through the blind relay.
//! Each node is one quinn endpoint on a `NodeSocket`: its relay connection
//! and its e2e sessions share one UDP socket.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{random_bytes, relay, WAIT};
use macula_dist_relay::identity::{self, NodeIdentity, E2E_SERVER_NAME};
use macula_dist_relay::node_socket::NodeSocket;
use macula_dist_relay::{tls, Relay};
use macula_relay_proto::dataplane::session_id;
use macula_relay_proto::paths::Route;
use macula_relay_proto::{BindKey, FrameDecoder, Message, Mode, TunnelId, PROTOCOL_VERSION};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::time::timeout;

struct E2eNode {
    name: String,
    endpoint: Endpoint,
    socket: Arc<NodeSocket>,
    relay_addr: SocketAddr,
    relay_conn: Connection,
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    queued: Vec<Message>,
}

impl E2eNode {
    async fn join(relay: &Relay, name: &str) -> E2eNode {
        let transport = tls::Transport::default();
        let (mut endpoint, socket) = transport
            .node_endpoint("127.0.0.1:0".parse().unwrap())
            .unwrap();
        endpoint.set_default_client_config(
            tls::client_config(&tls::Trust::Pin(relay.fingerprint().into()), &transport).unwrap(),
        );
        let relay_conn = endpoint
            .connect(relay.local_addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = relay_conn.open_bi().await.unwrap();
        let mut node = E2eNode {
            name: name.into(),
            endpoint,
            socket,
            relay_addr: relay.local_addr(),
            relay_conn,
            send,
            recv,
            decoder: FrameDecoder::default(),
            queued: vec![],
        };
        node.send(Message::Identify {
            node: name.into(),
            token: None,
            version: Some(PROTOCOL_VERSION),
        })
        .await;
        assert_eq!(
            node.next().await,
            Message::Identified {
                version: Some(PROTOCOL_VERSION)
            }
        );
        node
    }

    async fn send(&mut self, msg: Message) {
        self.send.write_all(&msg.encode()).await.unwrap();
    }

    async fn next(&mut self) -> Message {
        loop {
            if !self.queued.is_empty() {
                return self.queued.remove(0);
            }
            let chunk = timeout(WAIT, self.recv.read_chunk(65536, true))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let mut input = &chunk.bytes[..];
            while let Some(m) = self.decoder.decode(&mut input).unwrap() {
                self.queued.push(m);
            }
        }
    }

    fn route(&self, tunnel: &TunnelId, bind: BindKey) -> SocketAddr {
        self.socket.add_session(Route {
            relay: self.relay_addr,
            session: session_id(tunnel),
            bind,
        })
    }
}

/// A session from `a` to `b` with the given cookies; returns both ends'
/// connections (or the handshake errors).
async fn session(
    a: &mut E2eNode,
    b: &mut E2eNode,
    a_cookie: &[u8],
    b_cookie: &[u8],
) -> (
    Result<Connection, quinn::ConnectionError>,
    Result<Connection, quinn::ConnectionError>,
    TunnelId,
) {
    a.send(Message::TunnelRequest {
        target: b.name.clone(),
        mode: Mode::E2e,
    })
    .await;
    let Message::TunnelNotify {
        tunnel,
        source,
        bind: Some(b_bind),
    } = b.next().await
    else {
        panic!("expected an e2e tun_notify")
    };
    assert_eq!(source, a.name);
    let Message::TunnelOk {
        tunnel: t2,
        bind: Some(a_bind),
    } = a.next().await
    else {
        panic!("expected an e2e tun_ok")
    };
    assert_eq!(tunnel, t2);
    let transport = tls::Transport::default();
    // Each side computes its own key and the key it expects of the other.
    let a_me = NodeIdentity::derive(a_cookie, &a.name).unwrap();
    let a_expects = NodeIdentity::derive(a_cookie, &b.name).unwrap().spki;
    let b_me = NodeIdentity::derive(b_cookie, &b.name).unwrap();
    let b_expects = NodeIdentity::derive(b_cookie, &a.name).unwrap().spki;
    let b_vaddr = b.route(&tunnel, b_bind);
    let a_vaddr = a.route(&tunnel, a_bind);
    let server_config = identity::server_config(&b_me, b_expects, &transport).unwrap();
    let b_endpoint = b.endpoint.clone();
    let accept = tokio::spawn(async move {
        let incoming = timeout(WAIT, b_endpoint.accept()).await.unwrap().unwrap();
        assert_eq!(incoming.remote_address(), b_vaddr);
        incoming.accept_with(Arc::new(server_config)).unwrap().await
    });
    let client_config = identity::client_config(&a_me, a_expects, &transport).unwrap();
    let a_end = a
        .endpoint
        .connect_with(client_config, a_vaddr, E2E_SERVER_NAME)
        .unwrap()
        .await;
    let b_end = accept.await.unwrap();
    (a_end, b_end, tunnel)
}

async fn transfer(from: &Connection, to: &Connection, data: &[u8]) -> Vec<u8> {
    let (mut send, _) = from.open_bi().await.unwrap();
    let data2 = data.to_vec();
    let writer = tokio::spawn(async move {
        send.write_all(&data2).await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
    });
    let (_, mut recv) = timeout(WAIT, to.accept_bi()).await.unwrap().unwrap();
    let got = timeout(WAIT, recv.read_to_end(usize::MAX))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    got
}

#[tokio::test]
async fn nodes_talk_end_to_end_through_the_relay() {
    let relay = relay().await;
    let mut a = E2eNode::join(&relay, "a@h").await;
    let mut b = E2eNode::join(&relay, "b@h").await;
    let (a_end, b_end, tunnel) = session(&mut a, &mut b, b"cookie", b"cookie").await;
    let (a_end, b_end) = (a_end.unwrap(), b_end.unwrap());
    assert_eq!(relay.stats().sessions, 1);
    let data = random_bytes(4 << 20);
    assert!(transfer(&a_end, &b_end, &data).await == data);
    assert!(transfer(&b_end, &a_end, &data).await == data);
    let stats = relay.data_stats();
    assert!(stats.forwarded_bytes.load(Ordering::Relaxed) > 8 << 20);
    // The relay connection and the session used one local UDP port each
    // side: the relay saw every session datagram come from the node's
    // control address (no rebinding).
    assert_eq!(stats.rebinds.load(Ordering::Relaxed), 0);
    // Closing the tunnel removes the session from the data plane.
    a.send(Message::TunnelClose { tunnel }).await;
    timeout(WAIT, async {
        while relay.stats().sessions != 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    drop((a.relay_conn, b.relay_conn));
}

#[tokio::test]
async fn a_wrong_cookie_fails_the_handshake_on_both_sides() {
    let relay = relay().await;
    let mut a = E2eNode::join(&relay, "a@h").await;
    let mut b = E2eNode::join(&relay, "b@h").await;
    let (a_end, b_end, _) = session(&mut a, &mut b, b"guess", b"cookie").await;
    assert!(
        a_end.is_err(),
        "requester must refuse a server key it did not expect"
    );
    assert!(
        b_end.is_err(),
        "target must refuse a client key it did not expect"
    );
}

#[tokio::test]
async fn what_the_relay_alters_or_forges_is_never_delivered() {
    let relay = relay().await;
    let mut a = E2eNode::join(&relay, "a@h").await;
    let mut b = E2eNode::join(&relay, "b@h").await;
    let (a_end, b_end, tunnel) = session(&mut a, &mut b, b"cookie", b"cookie").await;
    let (a_end, b_end) = (a_end.unwrap(), b_end.unwrap());
    let (mut send, _) = a_end.open_bi().await.unwrap();
    send.write_all(b"open").await.unwrap();
    let (_, mut recv) = b_end.accept_bi().await.unwrap();
    let mut first = [0u8; 4];
    recv.read_exact(&mut first).await.unwrap();
    let lost_before = b_end.stats().path.lost_packets + a_end.stats().path.lost_packets;

    // The relay flips a byte in the next forwarded datagrams and forges
    // some of its own, straight to b's address.
    relay.data_socket().tamper().flip_next = 3;
    let b_addr = b.endpoint.local_addr().unwrap();
    for i in 0..20u8 {
        let forged = vec![0x40 | (i & 0x3f); 200];
        relay
            .data_socket()
            .forge(b_addr, session_id(&tunnel), &forged)
            .unwrap();
    }
    let data = random_bytes(1 << 20);
    let data2 = data.clone();
    let writer = tokio::spawn(async move {
        send.write_all(&data2).await.unwrap();
        send.finish().unwrap();
        send
    });
    let got = timeout(WAIT, recv.read_to_end(usize::MAX))
        .await
        .unwrap()
        .unwrap();
    let _send = writer.await.unwrap();
    // Everything arrived, unaltered: the corrupted datagrams failed QUIC's
    // authentication and were dropped (then resent as lost), the forged
    // ones were dropped, and the connection lives on.
    assert_eq!(relay.data_socket().tamper().flipped, 3);
    assert!(got == data, "delivered data differs from what was sent");
    assert!(a_end.close_reason().is_none() && b_end.close_reason().is_none());
    let lost_after = b_end.stats().path.lost_packets + a_end.stats().path.lost_packets;
    assert!(
        lost_after > lost_before,
        "the altered datagrams were dropped, then resent"
    );

    // A stranger's datagram with a wrong bind key is dropped at the relay.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let before = relay.data_stats().dropped_bad_bind.load(Ordering::Relaxed);
    let mut d = macula_relay_proto::dataplane::header(session_id(&tunnel), &[7; 8]).to_vec();
    d.extend_from_slice(&[0x40; 100]);
    stranger.send_to(&d, relay.local_addr()).unwrap();
    timeout(WAIT, async {
        while relay.data_stats().dropped_bad_bind.load(Ordering::Relaxed) == before {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
}
