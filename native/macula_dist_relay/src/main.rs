//! `macula-dist-relay`: the relay as a command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use macula_dist_relay::{AdmissionLimits, Config, Limits, Relay, RetryPolicy};
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

    /// PEM certificate chain. Without --cert/--key the relay uses the
    /// self-signed certificate kept in --state-dir (made on first start),
    /// and prints its SHA-256 fingerprint.
    #[arg(long, env = "MACULA_DIST_CERT", requires = "key")]
    cert: Option<PathBuf>,

    /// PEM private key for --cert.
    #[arg(long, env = "MACULA_DIST_KEY", requires = "cert")]
    key: Option<PathBuf>,

    /// Also write the certificate's SHA-256 fingerprint (hex) to this file.
    #[arg(long, env = "MACULA_DIST_FINGERPRINT_FILE")]
    fingerprint_file: Option<PathBuf>,

    /// Where the relay keeps its identity (relay.crt, relay.key) when no
    /// --cert/--key are given. Default: $STATE_DIRECTORY (systemd), else
    /// $XDG_STATE_HOME/macula-dist-relay, else ~/.local/state/macula-dist-relay.
    #[arg(long, env = "MACULA_DIST_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// A new self-signed certificate on every start, kept nowhere (pins
    /// break at each restart: for tests).
    #[arg(long, env = "MACULA_DIST_EPHEMERAL", conflicts_with = "state_dir")]
    ephemeral: bool,

    /// File holding the token nodes must present in identify.
    #[arg(long, env = "MACULA_DIST_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,

    /// Run without any token: any node that reaches the relay may join.
    /// Required when no token is given, so that is never an accident.
    #[arg(long, env = "MACULA_DIST_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,

    /// The token itself (prefer --token-file: arguments are visible in ps).
    #[arg(long, env = "MACULA_DIST_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Most nodes identified at once.
    #[arg(long, env = "MACULA_DIST_MAX_NODES", default_value_t = Limits::default().max_nodes)]
    max_nodes: usize,

    /// Most tunnels one node may have open at once.
    #[arg(long, env = "MACULA_DIST_MAX_TUNNELS_PER_NODE", default_value_t = Limits::default().max_tunnels_per_node)]
    max_tunnels_per_node: usize,

    /// Most tunnels one node may have open to one other node.
    #[arg(long, env = "MACULA_DIST_MAX_TUNNELS_PER_PAIR", default_value_t = Limits::default().max_tunnels_per_pair)]
    max_tunnels_per_pair: usize,

    /// Only the nodes in this file may join: lines of `name key-id`, the
    /// key id being the hex SHA-256 of the node's public key (its client
    /// status shows it as `key_id`); `#` starts a comment.
    #[arg(long, env = "MACULA_DIST_NODES_FILE")]
    nodes_file: Option<PathBuf>,

    /// Seconds a keyed node's name stays bound to its key after the node
    /// was last seen (it left, or the relay restarted): meanwhile only that
    /// key may take the name. Kept across restarts in --state-dir.
    #[arg(long, env = "MACULA_DIST_NAME_HOLD_SECS", default_value_t = Limits::default().name_hold.as_secs())]
    name_hold_secs: u64,

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

    /// Connections that have not identified yet, at most (the rest are refused).
    #[arg(long, env = "MACULA_DIST_MAX_UNIDENTIFIED", default_value_t = AdmissionLimits::default().max_unidentified)]
    max_unidentified: usize,

    /// Connections that have not identified yet from one IP address, at most.
    #[arg(long, env = "MACULA_DIST_MAX_UNIDENTIFIED_PER_IP", default_value_t = AdmissionLimits::default().max_unidentified_per_ip)]
    max_unidentified_per_ip: usize,

    /// When to make clients prove their address with a QUIC Retry first:
    /// never, under-load (half the unidentified slots taken), always.
    #[arg(long, env = "MACULA_DIST_RETRY", default_value = "under-load", value_parser = parse_retry)]
    retry: RetryPolicy,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9434).
    #[arg(long, env = "MACULA_DIST_METRICS")]
    metrics: Option<SocketAddr>,

    /// Log format on stderr: text or json (one object per line).
    #[arg(long, env = "MACULA_DIST_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// Worker threads (default: one per CPU).
    #[arg(long, env = "MACULA_DIST_THREADS")]
    threads: Option<usize>,
}

fn parse_retry(text: &str) -> Result<RetryPolicy, String> {
    match text {
        "never" => Ok(RetryPolicy::Never),
        "under-load" => Ok(RetryPolicy::UnderLoad),
        "always" => Ok(RetryPolicy::Always),
        other => Err(format!("{other}: expected never, under-load or always")),
    }
}

/// Where the relay's identity lives without --state-dir.
fn default_state_dir() -> anyhow::Result<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("STATE_DIRECTORY") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_STATE_HOME") {
        return Ok(PathBuf::from(dir).join("macula-dist-relay"));
    }
    let home = var("HOME").context("no --state-dir, and HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/state/macula-dist-relay"))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads.filter(|n| *n > 0) {
        runtime.worker_threads(n);
    }
    let ran = runtime
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(args)));
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("macula-dist-relay: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let mut listen = args.listen;
    if let Some(port) = args.port {
        listen.set_port(port);
    }
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
    anyhow::ensure!(
        token.is_some() || args.allow_anonymous,
        "no token: give --token-file (or MACULA_DIST_TOKEN), or --allow-anonymous to let any node that reaches this relay join"
    );
    let names = vec!["localhost".into(), listen.ip().to_string()];
    let state_dir = match &args.state_dir {
        _ if args.ephemeral => None,
        Some(dir) => Some(dir.clone()),
        None => default_state_dir().ok(),
    };
    let certificate = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some(macula_dist_relay::RelayCertificate::from_pem_files(
            cert, key,
        )?),
        _ if args.ephemeral => None,
        _ => {
            let dir = match &state_dir {
                Some(dir) => dir.clone(),
                None => default_state_dir()?,
            };
            let certificate = macula_dist_relay::RelayCertificate::persistent(&dir, names)?;
            tracing::info!(dir = %dir.display(), "relay certificate kept in the state directory");
            Some(certificate)
        }
    };

    let config = Config {
        listen,
        certificate,
        token,
        limits: Limits {
            max_nodes: args.max_nodes,
            max_tunnels_per_node: args.max_tunnels_per_node,
            max_tunnels_per_pair: args.max_tunnels_per_pair,
            max_name_len: args.max_name_len,
            name_hold: Duration::from_secs(args.name_hold_secs),
        },
        max_frame: args.max_frame,
        identify_timeout: Duration::from_secs(args.identify_timeout),
        transport: macula_dist_quic::Transport {
            idle_timeout: Duration::from_secs(args.idle_timeout),
            keep_alive: Duration::from_secs(args.keep_alive),
            ..macula_dist_quic::Transport::default()
        },
        admission: AdmissionLimits {
            max_unidentified: args.max_unidentified,
            max_unidentified_per_ip: args.max_unidentified_per_ip,
            retry: args.retry,
        },
        metrics: args.metrics,
        nodes: match &args.nodes_file {
            Some(path) => Some(macula_dist_relay::read_nodes_file(path)?),
            None => None,
        },
        names_file: state_dir.map(|dir| dir.join("names")),
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
