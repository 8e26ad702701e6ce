#!/usr/bin/env bash
# Benchmarks -proto_dist macula against inet_tcp_dist and inet_tls_dist on
# this machine: bash bench/run.sh [REPETITIONS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
cargo build --release --quiet -p macula_dist_relay
rebar3 compile >/dev/null
mkdir -p bench/ebin
erlc -o bench/ebin bench/macula_bench.erl bench/macula_wan.erl
erl -noshell -pa bench/ebin -pa _build/default/lib/macula_dist/ebin \
    -eval "macula_bench:main($reps)"
