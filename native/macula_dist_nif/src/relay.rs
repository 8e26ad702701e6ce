//! An embedded relay, for tests and demos: `relay_start/1`, `relay_info/1`,
//! `relay_stop/1`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use macula_dist_relay::{Config, Relay};
use rustler::{Encoder, Env, NifResult, Resource, ResourceArc, Term};

use crate::atoms;
use crate::runtime::runtime;

pub struct RelayRes {
    relay: Mutex<Option<Relay>>,
    addr: SocketAddr,
    fingerprint: String,
}

#[rustler::resource_impl]
impl Resource for RelayRes {}

impl Drop for RelayRes {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.lock().unwrap_or_else(|e| e.into_inner()).take() {
            runtime().spawn(relay.stop());
        }
    }
}

#[derive(rustler::NifMap)]
pub struct RelayOpts {
    ip: String,
    port: u16,
    /// Empty: no token.
    token: String,
    /// PEM files of the relay's certificate (chain) and key; both empty: a
    /// self-signed certificate made at start.
    cert_file: String,
    key_file: String,
}

#[rustler::nif(schedule = "DirtyIo")]
fn relay_start(env: Env, opts: RelayOpts) -> NifResult<Term> {
    let ip = opts
        .ip
        .parse()
        .map_err(|_| rustler::Error::Term(Box::new(format!("bad ip {:?}", opts.ip))))?;
    let identity = match (opts.cert_file.is_empty(), opts.key_file.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => macula_dist_relay::RelayCertificate::from_pem_files(
            opts.cert_file.as_ref(),
            opts.key_file.as_ref(),
        )
        .map(Some),
        _ => Err(anyhow::anyhow!("cert_file and key_file go together")),
    };
    let started = identity.and_then(|identity| {
        let config = Config {
            listen: SocketAddr::new(ip, opts.port),
            token: (!opts.token.is_empty()).then_some(opts.token),
            certificate: identity,
            ..Config::default()
        };
        runtime().block_on(Relay::start(config))
    });
    match started {
        Ok(relay) => {
            let res = ResourceArc::new(RelayRes {
                addr: relay.local_addr(),
                fingerprint: relay.fingerprint().to_owned(),
                relay: Mutex::new(Some(relay)),
            });
            Ok((atoms::ok(), res).encode(env))
        }
        Err(e) => Ok((atoms::error(), format!("{e:#}")).encode(env)),
    }
}

#[rustler::nif]
fn relay_info(env: Env, relay: ResourceArc<RelayRes>) -> Term {
    let guard = relay.relay.lock().unwrap_or_else(|e| e.into_inner());
    let stats = guard.as_ref().map(|r| r.stats());
    let (nodes, tunnels, sessions) = stats
        .map(|s| (s.nodes, s.tunnels, s.sessions))
        .unwrap_or((0, 0, 0));
    // The data plane's counters, by name.
    let data: Vec<(&str, u64)> = match guard.as_ref() {
        Some(r) => {
            let d = r.data_stats();
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            vec![
                ("forwarded_datagrams", load(&d.forwarded_datagrams)),
                ("forwarded_bytes", load(&d.forwarded_bytes)),
                ("dropped_unknown_session", load(&d.dropped_unknown_session)),
                ("dropped_bad_bind", load(&d.dropped_bad_bind)),
                ("dropped_malformed", load(&d.dropped_malformed)),
                ("dropped_overload", load(&d.dropped_overload)),
                ("rebinds", load(&d.rebinds)),
            ]
        }
        None => vec![],
    };
    drop(guard);
    let mut pairs: Vec<(Term, Term)> = vec![
        (
            atoms::address().encode(env),
            relay.addr.ip().to_string().encode(env),
        ),
        (atoms::port().encode(env), relay.addr.port().encode(env)),
        (
            atoms::fingerprint().encode(env),
            relay.fingerprint.as_str().encode(env),
        ),
        (atoms::nodes().encode(env), nodes.encode(env)),
        (atoms::tunnels().encode(env), tunnels.encode(env)),
        (atoms::sessions().encode(env), sessions.encode(env)),
    ];
    for (name, value) in data {
        // Atoms from this fixed list only.
        if let Ok(key) = rustler::Atom::from_str(env, name) {
            pairs.push((key.encode(env), value.encode(env)));
        }
    }
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
}

#[rustler::nif(schedule = "DirtyIo")]
fn relay_stop(relay: ResourceArc<RelayRes>) -> rustler::Atom {
    let taken = relay.relay.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(r) = taken {
        runtime().block_on(r.stop());
    }
    atoms::ok()
}
