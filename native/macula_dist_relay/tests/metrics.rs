//! The relay's Prometheus endpoint, scraped during transfers: the counters
//! move; and its JSON logs.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{random_bytes, relay_with, tunnel, Node};
use macula_dist_node::e2e_node::{self, E2eNode};
use macula_dist_relay::Config;

/// `GET /metrics` over plain TCP: the body.
fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split("\r\n\r\n").nth(1).unwrap().to_string()
}

/// The value of one sample line (`name{labels} value`).
fn value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in\n{text}"))
}

// Scrapes block a worker: the relay needs another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_during_transfers() {
    let relay = relay_with(Config {
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::loopback()
    })
    .await;
    let addr = relay.metrics_addr().unwrap();
    let before = scrape(addr);
    assert_eq!(value(&before, "macula_relay_forwarded_bytes_total"), 0.0);

    // An e2e session carrying 32 MiB, scraped while it runs.
    let mut a = E2eNode::join(relay.local_addr(), relay.fingerprint(), "a@h")
        .await
        .unwrap();
    let mut b = E2eNode::join(relay.local_addr(), relay.fingerprint(), "b@h")
        .await
        .unwrap();
    let s = e2e_node::session(&mut a, &mut b, b"c", b"c").await.unwrap();
    let (from, to) = (s.requester.unwrap(), s.target.unwrap());
    let data = random_bytes(32 << 20);
    let (mut send, _) = from.open_bi().await.unwrap();
    let writer = tokio::spawn(async move {
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        send
    });
    let (_, mut recv) = to.accept_bi().await.unwrap();
    let mut got = 0usize;
    let mut scraped = vec![];
    let mut buf = vec![0u8; 1 << 20];
    while let Some(n) = recv.read(&mut buf).await.unwrap() {
        got += n;
        if scraped.len() < 2 && got > (8 << 20) * (scraped.len() + 1) {
            let text = tokio::task::spawn_blocking(move || scrape(addr))
                .await
                .unwrap();
            scraped.push(value(&text, "macula_relay_forwarded_bytes_total"));
        }
    }
    let _send = writer.await.unwrap();
    assert_eq!(got, 32 << 20);
    assert!(scraped[0] > 0.0 && scraped[1] > scraped[0], "{scraped:?}");
    let after = scrape(addr);
    assert!(value(&after, "macula_relay_forwarded_bytes_total") >= (32 << 20) as f64);
    assert!(value(&after, "macula_relay_forwarded_datagrams_total") > 20_000.0);
    assert_eq!(
        value(&after, "macula_relay_tunnels_opened_total{mode=\"e2e\"}"),
        1.0
    );
    assert_eq!(value(&after, "macula_relay_tunnels{mode=\"e2e\"}"), 1.0);
    assert_eq!(
        value(
            &after,
            "macula_relay_tunnel_setup_seconds_count{mode=\"e2e\"}"
        ),
        1.0
    );
    assert_eq!(value(&after, "macula_relay_nodes"), 2.0);

    // A stream tunnel: its bytes and its set-up time.
    let mut c = Node::identify(&relay, "c@h").await;
    let mut d = Node::identify(&relay, "d@h").await;
    let (_, (mut cs, _), (_, mut dr)) = tunnel(&mut c, &mut d, "d@h").await;
    cs.write_all(&[7u8; 100_000]).await.unwrap();
    cs.finish().unwrap();
    let echoed = dr.read_to_end(1 << 20).await.unwrap();
    assert_eq!(echoed.len(), 100_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = scrape(addr);
    assert_eq!(
        value(&last, "macula_relay_tunnels_opened_total{mode=\"stream\"}"),
        1.0
    );
    assert_eq!(
        value(
            &last,
            "macula_relay_tunnel_setup_seconds_count{mode=\"stream\"}"
        ),
        1.0
    );
    assert!(value(&last, "macula_relay_stream_bytes_total") >= 100_000.0);

    // A forged datagram is counted by reason.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut forged =
        macula_relay_proto::wire::dataplane::header(s.tunnel.as_bytes()[0] as u64, &[1; 8])
            .to_vec();
    forged.extend_from_slice(&[0x40; 50]);
    stranger.send_to(&forged, relay.local_addr()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dropped = scrape(addr);
    assert!(
        value(
            &dropped,
            "macula_relay_dropped_datagrams_total{reason=\"unknown_session\"}"
        ) >= 1.0
    );
    relay.stop().await;
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_macula-dist-relay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ephemeral",
            "--allow-anonymous",
        ])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    // The no-token warning and "relay listening".
    let first: Vec<String> = (0..2).map(|_| lines.next().unwrap().unwrap()).collect();
    let _ = child.kill();
    let _ = child.wait();
    for line in &first {
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
        assert!(line.contains("\"level\":"), "{line}");
    }
    assert!(first[1].contains("relay listening"), "{first:?}");
}
