//! Which QUIC stream a distribution packet travels on, read from its
//! distribution header and control message: an e2e session gives each
//! sending process a lane (one of [`LANES`] streams, chosen from its pid),
//! so one process's bulk transfer never holds up another's messages.
//!
//! OTP only promises order between a pair of processes, once the carrier
//! rejects the strict-order flags (`dist_util:strict_order_flags/0`, the
//! atom cache) in the handshake: everything a process sends stays on its
//! lane, so that order is kept.
//!
//! - Ticks (empty packets) go on the control stream ([`Route::Control`]).
//! - A packet whose sending process is named by pid goes on that pid's lane
//!   ([`Route::Lane`]); `SPAWN_REPLY` on the new process's lane, since the
//!   new process's own signals follow it.
//! - The fragments after a message's first follow its first.
//! - Anything else (no sender, a sender named by a registered name as in a
//!   `DOWN` of a name monitor, or a packet this parser does not know)
//!   must come after everything sent before it: [`Route::Fence`]. The
//!   carrier sends a barrier down every lane and the packet on the control
//!   stream; the receiver delivers it once every lane reached the barrier.
//!
//! Formats: the distribution header of OTP's `erl_dist_protocol`
//! (normal `D`, first fragment `E`, fragment `F`, pass-through 112), and
//! the external term format of the control message.

use std::collections::HashMap;

/// Lanes (QUIC streams) a session spreads its senders over. Two busy
/// senders share a lane (and its order) with odds of one in this many;
/// 16 (as erlang_quic's `quic_dist`) gave a pinger the bulk sender's lane
/// in about one benchmark run in ten.
pub const LANES: usize = 64;
/// Fragmented messages in progress this router remembers; more fragments
/// than this at once (the VM never has that many) go behind a fence.
const MAX_OPEN_FRAGMENTED: usize = 4096;

/// Where one packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// The control stream, in order with what went there before: ticks, and
    /// the later fragments of a fenced message.
    Control,
    /// One of the [`LANES`] lanes.
    Lane(usize),
    /// The control stream, behind a barrier on every lane.
    Fence,
}

/// Routes the packets of one connection, in the order the VM gave them.
#[derive(Debug, Default)]
pub struct DistRouter {
    /// Fragmented messages whose later fragments are still to come: their
    /// sequence id and where the first went.
    fragmented: HashMap<u64, Route>,
}

/// Why a packet could not be read (it then goes behind a fence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unreadable;

type Parse<T> = Result<T, Unreadable>;

impl DistRouter {
    /// A router with no fragmented message in progress.
    pub fn new() -> DistRouter {
        DistRouter::default()
    }

    /// Where `packet` (one packet of the 4-byte-framed data phase, without
    /// its length) goes.
    pub fn route(&mut self, packet: &[u8]) -> Route {
        if packet.is_empty() {
            return Route::Control;
        }
        match packet {
            [131, b'F', rest @ ..] => self.later_fragment(rest),
            [131, b'E', rest @ ..] => self.first_fragment(rest),
            [131, b'D', rest @ ..] => route_of(cached_control(rest)),
            [112, rest @ ..] => route_of(pass_through_control(rest)),
            _ => Route::Fence,
        }
    }

    fn first_fragment(&mut self, rest: &[u8]) -> Route {
        let mut r = Reader(rest);
        let Ok((seq, fragment)) = r.u64().and_then(|s| Ok((s, r.u64()?))) else {
            return Route::Fence;
        };
        let route = route_of(cached_control(r.0));
        if fragment > 1 {
            if self.fragmented.len() >= MAX_OPEN_FRAGMENTED {
                return Route::Fence;
            }
            // Its later fragments follow on the control stream when it is
            // fenced: they must not pass it, and need no fence of their own.
            let later = if route == Route::Fence {
                Route::Control
            } else {
                route
            };
            self.fragmented.insert(seq, later);
        }
        route
    }

    fn later_fragment(&mut self, rest: &[u8]) -> Route {
        let mut r = Reader(rest);
        let Ok((seq, fragment)) = r.u64().and_then(|s| Ok((s, r.u64()?))) else {
            return Route::Fence;
        };
        let route = if fragment <= 1 {
            self.fragmented.remove(&seq)
        } else {
            self.fragmented.get(&seq).copied()
        };
        route.unwrap_or(Route::Fence)
    }
}

fn route_of(sender: Parse<Option<u64>>) -> Route {
    match sender {
        Ok(Some(key)) => Route::Lane(lane_of(key)),
        _ => Route::Fence,
    }
}

/// A lane from a pid's key: mixed (splitmix64) so that consecutive pids
/// spread over the lanes.
pub fn lane_of(key: u64) -> usize {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % LANES as u64) as usize
}

