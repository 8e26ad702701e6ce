//! End-to-end identity of e2e sessions: each node's TLS key, and the checks
//! each end makes of the other's, so that the relay, which forwards the
//! sessions' datagrams, can neither read them nor stand in for a node.
//!
//! In the default (cookie) mode a node's key is its own: random, made on
//! first use and kept in its state directory ([`NodeIdentity::load_or_create`]).
//! It names the node at the relay and in TLS, and is never a function of
//! the cookie, so nothing the relay or a token holder sees can be tested
//! against cookie guesses. The TLS handshake of a session accepts any key
//! ([`PeerCheck::AnyKey`]); the cookie is then proved inside the session by
//! a PAKE bound to its TLS exporter (`macula_relay_proto::node::session_auth`)
//! before any byte reaches the distribution layer.
//!
//! The other mode is a cluster CA: each node holds a certificate issued by
//! the cluster's CA with its node name in the SAN (a URI `macula://NAME`),
//! and a peer must show a chain to that CA naming the node it dials or the
//! node the relay announced. Trust then rests on the CA, not on the cookie,
//! and the check is made inside the TLS handshake.

use std::sync::Arc;

use anyhow::Context;
use macula_relay_proto::ALPN_E2E;
use ring::hkdf;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use macula_dist_quic::{crypto_provider as provider, fingerprint, Transport};

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
    /// The certificate carrying the key (self-signed, or issued by a
    /// cluster CA and followed by its intermediates).
    pub cert: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
    pkcs8: Vec<u8>,
    /// The DER SubjectPublicKeyInfo peers compare with.
    pub spki: Vec<u8>,
}

impl NodeIdentity {
    /// A new random Ed25519 key.
    pub fn generate() -> anyhow::Result<Self> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        Self::from_pkcs8(key_pair.serialize_der())
    }

    /// The key kept in `path` (PEM PKCS#8), made there first if missing:
    /// written to a temporary file (mode 0600) and linked into place, so
    /// clients starting at once all end up with the one key.
    pub fn load_or_create(path: &std::path::Path) -> anyhow::Result<Self> {
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                file.write_all(key_pair.serialize_pem().as_bytes())?;
                file.sync_all()?;
            }
            // Another client may have made it meanwhile: its key wins.
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        Self::from_pem_file(path)
    }

    /// A key derived from `seed` and `node` (deterministic: for tests that
    /// need the same key twice, never for a node).
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
            intermediates: Vec::new(),
            spki: key_pair.public_key_der(),
            pkcs8,
        })
    }

    /// A node key and the certificate chain issued for it (cluster-CA
    /// mode), from PEM files: the first certificate is the node's.
    pub fn from_pem_chain(
        cert_path: &std::path::Path,
        key_path: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let key = Self::from_pem_file(key_path)?;
        let mut chain = read_pem_certs(cert_path)?.into_iter();
        let cert = chain
            .next()
            .with_context(|| format!("{} holds no certificate", cert_path.display()))?;
        let spki = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?
            .subject_public_key_info()
            .as_ref()
            .to_vec();
        anyhow::ensure!(
            spki == key.spki,
            "{} is not the certificate of the key in {}",
            cert_path.display(),
            key_path.display()
        );
        Ok(NodeIdentity {
            cert,
            intermediates: chain.collect(),
            spki,
            pkcs8: key.pkcs8,
        })
    }

    /// The chain this node shows in a handshake.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.cert.clone())
            .chain(self.intermediates.iter().cloned())
            .collect()
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
        fingerprint(&CertificateDer::from(self.spki.clone()))[..16].to_string()
    }
}

fn read_pem_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", path.display()))
}

/// The cluster CA's certificates: a node's peers must show a chain to one.
#[derive(Debug)]
pub struct ClusterCa {
    roots: Vec<rustls::pki_types::TrustAnchor<'static>>,
}

impl ClusterCa {
    pub fn from_pem_file(path: &std::path::Path) -> anyhow::Result<Arc<Self>> {
        let roots = read_pem_certs(path)?
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!roots.is_empty(), "{} holds no certificate", path.display());
        Ok(Arc::new(ClusterCa { roots }))
    }
}

