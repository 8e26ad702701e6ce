#!/usr/bin/env bash
# Scale check: one relay and N light BEAM nodes (-proto_dist macula), full-meshed.
#
#   bash bench/mesh.sh [--mode e2e|stream|both] [--connect ordered|all|seed] [--no-build] N [N ...]
#
#   N ...        node counts, one run each with a fresh relay (default: 10)
#   --mode       -macula_dist tunnel: e2e (default), stream, both (e2e,stream), or tcp
#                (plain inet_tcp_dist with a private epmd, for comparison), or tls
#                (inet_tls_dist, TLS 1.3 with certificates checked both ways), or a
#                comma list, or all (e2e,stream,tcp) (env MESH_MODE)
#   --connect    ordered: node i connects to the nodes j > i (default)
#                all:     every node connects to every other at once (both ends dial)
#                seed:    every node connects to node 1; global's connect_all does the rest
#                a comma list runs each (env MESH_CONNECT)
#   --dial-par K each node dials at most K of its targets at once (default 8;
#                0: all at once) (env MESH_DIAL_PAR)
#   --relays R   R relay processes as one set (-macula_dist relay_set; each
#                node joins its two home relays), default 1 (env MESH_RELAYS)
#   --no-build   use the existing relay binary and NIF
#
# Env: MESH_TIMEOUT (s, default 120) per wait; MESH_START_PAR (default 4) nodes
# booted at once; MESH_ERL_ARGS extra erl arguments for the nodes (e.g.
# "-kernel prevent_overlapping_partitions false"); MESH_IDLE (s, default 10)
# of idle mesh whose CPU is measured; MESH_QUIET_WAIT (s, default 300) to wait
# for an idle machine before each run; MESH_KEEP=1 keeps the run directory
# (relay and node logs).
#
# Prints, per run, the time from "all nodes up" to "every node has N-1 nodes()",
# global:sync(), rpc:multicall over all nodes, relay and node RSS, CPU split, and
# tunnels/sessions opened against links; a markdown table of all runs at the end.
# Every process it starts (relay, controller VM, nodes) is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

modes=${MESH_MODE:-e2e}
connects=${MESH_CONNECT:-ordered}
relays=${MESH_RELAYS:-1}
build=1
sizes=()
while [ $# -gt 0 ]; do
    case "$1" in
        --mode) modes=$2; shift 2 ;;
        --mode=*) modes=${1#*=}; shift ;;
        --connect) connects=$2; shift 2 ;;
        --connect=*) connects=${1#*=}; shift ;;
        --dial-par) export MESH_DIAL_PAR=$2; shift 2 ;;
        --dial-par=*) export MESH_DIAL_PAR=${1#*=}; shift ;;
        --relays) relays=$2; shift 2 ;;
        --relays=*) relays=${1#*=}; shift ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | cut -c3-; exit 0 ;;
        [0-9]*) sizes+=("$1"); shift ;;
        *) echo "mesh.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#sizes[@]} -gt 0 ] || sizes=(10)
[ "$modes" = both ] && modes=e2e,stream
[ "$modes" = all ] && modes=e2e,stream,tcp
[ "$relays" -ge 1 ] 2>/dev/null || { echo "mesh.sh: --relays must be >= 1" >&2; exit 2; }
for n in "${sizes[@]}"; do [ "$n" -ge 2 ] || { echo "mesh.sh: N must be >= 2" >&2; exit 2; }; done

tmp=$(mktemp -d /tmp/macula_mesh.XXXXXX)
relay_pids=()
ctl_pid=""

# Kill only what this script started: the controller, the relay, and the
# nodes whose pids the controller recorded (checked against their command
# line, which names this run's directory).
kill_nodes() {
    local f p
    for f in "$tmp"/run*/pids; do
        [ -f "$f" ] || continue
        while read -r p; do
            [ -n "$p" ] && grep -qs "$tmp" "/proc/$p/cmdline" && kill -9 "$p" 2>/dev/null || true
        done <"$f"
    done
}
stop_relay() {
    local p
    for p in "${relay_pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    relay_pids=()
}

