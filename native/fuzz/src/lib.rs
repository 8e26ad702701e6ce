//! Fuzz harnesses of `macula_relay_proto`. Each takes arbitrary bytes, never
//! panics on any input unless the code under test breaks one of the
//! invariants checked here, and is driven three ways:
//!
//! - by AFL++ (`src/bin/<target>.rs`, feature `afl`; scripts/fuzz.sh),
//! - by the seed corpus replay and proptest inputs in `tests/`,
//! - by hand: `cargo run --features afl --bin <target> < input` replays one
//!   crash file (a binary built without `cargo afl` reads stdin once).
//!
//! Targets:
//! - [`frames`]: the control-stream decoder (`FrameDecoder`, `Message::decode_body`).
//! - [`dataplane`]: the data-plane header (`classify`, `header`, `clear_bind`).
//! - [`sessions`]: the relay's bind exchange and session routing (`SessionTable`).
//! - [`paths`]: the node's session paths (`Paths`: add, remove, hold).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use macula_relay_proto::node::paths::{is_virtual, Paths, Route, EARLY_WAIT, MAX_EARLY};
use macula_relay_proto::relay::sessions::{
    Claim, Claims, DropReason, KeepRefusal, Kept, SessionIdTaken, SessionTable, Verdict,
};
use macula_relay_proto::wire::dataplane::{
    classify, clear_bind, header, session_id, Datagram, SessionId, HEADER_LEN, NO_BIND,
    SESSION_DATAGRAM,
};
use macula_relay_proto::{BindKey, DecodeError, FrameDecoder, Message, TunnelId};

/// Reads fuzz input as a sequence of small values; past the end it yields
/// zeros and `done()` turns true, which ends the operation loops.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn done(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_be_bytes(b)
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        for x in &mut b {
            *x = self.u8();
        }
        b
    }

    /// Up to `max` bytes, the count first.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (self.u8() as usize).min(max).min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }
}

// ---------------------------------------------------------------------------
// Control frames

/// One result of the stream decoder, errors included.
type Decoded = Result<Message, DecodeError>;

/// Feeds `data` to a decoder in chunks of `chunk` bytes (0: all at once) and
/// collects everything it returns, up to and including a fatal error.
fn decode_stream(data: &[u8], chunk: usize, max_frame: usize) -> Vec<Decoded> {
    let mut dec = FrameDecoder::new(max_frame);
    let mut out = vec![];
    let size = if chunk == 0 { data.len().max(1) } else { chunk };
    for piece in data.chunks(size) {
        let mut input = piece;
        loop {
            match dec.decode(&mut input) {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => {
                    assert!(input.is_empty(), "Ok(None) left {} bytes", input.len());
                    break;
                }
                Err(e) if e.is_fatal() => {
                    // Poisoned: any later call returns the same error.
                    assert_eq!(dec.decode(&mut &b"\0\0\0\x01\x80"[..]), Err(e.clone()));
                    if let DecodeError::FrameTooLarge { len, max } = e {
                        assert!(len > max && max == max_frame, "{e:?}");
                    }
                    out.push(Err(e));
                    return out;
                }
                Err(e) => out.push(Err(e)),
            }
        }
    }
    out
}

/// What the stream decoder must return for `data`, frame by frame: the
/// reference framing (length, body, `decode_body`), up to a fatal error or
/// the first incomplete frame.
fn reference_frames(data: &[u8], max_frame: usize) -> Vec<Decoded> {
    let mut out = vec![];
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        if len > max_frame {
            out.push(Err(DecodeError::FrameTooLarge {
                len,
                max: max_frame,
            }));
            return out;
        }
        if rest.len() - 4 < len {
            break;
        }
        let result = Message::decode_body(&rest[4..4 + len]);
        rest = &rest[4 + len..];
        let fatal = matches!(&result, Err(e) if e.is_fatal());
        out.push(result);
        if fatal {
            break;
        }
    }
    out
}

/// A decoded message encodes to one frame that decodes back to it, and the
/// error of a bad one maps to a protocol reason.
fn check_decoded(result: &Decoded) {
    match result {
        Ok(m) => {
            let frame = m.encode();
            assert_eq!(
                u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
                frame.len() - 4
            );
            assert_eq!(
                Message::decode_body(&frame[4..]).as_ref(),
                Ok(m),
                "re-encoded {m:?} as {frame:02x?}"
            );
        }
        Err(e) => {
            let reason = e.reason();
            assert!([
                "frame_too_large",
                "bad_frame",
                "unknown_type",
                "bad_message"
            ]
            .contains(&reason));
            assert_eq!(
                e.is_fatal(),
                matches!(reason, "frame_too_large" | "bad_frame")
            );
        }
    }
}

