//! E2e sessions outlive their relay connection. When a client loses its
//! relay (it stopped answering, or restarted), its sessions' QUIC
//! connections between the nodes carry on; they wait here, with the
//! endpoint (the UDP socket) they run on, for the node's next client. That
//! client connects from the same socket, and after `id_ok` claims each one
//! back at the relay (`sess_keep`); once both sides have, the relay forwards
//! its datagrams again and the connection never noticed. Sessions nobody
//! claims within [`KEEP_WAIT`] close.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use macula_relay_proto::sessions::KEEP_WAIT;
use macula_relay_proto::{BindKey, TunnelId};

use crate::runtime::{runtime, NodeEndpoint};

/// A live session as its client tracks it.
#[derive(Clone)]
pub struct SessionEntry {
    pub conn: quinn::Connection,
    pub bind: BindKey,
    pub peer: String,
    /// When a new client claimed it back (`None`: opened by this client).
    pub claimed_at: Option<std::time::Instant>,
}

struct Waiting {
    endpoint: Arc<NodeEndpoint>,
    sessions: Vec<(TunnelId, SessionEntry)>,
    generation: u64,
}

fn waiting() -> MutexGuard<'static, HashMap<String, Waiting>> {
    static WAITING: OnceLock<Mutex<HashMap<String, Waiting>>> = OnceLock::new();
    WAITING
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `node`'s client lost its relay: its sessions wait for the next one.
pub fn leave(node: &str, endpoint: Arc<NodeEndpoint>, sessions: Vec<(TunnelId, SessionEntry)>) {
    if sessions.is_empty() {
        return;
    }
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let previous = waiting().insert(
        node.to_owned(),
        Waiting {
            endpoint,
            sessions,
            generation,
        },
    );
    close_all(previous);
    let node = node.to_owned();
    runtime().spawn(async move {
        tokio::time::sleep(KEEP_WAIT).await;
        let mut all = waiting();
        if all.get(&node).is_some_and(|w| w.generation == generation) {
            let expired = all.remove(&node);
            drop(all);
            close_all(expired);
        }
    });
}

fn close_all(waiting: Option<Waiting>) {
    for (_, s) in waiting.into_iter().flat_map(|w| w.sessions) {
        s.conn.close(0u32.into(), b"relay connection lost");
    }
}

/// The endpoint `node`'s waiting sessions run on: its next client connects
/// from it, so the relay sees the node at the same address.
pub fn endpoint(node: &str) -> Option<Arc<NodeEndpoint>> {
    waiting().get(node).map(|w| w.endpoint.clone())
}

/// `node`'s next client takes the waiting sessions, to claim them back.
pub fn take(node: &str) -> Vec<(TunnelId, SessionEntry)> {
    waiting()
        .remove(node)
        .map(|w| w.sessions)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, s)| s.conn.close_reason().is_none())
        .collect()
}
