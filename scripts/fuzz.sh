#!/usr/bin/env bash
# Fuzzing of the relay protocol crate (native/fuzz, see its src/lib.rs):
# first the harnesses as plain tests (seed corpus, regressions/, proptest),
# then AFL++ (cargo-afl, stable Rust) on each target for a while.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]   (default 5 s, all targets)
#
# PROPTEST_CASES sets the cases of the test step (default 1000).
# FUZZ_INSTALL=1 (or CI=true) installs cargo-afl when it is missing
# (`cargo install cargo-afl`, about two minutes: it builds AFL++ too);
# otherwise the AFL++ runs are skipped with a message. FUZZ_JOBS=N runs N
# targets at once (default 1). Output: native/fuzz/out/<target>/ (or
# $FUZZ_OUT/<target>/, for a long run beside test.sh's short ones). A crash
# fails the script, printing the input and the panic; to keep it as a test,
# copy it to native/fuzz/regressions/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../native/fuzz"

secs=${1:-${FUZZ_SECONDS:-5}}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames dataplane sessions paths)
jobs=${FUZZ_JOBS:-1}
out=${FUZZ_OUT:-out}

echo "-- fuzz harnesses as tests (seeds, regressions, proptest)"
# Not --locked: native/fuzz/Cargo.lock takes in a new dependency of
# macula_relay_proto by itself.
# In the root target dir, whose debug build of the dependencies they share.
PROPTEST_CASES=${PROPTEST_CASES:-1000} \
  cargo test --quiet --target-dir ../../target 2>&1 | grep -v '^$'

if ! command -v cargo-afl >/dev/null; then
  if [ "${CI:-}" = true ] || [ "${FUZZ_INSTALL:-}" = 1 ]; then
    echo "-- installing cargo-afl (builds AFL++)"
    cargo install cargo-afl --locked --version 0.18.2 --quiet
  else
    echo "fuzz: SKIPPED the AFL++ runs: cargo-afl is not installed" \
         "(FUZZ_INSTALL=1 scripts/fuzz.sh installs it, or: cargo install cargo-afl --locked)"
    exit 0
  fi
fi
# AFL++'s runtime is built per rustc version (cargo install builds it for
# the toolchain of that moment).
if cargo afl fuzz -h 2>&1 | grep -q "was not built"; then
  echo "-- building AFL++ for $(rustc --version)"
  cargo afl config --build --force
fi

echo "-- cargo afl build (targets: ${targets[*]})"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo afl build --release --quiet --features afl --target-dir target/afl "${bins[@]}"

# No CPU governor, core_pattern or affinity to set up in a container or CI.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1 \
       AFL_NO_UI=1

run() {
  local t=$1
  rm -rf "${out:?}/$t"
  mkdir -p "$out"
  # -V: stop after secs; the outer timeout only guards against a stuck run.
  timeout --kill-after=10 $((secs + 120)) \
    cargo afl fuzz -i "seeds/$t" -o "$out/$t" -V "$secs" -t 1000 -- "target/afl/release/$t" \
    >"$out/$t.log" 2>&1 || {
      echo "afl-fuzz $t failed (exit $?); last lines of $out/$t.log:"
      tail -20 "$out/$t.log"
      return 1
    }
}

status=0
running=0
for t in "${targets[@]}"; do
  run "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || status=1
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done

stat() { sed -n "s/^$2 *: //p" "$out/$1/default/fuzzer_stats"; }
for t in "${targets[@]}"; do
  if [ ! -f "$out/$t/default/fuzzer_stats" ]; then
    echo "fuzz $t: no statistics (see $out/$t.log)"
    status=1
    continue
  fi
  crashes=$(stat "$t" saved_crashes)
  printf 'fuzz %-9s %4ss %10s execs (%s/s), corpus %s, edges %s/%s, crashes %s, hangs %s\n' \
    "$t" "$(stat "$t" run_time)" "$(stat "$t" execs_done)" "$(stat "$t" execs_per_sec)" \
    "$(stat "$t" corpus_count)" "$(stat "$t" edges_found)" "$(stat "$t" total_edges)" \
    "$crashes" "$(stat "$t" saved_hangs)"
  if [ "$crashes" != 0 ]; then
    status=1
    # The first few: the input, then the panic it gives.
    for f in $(ls "$out/$t/default/crashes"/id:* | head -3); do
      echo "crash input $f:"
      od -A d -t x1 "$f" | head -20
      ("target/afl/release/$t" <"$f" 2>&1 | grep -A3 panicked | head -8) 2>/dev/null || true
    done
  fi
done
exit $status