/// The lane of a pid, given as `term_to_binary` output (with its version
/// byte): what [`DistRouter::route`] picks for that pid's packets.
pub fn lane_of_pid(term: &[u8]) -> Option<usize> {
    let mut r = Reader(term.strip_prefix(&[131]).unwrap_or(term));
    pid_key(&mut r).ok().flatten().map(lane_of)
}

/// The sender key of a `D`/`E` packet's control message, after its atom
/// cache header.
fn cached_control(rest: &[u8]) -> Parse<Option<u64>> {
    let mut r = Reader(rest);
    skip_atom_cache_refs(&mut r)?;
    sender_of_control(&mut r)
}

/// Pass-through (no atom cache): the control message is an external term,
/// with its version byte.
fn pass_through_control(rest: &[u8]) -> Parse<Option<u64>> {
    let mut r = Reader(rest);
    if r.peek()? == 131 {
        r.u8()?;
    }
    sender_of_control(&mut r)
}

/// `NumberOfAtomCacheRefs`, then flags (four bits a ref and four for the
/// whole), then each ref: its index and, when new, the atom's text.
fn skip_atom_cache_refs(r: &mut Reader) -> Parse<()> {
    let refs = r.u8()? as usize;
    if refs == 0 {
        return Ok(());
    }
    let flags = r.take(refs / 2 + 1)?;
    let nibble = |i: usize| (flags[i / 2] >> (4 * (i % 2))) & 0x0f;
    let long_atoms = nibble(refs) & 0x01 != 0;
    for i in 0..refs {
        r.u8()?;
        if nibble(i) & 0x08 != 0 {
            let len = if long_atoms {
                r.u16()? as usize
            } else {
                r.u8()? as usize
            };
            r.take(len)?;
        }
    }
    Ok(())
}

/// The control message is a tuple `{Op, ...}`; which element names the
/// sending process depends on `Op` (OTP's `erl_dist_protocol`).
fn sender_of_control(r: &mut Reader) -> Parse<Option<u64>> {
    let arity = match r.u8()? {
        SMALL_TUPLE => r.u8()? as usize,
        LARGE_TUPLE => r.u32()? as usize,
        _ => return Err(Unreadable),
    };
    let op = match r.u8()? {
        SMALL_INTEGER => u32::from(r.u8()?),
        INTEGER => r.u32()?,
        _ => return Err(Unreadable),
    };
    let position = match op {
        // LINK, EXIT, UNLINK, REG_SEND, GROUP_LEADER, EXIT2, EXIT_TT,
        // REG_SEND_TT, EXIT2_TT, MONITOR_P, DEMONITOR_P, MONITOR_P_EXIT,
        // SEND_SENDER(_TT), PAYLOAD_EXIT(_TT), PAYLOAD_EXIT2(_TT),
        // PAYLOAD_MONITOR_P_EXIT, ALIAS_SEND(_TT).
        1 | 3 | 4 | 6 | 7 | 8 | 13 | 16 | 18..=28 | 33 | 34 => 1,
        // SPAWN_REQUEST(_TT) {Op, ReqId, From, ...}; UNLINK_ID(_ACK)
        // {Op, Id, From, To}; ALTACT_SIG_SEND {Op, Flags, From, To[, Token]}
        // (OTP 28 on: priority messages, signals through an alias).
        29 | 30 | 35 | 36 | 37 => 2,
        // SPAWN_REPLY(_TT) {Op, ReqId, To, Flags, Result}: the new process.
        31 | 32 => 4,
        // SEND, SEND_TT (no sender), NODE_LINK, and anything newer.
        _ => return Ok(None),
    };
    if position >= arity {
        return Err(Unreadable);
    }
    for _ in 1..position {
        skip_term(r, 0)?;
    }
    pid_key(r)
}

/// A pid's key (its number, serial and creation), or `None` for any other
/// term (a registered name, an error).
fn pid_key(r: &mut Reader) -> Parse<Option<u64>> {
    let tag = r.u8()?;
    if tag != NEW_PID && tag != PID {
        return Ok(None);
    }
    skip_atom(r)?;
    let id = u64::from(r.u32()?);
    let serial = u64::from(r.u32()?);
    let creation = if tag == NEW_PID {
        u64::from(r.u32()?)
    } else {
        u64::from(r.u8()?)
    };
    Ok(Some((id | serial << 32) ^ creation.rotate_left(17)))
}

const NEW_FLOAT: u8 = 70;
const BIT_BINARY: u8 = 77;
const ATOM_CACHE_REF: u8 = 82;
const NEW_PID: u8 = 88;
const NEW_PORT: u8 = 89;
const NEWER_REFERENCE: u8 = 90;
const SMALL_INTEGER: u8 = 97;
const INTEGER: u8 = 98;
const FLOAT: u8 = 99;
const ATOM: u8 = 100;
const REFERENCE: u8 = 101;
const PORT: u8 = 102;
const PID: u8 = 103;
const SMALL_TUPLE: u8 = 104;
const LARGE_TUPLE: u8 = 105;
const NIL: u8 = 106;
const STRING: u8 = 107;
const LIST: u8 = 108;
const BINARY: u8 = 109;
const SMALL_BIG: u8 = 110;
const LARGE_BIG: u8 = 111;
const NEW_FUN: u8 = 112;
const EXPORT: u8 = 113;
const NEW_REFERENCE: u8 = 114;
const SMALL_ATOM: u8 = 115;
const MAP: u8 = 116;
const ATOM_UTF8: u8 = 118;
const SMALL_ATOM_UTF8: u8 = 119;
const V4_PORT: u8 = 120;

