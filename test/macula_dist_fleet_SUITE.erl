%% A relay set on loopback: five relay processes, nodes started with
%% `-macula_dist relay_set [...]'. Each node joins its two home relays
%% (rendezvous hashing of its name over the set, macula_dist_relay_set) and
%% a target's homes when it first dials it (in the background when it is
%% on one already); a session runs on a home of
%% its target. Sessions stay on the relays (`direct false'): on loopback
%% they would go direct, around the relays this suite tests.
-module(macula_dist_fleet_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2,
         end_per_testcase/2]).
-export([nodes_live_on_their_homes/1, a_relay_of_the_set_dies/1, a_silent_home_delays_no_dial/1]).

-define(RELAYS, 5).

suite() -> [{timetrap, {minutes, 5}}].

all() -> [nodes_live_on_their_homes, a_relay_of_the_set_dies, a_silent_home_delays_no_dial].

init_per_suite(Config) ->
    [{relay_bin, macula_ct:relay_bin()} | Config].

end_per_suite(_Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    ok = macula_ct:case_started(),
    Config.

end_per_testcase(_Case, _Config) ->
    ok = macula_ct:case_ended(),
    ok.

%% ---- helpers ----

fleet(Config, Tag) ->
    Dir = ?config(priv_dir, Config),
    [macula_ct:relay_process(?config(relay_bin, Config),
                             filename:join(Dir, Tag ++ integer_to_list(I)),
                             macula_ct:free_udp_port())
     || I <- lists:seq(1, ?RELAYS)].

set_info(Relays) ->
    #{set => true, url => [U || #{url := U} <- Relays],
      fingerprint => [F || #{fingerprint := F} <- Relays]}.

peers(Relays, Names) ->
    Info = set_info(Relays),
    [begin
         {Peer, Node} = macula_ct:start_peer(Name, Info, ["-macula_dist", "direct", "false"]),
         put(peers, [Peer | get(peers)]),
         {Peer, Node}
     end || Name <- Names].

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 120000).

homes(Node, Relays) ->
    macula_dist_relay_set:homes(atom_to_binary(Node, utf8), [U || #{url := U} <- Relays], 2).

%% The connected relays of P, per status.
connected(P) ->
    [Url || #{relay_url := Url, connection := connected} <- call(P, macula_dist_cluster, status, [])].

%% Every node connects to every other; each pair's session (seen from
%% both sides) runs on one relay, a home of one of the two.
mesh(Peers, Relays) ->
    Nodes = [N || {_, N} <- Peers],
    [?assertEqual(lists:sort(Nodes -- [N]), call(P, macula_ct, connect_all, [Nodes]) -- [N])
     || {P, N} <- Peers],
    %% (Both ends may dial at once, global too: the session of the
    %% connection dist_util turned down is gone a moment later.)
    [begin
         One = fun() ->
                       length(macula_ct:session_relay(call(P, macula_dist_cluster, status, []),
                                                      Other)) =:= 1
               end,
         ?assert(is_integer(macula_ct:ms_until(One, 10000))),
         [Relay] = macula_ct:session_relay(call(P, macula_dist_cluster, status, []), Other),
         ?assert(lists:member(Relay, homes(N, Relays) ++ homes(Other, Relays)))
     end || {P, N} <- Peers, {_, Other} <- Peers, Other =/= N],
    ok.

%% ---- cases ----

%% Each node is on its two homes from the start, and on no relay that is
%% neither a home of its own nor of a node it reached; every session runs
%% on a home of one side, so the sessions spread over the set instead of
%% all running on the first relay.
nodes_live_on_their_homes(Config) ->
    Relays = fleet(Config, "h"),
    Peers = peers(Relays, [list_to_atom("fh" ++ integer_to_list(I)) || I <- lists:seq(1, 8)]),
    [?assertEqual([], homes(N, Relays) -- connected(P)) || {P, N} <- Peers],
    ok = mesh(Peers, Relays),
    AllHomes = lists:usort(lists:append([homes(N, Relays) || {_, N} <- Peers])),
    [?assertEqual([], connected(P) -- AllHomes) || {P, _} <- Peers],
    Used = lists:usort([R || {P, _} <- Peers, {_, O} <- Peers,
                             R <- macula_ct:session_relay(call(P, macula_dist_cluster, status, []), O)]),
    ct:pal("8 nodes over ~b relays: sessions on ~b of them; relays per node ~p",
           [?RELAYS, length(Used), [length(connected(P)) || {P, _} <- Peers]]),
    ?assert(length(Used) > 1).

%% Checked traffic both ways between pairs; the relay that carries the
%% most sessions is killed (kill -9) mid-transfer. Every session moves to
%% another relay of the set: no nodedown, everything arrives once, in
%% order, intact, and the mesh is whole afterwards.
a_relay_of_the_set_dies(Config) ->
    Relays = fleet(Config, "k"),
    Peers = peers(Relays, [list_to_atom("fk" ++ integer_to_list(I)) || I <- lists:seq(1, 6)]),
    ok = mesh(Peers, Relays),
    Carried = [R || {P, _} <- Peers, {_, O} <- Peers,
                    R <- macula_ct:session_relay(call(P, macula_dist_cluster, status, []), O)],
    {_, Busiest} = lists:max([{length([X || X <- Carried, X =:= R]), R} || #{url := R} <- Relays]),
    [#{os_pid := Victim}] = [R || #{url := U} = R <- Relays, U =:= Busiest],
    Pairs = lists:zip(lists:sublist(Peers, 3), lists:nthtail(3, Peers)),
    _ = macula_ct:traffic_while(Pairs, {300, 16 * 1024, 20},
                                 fun() -> timer:sleep(1500), os:cmd("kill -9 " ++ Victim) end),
    Nodes = [N || {_, N} <- Peers],
    [?assertEqual(lists:sort(Nodes -- [N]), lists:sort(call(P, erlang, nodes, [])))
     || {P, N} <- Peers],
    [?assertNotEqual([Busiest], macula_ct:session_relay(call(P, macula_dist_cluster, status, []), O))
     || {P, N} <- Peers, {_, O} <- Peers, O =/= N],
    ct:pal("killed ~ts, which carried ~b session ends; all moved",
           [Busiest, length([X || X <- Carried, X =:= Busiest])]).

%% A target's home that takes packets and answers none (its process
%% stopped, as a relay behind a dead route) must not hold up a dial
%% through the target's other home: the caller, on neither, joins both
%% at once and dials through the first that answers. (Joining them one
%% after the other waited out the silent relay's connect timeout, here
%% past the 7 s set-up time: the dial failed, and every other dial that
%% needed a relay joined waited behind it.)
a_silent_home_delays_no_dial(Config) ->
    Relays = fleet(Config, "s"),
    Names = [list_to_atom("fs" ++ integer_to_list(I)) || I <- lists:seq(1, 40)],
    %% Two names with no home in common (found by the set's own hash).
    [{Target, Caller} | _] =
        [{T, C} || T <- Names, C <- Names, T =/= C,
                   homes(macula_ct:node_name(T), Relays) -- homes(macula_ct:node_name(C), Relays)
                       =:= homes(macula_ct:node_name(T), Relays)],
    [{_, TargetNode}] = peers(Relays, [Target]),
    %% The caller's QUIC handshakes wait the whole 10 s connect timeout
    %% for a relay that answers nothing (with the default 2 s idle timeout
    %% a handshake gives up sooner).
    {CallerPeer, _} = macula_ct:start_peer(Caller, set_info(Relays),
                                           ["-macula_dist", "direct", "false",
                                            "-macula_dist", "idle_timeout", "10000"]),
    put(peers, [CallerPeer | get(peers)]),
    [Silent, Other] = homes(TargetNode, Relays),
    [#{os_pid := SilentPid}] = [R || #{url := U} = R <- Relays, U =:= Silent],
    _ = os:cmd("kill -STOP " ++ SilentPid),
    try
        ?assertEqual(pong, call(CallerPeer, net_adm, ping, [TargetNode])),
        ?assertEqual([Other], macula_ct:session_relay(
                                call(CallerPeer, macula_dist_cluster, status, []), TargetNode))
    after
        os:cmd("kill -CONT " ++ SilentPid)
    end.
