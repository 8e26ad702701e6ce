//! The start of an e2e session's first stream, sans IO: the two nodes
//! prove the cookie to each other with a PAKE (SPAKE2 over Ed25519), bound
//! to their QUIC connection's TLS session, and exchange their direct-path
//! candidates under that proof. Nothing of the stream reaches Erlang before
//! both checks pass.
//!
//! Why a PAKE: node keys are not functions of the cookie (the relay and
//! every token holder see them), so TLS alone proves nothing about the
//! cookie. A SPAKE2 run gives each side a key that matches the other's only
//! if both used the same cookie; a side that guessed wrong learns only that
//! this one guess failed (one online guess per session, as with Erlang's
//! own challenge), and nothing it can test offline. The confirmation MACs
//! are keyed from the SPAKE2 key *and* the TLS exporter of this very
//! connection, so a relay that ran two TLS sessions (one with each node)
//! and passed the PAKE messages through gets two exporters and fails both
//! confirmations. In cluster-CA mode TLS has already authenticated both
//! ends by certificate: the PAKE messages are empty and only the exchange
//! of candidates remains.
//!
//! On the stream, after the requester's 32-character tunnel id, each
//! message is a frame: a 2-byte big-endian length, then the body.
//!
//! ```text
//! requester -> target : frame(pake_requester)
//! target -> requester : frame(pake_target) frame(confirm_target)
//! requester -> target : frame(confirm_requester)
//! confirm_X = HMAC-SHA256(key_X, candidates_X) || candidates_X
//! candidates = count (1 byte), then per address: 4 or 6 (1 byte), the IP, the port (BE)
//! ```

use std::net::{IpAddr, SocketAddr};

use ring::{hkdf, hmac};
use subtle::ConstantTimeEq;

use super::cookie_pake::{CookiePake, PakeRun, Side};

use crate::TunnelId;

/// The TLS exporter label both nodes use for this handshake.
pub const EXPORTER_LABEL: &[u8] = b"macula e2e session auth v1";
/// A frame's body, at most.
pub const MAX_FRAME: usize = 1024;
/// Candidates in a confirmation, at most.
pub const MAX_CANDIDATES: usize = 16;
const MAC_LEN: usize = 32;
const TRANSCRIPT_LABEL: &[u8] = b"macula e2e session v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node that asked for the session (the QUIC client).
    Requester,
    /// The node it asked for (the QUIC server).
    Target,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the peer's PAKE message is malformed")]
    BadPake,
    #[error("the peer does not know the cookie (or the session was tampered with)")]
    WrongCookie,
    #[error("malformed handshake frame")]
    BadFrame,
    #[error("handshake frame of {0} bytes (at most {MAX_FRAME})")]
    FrameTooLong(usize),
    #[error("handshake step out of order")]
    OutOfOrder,
}

/// One side's handshake. Inputs and outputs, in order:
/// requester: [`SessionAuth::pake_message`] (send), [`SessionAuth::on_pake`]
/// (the target's), [`SessionAuth::check_confirmation`] (the target's),
/// [`SessionAuth::confirmation`] (send);
/// target: [`SessionAuth::on_pake`] (the requester's),
/// [`SessionAuth::pake_message`] and [`SessionAuth::confirmation`] (send),
/// [`SessionAuth::check_confirmation`] (the requester's).
pub struct SessionAuth {
    role: Role,
    /// None in cluster-CA mode (TLS authenticated the peer).
    spake: Option<PakeRun>,
    my_pake: Vec<u8>,
    transcript: Vec<u8>,
    exporter: [u8; 32],
    keys: Option<(hmac::Key, hmac::Key)>,
}

impl SessionAuth {
    /// `cookie`: the PAKE of the cookie this node uses with its peer (made
    /// once per cookie), or None in cluster-CA mode. `exporter`: 32 bytes
    /// exported from the session's TLS with [`EXPORTER_LABEL`] and the
    /// tunnel id as context.
    pub fn new(
        role: Role,
        cookie: Option<&CookiePake>,
        requester: &str,
        target: &str,
        tunnel: &TunnelId,
        exporter: [u8; 32],
    ) -> Self {
        let (spake, my_pake) = match cookie {
            Some(cookie) => {
                let side = match role {
                    Role::Requester => Side::A,
                    Role::Target => Side::B,
                };
                let (run, msg) = cookie.start(side, requester.as_bytes(), target.as_bytes());
                (Some(run), msg.to_vec())
            }
            None => (None, Vec::new()),
        };
        let mut transcript = TRANSCRIPT_LABEL.to_vec();
        transcript.extend_from_slice(tunnel.as_bytes());
        for part in [requester.as_bytes(), target.as_bytes()] {
            push_part(&mut transcript, part);
        }
        SessionAuth {
            role,
            spake,
            my_pake,
            transcript,
            exporter,
            keys: None,
        }
    }

