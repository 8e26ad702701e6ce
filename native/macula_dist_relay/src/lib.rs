//! The macula dist relay: a QUIC server that nodes identify to. It pairs
//! their tunnel streams and forwards raw bytes between them (version 1,
//! stream tunnels), and forwards the sealed datagrams of end-to-end QUIC
//! connections between nodes without being able to read them (version 2,
//! e2e sessions).
//!
//! The relay only: what a node runs is in `macula_dist_node`, what both
//! share in `macula_dist_quic` (QUIC plumbing) and `macula_relay_proto`
//! (wire formats and state machines).
//!
//! Run it as the `macula-dist-relay` binary, or inside another process:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let relay = macula_dist_relay::Relay::start(macula_dist_relay::Config::loopback()).await?;
//! println!("{} {}", relay.local_addr(), relay.fingerprint());
//! relay.stop().await;
//! # Ok(()) }
//! ```

mod bindings;
pub mod certificate;
mod forward;
pub mod metrics;
pub mod relay_socket;
mod server;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use macula_relay_proto::relay::router::KeyId;
use macula_relay_proto::relay::sessions::SessionTable;
use std::collections::HashMap;

pub use certificate::RelayCertificate;
pub use macula_dist_quic::Transport;
pub use macula_relay_proto::relay::admission::{AdmissionLimits, RetryPolicy};
pub use macula_relay_proto::relay::router::Limits;
pub use macula_relay_proto::wire::close_code;
pub use metrics::Stats;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Everything a relay needs to run.
pub struct Config {
    pub listen: SocketAddr,
    /// `None`: generate a self-signed certificate at start.
    pub certificate: Option<RelayCertificate>,
    /// When set, identify must carry this token in `tok`.
    pub token: Option<String>,
    pub limits: Limits,
    pub max_frame: usize,
    /// How long a connection may take to identify before it is closed.
    pub identify_timeout: Duration,
    pub transport: Transport,
    /// Caps on connections that have not identified, and QUIC Retry.
    pub admission: AdmissionLimits,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics: Option<SocketAddr>,
    /// When set, only these node names, each with its key id, may join.
    pub nodes: Option<HashMap<String, KeyId>>,
    /// Where the name→key bindings of recently seen nodes are kept across
    /// restarts (in the state directory); `None`: nowhere.
    pub names_file: Option<std::path::PathBuf>,
}

/// Reads a nodes file: lines of `name key-id` (hex SHA-256 of the node's
/// public key); blank lines and `#` comments are skipped.
pub fn read_nodes_file(path: &std::path::Path) -> anyhow::Result<HashMap<String, KeyId>> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut nodes = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(key), None) = (words.next(), words.next(), words.next()) else {
            anyhow::bail!("{}:{}: expected `name key-id`", path.display(), n + 1);
        };
        let key: KeyId = hex::decode(key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .with_context(|| {
                format!("{}:{}: the key id is 64 hex digits", path.display(), n + 1)
            })?;
        nodes.insert(name.to_string(), key);
    }
    Ok(nodes)
}

impl Config {
    /// A relay on 127.0.0.1, port chosen by the OS, self-signed, no token.
    pub fn loopback() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Config::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], macula_relay_proto::DEFAULT_PORT)),
            certificate: None,
            token: None,
            limits: Limits::default(),
            max_frame: macula_relay_proto::DEFAULT_MAX_FRAME,
            identify_timeout: Duration::from_secs(10),
            transport: Transport::default(),
            admission: AdmissionLimits::default(),
            metrics: None,
            nodes: None,
            names_file: None,
        }
    }
}

/// A running relay. Dropping it without [`Relay::stop`] leaves it running
/// until its runtime ends.
pub struct Relay {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    fingerprint: String,
    shutdown: CancellationToken,
    shared: Arc<server::Shared>,
    socket: Arc<relay_socket::RelaySocket>,
    registry: Arc<prometheus_client::registry::Registry>,
    metrics_addr: Option<SocketAddr>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Binds and starts serving. Must be called inside a tokio runtime.
    pub async fn start(mut config: Config) -> anyhow::Result<Relay> {
        let certificate = match config.certificate.take() {
            Some(certificate) => certificate,
            None => RelayCertificate::self_signed(vec![
                "localhost".into(),
                config.listen.ip().to_string(),
            ])?,
        };
        let fingerprint = certificate.fingerprint();
        if config.token.is_none() {
            warn!("no token configured: any node that reaches this relay may join");
        }
        let mut server_config = certificate::server_config(certificate, &config.transport)?;
        server_config.transport_config(Arc::new(config.transport.relay_quinn_config()?));
        let sessions = Arc::new(Mutex::new(SessionTable::default()));
        let (endpoint, socket) = relay_socket::relay_endpoint(
            &config.transport,
            server_config,
            config.listen,
            sessions.clone(),
        )?;
        let local_addr = endpoint.local_addr()?;
        let shutdown = CancellationToken::new();
        let events = Arc::new(metrics::Events::default());
        let shared = Arc::new(server::Shared::new(&config, sessions, events.clone()));
        let stats: Arc<dyn metrics::StatsSource> = shared.clone();
        let registry = Arc::new(metrics::registry(&events, Arc::downgrade(&stats), &socket));
        let metrics_addr = match config.metrics {
            Some(addr) => {
                let listener = metrics::bind(addr).await?;
                let bound = listener.local_addr()?;
                tokio::spawn(metrics::serve(listener, registry.clone(), shutdown.clone()));
                Some(bound)
            }
            None => None,
        };
        tokio::spawn(server::housekeeping(
            shared.clone(),
            socket.clone(),
            shutdown.clone(),
        ));
        let accept_loop = tokio::spawn(server::accept_loop(
            endpoint.clone(),
            shared.clone(),
            shutdown.clone(),
        ));
        tracing::info!(%local_addr, %fingerprint, "relay listening");
        Ok(Relay {
            endpoint,
            local_addr,
            fingerprint,
            shutdown,
            shared,
            socket,
            registry,
            metrics_addr,
            accept_loop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// SHA-256 of the relay's certificate, lowercase hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn stats(&self) -> Stats {
        metrics::StatsSource::stats(self.shared.as_ref())
    }

    /// The metrics, in Prometheus text format (what `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        metrics::text(&self.registry)
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Counters of the data plane (e2e session datagrams).
    pub fn data_stats(&self) -> &relay_socket::DataStats {
        &self.socket.stats
    }

    /// Test hook: makes the relay corrupt or forge session datagrams, to
    /// check that nodes never accept what a relay altered or made up.
    pub fn data_socket(&self) -> &relay_socket::RelaySocket {
        &self.socket
    }

    /// Resolves when the relay stops (after [`Relay::stop`] from elsewhere).
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await
    }

    /// Closes every connection and waits briefly for the peers to hear it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.shared.save_bindings(true);
        self.endpoint
            .close(close_code::NORMAL.into(), b"relay stopping");
        let _ = self.accept_loop.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}