/// A node's identity in cluster-CA mode: its CA-issued certificate and key,
/// and the CA its peers' certificates must chain to.
#[derive(Debug)]
pub struct Cluster {
    pub me: Arc<NodeIdentity>,
    pub ca: Arc<ClusterCa>,
}

impl Cluster {
    pub fn from_pem_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> anyhow::Result<Self> {
        Ok(Cluster {
            me: Arc::new(NodeIdentity::from_pem_chain(cert, key)?),
            ca: ClusterCa::from_pem_file(ca)?,
        })
    }

    /// What a session with `node` requires of it.
    pub fn check_of(&self, node: &str) -> PeerCheck {
        PeerCheck::Named {
            ca: self.ca.clone(),
            node: node.to_string(),
        }
    }
}

/// The SAN that carries a node name in a cluster-CA certificate.
pub fn node_name_uri(node: &str) -> String {
    format!("macula://{node}")
}

/// Whether the certificate names `node` in its SAN (as `macula://NODE`).
fn names_node(cert: &CertificateDer<'_>, node: &str) -> bool {
    use x509_parser::extensions::GeneralName;
    let want = node_name_uri(node);
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return false;
    };
    san.value
        .general_names
        .iter()
        .any(|name| matches!(name, GeneralName::URI(uri) if *uri == want))
}

/// What a peer node must show.
#[derive(Debug, Clone)]
pub enum PeerCheck {
    /// Exactly this key (SubjectPublicKeyInfo).
    Key(Vec<u8>),
    /// Any key that signs the handshake: cookie mode, where the session is
    /// authenticated by the PAKE that follows.
    AnyKey,
    /// A chain to the cluster CA, for a certificate that names this node.
    Named { ca: Arc<ClusterCa>, node: String },
}

#[derive(Debug)]
struct PeerKey {
    check: PeerCheck,
    provider: Arc<CryptoProvider>,
}

impl PeerKey {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        match &self.check {
            PeerCheck::Key(spki) if cert.subject_public_key_info().as_ref() == spki.as_slice() => {
                Ok(())
            }
            PeerCheck::AnyKey => Ok(()),
            PeerCheck::Key(_) => Err(rustls::Error::General(
                "peer key is not the key of the node it claims to be".into(),
            )),
            PeerCheck::Named { ca, node } => {
                cert.verify_for_usage(
                    self.provider.signature_verification_algorithms.all,
                    &ca.roots,
                    intermediates,
                    now,
                    usage,
                    None,
                    None,
                )
                .map_err(|e| {
                    rustls::Error::General(format!("peer certificate not from the cluster CA: {e}"))
                })?;
                if names_node(end_entity, node) {
                    Ok(())
                } else {
                    Err(rustls::Error::General(format!(
                        "peer certificate does not name {}",
                        node_name_uri(node)
                    )))
                }
            }
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
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )
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
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
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

impl NodeIdentity {
    /// This node's key id, as the relay sees it (and `--nodes-file` names it).
    pub fn key_id(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(&self.spki).into()
    }
}

fn peer_key(check: PeerCheck) -> Arc<PeerKey> {
    Arc::new(PeerKey {
        check,
        provider: provider(),
    })
}

/// The requester's side of a session: `me` as the client certificate, and
/// only a server that passes `peer`.
pub fn client_config(
    me: &NodeIdentity,
    peer: PeerCheck,
    transport: &Transport,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(peer_key(peer))
        .with_client_auth_cert(me.chain(), me.key())?;
    tls.alpn_protocols = vec![ALPN_E2E.to_vec()];
    // Sessions are never resumed: no cache of tickets and key shares.
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport.e2e_quinn_config()?));
    Ok(config)
}

