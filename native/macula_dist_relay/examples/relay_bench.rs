//! The relay's own cost: raw quinn streams client→server directly,
//! through the relay's stream tunnels (v1: the relay terminates QUIC) and
//! through an e2e session (v2: the relay forwards sealed datagrams),
//! measured in one run, with the relay's CPU time per GB forwarded.
//!
//! `cargo run --release -p macula_dist_relay --example relay_bench [-- REPS]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use macula_dist_node::e2e_node::{self, E2eNode};
use macula_dist_relay::{Config, Relay};
use macula_relay_proto::{FrameDecoder, Message, TunnelId};
use quinn::{Connection, Endpoint, RecvStream, SendStream};

const THROUGHPUT_BYTES: usize = 256 << 20;
const WRITE_SIZE: usize = 64 * 1024;
const ROUND_TRIPS: usize = 10_000;

type Stream = (SendStream, RecvStream);

fn main() -> anyhow::Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    // The relay runs on a runtime of its own, so its CPU time can be read
    // from its threads (two workers, as the relay binary has on 2 cores).
    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("relay-worker")
        .on_thread_start(|| {
            // SAFETY: gettid takes no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            RELAY_THREADS.lock().unwrap().push(tid)
        })
        .enable_all()
        .build()?;
    let relay = relay_rt.block_on(Relay::start(Config::loopback()))?;
    let bench_rt = tokio::runtime::Runtime::new()?;
    bench_rt.block_on(run(reps, &relay))?;
    relay_rt.block_on(relay.stop());
    Ok(())
}

static RELAY_THREADS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// CPU time of the relay's threads so far (schedstat: nanoseconds on CPU).
fn relay_cpu() -> Duration {
    let ns: u64 = RELAY_THREADS
        .lock()
        .unwrap()
        .iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

const PATHS: [&str; 3] = ["direct", "stream", "e2e"];

async fn run(reps: usize, relay: &Relay) -> anyhow::Result<()> {
    let direct = DirectServer::start().await?;
    let pair = RelayPair::connect(relay).await?;
    let e2e = E2ePair::connect(relay).await?;
    // (path, MB/s, rtt µs, relay CPU seconds per GB)
    let mut results: Vec<(&str, f64, f64, f64)> = vec![];
    // RELAY_BENCH_PATHS=e2e (comma-separated) runs only those, e.g. under perf.
    let only = std::env::var("RELAY_BENCH_PATHS").ok();
    let paths: Vec<&str> = PATHS
        .into_iter()
        .filter(|p| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *p))
        })
        .collect();
    for rep in 1..=reps {
        for &path in &paths {
            let stream = || async {
                match path {
                    "direct" => direct.stream().await,
                    "stream" => pair.tunnel().await,
                    _ => e2e.stream().await,
                }
            };
            let cpu_before = relay_cpu();
            let mbps = throughput(stream().await?).await?;
            let cpu = (relay_cpu() - cpu_before).as_secs_f64() / (THROUGHPUT_BYTES as f64 / 1e9);
            let rtt = rtt(stream().await?).await?;
            println!(
                "rep {rep} {path:6} throughput {mbps:8.1} MB/s   rtt p50 {rtt:6.1} us   relay cpu {cpu:5.2} s/GB"
            );
            results.push((path, mbps, rtt, cpu));
        }
    }
    if paths.len() < PATHS.len() {
        return Ok(()); // no ratios without all three
    }
    let median = |path: &str, pick: fn(&(&str, f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = results.iter().filter(|r| r.0 == path).map(pick).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "\nmedians of {reps}:       direct       stream          e2e   stream/direct  e2e/direct"
    );
    let line = |what: &str, pick: fn(&(&str, f64, f64, f64)) -> f64| {
        let (d, s, e) = (
            median("direct", pick),
            median("stream", pick),
            median("e2e", pick),
        );
        println!(
            "{what:19}{d:10.2} {s:12.2} {e:12.2} {:15.2} {:11.2}",
            s / d,
            e / d
        );
    };
    line("throughput (MB/s)", |r| r.1);
    line("rtt p50 (us)", |r| r.2);
    let (s, e) = (median("stream", |r| r.3), median("e2e", |r| r.3));
    println!("relay CPU (s/GB)                {s:12.2} {e:12.2}");
    Ok(())
}

