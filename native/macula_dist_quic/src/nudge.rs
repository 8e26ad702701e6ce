//! A congestion controller that can be told, from outside the connection,
//! to let a packet or two through at once.
//!
//! When an e2e session's datagrams are rerouted (a relay was lost), every
//! packet sent meanwhile still counts as in flight, so the congestion
//! window is full and QUIC sends nothing new until its probe timeout,
//! which after seconds of silence has backed off to seconds. quinn lets
//! only its own loss probes past the window, and offers no call to send
//! one now. [`NudgeFactory`] wraps the configured controller: after
//! [`nudge`], its window is what is in flight plus about two packets,
//! until those are sent. One packet through the new route is acknowledged
//! at once; the acknowledgement marks what was lost as lost and ends the
//! back-off, and the inner controller goes on from there as it would
//! after a probe.
//!
//! [`NudgeFactory::bounded`] also holds the window under a bound from the
//! delivery rate it measures ([`crate::bounded_bbr`]).

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

use crate::bounded_bbr::DeliveryRate;

/// Bytes one nudge lets past the window: two full packets.
const ALLOWANCE: u64 = 2 * 1500;

/// Builds [`Nudgeable`] controllers around those `inner` builds.
pub struct NudgeFactory {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
    bounded: bool,
}

impl NudgeFactory {
    /// Wraps the controllers `inner` builds.
    pub fn new(inner: Arc<dyn ControllerFactory + Send + Sync>) -> Self {
        NudgeFactory {
            inner,
            bounded: false,
        }
    }

    /// The same, with in-flight held under the delivery-rate bound.
    pub fn bounded(inner: Arc<dyn ControllerFactory + Send + Sync>) -> Self {
        NudgeFactory {
            inner,
            bounded: true,
        }
    }
}

impl ControllerFactory for NudgeFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Nudgeable {
            inner: self.inner.clone().build(now, current_mtu),
            allowance: Arc::default(),
            in_flight: 0,
            rate: self.bounded.then(DeliveryRate::default),
            mtu: current_mtu,
        })
    }
}

/// A controller with an allowance past its window (shared by its clones,
/// so [`nudge`] reaches the live one through a connection's copy).
pub struct Nudgeable {
    inner: Box<dyn Controller>,
    allowance: Arc<AtomicU64>,
    /// Bytes in flight as quinn last said (on acks), plus those sent and
    /// less those lost since: after a long silence it can be far above
    /// the inner window.
    in_flight: u64,
    /// The delivery rate that bounds the window, when bounded.
    rate: Option<DeliveryRate>,
    mtu: u16,
}

/// Lets a connection built with [`NudgeFactory`] send about two packets
/// past its congestion window; false for any other connection.
pub fn nudge(conn: &quinn::Connection) -> bool {
    grant(conn.congestion_state())
}

/// Grants the allowance to the controller `copy` shares it with.
fn grant(copy: Box<dyn Controller>) -> bool {
    match copy.into_any().downcast::<Nudgeable>() {
        Ok(c) => {
            c.allowance.store(ALLOWANCE, Ordering::Relaxed);
            true
        }
        Err(_) => false,
    }
}

impl Controller for Nudgeable {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        let left = self.allowance.load(Ordering::Relaxed).saturating_sub(bytes);
        self.allowance.store(left, Ordering::Relaxed);
        self.in_flight += bytes;
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        if let Some(rate) = &mut self.rate {
            rate.on_ack(now, bytes, rtt.min());
        }
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.in_flight = in_flight;
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.in_flight = self.in_flight.saturating_sub(lost_bytes);
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        let mut window = self.inner.window();
        if let Some(bound) = self.rate.as_ref().and_then(|r| r.bound(self.mtu)) {
            window = window.min(bound);
        }
        match self.allowance.load(Ordering::Relaxed) {
            0 => window,
            allowance => window.max(self.in_flight + allowance),
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Nudgeable {
            inner: self.inner.clone_box(),
            allowance: self.allowance.clone(),
            in_flight: self.in_flight,
            rate: self.rate.clone(),
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nudgeable() -> Box<dyn Controller> {
        let inner = Arc::new(quinn::congestion::CubicConfig::default());
        Arc::new(NudgeFactory::new(inner)).build(Instant::now(), 1200)
    }

    #[test]
    fn a_nudge_opens_the_window_past_what_is_in_flight_for_about_two_packets() {
        let now = Instant::now();
        let mut c = nudgeable();
        let initial = c.window();
        // Much more in flight than the window (a long silence).
        c.on_sent(now, 10 * initial, 1);
        assert_eq!(c.window(), initial, "no nudge: the inner window");
        assert!(grant(c.clone_box()), "a copy reaches the live allowance");
        assert_eq!(c.window(), 10 * initial + ALLOWANCE);
        c.on_sent(now, 1500, 2);
        assert_eq!(c.window(), 10 * initial + 1500 + (ALLOWANCE - 1500));
        c.on_sent(now, 1500, 3);
        assert_eq!(c.window(), initial, "used up");
        // Once the losses are declared (persistent congestion: cubic's
        // window falls to two 1200-byte packets) and nothing is in flight,
        // a nudge gives about two packets, no more.
        c.on_congestion_event(now, now, true, 10 * initial);
        c.on_end_acks(now, 0, false, Some(3));
        assert_eq!(c.window(), 2400);
        assert!(grant(c.clone_box()));
        assert_eq!(c.window(), ALLOWANCE);
    }

    #[test]
    fn other_controllers_are_not_nudged() {
        let plain = Arc::new(quinn::congestion::CubicConfig::default()).build(Instant::now(), 1200);
        assert!(!grant(plain));
    }
}
