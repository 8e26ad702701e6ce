//! The relay's routing table: which connection speaks for which node name,
//! and which tunnels join which two connections.
//!
//! The relay's async glue owns one `Router` behind a mutex, asks it what to
//! do, and carries the answers out on sockets.

use std::collections::{HashMap, HashSet};

use crate::tunnel_id::TunnelId;

/// The relay's own handle for a QUIC connection.
pub type ConnId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_nodes: usize,
    pub max_tunnels_per_node: usize,
    pub max_name_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: 10_000,
            max_tunnels_per_node: 1_000,
            max_name_len: 255,
        }
    }
}

/// Why an identify is refused (sent as `id_err`'s `r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentifyRefusal {
    BadName,
    TooManyNodes,
    AlreadyIdentified,
}

/// Why a tunnel request is refused (sent as `tun_err`'s `r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelRefusal {
    NotIdentified,
    TargetNotConnected,
    SelfTunnel,
    TooManyTunnels,
}

impl IdentifyRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentifyRefusal::BadName => "bad_name",
            IdentifyRefusal::TooManyNodes => "too_many_nodes",
            IdentifyRefusal::AlreadyIdentified => "already_identified",
        }
    }
}

impl TunnelRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelRefusal::NotIdentified => "not_identified",
            TunnelRefusal::TargetNotConnected => "target_not_connected",
            TunnelRefusal::SelfTunnel => "self_tunnel",
            TunnelRefusal::TooManyTunnels => "too_many_tunnels",
        }
    }
}

/// Node names as Erlang writes them (`name@host`): printable ASCII without
/// spaces, quotes or path separators, at most `max_len` bytes.
pub fn valid_node_name(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@[]:".contains(&b))
}

/// One tunnel: `requester` asked for it, `target` was notified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub id: TunnelId,
    pub requester: ConnId,
    pub requester_name: String,
    pub target: ConnId,
    pub target_name: String,
}

impl Tunnel {
    pub fn has_end(&self, conn: ConnId) -> bool {
        self.requester == conn || self.target == conn
    }
}

/// What a successful identify changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Identified {
    /// The connection that had this name before, now forgotten: close it.
    pub replaced: Option<ConnId>,
    /// The replaced connection's tunnels, now removed: close their streams.
    pub closed: Vec<Tunnel>,
}

#[derive(Debug, Default)]
struct Conn {
    name: Option<String>,
    tunnels: HashSet<TunnelId>,
}

#[derive(Debug, Default)]
pub struct Router {
    limits: Limits,
    names: HashMap<String, ConnId>,
    conns: HashMap<ConnId, Conn>,
    tunnels: HashMap<TunnelId, Tunnel>,
}

impl Router {
    pub fn new(limits: Limits) -> Self {
        Router {
            limits,
            ..Default::default()
        }
    }

    pub fn node_count(&self) -> usize {
        self.names.len()
    }

    pub fn tunnel_count(&self) -> usize {
        self.tunnels.len()
    }

    pub fn name_of(&self, conn: ConnId) -> Option<&str> {
        self.conns.get(&conn)?.name.as_deref()
    }

    pub fn conn_of(&self, name: &str) -> Option<ConnId> {
        self.names.get(name).copied()
    }

    pub fn tunnel(&self, id: &TunnelId) -> Option<&Tunnel> {
        self.tunnels.get(id)
    }

    /// `conn` says it is `name`. The newest connection for a name wins: an
    /// older one is forgotten with its tunnels, and the caller closes it.
    pub fn identify(&mut self, conn: ConnId, name: &str) -> Result<Identified, IdentifyRefusal> {
        if !valid_node_name(name, self.limits.max_name_len) {
            return Err(IdentifyRefusal::BadName);
        }
        if self.name_of(conn).is_some() {
            return Err(IdentifyRefusal::AlreadyIdentified);
        }
        let previous = self.names.get(name).copied();
        if previous.is_none() && self.names.len() >= self.limits.max_nodes {
            return Err(IdentifyRefusal::TooManyNodes);
        }
        let closed = previous.map(|old| self.disconnect(old)).unwrap_or_default();
        self.names.insert(name.to_owned(), conn);
        self.conns.entry(conn).or_default().name = Some(name.to_owned());
        Ok(Identified {
            replaced: previous,
            closed,
        })
    }

