//! SPAKE2 over Ed25519 as the `spake2` crate (0.4) runs it: the same M
//! and N, password scalar, messages and key, so a node built with this
//! talks to one built with the crate (`tests` checks both ways). What
//! differs is the cost. The crate decompresses M and N and multiplies them
//! by the password's scalar at every run, and multiplies the base point
//! without its precomputed table: four variable-base multiplications a
//! side. A cookie's blinding points are computed once here
//! ([`CookiePake::new`]); a run is then one fixed-base multiplication (to
//! send) and one variable-base multiplication (to finish) a side.
//!
//! ```text
//! w = HKDF-SHA256(salt "", cookie, info "SPAKE2 pw", 48 bytes) as a big-endian integer mod l
//! A (requester): X = x*G + w*M, sends 'A' || X;  K = x*(Y - w*N)
//! B (target):    Y = y*G + w*N, sends 'B' || Y;  K = y*(X - w*M)
//! key = SHA-256(SHA-256(cookie) || SHA-256(id_A) || SHA-256(id_B) || X || Y || K)
//! ```

use curve25519_dalek::constants::ED25519_BASEPOINT_TABLE;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use ring::{digest, hkdf};

/// A PAKE message: the side's letter, then a compressed point.
pub const MESSAGE_LEN: usize = 33;
const SIDE_A: u8 = b'A';
const SIDE_B: u8 = b'B';

/// The spake2 crate's (and python-spake2's) M and N for Ed25519.
const M: [u8; 32] = [
    0x15, 0xcf, 0xd1, 0x8e, 0x38, 0x59, 0x52, 0x98, 0x2b, 0x6a, 0x8f, 0x8c, 0x78, 0x54, 0x96, 0x3b,
    0x58, 0xe3, 0x43, 0x88, 0xc8, 0xe6, 0xda, 0xe8, 0x91, 0xdb, 0x75, 0x64, 0x81, 0xa0, 0x23, 0x12,
];
const N: [u8; 32] = [
    0xf0, 0x4f, 0x2e, 0x7e, 0xb7, 0x34, 0xb2, 0xa8, 0xf8, 0xb4, 0x72, 0xea, 0xf9, 0xc3, 0xc6, 0x32,
    0x57, 0x6a, 0xc6, 0x4a, 0xea, 0x65, 0x0b, 0x49, 0x6a, 0x8a, 0x20, 0xff, 0x00, 0xe5, 0x83, 0xc3,
];

/// Which end of the exchange: A is the requester, B the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PakeError {
    #[error("PAKE message of the wrong length or side")]
    Malformed,
    #[error("PAKE message is not a curve point")]
    NotAPoint,
}

/// What a cookie gives every run: computed once per cookie.
pub struct CookiePake {
    cookie_hash: [u8; 32],
    /// w*M (A's blinding, B's unblinding) and w*N (the other way round).
    blind_m: EdwardsPoint,
    blind_n: EdwardsPoint,
}

impl std::fmt::Debug for CookiePake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field is derived from the cookie: none is shown.
        f.write_str("CookiePake")
    }
}

/// One run: this side's secret scalar and message, and what finishes it.
pub struct PakeRun {
    side: Side,
    secret: Scalar,
    mine: [u8; 32],
    unblind: EdwardsPoint,
    /// SHA-256 of the cookie, of A's identity and of B's.
    hashes: [[u8; 32]; 3],
}

struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

fn point(bytes: &[u8; 32]) -> EdwardsPoint {
    CompressedEdwardsY(*bytes)
        .decompress()
        .expect("M and N are curve points")
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

impl CookiePake {
    pub fn new(cookie: &[u8]) -> Self {
        let mut okm = [0u8; 48];
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"")
            .extract(cookie)
            .expand(&[b"SPAKE2 pw"], OkmLen(okm.len()))
            .and_then(|okm_out| okm_out.fill(&mut okm))
            .expect("48 bytes are within HKDF's limit");
        // The crate reads the 48 bytes as a big-endian integer.
        let mut wide = [0u8; 64];
        for (i, byte) in okm.iter().enumerate() {
            wide[okm.len() - 1 - i] = *byte;
        }
        let w = Scalar::from_bytes_mod_order_wide(&wide);
        CookiePake {
            cookie_hash: sha256(cookie),
            blind_m: point(&M) * w,
            blind_n: point(&N) * w,
        }
    }

    /// Starts a run between A and B (their identities): its state, and
    /// the message to send.
    pub fn start(&self, side: Side, id_a: &[u8], id_b: &[u8]) -> (PakeRun, [u8; MESSAGE_LEN]) {
        let secret = Scalar::random(&mut rand::rngs::OsRng);
        let (letter, blind, unblind) = match side {
            Side::A => (SIDE_A, &self.blind_m, self.blind_n),
            Side::B => (SIDE_B, &self.blind_n, self.blind_m),
        };
        let mine = (ED25519_BASEPOINT_TABLE * &secret + blind)
            .compress()
            .to_bytes();
        let mut message = [0u8; MESSAGE_LEN];
        message[0] = letter;
        message[1..].copy_from_slice(&mine);
        let run = PakeRun {
            side,
            secret,
            mine,
            unblind,
            hashes: [self.cookie_hash, sha256(id_a), sha256(id_b)],
        };
        (run, message)
    }
}

