//! Control-stream frames: a 4-byte big-endian length, then a MessagePack map
//! whose keys and values are strings (binaries are accepted on decode).

use std::net::SocketAddr;

use rmpv::Value;

use crate::wire::tunnel_id::TunnelId;

/// Largest control frame body accepted by default (64 KiB).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
/// Nesting allowed inside a frame; control maps are flat.
const MAX_DEPTH: usize = 16;

/// Every control message of the protocol, as typed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// node → relay: `t: "id"`, `n`, optional `tok` and `v`.
    Identify {
        node: String,
        token: Option<String>,
        version: Option<u64>,
    },
    /// relay → node: `t: "id_ok"`, optional `v` (the relay's version; 2 or
    /// more offers end-to-end sessions).
    Identified { version: Option<u64> },
    /// relay → node: `t: "id_err"`, `r`; the relay then closes the connection.
    IdentifyRefused { reason: String },
    /// node → relay: `t: "tun_req"`, `target`, optional `mode` (`"e2e"`;
    /// absent or `"stream"` is a version 1 stream tunnel).
    TunnelRequest { target: String, mode: Mode },
    /// relay → node: `t: "tun_ok"`, `tid`; an e2e tunnel adds `mode: "e2e"`
    /// and `bind`, this side's session secret, and optionally `pmtu`.
    TunnelOk {
        tunnel: TunnelId,
        bind: Option<BindKey>,
        /// e2e only, `pmtu`: the smaller of the MTUs (largest UDP payloads)
        /// the relay's connections to the two sides have found, where the
        /// session may start its own instead of probing up to it.
        path_mtu: Option<u16>,
    },
    /// relay → node: `t: "tun_err"`, `r`.
    TunnelError { reason: String },
    /// relay → node: `t: "tun_notify"`, `tid`, `src`; an e2e tunnel adds
    /// `mode: "e2e"` and `bind`, and optionally `pmtu` (as in `tun_ok`).
    TunnelNotify {
        tunnel: TunnelId,
        source: String,
        bind: Option<BindKey>,
        path_mtu: Option<u16>,
    },
    /// node → relay: `t: "tun_close"`, `tid`. relay → node (version 2):
    /// the e2e session's other side left the relay.
    TunnelClose { tunnel: TunnelId },
    /// node → relay (version 2), after `id_ok` on a new relay connection:
    /// `t: "sess_keep"`, `tid`, `bind`, `peer`: an e2e session this node
    /// still holds from its previous relay connection (the relay lost it,
    /// or restarted). When both sides have claimed it, it flows again.
    SessionKeep {
        tunnel: TunnelId,
        bind: BindKey,
        peer: String,
    },
    /// relay → node: `t: "err"`, `r`.
    ProtocolError { reason: String },
    /// node → relay: `t: "nodes"`: which nodes may I reach here?
    NodesRequest,
    /// relay → node: `t: "nodes_ok"`, `nodes`: the other nodes identified
    /// on this relay (its one auth domain: its token, its nodes file).
    Nodes { nodes: Vec<String> },
    /// Direct-path candidates, `t: "cand"`, `addrs` (at most
    /// [`MAX_CANDIDATES`] `"ip:port"` strings). Version 4: relay → node,
    /// without `tid`, right after `id_ok` and again when it changes: the
    /// one address the relay sees this node at (its reflexive address);
    /// the relay forwards no candidates between nodes (they exchange them
    /// inside their authenticated session), and ignores a node's own.
    /// Version 3 (no relay sends it any more): node → relay without `tid`,
    /// the node's own addresses; relay → node with the `tid` of an e2e
    /// session, the peer's.
    Candidates {
        tunnel: Option<TunnelId>,
        addrs: Vec<SocketAddr>,
    },
    /// node → relay (version 2): `t: "sess_path"`, `tid`, `direct`: the
    /// session went direct (true) or back through the relay (false); the
    /// relay counts it.
    SessionPath { tunnel: TunnelId, direct: bool },
    /// relay → node (version 5), instead of `tun_close` when the peer's
    /// relay connection ended (it did not close the session): `t:
    /// "sess_lost"`, `tid`. The peer may be dead, or may have lost only
    /// its path to this relay; it may claim the session back here or at
    /// another relay both share ([`KEEP_WAIT`](crate::KEEP_WAIT)).
    SessionLost { tunnel: TunnelId },
    /// relay → node (version 5): `t: "sess_claimed"`, `tid`, `src`: node
    /// `src` claimed the session here (`sess_keep`) naming this node as
    /// its peer. A node that carries that session with `src` through
    /// another relay moves it here; one that carries it here knows its
    /// peer is back.
    SessionClaimed { tunnel: TunnelId, source: String },
}

