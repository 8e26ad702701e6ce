%% The WAN benchmark: node A and node B in two network namespaces joined by
%% macula-impair's tun mode (bench/wan.sh sets them up, with the relay in
%% B's namespace), the same metrics for every carrier on each profile.
%%
%% Metrics, run on A against B: idle rtt of 64-byte ping-pongs (p50/p99),
%% small one-way messages per second, bulk MB/s (1 MiB messages for a fixed
%% time), connection setup, and latency under load: ping-pongs from one
%% process while another streams 1 MiB messages to B (acked every 8, at
%% most 32 MiB unacknowledged), p50/p99/max and how many finished in time.
-module(macula_wan).

-export([main/0]).
%% Run on node A.
-export([idle_rtt/1, small/1, bulk/1, setup/1, loaded_rtt/1, loaded_rtt/3]).
%% Run on node B.
-export([counter/2]).

%% Sized so that one carrier on one profile takes about a minute.
-define(PINGS, 100).
-define(LOADED_PINGS, 100).
-define(SMALL_COUNT, 10000).
-define(BULK_SECONDS, 8).
-define(LOADED_SECONDS, 30).
-define(SETUPS, 3).
-define(ALL_CARRIERS, [macula_direct, macula_e2e, macula_stream, inet_tcp, inet_tls]).

%% Profiles: {Name, [emulator settings, both directions]}.
profiles() ->
    #{metro => ["set delay 5", "set rate 100", "set queue 20", "set loss 0"],
      continental => ["set delay 20", "set rate 50", "set queue 50", "set loss 0.001"],
      lossy => ["set delay 75", "set rate 20", "set queue 100", "set loss 0.01"]}.

env(Name) ->
    case os:getenv(Name) of
        false -> error({missing_env, Name});
        V -> V
    end.

list_env(Name, Default) ->
    case os:getenv(Name) of
        false -> Default;
        V -> [list_to_atom(X) || X <- string:lexemes(V, ",")]
    end.

%% ---- controller ----

main() ->
    Reps = list_to_integer(env("MACULA_WAN_REPS")),
    Profiles = list_env("MACULA_WAN_PROFILES", [metro, continental, lossy]),
    Carriers = list_env("MACULA_BENCH_CARRIERS", ?ALL_CARRIERS),
    Env = #{root => env("MACULA_ROOT"), ns_a => env("MACULA_WAN_NS_A"),
            ns_b => env("MACULA_WAN_NS_B"), addr_a => env("MACULA_WAN_ADDR_A"),
            addr_b => env("MACULA_WAN_ADDR_B"), url => env("MACULA_WAN_RELAY"),
            pin => env("MACULA_WAN_PIN"), tls => macula_bench:tls_optfile(env("MACULA_WAN_TMP")),
            control => list_to_integer(env("MACULA_WAN_CONTROL"))},
    Results = [begin
                   configure(Env, Profile),
                   io:format("== ~p: ~p~n", [Profile, maps:get(Profile, profiles())]),
                   Runs = [{C, run_pair(C, Rep, Env)} || Rep <- lists:seq(1, Reps), C <- Carriers],
                   {Profile, Runs}
               end || Profile <- Profiles],
    [report(Profile, Carriers, Runs) || {Profile, Runs} <- Results],
    halt(0).

configure(#{control := Port}, Profile) ->
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {packet, line}, {active, false}]),
    [begin
         ok = gen_tcp:send(S, [Cmd, $\n]),
         {ok, <<"ok", _/binary>>} = gen_tcp:recv(S, 0, 5000)
     end || Cmd <- ["clear" | maps:get(Profile, profiles())]],
    gen_tcp:close(S).

carrier_args(macula_direct, Env) ->
    macula_args(Env) ++ ["-macula_dist", "direct", "true"];
carrier_args(macula_e2e, Env) ->
    macula_args(Env) ++ ["-macula_dist", "direct", "false"];
carrier_args(macula_direct_bbr, Env) ->
    carrier_args(macula_direct, Env) ++ ["-macula_dist", "congestion", "bbr"];
carrier_args(macula_e2e_bbr, Env) ->
    carrier_args(macula_e2e, Env) ++ ["-macula_dist", "congestion", "bbr"];
carrier_args(macula_direct_cubic_bounded, Env) ->
    carrier_args(macula_direct, Env) ++ ["-macula_dist", "congestion", "cubic_bounded"];
