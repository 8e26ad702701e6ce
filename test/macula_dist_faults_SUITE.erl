%% Fault injection on loopback: real relay processes (the release binary)
%% that are stopped, killed and restarted under real nodes, and a lossy,
%% slow, reordering link made with the project's impairment proxy
%% (macula-impair; this kernel has no netem). Traffic on a live connection
%% is numbered and checksummed (macula_ct:checked_send/4): nothing may be
%% lost, duplicated, reordered or altered.
%%
%% E2e sessions outlive their relay connection: when the relay stops
%% answering or restarts, the nodes connect again and claim their sessions
%% back, and the connections between them carry on. Nodes on several
%% relays move a session to another relay when its own dies.
-module(macula_dist_faults_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2,
         end_per_testcase/2]).
-export([lossy_link_delivers_everything/1, relay_killed_and_restarted/1, relay_stopped_5s/1,
         stopped_receiver_bounds_memory/1, sigterm_with_relay_stopped/1,
         one_of_two_relays_killed/1, no_relay_in_common/1, replaced_node_stays_down/1,
         long_path_setup_fits_setuptime/1]).

suite() -> [{timetrap, {minutes, 4}}].

all() ->
    [lossy_link_delivers_everything, relay_killed_and_restarted, relay_stopped_5s,
     stopped_receiver_bounds_memory, sigterm_with_relay_stopped, one_of_two_relays_killed,
     no_relay_in_common, replaced_node_stays_down, long_path_setup_fits_setuptime].

end_per_suite(_Config) ->
    ok.

init_per_suite(Config) ->
    Dir = macula_ct:release_dir(["macula_dist_relay", "macula_impair"]),
    Bin = fun(Name) -> filename:join(Dir, Name) end,
    [{relay_bin, Bin("macula-dist-relay")}, {impair_bin, Bin("macula-impair")} | Config].

init_per_testcase(_Case, Config) ->
    ok = macula_ct:case_started(),
    Config.

end_per_testcase(_Case, _Config) ->
    ok = macula_ct:case_ended(),
    ok.

%% ---- helpers ----

free_udp_port() -> macula_ct:free_udp_port().

start_relay(Config, Dir, Port) -> macula_ct:relay_process(?config(relay_bin, Config), Dir, Port).

%% macula-impair between nodes and the relay at Upstream; its listen port.
start_impair(Config, Upstream, Args) ->
    Log = filename:join(?config(priv_dir, Config), "impair.log"),
    Port = free_udp_port(),
    Cmd = lists:flatten(io_lib:format("exec '~ts' --listen 127.0.0.1:~b --upstream 127.0.0.1:~b ~ts",
                                      [?config(impair_bin, Config), Port, Upstream, Args])),
    _ = macula_ct:spawn_os(Cmd, Log),
    timer:sleep(300),
    Port.

%% Sessions stay on their relays here (`direct false`): on loopback they
%% would go direct, around the relays and the proxy these cases test.
peer(Name, Relay, Extra) ->
    {Peer, Node} = macula_ct:start_peer(Name, Relay, ["-macula_dist", "direct", "false" | Extra]),
    put(peers, [Peer | get(peers)]),
    {Peer, Node}.

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 120000).

