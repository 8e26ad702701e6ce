//! Streams by sender: an e2e session carries each sending process's
//! packets on a lane (a unidirectional QUIC stream, one of
//! [`LANES`]) picked from its pid by [`DistRouter`], so that a small
//! message never waits behind another process's megabytes, in the
//! carrier's queues or behind a lost packet.
//!
//! - [`Outbox`]: what the owner sent, routed into per-stream queues (the
//!   control stream, and one queue per lane), each drained by a writer of
//!   its own ([`Outbox::next_chunks`]), [`TURN_BYTES`] at a time: a lane
//!   waiting for QUIC flow control (its peer has not read a hole a lost
//!   packet left) holds up that lane alone.
//! - [`LaneInbox`]: the peer's lanes, read by a task each into one channel
//!   (each with its own byte budget, past which it stops reading and QUIC
//!   flow control holds that lane alone), and fences held until every
//!   lane has passed their barrier.
//!
//! On the wire, lane frames are 4-byte-length packets as on the control
//! stream. A fence (a packet whose sender the router cannot name) is a
//! barrier frame `[0, Id:64]` on every lane used so far, and on the control
//! stream `[1, Id:64, Lanes:32, Packet]`: the receiver delivers the packet
//! once `Lanes` barriers `Id` arrived, so it comes after everything sent
//! before it. Dist packets start with 131 or 112 and ticks are empty, so
//! the two cannot be mistaken for them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
pub use macula_relay_proto::node::dist_route::LANES;
use macula_relay_proto::node::dist_route::{DistRouter, Route};
use macula_relay_proto::wire::packet::{Framer, Packet};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Most bytes of one stream handed to quinn in one turn.
pub const TURN_BYTES: usize = 32 * 1024;
/// Undelivered bytes one lane may hold on the receiving side (a larger
/// packet takes it whole): with [`LANES`] lanes, at most 16 MiB a session.
const LANE_BUDGET: usize = 256 * 1024;
/// Fences a receiver keeps count of at once.
const MAX_OPEN_FENCES: usize = 1024;
const BARRIER: u8 = 0;
const FENCE: u8 = 1;
const BARRIER_LEN: usize = 9;
const FENCE_HEADER: usize = 13;

/// Which stream a turn writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// The tunnel's own (bidirectional) stream.
    Control,
    /// Lane `n`, opened on its first turn.
    Lane(usize),
}

/// The outbound queues of one tunnel.
pub struct Outbox {
    state: Mutex<OutboxState>,
    /// Wakes the writer of the control stream (0) or of lane `n` (n + 1).
    ready: Vec<Notify>,
    /// Bytes queued and not yet handed to quinn.
    queued: AtomicUsize,
    /// Packets sent behind a fence.
    pub fences: AtomicU64,
    /// Wakes whoever starts lane writers: a lane got its first packet.
    lane_added: Notify,
}

struct OutboxState {
    closed: bool,
    control: VecDeque<Bytes>,
    lanes: Vec<VecDeque<Bytes>>,
    /// Lanes that ever had a packet (a fence must pass them all).
    used: u64,
    /// Set once the data phase routes by sender.
    router: Option<DistRouter>,
    next_fence: u64,
}

impl Default for OutboxState {
    fn default() -> Self {
        OutboxState {
            closed: false,
            control: VecDeque::new(),
            lanes: (0..LANES).map(|_| VecDeque::new()).collect(),
            used: 0,
            router: None,
            next_fence: 0,
        }
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            state: Mutex::default(),
            ready: (0..=LANES).map(|_| Notify::new()).collect(),
            queued: AtomicUsize::new(0),
            fences: AtomicU64::new(0),
            lane_added: Notify::new(),
        }
    }
}

fn slot(turn: Turn) -> usize {
    match turn {
        Turn::Control => 0,
        Turn::Lane(lane) => lane + 1,
    }
}

/// Nothing more can be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxClosed;

impl Outbox {
    /// From now on, `push` takes 4-byte-framed dist packets and routes
    /// each by its sender.
    pub fn split_by_sender(&self) {
        self.lock().router.get_or_insert_with(DistRouter::new);
    }

    /// Whether packets are routed by sender.
    pub fn is_split(&self) -> bool {
        self.lock().router.is_some()
    }

    /// Lanes used so far.
    pub fn lanes_used(&self) -> u32 {
        self.lock().used.count_ones()
    }