/// The target's side of a session: `me` as the server certificate, and a
/// client certificate that passes `peer` required, except in cookie mode
/// ([`PeerCheck::AnyKey`]): there any key would pass, so asking for one
/// would only cost a signature and its check a session. The PAKE, bound to
/// this TLS session's exporter, proves the peer. (The requester still
/// holds a certificate, and shows it to a target that asks.)
pub fn server_config(
    me: &NodeIdentity,
    peer: PeerCheck,
    transport: &Transport,
) -> anyhow::Result<quinn::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match peer {
        PeerCheck::AnyKey => builder.with_no_client_auth(),
        peer => builder.with_client_cert_verifier(peer_key(peer)),
    };
    let mut tls = builder.with_single_cert(me.chain(), me.key())?;
    tls.alpn_protocols = vec![ALPN_E2E.to_vec()];
    tls.max_early_data_size = 0;
    // Sessions are never resumed: no tickets made, sent or stored.
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
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

    fn key_check(check: PeerCheck, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let check = PeerKey {
            check,
            provider: provider(),
        };
        let now = UnixTime::now();
        check.check(cert, &[], now, webpki::KeyUsage::client_auth())?;
        check.check(cert, &[], now, webpki::KeyUsage::server_auth())
    }

    #[test]
    fn only_the_expected_key_passes() {
        let a = NodeIdentity::derive(b"cookie", "a@h").unwrap();
        let b = NodeIdentity::derive(b"cookie", "b@h").unwrap();
        let expect_a = PeerCheck::Key(a.spki.clone());
        assert!(key_check(expect_a.clone(), &a.cert).is_ok());
        assert!(key_check(expect_a.clone(), &b.cert).is_err());
        assert!(key_check(expect_a, &CertificateDer::from(vec![1, 2, 3])).is_err());
    }

    struct TestCa {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    impl TestCa {
        fn new() -> Self {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            TestCa { cert, key }
        }

        fn trust(&self) -> Arc<ClusterCa> {
            let anchor = webpki::anchor_from_trusted_cert(self.cert.der())
                .unwrap()
                .to_owned();
            Arc::new(ClusterCa {
                roots: vec![anchor],
            })
        }

        fn issue(&self, san: &str) -> CertificateDer<'static> {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().unwrap())];
            params
                .signed_by(&key, &self.cert, &self.key)
                .unwrap()
                .der()
                .clone()
        }
    }

    #[test]
    fn cluster_ca_certificates_must_name_the_node() {
        let ca = TestCa::new();
        let expect_a = PeerCheck::Named {
            ca: ca.trust(),
            node: "a@h".into(),
        };
        assert!(key_check(expect_a.clone(), &ca.issue("macula://a@h")).is_ok());
        let err = key_check(expect_a.clone(), &ca.issue("macula://b@h")).unwrap_err();
        assert!(
            err.to_string().contains("does not name macula://a@h"),
            "{err}"
        );
        // Near misses of the name are other names.
        assert!(key_check(expect_a.clone(), &ca.issue("macula://a@h.x")).is_err());
        assert!(key_check(expect_a.clone(), &ca.issue("a@h")).is_err());
        // The right name from another CA, or self-signed, is refused.
        let other = TestCa::new();
        let err = key_check(expect_a.clone(), &other.issue("macula://a@h")).unwrap_err();
        assert!(err.to_string().contains("not from the cluster CA"), "{err}");
        let derived = NodeIdentity::derive(b"cookie", "a@h").unwrap();
        assert!(key_check(expect_a, &derived.cert).is_err());
    }

    #[test]
    fn a_chain_must_match_its_key() {
        let dir = std::env::temp_dir().join(format!("macula-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new();
        let node_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI("macula://a@h".try_into().unwrap())];
        let node_cert = params.signed_by(&node_key, &ca.cert, &ca.key).unwrap();
        let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        for (name, pem) in [
            ("cert.pem", node_cert.pem()),
            ("key.pem", node_key.serialize_pem()),
            ("other.pem", other_key.serialize_pem()),
            ("ca.pem", ca.cert.pem()),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        let me = NodeIdentity::from_pem_chain(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
        let ca = ClusterCa::from_pem_file(&dir.join("ca.pem")).unwrap();
        let check = PeerCheck::Named {
            ca,
            node: "a@h".into(),
        };
        assert!(key_check(check, &me.cert).is_ok());
        let err = NodeIdentity::from_pem_chain(&dir.join("cert.pem"), &dir.join("other.pem"))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("is not the certificate of the key"),
            "{err}"
        );
        assert!(ClusterCa::from_pem_file(&dir.join("key.pem")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
