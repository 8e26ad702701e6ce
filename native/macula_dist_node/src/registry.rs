//! A node: its relay clients (one per relay it is configured with), the
//! one endpoint (UDP socket) they share, and the e2e sessions that outlive
//! a relay connection.
//!
//! When a client loses its relay (it died, stopped answering, restarted),
//! its sessions' QUIC connections between the nodes carry on. Another of
//! the node's clients that is connected takes them at once: it claims each
//! at its own relay (`sess_keep`) and routes it there; once both sides have
//! claimed it, that relay forwards its datagrams and the connection never
//! noticed the move. With no such client, the sessions wait here for the
//! node's next client, which claims them after `id_ok`. Sessions nobody
//! claims within [`KEEP_WAIT`] close.
//!
//! The node knows its clients only as [`SessionCarrier`]s: it calls down
//! into that trait, never into the client module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use macula_relay_proto::node::control::SessionState;
use macula_relay_proto::{TunnelId, KEEP_WAIT};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::endpoint::NodeEndpoint;

/// How long [`Node::peer_elsewhere`] waits for a relay's answer.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A live session: its connection, and what its client knows of it.
#[derive(Clone)]
pub struct CarriedSession {
    pub conn: quinn::Connection,
    pub state: SessionState,
}

pub type Sessions = Vec<(TunnelId, CarriedSession)>;

/// What the node needs of each of its relay clients.
pub trait SessionCarrier: Send + Sync {
    /// Connected to its relay now.
    fn is_connected(&self) -> bool;
    /// Takes sessions another client carried (claims them at its relay);
    /// gives them back when it cannot carry them now.
    fn adopt(&self, sessions: Sessions) -> Result<(), Sessions>;
    /// Asks its relay which nodes are there (`None`: not connected).
    fn nodes(&self) -> Option<oneshot::Receiver<Vec<String>>>;
    /// Gives up the session it carries with `peer` (to move it to another
    /// client); `None` if it carries no such session.
    fn release(&self, tunnel: &TunnelId, peer: &str) -> Option<CarriedSession>;
    /// A session's connection ended: forget it and tell the relay; `true`
    /// if this client carried it.
    fn session_closed(&self, tunnel: &TunnelId) -> bool;
    /// A session went direct (`Some`) or back through a relay (`None`);
    /// `true` if this client carries it.
    fn path_changed(&self, tunnel: &TunnelId, direct: Option<std::net::SocketAddr>) -> bool;
}

struct Waiting {
    /// Held so the socket the sessions run on stays open meanwhile.
    endpoint: Arc<NodeEndpoint>,
    sessions: Sessions,
    generation: u64,
}

#[derive(Default)]
struct NodeState {
    clients: Vec<Weak<dyn SessionCarrier>>,
    /// The node's endpoint per address family (IPv6: true).
    endpoints: HashMap<bool, Weak<NodeEndpoint>>,
    waiting: Option<Waiting>,
    next_generation: u64,
}

/// One node of this process (a VM runs one; tests may run several).
pub struct Node {
    name: String,
    state: Mutex<NodeState>,
}

