//! One tokio runtime and one quinn endpoint per address family, per VM.
//! Each endpoint sits on one UDP socket ([`NodeSocket`]) that carries the
//! node's relay connections and its e2e sessions; its accept loop hands
//! each incoming e2e session to the session that was announced for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use macula_dist_relay::node_socket::NodeSocket;
use tokio::runtime::Runtime;

use crate::session::Inbound;

/// A node's endpoint and the socket under it.
pub type NodeEndpoint = (quinn::Endpoint, Arc<NodeSocket>);

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static ENDPOINT_V4: OnceLock<Result<NodeEndpoint, String>> = OnceLock::new();
static ENDPOINT_V6: OnceLock<Result<NodeEndpoint, String>> = OnceLock::new();
/// Inbound e2e sessions announced by a relay and ready to be accepted, by
/// the virtual address their datagrams come from.
static INBOUND: OnceLock<Mutex<HashMap<SocketAddr, Inbound>>> = OnceLock::new();

fn inbound() -> std::sync::MutexGuard<'static, HashMap<SocketAddr, Inbound>> {
    INBOUND
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The next incoming connection from `vaddr` is this session's.
pub fn expect_inbound(vaddr: SocketAddr, session: Inbound) {
    inbound().insert(vaddr, session);
}

pub fn forget_inbound(vaddr: &SocketAddr) -> Option<Inbound> {
    inbound().remove(vaddr)
}
static CLOSE_AT_EXIT: Once = Once::new();

/// Worker threads: `MACULA_DIST_THREADS`, else 1. Every tunnel shares the
/// one relay connection, whose driver is a single task: one worker beside
/// the VM's schedulers measured faster than two (fewer wakeups).
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        // Opt-in logs of the NIF's own work, on stderr: MACULA_DIST_LOG=debug.
        if let Ok(filter) = std::env::var("MACULA_DIST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
        let threads = std::env::var("MACULA_DIST_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n: &usize| *n > 0)
            .unwrap_or(1);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("macula-dist")
            .enable_all()
            .build()
            .expect("the tokio runtime starts")
    })
}

/// The endpoint for `remote`'s address family, bound on first use.
pub fn endpoint_for(remote: SocketAddr) -> Result<NodeEndpoint, String> {
    let (cell, bind): (_, SocketAddr) = if remote.is_ipv4() {
        (&ENDPOINT_V4, "0.0.0.0:0".parse().unwrap())
    } else {
        (&ENDPOINT_V6, "[::]:0".parse().unwrap())
    };
    CLOSE_AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" function; glibc also runs it
        // if this library is unloaded, so it never outlives its code.
        unsafe { libc::atexit(close_endpoints) };
    });
    cell.get_or_init(|| {
        let _guard = runtime().enter();
        let (endpoint, socket) = macula_dist_relay::tls::Transport::default()
            .node_endpoint(bind)
            .map_err(|e| format!("{e:#}"))?;
        runtime().spawn(accept_loop(endpoint.clone()));
        Ok((endpoint, socket))
    })
    .clone()
}

/// Incoming connections are e2e sessions a relay announced, or refused:
/// nobody else may open a QUIC connection to a node.
async fn accept_loop(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        match forget_inbound(&incoming.remote_address()) {
            Some(session) => session.accept(incoming),
            None => incoming.refuse(),
        }
    }
}

/// At VM exit (`halt`, `init:stop`): close every relay connection, so the
/// relay hears it now and closes this node's tunnels, as a TCP peer would
/// see a socket close. Without it the node's peers wait for a tick timeout.
extern "C" fn close_endpoints() {
    let mut open = 0;
    for cell in [&ENDPOINT_V4, &ENDPOINT_V6] {
        if let Some(Ok((endpoint, _))) = cell.get() {
            open += endpoint.open_connections();
            endpoint.close(0u32.into(), b"node exiting");
        }
    }
    if open > 0 {
        // The runtime's threads still run: give them a moment to send it.
        std::thread::sleep(Duration::from_millis(20));
    }
}
