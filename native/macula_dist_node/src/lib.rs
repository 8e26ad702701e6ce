//! A macula dist node, without Erlang: what the NIF runs for a node, and
//! what tests and benchmarks run as one.
//!
//! - [`identity`]: the node's key, and the TLS checks of e2e sessions.
//! - [`relay_trust`]: how a node trusts its relay.
//! - [`node_socket`]: the node's one UDP socket, which routes e2e sessions
//!   through relays or direct paths under quinn.
//! - [`endpoint`]: the node's quinn endpoint on that socket, which accepts
//!   only the e2e sessions a relay announced.
//! - [`registry`]: the node: its relay clients, its endpoint, and the
//!   sessions that outlive a relay connection (failover).
//! - [`relay_client`]: one relay connection, its control stream, and the
//!   tunnels and sessions it hands out (events up to its owner).
//! - [`e2e_session`]: setting up an e2e session (TLS, then the PAKE).
//! - [`tunnel`]: one tunnel's data path (a QUIC stream pair).
//! - [`e2e_node`] (feature `test-util`): a minimal e2e session client.
//!
//! Modules call down this list's dependencies only: the registry knows
//! clients as [`registry::SessionCarrier`]s, sessions report to their
//! client over a channel, tunnels to their owner through a sink.
//!
//! It builds on `macula_dist_quic` and `macula_relay_proto`, never on the
//! relay (`macula_dist_relay` is only a dev-dependency, for tests).

#[cfg(feature = "test-util")]
pub mod e2e_node;
pub mod e2e_session;
pub mod endpoint;
pub mod identity;
pub mod lanes;
pub mod node_socket;
pub mod registry;
pub mod relay_client;
pub mod relay_trust;
pub mod tunnel;