/// The node named `name` in this process: made on first use, kept while
/// one of its clients holds it.
pub fn node(name: &str) -> Arc<Node> {
    static NODES: OnceLock<Mutex<HashMap<String, Weak<Node>>>> = OnceLock::new();
    let mut nodes = NODES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    nodes.retain(|_, n| n.strong_count() > 0);
    if let Some(n) = nodes.get(name).and_then(Weak::upgrade) {
        return n;
    }
    let n = Arc::new(Node {
        name: name.to_owned(),
        state: Mutex::default(),
    });
    nodes.insert(name.to_owned(), Arc::downgrade(&n));
    n
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node's live clients, in the order they joined (its relay order).
    fn clients(&self) -> Vec<Arc<dyn SessionCarrier>> {
        self.lock()
            .clients
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// A new client of the node.
    pub fn join(&self, client: Weak<dyn SessionCarrier>) {
        let mut state = self.lock();
        state.clients.retain(|c| c.strong_count() > 0);
        state.clients.push(client);
    }

    /// The node's endpoint for this address family, shared by its clients
    /// (so every relay sees the node at one address, and a session can
    /// move between relays on one socket); made with `bind` when there is
    /// none.
    pub fn endpoint(
        &self,
        ipv6: bool,
        bind: impl FnOnce() -> Result<NodeEndpoint, String>,
    ) -> Result<Arc<NodeEndpoint>, String> {
        let mut state = self.lock();
        if let Some(e) = state.endpoints.get(&ipv6).and_then(Weak::upgrade) {
            return Ok(e);
        }
        let e = Arc::new(bind()?);
        state.endpoints.insert(ipv6, Arc::downgrade(&e));
        Ok(e)
    }

    /// A client lost its relay: another connected client of the node takes
    /// its sessions, or they wait for the node's next client.
    pub fn relay_lost(
        self: &Arc<Self>,
        from: &dyn SessionCarrier,
        endpoint: Arc<NodeEndpoint>,
        sessions: Sessions,
        rt: &Handle,
    ) {
        if sessions.is_empty() {
            return;
        }
        let mut sessions = sessions;
        let from = from as *const dyn SessionCarrier as *const ();
        for sibling in self.clients() {
            let same = Arc::as_ptr(&sibling) as *const () == from;
            if same || !sibling.is_connected() {
                continue;
            }
            match sibling.adopt(sessions) {
                Ok(()) => return,
                Err(back) => sessions = back,
            }
        }
        self.wait(endpoint, sessions, rt);
    }

    fn wait(self: &Arc<Self>, endpoint: Arc<NodeEndpoint>, sessions: Sessions, rt: &Handle) {
        let (generation, previous) = {
            let mut state = self.lock();
            state.next_generation += 1;
            let generation = state.next_generation;
            let mut previous = state.waiting.take();
            let mut all = sessions;
            // Sessions already waiting (another relay lost earlier) wait on.
            if let Some(p) = previous.as_mut() {
                all.append(&mut p.sessions);
            }
            state.waiting = Some(Waiting {
                endpoint,
                sessions: all,
                generation,
            });
            (generation, previous)
        };
        drop(previous);
        let node = self.clone();
        let handle = rt.clone();
        rt.spawn(async move {
            tokio::time::sleep(KEEP_WAIT).await;
            let expired = {
                let mut state = node.lock();
                match &state.waiting {
                    Some(w) if w.generation == generation => state.waiting.take(),
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
                node.wait(expired.endpoint, live, &handle);
            }
        });
    }

    /// `peer` claimed `tunnel` at the relay of client `at` (it lost the
    /// relay that carried the session, or came back to this one): the
    /// client carrying it, or the sessions waiting for a client, hand it
    /// over, and `at` claims it too, so the two sides meet there.
    pub fn claimed_at(&self, at: &dyn SessionCarrier, tunnel: &TunnelId, peer: &str) {
        let at_ptr = at as *const dyn SessionCarrier as *const ();
        let from_waiting = || {
            let mut state = self.lock();
            let w = state.waiting.as_mut()?;
            let i = w
                .sessions
                .iter()
                .position(|(t, s)| t == tunnel && s.state.peer == peer)?;
            Some(w.sessions.swap_remove(i).1)
        };
        let session = self
            .clients()
            .into_iter()
            .filter(|c| Arc::as_ptr(c) as *const () != at_ptr)
            .find_map(|c| c.release(tunnel, peer))
            .or_else(from_waiting);
        let Some(session) = session else {
            return;
        };
        if let Err(back) = at.adopt(vec![(*tunnel, session)]) {
            for (_, s) in back {
                s.conn.close(0u32.into(), b"relay connection lost");
            }
        }
    }

    /// Whether `peer` is on a relay of another connected client than
    /// `from` (where it would claim a session `from`'s relay lost it on).
    pub async fn peer_elsewhere(&self, from: &dyn SessionCarrier, peer: &str) -> bool {
        let asked: Vec<_> = {
            let from = from as *const dyn SessionCarrier as *const ();
            self.clients()
                .into_iter()
                .filter(|c| Arc::as_ptr(c) as *const () != from)
                .filter_map(|c| c.nodes())
                .collect()
        };
        for answer in asked {
            if let Ok(Ok(nodes)) = tokio::time::timeout(ANSWER_WAIT, answer).await {
                if nodes.iter().any(|n| n == peer) {
                    return true;
                }
            }
        }
        false
    }

    /// The node's next client takes the waiting sessions, to claim them.
    pub fn take_waiting(&self) -> Sessions {
        let waiting = self.lock().waiting.take();
        waiting
            .map(|w| w.sessions)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, s)| s.conn.close_reason().is_none())
            .collect()
    }

    /// A session's connection ended: whichever client carries it now
    /// forgets it, and tells its relay.
    pub fn session_closed(&self, tunnel: &TunnelId) {
        for client in self.clients() {
            client.session_closed(tunnel);
        }
    }

    /// A session's path changed: whichever client carries it now tells its
    /// relay.
    pub fn path_changed(&self, tunnel: &TunnelId, direct: Option<std::net::SocketAddr>) {
        for client in self.clients() {
            if client.path_changed(tunnel, direct) {
                return;
            }
        }
    }
}
