//! Which relays of a set a node name lives on, without a coordinator:
//! rendezvous (highest-random-weight) hashing, as a sans-IO function every
//! node computes alike.
//!
//! Each name's weight at each relay is a hash of the two; its *home
//! relays* are the `k` relays where it weighs most. A node stays connected
//! to its homes; a session to a target runs on a relay that is a home of
//! both if there is one (no extra connection), otherwise on the target's
//! first home, which the requester connects to on demand. When a relay
//! joins or leaves, only the names for which it is (or becomes) one of the
//! top `k` move: about `k / R` of them.

use ring::digest::{Context, SHA256};

/// Home relays a name has, unless configured otherwise.
pub const DEFAULT_HOMES: usize = 2;

/// The weight of `name` at `relay`: the first 8 bytes of
/// SHA-256(relay ‖ 0 ‖ name). Stable across versions and machines, and
/// not steerable by a name's owner short of trying names.
pub fn weight(relay: &str, name: &str) -> u64 {
    let mut ctx = Context::new(&SHA256);
    ctx.update(relay.as_bytes());
    ctx.update(&[0]);
    ctx.update(name.as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// The `k` home relays of `name` in `relays`, heaviest first (ties, which
/// SHA-256 makes vanishingly rare, by relay name).
pub fn homes<'a, S: AsRef<str>>(name: &str, relays: &'a [S], k: usize) -> Vec<&'a str> {
    let mut weighed: Vec<(u64, &str)> = relays
        .iter()
        .map(|r| (weight(r.as_ref(), name), r.as_ref()))
        .collect();
    weighed.sort_unstable_by(|a, b| b.cmp(a));
    weighed.dedup_by(|a, b| a.1 == b.1);
    weighed.into_iter().take(k).map(|(_, r)| r).collect()
}

/// The relay a session from `requester` to `target` runs on, given both
/// names' homes: the first of the target's homes the requester shares,
/// else the target's first home (`None` when the target has none: an
/// empty set).
pub fn meeting_relay<'a>(requester_homes: &[&'a str], target_homes: &[&'a str]) -> Option<&'a str> {
    target_homes
        .iter()
        .find(|r| requester_homes.contains(r))
        .or(target_homes.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relays(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("relay{i}.example:4434")).collect()
    }

    /// The same value `macula_dist_relay_set_tests` asserts in Erlang:
    /// both sides place names alike.
    #[test]
    fn the_weight_is_the_one_erlang_computes() {
        assert_eq!(weight("relay0.example:4434", "a@h"), 3565356807364408549);
    }

    #[test]
    fn homes_are_the_heaviest_and_the_same_everywhere() {
        let set = relays(10);
        let h = homes("a@h", &set, 2);
        assert_eq!(h.len(), 2);
        let mut all: Vec<u64> = set.iter().map(|r| weight(r, "a@h")).collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(weight(h[0], "a@h"), all[0]);
        assert_eq!(weight(h[1], "a@h"), all[1]);
        // The order of the set does not matter.
        let mut shuffled = set.clone();
        shuffled.reverse();
        assert_eq!(homes("a@h", &shuffled, 2), h);
        // A set smaller than k gives what there is; a listed twice relay
        // counts once.
        assert_eq!(homes("a@h", &set[..1], 2), vec![set[0].as_str()]);
        let twice = vec![set[0].clone(), set[0].clone()];
        assert_eq!(homes("a@h", &twice, 2).len(), 1);
    }

    #[test]
    fn a_relay_joining_moves_about_k_over_r_of_the_names() {
        let set = relays(20);
        let mut bigger = set.clone();
        bigger.push("relay-new.example:4434".into());
        let names: Vec<String> = (0..4000).map(|i| format!("n{i}@h")).collect();
        let moved = names
            .iter()
            .filter(|n| homes(n, &set, 2) != homes(n, &bigger, 2))
            .count();
        // Expected 2/21 of 4000 = 381; every moved name gained the new relay.
        assert!((300..460).contains(&moved), "{moved} moved");
        for n in &names {
            let (before, after) = (homes(n, &set, 2), homes(n, &bigger, 2));
            if before != after {
                assert!(after.contains(&"relay-new.example:4434"));
            }
        }
    }

    #[test]
    fn a_session_meets_on_a_shared_home_or_the_targets_first() {
        assert_eq!(meeting_relay(&["r1", "r2"], &["r3", "r2"]), Some("r2"));
        assert_eq!(meeting_relay(&["r1", "r2"], &["r3", "r4"]), Some("r3"));
        assert_eq!(meeting_relay(&["r1"], &[]), None);
    }
}
