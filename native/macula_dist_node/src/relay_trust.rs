//! How a node trusts its relay: a pinned SHA-256, a CA file, or (by
//! explicit choice) anything; and the TLS config of its relay connection,
//! which shows the node's key.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use macula_dist_quic::{crypto_provider as provider, Transport};
use macula_relay_proto::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::identity::NodeIdentity;

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
    key: Option<&NodeIdentity>,
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
