//! The router against what the VM encodes: every control message that
//! names a sender, written by `scripts/dist-vectors.escript` with
//! `term_to_binary` (pids of long UTF-8 node names, references, big
//! integers, funs, maps), plus hand-made atom-cache headers and fragments.

use macula_relay_proto::node::dist_route::{lane_of_pid, DistRouter, Route, LANES};
use proptest::prelude::*;

const VECTORS: &[u8] = include_bytes!("vectors/control_messages.bin");

fn records() -> Vec<(&'static [u8], &'static [u8])> {
    let mut out = vec![];
    let mut rest = VECTORS;
    let take = |rest: &mut &'static [u8]| {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let (item, tail) = rest[4..].split_at(len);
        *rest = tail;
        item
    };
    while !rest.is_empty() {
        let packet = take(&mut rest);
        let sender = take(&mut rest);
        out.push((packet, sender));
    }
    out
}

#[test]
fn every_control_message_the_vm_encodes_goes_on_its_senders_lane() {
    let records = records();
    assert!(records.len() >= 280, "{} vectors", records.len());
    let mut router = DistRouter::new();
    let mut lanes = std::collections::BTreeSet::new();
    let mut fenced = 0;
    for (i, (packet, sender)) in records.iter().enumerate() {
        let want = if sender.is_empty() {
            fenced += 1;
            Route::Fence
        } else {
            let lane = lane_of_pid(sender).expect("the sender is a pid");
            lanes.insert(lane);
            Route::Lane(lane)
        };
        assert_eq!(
            router.route(packet),
            want,
            "vector {i}: {:?}",
            &packet[..packet.len().min(40)]
        );
    }
    assert!(fenced > 0);
    assert!(lanes.len() > 1, "all senders on one lane: {lanes:?}");
}

#[test]
fn ticks_go_on_the_control_stream() {
    assert_eq!(DistRouter::new().route(&[]), Route::Control);
}

/// `{22, From, To}` with an atom-cache header: two refs, the first new
/// (its text follows, long atoms), the pids' node given as a cache ref.
fn cached_send_sender(id: u32) -> Vec<u8> {
    let mut p = vec![131, b'D', 2];
    // Flags: ref 0 new (0x8) in segment 0, ref 1 old; then LongAtoms.
    p.extend([0x08, 0x01]);
    p.extend([7, 0, 4]);
    p.extend(b"n@h1");
    p.push(9);
    p.extend([104, 3, 97, 22]);
    for pid in [id, 1] {
        p.extend([88, 82, 0]);
        p.extend(pid.to_be_bytes());
        p.extend(0u32.to_be_bytes());
        p.extend(1u32.to_be_bytes());
    }
    p
}

#[test]
fn atom_cache_headers_are_read_past() {
    let mut router = DistRouter::new();
    let a = router.route(&cached_send_sender(40));
    assert!(matches!(a, Route::Lane(l) if l < LANES), "{a:?}");
    assert_eq!(router.route(&cached_send_sender(40)), a);
    let spread: std::collections::BTreeSet<_> = (0..200)
        .map(|id| router.route(&cached_send_sender(id)))
        .collect();
    assert!(spread.len() > LANES / 2, "{spread:?}");
}

fn fragment(kind: u8, seq: u64, fragment: u64, tail: &[u8]) -> Vec<u8> {
    let mut p = vec![131, kind];
    p.extend(seq.to_be_bytes());
    p.extend(fragment.to_be_bytes());
    p.extend(tail);
    p
}

#[test]
fn later_fragments_follow_the_first() {
    let mut router = DistRouter::new();
    let first = cached_send_sender(77);
    let lane = router.route(&fragment(b'E', 5, 3, &first[2..]));
    assert!(matches!(lane, Route::Lane(_)));
    // Another message's fragments in between.
    let other = router.route(&fragment(b'E', 6, 2, &cached_send_sender(78)[2..]));
    assert_eq!(router.route(&fragment(b'F', 5, 2, b"data")), lane);
    assert_eq!(router.route(&fragment(b'F', 6, 1, b"data")), other);
    assert_eq!(router.route(&fragment(b'F', 5, 1, b"data")), lane);
    // Done: a stray fragment of it has nowhere known to go.
    assert_eq!(router.route(&fragment(b'F', 5, 1, b"data")), Route::Fence);
}

#[test]
fn a_fenced_messages_later_fragments_stay_on_the_control_stream() {
    let mut router = DistRouter::new();
    // SEND {2, '', To}: no sender.
    let mut send = vec![0];
    send.extend([104, 3, 97, 2, 106, 88, 82, 0]);
    send.extend([0; 12]);
    assert_eq!(router.route(&fragment(b'E', 9, 2, &send)), Route::Fence);
    assert_eq!(router.route(&fragment(b'F', 9, 1, b"x")), Route::Control);
}

proptest! {
    /// Garbage and every truncation of a real packet: a route, no panic.
    #[test]
    fn any_bytes_get_a_route(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut router = DistRouter::new();
        let _ = router.route(&bytes);
        let mut tagged = vec![131, b'D'];
        tagged.extend(&bytes);
        let _ = router.route(&tagged);
        tagged[1] = b'E';
        let _ = router.route(&tagged);
    }

    #[test]
    fn truncated_packets_are_fenced(i in 0usize..400, cut in 1usize..64) {
        let records = records();
        let (packet, sender) = records[i % records.len()];
        let cut = packet.len().saturating_sub(cut).max(1);
        let route = DistRouter::new().route(&packet[..cut]);
        // Cut inside the control message: fenced; cut only in the message
        // that follows: still its sender's lane; never another lane.
        let whole = if sender.is_empty() { Route::Fence } else { Route::Lane(lane_of_pid(sender).unwrap()) };
        prop_assert!(route == Route::Fence || route == whole, "{route:?} for {whole:?}");
    }
}
