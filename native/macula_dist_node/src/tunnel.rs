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
//!
//! An e2e tunnel whose owner asks for it ([`Tunnel::split_by_sender`], once
//! the distribution handshake is done) carries each sending process's
//! packets on a lane of its own ([`crate::lanes`]); the tunnel's stream
//! then carries ticks and fences, first.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use macula_relay_proto::wire::packet::{Framer, Packet};
use macula_relay_proto::{Mode, TunnelId};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::lanes::{fence_of, LaneInbox, Outbox, Turn, LANES};
use crate::node_socket::NodeSocket;

/// Queued outbound bytes over which `send` answers `busy`.
pub const HIGH_WATER: usize = 4 << 20;
/// Queued outbound bytes under which a busy tunnel becomes `writable`.
pub const LOW_WATER: usize = 1 << 20;
/// The same, once split by sender: the VM's one queue for every process
/// is drained into the lanes, so that one process's transfer (as long as
/// it waits for its peer now and then: 32 MiB in flight in the WAN
/// benchmark) does not make the VM suspend every sender. Busy past this
/// cap, as before: a stalled receiver costs the sender at most this plus
/// quinn's send window.
pub const SPLIT_HIGH_WATER: usize = 40 << 20;
/// Under this a busy tunnel is writable again: close to the cap, so that
/// senders the VM suspended meanwhile wait little.
pub const SPLIT_LOW_WATER: usize = 32 << 20;
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

/// Splitting by sender needs an e2e session (its own QUIC connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotE2e;

pub struct Tunnel {
    pub id: TunnelId,
    pub peer: String,
    pub outbound: bool,
    pub mode: Mode,
    outbox: Outbox,
    /// The distribution handshake is done ([`Tunnel::split_by_sender`]
    /// was asked, in either mode): the split water marks apply.
    data_phase: AtomicBool,
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
    /// An e2e session's connection, for its path statistics (its writer
    /// closes it when the tunnel ends).
    conn: Option<quinn::Connection>,
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

    /// An e2e session's QUIC path: rtt, congestion window, losses.
    pub fn path_stats(&self) -> Option<quinn::PathStats> {
        self.conn.as_ref().map(|c| c.stats().path)
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
            conn: streams.conn.clone(),
            outbox: Outbox::default(),
            data_phase: AtomicBool::new(false),
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
            },
        }
    }
}

impl TunnelIo {
    /// Starts the reader and the writer; each tells its own sink.
    pub fn start(self, tunnel: &Arc<Tunnel>, mut sink: impl FnMut() -> Box<dyn TunnelSink>) {
        let _guard = tunnel.rt.enter();
        let lanes = self
            .conn
            .clone()
            .map(|conn| LaneInbox::start(conn, MAX_FRAME, tunnel.stop_reading.clone()));
        tunnel.rt.spawn(read_loop(
            tunnel.clone(),
            self.recv,
            self.early,
            lanes,
            sink(),
        ));
        tunnel
            .rt
            .spawn(write_loop(tunnel.clone(), self.send, self.conn, sink()));
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
        self.outbox.queued()
    }

    /// From now on (the distribution handshake is done), each sending
    /// process's packets go on its own lane.
    pub fn split_by_sender(&self) -> Result<(), NotE2e> {
        // A stream tunnel keeps its one stream, but drains the VM's queue
        // as far as an e2e session does: below the cap the VM never marks
        // the connection busy, and a windowed transfer does not get every
        // other sender suspended (and starved: the VM resumes them in the
        // order they were suspended, the bulk sender first each time).
        self.data_phase.store(true, Ordering::Release);
        if self.mode != Mode::E2e {
            return Err(NotE2e);
        }
        self.outbox.split_by_sender();
        Ok(())
    }

    /// Lanes used so far, and packets sent behind a fence.
    pub fn lane_stats(&self) -> (u32, u64) {
        (
            self.outbox.lanes_used(),
            self.outbox.fences.load(Ordering::Relaxed),
        )
    }

    fn water_marks(&self) -> (usize, usize) {
        if self.data_phase.load(Ordering::Acquire) {
            (SPLIT_HIGH_WATER, SPLIT_LOW_WATER)
        } else {
            (HIGH_WATER, LOW_WATER)
        }
    }

