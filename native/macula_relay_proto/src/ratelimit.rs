//! Rate limits for log lines about bad input: a peer that sends garbage
//! must not be able to fill the relay's disk. At most `burst` lines per
//! `window`; the first line after a quiet spell says how many were held back.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(burst: u32, window: Duration) -> Self {
        LogLimiter {
            burst,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(suppressed_before)` when a line may be written now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= self.burst {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_holds_back_then_reports() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(3, Duration::from_secs(1));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.allow(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(1000));
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(0));
    }
}
