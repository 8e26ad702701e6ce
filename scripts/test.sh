#!/usr/bin/env bash
# Every test: Rust (cargo test), EUnit, Common Test and ExUnit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh

echo "== cargo test"
cargo test --workspace --quiet 2>&1 | grep -v '^$'

echo "== relay interop (aioquic client)"
bash test/interop/run.sh

echo "== rebar3 eunit"
rebar3 eunit

echo "== rebar3 ct"
rebar3 ct

echo "== mix test"
mix test

echo "== Elixir release example (examples/cluster)"
bash examples/cluster/run.sh
