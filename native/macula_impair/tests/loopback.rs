//! The proxy on real sockets, 127.0.0.1 only. Assertions are on contents,
//! order and counts; the only time check is a generous lower bound on an
//! injected delay. Waits are bounded by WAIT only to fail instead of hang.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use macula_impair::{Config, Dirs, Handle, Impair, Stats};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};

const WAIT: Duration = Duration::from_secs(20);

async fn loopback_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .expect("no datagram arrived")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Waits until the proxy's counters satisfy `cond`.
async fn wait_for(proxy: &Handle, cond: impl Fn(&Stats) -> bool) -> Stats {
    let start = Instant::now();
    loop {
        let stats = proxy.stats();
        if cond(&stats) {
            return stats;
        }
        assert!(
            start.elapsed() < WAIT,
            "counters never got there: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn start(upstream: SocketAddr, control: bool) -> Handle {
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), upstream);
    if control {
        config.control = Some("127.0.0.1:0".parse().unwrap());
    }
    config.seed = 1;
    let proxy = Impair::start(config).await.unwrap();
    assert!(proxy.local_addr().ip().is_loopback());
    proxy
}

#[tokio::test]
async fn forwards_per_client_blackholes_and_counts() {
    let upstream = loopback_socket().await;
    let proxy = start(upstream.local_addr().unwrap(), false).await;
    let to = proxy.local_addr();
    let a = loopback_socket().await;
    let b = loopback_socket().await;

    // Client a: three datagrams arrive upstream in order, from one socket
    // that is a's own (not a itself, not the proxy's listen socket).
    for m in [&b"a1"[..], b"a2", b"a3"] {
        a.send_to(m, to).await.unwrap();
    }
    let (m1, a_nat) = recv(&upstream).await;
    let (m2, from2) = recv(&upstream).await;
    let (m3, from3) = recv(&upstream).await;
    assert_eq!(
        (m1, m2, m3),
        (b"a1".to_vec(), b"a2".to_vec(), b"a3".to_vec())
    );
    assert_eq!((from2, from3), (a_nat, a_nat));
    assert!(a_nat.ip().is_loopback());
    assert_ne!(a_nat, a.local_addr().unwrap());
    assert_ne!(a_nat, to);

    // Replies go back to a, from the proxy's address.
    upstream.send_to(b"r1", a_nat).await.unwrap();
    assert_eq!(recv(&a).await, (b"r1".to_vec(), to));

    // Client b gets its own upstream socket, and its own replies.
    b.send_to(b"b1", to).await.unwrap();
    let (m, b_nat) = recv(&upstream).await;
    assert_eq!(m, b"b1");
    assert_ne!(b_nat, a_nat);
    upstream.send_to(b"rb", b_nat).await.unwrap();
    assert_eq!(recv(&b).await, (b"rb".to_vec(), to));

    let stats = proxy.stats();
    assert_eq!(stats.sessions, 2);
    assert_eq!(
        (stats.up.received, stats.up.forwarded, stats.up.dropped),
        (4, 4, 0)
    );
    assert_eq!(
        (
            stats.down.received,
            stats.down.forwarded,
            stats.down.dropped
        ),
        (2, 2, 0)
    );

    // Blackhole: both ways dropped. Wait until the proxy has seen (and
    // dropped) each datagram before switching it off again.
    proxy.blackhole(true);
    a.send_to(b"lost", to).await.unwrap();
    wait_for(&proxy, |s| s.up.blackholed == 1).await;
    upstream.send_to(b"lost reply", a_nat).await.unwrap();
    wait_for(&proxy, |s| s.down.blackholed == 1).await;
    proxy.blackhole(false);
    // Had "lost" been forwarded, it would arrive before "after".
    a.send_to(b"after", to).await.unwrap();
    assert_eq!(recv(&upstream).await, (b"after".to_vec(), a_nat));
    upstream.send_to(b"after reply", a_nat).await.unwrap();
    assert_eq!(recv(&a).await, (b"after reply".to_vec(), to));

    // One direction only: up blackholed, down still flows.
    proxy.blackhole_dirs(Dirs::Up, true);
    a.send_to(b"up lost", to).await.unwrap();
    wait_for(&proxy, |s| s.up.blackholed == 2).await;
    upstream.send_to(b"down ok", a_nat).await.unwrap();
    assert_eq!(recv(&a).await, (b"down ok".to_vec(), to));
    proxy.blackhole_dirs(Dirs::Up, false);
    a.send_to(b"up ok", to).await.unwrap();
    assert_eq!(recv(&upstream).await, (b"up ok".to_vec(), a_nat));

    let stats = proxy.stats();
    assert_eq!(stats.up.received, 8);
    assert_eq!(stats.up.forwarded, 6);
    assert_eq!((stats.up.dropped, stats.up.blackholed), (2, 2));
    assert_eq!(stats.down.received, 5);
    assert_eq!(stats.down.forwarded, 4);
    assert_eq!((stats.down.dropped, stats.down.blackholed), (1, 1));
    assert_eq!((stats.up.queued(), stats.down.queued()), (0, 0));

    proxy.reset_stats();
    assert_eq!(proxy.stats().up, Default::default());
    proxy.stop().await;
}

