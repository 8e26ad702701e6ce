%% Erlang distribution over -proto_dist macula: real peer nodes, a real
%% relay, OTP's own rpc, erpc, global, pg and monitors.
-module(macula_dist_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2, init_per_testcase/2, end_per_testcase/2]).
-export([ping_both_directions/1, simultaneous_connect/1, rpc_erpc_64_mib_both_ways/1,
         global_across_three_nodes/1, pg_across_three_nodes/1, kill_9_detected_by_ticks/1,
         full_mesh_of_five_in_order/1, restarted_peer_reachable_again/1,
         wrong_cookie_refused/1, hidden_node/1, net_kernel_start_later/1,
         missing_relay_fails_boot/1, relay_restart_reconnects/1,
         idle_connection_kept_by_ticks/1, one_udp_port_per_node/1,
         second_node_with_a_live_name_fails_to_boot/1, cluster_ca_mode/1, kill_9_seen_with_default_ticktime/1,
         relay_nodes_lists_the_others/1, autoconnect_meshes_by_itself/1,
         direct_path_on_loopback/1, direct_false_stays_relayed/1,
         keeper_answers_sys_while_reconnecting/1, deprecated_calls_answer_as_before/1,
         bulk_beside_pingers_in_order/1, pings_beside_a_windowed_stream/1,
         name_monitor_down_after_last_words/1,
         vm_packets_routed_by_sender/1]).

suite() -> [{timetrap, {minutes, 5}}].

%% Every case runs in both tunnel modes: e2e sessions (the default) and
%% version 1 stream tunnels.
all() ->
    [{group, e2e}, {group, stream}].

groups() ->
    Cases = [ping_both_directions, simultaneous_connect, rpc_erpc_64_mib_both_ways,
             global_across_three_nodes, pg_across_three_nodes, kill_9_detected_by_ticks,
             full_mesh_of_five_in_order, restarted_peer_reachable_again, wrong_cookie_refused,
             hidden_node, net_kernel_start_later, missing_relay_fails_boot,
             relay_restart_reconnects, idle_connection_kept_by_ticks, one_udp_port_per_node,
             second_node_with_a_live_name_fails_to_boot, relay_nodes_lists_the_others,
             autoconnect_meshes_by_itself, kill_9_seen_with_default_ticktime,
             bulk_beside_pingers_in_order, pings_beside_a_windowed_stream,
             name_monitor_down_after_last_words,
             vm_packets_routed_by_sender],
    [{e2e, [], Cases ++ [cluster_ca_mode, direct_path_on_loopback, direct_false_stays_relayed,
                         keeper_answers_sys_while_reconnecting, deprecated_calls_answer_as_before]},
     {stream, [], Cases}].

init_per_suite(Config) ->
    {Relay, Info} = macula_ct:start_relay(),
    [{relay, Relay}, {info, Info} | Config].

