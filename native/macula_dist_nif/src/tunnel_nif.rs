//! A tunnel as Erlang holds it: the node crate's [`Tunnel`] plus its owner
//! (a monitored pid), and the sink that turns the tunnel's events into the
//! owner's messages:
//! `{macula_tunnel, Tunnel, {data, [binary()]}}`,
//! `{macula_tunnel, Tunnel, writable}`, `{macula_tunnel, Tunnel, closed}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use macula_dist_node::tunnel::{NewTunnel, Tunnel, TunnelSink};
use macula_relay_proto::Mode;
use rustler::{Encoder, Env, LocalPid, Monitor, NewBinary, OwnedEnv, Resource, ResourceArc, Term};

use crate::atoms;

pub(crate) struct TunnelRes {
    pub(crate) tunnel: Arc<Tunnel>,
    owner: Mutex<Option<(LocalPid, Option<Monitor>)>>,
}

#[rustler::resource_impl]
impl Resource for TunnelRes {
    const IMPLEMENTS_DOWN: bool = true;

    /// The owner died: what it sent is still delivered, as with a socket.
    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: Monitor) {
        self.tunnel.close(true);
    }
}

impl Drop for TunnelRes {
    fn drop(&mut self) {
        self.tunnel.close(false);
    }
}

impl TunnelRes {
    fn owner(&self) -> Option<LocalPid> {
        self.owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(pid, _)| *pid)
    }
}

/// Wraps a new tunnel for Erlang (owned by `owner`, if given) and starts
/// its reader and writer.
pub(crate) fn start(new: NewTunnel, owner: Option<LocalPid>) -> ResourceArc<TunnelRes> {
    let res = ResourceArc::new(TunnelRes {
        tunnel: new.tunnel.clone(),
        owner: Mutex::new(None),
    });
    if let Some(pid) = owner {
        set_owner(&res, None, pid);
    }
    new.io.start(&new.tunnel, || {
        Box::new(OwnerSink {
            res: res.clone(),
            env: OwnedEnv::new(),
        })
    });
    res
}

/// Makes `pid` the owner (monitored); the old owner is no longer monitored.
/// A tunnel whose new owner is already dead closes.
pub(crate) fn set_owner(res: &ResourceArc<TunnelRes>, env: Option<Env>, pid: LocalPid) {
    let mut owner = res.owner.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, Some(old))) = owner.take() {
        res.demonitor(env, &old);
    }
    let monitor = res.monitor(env, &pid);
    let alive = monitor.is_some();
    *owner = Some((pid, monitor));
    drop(owner);
    if !alive {
        res.tunnel.close(false);
    }
}

/// One of a tunnel's loops telling its owner.
struct OwnerSink {
    res: ResourceArc<TunnelRes>,
    env: OwnedEnv,
}

impl OwnerSink {
    fn notify(&mut self, event: impl for<'a> FnOnce(Env<'a>) -> Term<'a>) {
        if let Some(owner) = self.res.owner() {
            let res = &self.res;
            let _ = self.env.send_and_clear(&owner, |env| {
                (atoms::macula_tunnel(), res.clone(), event(env)).encode(env)
            });
        }
    }
}

impl TunnelSink for OwnerSink {
    /// `{data, Frames}`: one binary holds the batch, each frame is a
    /// sub-binary of it (one allocation and one copy per batch).
    fn data(&mut self, frames: &mut Vec<Bytes>) {
        let frames = std::mem::take(frames);
        self.notify(|env| {
            let total = frames.iter().map(|f| f.len()).sum();
            let mut whole = NewBinary::new(env, total);
            let mut at = 0;
            for f in &frames {
                whole.as_mut_slice()[at..at + f.len()].copy_from_slice(f);
                at += f.len();
            }
            let whole: rustler::Binary = whole.into();
            let mut at = 0;
            let list: Vec<Term> = frames
                .iter()
                .map(|f| {
                    let sub = whole
                        .make_subbinary(at, f.len())
                        .expect("within the batch binary");
                    at += f.len();
                    sub.to_term(env)
                })
                .collect();
            (atoms::data(), list).encode(env)
        });
    }

    fn writable(&mut self) {
        self.notify(|env| atoms::writable().encode(env));
    }

    fn closed(&mut self) {
        self.notify(|env| atoms::closed().encode(env));
    }
}

/// A tunnel's path: `relay`, or `{direct, "ip:port"}`.
pub(crate) struct PathTerm(pub(crate) Option<std::net::SocketAddr>);

impl Encoder for PathTerm {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match self.0 {
            Some(addr) => (atoms::direct(), addr.to_string()).encode(env),
            None => atoms::relay().encode(env),
        }
    }
}

impl<'a> rustler::Decoder<'a> for PathTerm {
    fn decode(term: Term<'a>) -> rustler::NifResult<Self> {
        if let Ok(atom) = term.decode::<rustler::Atom>() {
            return match atom == atoms::relay() {
                true => Ok(PathTerm(None)),
                false => Err(rustler::Error::BadArg),
            };
        }
        let (tag, addr): (rustler::Atom, String) = term.decode()?;
        match (tag == atoms::direct(), addr.parse()) {
            (true, Ok(addr)) => Ok(PathTerm(Some(addr))),
            _ => Err(rustler::Error::BadArg),
        }
    }
}

/// What `tunnel_info/1` answers.
#[derive(rustler::NifMap)]
pub(crate) struct TunnelInfo {
    id: String,
    peer: String,
    direction: rustler::Atom,
    mode: rustler::Atom,
    path: PathTerm,
    closed: bool,
    recv_bytes: u64,
    recv_packets: u64,
    send_bytes: u64,
    send_packets: u64,
    send_pending: u64,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl TunnelInfo {
    pub(crate) fn of(t: &Tunnel) -> Self {
        let c = &t.counters;
        TunnelInfo {
            id: t.id.as_string(),
            peer: t.peer.clone(),
            direction: if t.outbound {
                atoms::outbound()
            } else {
                atoms::inbound()
            },
            mode: match t.mode {
                Mode::E2e => atoms::e2e(),
                Mode::Stream => atoms::stream(),
            },
            path: PathTerm(t.direct()),
            closed: t.is_closed(),
            recv_bytes: load(&c.recv_bytes),
            recv_packets: load(&c.recv_packets),
            send_bytes: load(&c.send_bytes),
            send_packets: load(&c.send_packets),
            send_pending: t.queued() as u64,
        }
    }
}
