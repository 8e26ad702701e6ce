%% Benchmarks of -proto_dist macula against inet_tcp_dist and inet_tls_dist.
%%
%% Run with bench/run.sh. The controller (this VM, not distributed) starts a
%% pair of nodes per carrier with `peer', node A pinned to CPU 0 and node B
%% to CPU 1, and runs each metric on A against B. Carriers are interleaved in
%% each repetition; the table gives medians and min-max over repetitions.
-module(macula_bench).

-export([main/1]).
%% Shared with macula_wan.
-export([tls_optfile/1, rtt/3, setup/2, make_busy/1]).
%% Run on node A (and macula_wan:loaded_rtt/3: latency under load).
-export([rtt/1, small/1, bulk/1, setup/1, mem_start/1, mem_status/0, mem_finish/0]).
%% Run on node B.
-export([echo/0, counter/3, checker/1]).

-define(CARRIERS, carriers()).
-define(SMALL_COUNT, 500000).
-define(BULK_COUNT, 400).

%% MACULA_BENCH_CARRIERS=macula_e2e,inet_tls picks some; all by default.
%% macula_direct: an end-to-end session upgraded to a direct path (the
%% default on a network where the nodes reach each other, as here);
%% macula_e2e: end-to-end sessions kept on the relay (`direct false');
%% macula_stream: version 1 stream tunnels.
-define(ALL_CARRIERS, [macula_direct, macula_e2e, macula_stream, inet_tcp, inet_tls]).

carriers() ->
    case os:getenv("MACULA_BENCH_CARRIERS") of
        false -> ?ALL_CARRIERS;
        List -> [list_to_atom(C) || C <- string:lexemes(List, ",")]
    end.

%% ---- controller ----

main(Reps) when is_integer(Reps), Reps > 0 ->
    Root = root(),
    Tmp = string:trim(os:cmd("mktemp -d")),
    {Relay, RelayPid, Url, Pin} = start_relay(Root),
    TlsOpts = tls_optfile(Tmp),
    io:format("macula_bench: ~b repetitions, carriers ~p, relay ~s (pid ~s)~n",
              [Reps, ?CARRIERS, Url, RelayPid]),
    Env = #{root => Root, url => Url, pin => Pin, tls => TlsOpts, relay_pid => RelayPid},
    try [{Carrier, run_pair(Carrier, Rep, Env)} || Rep <- lists:seq(1, Reps), Carrier <- ?CARRIERS] of
        Runs -> report(Runs)
    after
        port_close(Relay),
        os:cmd("kill " ++ RelayPid ++ "; rm -rf " ++ Tmp)
    end,
    halt(0).

%% bench/ebin/macula_bench.beam -> the repository.
root() ->
    Beam = filename:absname(code:which(?MODULE)),
    filename:dirname(filename:dirname(filename:dirname(Beam))).

start_relay(Root) ->
    Exe = filename:join(Root, "target/release/macula-dist-relay"),
    Port = open_port({spawn, Exe ++ " --listen 127.0.0.1:0 --allow-anonymous --ephemeral 2>/dev/null"},
                     [{line, 256}, binary, use_stdio]),
    Pin = receive {Port, {data, {eol, Line}}} -> binary_to_list(Line) after 10000 -> error(relay) end,
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    %% The relay prints only its fingerprint; its address is in /proc.
    UdpPort = relay_port(OsPid),
    {Port, integer_to_list(OsPid), "quic://127.0.0.1:" ++ integer_to_list(UdpPort), Pin}.

relay_port(OsPid) ->
    Out = os:cmd("ss -Hunlp | grep 'pid=" ++ integer_to_list(OsPid) ++ ",'"),
    [_, _, _, Local | _] = string:lexemes(Out, " \n"),
    list_to_integer(lists:last(string:lexemes(Local, ":"))).

tls_optfile(Tmp) ->
    #{cert := Cert, key := Key} = public_key:pkix_test_root_cert("macula bench", []),
    CertFile = filename:join(Tmp, "cert.pem"),
    KeyFile = filename:join(Tmp, "key.pem"),
    ok = file:write_file(CertFile, public_key:pem_encode([{'Certificate', Cert, not_encrypted}])),
    ok = file:write_file(KeyFile, public_key:pem_encode([public_key:pem_entry_encode(element(1, Key), Key)])),
    OptFile = filename:join(Tmp, "ssl_dist.conf"),
    ok = file:write_file(OptFile, io_lib:format("~p.~n",
        [[{server, [{certfile, CertFile}, {keyfile, KeyFile}, {verify, verify_none}]},
          {client, [{verify, verify_none}]}]])),
    OptFile.

