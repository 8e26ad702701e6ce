//! quinn's BBR with its window held near the path's bandwidth-delay
//! product, so that it fills a lossy path without keeping a queue there.
//!
//! BBR (v1, as quinn has it) paces at its bandwidth estimate but lets up
//! to twice the estimated BDP, plus the ack aggregation it saw, be in
//! flight; on a path with a drop-tail queue that surplus sits in the queue
//! and every other stream's packets wait behind it (measured on the
//! continental profile: loaded p99 284 ms at 43 ms idle rtt). Random loss
//! does not shrink its window, which is why it fills such a path where a
//! loss-based controller cannot.
//!
//! A bounded controller ([`crate::nudge::NudgeFactory::bounded`]) keeps
//! what is in flight under [`BOUND`] times the
//! delivery rate it measures itself (bytes acknowledged per minimum RTT,
//! the largest of the last [`RATE_WINDOW`] such intervals) times the
//! minimum RTT: a queue of at most half a BDP, while a path with room
//! lets the rate, and so the bound, grow by half each round trip. It does
//! not use BBR's own estimate: quinn's ran at 2.5 times the link on the
//! continental profile (half the packets sent were dropped at the queue).

use std::time::{Duration, Instant};

/// In-flight bound in delivery-rate × min-RTT.
pub const BOUND: f64 = 1.5;
/// Intervals (each a minimum RTT) the delivery rate is the largest of.
pub const RATE_WINDOW: usize = 10;
/// The shortest round trip the bound assumes, and the shortest interval
/// a rate is measured over: under it (loopback, a LAN) the round trip
/// under load is the nodes' processing time, not the path's, and a bound
/// from the path's RTT alone would throttle the sender below what the
/// nodes can process.
const RTT_FLOOR: Duration = Duration::from_millis(1);
/// Never below this many full packets (a window too small to probe).
const MIN_PACKETS: u64 = 8;

/// Bytes acknowledged per interval of a minimum RTT, the largest of the
/// last [`RATE_WINDOW`] intervals (sans-IO: fed the acks' times).
#[derive(Debug, Clone, Default)]
pub struct DeliveryRate {
    min_rtt: Option<Duration>,
    interval: Option<(Instant, u64)>,
    /// Bytes per second of the last intervals, newest last.
    rates: std::collections::VecDeque<f64>,
}

impl DeliveryRate {
    /// `bytes` acknowledged at `now`, with the path's minimum RTT so far.
    pub fn on_ack(&mut self, now: Instant, bytes: u64, min_rtt: Duration) {
        self.min_rtt = Some(min_rtt);
        let (start, acked) = self.interval.get_or_insert((now, 0));
        *acked += bytes;
        let elapsed = now.saturating_duration_since(*start);
        if elapsed >= min_rtt.max(RTT_FLOOR) {
            self.rates.push_back(*acked as f64 / elapsed.as_secs_f64());
            if self.rates.len() > RATE_WINDOW {
                self.rates.pop_front();
            }
            self.interval = Some((now, 0));
        }
    }

    /// [`BOUND`] × rate × min RTT (at least [`RTT_FLOOR`]), at least
    /// [`MIN_PACKETS`] of `mtu`; none before a first interval ended.
    pub fn bound(&self, mtu: u16) -> Option<u64> {
        let rtt = self.min_rtt?.max(RTT_FLOOR);
        let rate = self
            .rates
            .iter()
            .copied()
            .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))?;
        let bdp = rate * rtt.as_secs_f64();
        Some(((bdp * BOUND) as u64).max(MIN_PACKETS * u64::from(mtu)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acks of `rate` bytes a second, 1200 bytes each, for `ms` ms.
    fn feed(
        r: &mut DeliveryRate,
        start: Instant,
        rate: u64,
        ms: u64,
        min_rtt: Duration,
    ) -> Instant {
        let step = Duration::from_nanos(1_000_000_000 * 1200 / rate);
        let mut t = start;
        while t < start + Duration::from_millis(ms) {
            r.on_ack(t, 1200, min_rtt);
            t += step;
        }
        t
    }

    #[test]
    fn the_bound_is_one_and_a_half_bdp_of_what_was_delivered() {
        // 6.25 MB/s at 40 ms: a BDP of 250 kB.
        let mut r = DeliveryRate::default();
        feed(
            &mut r,
            Instant::now(),
            6_250_000,
            400,
            Duration::from_millis(40),
        );
        let bound = r.bound(1200).unwrap() as f64;
        assert!((bound - 375_000.0).abs() < 375_000.0 * 0.02, "{bound}");
    }

    #[test]
    fn a_faster_path_raises_it_and_a_slower_one_lowers_it_after_the_window() {
        let rtt = Duration::from_millis(10);
        let mut r = DeliveryRate::default();
        let t = feed(&mut r, Instant::now(), 1_000_000, 200, rtt);
        let slow = r.bound(1200).unwrap();
        let t = feed(&mut r, t, 4_000_000, 50, rtt);
        assert!(r.bound(1200).unwrap() > 3 * slow);
        // Back to slow: the fast intervals age out after RATE_WINDOW.
        feed(&mut r, t, 1_000_000, 200, rtt);
        assert!(r.bound(1200).unwrap() < slow * 11 / 10);
    }

    #[test]
    fn a_short_path_is_bounded_as_if_its_rtt_were_the_floor() {
        // 500 MB/s at 0.1 ms (loopback): 1.5 × 500 kB, not 1.5 × 50 kB.
        let mut r = DeliveryRate::default();
        feed(
            &mut r,
            Instant::now(),
            500_000_000,
            20,
            Duration::from_micros(100),
        );
        let bound = r.bound(1200).unwrap() as f64;
        assert!((bound - 750_000.0).abs() < 750_000.0 * 0.05, "{bound}");
    }

    #[test]
    fn a_slow_path_keeps_a_few_packets_and_none_before_an_interval() {
        let mut r = DeliveryRate::default();
        assert_eq!(r.bound(1200), None);
        feed(
            &mut r,
            Instant::now(),
            120_000,
            100,
            Duration::from_millis(10),
        );
        assert_eq!(r.bound(1200), Some(8 * 1200));
    }
}
