//! The relay's routing table: which connection speaks for which node name,
//! and which tunnels join which two connections.
//!
//! A live name belongs to the key that holds it (a node's TLS client
//! certificate at the relay): another key is refused (`name_taken`), a
//! node without a key can never take a keyed node's name, and even the
//! same key only replaces a holder that no longer answers (the glue checks
//! with [`Claim::Contested`]): two live nodes with one name are two nodes,
//! not a restart.
//!
//! The relay's async glue owns one `Router` behind a mutex, asks it what to
//! do, and carries the answers out on sockets.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::wire::tunnel_id::TunnelId;

/// The relay's own handle for a QUIC connection.
pub type ConnId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_nodes: usize,
    /// Tunnels one node may have asked for and still open.
    pub max_tunnels_per_node: usize,
    /// Tunnels one node may have open to one other node.
    pub max_tunnels_per_pair: usize,
    pub max_name_len: usize,
    /// How long after a keyed node was last seen (it left, or the relay
    /// restarted) its name stays bound to its key: only that key may take
    /// it meanwhile.
    pub name_hold: Duration,
}

/// Names held for keys of nodes that left, at most (the oldest goes).
pub const MAX_HELD: usize = 20_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: 10_000,
            max_tunnels_per_node: 1_000,
            max_tunnels_per_pair: 64,
            max_name_len: 255,
            name_hold: Duration::from_secs(600),
        }
    }
}

/// Why an identify is refused (sent as `id_err`'s `r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentifyRefusal {
    BadName,
    TooManyNodes,
    AlreadyIdentified,
    /// The name is live, and belongs to another key (or to a live node).
    NameTaken,
    /// A nodes file is in force, and this name and key are not in it.
    NotAllowed,
}

/// A node's key: SHA-256 of its certificate's SubjectPublicKeyInfo.
pub type KeyId = [u8; 32];

/// What a claim on a name found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The name was free: it is the claimant's now.
    Granted(Identified),
    /// The name is held by `holder`, and the claimant may replace it only
    /// if the holder no longer answers: check, then [`Router::replace`] or
    /// refuse with `name_taken`.
    Contested { holder: ConnId },
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
            IdentifyRefusal::NameTaken => "name_taken",
            IdentifyRefusal::NotAllowed => "not_allowed",
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
    key: Option<KeyId>,
    /// Tunnels with this connection at either end.
    tunnels: HashSet<TunnelId>,
    /// Of those, the ones it asked for.
    outbound: usize,
}

#[derive(Debug, Default)]
pub struct Router {
    limits: Limits,
    names: HashMap<String, ConnId>,
    conns: HashMap<ConnId, Conn>,
    tunnels: HashMap<TunnelId, Tunnel>,
    /// Open tunnels by (requester, target).
    pairs: HashMap<(ConnId, ConnId), usize>,
    /// When set, only these names, each with its key, may identify.
    allowed: Option<HashMap<String, KeyId>>,
    /// Names of keyed nodes that left, bound to their key until a deadline.
    held: HashMap<String, (KeyId, Instant)>,
    /// The same, oldest deadline first (stale entries skipped).
    held_queue: VecDeque<(Instant, String)>,
}

/// Held-name queue entries one call may expire.
const HOLD_EXPIRE_BATCH: usize = 64;

impl Router {
    pub fn new(limits: Limits) -> Self {
        Router {
            limits,
            ..Default::default()
        }
    }

    /// Closes the relay to every name and key but these (`--nodes-file`).
    pub fn allow_only(&mut self, nodes: HashMap<String, KeyId>) {
        self.allowed = Some(nodes);
    }

    pub fn key_of(&self, conn: ConnId) -> Option<KeyId> {
        self.conns.get(&conn)?.key
    }

