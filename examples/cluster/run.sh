#!/usr/bin/env bash
# Builds this project's release, starts a relay and two release nodes, and
# shows them clustered through the relay.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$here"

(cd "$root" && cargo build --release --quiet -p macula_dist_relay)
MIX_ENV=prod mix release --overwrite --quiet

work=$(mktemp -d)
pids=()
# Wait for every process to exit before removing the directory it writes in
# (the relay writes its state as it stops).
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"
"$root/target/release/macula-dist-relay" --listen "127.0.0.1:$port" --fingerprint-file "$work/pin" \
  --token-file "$work/token" --state-dir "$work/relay-state" 2>"$work/relay.log" >/dev/null &
pids+=($!)
for _ in $(seq 50); do [ -s "$work/pin" ] && break; sleep 0.1; done

export MACULA_DIST_RELAY="quic://127.0.0.1:$port" MACULA_DIST_PIN_SHA256=$(cat "$work/pin")
export MACULA_DIST_TOKEN_FILE="$work/token"
export RELEASE_DISTRIBUTION=sname RELEASE_COOKIE=cluster_example
host=$(hostname -s)
bin=_build/prod/rel/cluster/bin/cluster

RELEASE_NODE=alice "$bin" start >"$work/alice.log" 2>&1 &
pids+=($!)
sleep 1
RELEASE_NODE=bob CLUSTER_PEER="alice@$host" "$bin" start >"$work/bob.log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do grep -q "cluster:" "$work/bob.log" && break; sleep 0.2; done
cat "$work/bob.log"
grep -q "connected to alice@$host" "$work/bob.log"
