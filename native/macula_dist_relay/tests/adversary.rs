//! Other token holders as attackers, replayed against the relay binary:
//! each case is an attack a security review ran, and asserts its bound.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use macula_dist_node::e2e_node::{self, E2eNode};
use macula_dist_node::identity::NodeIdentity;
use macula_relay_proto::{Message, Mode, TunnelId};

const RELAY: &str = env!("CARGO_BIN_EXE_macula-dist-relay");

/// These cases measure time and log volume: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    fingerprint: String,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RelayProcess {
    fn start(tag: &str, extra: &[&str]) -> RelayProcess {
        let dir =
            std::env::temp_dir().join(format!("macula-adversary-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_in(dir, extra)
    }

    fn start_in(dir: std::path::PathBuf, extra: &[&str]) -> RelayProcess {
        let port = free_port();
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let mut child = Command::new(RELAY)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--state-dir", dir.join("state").to_str().unwrap()])
            .args(["--metrics", &metrics.to_string()])
            .args(["--allow-anonymous"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("stderr"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        RelayProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics,
            fingerprint: line.trim().to_string(),
            dir,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    fn log_bytes(&self) -> u64 {
        std::fs::metadata(self.dir.join("stderr")).unwrap().len()
    }

    fn log(&self) -> String {
        let mut log = String::new();
        std::fs::File::open(self.dir.join("stderr"))
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        log
    }

    fn scrape(&self) -> String {
        let mut s = std::net::TcpStream::connect(self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// `GET /metrics`: the value of one sample (`name{labels}`), 0 if absent.
    fn metric(&self, sample: &str) -> f64 {
        self.scrape()
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The sum of a family's samples (`name{...} value` lines).
    fn metric_sum(&self, family: &str) -> f64 {
        self.scrape()
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn join(&self, name: &str) -> E2eNode {
        E2eNode::join(self.addr, &self.fingerprint, name)
            .await
            .unwrap()
    }

    async fn join_keyed(&self, name: &str, key: &NodeIdentity) -> anyhow::Result<E2eNode> {
        E2eNode::join_keyed(self.addr, &self.fingerprint, name, Some(key)).await
    }

    /// Kills the process, keeping its directory (for a restart).
    fn kill(mut self) -> std::path::PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = self.dir.clone();
        std::mem::forget(self);
        dir
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tunnel(n: u64, salt: u8) -> TunnelId {
    let mut b = [salt; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    TunnelId::from_bytes(b)
}

/// A victim session that echoes: returns the longest round trip seen
/// until `stop`, pinging every 5 ms.
async fn ping_until(
    a_end: quinn::Connection,
    b_end: quinn::Connection,
    stop: tokio_util::sync::CancellationToken,
) -> Duration {
    let (mut send, mut recv) = a_end.open_bi().await.unwrap();
    send.write_all(&[0; 8]).await.unwrap();
    let (mut echo_send, mut echo_recv) = b_end.accept_bi().await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 8];
        while echo_recv.read_exact(&mut buf).await.is_ok() {
            if echo_send.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 8];
    recv.read_exact(&mut buf).await.unwrap();
    let mut worst = Duration::ZERO;
    let began = Instant::now();
    while !stop.is_cancelled() {
        let t = Instant::now();
        send.write_all(&[1; 8]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut buf))
            .await
            .expect("the victim's session still flows")
            .unwrap();
        if t.elapsed() > worst {
            worst = t.elapsed();
            eprintln!("round trip {worst:?} at {:?}", t - began);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worst
}

/// The review's High: a node paired its own claims (`sess_keep`, two
/// names it holds, or `name == peer`) into 40 000 live sessions outside
/// every quota, and when it left, the relay's scans of the waiting table
/// held another node's request for 8.27 s and stopped an unrelated
/// session's datagrams for 2.37 s. Now: refused or within quota, and the
/// victim's round trips stay under 200 ms throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn self_paired_claims_stay_within_quota_and_stall_nobody() {
    let _one = ONE_AT_A_TIME.lock().await;
    let relay = RelayProcess::start("selfpair", &[]);
    let mut a = relay.join("a@h").await;
    let mut b = relay.join("b@h").await;
    let s = e2e_node::session(&mut a, &mut b, b"cookie", b"cookie")
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let pinger = tokio::spawn(ping_until(
        s.requester.unwrap(),
        s.target.unwrap(),
        stop.clone(),
    ));

    let mut m1 = relay.join("m1@h").await;
    let mut m2 = relay.join("m2@h").await;
    const PAIRS: u64 = 20_000;
    let claims = |n: u64, name: &str, bind: [u8; 8]| -> Vec<u8> {
        let mut out = vec![];
        for i in 0..n {
            out.extend(
                Message::SessionKeep {
                    tunnel: tunnel(i, 7),
                    bind,
                    peer: name.into(),
                }
                .encode(),
            );
        }
        out
    };
    let started = Instant::now();
    eprintln!("flood starts");
    // 2 x 20 000 claims that pair up (each name its other name's peer),
    // and 20 000 naming the claimant itself.
    let mut self_claims = vec![];
    for i in 0..PAIRS {
        self_claims.extend(
            Message::SessionKeep {
                tunnel: tunnel(i, 9),
                bind: [3; 8],
                peer: "m1@h".into(),
            }
            .encode(),
        );
    }
    let (from_m1, from_m2) = (claims(PAIRS, "m2@h", [1; 8]), claims(PAIRS, "m1@h", [2; 8]));
    for (c1, c2) in from_m1.chunks(64 * 1024).zip(from_m2.chunks(64 * 1024)) {
        m1.send_frames(c1).await.unwrap();
        m2.send_frames(c2).await.unwrap();
    }
    m1.send_frames(&self_claims).await.unwrap();
    // Everything was read and decided.
    let total = (3 * PAIRS) as f64;
    let counted = || relay.metric_sum("macula_relay_session_claims_total");
    while counted() < total {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "claims not all decided: {}",
            relay.scrape()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live = relay.metric("macula_relay_tunnels{mode=\"e2e\"}");
    let restored = relay.metric("macula_relay_session_claims_total{outcome=\"restored\"}");
    let bad_peer = relay.metric("macula_relay_session_claims_total{outcome=\"bad_peer\"}");
    eprintln!(
        "{} claims in {:?}: {restored} sessions restored, {live} e2e sessions live, {bad_peer} naming the claimant",
        3 * PAIRS,
        started.elapsed()
    );
    // Per-pair quota (64 each way) and per-node quota (1000), as for
    // tun_req; the victim's session is the one more.
    assert!(live <= 1.0 + 2.0 * 64.0, "{live} live e2e sessions");
    assert_eq!(bad_peer, PAIRS as f64);
    // The attacker leaves: its sessions are remembered, in O(1) each.
    eprintln!("attacker leaves at {:?}", started.elapsed());
    m1.relay_conn.close(0u32.into(), b"bye");
    m2.relay_conn.close(0u32.into(), b"bye");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Another node's request is answered at once.
    let t = Instant::now();
    let mut c = relay.join("c@h").await;
    c.send(Message::TunnelRequest {
        target: "a@h".into(),
        mode: Mode::E2e,
    })
    .await
    .unwrap();
    assert!(matches!(c.next().await.unwrap(), Message::TunnelOk { .. }));
    let answered = t.elapsed();
    stop.cancel();
    let worst = pinger.await.unwrap();
    eprintln!(
        "victim's worst round trip {worst:?}; another node joined and was answered in {answered:?}"
    );
    assert!(
        worst < Duration::from_millis(200),
        "victim stalled {worst:?}"
    );
    assert!(
        answered < Duration::from_secs(1),
        "request answered in {answered:?}"
    );
}

/// The review's Medium: every `sess_keep` and `sess_path` wrote an INFO
/// line (100 000 messages: 23 MB of log) and each `sess_path` moved the
/// path counter (25 000 from one session). Now: lines rate-limited, the
/// counter moves only when a side's path changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_and_path_reports_cannot_flood_logs_or_counters() {
    let _one = ONE_AT_A_TIME.lock().await;
    let relay = RelayProcess::start("logflood", &[]);
    let mut m1 = relay.join("m1@h").await;
    let mut m2 = relay.join("m2@h").await;
    m1.send(Message::TunnelRequest {
        target: "m2@h".into(),
        mode: Mode::E2e,
    })
    .await
    .unwrap();
    let Message::TunnelNotify { tunnel: tid, .. } = m2.next().await.unwrap() else {
        panic!("tun_notify")
    };
    assert!(matches!(m1.next().await.unwrap(), Message::TunnelOk { .. }));
    let before = relay.log_bytes();
    let mut frames = vec![];
    for i in 0..50_000u64 {
        frames.extend(
            Message::SessionPath {
                tunnel: tid,
                direct: true,
            }
            .encode(),
        );
        frames.extend(
            Message::SessionKeep {
                tunnel: tunnel(i, 5),
                bind: [1; 8],
                peer: "m2@h".into(),
            }
            .encode(),
        );
    }
    for chunk in frames.chunks(64 * 1024) {
        m1.send_frames(chunk).await.unwrap();
    }
    let started = Instant::now();
    let decided = || relay.metric_sum("macula_relay_session_claims_total");
    while decided() < 50_000.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "claims not all decided"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let direct = relay.metric("macula_relay_session_paths_total{path=\"direct\"}");
    let grown = relay.log_bytes() - before;
    eprintln!("100 000 sess_path/sess_keep: {grown} bytes of log, path counter {direct}");
    assert_eq!(direct, 1.0, "the path changed once");
    assert!(
        grown < 1 << 20,
        "log grew by {grown} bytes:\n{}",
        relay.log()
    );
    // Peers were stored unchecked, up to a frame each (the review: +65 MiB
    // for 1024 claims of one node); now a peer is a node name or nothing.
    let rss = relay.rss_kib();
    let long = "p".repeat(60_000);
    let mut frames = vec![];
    for i in 0..300u64 {
        frames.extend(
            Message::SessionKeep {
                tunnel: tunnel(i, 6),
                bind: [1; 8],
                peer: long.clone(),
            }
            .encode(),
        );
    }
    let decided_before = decided();
    m1.send_frames(&frames).await.unwrap();
    while decided() < decided_before + 300.0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "claims not all decided"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = relay.rss_kib().saturating_sub(rss);
    eprintln!("300 claims with 60 kB peers: relay RSS grew by {grown} KiB");
    assert!(grown < 8 * 1024, "relay RSS grew by {grown} KiB");
    assert_eq!(
        relay.metric("macula_relay_session_claims_total{outcome=\"bad_peer\"}"),
        300.0
    );
    // A real change still counts.
    m1.send(Message::SessionPath {
        tunnel: tid,
        direct: false,
    })
    .await
    .unwrap();
    let t = Instant::now();
    while relay.metric("macula_relay_session_paths_total{path=\"relay\"}") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The review's squat: any token holder took the name of a keyed node
/// that had just left, or that a restarted relay had just seen. Now the
/// name stays its key's for --name-hold-secs, across a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_stays_its_keys_after_a_disconnect_and_a_restart() {
    let k = NodeIdentity::derive(b"cookie", "a@h").unwrap();
    let k2 = NodeIdentity::derive(b"squatter", "a@h").unwrap();
    let refused = |r: anyhow::Result<E2eNode>| {
        let err = format!("{:#}", r.err().expect("refused"));
        assert!(err.contains("name_taken"), "{err}");
    };
    let relay = RelayProcess::start("hold", &[]);
    let a = relay.join_keyed("a@h", &k).await.unwrap();
    a.relay_conn.close(0u32.into(), b"bye");
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    refused(relay.join_keyed("a@h", &k2).await);
    refused(E2eNode::join(relay.addr, &relay.fingerprint, "a@h").await);
    let t = Instant::now();
    let a = relay.join_keyed("a@h", &k).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the key's node is accepted at once"
    );
    // The relay restarts (killed: no goodbye) while a@h is connected.
    tokio::time::sleep(Duration::from_millis(1500)).await; // written within 1 s
    let dir = relay.kill();
    drop(a);
    let relay = RelayProcess::start_in(dir, &[]);
    refused(relay.join_keyed("a@h", &k2).await);
    refused(E2eNode::join(relay.addr, &relay.fingerprint, "a@h").await);
    let t = Instant::now();
    relay.join_keyed("a@h", &k).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the key's node is accepted at once"
    );
    // With no hold time, a name is free once its node is gone (as before).
    let free = RelayProcess::start("nohold", &["--name-hold-secs", "0"]);
    let b = free.join_keyed("b@h", &k).await.unwrap();
    b.relay_conn.close(0u32.into(), b"bye");
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    free.join_keyed("b@h", &k2).await.unwrap();
}

/// Version 4: the relay tells a node the address it sees it at, right
/// after `id_ok`, and forwards no candidates between nodes; a node's own
/// `cand` is accepted and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_are_a_nodes_own_address_only() {
    let relay = RelayProcess::start("cand", &[]);
    let mut a = relay.join("a@h").await;
    let mut b = relay.join("b@h").await;
    assert_eq!(
        a.reflexive_address().await.unwrap(),
        a.endpoint.local_addr().unwrap()
    );
    a.send(Message::Candidates {
        tunnel: None,
        addrs: vec!["192.0.2.1:4000".parse().unwrap()],
    })
    .await
    .unwrap();
    let s = e2e_node::session(&mut a, &mut b, b"cookie", b"cookie")
        .await
        .unwrap();
    assert!(s.requester.is_ok() && s.target.is_ok());
    // Nothing more came: no per-session candidates to either side.
    b.send(Message::NodesRequest).await.unwrap();
    assert!(matches!(b.next().await.unwrap(), Message::Nodes { .. }));
    a.send(Message::NodesRequest).await.unwrap();
    assert!(matches!(a.next().await.unwrap(), Message::Nodes { .. }));
    assert!(a.candidates.is_empty() && b.candidates.is_empty());
    assert_eq!(relay.metric("macula_relay_candidates_ignored_total"), 1.0);
}