/// Nesting past this is not a control message element.
const MAX_DEPTH: usize = 16;

fn skip_atom(r: &mut Reader) -> Parse<()> {
    match r.u8()? {
        ATOM | ATOM_UTF8 => {
            let len = r.u16()? as usize;
            r.take(len).map(drop)
        }
        SMALL_ATOM | SMALL_ATOM_UTF8 => {
            let len = r.u8()? as usize;
            r.take(len).map(drop)
        }
        ATOM_CACHE_REF => r.u8().map(drop),
        _ => Err(Unreadable),
    }
}

/// Skips one term of the kinds control messages hold before their sender
/// (integers, references, pids, atoms, and small containers of them).
fn skip_term(r: &mut Reader, depth: usize) -> Parse<()> {
    if depth > MAX_DEPTH {
        return Err(Unreadable);
    }
    let len = |r: &mut Reader, n: usize| r.take(n).map(drop);
    match r.u8()? {
        SMALL_INTEGER => len(r, 1),
        INTEGER => len(r, 4),
        NEW_FLOAT => len(r, 8),
        FLOAT => len(r, 31),
        ATOM | ATOM_UTF8 => {
            let n = r.u16()? as usize;
            len(r, n)
        }
        SMALL_ATOM | SMALL_ATOM_UTF8 => {
            let n = r.u8()? as usize;
            len(r, n)
        }
        ATOM_CACHE_REF => len(r, 1),
        NIL => Ok(()),
        SMALL_BIG => {
            let n = r.u8()? as usize;
            len(r, n + 1)
        }
        LARGE_BIG => {
            let n = r.u32()? as usize;
            len(r, n.checked_add(1).ok_or(Unreadable)?)
        }
        STRING => {
            let n = r.u16()? as usize;
            len(r, n)
        }
        BINARY => {
            let n = r.u32()? as usize;
            len(r, n)
        }
        BIT_BINARY => {
            let n = r.u32()? as usize;
            len(r, n.checked_add(1).ok_or(Unreadable)?)
        }
        NEW_PID => skip_atom(r).and_then(|()| len(r, 12)),
        PID => skip_atom(r).and_then(|()| len(r, 9)),
        NEW_PORT => skip_atom(r).and_then(|()| len(r, 8)),
        PORT => skip_atom(r).and_then(|()| len(r, 5)),
        V4_PORT => skip_atom(r).and_then(|()| len(r, 12)),
        REFERENCE => skip_atom(r).and_then(|()| len(r, 5)),
        // Len:16, node, creation (1 byte, or 4 when newer), Len words.
        tag @ (NEW_REFERENCE | NEWER_REFERENCE) => {
            let words = r.u16()? as usize;
            skip_atom(r)?;
            let creation = if tag == NEW_REFERENCE { 1 } else { 4 };
            len(r, creation + 4 * words)
        }
        SMALL_TUPLE => {
            let n = r.u8()? as usize;
            (0..n).try_for_each(|_| skip_term(r, depth + 1))
        }
        LARGE_TUPLE => {
            let n = r.u32()? as usize;
            (0..n).try_for_each(|_| skip_term(r, depth + 1))
        }
        LIST => {
            let n = r.u32()? as usize;
            (0..=n).try_for_each(|_| skip_term(r, depth + 1))
        }
        MAP => {
            let n = r.u32()? as usize;
            (0..n.checked_mul(2).ok_or(Unreadable)?).try_for_each(|_| skip_term(r, depth + 1))
        }
        EXPORT => (0..3).try_for_each(|_| skip_term(r, depth + 1)),
        NEW_FUN => {
            // Size counts itself.
            let n = r.u32()? as usize;
            len(r, n.checked_sub(4).ok_or(Unreadable)?)
        }
        _ => Err(Unreadable),
    }
}

/// A cursor over a packet.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Parse<&'a [u8]> {
        if n > self.0.len() {
            return Err(Unreadable);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn peek(&self) -> Parse<u8> {
        self.0.first().copied().ok_or(Unreadable)
    }

    fn u8(&mut self) -> Parse<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Parse<u16> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().map_err(|_| Unreadable)?,
        ))
    }

    fn u32(&mut self) -> Parse<u32> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| Unreadable)?,
        ))
    }

    fn u64(&mut self) -> Parse<u64> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().map_err(|_| Unreadable)?,
        ))
    }
}