impl PakeRun {
    /// The peer's message: the shared key, equal on both ends only if
    /// both used the same cookie (and the same two identities).
    pub fn finish(self, peer: &[u8]) -> Result<[u8; 32], PakeError> {
        let expected = match self.side {
            Side::A => SIDE_B,
            Side::B => SIDE_A,
        };
        let theirs: [u8; 32] = match peer {
            [letter, rest @ ..] if *letter == expected => {
                rest.try_into().map_err(|_| PakeError::Malformed)?
            }
            _ => return Err(PakeError::Malformed),
        };
        let their_point = CompressedEdwardsY(theirs)
            .decompress()
            .ok_or(PakeError::NotAPoint)?;
        let shared = ((their_point - self.unblind) * self.secret)
            .compress()
            .to_bytes();
        let (x, y) = match self.side {
            Side::A => (&self.mine, &theirs),
            Side::B => (&theirs, &self.mine),
        };
        let mut transcript = [0u8; 6 * 32];
        let [cookie, id_a, id_b] = &self.hashes;
        for (slot, part) in transcript
            .chunks_exact_mut(32)
            .zip([cookie, id_a, id_b, x, y, &shared])
        {
            slot.copy_from_slice(part);
        }
        Ok(sha256(&transcript))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spake2::{Ed25519Group, Identity, Password, Spake2};

    const IDS: (&[u8], &[u8]) = (b"a@host", b"b@host");

    fn crate_start(side: Side, cookie: &[u8]) -> (Spake2<Ed25519Group>, Vec<u8>) {
        let (pw, a, b) = (
            Password::new(cookie),
            Identity::new(IDS.0),
            Identity::new(IDS.1),
        );
        match side {
            Side::A => Spake2::<Ed25519Group>::start_a(&pw, &a, &b),
            Side::B => Spake2::<Ed25519Group>::start_b(&pw, &a, &b),
        }
    }

    #[test]
    fn agrees_with_the_spake2_crate_on_either_side() {
        let cookie = b"a cookie of the usual length";
        let pake = CookiePake::new(cookie);
        for side in [Side::A, Side::B] {
            let other = if side == Side::A { Side::B } else { Side::A };
            let (run, mine) = pake.start(side, IDS.0, IDS.1);
            let (theirs, their_message) = crate_start(other, cookie);
            let ours = run.finish(&their_message).expect("finish");
            assert_eq!(theirs.finish(&mine).expect("crate finish"), ours.to_vec());
        }
    }

    #[test]
    fn two_runs_agree_only_on_the_same_cookie() {
        let (right, wrong) = (CookiePake::new(b"right"), CookiePake::new(b"wrong"));
        let (a, to_b) = right.start(Side::A, IDS.0, IDS.1);
        let (b, to_a) = right.start(Side::B, IDS.0, IDS.1);
        assert_eq!(a.finish(&to_a), b.finish(&to_b));
        let (a, to_b) = right.start(Side::A, IDS.0, IDS.1);
        let (b, to_a) = wrong.start(Side::B, IDS.0, IDS.1);
        assert_ne!(a.finish(&to_a), b.finish(&to_b));
        // The crate agrees that the wrong cookie gives another key.
        let (run, mine) = right.start(Side::A, IDS.0, IDS.1);
        let (theirs, their_message) = crate_start(Side::B, b"wrong");
        assert_ne!(
            run.finish(&their_message).unwrap().to_vec(),
            theirs.finish(&mine).unwrap()
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        let pake = CookiePake::new(b"c");
        let (_, from_a) = pake.start(Side::A, IDS.0, IDS.1);
        let run = |side| pake.start(side, IDS.0, IDS.1).0;
        // Its own side's letter, a short message, a long one, nothing.
        assert_eq!(run(Side::A).finish(&from_a), Err(PakeError::Malformed));
        assert_eq!(
            run(Side::B).finish(&from_a[..32]),
            Err(PakeError::Malformed)
        );
        let mut long = from_a.to_vec();
        long.push(0);
        assert_eq!(run(Side::B).finish(&long), Err(PakeError::Malformed));
        assert_eq!(run(Side::B).finish(&[]), Err(PakeError::Malformed));
        // A y with no x on the curve (y = 2 is not a point's).
        let mut not_a_point = [0u8; MESSAGE_LEN];
        not_a_point[0] = b'A';
        not_a_point[1] = 2;
        assert_eq!(run(Side::B).finish(&not_a_point), Err(PakeError::NotAPoint));
    }

    #[test]
    fn every_run_sends_a_fresh_message() {
        let pake = CookiePake::new(b"c");
        assert_ne!(
            pake.start(Side::A, IDS.0, IDS.1).1,
            pake.start(Side::A, IDS.0, IDS.1).1
        );
    }
}
