//! A tunnel as Erlang holds it: the node crate's [`Tunnel`] plus its owner
//! (a monitored pid), and the sink that turns the tunnel's events into the
//! owner's messages:
//! `{macula_tunnel, Tunnel, {data, [binary()]}}`,
//! `{macula_tunnel, Tunnel, writable}`, `{macula_tunnel, Tunnel, closed}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use macula_dist_node::tunnel::{NewTunnel, Tunnel, TunnelSink};
use macula_relay_proto::wire::packet::Packet;
use macula_relay_proto::Mode;
use rustler::{
    Binary, Encoder, Env, LocalPid, Monitor, NewBinary, NifResult, OwnedEnv, Resource, ResourceArc,
    Term, TermType,
};

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

/// An e2e session's QUIC path, as `quic` in `tunnel_info/1`: a map, or
/// `undefined` for a stream tunnel (the relay's connection is shared).
pub(crate) struct QuicTerm(pub(crate) Option<quinn::PathStats>);

#[derive(rustler::NifMap)]
struct QuicPath {
    rtt_us: u64,
    min_rtt_us: u64,
    cwnd: u64,
    congestion_events: u64,
    lost_packets: u64,
    lost_bytes: u64,
    sent_packets: u64,
    mtu: u16,
}

impl Encoder for QuicTerm {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match &self.0 {
            Some(p) => QuicPath {
                rtt_us: p.rtt.as_micros() as u64,
                min_rtt_us: p.min_rtt.as_micros() as u64,
                cwnd: p.cwnd,
                congestion_events: p.congestion_events,
                lost_packets: p.lost_packets,
                lost_bytes: p.lost_bytes,
                sent_packets: p.sent_packets,
                mtu: p.current_mtu,
            }
            .encode(env),
            None => atoms::undefined().encode(env),
        }
    }
}

/// `TunnelInfo` is only ever sent to Erlang; its derive asks for this.
impl<'a> rustler::Decoder<'a> for QuicTerm {
    fn decode(_term: Term<'a>) -> rustler::NifResult<Self> {
        Err(rustler::Error::BadArg)
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
    /// Lanes (streams by sender) used so far; 0 until split.
    lanes: u32,
    /// Packets sent behind a fence (no sender the router could name).
    fences: u64,
    quic: QuicTerm,
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
            lanes: t.lane_stats().0,
            fences: t.lane_stats().1,
            quic: QuicTerm(t.path_stats()),
        }
    }
}

// ---- the NIFs on a tunnel ----

/// Queues iodata for the peer: `ok`, `busy` (queued, but stop until
/// `writable`), or `{error, closed}`. `Packets` counts what it holds.
#[rustler::nif]
fn tunnel_send<'a>(
    env: Env<'a>,
    tunnel: ResourceArc<TunnelRes>,
    data: Term<'a>,
    packets: u64,
) -> NifResult<Term<'a>> {
    send(env, tunnel, data, packets)
}

/// `tunnel_send` for large iodata, on a dirty scheduler.
#[rustler::nif(schedule = "DirtyCpu")]
fn tunnel_send_dirty<'a>(
    env: Env<'a>,
    tunnel: ResourceArc<TunnelRes>,
    data: Term<'a>,
    packets: u64,
) -> NifResult<Term<'a>> {
    send(env, tunnel, data, packets)
}

fn send<'a>(
    env: Env<'a>,
    tunnel: ResourceArc<TunnelRes>,
    data: Term<'a>,
    packets: u64,
) -> NifResult<Term<'a>> {
    let bytes = flatten_iodata(data)?;
    Ok(match tunnel.tunnel.send(bytes, packets) {
        Ok(false) => atoms::ok().encode(env),
        Ok(true) => atoms::busy().encode(env),
        Err(_) => (atoms::error(), atoms::closed()).encode(env),
    })
}

#[rustler::nif]
fn tunnel_set_owner(env: Env, tunnel: ResourceArc<TunnelRes>, owner: LocalPid) -> Term {
    if tunnel.tunnel.is_closed() {
        return (atoms::error(), atoms::closed()).encode(env);
    }
    set_owner(&tunnel, Some(env), owner);
    atoms::ok().encode(env)
}

#[rustler::nif]
fn tunnel_set_packet(tunnel: ResourceArc<TunnelRes>, header: u32) -> NifResult<rustler::Atom> {
    let packet = Packet::from_header_len(header).ok_or(rustler::Error::BadArg)?;
    tunnel.tunnel.set_packet(packet);
    Ok(atoms::ok())
}

/// The distribution handshake is done: each sending process's packets go
/// on a lane of their own. `{error, not_e2e}` on a stream tunnel.
#[rustler::nif]
fn tunnel_split_by_sender(env: Env, tunnel: ResourceArc<TunnelRes>) -> Term {
    match tunnel.tunnel.split_by_sender() {
        Ok(()) => atoms::ok().encode(env),
        Err(_) => (atoms::error(), atoms::not_e2e()).encode(env),
    }
}

/// Allows `N` more `{data, Frames}` messages to the owner.
#[rustler::nif]
fn tunnel_activate(tunnel: ResourceArc<TunnelRes>, n: u32) -> rustler::Atom {
    tunnel.tunnel.add_credit(n);
    atoms::ok()
}

#[rustler::nif]
fn tunnel_close(tunnel: ResourceArc<TunnelRes>) -> rustler::Atom {
    tunnel.tunnel.close(true);
    atoms::ok()
}

/// `{RecvPackets, SendPackets, SendPendingBytes}`, for `mf_getstat`.
#[rustler::nif]
fn tunnel_getstat(tunnel: ResourceArc<TunnelRes>) -> (u64, u64, u64) {
    let c = &tunnel.tunnel.counters;
    (
        c.recv_packets.load(Ordering::Relaxed),
        c.send_packets.load(Ordering::Relaxed),
        tunnel.tunnel.queued() as u64,
    )
}

#[rustler::nif]
fn tunnel_info(tunnel: ResourceArc<TunnelRes>) -> TunnelInfo {
    TunnelInfo::of(&tunnel.tunnel)
}

/// Copies iodata (nested lists of binaries and bytes, binary tails) into
/// one buffer, in order, without recursion.
fn flatten_iodata(term: Term) -> NifResult<Bytes> {
    fn walk<'a>(term: Term<'a>, mut visit: impl FnMut(&[u8])) -> NifResult<()> {
        let mut stack = vec![term];
        while let Some(t) = stack.pop() {
            match t.get_type() {
                TermType::Binary => visit(Binary::from_term(t)?.as_slice()),
                TermType::Integer => {
                    let b: u8 = t.decode()?;
                    visit(&[b]);
                }
                TermType::List => {
                    if let Ok((head, tail)) = t.list_get_cell() {
                        stack.push(tail);
                        stack.push(head);
                    }
                }
                _ => return Err(rustler::Error::BadArg),
            }
        }
        Ok(())
    }
    if let Ok(bin) = Binary::from_term(term) {
        return Ok(Bytes::copy_from_slice(bin.as_slice()));
    }
    let mut len = 0;
    walk(term, |b| len += b.len())?;
    let mut out = Vec::with_capacity(len);
    walk(term, |b| out.extend_from_slice(b))?;
    Ok(Bytes::from(out))
}
