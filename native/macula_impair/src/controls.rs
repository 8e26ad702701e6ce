//! What the proxy's two directions are, and the live knobs both the proxy
//! and its control port work on ([`Controls`]): link parameters, pauses,
//! counters.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::link::{Counters, Params};

/// A direction through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

impl Direction {
    pub(crate) fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// Which directions a change applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dirs {
    Up,
    Down,
    Both,
}

impl Dirs {
    /// Whether `d` is one of these directions.
    pub fn includes(self, d: Direction) -> bool {
        matches!(
            (self, d),
            (Dirs::Both, _) | (Dirs::Up, Direction::Up) | (Dirs::Down, Direction::Down)
        )
    }
}

/// Counters of both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub up: Counters,
    pub down: Counters,
    /// Clients with an upstream socket now.
    pub sessions: usize,
}

impl Stats {
    /// The counters of one direction.
    pub fn dir(&self, d: Direction) -> &Counters {
        match d {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }
}

/// The live state behind [`Controls`] (the proxy's engine drives its
/// links with it).
pub(crate) struct State {
    pub(crate) params: [Params; 2],
    pub(crate) counters: [Counters; 2],
    pub(crate) sessions: usize,
}

/// The run-time knobs of a running proxy; cheap to clone and share.
/// Changes apply to datagrams arriving afterwards, except the blackhole,
/// which also drops datagrams already queued.
#[derive(Clone)]
pub struct Controls {
    state: Arc<Mutex<State>>,
}

fn probability(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 1.0)
    }
}

impl Controls {
    pub(crate) fn new(up: Params, down: Params) -> Self {
        Controls {
            state: Arc::new(Mutex::new(State {
                params: [up, down],
                counters: [Counters::default(); 2],
                sessions: 0,
            })),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The impairments of one direction now.
    pub fn params(&self, d: Direction) -> Params {
        self.lock().params[d.index()]
    }

    /// Changes the impairments of `dirs` with `f`.
    pub fn update(&self, dirs: Dirs, f: impl Fn(&mut Params)) {
        let mut st = self.lock();
        for d in [Direction::Up, Direction::Down] {
            if dirs.includes(d) {
                f(&mut st.params[d.index()]);
            }
        }
    }

    pub fn set_delay(&self, dirs: Dirs, delay: Duration) {
        self.update(dirs, |p| p.delay = delay);
    }

    pub fn set_jitter(&self, dirs: Dirs, jitter: Duration) {
        self.update(dirs, |p| p.jitter = jitter);
    }

    /// Probabilities are clamped to `[0, 1]` (NaN is 0).
    pub fn set_loss(&self, dirs: Dirs, p: f64) {
        self.update(dirs, |x| x.loss = probability(p));
    }

    pub fn set_duplicate(&self, dirs: Dirs, p: f64) {
        self.update(dirs, |x| x.duplicate = probability(p));
    }

    pub fn set_reorder(&self, dirs: Dirs, p: f64) {
        self.update(dirs, |x| x.reorder = probability(p));
    }

    pub fn set_reorder_hold(&self, dirs: Dirs, hold: Duration) {
        self.update(dirs, |p| p.reorder_hold = hold);
    }

    /// Blackhole (or not) both directions.
    pub fn blackhole(&self, on: bool) {
        self.blackhole_dirs(Dirs::Both, on);
    }

    pub fn blackhole_dirs(&self, dirs: Dirs, on: bool) {
        self.update(dirs, |p| p.blackhole = on);
    }

    /// Back to no impairment at all (blackhole off too).
    pub fn clear(&self, dirs: Dirs) {
        self.update(dirs, |p| *p = Params::default());
    }

    pub fn stats(&self) -> Stats {
        let st = self.lock();
        Stats {
            up: st.counters[0],
            down: st.counters[1],
            sessions: st.sessions,
        }
    }

    /// Zeroes the counters (datagrams still queued then make `queued()`
    /// read zero while they drain).
    pub fn reset_stats(&self) {
        self.lock().counters = [Counters::default(); 2];
    }
}
