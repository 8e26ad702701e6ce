//! AFL++ target: see macula_fuzz::sessions.
fn main() {
    afl::fuzz!(|data: &[u8]| macula_fuzz::sessions(data));
}