carrier_args(macula_e2e_cubic_bounded, Env) ->
    carrier_args(macula_e2e, Env) ++ ["-macula_dist", "congestion", "cubic_bounded"];
carrier_args(macula_direct_bbr_bounded, Env) ->
    carrier_args(macula_direct, Env) ++ ["-macula_dist", "congestion", "bbr_bounded"];
carrier_args(macula_e2e_bbr_bounded, Env) ->
    carrier_args(macula_e2e, Env) ++ ["-macula_dist", "congestion", "bbr_bounded"];
carrier_args(macula_direct_cubic, Env) ->
    carrier_args(macula_direct, Env) ++ ["-macula_dist", "congestion", "cubic"];
carrier_args(macula_e2e_cubic, Env) ->
    carrier_args(macula_e2e, Env) ++ ["-macula_dist", "congestion", "cubic"];
carrier_args(macula_stream, Env) ->
    macula_args(Env) ++ ["-macula_dist", "tunnel", "stream"];
carrier_args(inet_tcp, _) ->
    [];
carrier_args(inet_tls, #{tls := OptFile}) ->
    ["-proto_dist", "inet_tls", "-ssl_dist_optfile", OptFile].

%% A long path: the relay connection's idle timeout is raised so that the
%% lossy profile's queues are not taken for a dead relay.
macula_args(#{url := Url, pin := Pin}) ->
    ["-proto_dist", "macula", "-no_epmd", "-macula_dist", "relay", "\"" ++ Url ++ "\"",
     "-macula_dist", "pin_sha256", "\"" ++ Pin ++ "\"", "-macula_dist", "idle_timeout", "10000"].

start_node(Name, Ns, Addr, Carrier, #{root := Root} = Env) ->
    Paths = ["-pa", filename:join(Root, "_build/default/lib/macula_dist/ebin"),
             "-pa", filename:join(Root, "bench/ebin")],
    {ok, Peer, Node} = peer:start(#{name => Name, host => Addr, longnames => true,
                                    connection => standard_io,
                                    exec => {os:find_executable("ip"),
                                             ["netns", "exec", Ns, os:find_executable("erl")]},
                                    args => ["-setcookie", "macula_wan"] ++ Paths
                                        ++ carrier_args(Carrier, Env),
                                    wait_boot => 60000}),
    {Peer, Node}.

run_pair(Carrier, Rep, #{ns_a := NsA, ns_b := NsB, addr_a := AddrA, addr_b := AddrB} = Env) ->
    Suffix = "_" ++ atom_to_list(Carrier) ++ "_" ++ integer_to_list(Rep),
    {B, BN} = start_node(list_to_atom("wan_b" ++ Suffix), NsB, AddrB, Carrier, Env),
    {A, _} = start_node(list_to_atom("wan_a" ++ Suffix), NsA, AddrA, Carrier, Env),
    try
        pong = peer:call(A, net_adm, ping, [BN], 60000),
        lists:prefix("macula_direct", atom_to_list(Carrier)) andalso
            (peer:call(A, macula_bench, make_busy, [BN], 600000) =:= ok andalso wait_direct(A, BN, 100)),
        Call = fun(F) -> peer:call(A, ?MODULE, F, [BN], 900000) end,
        {P50, P99} = Call(idle_rtt),
        Small = Call(small),
        Bulk = Call(bulk),
        %% The QUIC path after the bulk transfer: what bounds it.
        lists:prefix("macula", atom_to_list(Carrier)) andalso
            io:format("  rep ~b ~-14s after bulk: ~p~n",
                      [Rep, Carrier, peer:call(A, net_kernel, getopts, [BN, [quic]])]),
        Setup = Call(setup),
        Loaded = Call(loaded_rtt),
        R = maps:merge(#{rtt_p50 => P50, rtt_p99 => P99, small => Small, bulk => Bulk,
                         setup => Setup}, Loaded),
        io:format("  rep ~b ~-14s ~p~n", [Rep, Carrier, R]),
        R
    after
        try peer:stop(A) catch _:_ -> ok end,
        try peer:stop(B) catch _:_ -> ok end
    end.

wait_direct(_A, BN, 0) -> error({no_direct_path, BN});
wait_direct(A, BN, N) ->
    Direct = [S || Client <- peer:call(A, macula_dist_cluster, status, []),
                   S <- maps:get(sessions, Client, []), maps:get(path, S) =/= relay],
    case Direct of
        [_ | _] -> true;
        [] -> timer:sleep(100), wait_direct(A, BN, N - 1)
    end.

%% ---- run on A (times in ms) ----

idle_rtt(B) ->
    {P50, P99} = macula_bench:rtt(B, 10, ?PINGS),
    {P50 / 1000, P99 / 1000}.

percentile([], _) -> infinity;
percentile(Sorted, P) ->
    lists:nth(max(1, round(length(Sorted) * P / 100)), Sorted).

%% One-way 100-byte messages per second; acked every 1000, at most 10 000
%% unacknowledged, for at most ?BULK_SECONDS.
small(B) ->
    Counter = spawn(B, ?MODULE, counter, [self(), 1000]),
    Deadline = erlang:monotonic_time(millisecond) + ?BULK_SECONDS * 1000,
    T0 = erlang:monotonic_time(microsecond),
    Acked = send_window(Counter, binary:copy(<<1>>, 100), 0, 0, ?SMALL_COUNT, 10000, Deadline),
    Us = erlang:monotonic_time(microsecond) - T0,
    exit(Counter, kill),
    Acked / (Us / 1.0e6).

%% 1 MiB messages for ?BULK_SECONDS (acked one by one, at most 8
%% unacknowledged): MB/s of what was acknowledged.
bulk(B) ->
    Counter = spawn(B, ?MODULE, counter, [self(), 1]),
    Deadline = erlang:monotonic_time(millisecond) + ?BULK_SECONDS * 1000,
    T0 = erlang:monotonic_time(microsecond),
    Acked = send_window(Counter, crypto:strong_rand_bytes(1 bsl 20), 0, 0, 1 bsl 30, 8, Deadline),
    Us = erlang:monotonic_time(microsecond) - T0,
    exit(Counter, kill),
    Acked * (1 bsl 20) / Us.

%% Sends until `N' are acked or the deadline passes; returns the acked count.
send_window(_Counter, _Msg, _Sent, Acked, N, _Window, _Deadline) when Acked >= N ->
    Acked;
send_window(Counter, Msg, Sent, Acked, N, Window, Deadline) ->
    Left = case Deadline of
               infinity -> infinity;
               _ -> Deadline - erlang:monotonic_time(millisecond)
           end,
    if
        Left =/= infinity, Left =< 0 ->
            Acked;
        Sent - Acked < Window ->
            Counter ! Msg,
            send_window(Counter, Msg, Sent + 1, Acked, N, Window, Deadline);
        true ->
            receive {ack, Count} -> send_window(Counter, Msg, Sent, Count, N, Window, Deadline)
            after Left -> Acked
            end
    end.

counter(From, AckEvery) -> counter(From, AckEvery, 0).

counter(From, AckEvery, Count) ->
    receive _ ->
            C = Count + 1,
            C rem AckEvery =:= 0 andalso (From ! {ack, C}),
            counter(From, AckEvery, C)
    end.

%% net_adm:ping on a fresh connection, median of ?SETUPS, in ms.
setup(B) ->
    macula_bench:setup(B, ?SETUPS).

%% Ping-pongs while another process streams 1 MiB messages to B (acked
%% every 8, at most 32 unacknowledged), for at most ?LOADED_SECONDS.
loaded_rtt(B) ->
    loaded_rtt(B, ?LOADED_PINGS, ?LOADED_SECONDS).

%% Pings ping-pongs (ms), for at most Seconds. Also counted: how often
%% the connection was busy (busy_dist_port: a sender suspended) and the
%% most bytes the carrier held unsent (macula's `send_pending').
loaded_rtt(B, Pings, Seconds) ->
    Self = self(),
    %% The echo is spawned before the load starts: under load a sender the
    %% VM suspended (busy_dist_port) can stay suspended for the whole run,
    %% and only the pings below are bounded by the deadline.
    Echo = spawn(B, macula_bench, echo, []),
    Streamer = spawn(fun() ->
                             Counter = spawn(B, ?MODULE, counter, [self(), 8]),
                             Self ! streaming,
                             send_window(Counter, crypto:strong_rand_bytes(1 bsl 20), 0, 0,
                                         1 bsl 30, 32, infinity)
                     end),
    receive streaming -> ok end,
    timer:sleep(1000),
    Watcher = spawn(fun() -> watch_busy(B, 0, 0) end),
    Deadline = erlang:monotonic_time(millisecond) + Seconds * 1000,
    %% The pinger runs apart: a sender the VM suspended (busy_dist_port)
    %% does not see its own deadline.
    Pinger = spawn(fun() -> loaded_pings(Self, Echo, binary:copy(<<7>>, 64), Pings) end),
    Times = collect_pings(Pings, Deadline, []),
    Watcher ! {done, self()},
    {Busy, Pending} = receive {busy, Bu, Pe} -> {Bu, Pe} after 5000 -> {-1, -1} end,
    %% Local exits only: an exit signal to B could itself wait behind the
    %% busy connection. B's processes go with B.
    exit(Pinger, kill),
    exit(Streamer, kill),
    Sorted = lists:sort(Times),
    #{loaded_p50 => percentile(Sorted, 50), loaded_p99 => percentile(Sorted, 99),
      loaded_max => case Sorted of [] -> infinity; _ -> lists:last(Sorted) end,
      loaded_done => length(Sorted), loaded_busy => Busy, loaded_pending_mib => Pending / 1048576}.

loaded_pings(_Parent, _Echo, _Msg, 0) ->
    ok;
loaded_pings(Parent, Echo, Msg, N) ->
    T0 = erlang:monotonic_time(microsecond),
    Echo ! {self(), Msg},
    receive {Echo, _} -> Parent ! {pinged, (erlang:monotonic_time(microsecond) - T0) / 1000} end,
    loaded_pings(Parent, Echo, Msg, N - 1).

collect_pings(0, _Deadline, Acc) ->
    Acc;
collect_pings(N, Deadline, Acc) ->
    receive {pinged, T} -> collect_pings(N - 1, Deadline, [T | Acc])
    after max(0, Deadline - erlang:monotonic_time(millisecond)) -> Acc
    end.

watch_busy(B, Busy, Pending) ->
    erlang:system_monitor(self(), [busy_dist_port]),
    watch_busy_loop(B, Busy, Pending).

watch_busy_loop(B, Busy, Pending) ->
    receive
        {monitor, _, busy_dist_port, _} -> watch_busy_loop(B, Busy + 1, Pending);
        {done, From} -> From ! {busy, Busy, Pending}
    after 50 ->
            P = case net_kernel:getopts(B, [send_pending]) of
                    {ok, [{send_pending, N}]} -> N;
                    _ -> 0
                end,
            watch_busy_loop(B, Busy, max(P, Pending))
    end.

%% ---- report ----

report(Profile, Carriers, Runs) ->
    Metrics = [{rtt_p50, "rtt p50 (ms)"}, {rtt_p99, "rtt p99 (ms)"},
               {small, "small (msgs/s)"}, {bulk, "bulk (MB/s)"}, {setup, "setup (ms)"},
               {loaded_p50, "loaded rtt p50 (ms)"}, {loaded_p99, "loaded rtt p99 (ms)"},
               {loaded_max, "loaded rtt max (ms)"}, {loaded_done, "loaded pings done"},
               {loaded_busy, "busy_dist_port (loaded)"},
               {loaded_pending_mib, "max unsent (MiB, loaded)"}],
    Of = fun(C, Key) -> [maps:get(Key, R) || {C1, R} <- Runs, C1 =:= C] end,
    Med = fun(L) -> lists:nth((length(L) + 1) div 2, lists:sort(L)) end,
    Row = "~-22s" ++ lists:append(lists:duplicate(length(Carriers), " ~-14s")) ++ "~n",
    io:format("~n~p (medians of ~b)~n" ++ Row,
              [Profile, length(Of(hd(Carriers), rtt_p50)), "metric"
               | [atom_to_list(C) || C <- Carriers]]),
    [io:format(Row, [Label | [case Of(C, Key) of
                                  [] -> "-";
                                  L -> fmt(Med(L))
                              end || C <- Carriers]])
     || {Key, Label} <- Metrics],
    ok.

fmt(infinity) -> "starved";
fmt(X) when is_integer(X) -> integer_to_list(X);
fmt(X) when X >= 1000 -> integer_to_list(round(X));
fmt(X) when X >= 10 -> float_to_list(X * 1.0, [{decimals, 1}]);
fmt(X) -> float_to_list(X * 1.0, [{decimals, 2}]).