init_per_group(Mode, Config) ->
    Info = ?config(info, Config),
    [{mode, Mode}, {info, Info#{tunnel => Mode}} | Config].

end_per_group(_Mode, _Config) ->
    ok.

end_per_suite(Config) ->
    macula_dist_relay:stop(?config(relay, Config)).

init_per_testcase(_Case, Config) ->
    [{peers, []} | Config].

end_per_testcase(_Case, _Config) ->
    [macula_ct:stop_peer(P) || P <- erase_peers()],
    %% A relay a failed case left running would hold a UDP port in this VM.
    case erase(relay) of
        Relay when is_pid(Relay) -> is_process_alive(Relay) andalso macula_dist_relay:stop(Relay);
        undefined -> ok
    end,
    ok.

%% Starts peers named after the test case; stopped in end_per_testcase.
peers(Config, Names) -> peers(Config, Names, []).

peers(Config, Names, Extra) ->
    Started = [macula_ct:start_peer(N, ?config(info, Config), Extra) || N <- Names],
    put(peers, [P || {P, _} <- Started] ++ get_peers()),
    Started.

get_peers() -> case get(peers) of undefined -> []; L -> L end.
erase_peers() -> L = get_peers(), erase(peers), L.

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 120000).

%% ---- cases ----

ping_both_directions(Config) ->
    [{A, AN}, {B, BN}] = peers(Config, [pa1, pb1]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ?assertEqual([BN], call(A, erlang, nodes, [])),
    ?assertEqual([AN], call(B, erlang, nodes, [])),
    ?assertEqual(BN, call(A, rpc, call, [BN, erlang, node, []])),
    %% The connection runs over the macula carrier, not TCP.
    {ok, Info} = call(A, net_kernel, node_info, [BN]),
    ?assertMatch({net_address, relay, _, macula, inet}, proplists:get_value(address, Info)),
    %% ... in the group's tunnel mode, on both ends.
    Mode = ?config(mode, Config),
    ?assertEqual({ok, [{mode, Mode}]}, call(A, net_kernel, getopts, [BN, [mode]])),
    ?assertEqual({ok, [{mode, Mode}]}, call(B, net_kernel, getopts, [AN, [mode]])),
    %% An e2e session shows its QUIC path; a stream tunnel shares the relay's.
    case {Mode, call(A, net_kernel, getopts, [BN, [quic]])} of
        {e2e, {ok, [{quic, #{sent_packets := Sent, rtt_us := Rtt, cwnd := Cwnd}}]}} ->
            ?assert(Sent > 0 andalso Rtt > 0 andalso Cwnd > 0);
        {stream, Quic} ->
            ?assertEqual({ok, [{quic, undefined}]}, Quic)
    end,
    true = call(A, erlang, disconnect_node, [BN]),
    ?assertEqual([], call(A, erlang, nodes, [])),
    %% B hears of it through the tunnel's close; a ping from B while its
    %% side is still going down may answer pang (as over TCP): wait for it.
    ?assertEqual([], wait_for(fun() -> call(B, erlang, nodes, []) =:= [] andalso [] end)),
    ?assertEqual(pong, call(B, net_adm, ping, [AN])),
    ?assertEqual(AN, call(B, erpc, call, [AN, erlang, node, []])),
    ?assertEqual(pang, call(A, net_adm, ping, [macula_ct:node_name(nobody_here)])).

simultaneous_connect(Config) ->
    [{A, AN}, {B, BN}] = peers(Config, [pa2, pb2]),
    Self = self(),
    [spawn_link(fun() -> Self ! {P, call(P, net_adm, ping, [N])} end) || {P, N} <- [{A, BN}, {B, AN}]],
    [receive {P, R} -> ?assertEqual(pong, R) after 30000 -> error(ping_hung) end || P <- [A, B]],
    %% One connection, usable both ways.
    ?assertEqual([BN], call(A, erlang, nodes, [])),
    ?assertEqual([AN], call(B, erlang, nodes, [])),
    ?assertEqual(AN, call(B, erpc, call, [AN, erlang, node, []])),
    ?assertEqual(BN, call(A, erpc, call, [BN, erlang, node, []])).

rpc_erpc_64_mib_both_ways(Config) ->
    [{A, _}, {B, BN}] = peers(Config, [pa3, pb3]),
    Size = 64 bsl 20,
    ?assertEqual({ok, 2 * Size}, call(A, macula_ct, big_exchange, [BN, Size])),
    ?assertEqual({ok, 2 * Size}, call(B, macula_ct, big_exchange, [macula_ct:node_name(pa3), Size])).

global_across_three_nodes(Config) ->
    [{A, AN}, {B, BN}, {C, CN}] = peers(Config, [pa4, pb4, pc4]),
    Nodes = [AN, BN, CN],
    [?assertEqual(Nodes -- [N], call(P, macula_ct, connect_all, [Nodes])) || {P, N} <- [{A, AN}, {B, BN}, {C, CN}]],
    Pid = call(A, macula_ct, register_here, [macula_global_name]),
    ok = call(C, global, sync, []),
    ?assertEqual(Pid, call(C, global, whereis_name, [macula_global_name])),
    ?assertEqual(Pid, call(B, global, whereis_name, [macula_global_name])),
    ?assertEqual(AN, node(Pid)).

pg_across_three_nodes(Config) ->
    [{A, AN}, {B, BN}, {C, CN}] = peers(Config, [pa5, pb5, pc5]),
    Nodes = [AN, BN, CN],
    [{ok, _} = call(P, pg, start, [pg]) || P <- [A, B, C]],
    [call(P, macula_ct, connect_all, [Nodes]) || P <- [A, B, C]],
    Pids = [begin
                Pid = call(P, erlang, spawn, [timer, sleep, [infinity]]),
                ok = call(P, pg, join, [macula_group, Pid]),
                Pid
            end || P <- [A, B]],
    Members = wait_for(fun() ->
                               M = lists:sort(call(C, pg, get_members, [macula_group])),
                               M =:= lists:sort(Pids) andalso M
                       end),
    ?assertEqual(lists:sort(Pids), Members).

kill_9_detected_by_ticks(Config) ->
    TickTime = 4,
    Extra = ["-kernel", "net_ticktime", integer_to_list(TickTime)],
    [{A, _}, {B, BN}] = peers(Config, [pa6, pb6], Extra),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ok = call(A, macula_ct, watch, [BN, macula_watch]),
    OsPid = call(B, os, getpid, []),
    os:cmd("kill -9 " ++ OsPid),
    %% dist_util's ticker notices the silence, as it does over TCP.
    Result = call(A, macula_ct, watch_result, [{macula_watch, 2 * TickTime * 1000}]),
    ct:log("kill -9 seen as ~p", [Result]),
    ?assertMatch({nodedown, noconnection, _Ms}, Result).

%% e2e mode: with the default net_ticktime (60 s), a peer killed with
%% kill -9 is noticed when its session falls silent (4 s without a packet,
%% where keep-alives come every second), not at the tick timeout.
kill_9_seen_with_default_ticktime(Config) ->
    [{A, _}, {B, BN}] = peers(Config, [pa17, pb17]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ?assertEqual(60, call(A, net_kernel, get_net_ticktime, [])),
    ok = call(A, macula_ct, watch, [BN, macula_watch]),
    os:cmd("kill -9 " ++ call(B, os, getpid, [])),
    %% Within 5 s (the relay connection's 2 s idle timeout, then the relay's
    %% tun_close or stream reset; on a direct path, then the path's probes
    %% going unanswered), not the 60-75 s ticks would take.
    Result = call(A, macula_ct, watch_result, [{macula_watch, 5000}]),
    ct:log("kill -9 seen as ~p", [Result]),
    ?assertMatch({nodedown, noconnection, _Ms}, Result).

full_mesh_of_five_in_order(Config) ->
    Names = [pm1, pm2, pm3, pm4, pm5],
    Peers = peers(Config, Names),
    Nodes = [N || {_, N} <- Peers],
    [?assertEqual(Nodes -- [N], call(P, macula_ct, connect_all, [Nodes])) || {P, N} <- Peers],
    %% Each node sends 20 000 numbered messages to the next: 100 000 in all,
    %% all at once, each stream in order.
    PerSender = 20000,
    [ok = call(P, macula_ct, ordered_receiver, [macula_seq, PerSender]) || {P, _} <- Peers],
    Next = tl(Nodes) ++ [hd(Nodes)],
    Self = self(),
    [spawn_link(fun() -> Self ! {sent, call(P, macula_ct, ordered_sender, [To, macula_seq, PerSender])} end)
     || {{P, _}, To} <- lists:zip(Peers, Next)],
    [receive {sent, ok} -> ok after 120000 -> error(send_timeout) end || _ <- Peers],
    Results = [call(P, macula_ct, receiver_result, [macula_seq]) || {P, _} <- Peers],
    Prev = [lists:last(Nodes) | lists:droplast(Nodes)],
    ?assertEqual([{ok, #{From => PerSender}} || From <- Prev], Results).

%% A bulk transfer (64 MiB in 1 MiB messages) and, beside it, 8 pingers
%% (200 round trips each) and 8 one-way senders (5000 numbered messages
%% each) from other processes: every message of every sender arrives once,
%% in order, intact. In an e2e session the senders went on several lanes,
%% and next to none behind a fence: the router names the sender of every
%% control message OTP 25 and 27 write; OTP 29 sent two (of thousands) it
%% does not know, which a fence keeps in order.
bulk_beside_pingers_in_order(Config) ->
    [{A, _}, {B, BN}] = peers(Config, [pa30, pb30]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ok = call(B, macula_ct, checked_receiver, [macula_bulk, 64]),
    ok = call(B, macula_ct, echo_server, [macula_echo]),
    ok = call(B, macula_ct, pid_ordered_receiver, [macula_pseq, 8 * 5000]),
    Self = self(),
    spawn_link(fun() ->
                       Self ! {bulk, call(A, macula_ct, checked_send, [BN, macula_bulk, 64, 1 bsl 20])}
               end),
    spawn_link(fun() ->
                       Self ! {seq, call(A, macula_ct, pid_ordered_senders, [BN, macula_pseq, 8, 5000])}
               end),
    ?assertEqual(ok, call(A, macula_ct, pingers, [BN, macula_echo, 8, 200])),
    receive {bulk, Bulk} -> ?assertEqual(ok, Bulk) end,
    receive {seq, Seq} -> ?assertEqual(ok, Seq) end,
    ?assertMatch({ok, 64, _, _}, call(B, macula_ct, checked_result, [macula_bulk, 120000])),
    {ok, Seen} = call(B, macula_ct, receiver_result, [macula_pseq]),
    ?assertEqual(lists:duplicate(8, 5000), maps:values(Seen)),
    case ?config(mode, Config) of
        e2e ->
            {ok, [{lanes, Lanes}, {fences, Fences}]} =
                call(A, net_kernel, getopts, [BN, [lanes, fences]]),
            ct:pal("lanes used ~b, fences ~b", [Lanes, Fences]),
            ?assert(Lanes > 1),
            ?assert(Fences =< 4);
        stream ->
            ?assertEqual({ok, [{lanes, 0}]}, call(A, net_kernel, getopts, [BN, [lanes]]))
    end.

%% A transfer with a window of 16 MiB never ends while 50 pings go one
%% after another: the carrier drains the VM's queue past the window, so the
%% VM never suspends the pinger behind the stream (before, a stream tunnel
%% said busy at 4 MiB, and the VM resumed the streamer first each time:
%% 10 of the 50 pings came back in a minute).
pings_beside_a_windowed_stream(Config) ->
    [{A, _}, {B, BN}] = peers(Config, [pa32, pb32]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ok = call(B, macula_ct, acking_receiver, [macula_win]),
    ok = call(B, macula_ct, echo_server, [macula_echo]),
    Streamer = call(A, macula_ct, windowed_stream, [BN, macula_win, 16, 1 bsl 20]),
    timer:sleep(1000),
    Result = call(A, macula_ct, pings_within, [BN, macula_echo, 50, 60000]),
    call(A, erlang, exit, [Streamer, kill]),
    ?assertEqual(ok, Result).

%% The DOWN of a monitor by name names no pid, so it goes behind a fence;
%% it still comes after the process's last message, 300 times, with a bulk
%% transfer the other way beside it.
name_monitor_down_after_last_words(Config) ->
    [{A, AN}, {B, BN}] = peers(Config, [pa31, pb31]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ok = call(A, macula_ct, checked_receiver, [macula_bulk, 32]),
    Self = self(),
    spawn_link(fun() ->
                       Self ! {bulk, call(B, macula_ct, checked_send, [AN, macula_bulk, 32, 1 bsl 20])}
               end),
    ?assertEqual(ok, call(A, macula_ct, name_monitor_order, [BN, macula_last, 300])),
    receive {bulk, Bulk} -> ?assertEqual(ok, Bulk) end,
    ?assertMatch({ok, 32, _, _}, call(A, macula_ct, checked_result, [macula_bulk, 120000])),
    case ?config(mode, Config) of
        e2e ->
            {ok, [{fences, Fences}]} = call(B, net_kernel, getopts, [AN, [fences]]),
            ct:pal("fences ~b", [Fences]),
            ?assert(Fences >= 300);
        stream ->
            ok
    end.

restarted_peer_reachable_again(Config) ->
    [{A, _}, {B, BN}] = peers(Config, [pa7, pb7]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    os:cmd("kill -9 " ++ call(B, os, getpid, [])),
    %% Same name again at once: the relay lets the newest connection win.
    [{B2, BN}] = peers(Config, [pb7]),
    ?assertEqual(pong, wait_for(fun() -> call(A, net_adm, ping, [BN]) =:= pong andalso pong end)),
    ?assertEqual(call(B2, os, getpid, []), call(A, rpc, call, [BN, os, getpid, []])).

wrong_cookie_refused(Config) ->
    [{A, AN}] = peers(Config, [pa8]),
    [{E, EN}] = peers(Config, [pe8], ["-setcookie", "another_cookie"]),
    ?assertEqual(pang, call(A, net_adm, ping, [EN])),
    ?assertEqual(pang, call(E, net_adm, ping, [AN])),
    ?assertEqual([], call(A, erlang, nodes, [])),
    ?assertEqual([], call(E, erlang, nodes, [])),
    %% Both stay up and usable.
    [{B, _}] = peers(Config, [pb8]),
    ?assertEqual(pong, call(B, net_adm, ping, [AN])),
    ?assertEqual(pong, call(E, erlang, is_alive, []) andalso pong).

hidden_node(Config) ->
    [{A, AN}] = peers(Config, [pa9]),
    [{H, HN}] = peers(Config, [ph9], ["-hidden"]),
    ?assertEqual(pong, call(H, net_adm, ping, [AN])),
    ?assertEqual([], call(A, erlang, nodes, [])),
    ?assertEqual([HN], call(A, erlang, nodes, [hidden])),
    ?assertEqual(AN, call(H, erpc, call, [AN, erlang, node, []])).

net_kernel_start_later(Config) ->
    [{A, AN}] = peers(Config, [pa10]),
    %% A node that boots without a name and starts distribution itself.
    Args = macula_ct:peer_args(?config(info, Config), []),
    {ok, L, nonode@nohost} = peer:start(#{connection => standard_io, args => Args}),
    put(peers, [L | get_peers()]),
    {ok, _} = call(L, net_kernel, start, [[pl10, shortnames]]),
    ?assertEqual(pong, call(L, net_adm, ping, [AN])),
    ?assertEqual(macula_ct:node_name(pl10), call(A, rpc, call, [macula_ct:node_name(pl10), erlang, node, []])),
    ok = call(L, net_kernel, stop, []),
    %% And again, under another name. (On OTP 27, once in three runs of the
    %% suite, the very first ping after this restart answered pang and the
    %% next one pong: retried for up to 5 s, and the pang is logged.)
    {ok, _} = call(L, net_kernel, start, [[pl10b, shortnames]]),
    First = call(L, net_adm, ping, [AN]),
    First =:= pong orelse ct:pal("first ping after the restart: ~p", [First]),
    ?assertEqual(pong, wait_for(fun() -> call(L, net_adm, ping, [AN]) =:= pong andalso pong end, 50)).

missing_relay_fails_boot(_Config) ->
    %% No relay configured: the node stops at boot with a clear reason.
    Erl = os:find_executable("erl"),
    Paths = lists:append([" -pa " ++ D || D <- code:get_path(), string:find(D, "_build") =/= nomatch]),
    Cmd = "env -u MACULA_DIST_RELAY timeout 60 " ++ Erl ++ " -noshell -proto_dist macula -no_epmd"
        " -sname pz11" ++ Paths ++ " -eval 'halt(0)' 2>&1; echo exit=$?",
    Out = os:cmd(Cmd),
    ct:log("~ts", [Out]),
    ?assertNotEqual(nomatch, string:find(Out, "no_relay_configured")),
    ?assertEqual(nomatch, string:find(Out, "exit=0")),
    ?assertEqual(nomatch, string:find(Out, "exit=124")).

%% As with epmd: a second node started with a live node's name stops at
%% boot with `name_taken', and the first node and its connections go on.
second_node_with_a_live_name_fails_to_boot(Config) ->
    [{A, AN}, {B, BN}] = peers(Config, [pa16, pb16]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    Args = macula_ct:peer_args(?config(info, Config), []),
    Cmd = "timeout 60 " ++ os:find_executable("erl") ++ " -noshell -sname pa16 "
        ++ lists:join(" ", [quote(A1) || A1 <- Args]) ++ " -eval 'halt(0)' 2>&1; echo exit=$?",
    Out = os:cmd(lists:flatten(Cmd)),
    ct:log("~ts", [Out]),
    ?assertNotEqual(nomatch, string:find(Out, "name_taken")),
    ?assertEqual(nomatch, string:find(Out, "exit=0")),
    ?assertEqual([BN], call(A, erlang, nodes, [])),
    ?assertEqual(AN, call(B, erpc, call, [AN, erlang, node, []])),
    ?assertEqual(AN, call(A, erlang, node, [])).

quote(Arg) -> "'" ++ Arg ++ "'".

%% Cluster-CA mode: e2e sessions are authenticated by certificates that the
%% cluster's CA issued naming `macula://NODE'. A certificate of another CA,
%% or one of the right CA that names another node, is refused inside the
%% handshake: the peer never reaches dist_util.
cluster_ca_mode(Config) ->
    Dir = ?config(priv_dir, Config),
    {CaPem, _} = Ca = macula_ct:make_ca(Dir, "cluster_ca"),
    OtherCa = macula_ct:make_ca(Dir, "other_ca"),
    Flags = fun(Name, Issuer, Named) ->
                    San = "URI:macula://" ++ atom_to_list(macula_ct:node_name(Named)),
                    {Cert, Key} = macula_ct:issue_cert(Dir, atom_to_list(Name), Issuer, San),
                    lists:append([["-macula_dist", K, "\"" ++ V ++ "\""]
                                  || {K, V} <- [{"cluster_ca", CaPem}, {"node_cert", Cert},
                                                {"node_key", Key}]])
            end,
    [{A, AN}] = peers(Config, [pa21], Flags(pa21, Ca, pa21)),
    [{B, BN}] = peers(Config, [pb21], Flags(pb21, Ca, pb21)),
    [{C, CN}] = peers(Config, [pc21], Flags(pc21, OtherCa, pc21)),
    [{D, DN}] = peers(Config, [pd21], Flags(pd21, Ca, pa21)),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ?assertEqual(AN, call(B, erpc, call, [AN, erlang, node, []])),
    Status = fun(P) -> call(P, macula_dist_relay_client, status,
                            [call(P, erlang, whereis, [macula_dist_relay_client])])
             end,
    ?assertMatch(#{session_identity := cluster_ca, mode := e2e}, Status(A)),
    %% Another CA's certificate, both ways.
    ?assertEqual(pang, call(A, net_adm, ping, [CN])),
    ?assertEqual(pang, call(C, net_adm, ping, [BN])),
    %% The cluster CA's certificate for pa21, shown by pd21, both ways.
    ?assertEqual(pang, call(B, net_adm, ping, [DN])),
    ?assertEqual(pang, call(D, net_adm, ping, [BN])),
    ?assertEqual([AN], call(B, erlang, nodes, [])),
    ?assertEqual([], call(C, erlang, nodes, [connected])),
    ?assertEqual([], call(D, erlang, nodes, [connected])),
    %% Each refusal was counted by the NIF of the node that was dialled.
    ?assertMatch(#{refused_sessions := N} when N >= 1, Status(B)),
    ?assertMatch(#{refused_sessions := N} when N >= 1, Status(C)),
    ?assertMatch(#{refused_sessions := N} when N >= 1, Status(D)).

%% Discovery: the relay tells a node which other nodes it may reach there.
relay_nodes_lists_the_others(Config) ->
    [{A, AN}, {_, BN}, {_, CN}] = peers(Config, [pa18, pb18, pc18]),
    %% As binaries: names the relay gives become atoms only when dialled.
    Names = call(A, macula_dist_cluster, relay_node_names, []),
    ?assert(lists:member(atom_to_binary(BN), Names) andalso lists:member(atom_to_binary(CN), Names)),
    ?assertNot(lists:member(atom_to_binary(AN), Names)),
    %% relay_nodes/0: an atom for a name that is one already, else a binary.
    Listed = call(A, macula_dist_cluster, relay_nodes, []),
    ?assertEqual(lists:sort(Names), lists:sort([if is_atom(L) -> atom_to_binary(L); true -> L end
                                                || L <- Listed])),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ?assert(lists:member(BN, call(A, macula_dist_cluster, relay_nodes, []))),
    %% Only the one dialled was connected.
    ?assertEqual([BN], call(A, erlang, nodes, [])).

%% -macula_dist autoconnect true: nodes find each other on the relay and
%% connect, with no ping from anyone.
autoconnect_meshes_by_itself(Config) ->
    Peers = peers(Config, [pa19, pb19, pc19], ["-macula_dist", "autoconnect", "true"]),
    Nodes = [N || {_, N} <- Peers],
    Meshed = fun() ->
                     lists:all(fun({P, N}) ->
                                       lists:sort(call(P, erlang, nodes, [])) =:= lists:sort(Nodes -- [N])
                               end, Peers)
             end,
    ?assert(wait_for(fun() -> Meshed() orelse false end)).

idle_connection_kept_by_ticks(Config) ->
    %% Idle for three tick times: ticks flow both ways and are counted, so
    %% the connection stays (a carrier without working ticks drops it).
    TickTime = 2,
    [{A, _}, {B, BN}] = peers(Config, [pa13, pb13], ["-kernel", "net_ticktime", integer_to_list(TickTime)]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ok = call(A, macula_ct, watch, [BN, macula_idle_watch]),
    timer:sleep(3 * TickTime * 1000),
    ?assertEqual(timeout, call(A, macula_ct, watch_result, [{macula_idle_watch, 100}])),
    ?assertEqual([BN], call(A, erlang, nodes, [])),
    ?assertEqual(BN, call(A, erpc, call, [BN, erlang, node, []])),
    _ = B.

relay_restart_reconnects(Config) ->
    {Relay, #{port := Port} = Info} = macula_ct:start_relay(),
    put(relay, Relay),
    %% The next relay has a new certificate: trust without a pin here.
    Trust = ["-macula_dist", "verify", "none"],
    Mode = ?config(mode, Config),
    Start = fun(Name) ->
                    macula_ct:start_peer(Name, Info#{fingerprint => none, tunnel => Mode}, Trust)
            end,
    [{A, AN}, {B, BN}] = [Start(N) || N <- [pa12, pb12]],
    put(peers, [A, B | get_peers()]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    case Mode of
        stream ->
            macula_dist_relay:stop(Relay),
            %% The connection is gone, the nodes are not.
            ?assertEqual([], wait_for(fun() -> call(A, erlang, nodes, []) =:= [] andalso [] end)),
            ?assertEqual(AN, call(A, erlang, node, [])),
            ?assertEqual(pang, call(A, net_adm, ping, [BN]));
        e2e ->
            %% On loopback a busy session goes direct: it needs no relay,
            %% and outlives this one (past the 10 s a session waits for one).
            ok = macula_ct:make_busy(A, BN),
            ?assertEqual(true, wait_for(fun() -> session_paths(A, BN) =/= [relay] end)),
            macula_dist_relay:stop(Relay),
            timer:sleep(12000),
            ?assertEqual([BN], call(A, erlang, nodes, [])),
            ?assertEqual(BN, call(A, erpc, call, [BN, erlang, node, []]))
    end,
    {Relay2, _} = macula_ct:start_relay(#{port => Port}),
    try
        ?assertEqual(pong, wait_for(fun() -> call(A, net_adm, ping, [BN]) =:= pong andalso pong end)),
        ?assertEqual(AN, call(B, rpc, call, [AN, erlang, node, []]))
    after
        macula_dist_relay:stop(Relay2)
    end.

%% Each relay's keeper is a gen_statem that answers sys throughout:
%% `connected', then `connecting' (waiting out its backoff, or while an
%% attempt runs) as long as the relay is gone, then `connected' again, the
%% same keeper, once the relay is back. autoconnect answers sys as well.
keeper_answers_sys_while_reconnecting(Config) ->
    {Relay, #{port := Port} = Info} = macula_ct:start_relay(),
    put(relay, Relay),
    %% The next relay has a new certificate: trust without a pin here.
    Extra = ["-macula_dist", "verify", "none", "-macula_dist", "autoconnect", "true"],
    {A, _} = macula_ct:start_peer(pa24, Info#{fingerprint => none, tunnel => ?config(mode, Config)},
                                  Extra),
    put(peers, [A | get_peers()]),
    [Keeper] = keepers(A),
    ?assertMatch({connected, _}, call(A, sys, get_state, [Keeper])),
    ?assertEqual(state, element(1, call(A, sys, get_state, [macula_dist_autoconnect]))),
    macula_dist_relay:stop(Relay),
    ?assertEqual(connecting, wait_for(fun() -> keeper_state(A, Keeper) =:= connecting andalso connecting end)),
    %% Attempts fail and back off meanwhile; sys answers every time (within
    %% its default 5 s).
    [begin
         timer:sleep(1000),
         ?assertEqual(connecting, keeper_state(A, Keeper)),
         ?assertEqual(state, element(1, call(A, sys, get_state, [macula_dist_autoconnect])))
     end || _ <- lists:seq(1, 5)],
    {Relay2, _} = macula_ct:start_relay(#{port => Port}),
    try
        %% The backoff is 5 s at most, an attempt a few seconds.
        ?assertEqual(connected, wait_for(fun() -> keeper_state(A, Keeper) =:= connected andalso connected end, 300)),
        ?assertEqual([Keeper], keepers(A)),
        ?assertMatch([#{connection := connected}], call(A, macula_dist_cluster, status, []))
    after
        macula_dist_relay:stop(Relay2)
    end.

keepers(P) ->
    [Pid || {{macula_dist_keeper, _}, Pid, worker, _} <- call(P, supervisor, which_children, [macula_dist_sup])].

keeper_state(P, Keeper) ->
    {State, _Data} = call(P, sys, get_state, [Keeper]),
    State.

%% macula_dist's old user API (deprecated, moved to macula_dist_cluster)
%% still answers, as the new one does.
deprecated_calls_answer_as_before(Config) ->
    [{A, _}, {_, BN}] = peers(Config, [pa25, pb25]),
    ?assert(lists:member(atom_to_binary(BN), call(A, macula_dist_cluster, relay_node_names, []))),
    %% The suite's relay may drop a node of an earlier case meanwhile: asked again until both agree.
    Same = fun(F, Project) ->
                   wait_for(fun() -> Project(call(A, macula_dist, F, [])) =:=
                                         Project(call(A, macula_dist_cluster, F, [])) end)
           end,
    Id = fun(X) -> X end,
    ?assert(Same(relay_nodes, Id)),
    ?assert(Same(relay_node_names, Id)),
    %% status: the same relays and connections (counters and RTTs move).
    ?assert(Same(status, fun(L) -> [maps:with([relay_url, node, connection, identified, mode], S)
                                     || S <- L] end)),
    ?assertMatch([#{connection := connected}], call(A, macula_dist, status, [])).

wait_for(Fun) -> wait_for(Fun, 100).
wait_for(Fun, 0) -> Fun();
wait_for(Fun, N) ->
    case Fun() of
        false -> timer:sleep(100), wait_for(Fun, N - 1);
        Value -> Value
    end.

%% All of a node's relay traffic, control and data, goes through one UDP
%% socket (one local port, one NAT mapping) to the relay's one port: each
%% node process owns a single UDP socket, and in e2e mode the relay
%% forwarded the session's datagrams without ever seeing them come from
%% another address than the node's relay connection (no rebinding).
one_udp_port_per_node(Config) ->
    [{A, _}, {B, BN}] = peers(Config, [pa15, pb15]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ?assertEqual(BN, call(A, erpc, call, [BN, erlang, node, []])),
    _ = call(A, macula_ct, big_exchange, [BN, 1 bsl 20]),
    #{port := RelayPort} = ?config(info, Config),
    [?assertMatch([_], udp_ports(call(P, os, getpid, []))) || P <- [A, B]],
    %% The relay of this suite runs in this VM: one socket, its port.
    ?assertEqual([RelayPort], udp_ports(os:getpid())),
    Stats = macula_dist_relay:info(?config(relay, Config)),
    ct:log("relay: ~p", [Stats]),
    case ?config(mode, Config) of
        e2e ->
            ?assert(maps:get(forwarded_datagrams, Stats) > 0),
            ?assertEqual(0, maps:get(rebinds, Stats));
        stream ->
            ok
    end.

%% Local ports of the UDP sockets an OS process holds (from /proc).
udp_ports(OsPid) ->
    Fds = filelib:wildcard("/proc/" ++ OsPid ++ "/fd/*"),
    Inodes = [Inode || Fd <- Fds, {ok, "socket:[" ++ Rest} <- [file:read_link(Fd)],
                       Inode <- [lists:droplast(Rest)]],
    Table = lists:append([proc_lines("/proc/net/udp"), proc_lines("/proc/net/udp6")]),
    lists:usort([list_to_integer(Port, 16)
                 || [_, Local, _, _, _, _, _, _, _, Inode | _] <- Table,
                    lists:member(Inode, Inodes),
                    [_, Port] <- [string:split(Local, ":", trailing)]]).

proc_lines(File) ->
    {ok, Bin} = file:read_file(File),
    [string:lexemes(L, " ") || L <- tl(string:split(binary_to_list(Bin), "\n", all)), L =/= ""].

%% The paths of P's sessions with Peer, from macula_dist_cluster:status/0.
session_paths(P, Peer) ->
    Name = atom_to_binary(Peer, utf8),
    [Path || #{sessions := Ss} <- call(P, macula_dist_cluster, status, []),
             #{peer := N, path := Path} <- Ss, N =:= Name].

%% On loopback the relay sees each node at 127.0.0.1:Port and tells the
%% other (`cand`). A quiet session stays on the relay; once it carried
%% 256 KiB its nodes probe each other, the probes are answered and the
%% session goes direct, under the same QUIC connection. Status shows the
%% address; traffic both ways goes on with no nodedown.
direct_path_on_loopback(Config) ->
    [{A, AN}, {B, BN}] = peers(Config, [pa22, pb22]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ok = call(A, macula_ct, watch, [BN, macula_direct_watch]),
    [BN = call(A, erpc, call, [BN, erlang, node, []]) || _ <- lists:seq(1, 100)],
    timer:sleep(500),
    ?assertEqual([relay], session_paths(A, BN)),
    ?assertEqual([relay], session_paths(B, AN)),
    ok = macula_ct:make_busy(A, BN),
    IsDirect = fun(P, Peer) -> case session_paths(P, Peer) of
                                   [{direct, <<"127.0.0.1:", _/binary>>}] -> true;
                                   _ -> false
                               end
               end,
    ?assert(wait_for(fun() -> IsDirect(A, BN) andalso IsDirect(B, AN) end, 50)),
    {ok, _} = call(A, macula_ct, big_exchange, [BN, 8 * 1024 * 1024]),
    ?assertEqual(timeout, call(A, macula_ct, watch_result, [{macula_direct_watch, 100}])),
    ?assert(IsDirect(A, BN)),
    %% The connection's own info says so too.
    ?assertMatch({ok, [{path, {direct, <<"127.0.0.1:", _/binary>>}}]},
                 call(A, net_kernel, getopts, [BN, [path]])).

%% `-macula_dist direct false': the session stays on the relay.
direct_false_stays_relayed(Config) ->
    Off = ["-macula_dist", "direct", "false"],
    [{A, _}] = peers(Config, [pa23], Off),
    [{B, BN}] = peers(Config, [pb23], Off),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    timer:sleep(1000),
    ?assertEqual([relay], session_paths(A, BN)),
    ?assertEqual({ok, [{path, relay}]}, call(A, net_kernel, getopts, [BN, [path]])),
    _ = B.

%% The router against what this VM really hands the carrier: every control
%% message that names a sender, captured from dist_ctrl_get_data on a live
%% connection (macula_dist_capture), goes on the lane of the process it
%% concerns. In stream mode the VM uses the atom cache, so the packets
%% have cache headers; in e2e mode it does not.
vm_packets_routed_by_sender(Config) ->
    [{A, _}, {_, BN}] = peers(Config, [pa_cap, pb_cap], ["-hidden"]),
    Steps = call(A, macula_dist_capture, check, [BN]),
    ct:log("steps and their packet counts: ~p", [Steps]),
    ?assert(length(Steps) >= 29).
