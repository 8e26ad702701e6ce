//! `macula-dist-relay`: the relay as a command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use macula_dist_relay::{tls, Config, Limits, Relay};
use tracing_subscriber::EnvFilter;

/// QUIC relay for Erlang distribution: nodes identify to it, and it pairs
/// their tunnel streams so `-proto_dist macula` works across NAT.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// UDP address to listen on.
    #[arg(long, env = "MACULA_DIST_LISTEN", default_value = "0.0.0.0:4434")]
    listen: SocketAddr,

    /// Port to listen on; overrides the port of --listen.
    #[arg(long, env = "MACULA_DIST_PORT")]
    port: Option<u16>,

    /// PEM certificate chain. Without --cert/--key a self-signed certificate
    /// is generated at start and its SHA-256 fingerprint printed.
    #[arg(long, env = "MACULA_DIST_CERT", requires = "key")]
    cert: Option<PathBuf>,

    /// PEM private key for --cert.
    #[arg(long, env = "MACULA_DIST_KEY", requires = "cert")]
    key: Option<PathBuf>,

    /// Also write the certificate's SHA-256 fingerprint (hex) to this file.
    #[arg(long, env = "MACULA_DIST_FINGERPRINT_FILE")]
    fingerprint_file: Option<PathBuf>,

    /// File holding the token nodes must present in identify. Without a
    /// token (here or in MACULA_DIST_TOKEN) any node may join.
    #[arg(long, env = "MACULA_DIST_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,

    /// The token itself (prefer --token-file: arguments are visible in ps).
    #[arg(long, env = "MACULA_DIST_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Most nodes identified at once.
    #[arg(long, env = "MACULA_DIST_MAX_NODES", default_value_t = Limits::default().max_nodes)]
    max_nodes: usize,

    /// Most tunnels one node may have open at once.
    #[arg(long, env = "MACULA_DIST_MAX_TUNNELS_PER_NODE", default_value_t = Limits::default().max_tunnels_per_node)]
    max_tunnels_per_node: usize,

    /// Longest node name accepted (bytes; letters, digits and _-.@[]: only).
    #[arg(long, env = "MACULA_DIST_MAX_NAME_LEN", default_value_t = Limits::default().max_name_len)]
    max_name_len: usize,

    /// Largest control frame accepted (bytes).
    #[arg(long, env = "MACULA_DIST_MAX_FRAME", default_value_t = macula_relay_proto::DEFAULT_MAX_FRAME)]
    max_frame: usize,

    /// Seconds a connection has to identify before it is closed.
    #[arg(long, env = "MACULA_DIST_IDENTIFY_TIMEOUT", default_value_t = 10)]
    identify_timeout: u64,

    /// Seconds without any packet after which a connection is dropped.
    #[arg(long, env = "MACULA_DIST_IDLE_TIMEOUT", default_value_t = 30)]
    idle_timeout: u64,

    /// Seconds between QUIC keep-alive pings (keeps NAT bindings open).
    #[arg(long, env = "MACULA_DIST_KEEP_ALIVE", default_value_t = 5)]
    keep_alive: u64,

    /// Worker threads (default: one per CPU).
    #[arg(long, env = "MACULA_DIST_THREADS")]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads.filter(|n| *n > 0) {
        runtime.worker_threads(n);
    }
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let mut listen = args.listen;
    if let Some(port) = args.port {
        listen.set_port(port);
    }
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(tls::Identity::from_pem_files(cert, key)?),
        _ => None,
    };
    let token = match (&args.token_file, args.token) {
        (Some(path), _) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading token file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, token) => token,
    };
    anyhow::ensure!(token.as_deref() != Some(""), "the token is empty");
    let config = Config {
        listen,
        identity,
        token,
        limits: Limits {
            max_nodes: args.max_nodes,
            max_tunnels_per_node: args.max_tunnels_per_node,
            max_name_len: args.max_name_len,
        },
        max_frame: args.max_frame,
        identify_timeout: Duration::from_secs(args.identify_timeout),
        transport: tls::Transport {
            idle_timeout: Duration::from_secs(args.idle_timeout),
            keep_alive: Duration::from_secs(args.keep_alive),
            ..tls::Transport::default()
        },
    };
    let relay = Relay::start(config).await?;
    // The fingerprint alone on stdout, for clients to pin (pin_sha256).
    println!("{}", relay.fingerprint());
    if let Some(path) = &args.fingerprint_file {
        std::fs::write(path, format!("{}\n", relay.fingerprint()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
    tracing::info!("stopping");
    relay.stop().await;
    Ok(())
}

#[cfg(unix)]
async fn terminate() {
    if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        s.recv().await;
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending::<()>().await
}
