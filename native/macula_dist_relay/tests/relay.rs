//! Real quinn clients against a real relay on 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use macula_dist_relay::{close_code, Config};
use macula_relay_proto::{Message, TunnelId};
use quinn::ConnectionError;
use tokio::time::timeout;

#[tokio::test]
async fn identify_is_answered() {
    let relay = relay().await;
    let _a = Node::identify(&relay, "a@host").await;
    assert_eq!(relay.stats().nodes, 1);
    relay.stop().await;
}

#[tokio::test]
async fn tunnel_carries_16_mib_each_way_intact() {
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    let (_, (mut a_send, mut a_recv), (mut b_send, mut b_recv)) =
        tunnel(&mut a, &mut b, "b@host").await;
    let a_to_b = random_bytes(16 << 20);
    let b_to_a = random_bytes(16 << 20);
    let (a_got, b_got) = tokio::join!(
        exchange(&mut a_send, &mut a_recv, &a_to_b),
        exchange(&mut b_send, &mut b_recv, &b_to_a)
    );
    assert!(a_got == b_to_a, "a received b's bytes intact");
    assert!(b_got == a_to_b, "b received a's bytes intact");
    relay.stop().await;
}

#[tokio::test]
async fn tunnel_errors_name_their_reason() {
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    assert_eq!(
        a.request("nobody@host").await,
        Err("target_not_connected".into())
    );
    assert_eq!(a.request("a@host").await, Err("self_tunnel".into()));
    relay.stop().await;
}

#[tokio::test]
async fn tunnel_request_before_identify_is_refused() {
    let relay = relay().await;
    let mut a = Node::raw(&relay).await;
    assert_eq!(a.request("b@host").await, Err("not_identified".into()));
    relay.stop().await;
}

