//! Abuse of the relay binary, replayed: each case tries the attack and
//! asserts the bound (memory, connections, log volume), on 127.0.0.1.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use macula_relay_proto::Message;

const RELAY: &str = env!("CARGO_BIN_EXE_macula-dist-relay");

/// A relay process on a free loopback port; killed when dropped.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    fingerprint: String,
    dir: std::path::PathBuf,
}

impl RelayProcess {
    fn start(tag: &str, extra: &[&str]) -> RelayProcess {
        let dir =
            std::env::temp_dir().join(format!("macula-hardening-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_in(dir, extra)
    }

    fn start_in(dir: std::path::PathBuf, extra: &[&str]) -> RelayProcess {
        let port = free_udp_port();
        let mut child = Command::new(RELAY)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--state-dir", dir.join("state").to_str().unwrap()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        RelayProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
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

    fn endpoint(&self) -> quinn::Endpoint {
        let transport = macula_dist_quic::Transport::default();
        let mut endpoint = transport
            .client_endpoint("127.0.0.1:0".parse().unwrap())
            .unwrap();
        endpoint.set_default_client_config(
            macula_dist_node::relay_trust::client_config(
                &macula_dist_node::relay_trust::Trust::Pin(self.fingerprint.clone()),
                &transport,
            )
            .unwrap(),
        );
        endpoint
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn no_token_needs_allow_anonymous() {
    let out = Command::new(RELAY)
        .args(["--listen", "127.0.0.1:0", "--ephemeral"])
        .env_remove("MACULA_DIST_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-anonymous"), "{err}");
}

#[test]
fn identity_survives_a_restart_in_the_state_dir() {
    let first = RelayProcess::start("state", &["--allow-anonymous"]);
    let dir = first.dir.clone();
    let fingerprint = first.fingerprint.clone();
    assert_eq!(fingerprint.len(), 64);
    let mut first = first;
    let _ = first.child.kill();
    let _ = first.child.wait();
    std::mem::forget(first); // keep its directory for the restart
    let second = RelayProcess::start_in(dir, &["--allow-anonymous"]);
    assert_eq!(second.fingerprint, fingerprint);
    let key = second.dir.join("state/relay.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(key).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
    let ephemeral = RelayProcess::start("ephemeral", &["--allow-anonymous", "--ephemeral"]);
    assert_ne!(ephemeral.fingerprint, fingerprint);
}

/// 8 connections that never identify open every stream they may and push
/// all they can: the relay takes one stream each and a bounded window.
/// (Before: 8 such connections took the relay from 6 to 162 MiB.)
#[tokio::test]
async fn unidentified_connections_cannot_fill_relay_memory() {
    let relay = RelayProcess::start("memory", &["--token", "t", "--identify-timeout", "30"]);
    let endpoint = relay.endpoint();
    let before = relay.rss_kib();
    let mut conns = vec![];
    let junk = bytes::Bytes::from(vec![0x42u8; 4 << 20]);
    let mut writers = vec![];
    for _ in 0..8 {
        let conn = endpoint
            .connect(relay.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        for i in 0..16 {
            let Ok(Ok((mut send, _))) =
                tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await
            else {
                break; // no more streams allowed
            };
            if i == 0 {
                // The control stream stays silent: the relay waits on it.
                writers.push(tokio::spawn(async move { send }));
                continue;
            }
            let junk = junk.clone();
            writers.push(tokio::spawn(async move {
                let _ = send.write_chunk(junk).await;
                send
            }));
        }
        conns.push(conn);
    }
    // Whatever the relay lets through, for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = relay.rss_kib().saturating_sub(before);
    eprintln!("relay RSS grew by {grown} KiB with 8 unidentified connections");
    assert!(grown < 16 * 1024, "relay RSS grew by {grown} KiB");
}

/// More unidentified connections than allowed from one address, or in
/// all, are refused; identified nodes free their slot.
#[tokio::test]
async fn unidentified_connections_are_capped() {
    let relay = RelayProcess::start(
        "caps",
        &[
            "--allow-anonymous",
            "--max-unidentified",
            "6",
            "--max-unidentified-per-ip",
            "3",
            "--retry",
            "never",
        ],
    );
    let endpoint = relay.endpoint();
    let mut ok = vec![];
    let mut refused = 0;
    for _ in 0..5 {
        match endpoint.connect(relay.addr, "localhost").unwrap().await {
            Ok(conn) => ok.push(conn),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(
        (ok.len(), refused),
        (3, 2),
        "3 per address, the rest refused"
    );
    // One identifies: its slot is free for a newcomer.
    let (mut send, mut recv) = ok[0].open_bi().await.unwrap();
    send.write_all(
        &Message::Identify {
            node: "a@h".into(),
            token: None,
            version: Some(2),
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let _ = recv.read(&mut buf).await.unwrap();
    assert!(endpoint
        .connect(relay.addr, "localhost")
        .unwrap()
        .await
        .is_ok());
}

/// With --retry always, clients prove their address first and still join.
#[tokio::test]
async fn retry_always_still_lets_nodes_join() {
    let relay = RelayProcess::start("retry", &["--allow-anonymous", "--retry", "always"]);
    let conn = relay
        .endpoint()
        .connect(relay.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(
        &Message::Identify {
            node: "a@h".into(),
            token: None,
            version: Some(2),
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64];
    let n = recv.read(&mut buf).await.unwrap().unwrap();
    let msg = macula_relay_proto::FrameDecoder::default()
        .decode(&mut &buf[..n])
        .unwrap();
    assert!(matches!(msg, Some(Message::Identified { .. })));
}

/// 10 000 bad frames before identify give a bounded log (before: one WARN
/// line each, 11 MB for 450 KB of input).
#[tokio::test]
async fn bad_input_logs_are_rate_limited() {
    let relay = RelayProcess::start("logs", &["--token", "t"]);
    let conn = relay
        .endpoint()
        .connect(relay.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut bad = vec![];
    for _ in 0..10_000 {
        bad.extend_from_slice(&Message::Identified { version: None }.encode());
    }
    let reader = tokio::spawn(async move {
        let mut sink = vec![0u8; 65536];
        while let Ok(Some(_)) = recv.read(&mut sink).await {}
    });
    send.write_all(&bad).await.unwrap();
    send.finish().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    let bytes = relay.log_bytes();
    let mut log = String::new();
    std::fs::File::open(relay.dir.join("stderr"))
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    eprintln!(
        "relay log: {bytes} bytes for {} bytes of bad input",
        bad.len()
    );
    assert!(bytes < 16 * 1024, "log of {bytes} bytes:\n{log}");
}