%% Two peers on Relay (A's through RelayForA), connected to each other.
connected_pair(Relay, RelayForA, [NameA, NameB], Extra) ->
    {A, AN} = peer(NameA, RelayForA, Extra),
    {B, BN} = peer(NameB, Relay, Extra),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    {{A, AN}, {B, BN}}.

%% Calls Fun every SleepMs until it returns true, at most Tries times.
retry(_Fun, 0, _SleepMs) -> false;
retry(Fun, Tries, SleepMs) ->
    Fun() orelse begin timer:sleep(SleepMs), retry(Fun, Tries - 1, SleepMs) end.

os_pid(Peer) -> call(Peer, os, getpid, []).

rss_kib(OsPid) ->
    {ok, Bin} = file:read_file("/proc/" ++ OsPid ++ "/status"),
    [Line] = [L || L <- binary:split(Bin, <<"\n">>, [global]), binary:match(L, <<"VmRSS">>) =/= nomatch],
    [_, Kb | _] = string:lexemes(binary_to_list(Line), " \t"),
    list_to_integer(Kb).

alive(OsPid) -> os:cmd("kill -0 " ++ OsPid ++ " 2>/dev/null && echo yes") =:= "yes\n".

%% Checked traffic both ways between two peers: Count messages of Size.
checked_both_ways(A, AN, B, BN, Count, Size) ->
    checked_both_ways(A, AN, B, BN, Count, Size, 0).

checked_both_ways(A, AN, B, BN, Count, Size, PauseMs) ->
    macula_ct:checked_both_ways(A, AN, B, BN, Count, Size, PauseMs).

%% ---- cases ----

%% One node reaches the relay over a link with 50 ms delay each way, 2 %
%% loss and 2 % reordering. Checked traffic both ways arrives whole, with
%% either congestion controller; the throughput of each against the same
%% transfer with the proxy lossless is logged.
lossy_link_delivers_everything(Config) ->
    Dir = ?config(priv_dir, Config),
    RelayPort = free_udp_port(),
    Relay = start_relay(Config, filename:join(Dir, "relay"), RelayPort),
    Run = fun([NA, NB], ImpairArgs, Congestion, Count) ->
                  ProxyPort = start_impair(Config, RelayPort, ImpairArgs),
                  Proxied = Relay#{url := iolist_to_binary(io_lib:format("quic://127.0.0.1:~b", [ProxyPort]))},
                  Flags = ["-macula_dist", "congestion", Congestion],
                  {{A, AN}, {B, BN}} = connected_pair(Relay, Proxied, [NA, NB], Flags),
                  ok = call(A, macula_ct, watch, [BN, macula_lossy_watch]),
                  Results = checked_both_ways(A, AN, B, BN, Count, 64 * 1024),
                  ?assertEqual(timeout, call(A, macula_ct, watch_result, [{macula_lossy_watch, 100}])),
                  [?assertMatch({ok, Count, _, _}, R) || R <- Results],
                  [{ok, _, Bytes, Us} | _] = Results,
                  Bytes / Us
          end,
    Lossy = "--delay-ms 50 --loss 0.02 --reorder 0.02",
    Clean = Run([pa1, pb1], "", "cubic", 200),
    Bbr = Run([pc1, pd1], Lossy, "bbr", 200),
    %% Loss-based cubic is slow on this link: a smaller transfer.
    Cubic = Run([pe1, pf1], Lossy, "cubic", 16),
    ct:pal("checked transfer both ways through the proxy: ~.1f MB/s lossless (12.5 MiB); "
           "with 50 ms each way, 2 % loss, 2 % reordering: bbr ~.2f MB/s (12.5 MiB, ~.3f of "
           "lossless), cubic ~.2f MB/s (1 MiB, ~.4f of lossless)",
           [Clean, Bbr, Bbr / Clean, Cubic, Cubic / Clean]).

%% The only relay is killed (kill -9) and comes back on its port with its
%% persisted identity: the nodes connect again by themselves and claim
%% their session back (the restarted relay knew nothing of it), so the
%% connection between them never goes down; the time from the restart to a
%% working ping is logged.
relay_killed_and_restarted(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "relay_restart"),
    Port = free_udp_port(),
    #{os_pid := Pid} = Relay = start_relay(Config, Dir, Port),
    {{A, _}, {B, BN}} = connected_pair(Relay, Relay, [pa2, pb2], []),
    ok = call(A, macula_ct, watch, [BN, macula_restart_watch]),
    os:cmd("kill -9 " ++ Pid),
    timer:sleep(1000),
    #{fingerprint := Fp} = start_relay(Config, Dir, Port),
    ?assertEqual(maps:get(fingerprint, Relay), Fp),
    T0 = erlang:monotonic_time(millisecond),
    ?assert(retry(fun() -> call(A, net_adm, ping, [BN]) =:= pong end, 150, 200)),
    ct:pal("relay killed and restarted: first working ping ~b ms after the restart",
           [erlang:monotonic_time(millisecond) - T0]),
    ?assertEqual(BN, call(A, erpc, call, [BN, erlang, node, []])),
    ?assertEqual(timeout, call(A, macula_ct, watch_result, [{macula_restart_watch, 100}])),
    _ = B.

%% The relay is stopped (SIGSTOP) for 5 s in the middle of checked traffic
%% both ways: the nodes' relay connections time out, they connect again
%% when it answers and claim their session back. No nodedown; everything
%% arrives once, in order, intact.
relay_stopped_5s(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "relay_stop"),
    #{os_pid := RelayPid} = Relay = start_relay(Config, Dir, free_udp_port()),
    {{A, AN}, {B, BN}} = connected_pair(Relay, Relay, [pa5, pb5], []),
    ok = call(A, macula_ct, watch, [BN, macula_stop_watch]),
    Self = self(),
    %% About 10 s of traffic: 500 messages of 16 KiB each way, 20 ms apart.
    Traffic = spawn_link(fun() -> Self ! {traffic, checked_both_ways(A, AN, B, BN, 500, 16 * 1024, 20)} end),
    timer:sleep(1000),
    os:cmd("kill -STOP " ++ RelayPid),
    timer:sleep(5000),
    os:cmd("kill -CONT " ++ RelayPid),
    T0 = erlang:monotonic_time(millisecond),
    Results = receive {traffic, R} -> R after 60000 -> error({no_traffic_result, Traffic}) end,
    ct:pal("relay stopped 5 s: checked traffic done ~b ms after SIGCONT: ~p",
           [erlang:monotonic_time(millisecond) - T0, Results]),
    [?assertMatch({ok, 500, _, _}, R) || R <- Results],
    ?assertEqual(timeout, call(A, macula_ct, watch_result, [{macula_stop_watch, 100}])),
    ?assertEqual([BN], call(A, erlang, nodes, [])),
    ?assertEqual(AN, call(B, erpc, call, [AN, erlang, node, []])).

%% The receiver is stopped (SIGSTOP) for 20 s while the sender keeps
%% sending 1 MiB messages: the sender's and the relay's memory stay
%% bounded (dist back-pressure, and a relay that queues nothing).
stopped_receiver_bounds_memory(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "relay_mem"),
    #{os_pid := RelayPid} = Relay = start_relay(Config, Dir, free_udp_port()),
    {{A, _}, {B, BN}} = connected_pair(Relay, Relay, [pa3, pb3], []),
    APid = os_pid(A),
    BPid = os_pid(B),
    ok = call(B, macula_ct, checked_receiver, [macula_chk, 1000000]),
    Sender = spawn(fun() -> call(A, macula_ct, checked_send, [BN, macula_chk, 1000000, 1 bsl 20]) end),
    timer:sleep(500),
    Before = {rss_kib(APid), rss_kib(RelayPid)},
    os:cmd("kill -STOP " ++ BPid),
    Samples = [begin timer:sleep(500), {rss_kib(APid), rss_kib(RelayPid)} end || _ <- lists:seq(1, 40)],
    os:cmd("kill -CONT " ++ BPid),
    exit(Sender, kill),
    {GrowA, GrowR} = {(lists:max([X || {X, _} <- Samples]) - element(1, Before)) div 1024,
                      (lists:max([Y || {_, Y} <- Samples]) - element(2, Before)) div 1024},
    ct:pal("receiver stopped 20 s: RSS growth sender ~b MiB, relay ~b MiB", [GrowA, GrowR]),
    ?assert(GrowA < 64),
    ?assert(GrowR < 64),
    ?assert(alive(APid) andalso alive(RelayPid)).

%% A node whose relay is stopped (SIGSTOP: no answer at all) exits soon
%% after SIGTERM: its relay client, trying to connect again, does not hold
%% up the shutdown.
sigterm_with_relay_stopped(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "relay_term"),
    #{os_pid := RelayPid} = Relay = start_relay(Config, Dir, free_udp_port()),
    {A, _} = peer(pa4, Relay, []),
    APid = os_pid(A),
    os:cmd("kill -STOP " ++ RelayPid),
    %% Past the relay connection's idle timeout: the node is reconnecting.
    timer:sleep(6000),
    T0 = erlang:monotonic_time(millisecond),
    os:cmd("kill -TERM " ++ APid),
    Gone = retry(fun() -> not alive(APid) end, 200, 50),
    Ms = erlang:monotonic_time(millisecond) - T0,
    os:cmd("kill -CONT " ++ RelayPid),
    ct:pal("SIGTERM with the relay stopped: the node exited after ~b ms", [Ms]),
    ?assert(Gone),
    ?assert(Ms =< 2000).

%% A node stopped (SIGSTOP) while a newer connection with its name and
%% key identifies (the same node restarted, say): the relay gives the
%% name to the newer one and closes the old connection `replaced'. Once
%% the old node runs again its relay client stops with
%% `{shutdown, {relay_closed, replaced}}' (no crash report) and its keeper
%% stops for good: taking the name back would split the node in two. The
%% newer connection keeps the name.
replaced_node_stays_down(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "relay_replaced"),
    #{url := Url, fingerprint := Pin} = Relay = start_relay(Config, Dir, free_udp_port()),
    StateDir = filename:join(?config(priv_dir, Config), "replaced_state"),
    %% A's relay connection outlives the stop (its default idle timeout,
    %% 2 s, would end it first and hide the relay's `replaced').
    {A, AN} = peer(pa7, Relay, ["-macula_dist", "state_dir", "\"" ++ StateDir ++ "\"",
                                "-macula_dist", "idle_timeout", "30000"]),
    [#{key_id := KeyA}] = call(A, macula_dist, status, []),
    Keeper = fun() -> lists:keyfind({macula_dist_keeper, 1}, 1,
                                    call(A, supervisor, which_children, [macula_dist_sup]))
             end,
    {_, KeeperPid, worker, _} = Keeper(),
    ?assert(is_pid(KeeperPid)),
    APid = os_pid(A),
    os:cmd("kill -STOP " ++ APid),
    %% The same name and key (state_dir holds A's key): the relay probes
    %% A for a second, hears nothing, and hands the name over.
    {ok, Newer} = macula_ct:raw_client(Url, Pin, atom_to_binary(AN),
                                       #{state_dir => StateDir}),
    os:cmd("kill -CONT " ++ APid),
    ?assert(retry(fun() -> call(A, macula_dist_relay_client, clients, []) =:= [] end, 100, 100)),
    %% The keeper stopped (its child is gone, not restarting): it tries
    %% no more.
    ?assert(retry(fun() -> element(2, Keeper()) =:= undefined end, 50, 100)),
    ?assertEqual([], call(A, macula_dist_relay_client, clients, [])),
    ?assertMatch(#{identified := true, key_id := KeyA}, macula_dist_nif:client_status(Newer)),
    receive {macula_client, {closed, Why}} -> ct:fail({newer_connection_closed, Why})
    after 0 -> ok
    end.

%% The relay list of a node on all of Relays (each pinned).
on_relays(Relays) ->
    #{url => [U || #{url := U} <- Relays], fingerprint => [F || #{fingerprint := F} <- Relays]}.

%% The relay (its URL) whose client carries Peer's session, per status.
relay_of(P, Peer) -> macula_ct:session_relay(call(P, macula_dist_cluster, status, []), Peer).

%% Two nodes on the same two relays, checked traffic both ways; the relay
%% that carries their session (the first, in both lists) is killed (kill
%% -9) mid-transfer. The session moves to the other relay: no nodedown,
%% everything arrives once, in order, intact. The stall (kill to a working
%% call) is logged.
one_of_two_relays_killed(Config) ->
    Dir = ?config(priv_dir, Config),
    #{os_pid := Pid1, url := Url1} = R1 = start_relay(Config, filename:join(Dir, "r1"), free_udp_port()),
    #{url := Url2} = R2 = start_relay(Config, filename:join(Dir, "r2"), free_udp_port()),
    Both = on_relays([R1, R2]),
    {{A, AN}, {B, BN}} = connected_pair(Both, Both, [pa6, pb6], []),
    ?assertMatch([#{relay_url := Url1, connection := connected},
                  #{relay_url := Url2, connection := connected}], call(A, macula_dist_cluster, status, [])),
    ?assertEqual([Url1], relay_of(A, BN)),
    ok = call(A, macula_ct, watch, [BN, macula_failover_watch]),
    Self = self(),
    %% About 10 s of traffic: 500 messages of 16 KiB each way, 20 ms apart.
    Traffic = spawn_link(fun() -> Self ! {traffic, checked_both_ways(A, AN, B, BN, 500, 16 * 1024, 20)} end),
    timer:sleep(1500),
    T0 = erlang:monotonic_time(millisecond),
    os:cmd("kill -9 " ++ Pid1),
    ?assertEqual(BN, call(A, erpc, call, [BN, erlang, node, [], 30000])),
    Stall = erlang:monotonic_time(millisecond) - T0,
    Results = receive {traffic, R} -> R after 90000 -> error({no_traffic_result, Traffic}) end,
    ct:pal("one of two relays killed mid-transfer: first call through the other relay "
           "answered ~b ms after the kill; checked traffic: ~p", [Stall, Results]),
    [?assertMatch({ok, 500, _, _}, R) || R <- Results],
    ?assertEqual(timeout, call(A, macula_ct, watch_result, [{macula_failover_watch, 100}])),
    ?assertEqual([BN], call(A, erlang, nodes, [])),
    ?assertEqual([Url2], relay_of(A, BN)),
    ?assertEqual([Url2], relay_of(B, AN)).

%% A node on relay 1 and a node on relay 2 cannot reach each other: the
%% connection fails with no_relay_in_common, and the node says so in its
%% log; a node on both relays reaches each of them.
no_relay_in_common(Config) ->
    Dir = ?config(priv_dir, Config),
    R1 = start_relay(Config, filename:join(Dir, "c1"), free_udp_port()),
    R2 = start_relay(Config, filename:join(Dir, "c2"), free_udp_port()),
    {A, _} = peer(pa7, R1, []),
    {_, BN} = peer(pb7, R2, []),
    {C, _} = peer(pc7, on_relays([R1, R2]), []),
    ok = call(A, macula_ct, capture_log, []),
    ?assertEqual(pang, call(A, net_adm, ping, [BN])),
    ?assertMatch([_ | _], call(A, macula_ct, logged, [<<"no relay in common with pb7@">>])),
    ?assertEqual(pong, call(C, net_adm, ping, [BN])),
    ?assertEqual(pong, call(C, net_adm, ping, [call(A, erlang, node, [])])).

%% A long path (375 ms each way between node A and the relay) with a
%% 3 s `net_setuptime': the session (a request to the relay, then the
%% QUIC handshake and the PAKE end to end: three round trips, 2.3 s
%% measured) and the distribution handshake (two, 1.5 s) each fit in it,
%% their sum does not.
%% The set-up time runs again once the session is up, as inet_tls_dist's
%% accepting side starts it after the TLS handshake: the ping succeeds.
%% (With one timer over both, it failed.)
long_path_setup_fits_setuptime(Config) ->
    Dir = ?config(priv_dir, Config),
    RelayPort = free_udp_port(),
    Relay = start_relay(Config, filename:join(Dir, "relay"), RelayPort),
    ProxyPort = start_impair(Config, RelayPort, "--delay-ms 375"),
    Proxied = Relay#{url := iolist_to_binary(io_lib:format("quic://127.0.0.1:~b", [ProxyPort]))},
    {A, _} = peer(ls_a, Proxied, ["-kernel", "net_setuptime", "3"]),
    {_, BN} = peer(ls_b, Relay, []),
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ct:pal("set-up over 375 ms each way: ~b ms", [erlang:monotonic_time(millisecond) - T0]).
