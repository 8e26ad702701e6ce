%% Direct paths, in network namespaces this suite makes: nodes A and B and
%% a relay R, each in its own namespace on one bridge (10.77.0.0/24). The
%% route between A and B is opened or cut per case with blackhole routes
%% (this machine has no iptables or nft). Traffic on a live connection is
%% numbered and checksummed (macula_ct:checked_send/5).
%%
%% Skipped, with the reason, where namespaces cannot be made (not root, no
%% iproute2).
-module(macula_dist_direct_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2,
         end_per_testcase/2]).
-export([direct_reachable/1, direct_blocked/1, direct_cut_mid_transfer/1]).

-define(NET, "10.77.0").
-define(A, "mdA").
-define(B, "mdB").
-define(R, "mdR").
-define(BRIDGE, "mdbr0").

suite() -> [{timetrap, {minutes, 3}}].

all() ->
    [direct_reachable, direct_blocked, direct_cut_mid_transfer].

init_per_suite(Config) ->
    macula_ct:namespace_suite(Config, fun setup/0, fun teardown/0, "network namespaces").

end_per_suite(_Config) ->
    teardown(),
    ok.

init_per_testcase(_Case, Config) ->
    ok = macula_ct:case_started(),
    open_route(),
    Config.

end_per_testcase(_Case, _Config) ->
    ok = macula_ct:case_ended(),
    open_route(),
    ok.

%% ---- the namespaces ----

ns_addr(?A) -> ?NET ++ ".1";
ns_addr(?B) -> ?NET ++ ".2";
ns_addr(?R) -> ?NET ++ ".3".

sh(Cmd) -> macula_ct:sh(Cmd).

all_ok(Cmds) -> macula_ct:all_ok(Cmds).

setup() ->
    case os:find_executable("ip") of
        false -> {error, "no ip command (iproute2)"};
        _ ->
            Bridge = ["ip link add " ?BRIDGE " type bridge",
                      "ip addr add " ?NET ".254/24 dev " ?BRIDGE,
                      "ip link set " ?BRIDGE " up"],
            Hosts = lists:append([host(Ns) || Ns <- [?A, ?B, ?R]]),
            case all_ok(Bridge ++ Hosts) of
                ok -> ok;
                {error, Why} -> {error, Why}
            end
    end.

host(Ns) ->
    Veth = Ns ++ "h",
    ["ip netns add " ++ Ns,
     "ip link add " ++ Veth ++ " type veth peer name eth0 netns " ++ Ns,
     "ip link set " ++ Veth ++ " master " ?BRIDGE,
     "ip link set " ++ Veth ++ " up",
     "ip -n " ++ Ns ++ " addr add " ++ ns_addr(Ns) ++ "/24 dev eth0",
     "ip -n " ++ Ns ++ " link set eth0 up",
     "ip -n " ++ Ns ++ " link set lo up"].

teardown() ->
    [os:cmd("ip netns del " ++ Ns ++ " 2>/dev/null") || Ns <- [?A, ?B, ?R]],
    os:cmd("ip link del " ?BRIDGE " 2>/dev/null"),
    ok.

%% A and B reach each other (the default) or not: a blackhole route each way.
cut_route() ->
    ok = sh("ip -n " ?A " route add blackhole " ++ ns_addr(?B) ++ "/32"),
    ok = sh("ip -n " ?B " route add blackhole " ++ ns_addr(?A) ++ "/32").

open_route() ->
    os:cmd("ip -n " ?A " route del blackhole " ++ ns_addr(?B) ++ "/32 2>/dev/null"),
    os:cmd("ip -n " ?B " route del blackhole " ++ ns_addr(?A) ++ "/32 2>/dev/null"),
    ok.

%% ---- relay, peers, metrics ----

start_relay(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "relay"),
    Addr = ns_addr(?R),
    macula_ct:netns_relay(?config(relay_bin, Config), ?R, {Addr, 4434}, Dir,
                          "--metrics " ++ Addr ++ ":9434").

%% A BEAM node inside namespace Ns.
peer(Name, Ns, Relay) ->
    macula_ct:netns_peer(Name, Ns, Relay).

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 120000).

%% The relay's count of session datagrams it forwarded.
forwarded() ->
    {ok, S} = gen_tcp:connect(ns_addr_tuple(?R), 9434, [binary, {active, false}], 5000),
    ok = gen_tcp:send(S, "GET /metrics HTTP/1.0\r\n\r\n"),
    Body = recv_all(S, <<>>),
    {match, [N]} = re:run(Body, "^macula_relay_forwarded_datagrams_total ([0-9]+)",
                          [multiline, {capture, all_but_first, binary}]),
    binary_to_integer(N).