/// Control-stream decoding: `data` is both one frame body and a byte stream
/// of frames. Invariants: no panic; the decoder returns what framing by
/// hand and `decode_body` give, whole, byte by byte or in odd-sized chunks,
/// with the default limit and with a small one; every decoded message
/// round-trips through `encode`; a fatal error poisons the decoder.
pub fn frames(data: &[u8]) {
    check_decoded(&Message::decode_body(data));

    let max = macula_relay_proto::DEFAULT_MAX_FRAME;
    let whole = decode_stream(data, 0, max);
    assert_eq!(whole, reference_frames(data, max));
    whole.iter().for_each(check_decoded);
    for chunk in [1, 3, 7] {
        assert_eq!(decode_stream(data, chunk, max), whole, "chunks of {chunk}");
    }
    // A small limit: frames of 40 bytes pass, 41 are refused.
    assert_eq!(decode_stream(data, 5, 40), reference_frames(data, 40));
    session_handshake(data);
}

/// The e2e session handshake (`session_auth`) fed `data` as the peer's
/// frames. Invariants: no panic; a frame split off is at most `MAX_FRAME`;
/// decoded candidates re-encode to the same bytes; nothing the peer can
/// make without the cookie passes the confirmation.
fn session_handshake(data: &[u8]) {
    use macula_relay_proto::node::session_auth::{self, Role, SessionAuth};
    if let Ok(Some((body, rest))) = session_auth::take_frame(data) {
        assert!(body.len() <= session_auth::MAX_FRAME);
        assert_eq!(body.len() + rest.len() + 2, data.len());
    }
    if let Ok(addrs) = session_auth::decode_candidates(data) {
        assert_eq!(session_auth::encode_candidates(&addrs), data);
    }
    let tunnel = macula_relay_proto::TunnelId::from_bytes([3; 16]);
    let cookie = macula_relay_proto::node::cookie_pake::CookiePake::new(b"cookie");
    let mut me = SessionAuth::new(Role::Target, Some(&cookie), "a@h", "b@h", &tunnel, [9; 32]);
    let half = data.len() / 2;
    if me.on_pake(&data[..half]).is_ok() {
        assert!(me.check_confirmation(&data[half..]).is_err());
    }
}

// ---------------------------------------------------------------------------
// Data-plane header

/// Datagram classification. Invariants: no panic; the fixed bit alone makes
/// a QUIC packet; a session datagram is exactly 0x01, a 17-byte header and
/// at least one byte, and `header` rebuilds its first 17 bytes;
/// `clear_bind` zeroes the key and nothing else.
pub fn dataplane(data: &[u8]) {
    let class = classify(data);
    match class {
        Datagram::Quic => assert!(data[0] & 0x40 != 0),
        Datagram::Session { session, bind } => {
            assert_eq!(data[0], SESSION_DATAGRAM);
            assert!(data.len() > HEADER_LEN);
            assert_eq!(header(session, &bind)[..], data[..HEADER_LEN]);
        }
        Datagram::Invalid => {
            assert!(data.is_empty() || data[0] & 0x40 == 0);
            assert!(data.first() != Some(&SESSION_DATAGRAM) || data.len() <= HEADER_LEN);
        }
    }
    let mut cleared = data.to_vec();
    clear_bind(&mut cleared);
    if data.len() >= HEADER_LEN {
        assert_eq!(cleared[9..HEADER_LEN], NO_BIND);
        assert_eq!(cleared[..9], data[..9]);
        assert_eq!(cleared[HEADER_LEN..], data[HEADER_LEN..]);
    } else {
        assert_eq!(cleared, data);
    }
    let expected = match class {
        Datagram::Session { session, .. } => Datagram::Session {
            session,
            bind: NO_BIND,
        },
        other => other,
    };
    assert_eq!(classify(&cleared), expected);
    // As a probe (direct paths): only a datagram of the probe's length and
    // type names a session, and none made without the key moves anything.
    let session = macula_relay_proto::node::direct::probe_session(data);
    assert_eq!(
        session.is_some(),
        data.len() == macula_relay_proto::node::direct::PROBE_LEN
            && data[0] == macula_relay_proto::node::direct::PROBE_DATAGRAM
    );
    let now = Instant::now();
    let from = std::net::SocketAddr::from(([10, 0, 0, 1], 4000));
    for requester in [true, false] {
        let mut path = macula_relay_proto::node::direct::DirectPath::new(
            session.unwrap_or(7),
            b"the session's exported secret",
            requester,
            now,
        );
        assert_eq!(path.on_datagram(from, data, now), (None, None));
        assert_eq!(path.direct(), None);
    }
    if data.len() >= 16 {
        let t = TunnelId::from_bytes(data[..16].try_into().unwrap());
        assert_eq!(
            session_id(&t),
            u64::from_be_bytes(data[..8].try_into().unwrap())
        );
    }
}

