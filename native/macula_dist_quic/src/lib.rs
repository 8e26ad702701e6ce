#![warn(missing_docs)]
//! The QUIC plumbing the relay and the node share: the UDP socket under
//! quinn ([`udp`]), transport settings ([`transport`]), the control
//! stream's writer ([`control_stream`]), a congestion controller that can
//! be nudged past its window after a reroute ([`nudge`]), and how a relay reads a node's key
//! ([`node_key`]). Neither side's logic lives here: `macula_dist_relay`
//! and `macula_dist_node` both build on it, and not on each other.

pub mod bounded_bbr;
pub mod control_stream;
pub mod node_key;
pub mod nudge;
pub mod transport;
pub mod udp;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

pub use control_stream::{write_control, CONTROL_QUEUE};
pub use transport::{Congestion, Transport};

/// SHA-256 of a certificate, lowercase hex (what `pin_sha256` names).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// The one crypto provider of every TLS configuration here: ring.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
