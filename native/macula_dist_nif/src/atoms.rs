//! The atoms the NIF answers with.

rustler::atoms! {
    ok, error, closed, busy, timeout, not_e2e,
    macula_client, macula_tunnel, macula_tunnel_reply,
    identified, connect_failed, log, warning, info,
    unreachable, tls, tls_config, refused, protocol_error,
    tunnel_error, not_connected, relay_closed, badarg,
    accept, inet, macula, data, writable,
    connecting, connected, cookie, e2e, stream, cluster_ca,
    inbound, outbound, direct, relay, undefined,
    macula_nodes_reply, unsupported, replaced,
    // Reasons the relay and client send, returned as atoms.
    target_not_connected, not_identified, self_tunnel, too_many_tunnels,
    too_many_nodes, bad_name, bad_token, already_identified,
    identify_timeout, open_failed, stream_timeout,
    mode_unsupported, e2e_handshake_failed,
    name_taken, not_allowed, relay_without_e2e, downgrade_refused,
    // Routes of distribution packets (`dist_routes`).
    control, fence, lane,
}

/// The atom for a reason the relay or client is known to send.
pub(crate) fn relay_reason(r: &str) -> Option<rustler::Atom> {
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
