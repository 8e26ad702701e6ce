//! TLS 1.3 for relay connections: the relay's certificate (given or
//! generated), its SHA-256 fingerprint, and the client's ways to trust it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use macula_relay_proto::dataplane::HEADER_LEN;
use macula_relay_proto::sessions::SessionTable;
use macula_relay_proto::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::node_socket::NodeSocket;
use crate::relay_socket::RelaySocket;
use crate::udp::UdpIo;

/// The relay's certificate chain and key.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads PEM files (`--cert`, `--key`).
    pub fn from_pem_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let cert_pem =
            std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", cert.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", cert.display());
        }
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .with_context(|| format!("parsing {}", key.display()))?
            .with_context(|| format!("{} holds no private key", key.display()))?;
        Ok(Identity { certs, key })
    }

    /// A fresh self-signed certificate, for relays started without one.
    pub fn self_signed(names: Vec<String>) -> anyhow::Result<Self> {
        let cert = rcgen::generate_simple_self_signed(names)?;
        Ok(Identity {
            certs: vec![cert.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into()),
        })
    }

    /// The relay's identity kept in `dir` (`relay.crt`, `relay.key`, PEM):
    /// loaded when there, else made self-signed and written, so the
    /// fingerprint nodes pin survives restarts.
    pub fn persistent(dir: &Path, names: Vec<String>) -> anyhow::Result<Self> {
        let (cert, key) = (dir.join("relay.crt"), dir.join("relay.key"));
        if cert.exists() && key.exists() {
            return Self::from_pem_files(&cert, &key);
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let made = rcgen::generate_simple_self_signed(names)?;
        write_private(&key, made.key_pair.serialize_pem().as_bytes())?;
        std::fs::write(&cert, made.cert.pem())
            .with_context(|| format!("writing {}", cert.display()))?;
        Self::from_pem_files(&cert, &key)
    }

    /// SHA-256 of the end-entity certificate, in lowercase hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.certs[0])
    }
}

/// Writes a file only its owner can read (a private key).
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport settings shared by relay and client.
#[derive(Debug, Clone)]
pub struct Transport {
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Per-stream receive window: what one tunnel may have in flight.
    pub stream_window: u32,
    /// Streams the peer may open at once (the relay opens one per tunnel).
    pub max_streams: u32,
    /// Largest UDP payload MTU discovery may try (quinn's default, 1472).
    /// Raising it (loopback, jumbo frames) was measured: no gain with GSO.
    pub max_udp_payload: u16,
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
}

impl std::str::FromStr for Congestion {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            other => anyhow::bail!("unknown congestion controller {other:?} (cubic or bbr)"),
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
        if self.congestion == Congestion::Bbr {
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
            .max_idle_timeout(Some(E2E_IDLE_TIMEOUT.try_into()?))
            .keep_alive_interval(Some(E2E_KEEP_ALIVE));

        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload - HEADER_LEN as u16);
        t.mtu_discovery_config(Some(mtu));
        Ok(t)
    }

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

    /// A node's endpoint: one socket for its relay connections and its e2e
    /// sessions (see [`NodeSocket`]). It accepts e2e sessions only, each
    /// with its own server config (`Incoming::accept_with`).
    pub fn node_endpoint(
        &self,
        addr: SocketAddr,
    ) -> anyhow::Result<(quinn::Endpoint, Arc<NodeSocket>)> {
        let runtime = quinn::default_runtime().context("no async runtime")?;
        let socket = Arc::new(NodeSocket::new(UdpIo::bind(addr)?)?);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            self.endpoint_config()?,
            Some(refusing_server_config()?),
            socket.clone(),
            runtime,
        )?;
        Ok((endpoint, socket))
    }

    /// A relay's endpoint: QUIC for the control plane, session datagrams
    /// forwarded by the socket itself (see [`RelaySocket`]).
    pub fn relay_endpoint(
        &self,
        config: quinn::ServerConfig,
        addr: SocketAddr,
        sessions: Arc<Mutex<SessionTable>>,
    ) -> anyhow::Result<(quinn::Endpoint, Arc<RelaySocket>)> {
        let runtime = quinn::default_runtime().context("no async runtime")?;
        let socket = Arc::new(RelaySocket::new(UdpIo::bind(addr)?, sessions));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            self.endpoint_config()?,
            Some(config),
            socket.clone(),
            runtime,
        )?;
        Ok((endpoint, socket))
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

