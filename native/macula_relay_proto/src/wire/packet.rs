//! Inbound framing of a tunnel, without I/O: raw chunks, or packets with a
//! 2- or 4-byte big-endian length (as gen_tcp's `{packet, N}`).
//!
//! Bytes are only parsed when a frame is taken, so switching the mode after
//! the distribution handshake applies to every byte not yet taken, even if
//! it arrived in the same read as the handshake's last packet.

use bytes::{Buf, Bytes, BytesMut};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet {
    Raw,
    Two,
    Four,
}

impl Packet {
    pub fn from_header_len(n: u32) -> Option<Packet> {
        match n {
            0 => Some(Packet::Raw),
            2 => Some(Packet::Two),
            4 => Some(Packet::Four),
            _ => None,
        }
    }

    fn header_len(self) -> usize {
        match self {
            Packet::Raw => 0,
            Packet::Two => 2,
            Packet::Four => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameTooLarge {
    pub len: usize,
    pub max: usize,
}

#[derive(Debug)]
pub struct Framer {
    mode: Packet,
    max_frame: usize,
    buf: BytesMut,
}

impl Framer {
    pub fn new(mode: Packet, max_frame: usize) -> Self {
        Framer {
            mode,
            max_frame,
            buf: BytesMut::new(),
        }
    }

    pub fn set_mode(&mut self, mode: Packet) {
        self.mode = mode;
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn peek_len(&self) -> usize {
        match self.mode {
            Packet::Raw => 0,
            Packet::Two => u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize,
            Packet::Four => {
                u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
            }
        }
    }

    /// Takes the next whole frame (its payload, without the length), if any.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameTooLarge> {
        let h = self.mode.header_len();
        if h == 0 {
            if self.buf.is_empty() {
                return Ok(None);
            }
            return Ok(Some(self.buf.split().freeze()));
        }
        if self.buf.len() < h {
            return Ok(None);
        }
        let len = self.peek_len();
        if len > self.max_frame {
            return Err(FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if self.buf.len() < h + len {
            self.buf.reserve(h + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(h);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(header: usize, payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![];
        for p in payloads {
            let len = (p.len() as u32).to_be_bytes();
            out.extend_from_slice(&len[4 - header..]);
            out.extend_from_slice(p);
        }
        out
    }

    fn drain(f: &mut Framer) -> Vec<Vec<u8>> {
        let mut out = vec![];
        while let Some(x) = f.next_frame().unwrap() {
            out.push(x.to_vec());
        }
        out
    }

    #[test]
    fn packet_four_with_empty_ticks() {
        let mut f = Framer::new(Packet::Four, 1 << 20);
        f.push(&framed(4, &[b"abc", b"", b"defg"]));
        assert_eq!(
            drain(&mut f),
            vec![b"abc".to_vec(), vec![], b"defg".to_vec()]
        );
    }

    #[test]
    fn switching_mode_applies_to_bytes_not_taken() {
        // The handshake's last 2-byte packet and the first 4-byte packet in one read.
        let mut wire = framed(2, &[b"hs"]);
        wire.extend(framed(4, &[b"dist"]));
        let mut f = Framer::new(Packet::Two, 1 << 20);
        f.push(&wire);
        assert_eq!(f.next_frame().unwrap().unwrap(), &b"hs"[..]);
        f.set_mode(Packet::Four);
        assert_eq!(drain(&mut f), vec![b"dist".to_vec()]);
    }

    #[test]
    fn raw_takes_everything() {
        let mut f = Framer::new(Packet::Raw, 0);
        f.push(b"xyz");
        assert_eq!(drain(&mut f), vec![b"xyz".to_vec()]);
    }

    #[test]
    fn too_large_is_an_error() {
        let mut f = Framer::new(Packet::Four, 10);
        f.push(&[0, 0, 0, 11]);
        assert_eq!(f.next_frame(), Err(FrameTooLarge { len: 11, max: 10 }));
    }

    proptest::proptest! {
        #[test]
        fn any_split_gives_the_same_frames(
            payloads in proptest::collection::vec(proptest::collection::vec(0u8..255, 0..300), 0..10),
            cut in 1usize..50,
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
            let wire = framed(2, &refs);
            let mut f = Framer::new(Packet::Two, 1 << 16);
            let mut got = vec![];
            for chunk in wire.chunks(cut) {
                f.push(chunk);
                got.extend(drain(&mut f));
            }
            proptest::prop_assert_eq!(got, payloads);
        }
    }
}
