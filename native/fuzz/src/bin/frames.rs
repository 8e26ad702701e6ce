//! AFL++ target: see macula_fuzz::frames.
fn main() {
    afl::fuzz!(|data: &[u8]| macula_fuzz::frames(data));
}