    /// This side's PAKE message (empty in cluster-CA mode).
    pub fn pake_message(&self) -> &[u8] {
        &self.my_pake
    }

    /// The peer's PAKE message: derives both confirmation keys.
    pub fn on_pake(&mut self, peer: &[u8]) -> Result<(), AuthError> {
        if self.keys.is_some() {
            return Err(AuthError::OutOfOrder);
        }
        let shared = match self.spake.take() {
            Some(run) => run.finish(peer).map_err(|_| AuthError::BadPake)?.to_vec(),
            None if peer.is_empty() => Vec::new(),
            // The peer runs a PAKE and this side does not: the two ends
            // are not configured alike.
            None => return Err(AuthError::WrongCookie),
        };
        let (requester_msg, target_msg) = match self.role {
            Role::Requester => (self.my_pake.as_slice(), peer),
            Role::Target => (peer, self.my_pake.as_slice()),
        };
        let mut transcript = std::mem::take(&mut self.transcript);
        push_part(&mut transcript, requester_msg);
        push_part(&mut transcript, target_msg);
        let mut ikm = shared;
        ikm.extend_from_slice(&transcript);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &self.exporter).extract(&ikm);
        let key = |label: &[u8]| -> Result<hmac::Key, AuthError> {
            let info = [label];
            let okm = prk
                .expand(&info, hmac::HMAC_SHA256)
                .map_err(|_| AuthError::BadPake)?;
            Ok(hmac::Key::from(okm))
        };
        let requester_key = key(b"confirm requester")?;
        let target_key = key(b"confirm target")?;
        self.keys = Some(match self.role {
            Role::Requester => (requester_key, target_key),
            Role::Target => (target_key, requester_key),
        });
        Ok(())
    }

    /// This side's confirmation, carrying its candidates.
    pub fn confirmation(&self, candidates: &[SocketAddr]) -> Result<Vec<u8>, AuthError> {
        let (mine, _) = self.keys.as_ref().ok_or(AuthError::OutOfOrder)?;
        let encoded = encode_candidates(candidates);
        let mut out = hmac::sign(mine, &encoded).as_ref().to_vec();
        out.extend_from_slice(&encoded);
        Ok(out)
    }

    /// Checks the peer's confirmation; its candidates if it holds.
    pub fn check_confirmation(&self, body: &[u8]) -> Result<Vec<SocketAddr>, AuthError> {
        let (_, theirs) = self.keys.as_ref().ok_or(AuthError::OutOfOrder)?;
        if body.len() < MAC_LEN {
            return Err(AuthError::WrongCookie);
        }
        let (tag, encoded) = body.split_at(MAC_LEN);
        let expected = hmac::sign(theirs, encoded);
        if !bool::from(expected.as_ref().ct_eq(tag)) {
            return Err(AuthError::WrongCookie);
        }
        decode_candidates(encoded)
    }
}

fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_be_bytes());
    out.extend_from_slice(part);
}

/// `body` as a frame: 2-byte length, then the body.
pub fn frame(body: &[u8]) -> Result<Vec<u8>, AuthError> {
    if body.len() > MAX_FRAME {
        return Err(AuthError::FrameTooLong(body.len()));
    }
    let mut out = (body.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    Ok(out)
}

/// A frame's body, and the bytes after the frame.
pub type Split<'a> = (&'a [u8], &'a [u8]);

/// The first whole frame at the start of `input`: its body and the bytes
/// after it; None while more bytes are needed.
pub fn take_frame(input: &[u8]) -> Result<Option<Split<'_>>, AuthError> {
    let Some(len) = input.get(..2) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([len[0], len[1]]) as usize;
    if len > MAX_FRAME {
        return Err(AuthError::FrameTooLong(len));
    }
    Ok(input[2..].split_at_checked(len))
}

