//! A node's relay clients (one per relay it is configured with), the one
//! endpoint (UDP socket) they share, and the e2e sessions that outlive a
//! relay connection.
//!
//! When a client loses its relay (it died, stopped answering, restarted),
//! its sessions' QUIC connections between the nodes carry on. Another of
//! the node's clients that is connected takes them at once: it claims each
//! at its own relay (`sess_keep`) and routes it there; once both sides have
//! claimed it, that relay forwards its datagrams and the connection never
//! noticed the move. With no such client, the sessions wait here for the
//! node's next client, which claims them after `id_ok`. Sessions nobody
//! claims within [`KEEP_WAIT`] close.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use macula_relay_proto::KEEP_WAIT;
use macula_relay_proto::{BindKey, TunnelId};

use crate::client::Client;
use crate::runtime::{runtime, NodeEndpoint};

/// A live session as its client tracks it.
#[derive(Clone)]
pub struct SessionEntry {
    pub conn: quinn::Connection,
    pub bind: BindKey,
    pub peer: String,
    /// When a client claimed it at its relay (`None`: opened there).
    pub claimed_at: Option<std::time::Instant>,
    /// This node asked for the session (it is its requester).
    pub requester: bool,
    /// The relay said the peer left it (`tun_close`) while the session was
    /// on a direct path: it ends if that path goes silent.
    pub peer_left: bool,
}

pub type Sessions = Vec<(TunnelId, SessionEntry)>;

struct Waiting {
    /// Held so the socket the sessions run on stays open meanwhile.
    endpoint: Arc<NodeEndpoint>,
    sessions: Sessions,
    generation: u64,
}

#[derive(Default)]
struct Node {
    clients: Vec<Weak<Client>>,
    /// The node's endpoint per address family (IPv6: true).
    endpoints: HashMap<bool, Weak<NodeEndpoint>>,
    waiting: Option<Waiting>,
}

fn nodes() -> MutexGuard<'static, HashMap<String, Node>> {
    static NODES: OnceLock<Mutex<HashMap<String, Node>>> = OnceLock::new();
    NODES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `node`'s live clients, in the order they were started.
fn clients_of(node: &str) -> Vec<Arc<Client>> {
    nodes()
        .get(node)
        .map(|n| n.clients.iter().filter_map(Weak::upgrade).collect())
        .unwrap_or_default()
}

/// A new client of `node`.
pub fn join(node: &str, client: &Arc<Client>) {
    let mut nodes = nodes();
    let entry = nodes.entry(node.to_owned()).or_default();
    entry.clients.retain(|c| c.strong_count() > 0);
    entry.clients.push(Arc::downgrade(client));
}

/// `node`'s endpoint for this address family, shared by its clients (so
/// every relay sees the node at one address, and a session can move
/// between relays on one socket); made with `bind` when there is none.
pub fn endpoint(
    node: &str,
    ipv6: bool,
    bind: impl FnOnce() -> Result<NodeEndpoint, String>,
) -> Result<Arc<NodeEndpoint>, String> {
    let mut nodes = nodes();
    let entry = nodes.entry(node.to_owned()).or_default();
    if let Some(e) = entry.endpoints.get(&ipv6).and_then(Weak::upgrade) {
        return Ok(e);
    }
    let e = Arc::new(bind()?);
    entry.endpoints.insert(ipv6, Arc::downgrade(&e));
    Ok(e)
}

/// The node's other clients that are connected now, in the order they
/// were started (the node's relay order).
fn connected_siblings(node: &str, except: &Client) -> Vec<Arc<Client>> {
    clients_of(node)
        .into_iter()
        .filter(|c| !std::ptr::eq(c.as_ref(), except) && c.is_connected())
        .collect()
}

/// `from` lost its relay: another connected client of the node takes its
/// sessions, or they wait for the node's next client.
pub fn leave(from: &Client, endpoint: Arc<NodeEndpoint>, sessions: Sessions) {
    if sessions.is_empty() {
        return;
    }
    let mut sessions = sessions;
    for sibling in connected_siblings(from.node(), from) {
        match sibling.adopt(sessions) {
            Ok(()) => return,
            Err(back) => sessions = back,
        }
    }
    wait(from.node(), endpoint, sessions);
}

fn wait(node: &str, endpoint: Arc<NodeEndpoint>, sessions: Sessions) {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let previous = {
        let mut nodes = nodes();
        let entry = nodes.entry(node.to_owned()).or_default();
        let mut previous = entry.waiting.take();
        let mut all = sessions;
        // Sessions already waiting (another relay lost earlier) wait on.
        if let Some(p) = previous.as_mut() {
            all.append(&mut p.sessions);
        }
        entry.waiting = Some(Waiting {
            endpoint,
            sessions: all,
            generation,
        });
        previous
    };
    drop(previous);
    let node = node.to_owned();
    runtime().spawn(async move {
        tokio::time::sleep(KEEP_WAIT).await;
        let expired = {
            let mut nodes = nodes();
            match nodes.get_mut(&node) {
                Some(n) if n.waiting.as_ref().map(|w| w.generation) == Some(generation) => {
                    n.waiting.take()
                }
                _ => None,
            }
        };
        let Some(expired) = expired else {
            return;
        };
        // Sessions on a direct path need no relay meanwhile: they wait on.
        let (direct, relayed): (Sessions, Sessions) =
            expired.sessions.into_iter().partition(|(_, s)| {
                expired
                    .endpoint
                    .socket
                    .direct_of(&s.conn.remote_address())
                    .is_some()
            });
        for (_, s) in relayed {
            s.conn.close(0u32.into(), b"relay connection lost");
        }
        let live: Sessions = direct
            .into_iter()
            .filter(|(_, s)| s.conn.close_reason().is_none())
            .collect();
        if !live.is_empty() {
            wait(&node, expired.endpoint, live);
        }
    });
}

/// `node`'s next client takes the waiting sessions, to claim them back.
pub fn take(node: &str) -> Sessions {
    let waiting = nodes().get_mut(node).and_then(|n| n.waiting.take());
    waiting
        .map(|w| w.sessions)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, s)| s.conn.close_reason().is_none())
        .collect()
}

/// A session's connection ended: whichever client of the node holds it
/// now forgets it, and tells its relay.
pub fn session_closed(node: &str, tunnel: &TunnelId) {
    for client in clients_of(node) {
        if client.untrack_session(tunnel) {
            client.discard(*tunnel);
        }
    }
}

/// A session's path changed (direct, or back through a relay): whichever
/// client holds it now tells its relay.
pub fn session_path(node: &str, tunnel: &TunnelId, event: macula_relay_proto::node::direct::Event) {
    if let Some(client) = clients_of(node)
        .into_iter()
        .find(|c| c.holds_session(tunnel))
    {
        client.session_path(tunnel, event);
    }
}