/// Client side: sends THROUGHPUT_BYTES, waits for the peer's "done".
async fn throughput((mut send, mut recv): Stream) -> anyhow::Result<f64> {
    let chunk = Bytes::from(vec![0x5a; WRITE_SIZE]);
    let start = Instant::now();
    send.write_all(b"T").await?;
    for _ in 0..THROUGHPUT_BYTES / WRITE_SIZE {
        send.write_chunk(chunk.clone()).await?;
    }
    send.finish()?;
    let mut done = [0u8; 4];
    recv.read_exact(&mut done).await?;
    anyhow::ensure!(&done == b"done");
    Ok(THROUGHPUT_BYTES as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Client side: 64-byte writes echoed back, median round trip in µs.
async fn rtt((mut send, mut recv): Stream) -> anyhow::Result<f64> {
    send.write_all(b"E").await?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS + 1000 {
        let start = Instant::now();
        send.write_all(&msg).await?;
        recv.read_exact(&mut back).await?;
        if i >= 1000 {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    send.finish()?;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(times[times.len() / 2])
}

/// Server side of both tests, the same behind the relay and without it.
async fn serve((mut send, mut recv): Stream) -> anyhow::Result<()> {
    let mut mode = [0u8; 1];
    recv.read_exact(&mut mode).await?;
    match &mode {
        b"T" => {
            let mut total = 0;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                total += chunk.bytes.len();
            }
            anyhow::ensure!(total == THROUGHPUT_BYTES, "got {total} bytes");
            send.write_all(b"done").await?;
        }
        _ => {
            let mut buf = [0u8; 64];
            while recv.read_exact(&mut buf).await.is_ok() {
                send.write_all(&buf).await?;
            }
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

fn client(pin: &str) -> anyhow::Result<Endpoint> {
    let mut endpoint =
        macula_dist_quic::Transport::default().client_endpoint("127.0.0.1:0".parse()?)?;
    let trust = macula_dist_node::relay_trust::Trust::Pin(pin.into());
    endpoint.set_default_client_config(macula_dist_node::relay_trust::client_config(
        &trust,
        &macula_dist_quic::Transport::default(),
    )?);
    Ok(endpoint)
}

struct DirectServer {
    conn: Connection,
}

impl DirectServer {
    async fn start() -> anyhow::Result<Self> {
        let identity = macula_dist_relay::RelayCertificate::self_signed(vec!["localhost".into()])?;
        let pin = identity.fingerprint();
        let config = macula_dist_relay::certificate::server_config(
            identity,
            &macula_dist_quic::Transport::default(),
        )?;
        let server = macula_dist_quic::Transport::default()
            .server_endpoint(config, "127.0.0.1:0".parse()?)?;
        let addr: SocketAddr = server.local_addr()?;
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok(stream) = conn.accept_bi().await {
                        tokio::spawn(serve(stream));
                    }
                });
            }
        });
        let conn = client(&pin)?.connect(addr, "localhost")?.await?;
        Ok(DirectServer { conn })
    }

    async fn stream(&self) -> anyhow::Result<Stream> {
        Ok(self.conn.open_bi().await?)
    }
}

/// Two nodes on the relay with one e2e session; `b` serves its streams.
struct E2ePair {
    conn: Connection,
}

impl E2ePair {
    async fn connect(relay: &Relay) -> anyhow::Result<Self> {
        let (addr, pin) = (relay.local_addr(), relay.fingerprint());
        let mut a = E2eNode::join(addr, pin, "a@e2e").await?;
        let mut b = E2eNode::join(addr, pin, "b@e2e").await?;
        let session = e2e_node::session(&mut a, &mut b, b"bench", b"bench").await?;
        let (conn, served) = (session.requester?, session.target?);
        tokio::spawn(async move {
            let _keep = (a, b);
            while let Ok(stream) = served.accept_bi().await {
                tokio::spawn(serve(stream));
            }
        });
        Ok(E2ePair { conn })
    }

    async fn stream(&self) -> anyhow::Result<Stream> {
        Ok(self.conn.open_bi().await?)
    }
}

/// Two nodes on the relay; `b` serves every tunnel it is offered.
struct RelayPair {
    a_control: tokio::sync::Mutex<(SendStream, RecvStream, FrameDecoder)>,
    a_streams: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(TunnelId, Stream)>>,
}

impl RelayPair {
    async fn connect(relay: &Relay) -> anyhow::Result<Self> {
        let (_a, a_ctl, a_streams) = node(relay, "a@bench").await?;
        let (_b, _b_ctl, mut b_streams) = node(relay, "b@bench").await?;
        tokio::spawn(async move {
            let _keep = (_a, _b, _b_ctl);
            while let Some((_, stream)) = b_streams.recv().await {
                tokio::spawn(serve(stream));
            }
        });
        Ok(RelayPair {
            a_control: tokio::sync::Mutex::new(a_ctl),
            a_streams: tokio::sync::Mutex::new(a_streams),
        })
    }

    async fn tunnel(&self) -> anyhow::Result<Stream> {
        let mut ctl = self.a_control.lock().await;
        let (send, recv, decoder) = &mut *ctl;
        send.write_all(
            &Message::TunnelRequest {
                target: "b@bench".into(),
                mode: macula_relay_proto::Mode::Stream,
            }
            .encode(),
        )
        .await?;
        let Message::TunnelOk { tunnel, .. } = next_message(recv, decoder).await? else {
            anyhow::bail!("tunnel refused");
        };
        let (id, stream) = self.a_streams.lock().await.recv().await.expect("stream");
        anyhow::ensure!(id == tunnel);
        Ok(stream)
    }
}

type Node = (
    Connection,
    (SendStream, RecvStream, FrameDecoder),
    tokio::sync::mpsc::UnboundedReceiver<(TunnelId, Stream)>,
);

/// Connects and identifies; tunnel streams (prefix read) come out of the channel.
async fn node(relay: &Relay, name: &str) -> anyhow::Result<Node> {
    let conn = client(relay.fingerprint())?
        .connect(relay.local_addr(), "localhost")?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(
        &Message::Identify {
            node: name.into(),
            token: None,
            version: Some(1),
        }
        .encode(),
    )
    .await?;
    let mut decoder = FrameDecoder::default();
    anyhow::ensure!(
        next_message(&mut recv, &mut decoder).await? == Message::Identified { version: None }
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let c = conn.clone();
    tokio::spawn(async move {
        while let Ok((s, mut r)) = c.accept_bi().await {
            let mut prefix = [0u8; 32];
            if r.read_exact(&mut prefix).await.is_ok() {
                let _ = tx.send((TunnelId::parse(&prefix).expect("prefix"), (s, r)));
            }
        }
    });
    Ok((conn, (send, recv, decoder), rx))
}

async fn next_message(
    recv: &mut RecvStream,
    decoder: &mut FrameDecoder,
) -> anyhow::Result<Message> {
    loop {
        // One message at a time: read only what is needed.
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut byte)).await??;
        if let Some(msg) = decoder.decode(&mut &byte[..])? {
            return Ok(msg);
        }
    }
}
