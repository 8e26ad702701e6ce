//! Writes the seed corpus: `cargo run --bin seeds [DIR]` (default: seeds/),
//! one folder per target. The committed corpus is this program's output;
//! tests/replay.rs checks that it still is.
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds"));
    for (target, name, bytes) in macula_fuzz::seeds() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)?;
    }
    Ok(())
}