    /// A bit per lane that ever had a packet.
    pub fn used_lanes(&self) -> u64 {
        self.lock().used
    }

    /// Waits until a lane gets its first packet (at once if one did since
    /// the last wait).
    pub async fn lane_added(&self) {
        self.lane_added.notified().await
    }

    /// Bytes queued, not yet handed to quinn.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `data`; answers the bytes queued after it.
    pub fn push(&self, data: Bytes) -> Result<usize, OutboxClosed> {
        let mut s = self.lock();
        if s.closed {
            return Err(OutboxClosed);
        }
        let before = s.waiting();
        let used_before = s.used;
        let added = if s.router.is_some() {
            s.route_batch(data, &self.fences)
        } else {
            let len = data.len();
            s.control.push_back(data);
            len
        };
        let woken = s.waiting() & !before;
        let new_lane = s.used != used_before;
        drop(s);
        if new_lane {
            self.lane_added.notify_one();
        }
        for (i, ready) in self.ready.iter().enumerate() {
            if woken & (1u128 << i) != 0 {
                ready.notify_one();
            }
        }
        Ok(self.queued.fetch_add(added, Ordering::AcqRel) + added)
    }

    /// No more pushes; the writer sends what is queued, then finishes.
    pub fn close(&self) {
        self.lock().closed = true;
        for ready in &self.ready {
            ready.notify_one();
        }
    }

    /// The next chunks of `stream` (in `out`, at most [`TURN_BYTES`]):
    /// `false` once the outbox is closed and that stream's queue drained.
    pub async fn next_chunks(&self, stream: Turn, out: &mut Vec<Bytes>) -> bool {
        loop {
            {
                let mut s = self.lock();
                let queue = s.queue(stream);
                if !queue.is_empty() {
                    take_chunks(queue, out);
                    return true;
                }
                if s.closed {
                    return false;
                }
            }
            self.ready[slot(stream)].notified().await;
        }
    }

    /// `len` bytes of a turn are in quinn's hands; answers what is left.
    pub fn written(&self, len: usize) -> usize {
        self.queued.fetch_sub(len, Ordering::AcqRel) - len
    }
}

impl OutboxState {
    /// Splits a batch of `<<Size:32, Packet>>` into the queues; answers the
    /// bytes queued (barriers and fence headers included). Consecutive
    /// packets of one lane stay one slice of the batch: a sender's burst
    /// of small messages is one chunk for quinn, not one each.
    fn route_batch(&mut self, data: Bytes, fences: &AtomicU64) -> usize {
        let mut added = 0;
        let mut pos = 0;
        // The lane of the packets from `run_start` to `pos`, not yet queued.
        let mut run: Option<(usize, usize)> = None;
        while data.len() - pos >= 4 {
            let size = u32::from_be_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
            if size > data.len() - pos - 4 {
                break;
            }
            let end = pos + 4 + size;
            let router = self.router.as_mut().expect("routing");
            let route = router.route(&data[pos + 4..end]);
            match (route, run) {
                (Route::Lane(lane), Some((run_lane, _))) if lane == run_lane => {}
                (Route::Lane(lane), _) => {
                    added += self.end_run(&data, run, pos);
                    run = Some((lane, pos));
                }
                (Route::Control, _) => {
                    added += self.end_run(&data, run.take(), pos);
                    added += end - pos;
                    self.control.push_back(data.slice(pos..end));
                }
                (Route::Fence, _) => {
                    added += self.end_run(&data, run.take(), pos);
                    fences.fetch_add(1, Ordering::Relaxed);
                    added += self.fence(data.slice(pos + 4..end));
                }
            }
            pos = end;
        }
        added += self.end_run(&data, run, pos);
        // Not whole packets (the VM never gives those): kept in order, on
        // the control stream.
        if pos < data.len() {
            added += data.len() - pos;
            self.control.push_back(data.slice(pos..));
        }
        added
    }

    /// Queues a run of one lane's packets, `data[start..end]`.
    fn end_run(&mut self, data: &Bytes, run: Option<(usize, usize)>, end: usize) -> usize {
        let Some((lane, start)) = run else {
            return 0;
        };
        self.used |= 1u64 << lane;
        self.lanes[lane].push_back(data.slice(start..end));
        end - start
    }

