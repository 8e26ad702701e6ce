//! The fuzz harnesses without a fuzzer: the seed corpus, any crash files
//! kept under regressions/<target>/, and proptest inputs (random bytes and
//! mutated seeds). `PROPTEST_CASES` sets the number of cases (default 2000).

use std::path::Path;

use proptest::prelude::*;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("frames", macula_fuzz::frames),
    ("dataplane", macula_fuzz::dataplane),
    ("sessions", macula_fuzz::sessions),
    ("paths", macula_fuzz::paths),
];

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut out: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn committed_seeds_are_the_generated_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let generated = macula_fuzz::seeds();
    for (target, name, bytes) in &generated {
        let path = root.join(target).join(name);
        assert_eq!(
            std::fs::read(&path).ok().as_ref(),
            Some(bytes),
            "{} is stale: run `cargo run --bin seeds`",
            path.display()
        );
    }
    let committed: usize = TARGETS
        .iter()
        .map(|(t, _)| files(&root.join(t)).len())
        .sum();
    assert_eq!(
        committed,
        generated.len(),
        "seeds/ has files seeds() does not make"
    );
}

#[test]
fn seeds_and_regressions_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (target, run) in TARGETS {
        let mut n = 0;
        for dir in ["seeds", "regressions"] {
            for (path, bytes) in files(&root.join(dir).join(target)) {
                eprintln!("{path}");
                run(&bytes);
                n += 1;
            }
        }
        assert!(n > 0, "no seeds for {target}");
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// A seed of `target` with some bytes overwritten, inserted or cut.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds: Vec<Vec<u8>> = macula_fuzz::seeds()
        .into_iter()
        .filter(|(t, _, _)| *t == target)
        .map(|(_, _, b)| b)
        .collect();
    (
        proptest::sample::select(seeds),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..8),
    )
        .prop_map(|(mut seed, edits)| {
            for (at, byte, kind) in edits {
                let i = at.index(seed.len() + 1);
                match kind {
                    0 if i < seed.len() => seed[i] = byte,
                    1 if i < seed.len() => {
                        seed.remove(i);
                    }
                    _ => seed.insert(i, byte),
                }
            }
            seed
        })
}

fn input(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        mutated(target),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn frames(data in input("frames")) {
        macula_fuzz::frames(&data);
    }

    #[test]
    fn dataplane(data in input("dataplane")) {
        macula_fuzz::dataplane(&data);
    }

    #[test]
    fn sessions(data in input("sessions")) {
        macula_fuzz::sessions(&data);
    }

    #[test]
    fn paths(data in input("paths")) {
        macula_fuzz::paths(&data);
    }
}
