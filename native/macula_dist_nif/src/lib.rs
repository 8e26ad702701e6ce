//! The `macula_dist_nif` Erlang NIF: rustler glue over `macula_dist_node`
//! (the relay client and the tunnel data path) and `macula_dist_relay`
//! (an embedded relay for tests and demos). It holds resources, turns
//! terms into options and events into messages; no protocol logic.
//!
//! Every function here returns at once: anything that waits runs on the
//! VM's tokio runtime ([`vm_runtime`]) and answers by message, or runs on a
//! dirty scheduler. The messages are described in [`client_nif`] and
//! [`tunnel_nif`].

mod atoms;
mod client_nif;
mod embedded_relay;
mod tunnel_nif;
mod vm_runtime;

use std::sync::atomic::Ordering;

use macula_dist_node::relay_client::LIVE_CLIENTS;
use macula_dist_node::tunnel::LIVE_TUNNELS;

/// Objects alive in this VM, for leak checks: tunnels and clients count up
/// when made and down when Rust frees them (after Erlang let go too).
#[derive(rustler::NifMap)]
struct LiveCounts {
    tunnels: usize,
    clients: usize,
}

#[rustler::nif]
fn live_counts() -> LiveCounts {
    LiveCounts {
        tunnels: LIVE_TUNNELS.load(Ordering::Relaxed),
        clients: LIVE_CLIENTS.load(Ordering::Relaxed),
    }
}

rustler::init!("macula_dist_nif");