ns_addr_tuple(Ns) ->
    {ok, Ip} = inet:parse_address(ns_addr(Ns)),
    Ip.

recv_all(S, Acc) ->
    case gen_tcp:recv(S, 0, 5000) of
        {ok, Data} -> recv_all(S, <<Acc/binary, Data/binary>>);
        {error, closed} -> Acc
    end.

%% The path of P's session with Peer: relay, or {direct, Address}.
path(P, Peer) ->
    macula_ct:session_path(call(P, macula_dist_cluster, status, []), Peer).

is_direct(P, Peer, Ns) ->
    Want = list_to_binary(ns_addr(Ns) ++ ":"),
    case path(P, Peer) of
        {direct, Addr} -> binary:longest_common_prefix([Addr, Want]) =:= byte_size(Want);
        _ -> false
    end.


connected_pair(Config) ->
    Relay = start_relay(Config),
    {A, AN} = peer(pa, ?A, Relay),
    {B, BN} = peer(pb, ?B, Relay),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ok = macula_ct:make_busy(A, BN),
    {{A, AN}, {B, BN}}.

checked(A, AN, B, BN, Count, Size, PauseMs) ->
    macula_ct:checked_both_ways(A, AN, B, BN, Count, Size, PauseMs).

%% ---- cases ----

%% A and B reach each other: their session goes direct once busy (the
%% time from then is logged; the issue's mark is 2 s), and the relay forwards
%% none of the checked traffic that follows.
direct_reachable(Config) ->
    {{A, AN}, {B, BN}} = connected_pair(Config),
    Ms = macula_ct:ms_until(fun() -> is_direct(A, BN, ?B) andalso is_direct(B, AN, ?A) end, 10000),
    ct:pal("direct path in namespaces: both sides direct ~p ms after the session got busy", [Ms]),
    ?assert(is_integer(Ms)),
    Before = forwarded(),
    Results = checked(A, AN, B, BN, 200, 64 * 1024, 0),
    After = forwarded(),
    ct:pal("relay forwarded ~b session datagrams during 2 x 12.5 MiB of direct traffic",
           [After - Before]),
    [?assertMatch({ok, 200, _, _}, R) || R <- Results],
    ?assert(After - Before =< 4),
    ?assert(is_direct(A, BN, ?B)).

%% No route between A and B: the session stays on the relay, its traffic
%% undisturbed.
direct_blocked(Config) ->
    cut_route(),
    {{A, AN}, {B, BN}} = connected_pair(Config),
    Before = forwarded(),
    Results = checked(A, AN, B, BN, 200, 64 * 1024, 0),
    [?assertMatch({ok, 200, _, _}, R) || R <- Results],
    ?assert(forwarded() - Before > 1000),
    ?assertEqual(relay, path(A, BN)),
    ?assertEqual(relay, path(B, AN)).

%% The direct route is cut in the middle of checked traffic both ways:
%% the session falls back to the relay (the time is logged), everything
%% arrives once, in order, intact, with no nodedown; once the route is
%% back, the session goes direct again.
direct_cut_mid_transfer(Config) ->
    {{A, AN}, {B, BN}} = connected_pair(Config),
    ?assert(is_integer(macula_ct:ms_until(fun() -> is_direct(A, BN, ?B) end, 10000))),
    ok = call(A, macula_ct, watch, [BN, macula_cut_watch]),
    Self = self(),
    %% About 8 s of traffic: 400 messages of 16 KiB each way, 20 ms apart.
    Traffic = spawn_link(fun() -> Self ! {traffic, checked(A, AN, B, BN, 400, 16 * 1024, 20)} end),
    timer:sleep(1500),
    cut_route(),
    Fallback = macula_ct:ms_until(fun() -> path(A, BN) =:= relay andalso path(B, AN) =:= relay end, 10000),
    ct:pal("direct route cut: both sides back on the relay after ~p ms", [Fallback]),
    ?assert(is_integer(Fallback)),
    Results = receive {traffic, R} -> R after 90000 -> error({no_traffic_result, Traffic}) end,
    [?assertMatch({ok, 400, _, _}, R) || R <- Results],
    ?assertEqual(timeout, call(A, macula_ct, watch_result, [{macula_cut_watch, 100}])),
    open_route(),
    Again = macula_ct:ms_until(fun() -> is_direct(A, BN, ?B) andalso is_direct(B, AN, ?A) end, 20000),
    ct:pal("route restored: direct again after ~p ms", [Again]),
    ?assert(is_integer(Again)),
    ?assertEqual([BN], call(A, erlang, nodes, [])).
