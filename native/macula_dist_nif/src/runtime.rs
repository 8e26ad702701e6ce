//! One tokio runtime per VM, and one quinn endpoint per client (per node).
//! Each endpoint sits on one UDP socket ([`NodeSocket`]) that carries the
//! node's relay connection and its e2e sessions; its accept loop hands each
//! incoming e2e session to the session that was announced for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock};
use std::time::Duration;

use macula_dist_node::node_socket::NodeSocket;
use tokio::runtime::Runtime;

use crate::session::Inbound;

/// Inbound e2e sessions announced by a relay and ready to be accepted, by
/// the virtual address their datagrams come from.
#[derive(Clone, Default)]
pub struct InboundTable(Arc<Mutex<HashMap<SocketAddr, Inbound>>>);

impl InboundTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Inbound>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next incoming connection from `vaddr` is this session's.
    pub fn expect(&self, vaddr: SocketAddr, session: Inbound) {
        self.lock().insert(vaddr, session);
    }

    pub fn forget(&self, vaddr: &SocketAddr) -> Option<Inbound> {
        self.lock().remove(vaddr)
    }
}

/// A node's endpoint, the socket under it, and its inbound sessions. It is
/// closed when dropped (the client is done with it).
pub struct NodeEndpoint {
    pub endpoint: quinn::Endpoint,
    pub socket: Arc<NodeSocket>,
    pub inbound: InboundTable,
    id: u64,
}

impl Drop for NodeEndpoint {
    fn drop(&mut self) {
        open_endpoints().remove(&self.id);
        self.endpoint.close(0u32.into(), b"client stopped");
    }
}

/// Every node endpoint, to close at VM exit.
fn open_endpoints() -> MutexGuard<'static, HashMap<u64, quinn::Endpoint>> {
    static OPEN: OnceLock<Mutex<HashMap<u64, quinn::Endpoint>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
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

/// A new endpoint for a client that talks to `remote` (its address family).
pub fn bind_endpoint(remote: SocketAddr) -> Result<NodeEndpoint, String> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let bind: SocketAddr = if remote.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    CLOSE_AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" function; glibc also runs it
        // if this library is unloaded, so it never outlives its code.
        unsafe { libc::atexit(close_endpoints) };
    });
    let _guard = runtime().enter();
    let (endpoint, socket) =
        macula_dist_node::node_socket::node_endpoint(&macula_dist_quic::Transport::default(), bind)
            .map_err(|e| format!("{e:#}"))?;
    let inbound = InboundTable::default();
    runtime().spawn(accept_loop(endpoint.clone(), inbound.clone()));
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    open_endpoints().insert(id, endpoint.clone());
    Ok(NodeEndpoint {
        endpoint,
        socket,
        inbound,
        id,
    })
}

/// Incoming connections are e2e sessions a relay announced, or refused:
/// nobody else may open a QUIC connection to a node.
async fn accept_loop(endpoint: quinn::Endpoint, inbound: InboundTable) {
    while let Some(incoming) = endpoint.accept().await {
        match inbound.forget(&incoming.remote_address()) {
            Some(session) => session.accept(incoming),
            None => incoming.refuse(),
        }
    }
}

/// At VM exit (`halt`, `init:stop`): close every relay connection, so the
/// relay hears it now and closes this node's tunnels, as a TCP peer would
/// see a socket close. Without it the node's peers wait for a tick timeout.
extern "C" fn close_endpoints() {
    let endpoints: Vec<quinn::Endpoint> = open_endpoints().values().cloned().collect();
    let mut open = 0;
    for endpoint in &endpoints {
        open += endpoint.open_connections();
        endpoint.close(0u32.into(), b"node exiting");
    }
    if open > 0 {
        // The runtime's threads still run: give them a moment to send it.
        std::thread::sleep(Duration::from_millis(20));
    }
}