    /// `conn` asks for a tunnel to `target`, to be called `id`.
    pub fn request_tunnel(
        &mut self,
        conn: ConnId,
        target: &str,
        id: TunnelId,
    ) -> Result<Tunnel, TunnelRefusal> {
        let requester_name = self
            .name_of(conn)
            .ok_or(TunnelRefusal::NotIdentified)?
            .to_owned();
        if requester_name == target {
            return Err(TunnelRefusal::SelfTunnel);
        }
        let target_conn = self
            .conn_of(target)
            .ok_or(TunnelRefusal::TargetNotConnected)?;
        let max = self.limits.max_tunnels_per_node;
        if self.conns[&conn].tunnels.len() >= max || self.conns[&target_conn].tunnels.len() >= max {
            return Err(TunnelRefusal::TooManyTunnels);
        }
        let tunnel = Tunnel {
            id,
            requester: conn,
            requester_name,
            target: target_conn,
            target_name: target.to_owned(),
        };
        for end in [conn, target_conn] {
            self.conns.entry(end).or_default().tunnels.insert(id);
        }
        self.tunnels.insert(id, tunnel.clone());
        Ok(tunnel)
    }

    /// `conn` closes tunnel `id`; only one of its two ends may.
    pub fn close_tunnel(&mut self, conn: ConnId, id: &TunnelId) -> Option<Tunnel> {
        if !self.tunnels.get(id)?.has_end(conn) {
            return None;
        }
        self.remove_tunnel(id)
    }

    /// Forgets tunnel `id`, whoever ended it (a stream finishing, a reset).
    pub fn remove_tunnel(&mut self, id: &TunnelId) -> Option<Tunnel> {
        let tunnel = self.tunnels.remove(id)?;
        for end in [tunnel.requester, tunnel.target] {
            if let Some(c) = self.conns.get_mut(&end) {
                c.tunnels.remove(id);
            }
        }
        Some(tunnel)
    }