// ---------------------------------------------------------------------------
// Relay sessions

/// Test addresses (documentation ranges; nothing is sent anywhere).
fn test_addr(b: u8) -> SocketAddr {
    let i = b % 8;
    if i < 5 {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)), 4000 + i as u16)
    } else {
        let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16);
        // Same port as a v4 one: only the family tells them apart.
        SocketAddr::new(IpAddr::V6(ip), 4000 + (i % 3) as u16)
    }
}

/// A small pool of tunnel ids, some sharing their first 8 bytes (one
/// session id, two tunnels), or any id.
fn test_tunnel(input: &mut Input) -> TunnelId {
    let b = input.u8();
    if b & 0x80 != 0 {
        return TunnelId::from_bytes(input.array());
    }
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&((((b & 3) as u64) << 56) | (b & 3) as u64).to_be_bytes());
    id[15] = (b >> 2) & 1;
    TunnelId::from_bytes(id)
}

/// What the relay must do, as a plain model.
struct ModelSession {
    tunnel: TunnelId,
    keys: [BindKey; 2],
    addrs: [SocketAddr; 2],
    datagrams: [u64; 2],
    bytes: [u64; 2],
}

/// Passes one bind key through the control plane as the relay sends it
/// (`tun_ok` to the requester, `tun_notify` to the target) and returns what
/// the node decodes: the bind exchange.
fn exchange(tunnel: TunnelId, bind: BindKey, side: usize) -> BindKey {
    let msg = if side == 0 {
        Message::TunnelOk {
            tunnel,
            bind: Some(bind),
            path_mtu: Some(1472),
        }
    } else {
        Message::TunnelNotify {
            tunnel,
            source: "a@h".into(),
            bind: Some(bind),
            path_mtu: Some(1472),
        }
    };
    let frame = msg.encode();
    let mut dec = FrameDecoder::default();
    let got = dec.decode(&mut frame.as_slice()).unwrap().unwrap();
    assert_eq!(got, msg);
    match got {
        Message::TunnelOk { bind: Some(b), .. } | Message::TunnelNotify { bind: Some(b), .. } => b,
        other => panic!("bind lost in {other:?}"),
    }
}

/// Sends one datagram from `from` through the relay's path (classify, route,
/// clear the key) and checks the verdict against the model.
fn relay_datagram(
    table: &mut SessionTable,
    model: &mut HashMap<SessionId, ModelSession>,
    datagram: &[u8],
    from: SocketAddr,
) {
    let Datagram::Session { session, bind } = classify(datagram) else {
        return;
    };
    let len = datagram.len();
    let verdict = table.route(session, &bind, from, len);
    let Some(m) = model.get_mut(&session) else {
        assert_eq!(verdict, Verdict::Drop(DropReason::UnknownSession));
        return;
    };
    let me = m.keys.iter().position(|k| *k == bind);
    match (verdict, me) {
        // A side's key from elsewhere: dropped, and the side stays put.
        (Verdict::Drop(DropReason::Unbound), Some(me)) => {
            assert_ne!(m.addrs[me], from, "dropped from the side's own address");
        }
        (Verdict::Forward { to }, Some(me)) => {
            // Forwarded only with a side's key, from that side's address,
            // to the other side's address.
            assert_eq!(from, m.addrs[me], "forwarded from an unbound address");
            assert_eq!(to, m.addrs[1 - me], "forwarded to the wrong address");
            m.datagrams[me] += 1;
            m.bytes[me] += len as u64;
            let mut out = datagram.to_vec();
            clear_bind(&mut out);
            assert_eq!(
                classify(&out),
                Datagram::Session {
                    session,
                    bind: NO_BIND
                }
            );
            assert_eq!(out[HEADER_LEN..], datagram[HEADER_LEN..]);
        }
        (Verdict::Drop(DropReason::BadBind), None) => {}
        (v, me) => panic!("verdict {v:?} for a datagram with key of side {me:?}"),
    }
}

