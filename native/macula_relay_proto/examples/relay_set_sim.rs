//! The relay-set simulation: 10 000 nodes over 50 relays, with today's
//! relay list against rendezvous homes (k = 2), for a cluster of sparse
//! traffic and one of full meshes of 100. Prints a Markdown table.
//!
//! `cargo run --release -p macula_relay_proto --example relay_set_sim`

use std::collections::{HashMap, HashSet};

use macula_relay_proto::node::relay_set::{homes, meeting_relay, DEFAULT_HOMES};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

const NODES: usize = 10_000;
const RELAYS: usize = 50;
const SPARSE_PEERS: usize = 5;
const MESH: usize = 100;

fn relay_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("relay{i}.example:4434")).collect()
}

fn node_names() -> Vec<String> {
    (0..NODES).map(|i| format!("n{i}@site{}", i % 97)).collect()
}

/// Sessions as (requester, target) node indices.
fn sparse() -> Vec<(usize, usize)> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..NODES)
        .flat_map(|a| {
            sample(&mut rng, NODES, SPARSE_PEERS + 1)
                .into_iter()
                .filter(move |&b| b != a)
                .take(SPARSE_PEERS)
                .map(move |b| (a, b))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn meshes() -> Vec<(usize, usize)> {
    (0..NODES / MESH)
        .flat_map(|c| {
            let base = c * MESH;
            (0..MESH).flat_map(move |i| (i + 1..MESH).map(move |j| (base + i, base + j)))
        })
        .collect()
}

struct Figures {
    load_max_over_mean: f64,
    conns_mean: f64,
    conns_p99: usize,
    names_moved_join: f64,
    sessions_moved_leave: f64,
}

/// Where each session runs and which relays each node connects to, with
/// rendezvous homes over `relays`.
fn place(
    names: &[String],
    relays: &[String],
    sessions: &[(usize, usize)],
) -> (Vec<usize>, Vec<HashSet<usize>>) {
    let by_name: HashMap<&str, usize> = relays
        .iter()
        .enumerate()
        .map(|(i, r)| (r.as_str(), i))
        .collect();
    let index = |r: &str| by_name[r];
    let home: Vec<Vec<&str>> = names
        .iter()
        .map(|n| homes(n, relays, DEFAULT_HOMES))
        .collect();
    let mut conns: Vec<HashSet<usize>> = home
        .iter()
        .map(|h| h.iter().map(|r| index(r)).collect())
        .collect();
    let mut placed = Vec::with_capacity(sessions.len());
    for &(a, b) in sessions {
        let r = index(meeting_relay(&home[a], &home[b]).expect("a home"));
        conns[a].insert(r);
        conns[b].insert(r);
        placed.push(r);
    }
    (placed, conns)
}

fn load_ratio(placed: &[usize], relays: usize) -> f64 {
    let mut load = vec![0usize; relays];
    for &r in placed {
        load[r] += 1;
    }
    let mean = placed.len() as f64 / relays as f64;
    *load.iter().max().unwrap_or(&0) as f64 / mean
}

fn rendezvous(names: &[String], sessions: &[(usize, usize)]) -> Figures {
    let relays = relay_names(RELAYS);
    let (placed, conns) = place(names, &relays, sessions);
    let mut counts: Vec<usize> = conns.iter().map(HashSet::len).collect();
    counts.sort_unstable();
    let mut joined = relays.clone();
    joined.push("relay-new.example:4434".into());
    let moved = names
        .iter()
        .filter(|n| homes(n, &relays, DEFAULT_HOMES) != homes(n, &joined, DEFAULT_HOMES))
        .count();
    // Relay 0 leaves: the sessions it carried move, and those whose
    // meeting relay changed for another reason (none should).
    let left: Vec<String> = relays[1..].to_vec();
    let (after, _) = place(names, &left, sessions);
    let moved_sessions = placed
        .iter()
        .zip(&after)
        .filter(|(before, after)| relays[**before] != left[**after])
        .count();
    Figures {
        load_max_over_mean: load_ratio(&placed, RELAYS),
        conns_mean: counts.iter().sum::<usize>() as f64 / counts.len() as f64,
        conns_p99: counts[counts.len() * 99 / 100],
        names_moved_join: moved as f64 / names.len() as f64,
        sessions_moved_leave: moved_sessions as f64 / sessions.len() as f64,
    }
}

/// Full meshes homed by cluster (every node of a cluster uses its
/// cluster's name as its home key): one relay a cluster.
fn by_cluster(sessions: &[(usize, usize)]) -> Figures {
    let keys: Vec<String> = (0..NODES).map(|i| format!("cluster{}", i / MESH)).collect();
    let mut f = rendezvous(&keys, sessions);
    // A name moves with its cluster's key.
    f.names_moved_join = {
        let relays = relay_names(RELAYS);
        let mut joined = relays.clone();
        joined.push("relay-new.example:4434".into());
        keys.iter()
            .filter(|k| homes(k, &relays, DEFAULT_HOMES) != homes(k, &joined, DEFAULT_HOMES))
            .count() as f64
            / keys.len() as f64
    };
    f
}

/// Today: every node connects to every relay of the list, and a session
/// runs on the first relay that has the target (the first of the list).
fn relay_list(sessions: &[(usize, usize)]) -> Figures {
    let placed = vec![0usize; sessions.len()];
    Figures {
        load_max_over_mean: load_ratio(&placed, RELAYS),
        conns_mean: RELAYS as f64,
        conns_p99: RELAYS,
        names_moved_join: 0.0,
        // The first relay leaves: every session moves.
        sessions_moved_leave: 1.0,
    }
}

fn main() {
    let names = node_names();
    println!(
        "{NODES} nodes, {RELAYS} relays, k = {DEFAULT_HOMES} (expected share moved on a join: k/(R+1) = {:.3})\n",
        DEFAULT_HOMES as f64 / (RELAYS + 1) as f64
    );
    println!("| traffic | placement | sessions | sessions per relay, max/mean | relay connections per node, mean | p99 | names moved, a relay joins | sessions moved, a relay leaves |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (traffic, sessions) in [
        ("sparse (5 peers each)", sparse()),
        ("full meshes of 100", meshes()),
    ] {
        let mut rows = vec![
            ("relay list (today)", relay_list(&sessions)),
            (
                "rendezvous homes by node name",
                rendezvous(&names, &sessions),
            ),
        ];
        if sessions.len() > NODES * SPARSE_PEERS {
            rows.push(("rendezvous homes by cluster name", by_cluster(&sessions)));
        }
        for (placement, f) in rows {
            println!(
                "| {traffic} | {placement} | {} | {:.2} | {:.1} | {} | {:.1} % | {:.1} % |",
                sessions.len(),
                f.load_max_over_mean,
                f.conns_mean,
                f.conns_p99,
                100.0 * f.names_moved_join,
                100.0 * f.sessions_moved_leave
            );
        }
    }
}
