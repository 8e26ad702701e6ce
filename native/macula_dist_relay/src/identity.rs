//! End-to-end identity of e2e sessions: each node's TLS key, and the checks
//! each end makes of the other's, so that the relay, which forwards the
//! sessions' datagrams, can neither read them nor stand in for a node.
//!
//! The default key needs no PKI: an Ed25519 key derived with HKDF-SHA256
//! from the Erlang cookie (the one used for that peer) and the node's name.
//! A node that knows the cookie computes the key it expects of any node
//! name, so both ends check each other; a relay without the cookie cannot.
//! This is Erlang's own trust model ("the cookie is membership"): a weak
//! cookie is a weak key.
//!
//! The check is made inside the TLS handshake (both sides send a
//! certificate; its key must be the expected one and sign the handshake),
//! so nothing reaches the distribution layer before it passes.

use std::sync::Arc;

use anyhow::Context;
use macula_relay_proto::ALPN_E2E;
use ring::hkdf;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::tls::Transport;

/// HKDF salt: changing it changes every derived key.
const KEY_SALT: &[u8] = b"macula-dist e2e node key v1";
/// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410).
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The name in e2e certificates and the SNI of e2e handshakes (keys are
/// checked, names are not).
pub const E2E_SERVER_NAME: &str = "macula-node";

/// A node's key and the self-signed certificate that carries it.
#[derive(Debug)]
pub struct NodeIdentity {
    pub cert: CertificateDer<'static>,
    pkcs8: Vec<u8>,
    /// The DER SubjectPublicKeyInfo peers compare with.
    pub spki: Vec<u8>,
}

impl NodeIdentity {
    /// The key of `node` under `cookie`.
    pub fn derive(cookie: &[u8], node: &str) -> anyhow::Result<Self> {
        let mut seed = [0u8; 32];
        hkdf::Salt::new(hkdf::HKDF_SHA256, KEY_SALT)
            .extract(cookie)
            .expand(&[node.as_bytes()], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut seed))
            .map_err(|_| anyhow::anyhow!("HKDF failed"))?;
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(&seed);
        Self::from_pkcs8(pkcs8)
    }

    /// A node key given as PKCS#8 DER (Ed25519 or ECDSA P-256).
    pub fn from_pkcs8(pkcs8: Vec<u8>) -> anyhow::Result<Self> {
        let key_pair =
            rcgen::KeyPair::try_from(pkcs8.as_slice()).context("reading the node key")?;
        let params = rcgen::CertificateParams::new(vec![E2E_SERVER_NAME.into()])?;
        let cert = params.self_signed(&key_pair)?;
        Ok(NodeIdentity {
            cert: cert.der().clone(),
            spki: key_pair.public_key_der(),
            pkcs8,
        })
    }

    /// A node key from a PEM file (PKCS#8: Ed25519 or ECDSA P-256).
    pub fn from_pem_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        match rustls_pemfile::private_key(&mut pem.as_slice())? {
            Some(PrivateKeyDer::Pkcs8(der)) => Self::from_pkcs8(der.secret_pkcs8_der().to_vec()),
            _ => anyhow::bail!("{} holds no PKCS#8 private key", path.display()),
        }
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.pkcs8.clone().into())
    }

    /// Short printable form of the public key (for logs and status).
    pub fn fingerprint(&self) -> String {
        crate::tls::fingerprint(&CertificateDer::from(self.spki.clone()))[..16].to_string()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly one key: the one the peer node must hold.
#[derive(Debug)]
struct PeerKey {
    spki: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl PeerKey {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        if cert.subject_public_key_info().as_ref() == self.spki.as_slice() {
            Ok(())
        } else {
            Err(rustls::Error::General(
                "peer key is not the key of the node it claims to be".into(),
            ))
        }
    }

    fn verify_tls13(
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

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for PeerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
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
        self.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for PeerKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
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
        self.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// A node's key id: SHA-256 of the SubjectPublicKeyInfo of its
/// certificate (`None` for what is not a certificate).
pub fn key_id(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(Sha256::digest(cert.subject_public_key_info().as_ref()).into())
}

impl NodeIdentity {
    /// This node's key id, as the relay sees it (and `--nodes-file` names it).
    pub fn key_id(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(&self.spki).into()
    }
}

/// The relay's check of the certificates nodes offer: optional (version 1
/// clients have none), any key, but the certificate must parse and its key
/// must sign the handshake. Which name a key may hold is the router's
/// business.
#[derive(Debug)]
pub struct AnyNodeKey(Arc<CryptoProvider>);

impl AnyNodeKey {
    pub fn new() -> Arc<Self> {
        Arc::new(AnyNodeKey(provider()))
    }
}

impl ClientCertVerifier for AnyNodeKey {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        key_id(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .ok_or_else(|| rustls::Error::General("node certificate does not parse".into()))
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn peer_key(spki: Vec<u8>) -> Arc<PeerKey> {
    Arc::new(PeerKey {
        spki,
        provider: provider(),
    })
}

/// The requester's side of a session: `me` as the client certificate, and
/// only `peer_spki` accepted from the server.
pub fn client_config(
    me: &NodeIdentity,
    peer_spki: Vec<u8>,
    transport: &Transport,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(peer_key(peer_spki))
        .with_client_auth_cert(vec![me.cert.clone()], me.key())?;
    tls.alpn_protocols = vec![ALPN_E2E.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport.e2e_quinn_config()?));
    Ok(config)
}

/// The target's side of a session: `me` as the server certificate, and a
/// client certificate with `peer_spki` required.
pub fn server_config(
    me: &NodeIdentity,
    peer_spki: Vec<u8>,
    transport: &Transport,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(peer_key(peer_spki))
        .with_single_cert(vec![me.cert.clone()], me.key())?;
    tls.alpn_protocols = vec![ALPN_E2E.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport.e2e_quinn_config()?));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_cookie_and_name_only() {
        let a1 = NodeIdentity::derive(b"cookie", "a@h").unwrap();
        let a2 = NodeIdentity::derive(b"cookie", "a@h").unwrap();
        let b = NodeIdentity::derive(b"cookie", "b@h").unwrap();
        let a_other = NodeIdentity::derive(b"other", "a@h").unwrap();
        assert_eq!(a1.spki, a2.spki);
        assert_ne!(a1.spki, b.spki);
        assert_ne!(a1.spki, a_other.spki);
    }

    #[test]
    fn only_the_expected_key_passes() {
        let a = NodeIdentity::derive(b"cookie", "a@h").unwrap();
        let b = NodeIdentity::derive(b"cookie", "b@h").unwrap();
        let check = PeerKey {
            spki: a.spki.clone(),
            provider: provider(),
        };
        assert!(check.check(&a.cert).is_ok());
        assert!(check.check(&b.cert).is_err());
        assert!(check.check(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