# Starts relay number $2 of a run in directory $1; adds its URL, pin, log
# and pid to the comma lists the controller takes.
start_relay() {
    local dir=$1 i=$2 pid addr
    RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$relay_bin" "${relay_args[@]}" \
        --fingerprint-file "$dir/fingerprint$i" >"$dir/relay$i.out" 2>"$dir/relay$i.log" &
    pid=$!
    relay_pids+=("$pid")
    for _ in $(seq 100); do
        grep -qs 'relay listening' "$dir/relay$i.log" && [ -s "$dir/fingerprint$i" ] && break
        kill -0 "$pid" 2>/dev/null || { cat "$dir/relay$i.log" >&2; exit 1; }
        sleep 0.1
    done
    addr=$(sed 's/\x1b\[[0-9;]*m//g' "$dir/relay$i.log" | grep -o 'local_addr=[0-9.:]*' | head -1)
    addr=${addr#local_addr=}
    [ -n "$addr" ] || { echo "mesh.sh: relay address not found" >&2; cat "$dir/relay$i.log" >&2; exit 1; }
    urls=${urls:+$urls,}quic://$addr
    pins=${pins:+$pins,}$(tr -d ' \n' <"$dir/fingerprint$i")
    logs=${logs:+$logs,}$dir/relay$i.log
    ctl_relay=${ctl_relay:+$ctl_relay,}$pid
}
cleanup() {
    set +e
    if [ -n "$ctl_pid" ]; then kill "$ctl_pid" 2>/dev/null; wait "$ctl_pid" 2>/dev/null; fi
    kill_nodes
    stop_relay
    if [ "${MESH_KEEP:-0}" = 1 ]; then echo "mesh.sh: kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

if [ "$build" = 1 ]; then
    cargo build --release --quiet -p macula_dist_relay
    rebar3 compile >/dev/null
fi
mkdir -p bench/ebin
erlc -o bench/ebin bench/macula_mesh.erl
relay_bin=$root/target/release/macula-dist-relay

head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp/token"
# A token, so the relay never needs --allow-anonymous. A throwaway identity
# (--ephemeral) where the relay would otherwise keep one in a state dir. All
# nodes come from 127.0.0.1, so the per-address limit of connections still
# identifying (if the relay has one) must allow MESH_START_PAR at once.
relay_args=(--listen 127.0.0.1:0 --token-file "$tmp/token")
relay_help=$("$relay_bin" --help)
grep -q -- '--ephemeral' <<<"$relay_help" && relay_args+=(--ephemeral)
grep -q -- '--max-unidentified-per-ip' <<<"$relay_help" && relay_args+=(--max-unidentified-per-ip 1024)

# Other work on the machine skews the times (the nodes fill both cores):
# wait up to MESH_QUIET_WAIT seconds (default 300; 0: don't) for a moment
# when the machine is nearly idle (under 20% of one core busy over 2 s).
# Each run also reports the CPU that other processes used during the mesh.
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
wait_quiet() {
    local waited=0 limit=${MESH_QUIET_WAIT:-300} hz a b
    hz=$(getconf CLK_TCK)
    while [ "$waited" -lt "$limit" ]; do
        a=$(busy_ticks); sleep 2; b=$(busy_ticks)
        [ $(( (b - a) * 100 / (2 * hz) )) -lt 20 ] && return 0
        [ "$waited" = 0 ] && echo "mesh.sh: the machine is busy; waiting up to ${limit} s for it to calm down"
        waited=$((waited + 2))
    done
    echo "mesh.sh: still busy; running anyway (see 'CPU s elsewhere')"
}

free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 20000))
        ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
    done
}

echo "mesh.sh: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- native src 2>/dev/null || echo ' (+ uncommitted changes in native/ or src/)'), $(nproc) cores, sizes ${sizes[*]}, modes $modes, connect $connects"
rows=()
run=0
for mode in ${modes//,/ }; do
    for connect in ${connects//,/ }; do
        for n in "${sizes[@]}"; do
            run=$((run + 1))
            dir=$tmp/run$run
            mkdir -p "$dir"
            wait_quiet
            epmd_port=""
            if [ "$mode" = tcp ] || [ "$mode" = tls ]; then
                # inet_tcp_dist or inet_tls_dist for comparison: a private epmd
                # (stopped like the relay), never the machine's own on port 4369.
                epmd_port=$(free_port)
                epmd -port "$epmd_port" >"$dir/epmd.log" 2>&1 &
                relay_pids=($!)
                urls=- pins=- logs=/dev/null ctl_relay=0
                sleep 0.5
            else
                urls="" pins="" logs="" ctl_relay=""
                for i in $(seq "$relays"); do start_relay "$dir" "$i"; done
            fi
            ERL_EPMD_PORT=${epmd_port:-${ERL_EPMD_PORT:-4369}} \
            erl -noshell +S 2:2 -pa "$root/bench/ebin" -pa "$root/_build/default/lib/macula_dist/ebin" \
                -eval 'macula_mesh:main()' \
                -extra "$n" "$mode" "$connect" "$dir" "$urls" "$pins" "$tmp/token" \
                "$ctl_relay" "$logs" > >(tee "$dir/out") &
            ctl_pid=$!
            if wait "$ctl_pid"; then :; else echo "mesh.sh: run N=$n mode=$mode connect=$connect failed"; fi
            ctl_pid=""
            row=$(grep '^ROW|' "$dir/out" | sed 's/^ROW//' || true)
            [ -n "$row" ] && rows+=("$row") || rows+=("| $mode | $connect | $n | FAILED |")
            kill_nodes
            stop_relay
        done
    done
done

echo
echo "| mode | connect | N | boot s | mesh s | node p50 s | global sync s | multicall first / median ms | results | relay RSS (peak) MiB | node RSS median / max MiB | tunnel / e2e opened / links | nodeup / nodedown | overlap | CPU s relay / sched / NIF / other | CPU s elsewhere |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do echo "$r"; done
