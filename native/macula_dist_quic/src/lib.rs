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

/// The one crypto provider of every TLS configuration here: ring, with
/// AES-128-GCM/SHA-256 preferred (QUIC is TLS 1.3 only). rustls prefers
/// AES-256-GCM/SHA-384, whose SHA-384 has no hardware path in ring on
/// x86-64 (SHA-256 has SHA-NI): 7.5 % of a session's set-up CPU went to
/// it (`examples/session_cost.rs` under perf), 0.6 % with SHA-256. X25519 and Ed25519 bound every session at 128-bit security, which
/// AES-128 matches; the other suites stay, in rustls' order, for peers
/// that only offer them.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}