    /// The names identified here, but `conn`'s own.
    pub fn other_names(&self, conn: ConnId) -> Vec<String> {
        let own = self.name_of(conn);
        let mut names: Vec<String> = self
            .names
            .keys()
            .filter(|n| Some(n.as_str()) != own)
            .cloned()
            .collect();
        names.sort();
        names
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

    /// True when `conn` is a side of the open tunnel `id`.
    pub fn is_side(&self, id: &TunnelId, conn: ConnId) -> bool {
        self.tunnels
            .get(id)
            .is_some_and(|t| t.requester == conn || t.target == conn)
    }

    /// The tunnels with `conn` at an end, each with the side it holds
    /// (0: requester, 1: target).
    pub fn tunnels_of(&self, conn: ConnId) -> Vec<(TunnelId, usize)> {
        let Some(c) = self.conns.get(&conn) else {
            return vec![];
        };
        c.tunnels
            .iter()
            .filter_map(|id| {
                let t = self.tunnels.get(id)?;
                Some((*id, if t.requester == conn { 0 } else { 1 }))
            })
            .collect()
    }

    pub fn conn_of(&self, name: &str) -> Option<ConnId> {
        self.names.get(name).copied()
    }

    pub fn tunnel(&self, id: &TunnelId) -> Option<&Tunnel> {
        self.tunnels.get(id)
    }

    /// `conn`, holding `key` (if any), says it is `name`.
    pub fn claim(
        &mut self,
        conn: ConnId,
        name: &str,
        key: Option<KeyId>,
    ) -> Result<Claim, IdentifyRefusal> {
        self.claim_at(conn, name, key, Instant::now())
    }

    /// [`Router::claim`] at `now`: a name held for the key of a node that
    /// left is refused to any other key, and to no key.
    pub fn claim_at(
        &mut self,
        conn: ConnId,
        name: &str,
        key: Option<KeyId>,
        now: Instant,
    ) -> Result<Claim, IdentifyRefusal> {
        self.expire_held(now);
        if !valid_node_name(name, self.limits.max_name_len) {
            return Err(IdentifyRefusal::BadName);
        }
        if self.name_of(conn).is_some() {
            return Err(IdentifyRefusal::AlreadyIdentified);
        }
        if let Some(allowed) = &self.allowed {
            if key.is_none() || allowed.get(name) != key.as_ref() {
                return Err(IdentifyRefusal::NotAllowed);
            }
        }
        let Some(holder) = self.names.get(name).copied() else {
            if let Some((held, until)) = self.held.get(name) {
                if *until > now && Some(*held) != key {
                    return Err(IdentifyRefusal::NameTaken);
                }
            }
            return self.take(conn, name, key).map(Claim::Granted);
        };
        match self.key_of(holder) {
            Some(held) if Some(held) != key => Err(IdentifyRefusal::NameTaken),
            _ => Ok(Claim::Contested { holder }),
        }
    }

    /// After [`Claim::Contested`]: `holder` did not answer, so `conn`
    /// takes the name; the holder is forgotten with its tunnels, and the
    /// caller closes it. If the name changed hands meanwhile, claim again.
    pub fn replace(
        &mut self,
        conn: ConnId,
        name: &str,
        key: Option<KeyId>,
        holder: ConnId,
    ) -> Result<Identified, IdentifyRefusal> {
        self.replace_at(conn, name, key, holder, Instant::now())
    }

    /// [`Router::replace`] at `now`.
    pub fn replace_at(
        &mut self,
        conn: ConnId,
        name: &str,
        key: Option<KeyId>,
        holder: ConnId,
        now: Instant,
    ) -> Result<Identified, IdentifyRefusal> {
        match self.claim_at(conn, name, key, now)? {
            Claim::Granted(identified) => Ok(identified),
            Claim::Contested { holder: now } if now != holder => Err(IdentifyRefusal::NameTaken),
            Claim::Contested { .. } => {
                let closed = self.disconnect_at(holder, now);
                let mut identified = self.take(conn, name, key)?;
                identified.replaced = Some(holder);
                identified.closed = closed;
                Ok(identified)
            }
        }
    }

    fn take(
        &mut self,
        conn: ConnId,
        name: &str,
        key: Option<KeyId>,
    ) -> Result<Identified, IdentifyRefusal> {
        if self.names.len() >= self.limits.max_nodes {
            return Err(IdentifyRefusal::TooManyNodes);
        }
        self.names.insert(name.to_owned(), conn);
        let c = self.conns.entry(conn).or_default();
        c.name = Some(name.to_owned());
        c.key = key;
        Ok(Identified {
            replaced: None,
            closed: vec![],
        })
    }

    /// A claim that replaces a contested holder without asking whether it
    /// answers (tests, and the v1 behaviour "the newest wins").
    pub fn identify(&mut self, conn: ConnId, name: &str) -> Result<Identified, IdentifyRefusal> {
        match self.claim(conn, name, None)? {
            Claim::Granted(identified) => Ok(identified),
            Claim::Contested { holder } => self.replace(conn, name, None, holder),
        }
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
        self.within_quota(conn, target_conn)?;
        let tunnel = Tunnel {
            id,
            requester: conn,
            requester_name,
            target: target_conn,
            target_name: target.to_owned(),
        };
        self.restore_tunnel(tunnel.clone());
        Ok(tunnel)
    }

    /// A node's own requests count against it, and what it asks of one
    /// target against that pair: nobody can use up another's quota.
    fn within_quota(&self, conn: ConnId, target: ConnId) -> Result<(), TunnelRefusal> {
        let pair = self.pairs.get(&(conn, target)).copied().unwrap_or(0);
        let outbound = self.conns.get(&conn).map_or(0, |c| c.outbound);
        if outbound >= self.limits.max_tunnels_per_node || pair >= self.limits.max_tunnels_per_pair
        {
            return Err(TunnelRefusal::TooManyTunnels);
        }
        Ok(())
    }

    /// Enters an e2e session its sides claimed back, as if requested: the
    /// same quotas as `tun_req` apply, and both ends must be identified
    /// under the tunnel's names, as two different nodes.
    pub fn restore_claimed(&mut self, tunnel: Tunnel) -> Result<(), TunnelRefusal> {
        if tunnel.requester == tunnel.target || tunnel.requester_name == tunnel.target_name {
            return Err(TunnelRefusal::SelfTunnel);
        }
        for (conn, name) in [
            (tunnel.requester, &tunnel.requester_name),
            (tunnel.target, &tunnel.target_name),
        ] {
            if self.name_of(conn) != Some(name.as_str()) {
                return Err(TunnelRefusal::TargetNotConnected);
            }
        }
        if self.tunnels.contains_key(&tunnel.id) {
            return Err(TunnelRefusal::TooManyTunnels);
        }
        self.within_quota(tunnel.requester, tunnel.target)?;
        self.restore_tunnel(tunnel);
        Ok(())
    }

    /// Enters a tunnel as it is, counted as if requested, with no quota
    /// check (a tunnel that moves between connections); an id already
    /// open is left alone.
    pub fn restore_tunnel(&mut self, tunnel: Tunnel) {
        if self.tunnels.contains_key(&tunnel.id) {
            return;
        }
        for end in [tunnel.requester, tunnel.target] {
            self.conns.entry(end).or_default().tunnels.insert(tunnel.id);
        }
        self.conns.entry(tunnel.requester).or_default().outbound += 1;
        *self
            .pairs
            .entry((tunnel.requester, tunnel.target))
            .or_default() += 1;
        self.tunnels.insert(tunnel.id, tunnel);
    }

    /// The end of tunnel `id` held by node `name` moves to `conn` (its new
    /// relay connection).
    pub fn reattach(&mut self, id: &TunnelId, name: &str, conn: ConnId) {
        if let Some(mut tunnel) = self.remove_tunnel(id) {
            if tunnel.requester_name == name {
                tunnel.requester = conn;
            }
            if tunnel.target_name == name {
                tunnel.target = conn;
            }
            self.restore_tunnel(tunnel);
        }
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
        if let Some(c) = self.conns.get_mut(&tunnel.requester) {
            c.outbound -= 1;
        }
        let pair = (tunnel.requester, tunnel.target);
        if let Some(n) = self.pairs.get_mut(&pair) {
            *n -= 1;
            if *n == 0 {
                self.pairs.remove(&pair);
            }
        }
        Some(tunnel)
    }

    /// Binds `name` to `key` until `until` (a later deadline wins).
    fn hold(&mut self, name: String, key: KeyId, until: Instant) {
        if let Some((_, old)) = self.held.get(&name) {
            if *old > until {
                return;
            }
        }
        while self.held.len() >= MAX_HELD && !self.held.contains_key(&name) {
            let Some((deadline, oldest)) = self.held_queue.pop_front() else {
                break;
            };
            if self.held.get(&oldest).is_some_and(|(_, u)| *u == deadline) {
                self.held.remove(&oldest);
            }
        }
        self.held_queue.push_back((until, name.clone()));
        self.held.insert(name, (key, until));
        // Stale queue entries (names held again) are bounded too.
        while self.held_queue.len() > 2 * MAX_HELD {
            if let Some((deadline, oldest)) = self.held_queue.pop_front() {
                if self.held.get(&oldest).is_some_and(|(_, u)| *u == deadline) {
                    self.held.remove(&oldest);
                }
            }
        }
    }

    /// Forgets held names past their deadline, a small batch per call
    /// (the queue is in deadline order; `claim` checks the deadline
    /// itself, so an entry not yet popped holds nothing past it). True
    /// when more are due.
    pub fn expire_held(&mut self, now: Instant) -> bool {
        for _ in 0..HOLD_EXPIRE_BATCH {
            let Some((deadline, _)) = self.held_queue.front() else {
                return false;
            };
            if *deadline > now {
                return false;
            }
            if let Some((deadline, name)) = self.held_queue.pop_front() {
                if self.held.get(&name).is_some_and(|(_, u)| *u == deadline) {
                    self.held.remove(&name);
                }
            }
        }
        self.held_queue.front().is_some_and(|(d, _)| *d <= now)
    }

    /// Names held for keys now: how many.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// The name→key bindings to keep across a restart: every keyed node
    /// here now (`None`: live, so held for the full time from the restart,
    /// when it was last seen) and every held name with the time it is
    /// still held; live ones first, then the longest held, at most
    /// [`MAX_HELD`].
    pub fn bindings(&self, now: Instant) -> Vec<(String, KeyId, Option<Duration>)> {
        let mut all: Vec<(String, KeyId, Option<Duration>)> = vec![];
        for (name, conn) in &self.names {
            if let Some(key) = self.key_of(*conn) {
                all.push((name.clone(), key, None));
            }
        }
        all.extend(
            self.held
                .iter()
                .filter(|(name, _)| !self.names.contains_key(*name))
                .filter_map(|(name, (key, until))| {
                    let left = until.checked_duration_since(now)?;
                    (!left.is_zero()).then(|| (name.clone(), *key, Some(left)))
                }),
        );
        // None (live) sorts after any Some: reverse for live first.
        all.sort_by(|a, b| match (a.2, b.2) {
            (None, None) => a.0.cmp(&b.0),
            (None, Some(_)) => std::cmp::Ordering::Less,
            (Some(_), None) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => y.cmp(&x).then_with(|| a.0.cmp(&b.0)),
        });
        all.truncate(MAX_HELD);
        all
    }

    /// Takes bindings kept before a restart (see [`Router::bindings`]):
    /// each name is held for its key for the time left (at most
    /// [`Limits::name_hold`]).
    pub fn load_bindings(&mut self, bindings: Vec<(String, KeyId, Duration)>, now: Instant) {
        let mut bindings: Vec<_> = bindings
            .into_iter()
            .filter(|(name, _, _)| valid_node_name(name, self.limits.max_name_len))
            .map(|(name, key, left)| (name, key, left.min(self.limits.name_hold)))
            .collect();
        bindings.sort_by_key(|b| b.2);
        for (name, key, left) in bindings {
            self.hold(name, key, now + left);
        }
    }

    /// `conn` is gone: forget its name (if still its own) and its tunnels.
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<Tunnel> {
        self.disconnect_at(conn, Instant::now())
    }

    /// [`Router::disconnect`] at `now`: a keyed node's name stays bound to
    /// its key for [`Limits::name_hold`].
    pub fn disconnect_at(&mut self, conn: ConnId, now: Instant) -> Vec<Tunnel> {
        let Some(state) = self.conns.remove(&conn) else {
            return vec![];
        };
        if let Some(name) = state.name {
            if self.names.get(&name) == Some(&conn) {
                self.names.remove(&name);
                if let Some(key) = state.key {
                    let until = now + self.limits.name_hold;
                    self.hold(name, key, until);
                }
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

    /// A node fills its own quota and its quota with one target, never
    /// the target's: the target can still open tunnels (the attack was
    /// 1000 `tun_req` to a victim, which then could open none).
    #[test]
    fn quotas_are_per_requester_and_per_pair() {
        let mut r = Router::new(Limits {
            max_tunnels_per_node: 3,
            max_tunnels_per_pair: 2,
            ..Limits::default()
        });
        for (c, n) in [(1, "a@h"), (2, "b@h"), (3, "c@h")] {
            r.identify(c, n).unwrap();
        }
        r.request_tunnel(1, "b@h", id(1)).unwrap();
        r.request_tunnel(1, "b@h", id(2)).unwrap();
        assert_eq!(
            r.request_tunnel(1, "b@h", id(3)),
            Err(TunnelRefusal::TooManyTunnels),
            "pair quota"
        );
        r.request_tunnel(1, "c@h", id(4)).unwrap();
        assert_eq!(
            r.request_tunnel(1, "c@h", id(5)),
            Err(TunnelRefusal::TooManyTunnels),
            "requester quota"
        );
        // The victim's own quota is untouched.
        r.request_tunnel(2, "a@h", id(6)).unwrap();
        r.request_tunnel(2, "c@h", id(7)).unwrap();
        r.remove_tunnel(&id(2));
        assert!(r.request_tunnel(1, "b@h", id(8)).is_ok());
    }

    fn key(n: u8) -> Option<KeyId> {
        Some([n; 32])
    }

    #[test]
    fn a_live_name_belongs_to_its_key() {
        let mut r = Router::new(Limits::default());
        assert!(matches!(r.claim(1, "a@h", key(1)), Ok(Claim::Granted(_))));
        // Another key, or no key: refused, the holder keeps the name.
        assert_eq!(r.claim(2, "a@h", key(2)), Err(IdentifyRefusal::NameTaken));
        assert_eq!(r.claim(3, "a@h", None), Err(IdentifyRefusal::NameTaken));
        // The same key: contested, replaced only once the holder is found dead.
        assert_eq!(
            r.claim(4, "a@h", key(1)),
            Ok(Claim::Contested { holder: 1 })
        );
        assert_eq!(r.conn_of("a@h"), Some(1));
        let out = r.replace(4, "a@h", key(1), 1).unwrap();
        assert_eq!(out.replaced, Some(1));
        assert_eq!(r.conn_of("a@h"), Some(4));
        // A stale contest (the holder changed meanwhile) is refused.
        assert_eq!(
            r.claim(5, "a@h", key(1)),
            Ok(Claim::Contested { holder: 4 })
        );
        assert_eq!(
            r.replace(5, "a@h", key(1), 1),
            Err(IdentifyRefusal::NameTaken)
        );
    }

    #[test]
    fn a_keyless_holder_is_contested_by_anyone() {
        let mut r = Router::new(Limits::default());
        assert!(matches!(r.claim(1, "a@h", None), Ok(Claim::Granted(_))));
        assert_eq!(
            r.claim(2, "a@h", key(1)),
            Ok(Claim::Contested { holder: 1 })
        );
        assert_eq!(r.claim(3, "a@h", None), Ok(Claim::Contested { holder: 1 }));
    }

    #[test]
    fn a_nodes_file_closes_the_relay_to_everyone_else() {
        let mut r = Router::new(Limits::default());
        r.allow_only(HashMap::from([("a@h".to_string(), [1; 32])]));
        assert!(matches!(r.claim(1, "a@h", key(1)), Ok(Claim::Granted(_))));
        assert_eq!(r.claim(2, "b@h", key(1)), Err(IdentifyRefusal::NotAllowed));
        assert_eq!(r.claim(3, "a@h", key(2)), Err(IdentifyRefusal::NotAllowed));
        assert_eq!(r.claim(4, "a@h", None), Err(IdentifyRefusal::NotAllowed));
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

    #[test]
    fn a_tunnel_end_moves_to_a_new_connection() {
        let mut r = router_with(&[(1, "a@h"), (2, "b@h")]);
        r.request_tunnel(1, "b@h", id(1)).unwrap();
        r.identify(3, "c@h").unwrap();
        r.reattach(&id(1), "b@h", 3);
        let t = r.tunnel(&id(1)).unwrap().clone();
        assert_eq!((t.requester, t.target), (1, 3));
        assert_eq!(r.disconnect(2), vec![]);
        assert_eq!(r.disconnect(3), vec![t.clone()]);
        r.restore_tunnel(t);
        assert_eq!(r.tunnel_count(), 1);
        assert_eq!(r.close_tunnel(1, &id(1)).map(|t| t.id), Some(id(1)));
        assert_eq!(r.tunnel_count(), 0);
    }

    fn held_router(hold: u64) -> Router {
        Router::new(Limits {
            name_hold: Duration::from_secs(hold),
            ..Limits::default()
        })
    }

    /// The review's squat: a keyed node disconnects, and any token holder
    /// took its name at once. Now the name stays its key's for the hold.
    #[test]
    fn a_name_stays_bound_to_its_key_after_the_node_left() {
        let mut r = held_router(600);
        let t0 = Instant::now();
        assert!(matches!(
            r.claim_at(1, "a@h", key(1), t0),
            Ok(Claim::Granted(_))
        ));
        r.disconnect_at(1, t0);
        assert_eq!(r.held_count(), 1);
        let t1 = t0 + Duration::from_secs(599);
        assert_eq!(
            r.claim_at(2, "a@h", key(2), t1),
            Err(IdentifyRefusal::NameTaken)
        );
        assert_eq!(
            r.claim_at(3, "a@h", None, t1),
            Err(IdentifyRefusal::NameTaken)
        );
        assert!(matches!(
            r.claim_at(4, "a@h", key(1), t1),
            Ok(Claim::Granted(_))
        ));
        // It left again: held again, from then.
        r.disconnect_at(4, t1);
        let t2 = t1 + Duration::from_secs(599);
        assert_eq!(
            r.claim_at(5, "a@h", key(2), t2),
            Err(IdentifyRefusal::NameTaken)
        );
        let t3 = t1 + Duration::from_secs(600);
        assert!(matches!(
            r.claim_at(6, "a@h", key(2), t3),
            Ok(Claim::Granted(_))
        ));
    }

    #[test]
    fn keyless_nodes_hold_nothing() {
        let mut r = held_router(600);
        let t0 = Instant::now();
        r.claim_at(1, "a@h", None, t0).unwrap();
        r.disconnect_at(1, t0);
        assert_eq!(r.held_count(), 0);
        assert!(matches!(
            r.claim_at(2, "a@h", key(2), t0),
            Ok(Claim::Granted(_))
        ));
    }

    /// What a restart keeps: live keyed names and held ones, each for the
    /// time left; a fresh router that loads them refuses other keys.
    #[test]
    fn bindings_survive_a_restart() {
        let mut r = held_router(600);
        let t0 = Instant::now();
        r.claim_at(1, "a@h", key(1), t0).unwrap();
        r.claim_at(2, "b@h", key(2), t0).unwrap();
        r.claim_at(3, "c@h", None, t0).unwrap();
        r.disconnect_at(2, t0);
        let t1 = t0 + Duration::from_secs(100);
        let kept = r.bindings(t1);
        assert_eq!(
            kept,
            vec![
                ("a@h".to_string(), [1; 32], None),
                ("b@h".to_string(), [2; 32], Some(Duration::from_secs(500))),
            ]
        );
        let kept = kept
            .into_iter()
            .map(|(n, k, left)| (n, k, left.unwrap_or(Duration::MAX)))
            .collect();
        let mut fresh = held_router(600);
        let t2 = Instant::now();
        fresh.load_bindings(kept, t2);
        assert_eq!(
            fresh.claim_at(9, "a@h", key(9), t2),
            Err(IdentifyRefusal::NameTaken)
        );
        assert_eq!(
            fresh.claim_at(9, "b@h", None, t2),
            Err(IdentifyRefusal::NameTaken)
        );
        assert!(matches!(
            fresh.claim_at(10, "a@h", key(1), t2),
            Ok(Claim::Granted(_))
        ));
        let late = t2 + Duration::from_secs(501);
        assert!(matches!(
            fresh.claim_at(11, "b@h", key(9), late),
            Ok(Claim::Granted(_))
        ));
        // Held names are capped: the oldest goes.
        let mut full = held_router(600);
        let many: Vec<_> = (0..MAX_HELD + 10)
            .map(|n| {
                (
                    format!("n{n}@h"),
                    [7; 32],
                    Duration::from_secs(1 + n as u64 % 500),
                )
            })
            .collect();
        full.load_bindings(many, t2);
        assert_eq!(full.held_count(), MAX_HELD);
    }

    /// Sessions claimed back count against the same quotas as `tun_req`:
    /// the review paired 40 000 sessions for one node this way.
    #[test]
    fn claimed_sessions_count_against_the_quotas() {
        let mut r = Router::new(Limits {
            max_tunnels_per_node: 3,
            max_tunnels_per_pair: 2,
            ..Limits::default()
        });
        for (c, n) in [(1, "a@h"), (2, "b@h"), (3, "c@h")] {
            r.identify(c, n).unwrap();
        }
        let t = |n: u8, req: ConnId, rn: &str, tgt: ConnId, tn: &str| Tunnel {
            id: id(n),
            requester: req,
            requester_name: rn.into(),
            target: tgt,
            target_name: tn.into(),
        };
        assert_eq!(r.restore_claimed(t(1, 1, "a@h", 2, "b@h")), Ok(()));
        assert_eq!(r.restore_claimed(t(2, 1, "a@h", 2, "b@h")), Ok(()));
        assert_eq!(
            r.restore_claimed(t(3, 1, "a@h", 2, "b@h")),
            Err(TunnelRefusal::TooManyTunnels)
        );
        assert_eq!(r.restore_claimed(t(4, 1, "a@h", 3, "c@h")), Ok(()));
        assert_eq!(
            r.restore_claimed(t(5, 1, "a@h", 3, "c@h")),
            Err(TunnelRefusal::TooManyTunnels)
        );
        assert_eq!(
            r.restore_claimed(t(6, 1, "a@h", 1, "a@h")),
            Err(TunnelRefusal::SelfTunnel)
        );
        assert_eq!(
            r.restore_claimed(t(7, 2, "x@h", 3, "c@h")),
            Err(TunnelRefusal::TargetNotConnected)
        );
        assert_eq!(r.tunnel_count(), 3);
    }
}
