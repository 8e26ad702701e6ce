//! The CPU one e2e session's set-up costs at least, both ends in one
//! process, with no relay, no BEAM and no dist traffic: the floor under
//! `bench/mesh.sh`'s NIF CPU a session.
//!
//!   cargo run --release -p macula_dist_node --example session_cost [-- SESSIONS]
//!
//! - `pake`: the cookie's SPAKE2 and confirmations (`SessionAuth`, both
//!   roles), in memory.
//! - `quic+tls`: QUIC handshakes over loopback between two endpoints with
//!   the session's own TLS configurations (cookie mode: TLS 1.3, X25519,
//!   an Ed25519 server certificate, none asked of the client), one after
//!   the other, each closed once up; process CPU time (user + system, both
//!   ends and the kernel's UDP work) divided by the number of sessions.

use std::net::SocketAddr;
use std::time::Instant;

use macula_dist_node::identity::{self, NodeIdentity, PeerCheck, E2E_SERVER_NAME};
use macula_dist_quic::Transport;
use macula_relay_proto::node::cookie_pake::CookiePake;
use macula_relay_proto::node::session_auth::{Role, SessionAuth};
use macula_relay_proto::TunnelId;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn pake_once(cookie: &CookiePake, tunnel: &TunnelId) {
    let exporter = [7u8; 32];
    let mut requester = SessionAuth::new(
        Role::Requester,
        Some(cookie),
        "a@h",
        "b@h",
        tunnel,
        exporter,
    );
    let mut target = SessionAuth::new(Role::Target, Some(cookie), "a@h", "b@h", tunnel, exporter);
    let to_target = requester.pake_message().to_vec();
    target.on_pake(&to_target).expect("pake");
    requester.on_pake(target.pake_message()).expect("pake");
    let from_target = target.confirmation(&[]).expect("confirm");
    requester.check_confirmation(&from_target).expect("check");
    let from_requester = requester.confirmation(&[]).expect("confirm");
    target.check_confirmation(&from_requester).expect("check");
}

async fn handshakes(sessions: usize) -> anyhow::Result<()> {
    let transport = Transport::default();
    let (a, b) = (NodeIdentity::generate()?, NodeIdentity::generate()?);
    let server_config = identity::server_config(&b, PeerCheck::AnyKey, &transport)?;
    let client_config = identity::client_config(&a, PeerCheck::AnyKey, &transport)?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let server = transport.server_endpoint(server_config, loopback)?;
    let client = transport.client_endpoint(loopback)?;
    let target = server.local_addr()?;
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    conn.closed().await;
                }
            });
        }
    });
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    for _ in 0..sessions {
        let conn = client
            .connect_with(client_config.clone(), target, E2E_SERVER_NAME)?
            .await?;
        conn.close(0u32.into(), b"");
    }
    let cpu = cpu_seconds() - cpu0;
    println!(
        "quic+tls  {:7.1} µs of CPU a session (both ends), {:.1} ms wall each",
        cpu * 1e6 / sessions as f64,
        wall0.elapsed().as_secs_f64() * 1e3 / sessions as f64
    );
    client.wait_idle().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let sessions: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let tunnel = TunnelId::random();
    // Made once per cookie, as a node does.
    let cookie = CookiePake::new(b"a cookie of the usual length");
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    for _ in 0..sessions {
        pake_once(&cookie, &tunnel);
    }
    println!(
        "pake      {:7.1} µs of CPU a session (both ends), {:.1} µs wall",
        (cpu_seconds() - cpu0) * 1e6 / sessions as f64,
        wall0.elapsed().as_secs_f64() * 1e6 / sessions as f64
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(handshakes(sessions))
}
