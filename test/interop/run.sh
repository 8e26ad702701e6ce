#!/usr/bin/env bash
# Runs the aioquic client (another QUIC stack) against the relay binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=$(bash test/interop/python.sh)
cargo build --release --quiet -p macula_dist_relay
work=$(mktemp -d)
printf 'interop-token' > "$work/token"
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/release/macula-dist-relay --listen "127.0.0.1:$port" --token-file "$work/token" --state-dir "$work/state" >/dev/null 2>"$work/relay.log" &
relay=$!
# The relay may still be writing its state dir: wait for it before removing.
trap 'kill $relay 2>/dev/null; wait $relay 2>/dev/null || true; rm -rf "$work" || true' EXIT
sleep 0.5
timeout 120 "$python" test/interop/aioquic_client.py "$port" interop-token
