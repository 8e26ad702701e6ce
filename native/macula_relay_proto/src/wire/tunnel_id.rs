//! Tunnel ids: 16 random bytes written as 32 lowercase hex characters.

use std::fmt;

/// Length of a tunnel id on the wire (the prefix of every tunnel stream).
pub const TUNNEL_ID_LEN: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelId([u8; 16]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a tunnel id is 32 lowercase hex characters")]
pub struct BadTunnelId;

impl TunnelId {
    pub fn random() -> Self {
        TunnelId(rand::random())
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        TunnelId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The 32-byte ASCII form sent on the wire.
    pub fn to_hex(&self) -> [u8; TUNNEL_ID_LEN] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; TUNNEL_ID_LEN];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[(b >> 4) as usize];
            out[2 * i + 1] = DIGITS[(b & 0xf) as usize];
        }
        out
    }

    pub fn as_string(&self) -> String {
        // to_hex only yields ASCII digits and letters.
        self.to_hex().iter().map(|&b| b as char).collect()
    }

    /// Parses the wire form; uppercase, short, long or non-hex input is refused.
    pub fn parse(text: &[u8]) -> Result<Self, BadTunnelId> {
        if text.len() != TUNNEL_ID_LEN {
            return Err(BadTunnelId);
        }
        let mut out = [0u8; 16];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Ok(TunnelId(out))
    }
}

fn nibble(c: u8) -> Result<u8, BadTunnelId> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(BadTunnelId),
    }
}

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_string())
    }
}

impl fmt::Debug for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TunnelId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_hex() {
        let id = TunnelId::random();
        let hex = id.to_hex();
        assert!(hex
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(TunnelId::parse(&hex), Ok(id));
    }

    #[test]
    fn known_value() {
        let id = TunnelId::from_bytes([0xab; 16]);
        assert_eq!(id.as_string(), "ab".repeat(16));
    }

    #[test]
    fn refuses_bad_forms() {
        assert_eq!(TunnelId::parse(b"abc"), Err(BadTunnelId));
        assert_eq!(TunnelId::parse(&[b'A'; 32]), Err(BadTunnelId));
        assert_eq!(TunnelId::parse(&[b'g'; 32]), Err(BadTunnelId));
        assert_eq!(TunnelId::parse(&[b'0'; 33]), Err(BadTunnelId));
        assert!(TunnelId::parse(&[b'0'; 32]).is_ok());
    }
}
