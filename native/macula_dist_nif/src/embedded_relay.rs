//! An embedded relay, for tests and demos: `relay_start/1`, `relay_info/1`,
//! `relay_stop/1`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use macula_dist_relay::{Config, Relay};
use rustler::{Encoder, Env, NifResult, Resource, ResourceArc, Term};

use crate::atoms;
use crate::vm_runtime::runtime;

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

/// What `relay_info/1` answers: where the relay listens, its counts, and
/// its data plane's counters.
#[derive(rustler::NifMap)]
struct RelayInfo {
    address: String,
    port: u16,
    fingerprint: String,
    nodes: usize,
    tunnels: usize,
    sessions: usize,
    forwarded_datagrams: u64,
    forwarded_bytes: u64,
    dropped_unknown_session: u64,
    dropped_bad_bind: u64,
    dropped_malformed: u64,
    dropped_overload: u64,
    rebinds: u64,
}

#[rustler::nif]
fn relay_info(relay: ResourceArc<RelayRes>) -> RelayInfo {
    let guard = relay.relay.lock().unwrap_or_else(|e| e.into_inner());
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut info = RelayInfo {
        address: relay.addr.ip().to_string(),
        port: relay.addr.port(),
        fingerprint: relay.fingerprint.clone(),
        nodes: 0,
        tunnels: 0,
        sessions: 0,
        forwarded_datagrams: 0,
        forwarded_bytes: 0,
        dropped_unknown_session: 0,
        dropped_bad_bind: 0,
        dropped_malformed: 0,
        dropped_overload: 0,
        rebinds: 0,
    };
    if let Some(r) = guard.as_ref() {
        let s = r.stats();
        let d = r.data_stats();
        info.nodes = s.nodes;
        info.tunnels = s.tunnels;
        info.sessions = s.sessions;
        info.forwarded_datagrams = load(&d.forwarded_datagrams);
        info.forwarded_bytes = load(&d.forwarded_bytes);
        info.dropped_unknown_session = load(&d.dropped_unknown_session);
        info.dropped_bad_bind = load(&d.dropped_bad_bind);
        info.dropped_malformed = load(&d.dropped_malformed);
        info.dropped_overload = load(&d.dropped_overload);
        info.rebinds = load(&d.rebinds);
    }
    info
}

#[rustler::nif(schedule = "DirtyIo")]
fn relay_stop(relay: ResourceArc<RelayRes>) -> rustler::Atom {
    let taken = relay.relay.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(r) = taken {
        runtime().block_on(r.stop());
    }
    atoms::ok()
}