    fn fence(&mut self, packet: Bytes) -> usize {
        let id = self.next_fence;
        self.next_fence += 1;
        let mut barrier = BytesMut::with_capacity(4 + BARRIER_LEN);
        barrier.put_u32(BARRIER_LEN as u32);
        barrier.put_u8(BARRIER);
        barrier.put_u64(id);
        let barrier = barrier.freeze();
        let mut added = 0;
        for lane in (0..LANES).filter(|l| self.used & (1u64 << l) != 0) {
            added += barrier.len();
            self.lanes[lane].push_back(barrier.clone());
        }
        let mut head = BytesMut::with_capacity(4 + FENCE_HEADER);
        head.put_u32((FENCE_HEADER + packet.len()) as u32);
        head.put_u8(FENCE);
        head.put_u64(id);
        head.put_u32(self.used.count_ones());
        added += head.len() + packet.len();
        self.control.push_back(head.freeze());
        self.control.push_back(packet);
        added
    }

    fn queue(&mut self, stream: Turn) -> &mut VecDeque<Bytes> {
        match stream {
            Turn::Control => &mut self.control,
            Turn::Lane(lane) => &mut self.lanes[lane],
        }
    }

    /// A bit per stream with something queued (as [`slot`] numbers them).
    fn waiting(&self) -> u128 {
        let lanes = (0..LANES)
            .filter(|&l| !self.lanes[l].is_empty())
            .fold(0, |bits, l| bits | 1u128 << (l + 1));
        lanes | u128::from(!self.control.is_empty())
    }
}

/// Up to [`TURN_BYTES`] from the front of `queue`, cutting a large packet
/// (its rest stays first in the queue): a 1 MiB message is many turns, so
/// a small one on another lane waits for one turn, not for the megabyte
/// to get into quinn's buffer.
fn take_chunks(queue: &mut VecDeque<Bytes>, out: &mut Vec<Bytes>) {
    let mut bytes = 0;
    while bytes < TURN_BYTES {
        let Some(front) = queue.front_mut() else {
            break;
        };
        let room = TURN_BYTES - bytes;
        if front.len() > room {
            out.push(front.split_to(room));
            break;
        }
        bytes += front.len();
        out.push(queue.pop_front().expect("front"));
    }
}

/// What a lane reader tells the tunnel's reader.
pub enum LaneEvent {
    /// Packets in order; their budget comes back when the permit (given
    /// with the last of them) is dropped.
    Packets(Vec<Bytes>, OwnedSemaphorePermit),
    /// A lane passed barrier `id`.
    Barrier(u64),
    /// A lane broke the framing.
    Broken(String),
}

/// Accepts the peer's lanes on `conn` and reads each, until `stop`.
pub fn read_lanes(
    conn: quinn::Connection,
    max_frame: usize,
    stop: CancellationToken,
) -> mpsc::UnboundedReceiver<LaneEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let recv = tokio::select! {
                recv = conn.accept_uni() => recv,
                _ = stop.cancelled() => return,
            };
            let Ok(recv) = recv else { return };
            tokio::spawn(read_lane(recv, max_frame, tx.clone(), stop.clone()));
        }
    });
    rx
}

async fn read_lane(
    mut recv: quinn::RecvStream,
    max_frame: usize,
    tx: mpsc::UnboundedSender<LaneEvent>,
    stop: CancellationToken,
) {
    let budget = Arc::new(Semaphore::new(LANE_BUDGET));
    let mut framer = Framer::new(Packet::Four, max_frame);
    let mut chunks: Vec<Bytes> = vec![Bytes::new(); 32];
    let mut packets: Vec<Bytes> = vec![];
    loop {
        // Every whole packet read so far goes in one event (up to the
        // budget, and up to a barrier, which keeps its place).
        let mut bytes = 0;
        loop {
            let frame = match framer.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(LaneEvent::Broken(format!("lane packet of {} bytes", e.len)));
                    return;
                }
            };
            let barrier = barrier_id(&frame);
            if barrier.is_none() {
                bytes += frame.len();
                packets.push(frame);
            }
            if barrier.is_some() || bytes >= LANE_BUDGET {
                let sent = hand_over(&mut packets, bytes, &budget, &tx, &stop).await;
                bytes = 0;
                if !sent || barrier.is_some_and(|id| tx.send(LaneEvent::Barrier(id)).is_err()) {
                    return;
                }
            }
        }
        if !hand_over(&mut packets, bytes, &budget, &tx, &stop).await {
            return;
        }
        let read = tokio::select! {
            read = recv.read_chunks(&mut chunks) => read,
            _ = stop.cancelled() => return,
        };
        match read {
            Ok(Some(n)) => {
                for chunk in &mut chunks[..n] {
                    framer.push(chunk);
                    *chunk = Bytes::new();
                }
            }
            // Finished, or reset with the connection: the control stream
            // tells the tunnel.
            Ok(None) | Err(_) => return,
        }
    }
}

