//! A macula dist node, without Erlang: what the NIF runs for a node, and
//! what tests and benchmarks run as one.
//!
//! - [`identity`]: the node's key, and the TLS checks of e2e sessions.
//! - [`relay_trust`]: how a node trusts its relay.
//! - [`node_socket`]: the node's one UDP socket, which routes e2e sessions
//!   through relays or direct paths under quinn.
//! - [`e2e_node`] (feature `test-util`): a minimal e2e session client.
//!
//! It builds on `macula_dist_quic` and `macula_relay_proto`, never on the
//! relay (`macula_dist_relay` is only a dev-dependency, for tests).

#[cfg(feature = "test-util")]
pub mod e2e_node;
pub mod identity;
pub mod node_socket;
pub mod relay_trust;
