//! The impairment logic for one direction of one client, without I/O.
//!
//! [`decide`] says what happens to one datagram arriving at `now`: dropped
//! (blackhole or loss), or delivered at a deadline, perhaps with a duplicate
//! copy, perhaps held back behind the datagrams that follow it. [`Link`] is
//! the queue around it: [`Link::push`] a datagram, [`Link::poll`] for those
//! whose time has come, [`Link::next_deadline`] for when to poll again. The
//! clock is a parameter everywhere, so all of it is tested with made-up
//! instants and no sockets; the proxy only adds the sockets and a timer.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::rng::Rng;

/// How long a datagram held back for reordering waits for a later one to
/// overtake it before it is sent anyway (beyond its own deadline).
pub const DEFAULT_REORDER_HOLD: Duration = Duration::from_millis(50);

/// Most datagrams queued in one link; more are dropped (counted in
/// [`Counters::dropped`]), like a full router queue.
pub const DEFAULT_QUEUE_LIMIT: usize = 10_000;

/// The impairments of one direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Fixed delay added to every datagram.
    pub delay: Duration,
    /// Extra random delay, uniform in `[0, jitter]`, drawn per datagram (so
    /// jitter alone reorders datagrams too, as on a real path). `delay` stays
    /// a strict lower bound.
    pub jitter: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is sent twice (the copy gets its own
    /// jitter).
    pub duplicate: f64,
    /// Probability that a datagram is held back until a later datagram of
    /// the same link has been sent (or `reorder_hold` past its deadline).
    pub reorder: f64,
    /// See [`DEFAULT_REORDER_HOLD`].
    pub reorder_hold: Duration,
    /// Drop everything, including datagrams already queued when it is
    /// switched on.
    pub blackhole: bool,
    /// A bottleneck of this many bytes per second (0: none). Datagrams
    /// leave it one after another at this rate, then take `delay`.
    pub rate: u64,
    /// The bottleneck's drop-tail queue, as the time it takes to drain at
    /// `rate`: a datagram that would wait longer is dropped (zero: no
    /// limit but the link's queue limit).
    pub queue: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_hold: DEFAULT_REORDER_HOLD,
            blackhole: false,
            rate: 0,
            queue: Duration::ZERO,
        }
    }
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Blackhole,
    Loss,
    QueueFull,
    /// The bottleneck's queue was full (drop-tail).
    Bottleneck,
}

/// The fate of one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Drop(DropReason),
    Deliver {
        /// Not sent before this instant.
        at: Instant,
        /// A second copy, not sent before this instant.
        duplicate_at: Option<Instant>,
        /// Held back: sent after a later datagram (or at `at +
        /// reorder_hold` if none comes), never before `at`.
        held: bool,
    },
}

/// Decides the fate of a datagram arriving at `now`. Draws from `rng` in a
/// fixed order (loss, delay, duplicate, reorder), so a seed fixes the result.
pub fn decide(params: &Params, rng: &mut Rng, now: Instant) -> Decision {
    if params.blackhole {
        return Decision::Drop(DropReason::Blackhole);
    }
    if rng.chance(params.loss) {
        return Decision::Drop(DropReason::Loss);
    }
    let at = now + params.delay + rng.duration_up_to(params.jitter);
    let duplicate_at = rng
        .chance(params.duplicate)
        .then(|| now + params.delay + rng.duration_up_to(params.jitter));
    let held = rng.chance(params.reorder);
    Decision::Deliver {
        at,
        duplicate_at,
        held,
    }
}

/// Counters of one direction. Always `received + duplicated == forwarded +
/// dropped + queued`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams that arrived.
    pub received: u64,
    /// Datagrams sent on (copies included).
    pub forwarded: u64,
    /// Datagrams dropped for any reason (loss, blackhole, full queue).
    pub dropped: u64,
    /// Of `dropped`, those dropped by the blackhole.
    pub blackholed: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Datagrams held back for reordering.
    pub reordered: u64,
}

impl Counters {
    /// Datagrams still waiting in the queue.
    pub fn queued(&self) -> u64 {
        (self.received + self.duplicated).saturating_sub(self.forwarded + self.dropped)
    }

    /// Field-wise sum.
    pub fn add(&mut self, other: &Counters) {
        self.received += other.received;
        self.forwarded += other.forwarded;
        self.dropped += other.dropped;
        self.blackholed += other.blackholed;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
    }