/// What an unidentified connection may make the relay buffer, at most.
pub const UNIDENTIFIED_WINDOW: u32 = 256 * 1024;

/// A node's endpoint needs a server config to see incoming connections at
/// all; each is then accepted with its session's config or refused. This
/// one is never used to accept: its certificate is throwaway.
fn refusing_server_config() -> anyhow::Result<quinn::ServerConfig> {
    let identity = Identity::self_signed(vec!["refused.invalid".into()])?;
    server_config(identity, &Transport::default())
}

pub fn server_config(
    identity: Identity,
    transport: &Transport,
) -> anyhow::Result<quinn::ServerConfig> {
    // Nodes may show their key (a client certificate): a live name belongs
    // to the key that holds it.
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(crate::identity::AnyNodeKey::new())
        .with_single_cert(identity.certs, identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport.quinn_config()?));
    Ok(config)
}

/// How a client decides to trust the relay's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The SHA-256 of the relay's certificate, in hex (any case, `:`
    /// allowed); several, separated by commas, accept any of them (relays
    /// behind one name, or a certificate being rotated).
    Pin(String),
    /// A PEM file of CA certificates; the relay's name is checked too.
    CaFile(PathBuf),
    /// Accepts any certificate. Only by explicit choice; logged as insecure.
    Insecure,
}

pub fn client_config(trust: &Trust, transport: &Transport) -> anyhow::Result<quinn::ClientConfig> {
    client_config_with_key(trust, transport, None)
}

/// A node's config for its relay connection; with `key`, the node shows it
/// as a client certificate, and its name at the relay belongs to that key.
pub fn client_config_with_key(
    trust: &Trust,
    transport: &Transport,
    key: Option<&crate::identity::NodeIdentity>,
) -> anyhow::Result<quinn::ClientConfig> {
    let auth = |b: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>| -> anyhow::Result<rustls::ClientConfig> {
        Ok(match key {
            Some(id) => b.with_client_auth_cert(id.chain(), id.key())?,
            None => b.with_no_client_auth(),
        })
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match trust {
        Trust::CaFile(path) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(cert.with_context(|| format!("parsing {}", path.display()))?)?;
            }
            if roots.is_empty() {
                bail!("{} holds no certificate", path.display());
            }
            auth(builder.with_root_certificates(roots))?
        }
        Trust::Pin(hex_pins) => {
            let pins = hex_pins
                .split(',')
                .map(parse_pin)
                .collect::<anyhow::Result<Vec<_>>>()?;
            auth(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Verifier {
                        pins: Some(pins),
                        provider: provider(),
                    })),
            )?
        }
        Trust::Insecure => auth(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier {
                    pins: None,
                    provider: provider(),
                })),
        )?,
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport.quinn_config()?));
    Ok(config)
}

/// Parses a hex SHA-256 fingerprint; colons and case are ignored.
pub fn parse_pin(text: &str) -> anyhow::Result<[u8; 32]> {
    let clean: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(clean.trim()).context("pin_sha256 is not hex")?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("pin_sha256 must be 32 bytes (64 hex characters)"))
}

/// Checks the relay's certificate against pinned SHA-256s (or, without
/// pins, accepts any), and in both cases checks the handshake signatures.
#[derive(Debug)]
struct Verifier {
    pins: Option<Vec<[u8; 32]>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = Sha256::digest(end_entity.as_ref());
        match &self.pins {
            Some(pins) if !pins.iter().any(|p| digest.as_slice() == p) => Err(
                rustls::Error::General("certificate does not match pin_sha256".into()),
            ),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