pub fn encode_candidates(candidates: &[SocketAddr]) -> Vec<u8> {
    let candidates = &candidates[..candidates.len().min(MAX_CANDIDATES)];
    let mut out = vec![candidates.len() as u8];
    for c in candidates {
        match c.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&c.port().to_be_bytes());
    }
    out
}

pub fn decode_candidates(mut input: &[u8]) -> Result<Vec<SocketAddr>, AuthError> {
    let (&count, rest) = input.split_first().ok_or(AuthError::BadFrame)?;
    input = rest;
    if count as usize > MAX_CANDIDATES {
        return Err(AuthError::BadFrame);
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (&family, rest) = input.split_first().ok_or(AuthError::BadFrame)?;
        let ip_len = match family {
            4 => 4,
            6 => 16,
            _ => return Err(AuthError::BadFrame),
        };
        let (ip, rest) = rest.split_at_checked(ip_len).ok_or(AuthError::BadFrame)?;
        let (port, rest) = rest.split_at_checked(2).ok_or(AuthError::BadFrame)?;
        let ip: IpAddr = match ip_len {
            4 => <[u8; 4]>::try_from(ip).map(IpAddr::from),
            _ => <[u8; 16]>::try_from(ip).map(IpAddr::from),
        }
        .map_err(|_| AuthError::BadFrame)?;
        out.push(SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]])));
        input = rest;
    }
    if !input.is_empty() {
        return Err(AuthError::BadFrame);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TUNNEL: TunnelId = TunnelId::from_bytes([7; 16]);

    fn pair(
        cookie_a: Option<&[u8]>,
        cookie_b: Option<&[u8]>,
        exporter_a: [u8; 32],
        exporter_b: [u8; 32],
    ) -> (SessionAuth, SessionAuth) {
        let (pake_a, pake_b) = (cookie_a.map(CookiePake::new), cookie_b.map(CookiePake::new));
        (
            SessionAuth::new(
                Role::Requester,
                pake_a.as_ref(),
                "a@h",
                "b@h",
                &TUNNEL,
                exporter_a,
            ),
            SessionAuth::new(
                Role::Target,
                pake_b.as_ref(),
                "a@h",
                "b@h",
                &TUNNEL,
                exporter_b,
            ),
        )
    }

    /// Runs the whole exchange; what each side learned of the other.
    fn run(
        mut a: SessionAuth,
        mut b: SessionAuth,
    ) -> (
        Result<Vec<SocketAddr>, AuthError>,
        Result<Vec<SocketAddr>, AuthError>,
    ) {
        let a_cands: Vec<SocketAddr> = vec!["192.0.2.1:4000".parse().unwrap()];
        let b_cands: Vec<SocketAddr> = vec!["[2001:db8::1]:5000".parse().unwrap()];
        let a_msg = a.pake_message().to_vec();
        if let Err(e) = b.on_pake(&a_msg) {
            return (Err(e.clone()), Err(e));
        }
        let b_msg = b.pake_message().to_vec();
        let b_confirm = b.confirmation(&b_cands).unwrap();
        if let Err(e) = a.on_pake(&b_msg) {
            return (Err(e.clone()), Err(e));
        }
        let a_got = a.check_confirmation(&b_confirm);
        let a_confirm = a.confirmation(&a_cands).unwrap();
        let b_got = b.check_confirmation(&a_confirm);
        (a_got, b_got)
    }

    #[test]
    fn same_cookie_same_session_passes_and_carries_candidates() {
        let (a, b) = pair(Some(b"c"), Some(b"c"), [1; 32], [1; 32]);
        let (a_got, b_got) = run(a, b);
        assert_eq!(a_got.unwrap(), vec!["[2001:db8::1]:5000".parse().unwrap()]);
        assert_eq!(b_got.unwrap(), vec!["192.0.2.1:4000".parse().unwrap()]);
    }

    #[test]
    fn another_cookie_fails_both_sides() {
        let (a, b) = pair(Some(b"c"), Some(b"guess"), [1; 32], [1; 32]);
        let (a_got, b_got) = run(a, b);
        assert_eq!(a_got, Err(AuthError::WrongCookie));
        assert_eq!(b_got, Err(AuthError::WrongCookie));
    }

    /// A relay that terminates TLS with each side and passes the PAKE
    /// messages on: the two exporters differ, so both confirmations fail
    /// even though the cookies match.
    #[test]
    fn a_man_in_the_middle_of_tls_fails() {
        let (a, b) = pair(Some(b"c"), Some(b"c"), [1; 32], [2; 32]);
        let (a_got, b_got) = run(a, b);
        assert_eq!(a_got, Err(AuthError::WrongCookie));
        assert_eq!(b_got, Err(AuthError::WrongCookie));
    }

    /// The names are part of the PAKE: a peer that says it is another node
    /// fails, cookie or not.
    #[test]
    fn another_name_fails() {
        let pake = CookiePake::new(b"c");
        let a = SessionAuth::new(Role::Requester, Some(&pake), "a@h", "b@h", &TUNNEL, [1; 32]);
        let b = SessionAuth::new(Role::Target, Some(&pake), "x@h", "b@h", &TUNNEL, [1; 32]);
        let (a_got, b_got) = run(a, b);
        assert!(a_got.is_err() && b_got.is_err());
    }

    #[test]
    fn cluster_mode_exchanges_candidates_and_refuses_a_mixed_pair() {
        let (a, b) = pair(None, None, [1; 32], [1; 32]);
        let (a_got, b_got) = run(a, b);
        assert!(a_got.is_ok() && b_got.is_ok());
        // One side with a cookie, the other in cluster mode: refused, no
        // side falls back to the other's mode.
        let (a, b) = pair(Some(b"c"), None, [1; 32], [1; 32]);
        let (a_got, _) = run(a, b);
        assert!(a_got.is_err());
        let (a, b) = pair(None, Some(b"c"), [1; 32], [1; 32]);
        let (a_got, _) = run(a, b);
        assert!(a_got.is_err());
    }

    #[test]
    fn a_flipped_bit_in_a_confirmation_fails() {
        let (mut a, mut b) = pair(Some(b"c"), Some(b"c"), [1; 32], [1; 32]);
        b.on_pake(a.pake_message()).unwrap();
        a.on_pake(b.pake_message()).unwrap();
        let good = b.confirmation(&["192.0.2.1:1".parse().unwrap()]).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert!(a.check_confirmation(&bad).is_err(), "byte {i}");
        }
        assert!(a.check_confirmation(&good).is_ok());
        assert_eq!(
            a.check_confirmation(&good[..10]),
            Err(AuthError::WrongCookie)
        );
    }

    #[test]
    fn out_of_order_steps_are_errors() {
        let (mut a, b) = pair(Some(b"c"), Some(b"c"), [1; 32], [1; 32]);
        assert_eq!(a.confirmation(&[]), Err(AuthError::OutOfOrder));
        assert_eq!(a.check_confirmation(&[0; 40]), Err(AuthError::OutOfOrder));
        a.on_pake(b.pake_message()).unwrap();
        assert_eq!(a.on_pake(b.pake_message()), Err(AuthError::OutOfOrder));
        assert_eq!(a.on_pake(&[1, 2, 3]), Err(AuthError::OutOfOrder));
        let (mut a, _) = pair(Some(b"c"), Some(b"c"), [1; 32], [1; 32]);
        assert_eq!(a.on_pake(&[1, 2, 3]), Err(AuthError::BadPake));
    }

    #[test]
    fn frames_round_trip_and_bound_their_length() {
        let f = frame(b"hello").unwrap();
        assert_eq!(take_frame(&f[..3]), Ok(None));
        let mut two = f.clone();
        two.extend_from_slice(b"rest");
        assert_eq!(take_frame(&two), Ok(Some((&b"hello"[..], &b"rest"[..]))));
        assert_eq!(
            take_frame(&[0xff, 0xff, 0]),
            Err(AuthError::FrameTooLong(65535))
        );
        assert!(frame(&[0; MAX_FRAME + 1]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn candidates_round_trip(pairs in proptest::collection::vec(proptest::prelude::any::<(IpAddr, u16)>(), 0..MAX_CANDIDATES)) {
            let addrs: Vec<SocketAddr> = pairs.into_iter().map(SocketAddr::from).collect();
            proptest::prop_assert_eq!(decode_candidates(&encode_candidates(&addrs)).unwrap(), addrs);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode_candidates(&bytes);
            let _ = take_frame(&bytes);
            let (mut a, _) = pair(Some(b"c"), Some(b"c"), [1; 32], [1; 32]);
            let _ = a.on_pake(&bytes);
            let _ = a.check_confirmation(&bytes);
        }
    }
}