/// Candidates in one `cand` message, at most.
pub const MAX_CANDIDATES: usize = 16;

/// How a tunnel carries distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Version 1: the relay splices two QUIC streams.
    Stream,
    /// Version 2: a QUIC connection between the two nodes, its datagrams
    /// forwarded by the relay (see [`crate::wire::dataplane`]).
    E2e,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::E2e => "e2e",
        }
    }
}

/// The secret one side of an e2e session puts in each datagram's header to
/// prove the datagram is its own (8 bytes, sent as 16 hex characters).
pub type BindKey = [u8; 8];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes is over the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame is not a MessagePack map: {0}")]
    BadFrame(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("message {msg} lacks key {key}")]
    MissingKey {
        msg: &'static str,
        key: &'static str,
    },
    #[error("key {key} has a value of the wrong type")]
    WrongType { key: &'static str },
    #[error("key {key} is not a valid tunnel id")]
    BadTunnelId { key: &'static str },
    #[error("key {key} has a value this version does not know")]
    BadValue { key: &'static str },
}

impl DecodeError {
    /// Framing errors leave the stream unusable; message errors only lose one frame.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::FrameTooLarge { .. } | DecodeError::BadFrame(_)
        )
    }

    /// The reason sent back in an `err` frame.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::FrameTooLarge { .. } => "frame_too_large",
            DecodeError::BadFrame(_) => "bad_frame",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::MissingKey { .. }
            | DecodeError::WrongType { .. }
            | DecodeError::BadTunnelId { .. }
            | DecodeError::BadValue { .. } => "bad_message",
        }
    }
}

