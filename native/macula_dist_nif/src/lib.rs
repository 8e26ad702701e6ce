//! The `macula_dist_nif` Erlang NIF: the relay client, the tunnel data
//! path, and an embedded relay for tests and demos.
//!
//! Every function here returns at once: anything that waits runs on the
//! crate's tokio runtime and answers by message, or runs on a dirty
//! scheduler. The async work and its messages are described in
//! [`client`] and [`tunnel`].

mod client;
mod keep;
mod relay;
mod runtime;
mod session;
mod tunnel;

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use rustler::{Binary, Encoder, Env, LocalPid, NifResult, ResourceArc, Term, TermType};

use client::{ClientRes, ConnectOpts};
use macula_relay_proto::wire::packet::Packet;
use tunnel::TunnelRes;

pub(crate) mod atoms {
    rustler::atoms! {
        ok, error, closed, busy, timeout,
        macula_client, macula_tunnel, macula_tunnel_reply,
        identified, connect_failed, log, warning,
        unreachable, tls, tls_config, refused, protocol_error,
        tunnel_error, not_connected, relay_closed, badarg,
        accept, inet, macula, data, writable,
        connecting, connected, node, connection, pending_tunnels, active_tunnels,
        bytes_in, bytes_out, rtt_us, kernel_set,
        recv_bytes, recv_packets, send_bytes, send_packets, send_pending,
        id, peer, direction, inbound, outbound, port, address, fingerprint,
        nodes, tunnels, clients,
        // Reasons the relay and client send, returned as atoms.
        target_not_connected, not_identified, self_tunnel, too_many_tunnels,
        too_many_nodes, bad_name, bad_token, already_identified,
        identify_timeout, open_failed, stream_timeout,
        mode, e2e, stream, cookie, e2e_sessions, refused_sessions,
        mode_unsupported, e2e_handshake_failed, sessions, key_id, undefined,
        session_identity, cluster_ca,
        name_taken, not_allowed, macula_nodes_reply, unsupported,
        direct, relay, path, info, relay_without_e2e, downgrade_refused,
    }

    /// The atom for a reason the relay or client is known to send.
    pub fn relay_reason(r: &str) -> Option<rustler::Atom> {
        Some(match r {
            "target_not_connected" => target_not_connected(),
            "not_identified" => not_identified(),
            "self_tunnel" => self_tunnel(),
            "too_many_tunnels" => too_many_tunnels(),
            "too_many_nodes" => too_many_nodes(),
            "bad_name" => bad_name(),
            "bad_token" => bad_token(),
            "already_identified" => already_identified(),
            "identify_timeout" => identify_timeout(),
            "open_failed" => open_failed(),
            "stream_timeout" => stream_timeout(),
            "relay_closed" => relay_closed(),
            "mode_unsupported" => mode_unsupported(),
            "name_taken" => name_taken(),
            "not_allowed" => not_allowed(),
            "e2e_handshake_failed" => e2e_handshake_failed(),
            "relay_without_e2e" => relay_without_e2e(),
            "downgrade_refused" => downgrade_refused(),
            _ => return None,
        })
    }
}

/// Objects alive in this VM, for leak checks: tunnels and clients count up
/// when made and down when Rust frees them (after Erlang let go too).
pub(crate) static LIVE_TUNNELS: AtomicUsize = AtomicUsize::new(0);
pub(crate) static LIVE_CLIENTS: AtomicUsize = AtomicUsize::new(0);

#[rustler::nif]
fn live_counts(env: Env) -> Term {
    let pairs: Vec<(Term, Term)> = vec![
        (
            atoms::tunnels().encode(env),
            LIVE_TUNNELS.load(Ordering::Relaxed).encode(env),
        ),
        (
            atoms::clients().encode(env),
            LIVE_CLIENTS.load(Ordering::Relaxed).encode(env),
        ),
    ];
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
}

// ---- client ----

/// Starts a client; the calling process is its owner and hears
/// `{macula_client, identified}` or `{macula_client, {connect_failed, R}}`.
#[rustler::nif]
fn client_start(env: Env, opts: ConnectOpts) -> NifResult<(rustler::Atom, ResourceArc<ClientRes>)> {
    let owner = env.pid();
    let client = client::start(owner, opts)
        .map_err(|e| rustler::Error::Term(Box::new((atoms::tls_config(), e))))?;
    let res = ResourceArc::new(ClientRes(client));
    if env.monitor(&res, &owner).is_none() {
        res.0.stop();
    }
    Ok((atoms::ok(), res))
}