fn check_table(table: &SessionTable, model: &HashMap<SessionId, ModelSession>) {
    assert_eq!(table.len(), model.len());
    assert_eq!(table.is_empty(), model.is_empty());
    for (id, m) in model {
        assert_eq!(session_id(&m.tunnel), *id);
        let s = table
            .get(&m.tunnel)
            .expect("an open session is in the table");
        assert_eq!(s.tunnel, m.tunnel);
        for i in 0..2 {
            assert_eq!(s.sides[i].bind, m.keys[i]);
            assert_eq!(s.sides[i].addr, m.addrs[i]);
            assert_eq!(s.sides[i].datagrams, m.datagrams[i]);
            assert_eq!(s.sides[i].bytes, m.bytes[i]);
        }
        // Another tunnel of the same session id is not this session.
        let mut other = *m.tunnel.as_bytes();
        other[15] ^= 0x80;
        assert!(table.get(&TunnelId::from_bytes(other)).is_none());
    }
}

/// Side names in claims (`sess_keep`).
const SIDE_NAMES: [&str; 2] = ["a@h", "b@h"];

/// A key as a claim may carry it: a side's own, or one bit off.
fn claim_key(input: &mut Input, keys: &[BindKey; 2]) -> (usize, BindKey, bool) {
    let pick = input.u8();
    let side = (pick & 1) as usize;
    let mut key = keys[side];
    let flipped = pick & 0x80 != 0;
    if flipped {
        let bit = input.u8();
        key[(bit as usize / 8) % 8] ^= 1 << (bit % 8);
    }
    (side, key, flipped)
}

/// `name`, as side `side` (naming the other side as its peer), claims
/// `tunnel` with `key` from `from`; every node counts as connected.
#[allow(clippy::too_many_arguments)]
fn claim(
    claims: &mut Claims,
    table: &SessionTable,
    tunnel: TunnelId,
    key: BindKey,
    from: SocketAddr,
    name: &str,
    side: usize,
    now: Instant,
) -> Kept {
    claims.keep(
        table,
        Claim {
            tunnel,
            bind: key,
            addr: from,
            name,
            peer: SIDE_NAMES[1 - side],
        },
        now,
        &|_| true,
    )
}

/// A side of a live session claims it back (`sess_keep`) from its (new)
/// relay connection's address: with its key the table names its side, and
/// the relay moves it there (as the relay's glue does after checking the
/// claimant's name); with any other key it is refused.
fn claim_live(
    input: &mut Input,
    claims: &mut Claims,
    table: &mut SessionTable,
    m: &mut ModelSession,
    now: Instant,
) {
    let (side, key, flipped) = claim_key(input, &m.keys);
    let from = test_addr(input.u8());
    let name = SIDE_NAMES[side];
    let kept = claim(claims, table, m.tunnel, key, from, name, side, now);
    if flipped {
        assert_eq!(
            kept,
            Kept::Refused(KeepRefusal::NotASide),
            "a claim with a wrong key"
        );
    } else {
        assert_eq!(kept, Kept::Live { side });
        table.rebind_side(&m.tunnel, side, from);
        m.addrs[side] = from;
    }
}

