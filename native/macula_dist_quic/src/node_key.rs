//! A node's key as the relay sees it: the key id names it, and the relay
//! takes any key whose certificate parses and signs the handshake.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::crypto_provider as provider;

/// A node's key id: SHA-256 of the SubjectPublicKeyInfo of its
/// certificate (`None` for what is not a certificate).
pub fn key_id(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(Sha256::digest(cert.subject_public_key_info().as_ref()).into())
}

/// The relay's check of the certificates nodes offer: optional (version 1
/// clients have none), any key, but the certificate must parse and its key
/// must sign the handshake. Which name a key may hold is the router's
/// business.
#[derive(Debug)]
pub struct AnyNodeKey(Arc<CryptoProvider>);

impl AnyNodeKey {
    /// The verifier, shared by every connection of a relay.
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
