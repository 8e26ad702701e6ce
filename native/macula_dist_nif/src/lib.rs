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

/// The NIF's own allocator. With glibc's, its threads' arenas gave memory
/// back and took it again so often that zeroing fresh pages was a third
/// of its CPU while a mesh of seventy nodes formed (`perf`: sysmalloc's
/// page faults); mimalloc keeps freed pages for reuse a while
/// ([`PURGE_DELAY_MS`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before giving it back to the OS:
/// a mesh forming frees and takes memory again over seconds, and its
/// default (1 s) gave it back in between (1.4 times the NIF's CPU in a
/// mesh of seventy nodes, measured against 2 s).
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;
/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (the -sys crate
/// names only the options before it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn load(_env: rustler::Env, _info: rustler::Term) -> bool {
    // mimalloc's own variable, when set, wins (as it does for any program).
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an integer option; mimalloc reads options at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    true
}

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

/// Where the e2e router sends each of `packets` (as `dist_ctrl_get_data`
/// gave them, in order, one router for all): `control`, `fence` or
/// `{lane, N}`. For tests that capture what the VM really sends.
#[rustler::nif]
fn dist_routes<'a>(
    env: rustler::Env<'a>,
    packets: Vec<rustler::Binary<'a>>,
) -> Vec<rustler::Term<'a>> {
    use macula_relay_proto::node::dist_route::{DistRouter, Route};
    use rustler::Encoder;
    let mut router = DistRouter::new();
    packets
        .iter()
        .map(|packet| match router.route(packet.as_slice()) {
            Route::Control => atoms::control().encode(env),
            Route::Fence => atoms::fence().encode(env),
            Route::Lane(lane) => (atoms::lane(), lane).encode(env),
        })
        .collect()
}

/// The lane of a pid given as `term_to_binary` output, or `nil` when it is
/// not one (`undefined`): what [`dist_routes`] gives that pid's packets.
#[rustler::nif]
fn dist_lane_of_pid<'a>(env: rustler::Env<'a>, pid: rustler::Binary<'a>) -> rustler::Term<'a> {
    use rustler::Encoder;
    match macula_relay_proto::node::dist_route::lane_of_pid(pid.as_slice()) {
        Some(lane) => lane.encode(env),
        None => atoms::undefined().encode(env),
    }
}

rustler::init!("macula_dist_nif", load = load);