#[tokio::test]
async fn duplicates_and_delays() {
    let upstream = loopback_socket().await;
    let proxy = start(upstream.local_addr().unwrap(), false).await;
    let to = proxy.local_addr();
    let client = loopback_socket().await;

    proxy.set_duplicate(Dirs::Up, 1.0);
    client.send_to(b"twice", to).await.unwrap();
    let (first, nat) = recv(&upstream).await;
    let (second, _) = recv(&upstream).await;
    assert_eq!(
        (first.as_slice(), second.as_slice()),
        (&b"twice"[..], &b"twice"[..])
    );
    let stats = proxy.stats();
    assert_eq!(
        (stats.up.received, stats.up.duplicated, stats.up.forwarded),
        (1, 1, 2)
    );
    proxy.set_duplicate(Dirs::Up, 0.0);
    // Down was never duplicated: "once" is followed directly by "end".
    upstream.send_to(b"once", nat).await.unwrap();
    upstream.send_to(b"end", nat).await.unwrap();
    assert_eq!(recv(&client).await.0, b"once");
    assert_eq!(recv(&client).await.0, b"end");

    proxy.set_delay(Dirs::Down, Duration::from_millis(150));
    let sent = Instant::now();
    upstream.send_to(b"slow", nat).await.unwrap();
    assert_eq!(recv(&client).await.0, b"slow");
    assert!(sent.elapsed() >= Duration::from_millis(150));
    proxy.stop().await;
}

async fn command(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    cmd: &str,
) -> String {
    write
        .write_all(format!("{cmd}\n").as_bytes())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("no reply")
        .unwrap()
        .expect("connection closed")
}

fn field(reply: &str, key: &str) -> u64 {
    reply
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {reply}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn control_port() {
    let upstream = loopback_socket().await;
    let proxy = start(upstream.local_addr().unwrap(), true).await;
    let to = proxy.local_addr();
    let control = proxy.control_addr().unwrap();
    assert!(control.ip().is_loopback());
    let (read, mut write) = TcpStream::connect(control).await.unwrap().into_split();
    let mut lines = BufReader::new(read).lines();
    let client = loopback_socket().await;

    assert!(command(&mut lines, &mut write, "help")
        .await
        .starts_with("ok commands:"));
    assert_eq!(
        command(&mut lines, &mut write, "set delay up=100").await,
        "ok"
    );
    let show = command(&mut lines, &mut write, "show").await;
    assert!(
        show.contains("up.delay=100 ") && show.contains("down.delay=0 "),
        "{show}"
    );
    let sent = Instant::now();
    client.send_to(b"delayed", to).await.unwrap();
    let (m, _) = recv(&upstream).await;
    assert_eq!(m, b"delayed");
    assert!(sent.elapsed() >= Duration::from_millis(100));

    assert_eq!(command(&mut lines, &mut write, "clear").await, "ok");
    assert_eq!(command(&mut lines, &mut write, "blackhole on").await, "ok");
    client.send_to(b"dropped", to).await.unwrap();
    wait_for(&proxy, |s| s.up.dropped == 1).await;
    let stats = command(&mut lines, &mut write, "stats").await;
    assert!(stats.starts_with("ok "), "{stats}");
    assert_eq!(field(&stats, "sessions"), 1);
    assert_eq!(field(&stats, "up.received"), 2);
    assert_eq!(field(&stats, "up.forwarded"), 1);
    assert_eq!(field(&stats, "up.dropped"), 1);
    assert_eq!(field(&stats, "up.blackholed"), 1);
    assert_eq!(field(&stats, "down.received"), 0);

    assert!(command(&mut lines, &mut write, "set loss 2")
        .await
        .starts_with("err "));
    assert!(command(&mut lines, &mut write, "bogus")
        .await
        .starts_with("err "));
    assert_eq!(command(&mut lines, &mut write, "blackhole off").await, "ok");
    client.send_to(b"through", to).await.unwrap();
    assert_eq!(recv(&upstream).await.0, b"through");
    assert_eq!(command(&mut lines, &mut write, "quit").await, "ok bye");
    proxy.stop().await;
}

#[tokio::test]
async fn control_port_must_be_loopback() {
    let mut config = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:9".parse().unwrap(),
    );
    config.control = Some("0.0.0.0:0".parse().unwrap());
    assert!(Impair::start(config).await.is_err());
}