impl Message {
    /// The `t` value of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Identify { .. } => "id",
            Message::Identified { .. } => "id_ok",
            Message::IdentifyRefused { .. } => "id_err",
            Message::TunnelRequest { .. } => "tun_req",
            Message::TunnelOk { .. } => "tun_ok",
            Message::TunnelError { .. } => "tun_err",
            Message::TunnelNotify { .. } => "tun_notify",
            Message::TunnelClose { .. } => "tun_close",
            Message::SessionKeep { .. } => "sess_keep",
            Message::ProtocolError { .. } => "err",
            Message::NodesRequest => "nodes",
            Message::Nodes { .. } => "nodes_ok",
            Message::Candidates { .. } => "cand",
            Message::SessionPath { .. } => "sess_path",
            Message::SessionLost { .. } => "sess_lost",
            Message::SessionClaimed { .. } => "sess_claimed",
        }
    }

    fn fields(&self) -> Vec<(&'static str, Value)> {
        let text = |s: &str| Value::from(s);
        let tid = |t: &TunnelId| Value::from(t.as_string());
        let e2e = |fields: &mut Vec<(&'static str, Value)>,
                   bind: &Option<BindKey>,
                   path_mtu: &Option<u16>| {
            if let Some(bind) = bind {
                fields.push(("mode", Value::from(Mode::E2e.as_str())));
                fields.push(("bind", Value::from(hex(bind))));
                if let Some(mtu) = path_mtu {
                    fields.push(("pmtu", Value::from(*mtu)));
                }
            }
        };
        let mut fields = vec![("t", text(self.type_name()))];
        match self {
            Message::Identify {
                node,
                token,
                version,
            } => {
                fields.push(("n", text(node)));
                if let Some(token) = token {
                    fields.push(("tok", text(token)));
                }
                if let Some(v) = version {
                    fields.push(("v", Value::from(*v)));
                }
            }
            Message::NodesRequest => {}
            Message::Candidates { tunnel, addrs } => {
                if let Some(t) = tunnel {
                    fields.push(("tid", tid(t)));
                }
                fields.push((
                    "addrs",
                    Value::Array(addrs.iter().map(|a| Value::from(a.to_string())).collect()),
                ));
            }
            Message::SessionPath { tunnel, direct } => {
                fields.push(("tid", tid(tunnel)));
                fields.push(("direct", Value::from(*direct)));
            }
            Message::Nodes { nodes } => fields.push((
                "nodes",
                Value::Array(nodes.iter().map(|n| text(n)).collect()),
            )),
            Message::Identified { version } => {
                if let Some(v) = version {
                    fields.push(("v", Value::from(*v)));
                }
            }
            Message::IdentifyRefused { reason }
            | Message::TunnelError { reason }
            | Message::ProtocolError { reason } => fields.push(("r", text(reason))),
            Message::TunnelRequest { target, mode } => {
                fields.push(("target", text(target)));
                if *mode == Mode::E2e {
                    fields.push(("mode", text(mode.as_str())));
                }
            }
            Message::TunnelOk {
                tunnel,
                bind,
                path_mtu,
            } => {
                fields.push(("tid", tid(tunnel)));
                e2e(&mut fields, bind, path_mtu);
            }
            Message::TunnelClose { tunnel } | Message::SessionLost { tunnel } => {
                fields.push(("tid", tid(tunnel)))
            }
            Message::SessionClaimed { tunnel, source } => {
                fields.push(("tid", tid(tunnel)));
                fields.push(("src", text(source)));
            }
            Message::SessionKeep { tunnel, bind, peer } => {
                fields.push(("tid", tid(tunnel)));
                fields.push(("bind", Value::from(hex(bind))));
                fields.push(("peer", text(peer)));
            }
            Message::TunnelNotify {
                tunnel,
                source,
                bind,
                path_mtu,
            } => {
                fields.push(("tid", tid(tunnel)));
                fields.push(("src", text(source)));
                e2e(&mut fields, bind, path_mtu);
            }
        }
        fields
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let map = Value::Map(
            self.fields()
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        );
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        rmpv::encode::write_value(out, &map).expect("writing to a Vec cannot fail");
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes one frame body (without its length prefix).
    pub fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
        let mut rest = body;
        let value = rmpv::decode::read_value_with_max_depth(&mut rest, MAX_DEPTH)
            .map_err(|e| DecodeError::BadFrame(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::BadFrame(format!(
                "{} bytes after the map",
                rest.len()
            )));
        }
        let Value::Map(entries) = value else {
            return Err(DecodeError::BadFrame("not a map".into()));
        };
        let map = Fields(entries);
        let t = map.text("?", "t")?;
        match t.as_str() {
            "id" => Ok(Message::Identify {
                node: map.text("id", "n")?,
                token: map.optional_text("tok")?,
                version: map.optional_u64("v")?,
            }),
            "id_ok" => Ok(Message::Identified {
                version: map.optional_u64("v")?,
            }),
            "id_err" => Ok(Message::IdentifyRefused {
                reason: map.text("id_err", "r")?,
            }),
            "tun_req" => Ok(Message::TunnelRequest {
                target: map.text("tun_req", "target")?,
                mode: map.mode()?,
            }),
            "tun_ok" => Ok(Message::TunnelOk {
                tunnel: map.tunnel_id("tun_ok")?,
                bind: map.bind()?,
                path_mtu: map.path_mtu()?,
            }),
            "tun_err" => Ok(Message::TunnelError {
                reason: map.text("tun_err", "r")?,
            }),
            "tun_notify" => Ok(Message::TunnelNotify {
                tunnel: map.tunnel_id("tun_notify")?,
                source: map.text("tun_notify", "src")?,
                bind: map.bind()?,
                path_mtu: map.path_mtu()?,
            }),
            "tun_close" => Ok(Message::TunnelClose {
                tunnel: map.tunnel_id("tun_close")?,
            }),
            "sess_keep" => Ok(Message::SessionKeep {
                tunnel: map.tunnel_id("sess_keep")?,
                bind: map
                    .optional_text("bind")?
                    .ok_or(DecodeError::MissingKey {
                        msg: "sess_keep",
                        key: "bind",
                    })
                    .and_then(|t| unhex(&t).ok_or(DecodeError::BadValue { key: "bind" }))?,
                peer: map.text("sess_keep", "peer")?,
            }),
            "err" => Ok(Message::ProtocolError {
                reason: map.text("err", "r")?,
            }),
            "nodes" => Ok(Message::NodesRequest),
            "nodes_ok" => Ok(Message::Nodes {
                nodes: map.texts("nodes")?,
            }),
            "cand" => {
                let key = "addrs";
                let texts = map.texts(key)?;
                if texts.len() > MAX_CANDIDATES {
                    return Err(DecodeError::BadValue { key });
                }
                Ok(Message::Candidates {
                    tunnel: match map.get("tid") {
                        Some(_) => Some(map.tunnel_id("cand")?),
                        None => None,
                    },
                    addrs: texts
                        .iter()
                        .map(|t| t.parse().map_err(|_| DecodeError::BadValue { key }))
                        .collect::<Result<_, _>>()?,
                })
            }
            "sess_path" => Ok(Message::SessionPath {
                tunnel: map.tunnel_id("sess_path")?,
                direct: match map.get("direct") {
                    Some(Value::Boolean(b)) => *b,
                    Some(_) => return Err(DecodeError::WrongType { key: "direct" }),
                    None => {
                        return Err(DecodeError::MissingKey {
                            msg: "sess_path",
                            key: "direct",
                        })
                    }
                },
            }),
            "sess_lost" => Ok(Message::SessionLost {
                tunnel: map.tunnel_id("sess_lost")?,
            }),
            "sess_claimed" => Ok(Message::SessionClaimed {
                tunnel: map.tunnel_id("sess_claimed")?,
                source: map.text("sess_claimed", "src")?,
            }),
            _ => Err(DecodeError::UnknownType(t)),
        }
    }
}

