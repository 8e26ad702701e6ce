//! A node's quinn endpoint on its one UDP socket ([`NodeSocket`]), which
//! carries the node's relay connections and its e2e sessions. Its accept
//! loop hands each incoming e2e session to the session that was announced
//! for it, and refuses everything else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::runtime::Handle;

use crate::node_socket::{node_endpoint, NodeSocket};

/// What accepts an incoming connection that was announced.
pub type AcceptIncoming = Box<dyn FnOnce(quinn::Incoming) + Send>;

/// Inbound e2e sessions announced by a relay and ready to be accepted, by
/// the virtual address their datagrams come from.
#[derive(Clone, Default)]
pub struct InboundTable(Arc<Mutex<HashMap<SocketAddr, AcceptIncoming>>>);

impl InboundTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, AcceptIncoming>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next incoming connection from `vaddr` goes to `accept`.
    pub fn expect(&self, vaddr: SocketAddr, accept: AcceptIncoming) {
        self.lock().insert(vaddr, accept);
    }

    pub fn forget(&self, vaddr: &SocketAddr) -> Option<AcceptIncoming> {
        self.lock().remove(vaddr)
    }
}

/// A node's endpoint, the socket under it, and its inbound sessions. It is
/// closed when dropped (the node's clients are done with it).
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

/// Every node endpoint of this process, to close at exit.
fn open_endpoints() -> MutexGuard<'static, HashMap<u64, quinn::Endpoint>> {
    static OPEN: OnceLock<Mutex<HashMap<u64, quinn::Endpoint>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Closes every node endpoint of this process, so relays and peers hear
/// it now (as a TCP peer sees a socket close), not at a timeout. Returns
/// the connections that were open.
pub fn close_all_endpoints() -> usize {
    let endpoints: Vec<quinn::Endpoint> = open_endpoints().values().cloned().collect();
    let mut open = 0;
    for endpoint in &endpoints {
        open += endpoint.open_connections();
        endpoint.close(0u32.into(), b"node exiting");
    }
    open
}

/// A new endpoint for a node that talks to `remote` (its address family).
pub fn bind(remote: SocketAddr, rt: &Handle) -> Result<NodeEndpoint, String> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let bind: SocketAddr = if remote.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let _guard = rt.enter();
    let (endpoint, socket) = node_endpoint(&macula_dist_quic::Transport::default(), bind)
        .map_err(|e| format!("{e:#}"))?;
    let inbound = InboundTable::default();
    rt.spawn(accept_loop(endpoint.clone(), inbound.clone()));
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
            Some(accept) => accept(incoming),
            None => incoming.refuse(),
        }
    }
}