    fn drop_for(&mut self, reason: DropReason) {
        self.dropped += 1;
        if reason == DropReason::Blackhole {
            self.blackholed += 1;
        }
    }
}

/// A queued datagram: sent at `at`; `order` breaks ties (first queued,
/// first sent); `seq` is the arrival number of the datagram it is (a copy
/// shares its original's).
struct Entry<T> {
    at: Instant,
    order: u64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // Reversed: BinaryHeap is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

/// A datagram held back for reordering.
struct Held<T> {
    seq: u64,
    at: Instant,
    until: Instant,
    item: T,
}

/// One direction of one client: the impairment queue.
pub struct Link<T> {
    rng: Rng,
    queue: BinaryHeap<Entry<T>>,
    held: Vec<Held<T>>,
    next_seq: u64,
    next_order: u64,
    limit: usize,
    /// When the bottleneck has sent everything it took so far.
    busy_until: Option<Instant>,
    /// Jitter keeps datagrams in order (a path's queueing delay varies,
    /// it does not reorder); `reorder` still reorders.
    keep_order: bool,
    /// The latest delivery time given so far (for `keep_order`).
    last_at: Option<Instant>,
}

impl<T: Clone> Link<T> {
    /// A link whose random decisions are fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_rng(Rng::new(seed), DEFAULT_QUEUE_LIMIT)
    }

    /// A link drawing from `rng`, holding at most `limit` datagrams.
    pub fn with_rng(rng: Rng, limit: usize) -> Self {
        Link {
            rng,
            queue: BinaryHeap::new(),
            held: Vec::new(),
            next_seq: 0,
            next_order: 0,
            limit,
            busy_until: None,
            keep_order: false,
            last_at: None,
        }
    }

    /// Jitter no longer reorders datagrams (as on a wired path): each is
    /// delivered no earlier than the one before it.
    pub fn keep_order(mut self) -> Self {
        self.keep_order = true;
        self
    }

    /// Datagrams waiting (queued or held).
    pub fn len(&self) -> usize {
        self.queue.len() + self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A datagram arrives at `now`: decides its fate with `params`, queues
    /// it unless dropped, and counts it in `counters`. Its size does not
    /// count (see [`Link::push_sized`]).
    pub fn push(
        &mut self,
        params: &Params,
        counters: &mut Counters,
        now: Instant,
        item: T,
    ) -> Decision {
        self.push_sized(params, counters, now, item, 0)
    }

    /// [`Link::push`] for a datagram of `len` bytes, which the bottleneck
    /// (`params.rate`) takes `len / rate` to send.
    pub fn push_sized(
        &mut self,
        params: &Params,
        counters: &mut Counters,
        now: Instant,
        item: T,
        len: usize,
    ) -> Decision {
        counters.received += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        if params.blackhole {
            counters.drop_for(DropReason::Blackhole);
            return Decision::Drop(DropReason::Blackhole);
        }
        let sent = match self.bottleneck(params, now, len) {
            Some(sent) => sent,
            None => {
                counters.drop_for(DropReason::Bottleneck);
                return Decision::Drop(DropReason::Bottleneck);
            }
        };
        let mut decision = decide(params, &mut self.rng, sent);
        if matches!(decision, Decision::Deliver { .. }) && self.len() >= self.limit {
            decision = Decision::Drop(DropReason::QueueFull);
        }
        if let (true, Decision::Deliver { at, .. }) = (self.keep_order, &mut decision) {
            if let Some(last) = self.last_at {
                *at = (*at).max(last);
            }
            self.last_at = Some(*at);
        }
        match decision {
            Decision::Drop(reason) => counters.drop_for(reason),
            Decision::Deliver {
                at,
                duplicate_at,
                held,
            } => {
                if let Some(copy_at) = duplicate_at {
                    counters.duplicated += 1;
                    self.enqueue(copy_at, seq, item.clone());
                }
                if held {
                    counters.reordered += 1;
                    self.held.push(Held {
                        seq,
                        at,
                        until: at + params.reorder_hold,
                        item,
                    });
                } else {
                    self.enqueue(at, seq, item);
                }
            }
        }
        decision
    }

    /// The next datagram to send at `now`, if any is due. Call until `None`.
    /// With `params.blackhole` on, due datagrams are dropped instead.
    pub fn poll(&mut self, params: &Params, counters: &mut Counters, now: Instant) -> Option<T> {
        loop {
            self.release_expired(now);
            if self.queue.peek()?.at > now {
                return None;
            }
            let entry = self.queue.pop()?;
            if params.blackhole {
                counters.drop_for(DropReason::Blackhole);
                continue;
            }
            self.release_overtaken(entry.seq);
            counters.forwarded += 1;
            return Some(entry.item);
        }
    }

    /// When a datagram of `len` bytes arriving at `now` has left the
    /// bottleneck, or `None` if its queue is full (drop-tail).
    fn bottleneck(&mut self, params: &Params, now: Instant, len: usize) -> Option<Instant> {
        if params.rate == 0 {
            return Some(now);
        }
        let start = self.busy_until.map_or(now, |b| b.max(now));
        if !params.queue.is_zero() && start - now > params.queue {
            return None;
        }
        let serialize = Duration::from_secs_f64(len as f64 / params.rate as f64);
        self.busy_until = Some(start + serialize);
        Some(start + serialize)
    }

    /// When [`Link::poll`] next has something to do, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let queued = self.queue.peek().map(|e| e.at);
        let held = self.held.iter().map(|h| h.until).min();
        match (queued, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn enqueue(&mut self, at: Instant, seq: u64, item: T) {
        let order = self.next_order;
        self.next_order += 1;
        self.queue.push(Entry {
            at,
            order,
            seq,
            item,
        });
    }

    /// Held datagrams nobody overtook in time: queue them at their limit.
    fn release_expired(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].until <= now {
                let h = self.held.remove(i);
                self.enqueue(h.until, h.seq, h.item);
            } else {
                i += 1;
            }
        }
    }