/// A decoded map, looked up by key; string and binary keys are alike.
struct Fields(Vec<(Value, Value)>);

impl Fields {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, _)| as_bytes(k) == Some(key.as_bytes()))
            .map(|(_, v)| v)
    }

    fn optional_text(&self, key: &'static str) -> Result<Option<String>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_bytes(v)
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(|s| Some(s.to_owned()))
                .ok_or(DecodeError::WrongType { key }),
        }
    }

    fn text(&self, msg: &'static str, key: &'static str) -> Result<String, DecodeError> {
        self.optional_text(key)?
            .ok_or(DecodeError::MissingKey { msg, key })
    }

    fn texts(&self, key: &'static str) -> Result<Vec<String>, DecodeError> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    as_bytes(v)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .map(str::to_owned)
                        .ok_or(DecodeError::WrongType { key })
                })
                .collect(),
            Some(_) => Err(DecodeError::WrongType { key }),
            None => Err(DecodeError::MissingKey {
                msg: "nodes_ok",
                key,
            }),
        }
    }

    fn optional_u64(&self, key: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(DecodeError::WrongType { key }),
        }
    }

    fn mode(&self) -> Result<Mode, DecodeError> {
        match self.optional_text("mode")?.as_deref() {
            None | Some("stream") => Ok(Mode::Stream),
            Some("e2e") => Ok(Mode::E2e),
            Some(_) => Err(DecodeError::BadValue { key: "mode" }),
        }
    }

    /// `bind` of an e2e tunnel; `None` for a stream tunnel.
    fn bind(&self) -> Result<Option<BindKey>, DecodeError> {
        if self.mode()? == Mode::Stream {
            return Ok(None);
        }
        let key = "bind";
        let text = self
            .optional_text(key)?
            .ok_or(DecodeError::MissingKey { msg: "e2e", key })?;
        unhex(&text).map(Some).ok_or(DecodeError::BadValue { key })
    }

    /// An e2e frame's `pmtu`, if any (ignored in stream mode, as `bind`).
    fn path_mtu(&self) -> Result<Option<u16>, DecodeError> {
        if self.mode()? == Mode::Stream {
            return Ok(None);
        }
        let key = "pmtu";
        match self.optional_u64(key)? {
            None => Ok(None),
            Some(v) => u16::try_from(v)
                .map(Some)
                .map_err(|_| DecodeError::BadValue { key }),
        }
    }

    fn tunnel_id(&self, msg: &'static str) -> Result<TunnelId, DecodeError> {
        let key = "tid";
        let v = self.get(key).ok_or(DecodeError::MissingKey { msg, key })?;
        let bytes = as_bytes(v).ok_or(DecodeError::WrongType { key })?;
        TunnelId::parse(bytes).map_err(|_| DecodeError::BadTunnelId { key })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    // Lowercase hex digits only, as tunnel ids (from_str_radix alone would
    // take a '+' sign and uppercase).
    if text.len() != 2 * N || !text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::String(s) => Some(s.as_bytes()),
        Value::Binary(b) => Some(b),
        _ => None,
    }
}

