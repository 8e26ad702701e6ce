//! QUIC transport settings shared by relay and node: timeouts, windows,
//! congestion control, and the endpoints they make.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use macula_relay_proto::node::dist_route::LANES;
use macula_relay_proto::wire::dataplane::HEADER_LEN;

use crate::nudge::NudgeFactory;

/// QUIC transport settings shared by relay and client.
#[derive(Debug, Clone)]
pub struct Transport {
    /// Silence after which a connection counts as lost.
    pub idle_timeout: Duration,
    /// Interval of keep-alive pings on an idle connection.
    pub keep_alive: Duration,
    /// Per-stream receive window: what one tunnel may have in flight.
    pub stream_window: u32,
    /// Streams the peer may open at once (the relay opens one per tunnel).
    pub max_streams: u32,
    /// Largest UDP payload MTU discovery may try (quinn's default, 1472).
    /// Raising it (loopback, jumbo frames) was measured: no gain with GSO.
    pub max_udp_payload: u16,
    /// The congestion controller.
    pub congestion: Congestion,
}

/// The congestion controller of a node's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// quinn's default: loss-based, so random loss on a long path caps it
    /// hard (measured: 0.08 MB/s at 100 ms RTT and 2 % loss).
    #[default]
    Cubic,
    /// quinn's BBR (marked experimental there): paces by measured bandwidth
    /// and RTT, so random loss costs little (8.6 MB/s on that link), at
    /// some loss of loopback bulk speed.
    Bbr,
    /// quinn's BBR with what is in flight held near the bandwidth-delay
    /// product it measured ([`crate::bounded_bbr`]): BBR's speed on a
    /// lossy path without the queue it keeps there.
    BoundedBbr,
    /// quinn's cubic with the same bound.
    BoundedCubic,
}

impl std::str::FromStr for Congestion {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "bbr_bounded" => Ok(Congestion::BoundedBbr),
            "cubic_bounded" => Ok(Congestion::BoundedCubic),
            other => {
                anyhow::bail!("unknown congestion controller {other:?} (cubic, bbr, bbr_bounded or cubic_bounded)")
            }
        }
    }
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            stream_window: 4 * 1024 * 1024,
            max_streams: 4096,
            max_udp_payload: 1472,
            congestion: Congestion::default(),
        }
    }
}

impl Transport {
    /// quinn's transport settings for these values.
    pub fn quinn_config(&self) -> anyhow::Result<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(self.idle_timeout.try_into()?))
            .keep_alive_interval(Some(self.keep_alive))
            .max_concurrent_bidi_streams(self.max_streams.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(self.stream_window.into())
            .receive_window((self.stream_window as u64 * 4).try_into()?)
            .send_window(self.stream_window as u64 * 4);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        // A relay connection carries e2e sessions' datagrams, each session
        // with its own controller: under bounded BBR the relay connection
        // runs plain BBR, so that it does not become a second, lossier
        // bottleneck in front of the sessions' own.
        if matches!(self.congestion, Congestion::Bbr | Congestion::BoundedBbr) {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Ok(t)
    }

    /// Connection receive window: four streams' worth.
    pub fn connection_window(&self) -> u64 {
        self.stream_window as u64 * 4
    }

    /// The relay's side of node connections. A node opens one stream (its
    /// control stream; the relay opens the tunnel streams), and until it
    /// identifies it may not make the relay buffer more than
    /// [`UNIDENTIFIED_WINDOW`]; identify raises the window.
    pub fn relay_quinn_config(&self) -> anyhow::Result<quinn::TransportConfig> {
        let mut t = self.quinn_config()?;
        t.max_concurrent_bidi_streams(1u32.into())
            .receive_window(UNIDENTIFIED_WINDOW.into());
        Ok(t)
    }

    /// The same for the QUIC connection of an e2e session: its datagrams
    /// travel behind the relay's session header, so they are that much
    /// smaller; a node opens one stream per session.
    ///
    /// A session's peer that vanishes is noticed by the relay (see
    /// [`E2E_IDLE_TIMEOUT`]), or else after that much silence.
    pub fn e2e_quinn_config(&self) -> anyhow::Result<quinn::TransportConfig> {
        let mut t = self.quinn_config()?;
        t.max_concurrent_bidi_streams(4u32.into())
            // The peer's lanes (one per sender group).
            .max_concurrent_uni_streams((LANES as u32).into())
            .max_idle_timeout(Some(E2E_IDLE_TIMEOUT.try_into()?))
            .keep_alive_interval(Some(E2E_KEEP_ALIVE));
        // The configured controller, nudgeable after a reroute.
        let bbr = Arc::new(quinn::congestion::BbrConfig::default());
        let cubic = Arc::new(quinn::congestion::CubicConfig::default());
        let controller = match self.congestion {
            Congestion::Cubic => NudgeFactory::new(cubic),
            Congestion::Bbr => NudgeFactory::new(bbr),
            Congestion::BoundedBbr => NudgeFactory::bounded(bbr),
            Congestion::BoundedCubic => NudgeFactory::bounded(cubic),
        };
        t.congestion_controller_factory(Arc::new(controller));

        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload - HEADER_LEN as u16)
            .minimum_change(E2E_MTU_STEP);
        t.mtu_discovery_config(Some(mtu));
        Ok(t)
    }

    /// One session's settings, given the relay's word on its path
    /// (`pmtu`): started at [`Transport::e2e_initial_mtu`] when that gives
    /// a start; `None`: [`Transport::e2e_quinn_config`]'s, as they are.
    pub fn e2e_session_quinn_config(
        &self,
        path_mtu: Option<u16>,
    ) -> anyhow::Result<Option<Arc<quinn::TransportConfig>>> {
        let Some(mtu) = self.e2e_initial_mtu(path_mtu) else {
            return Ok(None);
        };
        let mut t = self.e2e_quinn_config()?;
        t.initial_mtu(mtu);
        Ok(Some(Arc::new(t)))
    }

    /// Where an e2e session starts its MTU, given the relay's word on the
    /// path (`pmtu`: the MTU of the relay's connections to both sides): that
    /// less the relay's session header, within the session's search bound.
    /// At the bound, the session sends no MTU probes: four datagrams and
    /// their acknowledgements fewer a session, a seventh of the datagrams
    /// of a forming 100-node mesh. `None` (no word, or no room above
    /// QUIC's 1200 bytes): quinn starts at 1200 and searches, as without a
    /// relay's word. A relay that lies costs its sessions a black hole
    /// detection (back to 1200), no more.
    pub fn e2e_initial_mtu(&self, path_mtu: Option<u16>) -> Option<u16> {
        let inner = path_mtu?.checked_sub(HEADER_LEN as u16)?;
        let mtu = inner.min(self.max_udp_payload.saturating_sub(HEADER_LEN as u16));
        (mtu > QUIC_MIN_MTU).then_some(mtu)
    }

    /// The endpoint settings: largest datagram, and the QUIC bit never greased (session datagrams are told apart by it).
    pub fn endpoint_config(&self) -> anyhow::Result<quinn::EndpointConfig> {
        let mut config = quinn::EndpointConfig::default();
        config.max_udp_payload_size(self.max_udp_payload)?;
        // Session datagrams are told from QUIC packets by the fixed bit:
        // peers must never clear it (RFC 9287 greasing).
        config.grease_quic_bit(false);
        Ok(config)
    }

    /// An endpoint on a plain UDP socket (tests and benchmarks).
    pub fn server_endpoint(
        &self,
        config: quinn::ServerConfig,
        addr: SocketAddr,
    ) -> anyhow::Result<quinn::Endpoint> {
        self.endpoint(Some(config), addr)
    }

    /// A client endpoint on a plain UDP socket (connections get their config at connect).
    pub fn client_endpoint(&self, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
        self.endpoint(None, addr)
    }

    fn endpoint(
        &self,
        server: Option<quinn::ServerConfig>,
        addr: SocketAddr,
    ) -> anyhow::Result<quinn::Endpoint> {
        let runtime = quinn::default_runtime().context("no async runtime")?;
        let socket =
            std::net::UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_recv_buffer_size(crate::udp::SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(crate::udp::SOCKET_BUFFER);
        Ok(quinn::Endpoint::new(
            self.endpoint_config()?,
            server,
            socket,
            runtime,
        )?)
    }

    /// An endpoint on a socket of one's own (the node's, the relay's),
    /// which sees every datagram before quinn does.
    pub fn abstract_endpoint(
        &self,
        server: Option<quinn::ServerConfig>,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
    ) -> anyhow::Result<quinn::Endpoint> {
        let runtime = quinn::default_runtime().context("no async runtime")?;
        Ok(quinn::Endpoint::new_with_abstract_socket(
            self.endpoint_config()?,
            server,
            socket,
            runtime,
        )?)
    }
}