    /// A datagram that arrived as number `seq` was just sent: every held
    /// datagram that arrived before it has now been overtaken and goes next
    /// (or at its own deadline, if that is still ahead).
    fn release_overtaken(&mut self, seq: u64) {
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].seq < seq {
                let h = self.held.remove(i);
                self.enqueue(h.at, h.seq, h.item);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Everything due at `now`.
    fn drain(link: &mut Link<u32>, p: &Params, c: &mut Counters, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| link.poll(p, c, now)).collect()
    }

    /// Runs the link's clock forward until it is empty, collecting the
    /// output in order.
    fn run_out(link: &mut Link<u32>, p: &Params, c: &mut Counters) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(t) = link.next_deadline() {
            out.extend(drain(link, p, c, t));
        }
        out
    }

    #[test]
    fn clean_link_is_in_order_and_immediate() {
        let t0 = Instant::now();
        let p = Params::default();
        let mut c = Counters::default();
        let mut link = Link::new(1);
        for i in 0..100 {
            let d = link.push(&p, &mut c, t0, i);
            assert_eq!(
                d,
                Decision::Deliver {
                    at: t0,
                    duplicate_at: None,
                    held: false
                }
            );
        }
        assert_eq!(
            drain(&mut link, &p, &mut c, t0),
            (0..100).collect::<Vec<_>>()
        );
        assert_eq!(
            c,
            Counters {
                received: 100,
                forwarded: 100,
                ..Counters::default()
            }
        );
        assert!(link.is_empty());
        assert_eq!(link.next_deadline(), None);
    }

    #[test]
    fn loss_rate_within_bounds() {
        let t0 = Instant::now();
        let p = Params {
            loss: 0.1,
            ..Params::default()
        };
        for seed in [1, 2, 3] {
            let mut c = Counters::default();
            let mut link = Link::with_rng(Rng::new(seed), usize::MAX);
            let n = 100_000;
            for i in 0..n {
                link.push(&p, &mut c, t0, i);
            }
            let out = drain(&mut link, &p, &mut c, t0);
            let rate = c.dropped as f64 / n as f64;
            assert!(
                (0.09..0.11).contains(&rate),
                "seed {seed}: loss rate {rate}"
            );
            assert_eq!(out.len() as u64, c.forwarded);
            assert_eq!(c.forwarded + c.dropped, n as u64);
            // Survivors keep their order.
            assert!(out.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn loss_extremes() {
        let t0 = Instant::now();
        let mut c = Counters::default();
        let mut link = Link::new(5);
        let all = Params {
            loss: 1.0,
            ..Params::default()
        };
        for i in 0..1000 {
            assert_eq!(
                link.push(&all, &mut c, t0, i),
                Decision::Drop(DropReason::Loss)
            );
        }
        assert_eq!(c.dropped, 1000);
        assert_eq!(c.blackholed, 0);
        let none = Params::default();
        for i in 0..1000 {
            link.push(&none, &mut c, t0, i);
        }
        assert_eq!(drain(&mut link, &none, &mut c, t0).len(), 1000);
    }

    #[test]
    fn same_seed_same_fate() {
        let t0 = Instant::now();
        let p = Params {
            delay: ms(10),
            jitter: ms(20),
            loss: 0.2,
            duplicate: 0.1,
            reorder: 0.1,
            ..Params::default()
        };
        let run = |seed| {
            let mut c = Counters::default();
            let mut link = Link::new(seed);
            let decisions: Vec<Decision> =
                (0..1000).map(|i| link.push(&p, &mut c, t0, i)).collect();
            (decisions, run_out(&mut link, &p, &mut c), c)
        };
        assert_eq!(run(7).0, run(7).0);
        assert_eq!(run(7).1, run(7).1);
        assert_eq!(run(7).2, run(7).2);
        assert_ne!(run(7).1, run(8).1);
    }

    #[test]
    fn delay_is_respected() {
        let t0 = Instant::now();
        let p = Params {
            delay: ms(50),
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::new(1);
        let d = link.push(&p, &mut c, t0, 1);
        assert_eq!(
            d,
            Decision::Deliver {
                at: t0 + ms(50),
                duplicate_at: None,
                held: false
            }
        );
        link.push(&p, &mut c, t0 + ms(10), 2);
        assert_eq!(link.next_deadline(), Some(t0 + ms(50)));
        assert!(drain(&mut link, &p, &mut c, t0 + ms(49)).is_empty());
        assert_eq!(drain(&mut link, &p, &mut c, t0 + ms(50)), vec![1]);
        assert_eq!(link.next_deadline(), Some(t0 + ms(60)));
        assert!(drain(&mut link, &p, &mut c, t0 + ms(59)).is_empty());
        assert_eq!(drain(&mut link, &p, &mut c, t0 + ms(60)), vec![2]);
    }

    #[test]
    fn jitter_stays_within_delay_plus_jitter_and_varies() {
        let t0 = Instant::now();
        let p = Params {
            delay: ms(20),
            jitter: ms(10),
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::new(3);
        let mut ats = Vec::new();
        for i in 0..1000 {
            match link.push(&p, &mut c, t0, i) {
                Decision::Deliver { at, .. } => ats.push(at),
                d => panic!("{d:?}"),
            }
        }
        assert!(ats.iter().all(|&at| at >= t0 + ms(20) && at <= t0 + ms(30)));
        assert!(ats.iter().any(|&at| at < t0 + ms(22)));
        assert!(ats.iter().any(|&at| at > t0 + ms(28)));
        // Nothing at all before the fixed delay.
        assert!(drain(&mut link, &p, &mut c, t0 + ms(20) - Duration::from_nanos(1)).is_empty());
        let out = run_out(&mut link, &p, &mut c);
        assert_eq!(out.len(), 1000);
        // Jitter reorders (all were sent at the same instant).
        assert!(out.windows(2).any(|w| w[0] > w[1]));
    }

    #[test]
    fn duplicates() {
        let t0 = Instant::now();
        let p = Params {
            duplicate: 1.0,
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::new(1);
        for i in 0..10 {
            link.push(&p, &mut c, t0, i);
        }
        let out = drain(&mut link, &p, &mut c, t0);
        assert_eq!(out.len(), 20);
        for i in 0..10 {
            assert_eq!(out.iter().filter(|&&x| x == i).count(), 2);
        }
        assert_eq!(c.duplicated, 10);
        assert_eq!(c.forwarded, 20);

        // Half of them, roughly, with a seed.
        let p = Params {
            duplicate: 0.5,
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::with_rng(Rng::new(2), usize::MAX);
        for i in 0..10_000 {
            link.push(&p, &mut c, t0, i);
        }
        assert!((4500..5500).contains(&c.duplicated), "{}", c.duplicated);
        assert_eq!(
            drain(&mut link, &p, &mut c, t0).len() as u64,
            10_000 + c.duplicated
        );
    }

    #[test]
    fn held_datagram_goes_behind_the_next_one() {
        let t0 = Instant::now();
        let hold = Params {
            reorder: 1.0,
            ..Params::default()
        };
        let pass = Params::default();
        let mut c = Counters::default();
        let mut link = Link::new(1);
        assert_eq!(
            link.push(&hold, &mut c, t0, 1),
            Decision::Deliver {
                at: t0,
                duplicate_at: None,
                held: true
            }
        );
        // Held: nothing to send yet, only a fallback deadline.
        assert!(drain(&mut link, &pass, &mut c, t0).is_empty());
        assert_eq!(link.next_deadline(), Some(t0 + DEFAULT_REORDER_HOLD));
        link.push(&pass, &mut c, t0 + ms(1), 2);
        link.push(&pass, &mut c, t0 + ms(1), 3);
        assert_eq!(drain(&mut link, &pass, &mut c, t0 + ms(1)), vec![2, 1, 3]);
        assert_eq!(c.reordered, 1);
        assert_eq!(c.forwarded, 3);
    }

    #[test]
    fn held_datagram_waits_for_its_own_deadline() {
        // Overtaken by a datagram with a shorter jittered delay, a held one
        // still never goes before its own deadline.
        let t0 = Instant::now();
        let mut c = Counters::default();
        let mut link = Link::new(1);
        let hold = Params {
            delay: ms(30),
            reorder: 1.0,
            ..Params::default()
        };
        let fast = Params {
            delay: ms(5),
            ..Params::default()
        };
        link.push(&hold, &mut c, t0, 1);
        link.push(&fast, &mut c, t0, 2);
        assert_eq!(drain(&mut link, &fast, &mut c, t0 + ms(5)), vec![2]);
        assert_eq!(link.next_deadline(), Some(t0 + ms(30)));
        assert!(drain(&mut link, &fast, &mut c, t0 + ms(29)).is_empty());
        assert_eq!(drain(&mut link, &fast, &mut c, t0 + ms(30)), vec![1]);
    }

    #[test]
    fn held_datagram_is_released_when_nothing_follows() {
        let t0 = Instant::now();
        let p = Params {
            delay: ms(10),
            reorder: 1.0,
            reorder_hold: ms(40),
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::new(1);
        link.push(&p, &mut c, t0, 1);
        assert_eq!(link.next_deadline(), Some(t0 + ms(50)));
        assert!(drain(&mut link, &p, &mut c, t0 + ms(49)).is_empty());
        assert_eq!(drain(&mut link, &p, &mut c, t0 + ms(50)), vec![1]);
        assert!(link.is_empty());
    }

    #[test]
    fn reordering_reorders() {
        let t0 = Instant::now();
        let p = Params {
            reorder: 0.2,
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::new(11);
        let n = 10_000u32;
        let mut out = Vec::new();
        let mut held = Vec::new();
        // A steady stream: one datagram per millisecond, sent as it comes.
        for i in 0..n {
            let now = t0 + ms(i as u64);
            if let Decision::Deliver { held: true, .. } = link.push(&p, &mut c, now, i) {
                held.push(i);
            }
            out.extend(drain(&mut link, &p, &mut c, now));
        }
        out.extend(run_out(&mut link, &p, &mut c));
        // Nothing lost or invented...
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        // ...but the order changed where datagrams were held back.
        assert_eq!(c.reordered, held.len() as u64);
        assert!((1800..2200).contains(&held.len()), "{}", held.len());
        let inversions = out.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(inversions > 1000, "{inversions}");
        // Every held datagram went out behind a later one (the last few may
        // have had no follower and gone out at their hold limit instead).
        // `before[x]`: the largest datagram sent before `x`, if any.
        let mut before = vec![None; n as usize];
        let mut max_so_far = None;
        for &x in &out {
            before[x as usize] = max_so_far;
            max_so_far = max_so_far.max(Some(x));
        }
        let overtaken = |x: u32| before[x as usize].is_some_and(|y| y > x);
        for &x in held.iter().filter(|&&x| x < n - 10) {
            assert!(overtaken(x), "{x} was held but not overtaken");
        }
        // A datagram that was not held is never overtaken.
        for x in (0..n).filter(|x| held.binary_search(x).is_err()) {
            assert!(!overtaken(x), "{x} was overtaken");
        }
        assert_eq!(c.forwarded, n as u64);
        assert_eq!(c.queued(), 0);
    }

    #[test]
    fn blackhole_drops_new_and_queued() {
        let t0 = Instant::now();
        let slow = Params {
            delay: ms(100),
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::new(1);
        link.push(&slow, &mut c, t0, 1);
        link.push(&slow, &mut c, t0, 2);
        let hole = Params {
            blackhole: true,
            ..slow
        };
        assert_eq!(
            link.push(&hole, &mut c, t0, 3),
            Decision::Drop(DropReason::Blackhole)
        );
        assert_eq!(c.queued(), 2);
        // Switched on while 1 and 2 were in flight: they are dropped too.
        assert!(drain(&mut link, &hole, &mut c, t0 + ms(100)).is_empty());
        assert_eq!(c.dropped, 3);
        assert_eq!(c.blackholed, 3);
        assert_eq!(c.forwarded, 0);
        assert!(link.is_empty());
        // And off again.
        link.push(&slow, &mut c, t0 + ms(100), 4);
        assert_eq!(drain(&mut link, &slow, &mut c, t0 + ms(200)), vec![4]);
    }

    #[test]
    fn queue_limit() {
        let t0 = Instant::now();
        let p = Params {
            delay: ms(10),
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::with_rng(Rng::new(1), 3);
        for i in 0..5 {
            link.push(&p, &mut c, t0, i);
        }
        assert_eq!(c.dropped, 2);
        assert_eq!(link.len(), 3);
        assert_eq!(drain(&mut link, &p, &mut c, t0 + ms(10)), vec![0, 1, 2]);
    }

    #[test]
    fn counters_balance_under_everything() {
        let t0 = Instant::now();
        let p = Params {
            delay: ms(3),
            jitter: ms(7),
            loss: 0.1,
            duplicate: 0.1,
            reorder: 0.1,
            reorder_hold: ms(5),
            blackhole: false,
            ..Params::default()
        };
        let mut c = Counters::default();
        let mut link = Link::new(1234);
        let mut out = 0u64;
        for i in 0..5000u32 {
            let now = t0 + Duration::from_micros(i as u64 * 300);
            link.push(&p, &mut c, now, i);
            out += drain(&mut link, &p, &mut c, now).len() as u64;
            assert_eq!(
                c.received + c.duplicated,
                c.forwarded + c.dropped + link.len() as u64
            );
        }
        out += run_out(&mut link, &p, &mut c).len() as u64;
        assert_eq!(out, c.forwarded);
        assert_eq!(c.queued(), 0);
        assert!(c.dropped > 0 && c.duplicated > 0 && c.reordered > 0);
    }
    #[test]
    fn the_bottleneck_sends_at_its_rate_and_drops_the_tail() {
        let t0 = Instant::now();
        let params = Params {
            rate: 1_000_000, // 1 MB/s: 1000 bytes take 1 ms
            queue: Duration::from_millis(5),
            delay: Duration::from_millis(10),
            ..Params::default()
        };
        let mut link = Link::new(1);
        let mut counters = Counters::default();
        let mut delivered = vec![];
        for n in 0..10u32 {
            if let Decision::Deliver { at, .. } =
                link.push_sized(&params, &mut counters, t0, n, 1000)
            {
                delivered.push((n, at - t0));
            }
        }
        // Datagram k leaves after (k+1) ms; those that would wait over 5 ms
        // in the queue are dropped.
        let expected: Vec<(u32, Duration)> = (0..6)
            .map(|k| (k, Duration::from_millis(10 + u64::from(k) + 1)))
            .collect();
        assert_eq!(delivered, expected);
        assert_eq!(counters.dropped, 4);
        // Once drained, the queue takes datagrams again.
        let later = t0 + Duration::from_millis(20);
        assert!(matches!(
            link.push_sized(&params, &mut counters, later, 99, 1000),
            Decision::Deliver { .. }
        ));
    }

    #[test]
    fn jitter_keeps_order_when_asked() {
        let t0 = Instant::now();
        let params = Params {
            jitter: Duration::from_millis(50),
            ..Params::default()
        };
        let mut link = Link::new(7).keep_order();
        let mut counters = Counters::default();
        for n in 0..200u32 {
            link.push(
                &params,
                &mut counters,
                t0 + Duration::from_micros(u64::from(n)),
                n,
            );
        }
        let mut out = vec![];
        let end = t0 + Duration::from_secs(1);
        while let Some(n) = link.poll(&params, &mut counters, end) {
            out.push(n);
        }
        assert_eq!(out, (0..200).collect::<Vec<_>>());
    }
}
