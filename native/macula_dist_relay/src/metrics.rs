//! The relay's metrics, in Prometheus text format (`--metrics ADDR` serves
//! them at `/metrics`). Counts that the relay keeps anyway (nodes, tunnels,
//! the data plane's counters) are read at each scrape; events are counted
//! as they happen.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::relay_socket::RelaySocket;

type Labels = Vec<(&'static str, &'static str)>;

/// Events counted as they happen.
#[derive(Debug)]
pub struct Events {
    /// Tunnels opened, by mode.
    pub tunnels_opened: Family<Labels, Counter>,
    /// Seconds from `tun_req` to `tun_ok`, by mode.
    pub tunnel_setup: Family<Labels, Histogram>,
    /// Identify refusals, by reason.
    pub identify_refused: Family<Labels, Counter>,
    /// Connections refused before identify (admission caps), by reason.
    pub connections_refused: Family<Labels, Counter>,
    /// Bytes stream tunnels forwarded (both directions).
    pub stream_bytes: Counter,
    /// E2e session sides that went direct, or back through a relay, by
    /// path: changes only (a repeated report counts nothing).
    pub session_paths: Family<Labels, Counter>,
    /// Session claims (`sess_keep`), by outcome.
    pub session_claims: Family<Labels, Counter>,
    /// Candidates nodes announced (`cand`): accepted and dropped.
    pub candidates_ignored: Counter,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tunnels_opened: Family::default(),
            tunnel_setup: Family::new_with_constructor(|| {
                // 100 µs to about 3 s.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    1e-4, 2.0, 16,
                ))
            }),
            identify_refused: Family::default(),
            connections_refused: Family::default(),
            stream_bytes: Counter::default(),
            session_paths: Family::default(),
            session_claims: Family::default(),
            candidates_ignored: Counter::default(),
        }
    }
}

pub fn mode(mode: macula_relay_proto::Mode) -> Labels {
    vec![("mode", mode.as_str())]
}

pub fn reason(reason: &'static str) -> Labels {
    vec![("reason", reason)]
}

/// Counts a running relay reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub nodes: usize,
    /// Tunnels of both modes.
    pub tunnels: usize,
    /// Of those, e2e sessions.
    pub sessions: usize,
    /// Connections that have not identified (yet).
    pub unidentified: usize,
    /// E2e sessions waiting to be claimed back.
    pub waiting: usize,
}

/// Where the counts come from at scrape time (the relay's shared state).
pub trait StatsSource: Send + Sync {
    fn stats(&self) -> Stats;
}

/// What the relay knows at scrape time.
#[derive(Debug)]
struct State {
    shared: Weak<dyn StatsSource>,
    socket: Weak<RelaySocket>,
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for State {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(shared) = self.shared.upgrade() {
            let s = shared.stats();
            gauge(&mut e, "nodes", "Nodes identified.", s.nodes as u64)?;
            gauge(
                &mut e,
                "sessions_waiting",
                "E2e sessions waiting to be claimed back (sess_keep).",
                s.waiting as u64,
            )?;
            gauge(
                &mut e,
                "unidentified_connections",
                "Connections not identified (yet).",
                s.unidentified as u64,
            )?;
            let tunnels = ConstGauge::new(0i64);
            let mut family = e.encode_descriptor(
                "tunnels",
                "Open tunnels, by mode.",
                None,
                tunnels.metric_type(),
            )?;
            for (m, v) in [("stream", s.tunnels - s.sessions), ("e2e", s.sessions)] {
                ConstGauge::new(v as i64).encode(family.encode_family(&vec![("mode", m)])?)?;
            }
        }
        if let Some(socket) = self.socket.upgrade() {
            let d = &socket.stats;
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            counter(
                &mut e,
                "forwarded_datagrams",
                "Session datagrams forwarded (e2e).",
                load(&d.forwarded_datagrams),
            )?;
            counter(
                &mut e,
                "forwarded_bytes",
                "Session datagram bytes forwarded (e2e).",
                load(&d.forwarded_bytes),
            )?;
            counter(
                &mut e,
                "rebinds",
                "Session sides moved to their node's new relay connection address.",
                load(&d.rebinds),
            )?;
            let dropped = ConstCounter::new(0u64);
            let mut family = e.encode_descriptor(
                "dropped_datagrams",
                "Datagrams dropped by the data plane, by reason.",
                None,
                dropped.metric_type(),
            )?;
            for (r, v) in [
                ("unknown_session", load(&d.dropped_unknown_session)),
                ("bad_bind", load(&d.dropped_bad_bind)),
                ("malformed", load(&d.dropped_malformed)),
                ("overload", load(&d.dropped_overload)),
                ("unbound", load(&d.dropped_unbound)),
            ] {
                ConstCounter::new(v).encode(family.encode_family(&vec![("reason", r)])?)?;
            }
        }
        Ok(())
    }
}

/// The registry of one relay: its events and its scrape-time state.
pub(crate) fn registry(
    events: &Arc<Events>,
    shared: Weak<dyn StatsSource>,
    socket: &Arc<RelaySocket>,
) -> Registry {
    let mut r = Registry::with_prefix("macula_relay");
    r.register(
        "tunnels_opened",
        "Tunnels opened, by mode.",
        events.tunnels_opened.clone(),
    );
    r.register(
        "tunnel_setup_seconds",
        "Seconds from tun_req to tun_ok, by mode.",
        events.tunnel_setup.clone(),
    );
    r.register(
        "identify_refused",
        "Identify refusals, by reason.",
        events.identify_refused.clone(),
    );
    r.register(
        "connections_refused",
        "Connections refused before identify, by reason.",
        events.connections_refused.clone(),
    );
    r.register(
        "stream_bytes",
        "Bytes forwarded by stream tunnels.",
        events.stream_bytes.clone(),
    );
    r.register(
        "session_paths",
        "E2e session sides that went direct (path=direct) or back through a relay (path=relay).",
        events.session_paths.clone(),
    );
    r.register(
        "session_claims",
        "Session claims (sess_keep), by outcome.",
        events.session_claims.clone(),
    );
    r.register(
        "candidates_ignored",
        "Candidates nodes announced (cand): the relay forwards none.",
        events.candidates_ignored.clone(),
    );
    r.register_collector(Box::new(State {
        shared,
        socket: Arc::downgrade(socket),
    }));
    r
}

pub(crate) fn text(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` on `listener` until `shutdown`. One request per
/// connection, headers bounded, a slow client dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let response = if head.starts_with(b"GET /metrics ") {
                let body = text(&registry);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics listener (before the relay reports itself started).
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))
}
