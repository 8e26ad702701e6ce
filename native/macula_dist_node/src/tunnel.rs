//! One tunnel: a QUIC stream pair, read and written for its owner (an
//! Erlang process, through the NIF's [`TunnelSink`]).
//!
//! - Outbound: `send` copies iodata into a queue that a writer task drains
//!   into quinn. Past `HIGH_WATER` queued bytes `send` answers `busy`, and
//!   the owner gets `writable` once the queue is under `LOW_WATER` again.
//! - Inbound: a reader task frames bytes (raw, 2 or 4-byte packets) and
//!   sends them to the owner in batches, one batch per credit (like
//!   `{active, N}`). Without credit it stops reading, and QUIC flow control
//!   pushes back on the sender. Bytes that arrive before an owner claims the
//!   tunnel wait here.
//!
//! What the owner hears goes through a [`TunnelSink`]: frames, `writable`,
//! `closed`. The tunnel does not know who its owner is.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use macula_relay_proto::wire::packet::{Framer, Packet};
use macula_relay_proto::{Mode, TunnelId};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::node_socket::NodeSocket;

/// Queued outbound bytes over which `send` answers `busy`.
pub const HIGH_WATER: usize = 4 << 20;
/// Queued outbound bytes under which a busy tunnel becomes `writable`.
pub const LOW_WATER: usize = 1 << 20;
/// Largest inbound packet accepted in packet mode.
const MAX_FRAME: usize = 1 << 30;
/// Most bytes and frames in one `{data, Frames}` message.
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_FRAMES: usize = 256;
/// How long a graceful close may take to flush before the stream is reset.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
const CLOSED_CODE: VarInt = VarInt::from_u32(0);

#[derive(Default)]
pub struct Counters {
    pub recv_bytes: AtomicU64,
    pub recv_packets: AtomicU64,
    pub send_bytes: AtomicU64,
    pub send_packets: AtomicU64,
}

pub struct Tunnel {
    pub id: TunnelId,
    pub peer: String,
    pub outbound: bool,
    pub mode: Mode,
    out: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    queued: AtomicUsize,
    want_writable: AtomicBool,
    credit: AtomicU32,
    credit_added: Notify,
    packet: AtomicU8,
    closed: AtomicBool,
    /// Stops the reader (any close).
    stop_reading: CancellationToken,
    /// Stops the writer without flushing (a close that is not graceful).
    abort_writing: CancellationToken,
    pub counters: Counters,
    /// The client's count of open tunnels, for status.
    open_count: Arc<AtomicUsize>,
    /// An e2e session's socket and virtual address: where its path is.
    pub route: Option<(Arc<NodeSocket>, std::net::SocketAddr)>,
    rt: Handle,
}

/// Where a tunnel's reader and writer tell its owner what happened. Each
/// of the two loops has its own sink (made by the caller's factory).
pub trait TunnelSink: Send + 'static {
    /// Frames for the owner; one credit was used for them.
    fn data(&mut self, frames: &mut Vec<Bytes>);
    /// The queue went under [`LOW_WATER`] after a `busy`.
    fn writable(&mut self);
    /// The peer or the connection ended the tunnel.
    fn closed(&mut self);
}

/// The tunnel is closed: nothing more can be sent on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelClosed;

/// Live tunnels in this process, for leak checks.
pub static LIVE_TUNNELS: AtomicUsize = AtomicUsize::new(0);

