#!/usr/bin/env bash
# The WAN benchmark: node A and node B in two network namespaces joined by
# macula-impair's tun mode, the relay beside B, every carrier on the
# metro, continental and lossy profiles (see bench/macula_wan.erl).
#   sudo bash bench/wan.sh [REPETITIONS]   (default 3; needs root)
# MACULA_WAN_PROFILES=metro,lossy and MACULA_BENCH_CARRIERS=inet_tcp,macula_e2e
# pick some.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
reps=${1:-3}
[ "$(id -u)" = 0 ] || { echo "bench/wan.sh needs root (network namespaces, tun)" >&2; exit 1; }
cargo build --release --quiet -p macula_dist_relay -p macula_impair
rebar3 compile >/dev/null
mkdir -p bench/ebin
erlc -o bench/ebin bench/macula_bench.erl bench/macula_wan.erl

id=$$
ns_a=mwa$id ns_b=mwb$id dev_a=tmwa$id dev_b=tmwb$id
addr_a=10.202.0.1 addr_b=10.202.0.2
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
ip netns add "$ns_a"
ip netns add "$ns_b"

# The emulator runs in the root namespace; its tun devices move into the two.
target/release/macula-impair --tun-a "$dev_a" --tun-b "$dev_b" \
  --control 127.0.0.1:0 --seed 1 > "$tmp/impair.out" 2> "$tmp/impair.err" &
pids+=($!)
for _ in $(seq 100); do grep -q control= "$tmp/impair.out" 2>/dev/null && break; sleep 0.1; done
control=$(sed -n 's/.*control=127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/impair.out")
[ -n "$control" ] || { cat "$tmp/impair.err" >&2; exit 1; }
setup_ns() { # ns dev me peer
  ip link set "$2" netns "$1"
  ip -n "$1" addr add "$3" peer "$4" dev "$2"
  ip -n "$1" link set "$2" up
  ip -n "$1" link set lo up
}
setup_ns "$ns_a" "$dev_a" "$addr_a" "$addr_b"
setup_ns "$ns_b" "$dev_b" "$addr_b" "$addr_a"

# The relay beside B (in B's namespace): A reaches it across the WAN.
ip netns exec "$ns_b" target/release/macula-dist-relay --listen "$addr_b:4434" \
  --allow-anonymous --ephemeral > "$tmp/relay.out" 2> "$tmp/relay.err" &
pids+=($!)
for _ in $(seq 100); do [ -s "$tmp/relay.out" ] && break; sleep 0.1; done
pin=$(head -1 "$tmp/relay.out")
[ -n "$pin" ] || { cat "$tmp/relay.err" >&2; exit 1; }

MACULA_ROOT=$root MACULA_WAN_REPS=$reps MACULA_WAN_NS_A=$ns_a MACULA_WAN_NS_B=$ns_b \
MACULA_WAN_ADDR_A=$addr_a MACULA_WAN_ADDR_B=$addr_b MACULA_WAN_RELAY="quic://$addr_b:4434" \
MACULA_WAN_PIN=$pin MACULA_WAN_CONTROL=$control MACULA_WAN_TMP=$tmp \
  erl -noshell -pa bench/ebin -pa _build/default/lib/macula_dist/ebin -eval "macula_wan:main()"
