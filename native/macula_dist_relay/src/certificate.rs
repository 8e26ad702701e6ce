//! The relay's TLS: its certificate (given, kept in the state directory,
//! or made at start), whose SHA-256 nodes pin, and its server config.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use macula_dist_quic::node_key::AnyNodeKey;
use macula_dist_quic::{crypto_provider as provider, fingerprint, Transport};
use macula_relay_proto::ALPN;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The relay's certificate chain and key.
pub struct RelayCertificate {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl RelayCertificate {
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
        Ok(RelayCertificate { certs, key })
    }

    /// A fresh self-signed certificate, for relays started without one.
    pub fn self_signed(names: Vec<String>) -> anyhow::Result<Self> {
        let cert = rcgen::generate_simple_self_signed(names)?;
        Ok(RelayCertificate {
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

pub fn server_config(
    identity: RelayCertificate,
    transport: &Transport,
) -> anyhow::Result<quinn::ServerConfig> {
    // Nodes may show their key (a client certificate): a live name belongs
    // to the key that holds it.
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(AnyNodeKey::new())
        .with_single_cert(identity.certs, identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport.quinn_config()?));
    Ok(config)
}