/// A session is closed because a side left, remembered, and claimed back
/// by claims from the input (right or wrong key, right or wrong name): it
/// is live again exactly when each side has claimed it or stayed, with its
/// own keys, at the claimed addresses, and a wrong claim changes nothing.
fn close_and_claim(
    input: &mut Input,
    claims: &mut Claims,
    table: &mut SessionTable,
    mut m: ModelSession,
    now: Instant,
) -> Option<ModelSession> {
    let session = table.close(&m.tunnel).expect("a live session closes");
    let stayed = [input.u8() & 1 == 1, false];
    let names = SIDE_NAMES.map(String::from);
    assert!(claims.remember(&session, names, stayed, now));
    let mut claimed = [false; 2];
    for _ in 0..3 {
        let (side, key, flipped) = claim_key(input, &m.keys);
        let wrong_name = input.u8() & 0x40 != 0;
        let name = if wrong_name { "m@h" } else { SIDE_NAMES[side] };
        let from = test_addr(input.u8());
        let kept = claim(claims, table, m.tunnel, key, from, name, side, now);
        if flipped || wrong_name {
            assert!(matches!(kept, Kept::Refused(_)), "a wrong claim: {kept:?}");
            continue;
        }
        claimed[side] = true;
        m.addrs[side] = from;
        if (0..2).all(|i| claimed[i] || stayed[i]) {
            let Kept::Paired(sides) = kept else {
                panic!("both sides claimed, got {kept:?}");
            };
            let [(a, ka, aa), (b, kb, ba)] = *sides;
            assert_eq!([a.as_str(), b.as_str()], SIDE_NAMES);
            assert_eq!([ka, kb], m.keys);
            assert_eq!([aa, ba], m.addrs);
            table
                .restore(m.tunnel, [(ka, aa), (kb, ba)])
                .expect("its id is free");
            m.datagrams = [0; 2];
            m.bytes = [0; 2];
            return Some(m);
        }
        assert_eq!(kept, Kept::Waiting);
    }
    None
}

/// The relay's session table fed arbitrary operations: open (with the bind
/// exchange of both keys through `tun_ok`/`tun_notify`), close, datagrams
/// with a side's key (maybe one bit off, maybe of another or a closed
/// session), with any session id and key, or as raw bytes, from any
/// address, and claims (`sess_keep`) of live and of closed sessions.
/// Invariants: no panic; a datagram is forwarded only when its key is a
/// side's key and it comes from that side's bound address, always to the
/// other side's address; a datagram never moves a side (only a claim of
/// the side's own node does); everything else is dropped for the right
/// reason; only a side's own key and name claim a session back; the table
/// matches the model after every step.
pub fn sessions(data: &[u8]) {
    let mut input = Input::new(data);
    let mut table = SessionTable::default();
    let mut claims = Claims::default();
    let mut model: HashMap<SessionId, ModelSession> = HashMap::new();
    // Every session ever opened, closed ones too: (session id, keys).
    let mut opened: Vec<(SessionId, [BindKey; 2])> = vec![];
    let mut steps = 0;
    let now = Instant::now();
    while !input.done() && steps < 4096 {
        steps += 1;
        match input.u8() % 8 {
            0 => {
                let tunnel = test_tunnel(&mut input);
                let (a, b) = (test_addr(input.u8()), test_addr(input.u8()));
                let id = session_id(&tunnel);
                match table.open(tunnel, a, b) {
                    Ok(keys) => {
                        assert!(!model.contains_key(&id), "two sessions of one id");
                        let keys = [exchange(tunnel, keys[0], 0), exchange(tunnel, keys[1], 1)];
                        opened.push((id, keys));
                        model.insert(
                            id,
                            ModelSession {
                                tunnel,
                                keys,
                                addrs: [a, b],
                                datagrams: [0; 2],
                                bytes: [0; 2],
                            },
                        );
                    }
                    Err(SessionIdTaken) => assert!(model.contains_key(&id)),
                }
            }
            1 => {
                let tunnel = test_tunnel(&mut input);
                let id = session_id(&tunnel);
                let closed = table.close(&tunnel);
                let owned = model.get(&id).is_some_and(|m| m.tunnel == tunnel);
                assert_eq!(closed.is_some(), owned);
                if let Some(s) = closed {
                    let m = model.remove(&id).unwrap();
                    assert_eq!(s.tunnel, m.tunnel);
                    assert_eq!([s.sides[0].bind, s.sides[1].bind], m.keys);
                }
            }
            2 | 3 if !opened.is_empty() => {
                // A datagram of a known session with one side's key.
                let (id, keys) = opened[input.u8() as usize % opened.len()];
                let side = input.u8();
                let mut key = keys[(side & 1) as usize];
                if side & 0x80 != 0 {
                    let bit = input.u8();
                    key[(bit as usize / 8) % 8] ^= 1 << (bit % 8);
                }
                let id = if side & 0x40 != 0 { id ^ 1 } else { id };
                let from = test_addr(input.u8());
                let mut datagram = header(id, &key).to_vec();
                datagram.extend_from_slice(input.bytes(64));
                relay_datagram(&mut table, &mut model, &datagram, from);
            }
            4 => {
                // Any header: session id and key from the input.
                let id = if input.u8() & 1 == 0 {
                    input.u64()
                } else {
                    session_id(&test_tunnel(&mut input))
                };
                let key: BindKey = input.array();
                let from = test_addr(input.u8());
                let mut datagram = header(id, &key).to_vec();
                datagram.push(0x40);
                relay_datagram(&mut table, &mut model, &datagram, from);
            }
            6 | 7 if !opened.is_empty() => {
                let (id, _) = opened[input.u8() as usize % opened.len()];
                if let Some(m) = model.get_mut(&id) {
                    if input.u8() & 1 == 0 {
                        claim_live(&mut input, &mut claims, &mut table, m, now);
                    } else {
                        let m = model.remove(&id).expect("just found");
                        if let Some(m) =
                            close_and_claim(&mut input, &mut claims, &mut table, m, now)
                        {
                            model.insert(id, m);
                        }
                    }
                }
            }
            _ => {
                // Raw bytes, as they come off the socket.
                let from = test_addr(input.u8());
                let raw = input.bytes(80);
                relay_datagram(&mut table, &mut model, raw, from);
            }
        }
        check_table(&table, &model);
    }
}