/// A node whose connection no longer answers (black-holed by a proxy) is
/// replaced by a new connection with its name; its tunnels go with it.
#[tokio::test]
async fn reidentify_replaces_the_stale_node() {
    let relay = relay().await;
    let proxy = macula_impair::Impair::start(macula_impair::Config::new(
        "127.0.0.1:0".parse().unwrap(),
        relay.local_addr(),
    ))
    .await
    .unwrap();
    let mut old = Node::identify_at(proxy.local_addr(), relay.fingerprint(), "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    let (_, _old_end, (_b_send, mut b_recv)) = tunnel(&mut b, &mut old, "a@host").await;
    proxy.controls().blackhole(true);
    let mut new = Node::identify(&relay, "a@host").await;
    // The tunnel to the stale node is gone.
    assert!(b_recv.read_to_end(1024).await.is_err());
    // New tunnels go to the newest connection.
    let (_, (mut b_send, mut b_recv), (mut n_send, mut n_recv)) =
        tunnel(&mut b, &mut new, "a@host").await;
    let (x, y) = tokio::join!(
        exchange(&mut b_send, &mut b_recv, b"to new"),
        exchange(&mut n_send, &mut n_recv, b"from new")
    );
    assert_eq!(
        (x.as_slice(), y.as_slice()),
        (&b"from new"[..], &b"to new"[..])
    );
    assert_eq!(relay.stats().nodes, 2);
    relay.stop().await;
    proxy.stop().await;
}

/// Two live nodes with one name are two nodes, not a restart: the second
/// is refused with `name_taken`, and the first keeps its connection, its
/// name and its tunnels. (Before: the newest took the name, and two nodes
/// started with one name took it from each other for as long as both ran.)
#[tokio::test]
async fn a_live_name_is_not_taken() {
    let relay = relay().await;
    let mut first = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    let (_, (mut b_send, mut b_recv), (mut a_send, mut a_recv)) =
        tunnel(&mut b, &mut first, "a@host").await;
    let mut second = Node::raw(&relay).await;
    second
        .send(Message::Identify {
            node: "a@host".into(),
            token: None,
            version: Some(2),
        })
        .await;
    assert_eq!(
        second.next().await,
        Some(Message::IdentifyRefused {
            reason: "name_taken".into()
        })
    );
    let (x, y) = tokio::join!(
        exchange(&mut b_send, &mut b_recv, b"still you?"),
        exchange(&mut a_send, &mut a_recv, b"still me")
    );
    assert_eq!(
        (x.as_slice(), y.as_slice()),
        (&b"still me"[..], &b"still you?"[..])
    );
    assert!(first.conn.close_reason().is_none());
    assert_eq!(relay.stats().nodes, 2);
    relay.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_tunnels_from_both_sides() {
    const EACH_SIDE: usize = 25;
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    for _ in 0..EACH_SIDE {
        a.send(Message::TunnelRequest {
            target: "b@host".into(),
            mode: macula_relay_proto::Mode::Stream,
        })
        .await;
        b.send(Message::TunnelRequest {
            target: "a@host".into(),
            mode: macula_relay_proto::Mode::Stream,
        })
        .await;
    }
    // Each side sees its own answers and the other's notifications, interleaved.
    async fn collect(node: &mut Node) -> (Vec<TunnelId>, Vec<TunnelId>) {
        let (mut mine, mut theirs) = (vec![], vec![]);
        while mine.len() < EACH_SIDE || theirs.len() < EACH_SIDE {
            match node.next().await {
                Some(Message::TunnelOk { tunnel, .. }) => mine.push(tunnel),
                Some(Message::TunnelNotify { tunnel, .. }) => theirs.push(tunnel),
                other => panic!("unexpected {other:?}"),
            }
        }
        (mine, theirs)
    }
    let ((a_mine, a_theirs), (b_mine, b_theirs)) = tokio::join!(collect(&mut a), collect(&mut b));
    let mut a_sorted = a_mine.clone();
    a_sorted.sort();
    let mut b_theirs_sorted = b_theirs.clone();
    b_theirs_sorted.sort();
    assert_eq!(a_sorted, b_theirs_sorted);
    assert_eq!(relay.stats().tunnels, 2 * EACH_SIDE);
    let mut tasks = tokio::task::JoinSet::new();
    for id in a_mine.into_iter().chain(b_mine) {
        let (mut x_send, mut x_recv) = a.stream(id).await;
        let (mut y_send, mut y_recv) = b.stream(id).await;
        tasks.spawn(async move {
            let x_data = random_bytes(256 * 1024);
            let y_data = random_bytes(128 * 1024);
            let (x_got, y_got) = tokio::join!(
                exchange(&mut x_send, &mut x_recv, &x_data),
                exchange(&mut y_send, &mut y_recv, &y_data)
            );
            assert!(x_got == y_data && y_got == x_data, "tunnel {id} intact");
        });
    }
    assert_eq!(a_theirs.len(), EACH_SIDE);
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
        done += 1;
    }
    assert_eq!(done, 2 * EACH_SIDE);
    relay.stop().await;
}

async fn assert_closed(recv: &mut quinn::RecvStream) {
    let end = timeout(WAIT, recv.read_to_end(usize::MAX))
        .await
        .expect("closes in time");
    assert!(end.is_err(), "stream was reset, got {end:?}");
}

#[tokio::test]
async fn tun_close_from_either_side_closes_both_streams() {
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    for closer_is_a in [true, false] {
        let (id, (_a_send, mut a_recv), (_b_send, mut b_recv)) =
            tunnel(&mut a, &mut b, "b@host").await;
        let closer = if closer_is_a { &mut a } else { &mut b };
        closer.send(Message::TunnelClose { tunnel: id }).await;
        assert_closed(&mut a_recv).await;
        assert_closed(&mut b_recv).await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_node_leaving_closes_its_peers_tunnels() {
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    let (_, _a_end, (_b_send, mut b_recv)) = tunnel(&mut a, &mut b, "b@host").await;
    a.conn.close(0u32.into(), b"bye");
    assert_closed(&mut b_recv).await;
    // a's name is free and the relay routes nothing to it.
    timeout(WAIT, async {
        while relay.stats().nodes != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(
        b.request("a@host").await,
        Err("target_not_connected".into())
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_finish_reaches_the_other_side_as_a_finish() {
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    let (_, (mut a_send, mut a_recv), (mut b_send, mut b_recv)) =
        tunnel(&mut a, &mut b, "b@host").await;
    a_send.write_all(b"last words").await.unwrap();
    a_send.finish().unwrap();
    assert_eq!(b_recv.read_to_end(1024).await.unwrap(), b"last words");
    // Half-closed: the other direction still works.
    b_send.write_all(b"reply").await.unwrap();
    b_send.finish().unwrap();
    assert_eq!(a_recv.read_to_end(1024).await.unwrap(), b"reply");
    relay.stop().await;
}

/// What a node sees after sending something it should not.
async fn answer_to(relay: &macula_dist_relay::Relay, bytes: &[u8]) -> (Node, Option<Message>) {
    let mut node = Node::raw(relay).await;
    node.send_raw(bytes).await;
    let msg = node.next().await;
    (node, msg)
}

async fn closed_with(node: &Node, code: u32) {
    match timeout(WAIT, node.conn.closed()).await.unwrap() {
        ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, code.into()),
        other => panic!("connection ended with {other:?}"),
    }
}

fn err(reason: &str) -> Option<Message> {
    Some(Message::ProtocolError {
        reason: reason.into(),
    })
}

#[tokio::test]
async fn bad_input_gets_its_answer_and_the_relay_keeps_serving() {
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;

    let (garbage, msg) = answer_to(&relay, &[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]).await;
    assert_eq!(msg, err("bad_frame"));
    closed_with(&garbage, close_code::PROTOCOL_ERROR).await;

    let (huge, msg) = answer_to(&relay, &[0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(msg, err("frame_too_large"));
    closed_with(&huge, close_code::PROTOCOL_ERROR).await;

    let mut unknown = vec![0, 0, 0, 0];
    rmpv::encode::write_value(
        &mut unknown,
        &rmpv::Value::Map(vec![("t".into(), "bogus".into())]),
    )
    .unwrap();
    unknown[3] = (unknown.len() - 4) as u8;
    let (mut node, msg) = answer_to(&relay, &unknown).await;
    assert_eq!(msg, err("unknown_type"));
    // An unknown type costs only that frame: the connection goes on.
    node.send(Message::Identify {
        node: "c@host".into(),
        token: None,
        version: None,
    })
    .await;
    assert!(matches!(
        node.next().await,
        Some(Message::Identified { .. })
    ));

    let (_, msg) = answer_to(&relay, &Message::Identified { version: None }.encode()).await;
    assert_eq!(msg, err("unexpected_type"));

    let (bad_name, msg) = answer_to(
        &relay,
        &Message::Identify {
            node: "no spaces@host".into(),
            token: None,
            version: None,
        }
        .encode(),
    )
    .await;
    assert_eq!(
        msg,
        Some(Message::IdentifyRefused {
            reason: "bad_name".into()
        })
    );
    closed_with(&bad_name, close_code::REFUSED).await;

    // Peers vanishing mid-frame.
    let mut vanish = Node::raw(&relay).await;
    let mut partial = Message::TunnelRequest {
        target: "a@host".into(),
        mode: macula_relay_proto::Mode::Stream,
    }
    .encode();
    partial.truncate(6);
    vanish.send_raw(&partial).await;
    vanish.conn.close(0u32.into(), b"gone");

    // Through all of it, a and b kept their tunnel service.
    let (_, (mut a_send, mut a_recv), (mut b_send, mut b_recv)) =
        tunnel(&mut a, &mut b, "b@host").await;
    let (x, y) = tokio::join!(
        exchange(&mut a_send, &mut a_recv, b"ping"),
        exchange(&mut b_send, &mut b_recv, b"pong")
    );
    assert_eq!((x.as_slice(), y.as_slice()), (&b"pong"[..], &b"ping"[..]));
    relay.stop().await;
}

#[tokio::test]
async fn tokens_are_checked() {
    let relay = relay_with(Config {
        token: Some("s3cret".into()),
        ..Config::loopback()
    })
    .await;
    for token in [None, Some("wrong")] {
        let mut node = Node::raw(&relay).await;
        node.send(Message::Identify {
            node: "a@host".into(),
            token: token.map(Into::into),
            version: None,
        })
        .await;
        assert_eq!(
            node.next().await,
            Some(Message::IdentifyRefused {
                reason: "bad_token".into()
            })
        );
        closed_with(&node, close_code::REFUSED).await;
    }
    let _ok = Node::identify_with(&relay, "a@host", Some("s3cret")).await;
    assert_eq!(relay.stats().nodes, 1);
    relay.stop().await;
}

#[tokio::test]
async fn connections_that_never_identify_are_closed() {
    let relay = relay_with(Config {
        identify_timeout: Duration::from_millis(300),
        ..Config::loopback()
    })
    .await;
    let mut silent = Node::raw(&relay).await;
    silent.send_raw(&[0, 0]).await;
    assert_eq!(
        silent.next().await,
        Some(Message::IdentifyRefused {
            reason: "identify_timeout".into()
        })
    );
    closed_with(&silent, close_code::IDENTIFY_TIMEOUT).await;
    relay.stop().await;
}

#[tokio::test]
async fn tunnel_limit_is_enforced() {
    let relay = relay_with(Config {
        limits: macula_dist_relay::Limits {
            max_tunnels_per_node: 2,
            ..Default::default()
        },
        ..Config::loopback()
    })
    .await;
    let mut a = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    // Held open: dropping a tunnel's streams closes it.
    let _first = tunnel(&mut a, &mut b, "b@host").await;
    let _second = tunnel(&mut a, &mut b, "b@host").await;
    assert_eq!(a.request("b@host").await, Err("too_many_tunnels".into()));
    relay.stop().await;
}

#[tokio::test]
async fn relay_stop_reaches_the_nodes() {
    let relay = relay().await;
    let a = Node::identify(&relay, "a@host").await;
    relay.stop().await;
    closed_with(&a, close_code::NORMAL).await;
}

/// A target that grants no streams stalls only its own tunnel: the
/// relay goes on with the requester's next request at once (the second
/// target is notified, and its stream opened, before the first request
/// is answered), and the answers still come in request order.
#[tokio::test]
async fn a_stalled_target_does_not_hold_up_other_requests() {
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    let stalled_transport = macula_dist_quic::Transport {
        max_streams: 0,
        ..Default::default()
    };
    let stalled_conn =
        connect_with(relay.local_addr(), relay.fingerprint(), &stalled_transport).await;
    let _stalled = Node::identify_on(stalled_conn, "stalled@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    for target in ["stalled@host", "b@host"] {
        a.send(Message::TunnelRequest {
            target: target.into(),
            mode: macula_relay_proto::Mode::Stream,
        })
        .await;
    }
    // b hears of its tunnel while the stalled one is still pending.
    let (tunnel, source) = b.notified().await;
    assert_eq!(source, "a@host");
    let _b_end = b.stream(tunnel).await;
    // ... and a has no answer yet: the stalled one comes first, after the
    // relay gave up opening its stream (10 s).
    assert!(
        timeout(Duration::from_millis(500), a.next()).await.is_err(),
        "an answer came before the stalled request's"
    );
    // The answers, in order: the stalled target's first.
    assert_eq!(
        a.next().await,
        Some(Message::TunnelError {
            reason: "open_failed".into()
        })
    );
    assert_eq!(
        a.next().await,
        Some(Message::TunnelOk {
            tunnel,
            bind: None,
            path_mtu: None
        })
    );
    relay.stop().await;
}

/// A side that is done with a tunnel (it stops reading, STOP_SENDING, and
/// finishes its own direction) frees the tunnel's slot at once, even if the
/// other side never sends again. (Before, the relay noticed a stop only at
/// its next write, so such a tunnel kept its slot.)
#[tokio::test]
async fn a_stopped_side_frees_the_tunnel() {
    let relay = relay().await;
    let mut a = Node::identify(&relay, "a@host").await;
    let mut b = Node::identify(&relay, "b@host").await;
    let (_, (_a_send, mut a_recv), (mut b_send, mut b_recv)) =
        tunnel(&mut a, &mut b, "b@host").await;
    assert_eq!(relay.stats().tunnels, 1);
    b_recv.stop(0u32.into()).unwrap();
    b_send.finish().unwrap();
    assert_eq!(a_recv.read_to_end(1024).await.unwrap(), b"");
    timeout(WAIT, async {
        while relay.stats().tunnels != 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the tunnel is freed");
    relay.stop().await;
}
