#!/usr/bin/env bash
# Every test: Rust (cargo test), clippy, EUnit, dialyzer, Common Test,
# ExUnit, a short fuzz run of the relay protocol (scripts/fuzz.sh), then the
# build, EUnit, the main CT suite and ExUnit on OTP 27 and 29.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh

echo "== cargo test"
cargo test --workspace --quiet 2>&1 | grep -v '^$'

echo "== WAN emulator (macula-impair tun mode between two network namespaces)"
if [ "$(id -u)" = 0 ] && [ -c /dev/net/tun ]; then
  cargo test -p macula_impair --test tun --quiet -- --ignored 2>&1 | grep -v '^$'
else
  echo "SKIPPED: needs root and /dev/net/tun (the direct-path CT suite skips likewise)"
fi

echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --manifest-path native/fuzz/Cargo.toml --target-dir target --all-targets --quiet -- -D warnings

echo "== imports (no module cycles, crates one way)"
python3 scripts/check-imports.py

echo "== relay interop (aioquic client)"
bash test/interop/run.sh

echo "== rebar3 eunit"
rebar3 eunit

echo "== rebar3 dialyzer"
rebar3 dialyzer

echo "== rebar3 ct"
rebar3 ct

echo "== mix test"
mix test

echo "== Elixir release example (examples/cluster)"
bash examples/cluster/run.sh

echo "== fuzz (native/fuzz: AFL++ for ${FUZZ_SECONDS:-5} s per target)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-5}"

# The build, EUnit, the main CT suite and ExUnit again on OTP 27 and 29
# (Debian trixie and sid chroots; needs root). OTP_MATRIX=0 skips it.
if [ "${OTP_MATRIX:-1}" != 0 ]; then
  echo "== OTP 27 and 29 (scripts/otp-matrix.sh)"
  bash scripts/otp-matrix.sh
fi