// ---------------------------------------------------------------------------
// Node paths

struct PathsModel {
    routes: HashMap<SocketAddr, Route>,
    inbound: HashMap<(SocketAddr, SessionId), SocketAddr>,
    early: Vec<(SocketAddr, SessionId, Vec<u8>, Instant)>,
    /// Every virtual address ever handed out, in order.
    handed: Vec<SocketAddr>,
}

fn path_session(input: &mut Input) -> SessionId {
    let b = input.u8();
    if b & 0x80 != 0 {
        input.u64()
    } else {
        (b % 6) as SessionId
    }
}

fn check_paths(p: &Paths, m: &PathsModel, ipv6: bool) {
    assert!(p.held_count() <= MAX_EARLY, "{} held", p.held_count());
    assert_eq!(p.held_count(), m.early.len());
    assert_eq!(p.len(), m.routes.len());
    assert_eq!(p.is_empty(), m.routes.is_empty());
    assert_eq!(m.routes.len(), m.inbound.len());
    for (vaddr, route) in &m.routes {
        assert_eq!(p.route(vaddr), Some(route));
        // route and inbound agree both ways.
        assert_eq!(p.inbound(route.relay, route.session), Some(*vaddr));
        assert!(is_virtual(vaddr));
        assert_eq!(vaddr.is_ipv6(), ipv6);
    }
    for relay in 0..8 {
        for session in 0..6 {
            let relay = test_addr(relay);
            let v = p.inbound(relay, session);
            assert_eq!(v, m.inbound.get(&(relay, session)).copied());
            if let Some(v) = v {
                let r = p.route(&v).expect("an inbound address has a route");
                assert_eq!((r.relay, r.session), (relay, session));
            }
        }
    }
    for relay in 0..8 {
        assert!(!is_virtual(&test_addr(relay)));
    }
}

