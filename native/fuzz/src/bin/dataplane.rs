//! AFL++ target: see macula_fuzz::dataplane.
fn main() {
    afl::fuzz!(|data: &[u8]| macula_fuzz::dataplane(data));
}