    /// `conn` is gone: forget its name (if still its own) and its tunnels.
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<Tunnel> {
        let Some(state) = self.conns.remove(&conn) else {
            return vec![];
        };
        if let Some(name) = state.name {
            if self.names.get(&name) == Some(&conn) {
                self.names.remove(&name);
            }
        }
        let mut closed: Vec<Tunnel> = state
            .tunnels
            .iter()
            .filter_map(|id| self.remove_tunnel(id))
            .collect();
        closed.sort_by_key(|t| t.id);
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> TunnelId {
        TunnelId::from_bytes([n; 16])
    }

    fn router_with(names: &[(ConnId, &str)]) -> Router {
        let mut r = Router::new(Limits::default());
        for (conn, name) in names {
            r.identify(*conn, name).unwrap();
        }
        r
    }

    #[test]
    fn identify_and_tunnel() {
        let mut r = router_with(&[(1, "a@h"), (2, "b@h")]);
        let t = r.request_tunnel(1, "b@h", id(1)).unwrap();
        assert_eq!((t.requester, t.target), (1, 2));
        assert_eq!(t.requester_name, "a@h");
        assert_eq!(r.tunnel_count(), 1);
        assert_eq!(r.close_tunnel(2, &id(1)), Some(t));
        assert_eq!(r.tunnel_count(), 0);
    }

    #[test]
    fn tunnel_refusals() {
        let mut r = router_with(&[(1, "a@h")]);
        assert_eq!(
            r.request_tunnel(9, "a@h", id(1)),
            Err(TunnelRefusal::NotIdentified)
        );
        assert_eq!(
            r.request_tunnel(1, "a@h", id(1)),
            Err(TunnelRefusal::SelfTunnel)
        );
        assert_eq!(
            r.request_tunnel(1, "zz@h", id(1)),
            Err(TunnelRefusal::TargetNotConnected)
        );
    }

    #[test]
    fn tunnel_limit_counts_both_ends() {
        let mut r = Router::new(Limits {
            max_tunnels_per_node: 2,
            ..Limits::default()
        });
        for (c, n) in [(1, "a@h"), (2, "b@h"), (3, "c@h")] {
            r.identify(c, n).unwrap();
        }
        r.request_tunnel(1, "b@h", id(1)).unwrap();
        r.request_tunnel(3, "b@h", id(2)).unwrap();
        assert_eq!(
            r.request_tunnel(1, "b@h", id(3)),
            Err(TunnelRefusal::TooManyTunnels)
        );
        r.remove_tunnel(&id(2));
        assert!(r.request_tunnel(1, "b@h", id(3)).is_ok());
    }

    #[test]
    fn only_an_end_may_close() {
        let mut r = router_with(&[(1, "a@h"), (2, "b@h"), (3, "c@h")]);
        r.request_tunnel(1, "b@h", id(1)).unwrap();
        assert_eq!(r.close_tunnel(3, &id(1)), None);
        assert_eq!(r.tunnel_count(), 1);
        assert_eq!(r.close_tunnel(3, &id(9)), None);
    }

    #[test]
    fn reidentify_replaces_the_old_connection() {
        let mut r = router_with(&[(1, "a@h"), (2, "b@h")]);
        let t = r.request_tunnel(2, "a@h", id(1)).unwrap();
        let out = r.identify(3, "a@h").unwrap();
        assert_eq!(out.replaced, Some(1));
        assert_eq!(out.closed, vec![t]);
        assert_eq!(r.conn_of("a@h"), Some(3));
        assert_eq!(r.tunnel_count(), 0);
        // The stale connection's late disconnect does not unseat the new one.
        assert_eq!(r.disconnect(1), vec![]);
        assert_eq!(r.conn_of("a@h"), Some(3));
    }

    #[test]
    fn disconnect_closes_every_tunnel_of_the_node() {
        let mut r = router_with(&[(1, "a@h"), (2, "b@h"), (3, "c@h")]);
        r.request_tunnel(1, "b@h", id(1)).unwrap();
        r.request_tunnel(3, "a@h", id(2)).unwrap();
        r.request_tunnel(2, "c@h", id(3)).unwrap();
        let closed: Vec<_> = r.disconnect(1).into_iter().map(|t| t.id).collect();
        assert_eq!(closed, vec![id(1), id(2)]);
        assert_eq!(r.conn_of("a@h"), None);
        assert_eq!(r.tunnel_count(), 1);
        assert_eq!(r.node_count(), 2);
    }

    #[test]
    fn identify_refusals() {
        let mut r = Router::new(Limits {
            max_nodes: 1,
            max_name_len: 8,
            ..Limits::default()
        });
        assert_eq!(r.identify(1, ""), Err(IdentifyRefusal::BadName));
        assert_eq!(r.identify(1, "a b@h"), Err(IdentifyRefusal::BadName));
        assert_eq!(r.identify(1, "abcdefghi"), Err(IdentifyRefusal::BadName));
        r.identify(1, "a@h").unwrap();
        assert_eq!(
            r.identify(1, "b@h"),
            Err(IdentifyRefusal::AlreadyIdentified)
        );
        assert_eq!(r.identify(2, "b@h"), Err(IdentifyRefusal::TooManyNodes));
        // Replacing an existing name is not a new node.
        assert_eq!(r.identify(2, "a@h").unwrap().replaced, Some(1));
    }

    #[test]
    fn names_erlang_uses_are_valid() {
        for n in ["alice@127.0.0.1", "a_b-c@host.example", "x@[::1]"] {
            assert!(valid_node_name(n, 255), "{n}");
        }
        for n in ["a\"b@h", "a/b", "a\0"] {
            assert!(!valid_node_name(n, 255), "{n}");
        }
    }
}