/// The node's paths fed arbitrary add, remove, hold and time steps.
/// Invariants: no panic; at most MAX_EARLY datagrams held; route and
/// inbound agree both ways; a session added again keeps its address, a new
/// one gets an address never handed out before; held datagrams are handed
/// to their session once, in order; stale ones make room; everything
/// matches the model after every step.
pub fn paths(data: &[u8]) {
    let mut input = Input::new(data);
    let ipv6 = input.u8() & 1 == 1;
    let mut p = Paths::new(ipv6);
    let mut m = PathsModel {
        routes: HashMap::new(),
        inbound: HashMap::new(),
        early: vec![],
        handed: vec![],
    };
    let start = Instant::now();
    let mut now = start;
    let mut steps = 0;
    while !input.done() && steps < 4096 {
        steps += 1;
        match input.u8() % 6 {
            0 => {
                let route = Route {
                    relay: test_addr(input.u8()),
                    session: path_session(&mut input),
                    bind: input.array(),
                };
                let key = (route.relay, route.session);
                let (vaddr, held) = p.add(route);
                assert!(is_virtual(&vaddr) && vaddr.is_ipv6() == ipv6);
                match m.inbound.get(&key) {
                    Some(v) => assert_eq!(vaddr, *v, "a session re-added moved"),
                    None => {
                        assert!(!m.handed.contains(&vaddr), "{vaddr} handed out twice");
                        m.handed.push(vaddr);
                    }
                }
                m.routes.insert(vaddr, route);
                m.inbound.insert(key, vaddr);
                let mut expected = vec![];
                m.early.retain(|(r, s, d, _)| {
                    if (*r, *s) == key {
                        expected.push(d.clone());
                        false
                    } else {
                        true
                    }
                });
                assert_eq!(held, expected);
            }
            1 => {
                let b = input.u8();
                let vaddr = if b & 0x80 == 0 && !m.handed.is_empty() {
                    m.handed[b as usize % m.handed.len()]
                } else {
                    test_addr(b)
                };
                let removed = p.remove(&vaddr);
                let expected = m.routes.remove(&vaddr);
                assert_eq!(removed, expected);
                if let Some(r) = expected {
                    assert_eq!(m.inbound.remove(&(r.relay, r.session)), Some(vaddr));
                }
                assert_eq!(p.route(&vaddr), None);
            }
            2 | 3 => {
                let relay = test_addr(input.u8());
                let session = path_session(&mut input);
                let inner = input.bytes(32).to_vec();
                let count = match input.u8() {
                    n @ 0..=250 => 1 + n as usize % 4,
                    // A burst: reach the cap in a few steps.
                    _ => MAX_EARLY / 2 + 3,
                };
                for _ in 0..count {
                    let ok = p.hold(relay, session, &inner, now);
                    m.early
                        .retain(|(_, _, _, at)| now.saturating_duration_since(*at) < EARLY_WAIT);
                    let room = m.early.len() < MAX_EARLY;
                    assert_eq!(ok, room, "hold with {} held", m.early.len());
                    if room {
                        m.early.push((relay, session, inner.clone(), now));
                    }
                    assert!(p.held_count() <= MAX_EARLY);
                }
            }
            4 => now += Duration::from_millis(input.u16() as u64),
            _ => now += EARLY_WAIT * (1 + input.u8() as u32 % 2),
        }
        check_paths(&p, &m, ipv6);
    }
}

