%% A relay set named in DNS: relay processes on 127.0.0.11-14 (one port),
%% dnsmasq on loopback (macula_ct:dns_server/3) answering for
%% relays.macula.test (A records, TTL 1 s) and an SRV name, and nodes
%% started with `-macula_dist relay_set "dns://relays.macula.test:PORT"'
%% and `relay_set_nameserver' pointing at that server. Sessions stay on
%% the relays (`direct false').
-module(macula_dist_dns_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2,
         end_per_testcase/2]).
-export([names_resolve_to_the_set/1, nodes_follow_the_set_as_dns_changes_it/1,
         a_relay_joined_for_a_target_is_left_when_idle/1, forty_nodes_as_relays_join_and_die/1,
         an_answer_naming_no_relay_leaves_nothing/1]).

-define(NAME, "relays.macula.test").
-define(SRV, "_macula._udp.macula.test").
-define(IPS, ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]).

suite() -> [{timetrap, {minutes, 8}}].

all() ->
    [names_resolve_to_the_set, nodes_follow_the_set_as_dns_changes_it,
     a_relay_joined_for_a_target_is_left_when_idle, an_answer_naming_no_relay_leaves_nothing,
     forty_nodes_as_relays_join_and_die].

init_per_suite(Config) ->
    Bin = macula_ct:relay_bin(),
    Port = macula_ct:free_udp_port(),
    Dir = ?config(priv_dir, Config),
    Relays = [macula_ct:relay_process(Bin, filename:join(Dir, "r" ++ Ip), Ip, Port) || Ip <- ?IPS],
    Srvs = [{?SRV, target(I), Port} || I <- [1, 2, 3]],
    case macula_ct:dns_server(filename:join(Dir, "dns"), zone(lists:sublist(Relays, 3), Relays), Srvs) of
        {skip, _} = Skip ->
            [os:cmd("kill " ++ P) || #{os_pid := P} <- Relays],
            Skip;
        Dns ->
            [{relays, Relays}, {port, Port}, {dns, Dns} | Config]
    end.

end_per_suite(Config) ->
    macula_ct:dns_stop(?config(dns, Config)),
    [os:cmd("kill " ++ P) || #{os_pid := P} <- ?config(relays, Config)],
    ok.

init_per_testcase(_Case, Config) ->
    ok = set_zone(Config, lists:sublist(?config(relays, Config), 3)),
    put(peers, []),
    Config.

end_per_testcase(_Case, _Config) ->
    [macula_ct:stop_peer(P) || P <- get(peers)],
    ok.

%% ---- helpers ----

target(I) -> "r" ++ integer_to_list(I) ++ ".macula.test".

%% The A records of ?NAME (Relays) and of the SRV targets r1..r4 (All,
%% in order: dnsmasq's SRV records are fixed, only ?NAME changes).
zone(Relays, All) ->
    [{?NAME, [inet:ntoa(ip(R)) || R <- Relays]}
     | [{target(I), [inet:ntoa(ip(R))]} || {I, R} <- lists:zip(lists:seq(1, length(All)), All)]].

%% Serves ?NAME as Relays, and waits until dnsmasq answers so.
set_zone(Config, Relays) ->
    ok = macula_ct:dns_zone(?config(dns, Config), zone(Relays, ?config(relays, Config))),
    Want = urls(Relays),
    Port = port(hd(Relays)),
    Served = fun() ->
                     macula_dist_relay_set:resolve({dns, ?NAME, Port}, dns_opts(Config))
                         =:= {ok, Want, 1}
             end,
    case macula_ct:ms_until(Served, 10000) of
        false -> error({dns_not_serving, Want});
        _ -> ok
    end.

dns_opts(Config) ->
    [{nameservers, [{{127, 0, 0, 1}, maps:get(port, ?config(dns, Config))}]}].

ip(#{url := Url}) ->
    [_, Host, _] = string:split(binary_to_list(Url), ":", all),
    {ok, Ip} = inet:parse_address(string:trim(Host, leading, "/")),
    Ip.

port(#{url := Url}) ->
    [_, _, Port] = string:split(binary_to_list(Url), ":", all),
    list_to_integer(Port).

urls(Relays) -> lists:sort([U || #{url := U} <- Relays]).

peers(Config, Names) ->
    peers(Config, Names, "dns://" ?NAME ":" ++ integer_to_list(?config(port, Config)), []).

peers(Config, Names, SetUrl, Extra) ->
    Relays = ?config(relays, Config),
    Info = #{set => true, url => [list_to_binary(SetUrl)],
             fingerprint => [F || #{fingerprint := F} <- Relays]},
    Nameserver = "\"127.0.0.1:" ++ integer_to_list(maps:get(port, ?config(dns, Config))) ++ "\"",
    [begin
         {Peer, Node} = macula_ct:start_peer(Name, Info, ["-macula_dist", "direct", "false",
                                                          "-macula_dist", "relay_set_nameserver",
                                                          Nameserver | Extra]),
         put(peers, [Peer | get(peers)]),
         {Peer, Node}
     end || Name <- Names].

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 120000).

homes(Node, Set) -> homes(Node, Set, 2).

homes(Node, Set, K) ->
    macula_dist_relay_set:homes(atom_to_binary(Node, utf8), Set, K).

%% P holds Set and is on N's homes in it.
on_set(P, N, Set) ->
    call(P, macula_dist_sup, relay_set, []) =:= {Set, 2} andalso homes(N, Set) -- connected(P) =:= [].

connected(P) ->
    [Url || #{relay_url := Url, connection := connected} <- call(P, macula_dist_cluster, status, [])].

watch_name(Node) -> list_to_atom("dns_watch_" ++ atom_to_list(Node)).

on_relays(P, Urls) ->
    lists:sort(Urls) =:= lists:sort(connected(P)).

%% ---- cases ----

%% Both forms resolve to the relays' addresses, sorted, with their TTL;
%% a name DNS does not know is an error; a node started on the SRV name
%% (with one home) joins its home among them.
names_resolve_to_the_set(Config) ->
    Relays = lists:sublist(?config(relays, Config), 3),
    Opts = dns_opts(Config),
    Port = ?config(port, Config),
    ?assertEqual({ok, urls(Relays), 1},
                 macula_dist_relay_set:resolve({dns, ?NAME, Port}, Opts)),
    ?assertEqual({ok, urls(Relays), 1}, macula_dist_relay_set:resolve({srv, ?SRV}, Opts)),
    ?assertMatch({error, {dns, "nobody.macula.test", nxdomain}},
                 macula_dist_relay_set:resolve({dns, "nobody.macula.test", Port}, Opts)),
    [{P, N}] = peers(Config, [dns_srv1], "srv://" ?SRV, ["-macula_dist", "homes", "1"]),
    ?assert(is_integer(macula_ct:ms_until(fun() -> on_relays(P, homes(N, urls(Relays), 1)) end,
                                          10000))),
    ?assertEqual({urls(Relays), 1}, call(P, macula_dist_sup, relay_set, [])).

%% A mesh on the set of three; DNS then swaps the third relay for the
%% fourth. Within a TTL or two every node is on its new homes, with no
%% nodedown and no connection lost; a connection made after runs on a
%% home in the new set; nodes leave the relay that left once it carries
%% nothing.
nodes_follow_the_set_as_dns_changes_it(Config) ->
    All = ?config(relays, Config),
    [_, _, Out, _In] = All,
    Before = urls(lists:sublist(All, 3)),
    After = urls(All -- [Out]),
    Peers = peers(Config, [dns_f1, dns_f2, dns_f3, dns_f4]),
    Nodes = [N || {_, N} <- Peers],
    [?assert(is_integer(macula_ct:ms_until(fun() -> on_relays(P, homes(N, Before)) end, 10000)))
     || {P, N} <- Peers],
    [?assertEqual(lists:sort(Nodes -- [N]), call(P, macula_ct, connect_all, [Nodes]) -- [N])
     || {P, N} <- Peers],
    [ok = call(P, macula_ct, watch, [Other, watch_name(Other)])
     || {P, N} <- Peers, Other <- Nodes, Other > N],
    ok = set_zone(Config, All -- [Out]),
    %% (A node whose homes did not change is on them before it resolved
    %% the name again: it must have the new set too.)
    Joined = fun({P, N}) -> on_set(P, N, After) end,
    ?assert(is_integer(macula_ct:ms_until(fun() -> lists:all(Joined, Peers) end, 15000))),
    ct:pal("homes before ~p~nafter ~p",
           [[{N, homes(N, Before)} || N <- Nodes], [{N, homes(N, After)} || N <- Nodes]]),
    %% Every connection is still there and carries an rpc; no node went
    %% down.
    [?assertEqual(Other, call(P, erpc, call, [Other, erlang, node, []]))
     || {P, N} <- Peers, Other <- Nodes, Other =/= N],
    [?assertEqual(timeout, call(P, macula_ct, watch_result, [{watch_name(Other), 100}]))
     || {P, N} <- Peers, Other <- Nodes, Other > N],
    %% Connections made again run on a home in the new set.
    [{A, AN}, {_, BN} | _] = Peers,
    true = call(A, erlang, disconnect_node, [BN]),
    NoSession = fun() ->
                        macula_ct:session_relay(call(A, macula_dist_cluster, status, []), BN) =:= []
                end,
    ?assert(is_integer(macula_ct:ms_until(NoSession, 10000))),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    [Relay] = macula_ct:session_relay(call(A, macula_dist_cluster, status, []), BN),
    ?assert(lists:member(Relay, homes(AN, After) ++ homes(BN, After))),
    %% The relay that left: once its sessions are gone (each pair on it
    %% connects again, now on the new set), nobody stays on it.
    OutUrl = maps:get(url, Out),
    %% (global, seeing a connection go, may take down others itself.)
    [begin
         _ = call(P, erlang, disconnect_node, [Other]),
         pong = call(P, net_adm, ping, [Other])
     end || {P, N} <- Peers, Other <- Nodes, Other > N,
            macula_ct:session_relay(call(P, macula_dist_cluster, status, []), Other) =:= [OutUrl]],
    Left = fun() -> not lists:any(fun({P, _}) -> lists:member(OutUrl, connected(P)) end, Peers) end,
    ?assert(is_integer(macula_ct:ms_until(Left, 60000))).

%% A node that dials a target with no home in common joins one of the
%% target's homes; once the connection is gone it leaves that relay again.
a_relay_joined_for_a_target_is_left_when_idle(Config) ->
    All = ?config(relays, Config),
    ok = set_zone(Config, All),
    Set = urls(All),
    Names = [list_to_atom("dns_j" ++ integer_to_list(I)) || I <- lists:seq(1, 20)],
    Homes = fun(Name) -> homes(macula_ct:node_name(Name), Set) end,
    [{NameA, NameB} | _] = [{X, Y} || X <- Names, Y <- Names, X < Y,
                                      Homes(X) -- Homes(Y) =:= Homes(X)],
    [{A, _}, {_, BN}] = peers(Config, [NameA, NameB]),
    TheirHomes = Homes(NameB),
    ?assertEqual(TheirHomes, TheirHomes -- connected(A)),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    [Relay] = macula_ct:session_relay(call(A, macula_dist_cluster, status, []), BN),
    ?assert(lists:member(Relay, TheirHomes)),
    ?assert(lists:member(Relay, connected(A))),
    true = call(A, erlang, disconnect_node, [BN]),
    Gone = fun() -> TheirHomes -- connected(A) =:= TheirHomes end,
    ?assert(is_integer(macula_ct:ms_until(Gone, 30000))),
    ?assertEqual([], Homes(NameA) -- connected(A)).

%% Forty nodes on a set of five relays (127.0.0.21-25), a full mesh, and
%% checked traffic between ten pairs while DNS adds a sixth relay (the
%% names whose homes moved join it) and then the relay that carries most
%% nodes is killed (its sessions move inside the set): no nodedown,
%% every message arrives once, in order, intact; the mesh is whole after.
%% Where each node lives is seen from both sides: the nodes identified at
%% the relays (their metrics) are the relay connections the nodes report.
forty_nodes_as_relays_join_and_die(Config) ->
    Port = macula_ct:free_udp_port(),
    Dir = ?config(priv_dir, Config),
    Fleet = [macula_ct:relay_process(macula_ct:relay_bin(), filename:join(Dir, "f" ++ Ip), Ip, Port)
             || I <- lists:seq(21, 26), Ip <- ["127.0.0." ++ integer_to_list(I)]],
    try
        fleet_case(Config, Fleet, Port)
    after
        [os:cmd("kill " ++ P) || #{os_pid := P} <- Fleet]
    end.

fleet_case(Config, Fleet, Port) ->
    {Five, [Sixth]} = lists:split(5, Fleet),
    ok = set_zone(Config, Five),
    Info = #{set => true, url => [iolist_to_binary(["dns://", ?NAME, ":", integer_to_list(Port)])],
             fingerprint => [F || #{fingerprint := F} <- Fleet]},
    Extra = ["-macula_dist", "direct", "false", "-macula_dist", "relay_set_nameserver",
             "\"127.0.0.1:" ++ integer_to_list(maps:get(port, ?config(dns, Config))) ++ "\""],
    T0 = erlang:monotonic_time(millisecond),
    Peers = [begin
                 {P, N} = macula_ct:start_peer(list_to_atom("dnsf" ++ integer_to_list(I)), Info, Extra),
                 put(peers, [P | get(peers)]),
                 {P, N}
             end || I <- lists:seq(1, 40)],
    Nodes = [N || {_, N} <- Peers],
    T1 = erlang:monotonic_time(millisecond),
    [call(P, macula_ct, connect_all, [Nodes]) || {P, _} <- Peers],
    Meshed = fun() -> lists:all(fun({P, N}) -> lists:sort(call(P, erlang, nodes, [])) =:=
                                                   lists:sort(Nodes -- [N]) end, Peers) end,
    ?assert(is_integer(macula_ct:ms_until(Meshed, 60000))),
    ct:pal("40 nodes up in ~b ms, full mesh in ~b ms", [T1 - T0, erlang:monotonic_time(millisecond) - T1]),
    ok = lives_seen_from_both_sides(Peers, Five),
    Pairs = lists:zip(lists:sublist(Peers, 10), lists:sublist(lists:nthtail(20, Peers), 10)),
    Six = urls(Fleet),
    Disturb = fun() ->
                      %% DNS adds the sixth relay: the nodes it is a home of join it.
                      ok = set_zone(Config, Fleet),
                      OnHomes = fun() ->
                                        lists:all(fun({P, N}) -> on_set(P, N, Six) end, Peers)
                                end,
                      ?assert(is_integer(macula_ct:ms_until(OnHomes, 30000))),
                      Moved = [N || {_, N} <- Peers,
                                    lists:member(maps:get(url, Sixth), homes(N, Six))],
                      ct:pal("~b of 40 names have the added relay as a home", [length(Moved)]),
                      ?assert(length(Moved) > 0 andalso length(Moved) < 40),
                      %% The relay most nodes are on dies.
                      {_, Dying} = lists:max([{macula_ct:relay_metric(R, <<"macula_relay_nodes">>), R}
                                              || R <- Five]),
                      _ = os:cmd("kill -9 " ++ maps:get(os_pid, Dying)),
                      Dying
              end,
    Busiest = macula_ct:traffic_while(Pairs, {400, 8 * 1024, 25}, Disturb),
    ?assert(is_integer(macula_ct:ms_until(Meshed, 30000))),
    Alive = Fleet -- [Busiest],
    Dead = maps:get(url, Busiest),
    Gone = fun() -> not lists:any(fun({P, _}) -> lists:member(Dead, connected(P)) end, Peers) end,
    ?assert(is_integer(macula_ct:ms_until(Gone, 30000))),
    ok = lives_seen_from_both_sides(Peers, Alive).

%% The nodes each relay counts are the relay connections the nodes count.
lives_seen_from_both_sides(Peers, Relays) ->
    Same = fun() ->
                   AtRelays = lists:sum([macula_ct:relay_metric(R, <<"macula_relay_nodes">>)
                                         || R <- Relays]),
                   OnNodes = lists:sum([length(connected(P)) || {P, _} <- Peers]),
                   AtRelays =:= OnNodes
           end,
    ?assert(is_integer(macula_ct:ms_until(Same, 20000))),
    ct:pal("relays: ~p", [[{maps:get(url, R), macula_ct:relay_metric(R, <<"macula_relay_nodes">>)}
                            || R <- Relays]]),
    ok.

%% DNS (or whoever answers for it) names an address with no relay: the
%% nodes take the set, cannot join its homes, and leave none of the
%% relays they are on; their connection keeps working past the grace and
%% two idle checks (25 s); a later answer that names relays brings them
%% back to their homes.
an_answer_naming_no_relay_leaves_nothing(Config) ->
    Three = lists:sublist(?config(relays, Config), 3),
    [{A, AN}, {B, BN}] = peers(Config, [dns_n1, dns_n2]),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    Before = connected(A),
    Nowhere = #{url => iolist_to_binary(["quic://127.0.0.99:", integer_to_list(?config(port, Config))])},
    ok = macula_ct:dns_zone(?config(dns, Config), zone([Nowhere], ?config(relays, Config))),
    Taken = fun() -> call(A, macula_dist_sup, relay_set, []) =:= {[maps:get(url, Nowhere)], 2} end,
    ?assert(is_integer(macula_ct:ms_until(Taken, 10000))),
    Pinged = [begin timer:sleep(1000), call(B, net_adm, ping, [AN]) end || _ <- lists:seq(1, 25)],
    ?assertEqual([pong], lists:usort(Pinged)),
    ?assertEqual([], Before -- connected(A)),
    ok = set_zone(Config, Three),
    Home = fun() -> homes(AN, urls(Three)) -- connected(A) =:= [] end,
    ?assert(is_integer(macula_ct:ms_until(Home, 15000))).
