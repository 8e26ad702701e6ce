//! A node's direct paths ([`DirectPath`]), one per session, under one
//! timer queue, sans IO. A node of a mesh of a hundred holds a hundred
//! paths, each with a timer firing every few hundred milliseconds: only the
//! paths whose timer is due are run, not all of them at each wake.
//!
//! The queue holds `(deadline, session)`; each path remembers the one
//! deadline that counts for it, and older entries are skipped when they
//! come up (a path's deadline moves earlier when it sends after an idle
//! spell, or gets an answer; later, when it simply runs early).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::Instant;

use super::direct::{DirectPath, Event, Probe};
use crate::wire::dataplane::SessionId;

struct Entry<T> {
    path: DirectPath,
    data: T,
    /// The deadline of this path's live entry in the queue.
    scheduled: Instant,
}

/// Direct paths by session, each with `data` (who to tell of its changes).
pub struct DirectPaths<T> {
    paths: HashMap<SessionId, Entry<T>>,
    queue: BinaryHeap<Reverse<(Instant, SessionId)>>,
}

impl<T> Default for DirectPaths<T> {
    fn default() -> Self {
        DirectPaths {
            paths: HashMap::new(),
            queue: BinaryHeap::new(),
        }
    }
}

impl<T> std::fmt::Debug for DirectPaths<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectPaths")
            .field("paths", &self.paths.len())
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl<T: Clone> DirectPaths<T> {
    /// Adds (or replaces) a session's path. True when the timers must run
    /// sooner than they were going to.
    pub fn insert(&mut self, session: SessionId, path: DirectPath, data: T, now: Instant) -> bool {
        let at = path.next_timeout(now);
        self.paths.insert(
            session,
            Entry {
                path,
                data,
                scheduled: at,
            },
        );
        self.push(at, session)
    }

    pub fn remove(&mut self, session: &SessionId) -> Option<T> {
        // Its queue entries are skipped when they come up.
        self.paths.remove(session).map(|e| e.data)
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Runs `f` on a session's path; its result, and whether the timers
    /// must now run sooner than they were going to.
    pub fn update<R>(
        &mut self,
        session: &SessionId,
        now: Instant,
        f: impl FnOnce(&mut DirectPath, &T) -> R,
    ) -> Option<(R, bool)> {
        let entry = self.paths.get_mut(session)?;
        let result = f(&mut entry.path, &entry.data);
        let at = entry.path.next_timeout(now);
        if at >= entry.scheduled {
            return Some((result, false));
        }
        entry.scheduled = at;
        Some((result, self.push(at, *session)))
    }

    /// A session datagram came from `from` (see [`DirectPath::heard`]). It
    /// only ever puts deadlines off, so the queue is left as it is: an entry
    /// that comes up early is run and pushed back.
    pub fn heard(&mut self, session: &SessionId, from: SocketAddr, now: Instant) {
        if let Some(entry) = self.paths.get_mut(session) {
            entry.path.heard(from, now);
        }
    }

    /// Runs the paths whose timers are due: their probes go into `out`,
    /// their changes of path into `changes`. Returns when to run next
    /// (none: no path left).
    pub fn poll(
        &mut self,
        now: Instant,
        out: &mut Vec<Probe>,
        changes: &mut Vec<(T, Event)>,
    ) -> Option<Instant> {
        while let Some(&Reverse((at, session))) = self.queue.peek() {
            if at > now {
                break;
            }
            self.queue.pop();
            let Some(entry) = self.paths.get_mut(&session) else {
                continue;
            };
            if entry.scheduled != at {
                continue;
            }
            if let Some(e) = entry.path.poll(now, out) {
                changes.push((entry.data.clone(), e));
            }
            // Never in the past: a path whose deadline is due but did
            // nothing (it turned idle meanwhile) runs again a moment later.
            let next = entry.path.next_timeout(now).max(now + MIN_STEP);
            entry.scheduled = next;
            self.queue.push(Reverse((next, session)));
        }
        self.compact();
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    /// Queues `session` at `at`; true when that is sooner than the queue's
    /// first deadline was.
    fn push(&mut self, at: Instant, session: SessionId) -> bool {
        let sooner = self
            .queue
            .peek()
            .is_none_or(|Reverse((first, _))| at < *first);
        self.queue.push(Reverse((at, session)));
        self.compact();
        sooner
    }

    /// Drops skipped entries once they outnumber the live ones (many
    /// deadlines moved earlier, or many sessions gone), so the queue stays
    /// within a few times the number of paths.
    fn compact(&mut self) {
        if self.queue.len() <= 2 * self.paths.len() + 64 {
            return;
        }
        let paths = &self.paths;
        self.queue
            .retain(|Reverse((at, s))| paths.get(s).is_some_and(|e| e.scheduled == *at));
    }
}

/// The least time between two runs of one path.
const MIN_STEP: std::time::Duration = std::time::Duration::from_millis(1);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn path(session: SessionId, now: Instant) -> DirectPath {
        let mut p = DirectPath::new(session, b"secret", true, now);
        p.add_candidates(&[addr(session as u16)], now);
        p.busy(now);
        p
    }

    #[test]
    fn only_due_paths_run() {
        let now = Instant::now();
        let mut paths = DirectPaths::default();
        for s in 1..=100 {
            paths.insert(s, path(s, now), s, now);
        }
        // Each probes its one candidate at once.
        let (mut out, mut changes) = (vec![], vec![]);
        let next = paths.poll(now, &mut out, &mut changes).unwrap();
        assert_eq!(out.len(), 100);
        assert!(next > now);
        // Nothing is due before `next`.
        let (mut out, mut changes) = (vec![], vec![]);
        assert_eq!(
            paths.poll(next - Duration::from_micros(1), &mut out, &mut changes),
            Some(next)
        );
        assert!(out.is_empty());
        assert!(paths.queue.len() <= 2 * paths.len() + 64);
    }

    #[test]
    fn a_deadline_moved_earlier_runs_then_and_once() {
        let now = Instant::now();
        let mut paths = DirectPaths::default();
        assert!(paths.insert(1, path(1, now), (), now));
        assert!(!paths.insert(2, path(2, now), (), now + Duration::from_secs(1)));
        let (mut out, mut changes) = (vec![], vec![]);
        paths.poll(now, &mut out, &mut changes);
        // Session 1 probes again at PROBE_EVERY; a new candidate does not
        // move that, and a removed session's entries are skipped.
        let (_, sooner) = paths
            .update(&1, now, |p, _| p.add_candidates(&[addr(7)], now))
            .unwrap();
        assert!(!sooner);
        assert_eq!(paths.remove(&2), Some(()));
        let later = now + Duration::from_secs(1);
        let (mut out, mut changes) = (vec![], vec![]);
        paths.poll(later, &mut out, &mut changes);
        // Only session 1's two candidates, once each.
        assert_eq!(out.len(), 2);
        assert!(changes.is_empty());
    }

    #[test]
    fn the_queue_stays_bounded_when_sessions_come_and_go() {
        let now = Instant::now();
        let mut paths = DirectPaths::default();
        for s in 0..10_000u64 {
            paths.insert(s, path(s, now), (), now);
            if s >= 10 {
                paths.remove(&(s - 10));
            }
        }
        assert_eq!(paths.len(), 10);
        assert!(paths.queue.len() <= 2 * paths.len() + 64 + 1);
    }
}