/// Seed inputs for each target, as (target, file name, bytes): valid frames
/// of every message type, valid and invalid datagram headers, and operation
/// sequences that open sessions and route with both keys.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = vec![];
    let tunnel = TunnelId::from_bytes(*b"\x01\x23\x45\x67\x89\xab\xcd\xef0123456\x07");
    let messages = [
        Message::Identify {
            node: "a@host".into(),
            token: None,
            version: None,
        },
        Message::Identify {
            node: "a@host".into(),
            token: Some("secret".into()),
            version: Some(2),
        },
        Message::Identified { version: None },
        Message::Identified { version: Some(2) },
        Message::IdentifyRefused {
            reason: "bad_token".into(),
        },
        Message::TunnelRequest {
            target: "b@host".into(),
            mode: macula_relay_proto::Mode::Stream,
        },
        Message::TunnelRequest {
            target: "b@host".into(),
            mode: macula_relay_proto::Mode::E2e,
        },
        Message::TunnelOk {
            tunnel,
            bind: None,
            path_mtu: None,
        },
        Message::TunnelOk {
            tunnel,
            bind: Some([1, 2, 3, 4, 5, 6, 7, 0xff]),
            path_mtu: Some(1472),
        },
        Message::TunnelError {
            reason: "mode_unsupported".into(),
        },
        Message::TunnelNotify {
            tunnel,
            source: "a@host".into(),
            bind: None,
            path_mtu: None,
        },
        Message::TunnelNotify {
            tunnel,
            source: "a@host".into(),
            bind: Some([9; 8]),
            path_mtu: None,
        },
        Message::TunnelClose { tunnel },
        Message::ProtocolError {
            reason: "unknown_type".into(),
        },
    ];
    let mut all = vec![];
    for (i, m) in messages.iter().enumerate() {
        let frame = m.encode();
        all.extend_from_slice(&frame);
        out.push((
            "frames",
            format!("{i:02}-{}", m.type_name().replace('_', "-")),
            frame,
        ));
    }
    out.push(("frames", "all".into(), all));
    // A frame body alone (decode_body sees the whole input).
    out.push((
        "frames",
        "body-id-ok".into(),
        Message::Identified { version: Some(2) }.encode()[4..].to_vec(),
    ));
    // Binary keys and values, an unknown type, a bad tunnel id, a fatal one.
    let frame = |body: &[u8]| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    out.push((
        "frames",
        "binary-keys".into(),
        frame(b"\x82\xc4\x01t\xc4\x05id_ok\xa1v\x02"),
    ));
    out.push(("frames", "unknown-type".into(), frame(b"\x81\xa1t\xa2no")));
    out.push((
        "frames",
        "bad-tid".into(),
        frame(b"\x82\xa1t\xa9tun_close\xa3tid\xa1X"),
    ));
    out.push((
        "frames",
        "e2e-bad-bind".into(),
        frame(b"\x84\xa1t\xa6tun_ok\xa3tid\xd9\x200123456789abcdef0123456789abcdef\xa4mode\xa3e2e\xa4bind\xa4zzzz"),
    ));
    out.push(("frames", "too-large".into(), vec![0, 1, 0, 1, 0x80]));
    // Bodies of 40 and 41 bytes (the small limit the harness also tries).
    let refused = |n: usize| {
        Message::IdentifyRefused {
            reason: "r".repeat(n),
        }
        .encode()
    };
    assert_eq!((refused(27).len(), refused(28).len()), (44, 45));
    out.push((
        "frames",
        "limit".into(),
        [refused(27), refused(28)].concat(),
    ));
    out.push((
        "frames",
        "garbage".into(),
        vec![0, 0, 0, 3, 0xc1, 0xc1, 0xc1],
    ));

    let inner = b"\x40quic".to_vec();
    let sid = session_id(&tunnel);
    let mut d = header(sid, &[7; 8]).to_vec();
    d.extend_from_slice(&inner);
    out.push(("dataplane", "session".into(), d));
    out.push((
        "dataplane",
        "header-only".into(),
        header(sid, &[7; 8]).to_vec(),
    ));
    out.push(("dataplane", "quic-long".into(), vec![0xc0, 0, 0, 0, 1, 8]));
    out.push(("dataplane", "quic-short".into(), vec![0x41, 1, 2, 3]));
    out.push(("dataplane", "unknown-first-byte".into(), vec![0x02; 20]));
    out.push(("dataplane", "short".into(), vec![SESSION_DATAGRAM, 1, 2]));
    out.push(("dataplane", "empty".into(), vec![]));

    // sessions: open tunnel 0 (192.0.2.1 → 192.0.2.2), route both ways,
    // rebind the requester, a forged key, close.
    out.push((
        "sessions",
        "open-route-close".into(),
        vec![
            0, 0, 1, 2, // open tunnel 0: requester addr 1, target addr 2
            2, 0, 0, 1, 3, b'a', b'b', b'c', // session 0, side 0, from 1
            2, 0, 1, 2, 2, b'x', b'y', // side 1, from 2
            3, 0, 0, 6, 1, b'z', // side 0 from a new address: rebound
            3, 0, 0x80, 9, 1, 1, b'z', // side 0's key, one bit off
            0, 4, 3, 4, // tunnel of the same session id: taken
            1, 4, // close the other tunnel: nothing
            1, 0, // close
            2, 0, 1, 2, 1, b'q', // closed: unknown session
        ],
    ));
    out.push((
        "sessions",
        "two-sessions".into(),
        vec![
            0, 0, 1, 2, 0, 1, 3, 5, 2, 0, 0, 1, 1, 1, 2, 1, 1, 5, 1, 2, 2, 0x40, 3, 1, 1, 4, 0, 1,
            2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 1, 5, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40,
        ],
    ));

    // paths: v4 and v6; hold, add (hands them over), remove, stale, burst.
    for (name, family) in [("v4", 0u8), ("v6", 1u8)] {
        out.push((
            "paths",
            format!("hold-add-remove-{name}"),
            vec![
                family, 2, 1, 3, 3, b'a', b'b', b'c', 0, // hold for (relay 1, session 3)
                0, 1, 3, 1, 2, 3, 4, 5, 6, 7, 8, // add it
                0, 1, 3, 9, 9, 9, 9, 9, 9, 9, 9, // add again: same address
                1, 0, // remove the first handed out
                1, 0x81, // remove a real address: nothing
                3, 2, 4, 1, b'x', 255, // a burst
                3, 2, 5, 1, b'w', 255, // another: the cap is reached
                4, 0x07, 0xd0, // 2 s later
                2, 2, 4, 1, b'y', 255, // stale ones made room
                5, 1, 0, 2, 4, 8, 1, 2, 3, 4, 5, 6, 7, 8,
            ],
        ));
    }
    out
}
