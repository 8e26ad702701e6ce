//! AFL++ target: see macula_fuzz::paths.
fn main() {
    afl::fuzz!(|data: &[u8]| macula_fuzz::paths(data));
}