/// Sends `packets` (`bytes` in all) as one event once the lane's budget
/// has room for them; false when the tunnel is gone.
async fn hand_over(
    packets: &mut Vec<Bytes>,
    bytes: usize,
    budget: &Arc<Semaphore>,
    tx: &mpsc::UnboundedSender<LaneEvent>,
    stop: &CancellationToken,
) -> bool {
    if packets.is_empty() {
        return true;
    }
    let need = bytes.clamp(1, LANE_BUDGET) as u32;
    let permit = tokio::select! {
        p = budget.clone().acquire_many_owned(need) => p,
        _ = stop.cancelled() => return false,
    };
    let Ok(permit) = permit else { return false };
    tx.send(LaneEvent::Packets(std::mem::take(packets), permit))
        .is_ok()
}

fn barrier_id(frame: &[u8]) -> Option<u64> {
    match frame {
        [BARRIER, id @ ..] if id.len() == 8 => Some(u64::from_be_bytes(id.try_into().ok()?)),
        _ => None,
    }
}

/// A fence read from the control stream: `(id, lanes, packet)`.
pub fn fence_of(frame: &Bytes) -> Option<(u64, u32, Bytes)> {
    if frame.len() < FENCE_HEADER || frame[0] != FENCE {
        return None;
    }
    let id = u64::from_be_bytes(frame[1..9].try_into().ok()?);
    let lanes = u32::from_be_bytes(frame[9..13].try_into().ok()?);
    Some((id, lanes, frame.slice(FENCE_HEADER..)))
}

/// The receiving side of the lanes: packets ready to deliver, in each
/// lane's order, and at most one fence waiting for its barriers.
pub struct LaneInbox {
    rx: mpsc::UnboundedReceiver<LaneEvent>,
    barriers: HashMap<u64, u32>,
    fence: Option<(u64, u32, Bytes)>,
    ready: VecDeque<(Bytes, Option<OwnedSemaphorePermit>)>,
}

impl LaneInbox {
    /// Reads the peer's lanes on `conn` until `stop`.
    pub fn start(conn: quinn::Connection, max_frame: usize, stop: CancellationToken) -> Self {
        LaneInbox {
            rx: read_lanes(conn, max_frame, stop),
            barriers: HashMap::new(),
            fence: None,
            ready: VecDeque::new(),
        }
    }

    /// Whether a fence waits (the control stream is not read meanwhile).
    pub fn fence_waits(&self) -> bool {
        self.fence.is_some()
    }

    /// Holds a fence until its barriers are in.
    pub fn hold_fence(&mut self, fence: (u64, u32, Bytes)) {
        self.fence = Some(fence);
        self.release_fence();
    }

    /// Takes what the lanes have sent, without waiting.
    pub fn poll_lanes(&mut self) -> Result<(), String> {
        while let Ok(event) = self.rx.try_recv() {
            self.take(event)?;
        }
        Ok(())
    }

    /// Waits for the lanes' next event (never, once they are all gone).
    pub async fn wait(&mut self) -> Result<(), String> {
        match self.rx.recv().await {
            Some(event) => self.take(event),
            None => std::future::pending().await,
        }
    }

    fn take(&mut self, event: LaneEvent) -> Result<(), String> {
        match event {
            LaneEvent::Packets(packets, permit) => {
                let last = packets.len().saturating_sub(1);
                let mut permit = Some(permit);
                for (i, packet) in packets.into_iter().enumerate() {
                    self.ready
                        .push_back((packet, if i == last { permit.take() } else { None }));
                }
            }
            LaneEvent::Barrier(id) => {
                if self.barriers.len() >= MAX_OPEN_FENCES && !self.barriers.contains_key(&id) {
                    return Err("too many open fences".into());
                }
                *self.barriers.entry(id).or_default() += 1;
                self.release_fence();
            }
            LaneEvent::Broken(why) => return Err(why),
        }
        Ok(())
    }

