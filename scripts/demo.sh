#!/usr/bin/env bash
# The main job: build, start a relay and two nodes on this machine, and show
# them clustered through the relay (nodes(), an rpc result, a throughput figure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh

echo "== building (cargo + rebar3)"
cargo build --release --quiet -p macula_dist_relay
rebar3 compile >/dev/null

work=$(mktemp -d)
relay_pid=""
cleanup() {
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null || true
  [ -n "${bob_pid:-}" ] && kill "$bob_pid" 2>/dev/null || true
  # The relay writes its state as it stops: wait before removing its directory.
  [ -n "$relay_pid" ] && wait "$relay_pid" 2>/dev/null || true
  [ -n "${bob_pid:-}" ] && wait "$bob_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=${MACULA_DIST_PORT:-$(erl -noshell -eval '{ok, S} = gen_udp:open(0, [{ip, {127,0,0,1}}]), {ok, P} = inet:port(S), io:format("~b", [P]), halt().')}
echo "== starting the relay on 127.0.0.1:$port"
# A token only these nodes know, and the relay's identity in the work dir.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"
./target/release/macula-dist-relay --listen "127.0.0.1:$port" --token-file "$work/token" \
  --state-dir "$work/relay-state" --fingerprint-file "$work/fingerprint" >"$work/relay.out" 2>"$work/relay.log" &
relay_pid=$!
for _ in $(seq 50); do [ -s "$work/fingerprint" ] && break; sleep 0.1; done
pin=$(cat "$work/fingerprint")
echo "   certificate sha256: $pin"

ebin=_build/default/lib/macula_dist/ebin
node_args=(-noshell -pa "$ebin" -proto_dist macula -no_epmd -setcookie macula_demo
           -macula_dist relay "\"quic://127.0.0.1:$port\""
           -macula_dist pin_sha256 "\"$pin\""
           -macula_dist token_file "\"$work/token\"")
host=$(erl -noshell -eval 'io:put_chars(element(2, inet:gethostname())), halt().')

echo "== starting bob@$host"
erl "${node_args[@]}" -sname bob -eval 'receive after infinity -> ok end' >"$work/bob.log" 2>&1 &
bob_pid=$!

echo "== starting alice@$host, which connects to bob through the relay"
erl "${node_args[@]}" -sname alice -eval '
{ok, Host} = inet:gethostname(),
Bob = list_to_atom("bob@" ++ Host),
Ping = fun Ping(0) -> pang; Ping(N) -> case net_adm:ping(Bob) of pong -> pong; pang -> timer:sleep(200), Ping(N - 1) end end,
pong = Ping(50),
io:format("nodes() on alice: ~p~n", [nodes()]),
io:format("rpc:call(bob, erlang, system_info, [otp_release]): ~p~n", [rpc:call(Bob, erlang, system_info, [otp_release])]),
{ok, Info} = net_kernel:node_info(Bob),
io:format("carrier: ~p~n", [proplists:get_value(address, Info)]),
%% The session starts on the relay and moves to a direct path once a probe
%% is answered (here, on one machine, at once).
Path = fun Path(0) -> net_kernel:getopts(Bob, [path]);
           Path(N) -> case net_kernel:getopts(Bob, [path]) of
                          {ok, [{path, {direct, _}}]} = P -> P;
                          _ -> timer:sleep(100), Path(N - 1)
                      end
       end,
{ok, [{path, P}]} = Path(20),
io:format("path: ~p~n", [P]),
Bin = crypto:strong_rand_bytes(1 bsl 20),
Sink = spawn(Bob, fun F() -> receive {From, done} -> From ! done; _ -> F() end end),
N = 256,
T0 = erlang:monotonic_time(),
[Sink ! Bin || _ <- lists:seq(1, N)],
Sink ! {self(), done},
receive done -> ok end,
Us = erlang:convert_time_unit(erlang:monotonic_time() - T0, native, microsecond),
io:format("throughput alice -> bob: ~.1f MB/s (~b MiB in ~b ms)~n", [N * 1048576 / Us, N, Us div 1000]),
Rtts = [begin S = erlang:monotonic_time(), Bob = rpc:call(Bob, erlang, node, []), erlang:monotonic_time() - S end || _ <- lists:seq(1, 2000)],
Median = lists:nth(1000, lists:sort(Rtts)),
io:format("rpc:call round trip, median of 2000: ~b us~n", [erlang:convert_time_unit(Median, native, microsecond)]),
halt().'
echo "== relay log (tail)"
tail -n 4 "$work/relay.log" | sed 's/\x1b\[[0-9;]*m//g'