carrier_args(macula_direct, Env) ->
    macula_args(Env) ++ ["-macula_dist", "tunnel", "e2e", "-macula_dist", "direct", "true"];
carrier_args(macula_e2e, Env) ->
    macula_args(Env) ++ ["-macula_dist", "tunnel", "e2e", "-macula_dist", "direct", "false"];
carrier_args(macula_stream, Env) ->
    macula_args(Env) ++ ["-macula_dist", "tunnel", "stream"];
carrier_args(macula_direct_cubic_bounded, Env) ->
    carrier_args(macula_direct, Env) ++ ["-macula_dist", "congestion", "cubic_bounded"];
carrier_args(macula_e2e_bbr_bounded, Env) ->
    carrier_args(macula_e2e, Env) ++ ["-macula_dist", "congestion", "bbr_bounded"];
carrier_args(macula_direct_bbr_bounded, Env) ->
    carrier_args(macula_direct, Env) ++ ["-macula_dist", "congestion", "bbr_bounded"];
carrier_args(inet_tcp, _) ->
    [];
carrier_args(inet_tls, #{tls := OptFile}) ->
    ["-proto_dist", "inet_tls", "-ssl_dist_optfile", OptFile].

%% The relay connection's idle timeout is raised from 2 s to 10 s here: the
%% memory test stops B for 5 s to measure back-pressure, and with the
%% default B would be declared dead (and the connection lost) after 2 s.
macula_args(#{url := Url, pin := Pin}) ->
    ["-proto_dist", "macula", "-no_epmd", "-macula_dist", "relay", quoted(Url),
     "-macula_dist", "pin_sha256", quoted(Pin), "-macula_dist", "idle_timeout", "10000"].

%% -macula_dist values are Erlang terms (as for -App Key Value): strings quoted.
quoted(S) -> "\"" ++ S ++ "\"".

start_node(Name, Cpu, Carrier, Env) ->
    #{root := Root} = Env,
    Paths = ["-pa", filename:join(Root, "_build/default/lib/macula_dist/ebin"),
             "-pa", filename:join(Root, "bench/ebin")],
    Erl = os:find_executable("erl"),
    {ok, Peer, Node} = peer:start(#{name => Name, connection => standard_io,
                                    exec => {os:find_executable("taskset"), ["-c", integer_to_list(Cpu), Erl]},
                                    args => ["-setcookie", "macula_bench", "+sbwt", "none"]
                                        ++ Paths ++ carrier_args(Carrier, Env),
                                    wait_boot => 30000}),
    {Peer, Node}.

run_pair(Carrier, Rep, Env) ->
    Suffix = "_" ++ atom_to_list(Carrier) ++ "_" ++ integer_to_list(Rep),
    {A, _} = start_node(list_to_atom("bench_a" ++ Suffix), 0, Carrier, Env),
    {B, BN} = start_node(list_to_atom("bench_b" ++ Suffix), 1, Carrier, Env),
    try
        pong = peer:call(A, net_adm, ping, [BN]),
        Call = fun(F) -> peer:call(A, ?MODULE, F, [BN], 600000) end,
        lists:prefix("macula_direct", atom_to_list(Carrier)) andalso
            (Call(make_busy) =:= ok andalso wait_direct(A, BN, 100)),
        {P50, P99} = Call(rtt),
        Small = Call(small),
        Cpu0 = cpu_seconds(maps:get(relay_pid, Env)),
        Bulk = Call(bulk),
        RelayCpu = (cpu_seconds(maps:get(relay_pid, Env)) - Cpu0) / (?BULK_COUNT * 1048576 / 1.0e9),
        Setup = Call(setup),
        Loaded = peer:call(A, macula_wan, loaded_rtt, [BN, 200, 60], 600000),
        Mem = memory(A, B, BN, Env#{carrier => Carrier}),
        R = #{rtt_p50 => P50, rtt_p99 => P99, small => Small, bulk => Bulk, setup => Setup,
              relay_cpu => RelayCpu},
        Result = maps:merge(maps:merge(R, Loaded), Mem),
        io:format("  rep ~b ~-8s ~p~n", [Rep, Carrier, Result]),
        Result
    after
        try peer:stop(A) catch _:_ -> ok end,
        try peer:stop(B) catch _:_ -> ok end
    end.

%% B is stopped (SIGSTOP) while A keeps sending 1 MiB messages for 5 s.
memory(A, B, BN, #{carrier := Carrier, relay_pid := RelayPid}) ->
    APid = peer:call(A, os, getpid, []),
    BPid = peer:call(B, os, getpid, []),
    ok = peer:call(A, ?MODULE, mem_start, [BN]),
    RssA0 = rss(APid),
    RssR0 = rss(RelayPid),
    os:cmd("kill -STOP " ++ BPid),
    Samples = [begin timer:sleep(100), {rss(APid), rss(RelayPid)} end || _ <- lists:seq(1, 50)],
    Status = peer:call(A, ?MODULE, mem_status, []),
    os:cmd("kill -CONT " ++ BPid),
    Done = peer:call(A, ?MODULE, mem_finish, [], 120000),
    PeakA = lists:max([X || {X, _} <- Samples]) - RssA0,
    PeakR = case is_macula(Carrier) of
                true -> lists:max([Y || {_, Y} <- Samples]) - RssR0;
                false -> 0
            end,
    #{mem_a_mib => PeakA / 1024, mem_relay_mib => PeakR / 1024,
      mem_peak_rss_mib => {lists:max([X || {X, _} <- Samples]) div 1024,
                           lists:max([Y || {_, Y} <- Samples]) div 1024},
      mem_busy_dist_port => maps:get(busy_events, Status),
      mem_suspended => maps:get(suspended, Status),
      mem_sent_while_stopped => maps:get(sent, Status),
      mem_intact => Done}.

rss(OsPid) ->
    {ok, Bin} = file:read_file("/proc/" ++ OsPid ++ "/status"),
    [Line] = [L || L <- binary:split(Bin, <<"\n">>, [global]), binary:match(L, <<"VmRSS">>) =/= nomatch],
    [_, Kb | _] = string:lexemes(binary_to_list(Line), " \t"),
    list_to_integer(Kb).

%% ---- run on A ----

rtt(B) ->
    rtt(B, 2000, 20000).

%% Round trips of a 64-byte message to an echo process on B, after
%% Warmup of them: {P50, P99} in microseconds.
rtt(B, Warmup, Count) ->
    Echo = spawn(B, ?MODULE, echo, []),
    Msg = binary:copy(<<7>>, 64),
    _ = [ping(Echo, Msg) || _ <- lists:seq(1, Warmup)],
    Times = lists:sort([ping(Echo, Msg) || _ <- lists:seq(1, Count)]),
    exit(Echo, kill),
    {percentile(Times, 50), percentile(Times, 99)}.

ping(Echo, Msg) ->
    T0 = erlang:monotonic_time(nanosecond),
    Echo ! {self(), Msg},
    receive {Echo, _} -> ok end,
    (erlang:monotonic_time(nanosecond) - T0) / 1000.

percentile(Sorted, P) ->
    lists:nth(max(1, round(length(Sorted) * P / 100)), Sorted).

echo() ->
    receive {From, Msg} -> From ! {self(), Msg}, echo() end.


%% One-way 100-byte messages; the receiver acks every 1000, the sender keeps
%% at most 10 000 unacknowledged.
small(B) ->
    stream(B, binary:copy(<<1>>, 100), ?SMALL_COUNT, 1000, 10000).

%% One-way 1 MiB binaries; acked one by one, at most 8 unacknowledged.
bulk(B) ->
    N = ?BULK_COUNT,
    MsgsPerSecond = stream(B, crypto:strong_rand_bytes(1 bsl 20), N, 1, 8),
    MsgsPerSecond * (1 bsl 20) / 1.0e6.

stream(B, Msg, N, AckEvery, Window) ->
    Counter = spawn(B, ?MODULE, counter, [self(), N, AckEvery]),
    T0 = erlang:monotonic_time(microsecond),
    send_window(Counter, Msg, 0, 0, N, Window),
    Us = erlang:monotonic_time(microsecond) - T0,
    N / (Us / 1.0e6).

send_window(_Counter, _Msg, _Sent, Acked, N, _Window) when Acked >= N ->
    ok;
send_window(Counter, Msg, Sent, Acked, N, Window) when Sent < N, Sent - Acked < Window ->
    Counter ! Msg,
    send_window(Counter, Msg, Sent + 1, Acked, N, Window);
send_window(Counter, Msg, Sent, _Acked, N, Window) ->
    receive {ack, Count} -> send_window(Counter, Msg, Sent, Count, N, Window) end.

counter(From, N, AckEvery) -> counter(From, N, AckEvery, 0).

counter(_From, N, _AckEvery, N) -> ok;
counter(From, N, AckEvery, Count) ->
    receive _ ->
            C = Count + 1,
            (C rem AckEvery =:= 0 orelse C =:= N) andalso (From ! {ack, C}),
            counter(From, N, AckEvery, C)
    end.

%% Time of net_adm:ping on a fresh connection, median of 20, in ms.
setup(B) ->
    setup(B, 20).

setup(B, Count) ->
    Times = [begin
                 erlang:disconnect_node(B),
                 wait_gone(B),
                 T0 = erlang:monotonic_time(microsecond),
                 pong = net_adm:ping(B),
                 (erlang:monotonic_time(microsecond) - T0) / 1000
             end || _ <- lists:seq(1, Count)],
    percentile(lists:sort(Times), 50).

wait_gone(B) ->
    case lists:member(B, nodes()) of
        true -> timer:sleep(5), wait_gone(B);
        false -> timer:sleep(20)
    end.

%% Memory: a sender that sends numbered 1 MiB messages to a checker on B.
mem_start(B) ->
    Checker = spawn(B, ?MODULE, checker, [self()]),
    Monitor = spawn(fun() -> busy_monitor(0) end),
    erlang:system_monitor(Monitor, [busy_dist_port]),
    Payload = crypto:strong_rand_bytes(1 bsl 20),
    Sender = spawn(fun() -> mem_sender(Checker, Payload, 0) end),
    persistent_term:put(macula_bench_mem, {Sender, Checker, Monitor}),
    ok.

mem_sender(Checker, Payload, Seq) ->
    receive
        {stop, From} -> Checker ! {done, Seq, From}
    after 0 ->
            Checker ! {Seq, erlang:crc32(Payload), Payload},
            put(sent, Seq + 1),
            mem_sender(Checker, Payload, Seq + 1)
    end.

busy_monitor(N) ->
    receive
        {monitor, _Pid, busy_dist_port, _Port} -> busy_monitor(N + 1);
        {count, From} -> From ! {busy, N}, busy_monitor(N)
    end.

mem_status() ->
    {Sender, _, Monitor} = persistent_term:get(macula_bench_mem),
    Monitor ! {count, self()},
    Busy = receive {busy, N} -> N after 5000 -> unknown end,
    {status, Status} = process_info(Sender, status),
    {dictionary, Dict} = process_info(Sender, dictionary),
    #{busy_events => Busy, suspended => Status =:= suspended,
      sent => proplists:get_value(sent, Dict, 0)}.