    fn release_fence(&mut self) {
        let Some((id, lanes, _)) = &self.fence else {
            return;
        };
        let passed = self.barriers.get(id).copied().unwrap_or(0);
        if passed >= *lanes {
            let (id, _, packet) = self.fence.take().expect("fence");
            self.barriers.remove(&id);
            self.ready.push_back((packet, None));
        }
    }

    /// The next packet ready to deliver.
    pub fn next_ready(&mut self) -> Option<(Bytes, Option<OwnedSemaphorePermit>)> {
        self.ready.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(sender_id: u32, body: &[u8]) -> Vec<u8> {
        // 112, {22, Pid, Pid}: SEND_SENDER from a pid with that number.
        let mut p = vec![112, 131, 104, 3, 97, 22];
        for id in [sender_id, 1] {
            p.extend([88, 119, 3]);
            p.extend(b"a@b");
            p.extend(id.to_be_bytes());
            p.extend([0, 0, 0, 0, 0, 0, 0, 1]);
        }
        p.extend(body);
        let mut framed = (p.len() as u32).to_be_bytes().to_vec();
        framed.extend(p);
        framed
    }

    /// Every stream's turns as its writer would take them: the control
    /// stream's, then each lane's.
    fn turns(outbox: &Outbox) -> Vec<(Turn, Vec<Bytes>)> {
        let mut s = outbox.lock();
        let mut out = vec![];
        for turn in std::iter::once(Turn::Control).chain((0..LANES).map(Turn::Lane)) {
            while !s.queue(turn).is_empty() {
                let mut chunks = vec![];
                take_chunks(s.queue(turn), &mut chunks);
                out.push((turn, chunks));
            }
        }
        out
    }

    #[test]
    fn before_the_split_everything_is_one_stream() {
        let outbox = Outbox::default();
        outbox.push(Bytes::from(packet(1, b"x"))).unwrap();
        outbox.push(Bytes::from_static(&[0, 0, 0, 0])).unwrap();
        let t = turns(&outbox);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, Turn::Control);
        assert_eq!(t[0].1.len(), 2);
    }

    #[test]
    fn senders_get_lanes_and_a_sender_keeps_its_lane() {
        let outbox = Outbox::default();
        outbox.split_by_sender();
        let mut batch = vec![];
        for i in 0..64 {
            batch.extend(packet(i % 8, &[i as u8]));
        }
        batch.extend([0, 0, 0, 0]); // a tick
        let queued = outbox.push(Bytes::from(batch.clone())).unwrap();
        assert_eq!(queued, batch.len());
        let t = turns(&outbox);
        assert_eq!(t[0].0, Turn::Control, "the tick goes first");
        let mut lane_bytes: HashMap<usize, Vec<u8>> = HashMap::new();
        for (turn, chunks) in &t[1..] {
            let Turn::Lane(l) = turn else {
                panic!("{turn:?}")
            };
            for c in chunks {
                lane_bytes.entry(*l).or_default().extend_from_slice(c);
            }
        }
        // Each packet's body is its last byte.
        let per_lane: HashMap<usize, Vec<u8>> = lane_bytes
            .into_iter()
            .map(|(lane, mut bytes)| {
                let mut bodies = vec![];
                while !bytes.is_empty() {
                    let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
                    bodies.push(bytes[3 + len]);
                    bytes.drain(..4 + len);
                }
                (lane, bodies)
            })
            .collect();
        assert!(per_lane.len() > 1);
        // Each lane holds whole senders, in the order they sent.
        for bodies in per_lane.values() {
            let mut last = HashMap::new();
            for b in bodies {
                let prev = last.insert(b % 8, *b);
                assert!(prev.is_none_or(|p| p < *b));
            }
        }
        let total: usize = per_lane.values().map(|v| v.len()).sum();
        assert_eq!(total, 64);
        assert_eq!(outbox.fences.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_senders_burst_is_one_chunk() {
        let outbox = Outbox::default();
        outbox.split_by_sender();
        let batch: Vec<u8> = (0..100).flat_map(|i| packet(7, &[i])).collect();
        outbox.push(Bytes::from(batch.clone())).unwrap();
        let t = turns(&outbox);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].1.len(), 1);
        assert_eq!(&t[0].1[0][..], &batch[..]);
    }