#[rustler::nif]
fn client_stop(client: ResourceArc<ClientRes>) -> rustler::Atom {
    client.0.stop();
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
    match client.0.request_tunnel(target, env.pid(), tag, cookie) {
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
        Ok(id) if client.0.close_tunnel(id) => atoms::ok().encode(env),
        Ok(_) => (atoms::error(), atoms::not_connected()).encode(env),
        Err(_) => (atoms::error(), atoms::badarg()).encode(env),
    }
}

/// The owner's answer to `{macula_client, {cookie, Source, Tag}}`: the
/// cookie this node uses with `Source`, for an inbound e2e session.
#[rustler::nif]
fn client_cookie(client: ResourceArc<ClientRes>, tag: u64, cookie: Binary) -> rustler::Atom {
    client.0.cookie(tag, cookie.as_slice());
    atoms::ok()
}

/// Asks which nodes this node may reach on its relay; the caller hears
/// `{macula_nodes_reply, Tag, {ok, [Name]}}`.
#[rustler::nif]
fn client_nodes(env: Env, client: ResourceArc<ClientRes>, tag: u64) -> Term {
    match client.0.request_nodes(env.pid(), tag) {
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
    client.0.set_kernel(kernel, acceptor);
    atoms::ok()
}

#[rustler::nif]
fn client_status(env: Env, client: ResourceArc<ClientRes>) -> Term {
    client.0.status(env)
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
    Ok(match tunnel.0.send(bytes, packets) {
        Ok(false) => atoms::ok().encode(env),
        Ok(true) => atoms::busy().encode(env),
        Err(()) => (atoms::error(), atoms::closed()).encode(env),
    })
}

#[rustler::nif]
fn tunnel_set_owner(env: Env, tunnel: ResourceArc<TunnelRes>, owner: LocalPid) -> Term {
    if tunnel.0.is_closed() {
        return (atoms::error(), atoms::closed()).encode(env);
    }
    tunnel::set_owner(&tunnel, Some(env), owner);
    atoms::ok().encode(env)
}

#[rustler::nif]
fn tunnel_set_packet(tunnel: ResourceArc<TunnelRes>, header: u32) -> NifResult<rustler::Atom> {
    let packet = Packet::from_header_len(header).ok_or(rustler::Error::BadArg)?;
    tunnel.0.set_packet(packet);
    Ok(atoms::ok())
}

/// Allows `N` more `{data, Frames}` messages to the owner.
#[rustler::nif]
fn tunnel_activate(tunnel: ResourceArc<TunnelRes>, n: u32) -> rustler::Atom {
    tunnel.0.add_credit(n);
    atoms::ok()
}

#[rustler::nif]
fn tunnel_close(tunnel: ResourceArc<TunnelRes>) -> rustler::Atom {
    tunnel.0.close(true);
    atoms::ok()
}

/// `{RecvPackets, SendPackets, SendPendingBytes}`, for `mf_getstat`.
#[rustler::nif]
fn tunnel_getstat(tunnel: ResourceArc<TunnelRes>) -> (u64, u64, u64) {
    let c = &tunnel.0.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    (
        load(&c.recv_packets),
        load(&c.send_packets),
        tunnel.0.queued() as u64,
    )
}

#[rustler::nif]
fn tunnel_info(env: Env, tunnel: ResourceArc<TunnelRes>) -> Term {
    let t = &tunnel.0;
    let c = &t.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let pairs: Vec<(Term, Term)> = vec![
        (atoms::id().encode(env), t.id.as_string().encode(env)),
        (atoms::peer().encode(env), t.peer.as_str().encode(env)),
        (
            atoms::direction().encode(env),
            if t.outbound {
                atoms::outbound()
            } else {
                atoms::inbound()
            }
            .encode(env),
        ),
        (
            atoms::mode().encode(env),
            match t.mode {
                macula_relay_proto::Mode::E2e => atoms::e2e(),
                macula_relay_proto::Mode::Stream => atoms::stream(),
            }
            .encode(env),
        ),
        (
            atoms::path().encode(env),
            match t.direct() {
                Some(addr) => (atoms::direct(), addr.to_string()).encode(env),
                None => atoms::relay().encode(env),
            },
        ),
        (atoms::closed().encode(env), t.is_closed().encode(env)),
        (
            atoms::recv_bytes().encode(env),
            load(&c.recv_bytes).encode(env),
        ),
        (
            atoms::recv_packets().encode(env),
            load(&c.recv_packets).encode(env),
        ),
        (
            atoms::send_bytes().encode(env),
            load(&c.send_bytes).encode(env),
        ),
        (
            atoms::send_packets().encode(env),
            load(&c.send_packets).encode(env),
        ),
        (
            atoms::send_pending().encode(env),
            (t.queued() as u64).encode(env),
        ),
    ];
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
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