%% {intact, N}, or why not: a connection that went down while B was
%% stopped (it looked dead) is `connection_lost'.
mem_finish() ->
    {Sender, Checker, _} = persistent_term:get(macula_bench_mem),
    erlang:system_monitor(undefined),
    Ref = erlang:monitor(process, Checker),
    Sender ! {stop, self()},
    receive
        {checked, Result} -> Result;
        {'DOWN', Ref, process, _, noconnection} -> connection_lost
    after 110000 -> timeout
    end.

%% ---- run on B ----

checker(_Starter) -> checker(0, ok).

%% Checks each message's number and checksum; answers {done, ...} with the
%% count, or with the first problem seen.
checker(Next, Problem) ->
    receive
        {done, Sent, Reply} when Problem =:= ok, Sent =:= Next ->
            Reply ! {checked, {intact, Next}};
        {done, Sent, Reply} ->
            Reply ! {checked, {Problem, Next, Sent}};
        {Seq, Crc, Payload} when Problem =:= ok, Seq =:= Next ->
            case erlang:crc32(Payload) of
                Crc -> checker(Next + 1, ok);
                _ -> checker(Next, {corrupt, Seq})
            end;
        {Seq, _, _} when Problem =:= ok ->
            checker(Next, {out_of_order, Next, Seq});
        _ ->
            checker(Next, Problem)
    end.

is_macula(Carrier) -> lists:prefix("macula", atom_to_list(Carrier)).

%% Sends 256 KiB to BN: a session that carried that much through its relay
%% looks for a direct path (a quiet one stays on the relay).
make_busy(BN) ->
    Bin = crypto:strong_rand_bytes(256 * 1024),
    Size = byte_size(Bin),
    Size = erpc:call(BN, erlang, byte_size, [Bin]),
    ok.

%% Waits (100 ms steps) until A's session with BN is on a direct path.
wait_direct(_A, BN, 0) -> error({no_direct_path, BN});
wait_direct(A, BN, N) ->
    Name = atom_to_binary(BN, utf8),
    Paths = [P || #{sessions := Ss} <- peer:call(A, macula_dist_cluster, status, []),
                  #{peer := Peer, path := P} <- Ss, Peer =:= Name],
    case Paths of
        [{direct, _}] -> true;
        _ -> timer:sleep(100), wait_direct(A, BN, N - 1)
    end.

%% CPU time (user + system) of an OS process so far, from /proc.
cpu_seconds(OsPid) ->
    {ok, Stat} = file:read_file("/proc/" ++ OsPid ++ "/stat"),
    %% Fields after the command name (which may hold spaces).
    [_, After] = binary:split(Stat, <<") ">>),
    Fields = binary:split(After, <<" ">>, [global]),
    Ticks = binary_to_integer(lists:nth(12, Fields)) + binary_to_integer(lists:nth(13, Fields)),
    Ticks / 100.

%% ---- report ----

report(Runs) ->
    Metrics = [{rtt_p50, "rtt p50 (us)", low}, {rtt_p99, "rtt p99 (us)", low},
               {small, "small (msgs/s)", high}, {bulk, "bulk (MB/s)", high},
               {setup, "setup (ms)", low}, {mem_a_mib, "memory A (MiB)", low},
               {mem_relay_mib, "memory relay (MiB)", low},
               {relay_cpu, "relay CPU (s/GB)", low},
               {loaded_p50, "loaded rtt p50 (ms)", low}, {loaded_p99, "loaded rtt p99 (ms)", low},
               {loaded_max, "loaded rtt max (ms)", low}, {loaded_done, "loaded pings done", high}],
    Of = fun(Carrier, Key) -> [maps:get(Key, R) || {C, R} <- Runs, C =:= Carrier] end,
    Med = fun(L) -> lists:nth((length(L) + 1) div 2, lists:sort(L)) end,
    Row = "~-20s" ++ lists:append(lists:duplicate(length(?ALL_CARRIERS), " ~-24s"))
        ++ " ~11s ~11s ~9s ~9s ~9s~n",
    io:format("~n" ++ Row, ["metric" | [atom_to_list(C) || C <- ?ALL_CARRIERS]]
              ++ ["direct/tcp", "direct/tls", "e2e/tcp", "e2e/tls", "strm/tls"]),
    lists:foreach(
      fun({Key, Label, _}) ->
              Cells = [case Of(C, Key) of
                           [] -> "-";
                           L -> lists:flatten(io_lib:format("~s [~s-~s]", [fmt(Med(L)), fmt(lists:min(L)), fmt(lists:max(L))]))
                       end || C <- ?ALL_CARRIERS],
              [D, E, St, T, S] = [case Of(C, Key) of [] -> 0; L -> Med(L) end || C <- ?ALL_CARRIERS],
              io:format(Row, [Label | Cells] ++ [ratio(D, T), ratio(D, S), ratio(E, T),
                                                 ratio(E, S), ratio(St, S)])
      end, Metrics),
    io:format("~nmemory test (B stopped, A sending 1 MiB messages for 5 s), per repetition:~n"),
    [io:format("  ~-8s busy_dist_port events ~p, sender suspended ~p, sent while stopped ~p, "
               "peak RSS {A, relay} ~p MiB, after SIGCONT ~p~n",
               [C, maps:get(mem_busy_dist_port, R), maps:get(mem_suspended, R),
                maps:get(mem_sent_while_stopped, R), maps:get(mem_peak_rss_mib, R),
                maps:get(mem_intact, R)])
     || {C, R} <- Runs].

fmt(infinity) -> "starved";
fmt(X) when is_integer(X) -> integer_to_list(X);
fmt(X) when X >= 1000 -> integer_to_list(round(X));
fmt(X) -> float_to_list(X * 1.0, [{decimals, 1}]).

ratio(X, Y) when not is_number(X); not is_number(Y) -> "-";
ratio(_, 0) -> "-";
ratio(_, Y) when Y == 0 -> "-";
ratio(X, Y) -> float_to_list(X / Y, [{decimals, 2}]).