    #[test]
    fn an_unnamed_sender_goes_behind_a_barrier_on_every_used_lane() {
        let outbox = Outbox::default();
        outbox.split_by_sender();
        let mut batch = packet(1, b"a");
        batch.extend(packet(2, b"b"));
        batch.extend([0, 0, 0, 3, 112, 131, 106]); // not a control message
        outbox.push(Bytes::from(batch)).unwrap();
        let used = outbox.lanes_used();
        let t = turns(&outbox);
        let (turn, chunks) = &t[0];
        assert_eq!(*turn, Turn::Control);
        let head = chunks[0].clone();
        let (id, lanes, _) = fence_of(&head.slice(4..)).unwrap();
        assert_eq!((id, lanes), (0, used));
        assert_eq!(&chunks[1][..], &[112, 131, 106]);
        let barriers = t[1..]
            .iter()
            .filter(|(_, c)| c.last().and_then(|c| barrier_id(&c[4..])) == Some(0))
            .count();
        assert_eq!(barriers as u32, used);
    }

    #[tokio::test]
    async fn a_lanes_writer_does_not_wait_for_another_lane() {
        let outbox = Outbox::default();
        outbox.split_by_sender();
        let big = vec![7u8; 100_000];
        let mut batch = vec![];
        for _ in 0..10 {
            batch.extend(packet(3, &big));
        }
        // A pinger on another lane than the bulk sender's.
        let mut router = DistRouter::new();
        let mut lane = |id| router.route(&packet(id, b"")[4..]);
        let Route::Lane(bulk) = lane(3) else { panic!() };
        let pinger = (4..).find(|&id| lane(id) != Route::Lane(bulk)).unwrap();
        let Route::Lane(ping) = lane(pinger) else {
            panic!()
        };
        batch.extend(packet(pinger, b"ping"));
        outbox.push(Bytes::from(batch)).unwrap();
        // The bulk lane's writer has taken one turn (and is stuck in quinn,
        // say); the pinger's writer gets the ping at once.
        let mut chunks = vec![];
        assert!(outbox.next_chunks(Turn::Lane(bulk), &mut chunks).await);
        assert!(chunks.iter().map(|c| c.len()).sum::<usize>() <= TURN_BYTES);
        let mut chunks = vec![];
        assert!(outbox.next_chunks(Turn::Lane(ping), &mut chunks).await);
        assert!(chunks.concat().ends_with(b"ping"));
        // Closed: each writer drains its own queue, then hears the end.
        outbox.close();
        let mut n = 0;
        while outbox.next_chunks(Turn::Lane(bulk), &mut vec![]).await {
            n += 1;
        }
        assert!(n > 20);
        assert!(!outbox.next_chunks(Turn::Lane(ping), &mut vec![]).await);
    }

    #[test]
    fn cut_packets_go_out_whole_and_in_order() {
        let outbox = Outbox::default();
        outbox.split_by_sender();
        let mut batch = vec![];
        for i in 0..5u8 {
            batch.extend(packet(9, &vec![i; 70_000 + usize::from(i)]));
        }
        outbox.push(Bytes::from(batch.clone())).unwrap();
        let sent: Vec<u8> = turns(&outbox)
            .into_iter()
            .flat_map(|(_, chunks)| chunks)
            .flat_map(|c| c.to_vec())
            .collect();
        assert_eq!(sent, batch);
    }

    #[test]
    fn a_fence_waits_for_every_barrier() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inbox = LaneInbox {
            rx,
            barriers: HashMap::new(),
            fence: None,
            ready: VecDeque::new(),
        };
        let sem = Arc::new(Semaphore::new(10));
        let permit = || sem.clone().try_acquire_owned().unwrap();
        tx.send(LaneEvent::Packets(
            vec![Bytes::from_static(b"a1")],
            permit(),
        ))
        .unwrap();
        tx.send(LaneEvent::Barrier(5)).unwrap();
        inbox.poll_lanes().unwrap();
        inbox.hold_fence((5, 2, Bytes::from_static(b"fenced")));
        assert!(inbox.fence_waits());
        tx.send(LaneEvent::Packets(
            vec![Bytes::from_static(b"b1")],
            permit(),
        ))
        .unwrap();
        tx.send(LaneEvent::Barrier(5)).unwrap();
        inbox.poll_lanes().unwrap();
        assert!(!inbox.fence_waits());
        let order: Vec<_> = std::iter::from_fn(|| inbox.next_ready())
            .map(|(p, _)| p)
            .collect();
        assert_eq!(order, vec!["a1", "b1", "fenced"]);
    }
}
