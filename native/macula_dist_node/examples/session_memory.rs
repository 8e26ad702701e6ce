//! The memory one e2e session's QUIC connection holds, both ends in one
//! process, through a real relay on loopback: RSS growth over the
//! sessions of a full mesh of NODES nodes (joined before measuring), kept
//! open, each having carried one small exchange. (Only the QUIC and TLS
//! part: the NIF's tunnel tasks and lanes come on top.)
//!
//!   cargo run --release -p macula_dist_node --example session_memory [-- NODES]

use macula_dist_node::e2e_node::{self, E2eNode};
use macula_dist_relay::{Config, Relay};

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4
}

async fn exchange(from: &quinn::Connection, to: &quinn::Connection) -> anyhow::Result<()> {
    let (mut send, _) = from.open_bi().await?;
    send.write_all(&[7u8; 200]).await?;
    send.finish()?;
    let (_, mut recv) = to.accept_bi().await?;
    recv.read_to_end(1024).await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let nodes: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(25);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let relay = Relay::start(Config::loopback()).await?;
        let mut mesh = Vec::new();
        for i in 0..nodes {
            let name = format!("n{i}@h");
            mesh.push(E2eNode::join(relay.local_addr(), relay.fingerprint(), &name).await?);
        }
        let mut kept = Vec::new();
        let before = rss_kib();
        let mut sessions = 0;
        for i in 0..nodes {
            for j in i + 1..nodes {
                let (left, right) = mesh.split_at_mut(j);
                let s = e2e_node::session(&mut left[i], &mut right[0], b"c", b"c").await?;
                let (requester, target) = (s.requester?, s.target?);
                exchange(&requester, &target).await?;
                kept.push((requester, target));
                sessions += 1;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let grown = rss_kib().saturating_sub(before);
        println!(
            "{sessions} sessions: RSS +{grown} KiB, {:.1} KiB a session (both ends)",
            grown as f64 / sessions as f64
        );
        anyhow::Ok(())
    })
}