impl Tunnel {
    /// An e2e session's direct address, when it has gone direct.
    pub fn direct(&self) -> Option<std::net::SocketAddr> {
        let (socket, vaddr) = self.route.as_ref()?;
        socket.direct_of(vaddr)
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        LIVE_TUNNELS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the caller got from the matcher: a stream pair and any bytes read
/// past the tunnel-id prefix.
pub struct Streams {
    pub send: SendStream,
    pub recv: RecvStream,
    pub early: Bytes,
    /// An e2e session's own connection, closed with the tunnel; `None` for
    /// a stream tunnel (its connection is the relay's, shared).
    pub conn: Option<quinn::Connection>,
    /// An e2e session's socket (which knows its path).
    pub socket: Option<Arc<NodeSocket>>,
}

impl Streams {
    pub fn mode(&self) -> Mode {
        if self.conn.is_some() {
            Mode::E2e
        } else {
            Mode::Stream
        }
    }

    /// Drops a tunnel nobody will use.
    pub fn discard(self) {
        if let Some(conn) = self.conn {
            conn.close(CLOSED_CODE, b"tunnel discarded");
        }
    }
}

/// A tunnel's streams, until its loops start.
pub struct TunnelIo {
    send: SendStream,
    recv: RecvStream,
    early: Bytes,
    conn: Option<quinn::Connection>,
    queue: mpsc::UnboundedReceiver<Bytes>,
}

/// A tunnel made, whose reader and writer start once its owner's side is
/// ready ([`TunnelIo::start`]).
pub struct NewTunnel {
    pub tunnel: Arc<Tunnel>,
    pub io: TunnelIo,
}

impl NewTunnel {
    /// Drops a tunnel nobody will take: its e2e connection closes.
    pub fn discard(self) {
        self.tunnel.close(false);
        if let Some(conn) = self.io.conn {
            conn.close(CLOSED_CODE, b"tunnel discarded");
        }
    }
}

impl Tunnel {
    /// Creates the tunnel; `open_count` counts its client's open tunnels.
    pub fn create(
        id: TunnelId,
        peer: String,
        outbound: bool,
        streams: Streams,
        open_count: Arc<AtomicUsize>,
        rt: Handle,
    ) -> NewTunnel {
        let (tx, rx) = mpsc::unbounded_channel();
        open_count.fetch_add(1, Ordering::Relaxed);
        LIVE_TUNNELS.fetch_add(1, Ordering::Relaxed);
        let tunnel = Arc::new(Tunnel {
            id,
            peer,
            outbound,
            mode: streams.mode(),
            route: streams
                .socket
                .clone()
                .zip(streams.conn.as_ref().map(|c| c.remote_address())),
            out: Mutex::new(Some(tx)),
            queued: AtomicUsize::new(0),
            want_writable: AtomicBool::new(false),
            credit: AtomicU32::new(0),
            credit_added: Notify::new(),
            packet: AtomicU8::new(0),
            closed: AtomicBool::new(false),
            stop_reading: CancellationToken::new(),
            abort_writing: CancellationToken::new(),
            counters: Counters::default(),
            open_count,
            rt,
        });
        NewTunnel {
            tunnel,
            io: TunnelIo {
                send: streams.send,
                recv: streams.recv,
                early: streams.early,
                conn: streams.conn,
                queue: rx,
            },
        }
    }
}

impl TunnelIo {
    /// Starts the reader and the writer; each tells its own sink.
    pub fn start(self, tunnel: &Arc<Tunnel>, mut sink: impl FnMut() -> Box<dyn TunnelSink>) {
        tunnel
            .rt
            .spawn(read_loop(tunnel.clone(), self.recv, self.early, sink()));
        tunnel.rt.spawn(write_loop(
            tunnel.clone(),
            self.send,
            self.queue,
            self.conn,
            sink(),
        ));
    }
}

impl Tunnel {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn set_packet(&self, packet: Packet) {
        self.packet.store(packet as u8, Ordering::Release);
    }

    fn packet(&self) -> Packet {
        match self.packet.load(Ordering::Acquire) {
            x if x == Packet::Two as u8 => Packet::Two,
            x if x == Packet::Four as u8 => Packet::Four,
            _ => Packet::Raw,
        }
    }

    pub fn add_credit(&self, n: u32) {
        self.credit.fetch_add(n, Ordering::AcqRel);
        self.credit_added.notify_one();
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Queues bytes for the peer. `Ok(true)` means over the high-water mark:
    /// stop sending until `writable`.
    pub fn send(&self, data: Bytes, packets: u64) -> Result<bool, TunnelClosed> {
        let len = data.len();
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = out.as_ref() else {
            return Err(TunnelClosed);
        };
        let queued = self.queued.fetch_add(len, Ordering::AcqRel) + len;
        if tx.send(data).is_err() {
            return Err(TunnelClosed);
        }
        self.counters
            .send_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.counters
            .send_packets
            .fetch_add(packets, Ordering::Relaxed);
        if queued > HIGH_WATER {
            self.want_writable.store(true, Ordering::Release);
            // The writer may have drained everything in between.
            if self.queued() <= LOW_WATER {
                self.want_writable.store(false, Ordering::Release);
                return Ok(false);
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Closes the tunnel once. Graceful: what is queued is still sent, then
    /// the stream is finished. Otherwise the stream is reset.
    pub fn close(&self, graceful: bool) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.open_count.fetch_sub(1, Ordering::Relaxed);
        self.stop_reading.cancel();
        self.out.lock().unwrap_or_else(|e| e.into_inner()).take();
        if graceful {
            let abort = self.abort_writing.clone();
            self.rt.spawn(async move {
                tokio::time::sleep(CLOSE_FLUSH).await;
                abort.cancel();
            });
        } else {
            self.abort_writing.cancel();
        }
    }
}

/// The peer or the connection ended the tunnel: close it and tell the owner.
fn closed_by_peer(sink: &mut dyn TunnelSink, tunnel: &Tunnel, why: &dyn std::fmt::Display) {
    tracing::debug!(tunnel = %tunnel.id, %why, "tunnel ended");
    if !tunnel.is_closed() {
        tunnel.close(false);
        sink.closed();
    }
}

async fn read_loop(
    tunnel: Arc<Tunnel>,
    mut recv: RecvStream,
    early: Bytes,
    mut sink: Box<dyn TunnelSink>,
) {
    let mut framer = Framer::new(Packet::Raw, MAX_FRAME);
    framer.push(&early);
    let mut batch: Vec<Bytes> = Vec::new();
    // Taken from quinn in one call: whatever arrived since the last read.
    let mut chunks: Vec<Bytes> = vec![Bytes::new(); 64];
    loop {
        // Frames are only cut while there is credit to deliver them, so a
        // packet-mode change applies to every byte not yet delivered.
        while tunnel.credit.load(Ordering::Acquire) == 0 {
            let added = tunnel.credit_added.notified();
            if tunnel.credit.load(Ordering::Acquire) > 0 {
                break;
            }
            tokio::select! {
                _ = added => {}
                _ = tunnel.stop_reading.cancelled() => return,
            }
        }
        let mode = tunnel.packet();
        framer.set_mode(mode);
        // During the handshake (2-byte packets) one packet per message, so the
        // switch to 4-byte packets can come between any two.
        let max_frames = if mode == Packet::Two { 1 } else { BATCH_FRAMES };
        let mut bytes = 0;
        while batch.len() < max_frames && bytes < BATCH_BYTES {
            match framer.next_frame() {
                Ok(Some(frame)) => {
                    tunnel.counters.recv_packets.fetch_add(1, Ordering::Relaxed);
                    // Empty packets are ticks: counted (that is what keeps the
                    // connection alive), not delivered.
                    if !frame.is_empty() || mode == Packet::Raw {
                        bytes += frame.len();
                        batch.push(frame);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return closed_by_peer(
                        sink.as_mut(),
                        &tunnel,
                        &format!("packet of {} bytes", e.len),
                    )
                }
            }
        }
        if !batch.is_empty() {
            tunnel.credit.fetch_sub(1, Ordering::AcqRel);
            sink.data(&mut batch);
            batch.clear();
            continue;
        }
        let read = tokio::select! {
            read = recv.read_chunks(&mut chunks) => read,
            _ = tunnel.stop_reading.cancelled() => return,
        };
        match read {
            Ok(Some(n)) => {
                for chunk in &mut chunks[..n] {
                    let len = chunk.len() as u64;
                    tunnel.counters.recv_bytes.fetch_add(len, Ordering::Relaxed);
                    framer.push(chunk);
                    *chunk = Bytes::new();
                }
            }
            Ok(None) => return closed_by_peer(sink.as_mut(), &tunnel, &"finished by the peer"),
            Err(e) => return closed_by_peer(sink.as_mut(), &tunnel, &e),
        }
    }
}

/// Writes until the tunnel closes, then ends an e2e session's connection
/// (once what was written is acknowledged, on a graceful close).
async fn write_loop(
    tunnel: Arc<Tunnel>,
    send: SendStream,
    queue: mpsc::UnboundedReceiver<Bytes>,
    conn: Option<quinn::Connection>,
    mut sink: Box<dyn TunnelSink>,
) {
    write_all(&tunnel, send, queue, sink.as_mut()).await;
    if let Some(conn) = conn {
        conn.close(CLOSED_CODE, b"tunnel closed");
    }
}

async fn write_all(
    tunnel: &Tunnel,
    mut send: SendStream,
    mut queue: mpsc::UnboundedReceiver<Bytes>,
    sink: &mut dyn TunnelSink,
) {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(64);
    loop {
        let got = tokio::select! {
            biased;
            _ = tunnel.abort_writing.cancelled() => {
                let _ = send.reset(CLOSED_CODE);
                return;
            }
            got = queue.recv_many(&mut chunks, 64) => got,
        };
        if got == 0 {
            // Closed gracefully: everything queued went out; wait (bounded)
            // until the peer has it all.
            let _ = send.finish();
            tokio::select! {
                _ = tunnel.abort_writing.cancelled() => {}
                _ = send.stopped() => {}
            }
            return;
        }
        let len: usize = chunks.iter().map(|c| c.len()).sum();
        let written = tokio::select! {
            biased;
            _ = tunnel.abort_writing.cancelled() => {
                let _ = send.reset(CLOSED_CODE);
                return;
            }
            written = send.write_all_chunks(&mut chunks) => written,
        };
        chunks.clear();
        if let Err(e) = written {
            return closed_by_peer(sink, tunnel, &e);
        }
        let left = tunnel.queued.fetch_sub(len, Ordering::AcqRel) - len;
        if left <= LOW_WATER && tunnel.want_writable.swap(false, Ordering::AcqRel) {
            sink.writable();
        }
    }
}