    /// Queues bytes for the peer. `Ok(true)` means over the high-water mark:
    /// stop sending until `writable`.
    pub fn send(&self, data: Bytes, packets: u64) -> Result<bool, TunnelClosed> {
        let len = data.len();
        let queued = self.outbox.push(data).map_err(|_| TunnelClosed)?;
        self.counters
            .send_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.counters
            .send_packets
            .fetch_add(packets, Ordering::Relaxed);
        let (high, low) = self.water_marks();
        if queued > high {
            self.want_writable.store(true, Ordering::Release);
            // The writer may have drained everything in between.
            if self.queued() <= low {
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
        self.outbox.close();
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
    mut lanes: Option<LaneInbox>,
    mut sink: Box<dyn TunnelSink>,
) {
    let mut framer = Framer::new(Packet::Raw, MAX_FRAME);
    framer.push(&early);
    let mut batch: Vec<Bytes> = Vec::new();
    // Lane budget, given back once the batch is delivered.
    let mut permits = Vec::new();
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
        // Lanes carry the data phase only (4-byte packets).
        let mut lanes_now = lanes.as_mut().filter(|_| mode == Packet::Four);
        let mut bytes = 0;
        while batch.len() < max_frames && bytes < BATCH_BYTES {
            if let Some(inbox) = lanes_now.as_deref_mut() {
                if let Err(why) = inbox.poll_lanes() {
                    return closed_by_peer(sink.as_mut(), &tunnel, &why);
                }
                if let Some((packet, permit)) = inbox.next_ready() {
                    tunnel.counters.recv_packets.fetch_add(1, Ordering::Relaxed);
                    let len = packet.len() as u64 + 4;
                    tunnel.counters.recv_bytes.fetch_add(len, Ordering::Relaxed);
                    bytes += packet.len();
                    batch.push(packet);
                    permits.extend(permit);
                    continue;
                }
                if inbox.fence_waits() {
                    break;
                }
            }
            match framer.next_frame() {
                Ok(Some(frame)) => {
                    tunnel.counters.recv_packets.fetch_add(1, Ordering::Relaxed);
                    if let Some(inbox) = lanes_now.as_deref_mut() {
                        if let Some(fence) = fence_of(&frame) {
                            inbox.hold_fence(fence);
                            continue;
                        }
                    }
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
            permits.clear();
            continue;
        }
        // Nothing to deliver: wait for the tunnel's stream (unless a fence
        // holds it) or a lane.
        let fence_waits = lanes_now.as_deref().is_some_and(LaneInbox::fence_waits);
        let lane_event = async {
            match lanes_now {
                Some(inbox) => inbox.wait().await,
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            read = recv.read_chunks(&mut chunks), if !fence_waits => read,
            lane = lane_event => match lane {
                Ok(()) => continue,
                Err(why) => return closed_by_peer(sink.as_mut(), &tunnel, &why),
            },
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
/// (once what was written is acknowledged, on a graceful close). Each lane
/// has a writer task of its own ([`write_lane`]), started when the lane
/// gets its first packet; this one writes the control stream, starts the
/// lane writers, keeps the byte count and tells the sink.
async fn write_loop(
    tunnel: Arc<Tunnel>,
    mut control: SendStream,
    conn: Option<quinn::Connection>,
    mut sink: Box<dyn TunnelSink>,
) {
    let _ = control.set_priority(1);
    let (events, mut lane_events) = mpsc::unbounded_channel();
    let mut lanes = conn.clone().map(|conn| LaneWriters {
        conn,
        events,
        started: 0,
    });
    write_control(
        &tunnel,
        &mut control,
        &mut lanes,
        &mut lane_events,
        sink.as_mut(),
    )
    .await;
    if let Some(conn) = conn {
        conn.close(CLOSED_CODE, b"tunnel closed");
    }
}

/// Starts a writer for each lane that has had a packet.
struct LaneWriters {
    conn: quinn::Connection,
    events: mpsc::UnboundedSender<LaneWriterEvent>,
    /// A bit per lane whose writer runs (or ran).
    started: u64,
}

impl LaneWriters {
    fn start_new(&mut self, tunnel: &Arc<Tunnel>) {
        let new = tunnel.outbox.used_lanes() & !self.started;
        for lane in (0..LANES).filter(|l| new & (1u64 << l) != 0) {
            tunnel.rt.spawn(write_lane(
                tunnel.clone(),
                lane,
                self.conn.clone(),
                self.events.clone(),
            ));
        }
        self.started |= new;
    }
}

/// What a lane's writer tells the control stream's.
enum LaneWriterEvent {
    /// That many bytes are in quinn's hands.
    Written(usize),
    /// The lane could not be opened or written.
    Failed(String),
}

async fn write_control(
    tunnel: &Arc<Tunnel>,
    control: &mut SendStream,
    lanes: &mut Option<LaneWriters>,
    lane_events: &mut mpsc::UnboundedReceiver<LaneWriterEvent>,
    sink: &mut dyn TunnelSink,
) {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(64);
    let mut drained = false;
    let mut lanes_done = false;
    loop {
        if drained && lanes_done {
            // Closed gracefully: the lanes are finished and acknowledged;
            // the control stream goes last, and is waited for (bounded).
            let _ = control.finish();
            tokio::select! {
                _ = tunnel.abort_writing.cancelled() => {}
                _ = control.stopped() => {}
            }
            return;
        }
        tokio::select! {
            biased;
            _ = tunnel.abort_writing.cancelled() => {
                let _ = control.reset(CLOSED_CODE);
                return;
            }
            _ = tunnel.outbox.lane_added(), if lanes.is_some() => {
                if let Some(writers) = lanes.as_mut() {
                    writers.start_new(tunnel);
                }
            }
            event = lane_events.recv(), if !lanes_done => match event {
                Some(LaneWriterEvent::Written(len)) => written(tunnel, len, sink),
                Some(LaneWriterEvent::Failed(e)) => return closed_by_peer(sink, tunnel, &e),
                None => lanes_done = true,
            },
            more = tunnel.outbox.next_chunks(Turn::Control, &mut chunks), if !drained => {
                if !more {
                    // Closed: no lane gets a first packet any more. The
                    // lanes that did get one have writers to drain them;
                    // the last sender of lane events goes with these.
                    drained = true;
                    if let Some(mut writers) = lanes.take() {
                        writers.start_new(tunnel);
                    }
                    continue;
                }
                let len: usize = chunks.iter().map(|c| c.len()).sum();
                let result = tokio::select! {
                    biased;
                    _ = tunnel.abort_writing.cancelled() => {
                        let _ = control.reset(CLOSED_CODE);
                        return;
                    }
                    result = control.write_all_chunks(&mut chunks) => result,
                };
                chunks.clear();
                if let Err(e) = result {
                    return closed_by_peer(sink, tunnel, &e);
                }
                written(tunnel, len, sink);
            }
        }
    }
}

/// `len` bytes went to quinn: under the low-water mark after a `busy`,
/// the owner hears `writable`.
fn written(tunnel: &Tunnel, len: usize, sink: &mut dyn TunnelSink) {
    let left = tunnel.outbox.written(len);
    if left <= tunnel.water_marks().1 && tunnel.want_writable.swap(false, Ordering::AcqRel) {
        sink.writable();
    }
}

/// Writes lane `lane`: opens its stream on its first packet, finishes it
/// once the outbox is closed and its queue drained.
async fn write_lane(
    tunnel: Arc<Tunnel>,
    lane: usize,
    conn: quinn::Connection,
    events: mpsc::UnboundedSender<LaneWriterEvent>,
) {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(16);
    let mut stream: Option<SendStream> = None;
    let abort = tunnel.abort_writing.clone();
    loop {
        let more = tokio::select! {
            biased;
            _ = abort.cancelled() => break,
            more = tunnel.outbox.next_chunks(Turn::Lane(lane), &mut chunks) => more,
        };
        if !more {
            if let Some(mut send) = stream {
                let _ = send.finish();
                tokio::select! {
                    _ = abort.cancelled() => {}
                    _ = send.stopped() => {}
                }
            }
            return;
        }
        let len: usize = chunks.iter().map(|c| c.len()).sum();
        let result = tokio::select! {
            biased;
            _ = abort.cancelled() => break,
            result = async {
                if stream.is_none() {
                    stream = Some(conn.open_uni().await.map_err(|e| e.to_string())?);
                }
                let send = stream.as_mut().expect("opened");
                send.write_all_chunks(&mut chunks).await.map_err(|e| e.to_string())
            } => result,
        };
        chunks.clear();
        let event = match result {
            Ok(()) => LaneWriterEvent::Written(len),
            Err(e) => LaneWriterEvent::Failed(e),
        };
        let failed = matches!(event, LaneWriterEvent::Failed(_));
        if events.send(event).is_err() || failed {
            return;
        }
    }
    if let Some(mut send) = stream {
        let _ = send.reset(CLOSED_CODE);
    }
}
