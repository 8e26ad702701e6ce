//! The `macula_dist_nif` Erlang NIF: rustler glue over `macula_dist_node`
//! (the relay client and the tunnel data path) and `macula_dist_relay`
//! (an embedded relay for tests and demos). It holds resources, turns
//! terms into options and events into messages; no protocol logic.
//!
//! Every function here returns at once: anything that waits runs on the
//! VM's tokio runtime ([`vm_runtime`]) and answers by message, or runs on a
//! dirty scheduler. The messages are described in [`client_nif`] and
//! [`tunnel_nif`].

mod atoms;
mod client_nif;
mod embedded_relay;
mod tunnel_nif;
mod vm_runtime;

use std::sync::atomic::Ordering;

use bytes::Bytes;
use macula_dist_node::relay_client::LIVE_CLIENTS;
use macula_dist_node::tunnel::LIVE_TUNNELS;
use macula_relay_proto::wire::packet::Packet;
use rustler::{Binary, Encoder, Env, LocalPid, NifResult, ResourceArc, Term, TermType};

use client_nif::{ClientRes, ConnectOpts};
use tunnel_nif::{TunnelInfo, TunnelRes};

/// Objects alive in this VM, for leak checks: tunnels and clients count up
/// when made and down when Rust frees them (after Erlang let go too).
#[derive(rustler::NifMap)]
struct LiveCounts {
    tunnels: usize,
    clients: usize,
}

#[rustler::nif]
fn live_counts() -> LiveCounts {
    LiveCounts {
        tunnels: LIVE_TUNNELS.load(Ordering::Relaxed),
        clients: LIVE_CLIENTS.load(Ordering::Relaxed),
    }
}

// ---- client ----

/// Starts a client; the calling process is its owner and hears
/// `{macula_client, identified}` or `{macula_client, {connect_failed, R}}`.
#[rustler::nif]
fn client_start(env: Env, opts: ConnectOpts) -> NifResult<(rustler::Atom, ResourceArc<ClientRes>)> {
    let owner = env.pid();
    let client = client_nif::start(owner, opts)
        .map_err(|e| rustler::Error::Term(Box::new((atoms::tls_config(), e))))?;
    let res = ResourceArc::new(client);
    if env.monitor(&res, &owner).is_none() {
        res.client.stop();
    }
    Ok((atoms::ok(), res))
}

#[rustler::nif]
fn client_stop(client: ResourceArc<ClientRes>) -> rustler::Atom {
    client.client.stop();
    atoms::ok()
}

/// Asks for a tunnel to `target`; the caller hears
/// `{macula_tunnel_reply, Tag, {ok, ConnRef, Tunnel} | {error, Reason}}`.
/// With a cookie (not empty) it is an e2e session when the relay offers
/// them; the cookie keys both ends.
#[rustler::nif]
fn client_request_tunnel<'a>(
    env: Env<'a>,
    client: ResourceArc<ClientRes>,
    target: String,
    tag: u64,
    cookie: Binary<'a>,
) -> Term<'a> {
    let cookie = (!cookie.is_empty()).then(|| cookie.as_slice().to_vec());
    match client.request_tunnel(target, env.pid(), tag, cookie) {
        Ok(()) => atoms::ok().encode(env),
        Err(reason) => (atoms::error(), reason).encode(env),
    }
}

#[rustler::nif]
fn client_close_tunnel<'a>(
    env: Env<'a>,
    client: ResourceArc<ClientRes>,
    tunnel_id: Binary<'a>,
) -> Term<'a> {
    match macula_relay_proto::TunnelId::parse(tunnel_id.as_slice()) {
        Ok(id) if client.client.close_tunnel(id) => atoms::ok().encode(env),
        Ok(_) => (atoms::error(), atoms::not_connected()).encode(env),
        Err(_) => (atoms::error(), atoms::badarg()).encode(env),
    }
}

/// The owner's answer to `{macula_client, {cookie, Source, Tag}}`: the
/// cookie this node uses with `Source`, for an inbound e2e session.
#[rustler::nif]
fn client_cookie(client: ResourceArc<ClientRes>, tag: u64, cookie: Binary) -> rustler::Atom {
    client.client.cookie(tag, cookie.as_slice());
    atoms::ok()
}

/// Asks which nodes this node may reach on its relay; the caller hears
/// `{macula_nodes_reply, Tag, {ok, [Name]}}`.
#[rustler::nif]
fn client_nodes(env: Env, client: ResourceArc<ClientRes>, tag: u64) -> Term {
    match client.request_nodes(env.pid(), tag) {
        Ok(()) => atoms::ok().encode(env),
        Err(reason) => (atoms::error(), reason).encode(env),
    }
}

#[rustler::nif]
fn client_set_kernel(
    client: ResourceArc<ClientRes>,
    kernel: LocalPid,
    acceptor: LocalPid,
) -> rustler::Atom {
    client.set_kernel(kernel, acceptor);
    atoms::ok()
}

#[rustler::nif]
fn client_status(client: ResourceArc<ClientRes>) -> client_nif::ClientStatusMap {
    client.status()
}

// ---- tunnels ----

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
    tunnel_nif::set_owner(&tunnel, Some(env), owner);
    atoms::ok().encode(env)
}

#[rustler::nif]
fn tunnel_set_packet(tunnel: ResourceArc<TunnelRes>, header: u32) -> NifResult<rustler::Atom> {
    let packet = Packet::from_header_len(header).ok_or(rustler::Error::BadArg)?;
    tunnel.tunnel.set_packet(packet);
    Ok(atoms::ok())
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

rustler::init!("macula_dist_nif");