/// Silence after which an e2e session's peer counts as gone. A peer that
/// dies is noticed sooner through the relay: its relay connection times
/// out (nodes keep that one alive every second), and the relay tells the
/// other side with `tun_close`. Per-session liveness would cost N² packets
/// a second in an idle mesh; the relay's costs N.
pub const E2E_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval of e2e sessions (the path's NAT mapping is the
/// relay connection's, kept by its own keep-alives).
pub const E2E_KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The smallest step of an e2e session's MTU search. quinn's default (20)
/// makes four probes of 1.3 to 1.4 KiB a side in every session on a
/// 1500-byte path, a good part of a short session's packets when a mesh
/// forms; with this step a session probes 1327 bytes, then the upper
/// bound (1455 there): two probes, and at worst 127 bytes short of the
/// path's MTU.
pub const E2E_MTU_STEP: u16 = 100;

/// The datagram every QUIC path must carry (RFC 9000, 14), quinn's floor.
const QUIC_MIN_MTU: u16 = 1200;

/// What an unidentified connection may make the relay buffer, at most.
pub const UNIDENTIFIED_WINDOW: u32 = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_starts_at_the_relays_path_mtu_within_its_own_bound() {
        let t = Transport::default(); // max_udp_payload 1472
        let header = HEADER_LEN as u16;
        // No word from the relay: quinn's 1200 and search.
        assert_eq!(t.e2e_initial_mtu(None), None);
        // A 1500-byte path: at the search bound, nothing left to probe.
        assert_eq!(t.e2e_initial_mtu(Some(1472)), Some(1472 - header));
        // A lie (or a jumbo path) never passes the node's own bound.
        assert_eq!(t.e2e_initial_mtu(Some(u16::MAX)), Some(1472 - header));
        // A smaller path: there, searching up from it.
        assert_eq!(t.e2e_initial_mtu(Some(1400)), Some(1400 - header));
        // No room above QUIC's floor once the header is paid: quinn's way.
        assert_eq!(t.e2e_initial_mtu(Some(1200 + header)), None);
        assert_eq!(t.e2e_initial_mtu(Some(1200)), None);
        assert_eq!(t.e2e_initial_mtu(Some(0)), None);
        // quinn takes every start this gives; none, the shared settings.
        for pmtu in [1219, 1300, 1472, u16::MAX] {
            assert!(t.e2e_session_quinn_config(Some(pmtu)).unwrap().is_some());
        }
        assert!(t.e2e_session_quinn_config(Some(1200)).unwrap().is_none());
    }
}