/// Streaming decoder: feed it chunks of any size, take whole messages out.
///
/// It never holds more than one frame: a length over the maximum is refused
/// as soon as the 4 header bytes are seen, before anything is buffered.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    header: [u8; 4],
    header_len: usize,
    body: Vec<u8>,
    body_len: Option<usize>,
    failed: Option<DecodeError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame,
            header: [0; 4],
            header_len: 0,
            body: Vec::new(),
            body_len: None,
            failed: None,
        }
    }

    /// Takes bytes from the front of `input` until one frame is complete.
    ///
    /// Returns `Ok(None)` once `input` is used up without completing a frame.
    /// A message-level error drops only that frame; after a fatal error
    /// ([`DecodeError::is_fatal`]) every later call returns the same error.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Message>, DecodeError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        loop {
            let Some(len) = self.body_len else {
                if input.is_empty() {
                    return Ok(None);
                }
                let take = (4 - self.header_len).min(input.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&input[..take]);
                self.header_len += take;
                *input = &input[take..];
                if self.header_len == 4 {
                    let len = u32::from_be_bytes(self.header) as usize;
                    if len > self.max_frame {
                        return Err(self.fail(DecodeError::FrameTooLarge {
                            len,
                            max: self.max_frame,
                        }));
                    }
                    self.body_len = Some(len);
                    self.body.clear();
                    self.body.reserve(len);
                }
                continue;
            };
            let take = (len - self.body.len()).min(input.len());
            self.body.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if self.body.len() < len {
                return Ok(None);
            }
            self.header_len = 0;
            self.body_len = None;
            return match Message::decode_body(&self.body) {
                Err(e) if e.is_fatal() => Err(self.fail(e)),
                other => other.map(Some),
            };
        }
    }

    fn fail(&mut self, err: DecodeError) -> DecodeError {
        self.body = Vec::new();
        self.failed = Some(err.clone());
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Message> {
        let tunnel = TunnelId::from_bytes([7; 16]);
        vec![
            Message::Identify {
                node: "a@host".into(),
                token: None,
                version: None,
            },
            Message::Identify {
                node: "a@host".into(),
                token: Some("secret".into()),
                version: Some(1),
            },
            Message::Identified { version: None },
            Message::Identified { version: Some(2) },
            Message::IdentifyRefused {
                reason: "bad_token".into(),
            },
            Message::TunnelRequest {
                target: "b@host".into(),
                mode: Mode::Stream,
            },
            Message::TunnelRequest {
                target: "b@host".into(),
                mode: Mode::E2e,
            },
            Message::TunnelOk {
                tunnel,
                bind: None,
                path_mtu: None,
            },
            Message::TunnelOk {
                tunnel,
                bind: Some([1, 2, 3, 4, 5, 6, 7, 0xff]),
                path_mtu: None,
            },
            Message::TunnelOk {
                tunnel,
                bind: Some([1, 2, 3, 4, 5, 6, 7, 0xff]),
                path_mtu: Some(1472),
            },
            Message::TunnelError {
                reason: "target_not_connected".into(),
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
                path_mtu: Some(1200),
            },
            Message::TunnelClose { tunnel },
            Message::ProtocolError {
                reason: "unknown_type".into(),
            },
            Message::NodesRequest,
            Message::Nodes { nodes: vec![] },
            Message::Nodes {
                nodes: vec!["a@h".into(), "b@h".into()],
            },
            Message::Candidates {
                tunnel: None,
                addrs: vec!["10.0.0.1:4000".parse().unwrap(), "[::1]:5".parse().unwrap()],
            },
            Message::Candidates {
                tunnel: Some(tunnel),
                addrs: vec![],
            },
            Message::SessionPath {
                tunnel,
                direct: true,
            },
            Message::SessionLost { tunnel },
            Message::SessionClaimed {
                tunnel,
                source: "a@host".into(),
            },
        ]
    }

    #[test]
    fn candidates_must_be_addresses_and_few() {
        let frame = |addrs: Vec<Value>| {
            let map = Value::Map(vec![
                (Value::from("t"), Value::from("cand")),
                (Value::from("addrs"), Value::Array(addrs)),
            ]);
            let mut body = vec![];
            rmpv::encode::write_value(&mut body, &map).unwrap();
            Message::decode_body(&body)
        };
        assert_eq!(
            frame(vec![Value::from("not an address")]),
            Err(DecodeError::BadValue { key: "addrs" })
        );
        let many = vec![Value::from("10.0.0.1:1"); MAX_CANDIDATES + 1];
        assert_eq!(frame(many), Err(DecodeError::BadValue { key: "addrs" }));
        assert!(frame(vec![Value::from("10.0.0.1:1"); MAX_CANDIDATES]).is_ok());
    }

    fn decode_all(bytes: &[u8]) -> Vec<Result<Message, DecodeError>> {
        let mut dec = FrameDecoder::default();
        let mut input = bytes;
        let mut out = vec![];
        loop {
            match dec.decode(&mut input) {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => return out,
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e));
                    if fatal {
                        return out;
                    }
                }
            }
        }
    }

    /// Encodes a raw map of string pairs as a frame, for hand-made input.
    fn raw_frame(pairs: &[(Value, Value)]) -> Vec<u8> {
        let mut body = vec![];
        rmpv::encode::write_value(&mut body, &Value::Map(pairs.to_vec())).unwrap();
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            assert_eq!(decode_all(&m.encode()), vec![Ok(m)]);
        }
    }

    #[test]
    fn uses_the_design_keys() {
        let bytes = Message::TunnelNotify {
            tunnel: TunnelId::from_bytes([1; 16]),
            source: "a@h".into(),
            bind: None,
            path_mtu: None,
        }
        .encode();
        let value = rmpv::decode::read_value(&mut &bytes[4..]).unwrap();
        let keys: Vec<_> = value
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_string())
            .collect();
        assert_eq!(keys, ["t", "tid", "src"]);
    }

    #[test]
    fn a_path_mtu_is_a_u16_of_an_e2e_frame() {
        let frame = |mode: &str, pmtu: Value| {
            let map = Value::Map(vec![
                (Value::from("t"), Value::from("tun_ok")),
                (Value::from("tid"), Value::from("00".repeat(16))),
                (Value::from("mode"), Value::from(mode)),
                (Value::from("bind"), Value::from("00".repeat(8))),
                (Value::from("pmtu"), pmtu),
            ]);
            let mut body = vec![];
            rmpv::encode::write_value(&mut body, &map).unwrap();
            Message::decode_body(&body)
        };
        let mtu = |m: Result<Message, DecodeError>| match m {
            Ok(Message::TunnelOk { path_mtu, .. }) => Ok(path_mtu),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(mtu(frame("e2e", Value::from(1472))), Ok(Some(1472)));
        let bad = Err(DecodeError::BadValue { key: "pmtu" });
        assert_eq!(mtu(frame("e2e", Value::from(65536))), bad);
        assert_eq!(
            mtu(frame("e2e", Value::from(-1))),
            Err(DecodeError::WrongType { key: "pmtu" })
        );
        assert_eq!(
            mtu(frame("e2e", Value::from("1472"))),
            Err(DecodeError::WrongType { key: "pmtu" })
        );
        // A stream tunnel has no session to size.
        assert_eq!(mtu(frame("stream", Value::from(1472))), Ok(None));
    }

    #[test]
    fn bind_keys_are_strict_lowercase_hex() {
        assert_eq!(unhex::<2>("0aff"), Some([0x0a, 0xff]));
        for bad in ["+f+f", "0AFF", "0a f", "0af", "0affx"] {
            assert_eq!(unhex::<2>(bad), None, "{bad}");
        }
    }

    #[test]
    fn binary_keys_and_values_are_accepted() {
        let frame = raw_frame(&[
            (
                Value::Binary(b"t".to_vec()),
                Value::Binary(b"tun_req".to_vec()),
            ),
            (
                Value::Binary(b"target".to_vec()),
                Value::Binary(b"b@h".to_vec()),
            ),
        ]);
        assert_eq!(
            decode_all(&frame),
            vec![Ok(Message::TunnelRequest {
                target: "b@h".into(),
                mode: Mode::Stream,
            })]
        );
    }

    #[test]
    fn extra_keys_are_ignored() {
        let frame = raw_frame(&[
            (Value::from("t"), Value::from("id_ok")),
            (Value::from("status"), Value::from("ok")),
        ]);
        assert_eq!(
            decode_all(&frame),
            vec![Ok(Message::Identified { version: None })]
        );
    }

    #[test]
    fn too_large_is_refused_from_the_header_alone() {
        let mut dec = FrameDecoder::new(100);
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            dec.decode(&mut input),
            Err(DecodeError::FrameTooLarge {
                len: u32::MAX as usize,
                max: 100
            })
        );
        assert_eq!(dec.body.capacity(), 0);
        // Poisoned: later input is not looked at.
        let ok = Message::Identified { version: None }.encode();
        assert!(dec.decode(&mut ok.as_slice()).is_err());
    }

    #[test]
    fn message_errors_are_typed_and_not_fatal() {
        let mut bytes = raw_frame(&[(Value::from("t"), Value::from("nope"))]);
        bytes.extend(raw_frame(&[(Value::from("t"), Value::from("tun_req"))]));
        bytes.extend(raw_frame(&[
            (Value::from("t"), Value::from("tun_req")),
            (Value::from("target"), Value::from(5)),
        ]));
        bytes.extend(raw_frame(&[
            (Value::from("t"), Value::from("tun_close")),
            (Value::from("tid"), Value::from("ABC")),
        ]));
        bytes.extend(Message::Identified { version: None }.encode());
        assert_eq!(
            decode_all(&bytes),
            vec![
                Err(DecodeError::UnknownType("nope".into())),
                Err(DecodeError::MissingKey {
                    msg: "tun_req",
                    key: "target"
                }),
                Err(DecodeError::WrongType { key: "target" }),
                Err(DecodeError::BadTunnelId { key: "tid" }),
                Ok(Message::Identified { version: None }),
            ]
        );
    }

    #[test]
    fn garbage_is_fatal() {
        let mut bytes = vec![0, 0, 0, 3, 0xc1, 0xc1, 0xc1];
        bytes.extend(Message::Identified { version: None }.encode());
        let out = decode_all(&bytes);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Err(DecodeError::BadFrame(_))));
        assert_eq!(out[0].as_ref().unwrap_err().reason(), "bad_frame");
    }

    #[test]
    fn not_a_map_and_trailing_bytes_are_bad_frames() {
        let mut arr = vec![];
        rmpv::encode::write_value(&mut arr, &Value::from(3)).unwrap();
        let mut frame = (arr.len() as u32).to_be_bytes().to_vec();
        frame.extend(arr);
        assert!(matches!(
            decode_all(&frame)[0],
            Err(DecodeError::BadFrame(_))
        ));

        let mut frame = Message::Identified { version: None }.encode();
        frame.push(0xc0);
        frame[3] += 1;
        assert!(matches!(
            decode_all(&frame)[0],
            Err(DecodeError::BadFrame(_))
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// An e2e side (a bind key, maybe a path MTU) or none: stream
        /// frames carry no `pmtu`.
        fn e2e_side() -> impl Strategy<Value = (Option<BindKey>, Option<u16>)> {
            proptest::option::of((any::<[u8; 8]>(), proptest::option::of(any::<u16>()))).prop_map(
                |side| match side {
                    Some((bind, mtu)) => (Some(bind), mtu),
                    None => (None, None),
                },
            )
        }

        fn text() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9_@.\\-]{0,40}"
        }

        fn message() -> impl Strategy<Value = Message> {
            let tid = any::<[u8; 16]>().prop_map(TunnelId::from_bytes);
            prop_oneof![
                (
                    text(),
                    proptest::option::of(text()),
                    proptest::option::of(any::<u64>())
                )
                    .prop_map(|(node, token, version)| Message::Identify {
                        node,
                        token,
                        version
                    }),
                proptest::option::of(any::<u64>())
                    .prop_map(|version| Message::Identified { version }),
                text().prop_map(|reason| Message::IdentifyRefused { reason }),
                (text(), any::<bool>()).prop_map(|(target, e2e)| Message::TunnelRequest {
                    target,
                    mode: if e2e { Mode::E2e } else { Mode::Stream }
                }),
                (tid.clone(), e2e_side()).prop_map(|(tunnel, (bind, path_mtu))| {
                    Message::TunnelOk {
                        tunnel,
                        bind,
                        path_mtu,
                    }
                }),
                text().prop_map(|reason| Message::TunnelError { reason }),
                (tid.clone(), text(), e2e_side()).prop_map(|(tunnel, source, (bind, path_mtu))| {
                    Message::TunnelNotify {
                        tunnel,
                        source,
                        bind,
                        path_mtu,
                    }
                }),
                tid.clone()
                    .prop_map(|tunnel| Message::TunnelClose { tunnel }),
                (tid.clone(), any::<[u8; 8]>(), text()).prop_map(|(tunnel, bind, peer)| {
                    Message::SessionKeep { tunnel, bind, peer }
                }),
                text().prop_map(|reason| Message::ProtocolError { reason }),
                Just(Message::NodesRequest),
                proptest::collection::vec(text(), 0..5).prop_map(|nodes| Message::Nodes { nodes }),
                (
                    proptest::option::of(tid.clone()),
                    proptest::collection::vec(
                        (any::<std::net::IpAddr>(), any::<u16>())
                            .prop_map(|(ip, port)| SocketAddr::new(ip, port)),
                        0..MAX_CANDIDATES
                    )
                )
                    .prop_map(|(tunnel, addrs)| Message::Candidates { tunnel, addrs }),
                (tid.clone(), any::<bool>())
                    .prop_map(|(tunnel, direct)| Message::SessionPath { tunnel, direct }),
                tid.clone()
                    .prop_map(|tunnel| Message::SessionLost { tunnel }),
                (tid.clone(), text())
                    .prop_map(|(tunnel, source)| Message::SessionClaimed { tunnel, source }),
            ]
        }

        proptest! {
            #[test]
            fn any_chunking_decodes_the_same(
                msgs in proptest::collection::vec(message(), 0..20),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..30),
            ) {
                let mut bytes = vec![];
                for m in &msgs {
                    m.encode_into(&mut bytes);
                }
                let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
                points.push(0);
                points.push(bytes.len());
                points.sort_unstable();
                let mut dec = FrameDecoder::default();
                let mut out = vec![];
                for w in points.windows(2) {
                    let mut chunk = &bytes[w[0]..w[1]];
                    while let Some(m) = dec.decode(&mut chunk).unwrap() {
                        out.push(m);
                    }
                    prop_assert!(chunk.is_empty());
                }
                prop_assert_eq!(out, msgs);
            }

            #[test]
            fn arbitrary_bytes_never_panic(
                chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)
            ) {
                let mut dec = FrameDecoder::new(1024);
                for c in &chunks {
                    let mut input = c.as_slice();
                    loop {
                        match dec.decode(&mut input) {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) if e.is_fatal() => break,
                            Err(_) => {}
                        }
                    }
                }
            }

            #[test]
            fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = Message::decode_body(&body);
            }
        }
    }
}
