%% Direct paths through real kernel NATs, in network namespaces this suite
%% makes. Each node sits in a LAN namespace behind a NAT namespace of its
%% own (iptables MASQUERADE: port-preserving where it can, a mapping per
%% destination with `--random-fully'; conntrack filters inbound by address
%% and port); the relay is on the "public" side:
%%
%%   mnA  192.168.71.2 --+                         +-- 192.168.72.2  mnB
%%   mnA2 192.168.71.3 --+-- mnNA 10.78.0.1 --pub-- mnNB 10.78.0.2 --+
%%                                    |
%%                              mnR 10.78.0.3 (relay)
%%
%% Traffic on a live connection is numbered and checksummed both ways
%% (macula_ct:checked_both_ways/7); a watcher on A records any nodedown.
%%
%% Skipped, with the reason, where namespaces or NAT cannot be made (not
%% root, no iproute2, no iptables or conntrack).
-module(macula_dist_nat_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2,
         end_per_testcase/2]).
-export([easy_nats_go_direct/1, easy_nats_without_firewall/1, one_hard_nat/1, both_hard_nats_stay_relayed/1,
         same_nat_direct_on_the_lan/1, mapping_changes_mid_transfer/1,
         udp_blocked_between_lans_stays_relayed/1, one_side_loses_its_relay/1,
         mapping_expires_mid_transfer/1]).

-define(PUB, "10.78.0").
-define(LAN_A, "192.168.71").
-define(LAN_B, "192.168.72").
-define(HOSTS, ["mnA", "mnA2", "mnB", "mnNA", "mnNB", "mnR"]).
-define(BRIDGES, ["mnpub", "mnlana", "mnlanb"]).

suite() -> [{timetrap, {minutes, 4}}].

all() ->
    [easy_nats_go_direct, easy_nats_without_firewall, one_hard_nat, both_hard_nats_stay_relayed,
     same_nat_direct_on_the_lan, mapping_changes_mid_transfer, mapping_expires_mid_transfer,
     udp_blocked_between_lans_stays_relayed, one_side_loses_its_relay].

init_per_suite(Config) ->
    macula_ct:namespace_suite(Config, fun setup/0, fun teardown/0, "NATs in network namespaces").

end_per_suite(_Config) ->
    teardown(),
    ok.

init_per_testcase(_Case, Config) ->
    ok = macula_ct:case_started(),
    Config.

end_per_testcase(_Case, _Config) ->
    ok = macula_ct:case_ended(),
    [nat(N, none) || N <- ["mnNA", "mnNB"]],
    [os:cmd("ip netns exec " ++ N ++ " iptables -F " ++ Chain)
     || N <- ["mnNA", "mnNB"], Chain <- ["FORWARD", "INPUT"]],
    ok.

%% ---- the namespaces ----

sh(Cmd) -> macula_ct:sh(Cmd).

all_ok(Cmds) -> macula_ct:all_ok(Cmds).

setup() ->
    Missing = [C || C <- ["ip", "iptables", "conntrack"], os:find_executable(C) =:= false],
    case Missing of
        [] ->
            all_ok(lists:append([["ip link add " ++ Br ++ " type bridge",
                                  "ip link set " ++ Br ++ " up"] || Br <- ?BRIDGES])
                   ++ host("mnR", "mnpub", ?PUB ++ ".3", none)
                   ++ nat_host("mnNA", ?PUB ++ ".1", "mnlana", ?LAN_A ++ ".1")
                   ++ nat_host("mnNB", ?PUB ++ ".2", "mnlanb", ?LAN_B ++ ".1")
                   ++ host("mnA", "mnlana", ?LAN_A ++ ".2", ?LAN_A ++ ".1")
                   ++ host("mnA2", "mnlana", ?LAN_A ++ ".3", ?LAN_A ++ ".1")
                   ++ host("mnB", "mnlanb", ?LAN_B ++ ".2", ?LAN_B ++ ".1"));
        _ ->
            {error, "missing " ++ lists:join(", ", Missing)}
    end.

%% A namespace with one interface, eth0, on Bridge; Gateway its default
%% route (or none: the public side is one subnet).
host(Ns, Bridge, Addr, Gateway) ->
    ["ip netns add " ++ Ns | link(Ns, "eth0", Bridge, Addr)]
        ++ ["ip -n " ++ Ns ++ " link set lo up"]
        ++ [ "ip -n " ++ Ns ++ " route add default via " ++ Gateway || Gateway =/= none].

%% A NAT: pub0 on the public bridge, lan0 on its LAN, forwarding on.
nat_host(Ns, PubAddr, LanBridge, LanAddr) ->
    ["ip netns add " ++ Ns]
        ++ link(Ns, "pub0", "mnpub", PubAddr)
        ++ link(Ns, "lan0", LanBridge, LanAddr)
        ++ ["ip -n " ++ Ns ++ " link set lo up",
            "ip netns exec " ++ Ns ++ " sysctl -qw net.ipv4.ip_forward=1"].

link(Ns, If, Bridge, Addr) ->
    Veth = Ns ++ If,
    ["ip link add " ++ Veth ++ " type veth peer name " ++ If ++ " netns " ++ Ns,
     "ip link set " ++ Veth ++ " master " ++ Bridge,
     "ip link set " ++ Veth ++ " up",
     "ip -n " ++ Ns ++ " addr add " ++ Addr ++ "/24 dev " ++ If,
     "ip -n " ++ Ns ++ " link set " ++ If ++ " up"].

teardown() ->
    [os:cmd("ip netns del " ++ Ns ++ " 2>/dev/null") || Ns <- ?HOSTS],
    [os:cmd("ip link del " ++ Br ++ " 2>/dev/null") || Br <- ?BRIDGES],
    ok.

%% The NAT in namespace Ns: `easy' (port-preserving MASQUERADE: one mapping
%% for every destination), `hard' (`--random-fully': a mapping per
%% destination), or `none'; as a home gateway, it drops what comes in
%% unasked (its own INPUT chain), unless `open' (`{easy, open}'). Its
%% connection tracking is flushed.
%%
%% Why the firewall matters: conntrack keeps an entry for an unasked
%% packet the gateway accepts (to answer "port unreachable"), so a probe
%% that reaches a NAT before its node's own first probe went out takes the
%% port that node's mapping wanted, and the NAT maps the node to another
%% port, which the peer never learns. A gateway that drops such packets
%% keeps no entry for them.
nat(Ns, Kind) ->
    os:cmd("ip netns exec " ++ Ns ++ " iptables -t nat -F POSTROUTING"),
    os:cmd("ip netns exec " ++ Ns ++ " iptables -F INPUT"),
    {Mapping, Firewall} = case Kind of
                              {K, open} -> {K, open};
                              K -> {K, closed}
                          end,
    Rule = case Mapping of
               easy -> " -j MASQUERADE";
               hard -> " -j MASQUERADE --random-fully";
               none -> none
           end,
    Rule =/= none andalso
        (ok = sh("ip netns exec " ++ Ns ++ " iptables -t nat -A POSTROUTING -o pub0" ++ Rule)),
    Rule =/= none andalso Firewall =:= closed andalso
        (ok = sh("ip netns exec " ++ Ns ++ " iptables -A INPUT -i pub0 -m conntrack "
                 "--ctstate NEW -j DROP")),
    flush_mappings(Ns).

%% Every NAT mapping of Ns is forgotten: the next packet out gets a new one.
flush_mappings(Ns) ->
    os:cmd("ip netns exec " ++ Ns ++ " conntrack -F"),
    ok.

%% ---- relay, peers ----

start_relay(Config) -> start_relay(Config, 4434).

start_relay(Config, Port) ->
    Dir = filename:join(?config(priv_dir, Config), "relay" ++ integer_to_list(Port)),
    macula_ct:netns_relay(?config(relay_bin, Config), "mnR", {?PUB ++ ".3", Port}, Dir, "").

peer(Name, Ns, Relay) ->
    macula_ct:netns_peer(Name, Ns, Relay).

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 120000).

%% The path of P's session with Peer: relay, {direct, Address}, or none.
path(P, Peer) ->
    macula_ct:session_path(call(P, macula_dist_cluster, status, []), Peer).

%% Direct, to an address that starts with Prefix.
direct_to(P, Peer, Prefix) ->
    case path(P, Peer) of
        {direct, Addr} -> lists:prefix(Prefix, binary_to_list(Addr));
        _ -> false
    end.


%% A pair behind the NATs as given, connected, with a nodedown watcher on
%% A; the ms from the session getting busy (see macula_ct:make_busy/2) to a direct
%% path both ways (through addresses starting with PrefixB and PrefixA), or
%% `false' after Limit.
pair(Config, {NsA, NatA}, {NsB, NatB}, Prefixes, Limit) ->
    nat("mnNA", NatA),
    nat("mnNB", NatB),
    Relay = start_relay(Config),
    {A, AN} = peer(list_to_atom(string:lowercase(NsA) ++ "_n"), NsA, Relay),
    {B, BN} = peer(list_to_atom(string:lowercase(NsB) ++ "_n"), NsB, Relay),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ok = macula_ct:make_busy(A, BN),
    T0 = erlang:monotonic_time(millisecond),
    {PrefixB, PrefixA} = Prefixes,
    Ms = macula_ct:ms_until(fun() -> direct_to(A, BN, PrefixB) andalso direct_to(B, AN, PrefixA) end,
                  Limit, T0),
    ok = call(A, macula_ct, watch, [BN, macula_nat_watch]),
    Ms =:= false andalso
        ct:pal("not direct after ~b ms:~nA ~p~nB ~p~nmnNA conntrack:~n~ts~nmnNB conntrack:~n~ts",
               [Limit, call(A, macula_dist_cluster, status, []),
                call(B, macula_dist_cluster, status, []),
                os:cmd("ip netns exec mnNA conntrack -L -p udp 2>&1"),
                os:cmd("ip netns exec mnNB conntrack -L -p udp 2>&1")]),
    {{A, AN}, {B, BN}, Ms}.

%% Checked traffic both ways arrives whole, and A saw no nodedown.
traffic_intact({A, AN}, {B, BN}, Count, Size, PauseMs) ->
    Results = macula_ct:checked_both_ways(A, AN, B, BN, Count, Size, PauseMs),
    [?assertMatch({ok, Count, _, _}, R) || R <- Results],
    ?assertEqual(timeout, call(A, macula_ct, watch_result, [{macula_nat_watch, 100}])),
    ?assertEqual([BN], call(A, erlang, nodes, [])).

%% traffic_intact/5 of Count 16 KiB messages each way, 20 ms apart; 1.5 s
%% in, Disturb() runs. ok, or what failed.
traffic_intact_while(A, B, Count, Disturb) ->
    Self = self(),
    spawn_link(fun() ->
                       Result = try traffic_intact(A, B, Count, 16 * 1024, 20)
                                catch Class:Reason -> {Class, Reason}
                                end,
                       Self ! {traffic, Result}
               end),
    timer:sleep(1500),
    Disturb(),
    receive {traffic, R} -> R after 180000 -> error(no_traffic_result) end.

%% ---- cases ----

%% Both behind port-preserving NATs: each side's mapping to the relay is
%% also its mapping to the peer, so the probes meet and the session goes
%% direct, to the other NAT's public address.
easy_nats_go_direct(Config) ->
    {A, B, Ms} = pair(Config, {"mnA", easy}, {"mnB", easy}, {?PUB ++ ".2:", ?PUB ++ ".1:"}, 15000),
    ct:pal("easy NAT to easy NAT: direct both ways ~p ms after the session got busy", [Ms]),
    ?assert(is_integer(Ms)),
    traffic_intact(A, B, 100, 32 * 1024, 0).

%% The same NATs without an input firewall (a Linux box doing MASQUERADE
%% and nothing else): probes that cross take each other's ports (see
%% nat/2), so whether the path forms depends on who probes first. What
%% this gives is logged; the session works either way.
easy_nats_without_firewall(Config) ->
    {{Pa, _} = A, {_, BN} = B, Ms} = pair(Config, {"mnA", {easy, open}}, {"mnB", {easy, open}},
                                          {?PUB ++ ".2:", ?PUB ++ ".1:"}, 15000),
    ct:pal("easy NATs without a firewall: ~ts (path from A: ~p)",
           [case Ms of false -> "stayed on the relay"; _ -> io_lib:format("direct after ~b ms", [Ms]) end,
            path(Pa, BN)]),
    traffic_intact(A, B, 100, 32 * 1024, 0).

%% A behind a NAT that maps each destination apart: A's address as the
%% relay sees it is not the one B's probes would need, and B's NAT lets
%% in only what answers B's own traffic. What this gives is logged; the
%% session works either way.
one_hard_nat(Config) ->
    {A, {_, BN} = B, Ms} = pair(Config, {"mnA", hard}, {"mnB", easy},
                               {?PUB ++ ".2:", ?PUB ++ ".1:"}, 15000),
    {Pa, _} = A,
    ct:pal("hard NAT to easy NAT: ~ts (path from A: ~p)",
           [case Ms of false -> "stayed on the relay"; _ -> io_lib:format("direct after ~b ms", [Ms]) end,
            path(Pa, BN)]),
    traffic_intact(A, B, 100, 32 * 1024, 0).

%% Both NATs map per destination: no pair of candidates meets; the session
%% stays on the relay, its traffic undisturbed.
both_hard_nats_stay_relayed(Config) ->
    {{Pa, _} = A, {Pb, BN} = B, Ms} = pair(Config, {"mnA", hard}, {"mnB", hard},
                                           {?PUB ++ ".2:", ?PUB ++ ".1:"}, 8000),
    ?assertEqual(false, Ms),
    traffic_intact(A, B, 100, 32 * 1024, 0),
    ?assertEqual(relay, path(Pa, BN)),
    {_, AN} = A,
    ?assertEqual(relay, path(Pb, AN)).

%% Two nodes behind the same NAT go direct on their LAN addresses (no
%% hairpin through the NAT needed).
same_nat_direct_on_the_lan(Config) ->
    {A, B, Ms} = pair(Config, {"mnA", easy}, {"mnA2", easy},
                      {?LAN_A ++ ".3:", ?LAN_A ++ ".2:"}, 15000),
    ct:pal("same NAT: direct on the LAN ~p ms after the session got busy", [Ms]),
    ?assert(is_integer(Ms)),
    traffic_intact(A, B, 100, 32 * 1024, 0).

%% Direct through easy NATs, then A's NAT forgets its mappings and takes
%% new ports (its rule becomes `--random-fully') in the middle of checked
%% traffic: the session carries on (at the relay, then direct again when
%% the probes find the new mapping), no nodedown, nothing lost.
mapping_changes_mid_transfer(Config) ->
    {{Pa, _} = A, {_, BN} = B, Ms} = pair(Config, {"mnA", easy}, {"mnB", easy},
                                          {?PUB ++ ".2:", ?PUB ++ ".1:"}, 15000),
    ?assert(is_integer(Ms)),
    Before = path(Pa, BN),
    ?assertEqual(ok, traffic_intact_while(A, B, 300, fun() -> nat("mnNA", hard) end)),
    ct:pal("A's NAT changed its mappings mid-transfer: path before ~p, after ~p",
           [Before, path(Pa, BN)]).

%% Direct through easy NATs, then both NATs forget every mapping (conntrack
%% flushed, as when mappings time out) in the middle of checked traffic,
%% twice: the session carries on, no nodedown, nothing lost, and is direct
%% again afterwards (the NATs, still port-preserving, map it anew).
mapping_expires_mid_transfer(Config) ->
    {{Pa, _} = A, {Pb, BN} = B, Ms} = pair(Config, {"mnA", easy}, {"mnB", easy},
                                           {?PUB ++ ".2:", ?PUB ++ ".1:"}, 15000),
    ?assert(is_integer(Ms)),
    Flush = fun() -> flush_mappings("mnNA"), flush_mappings("mnNB") end,
    ?assertEqual(ok, traffic_intact_while(A, B, 300, fun() -> Flush(), timer:sleep(1500), Flush() end)),
    {_, AN} = A,
    Again = macula_ct:ms_until(fun() -> direct_to(Pa, BN, ?PUB ++ ".2:") andalso
                                  direct_to(Pb, AN, ?PUB ++ ".1:") end, 30000),
    ct:pal("mappings flushed twice mid-transfer: direct again ~p ms after the traffic ended",
           [Again]),
    ?assert(is_integer(Again)).

%% UDP between the two NATs is dropped (each may reach the relay): the
%% session stays on the relay, its traffic undisturbed.
udp_blocked_between_lans_stays_relayed(Config) ->
    ok = sh("ip netns exec mnNA iptables -A FORWARD -p udp -d " ?PUB ".2 -j DROP"),
    ok = sh("ip netns exec mnNB iptables -A FORWARD -p udp -d " ?PUB ".1 -j DROP"),
    {{Pa, _} = A, {_, BN} = B, Ms} = pair(Config, {"mnA", easy}, {"mnB", easy},
                                          {?PUB ++ ".2:", ?PUB ++ ".1:"}, 5000),
    ?assertEqual(false, Ms),
    traffic_intact(A, B, 100, 32 * 1024, 0),
    ?assertEqual(relay, path(Pa, BN)).

%% Both nodes on the same two relays, their session relayed (UDP between
%% the LANs is blocked) through relay 1. In the middle of checked traffic
%% A's NAT drops everything to and from relay 1: A loses it, B does not.
%% Relay 1 cannot tell a dead A from a cut-off one; A claims the session
%% at relay 2, which tells B, and B moves it there too: no nodedown,
%% nothing lost, and B is still on relay 1 afterwards.
one_side_loses_its_relay(Config) ->
    ok = sh("ip netns exec mnNA iptables -A FORWARD -p udp -d " ?PUB ".2 -j DROP"),
    ok = sh("ip netns exec mnNB iptables -A FORWARD -p udp -d " ?PUB ".1 -j DROP"),
    nat("mnNA", easy),
    nat("mnNB", easy),
    #{url := Url1} = R1 = start_relay(Config, 4434),
    #{url := Url2} = R2 = start_relay(Config, 4435),
    Both = #{url => [Url1, Url2], fingerprint => [maps:get(fingerprint, R) || R <- [R1, R2]]},
    {A, AN} = peer(mna_lost, "mnA", Both),
    {B, BN} = peer(mnb_lost, "mnB", Both),
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ?assertEqual([Url1], relay_of(A, BN)),
    ?assertEqual([Url1], relay_of(B, AN)),
    ok = call(A, macula_ct, watch, [BN, macula_nat_watch]),
    Cut = fun() ->
                  T0 = erlang:monotonic_time(millisecond),
                  [ok = sh("ip netns exec mnNA iptables -I FORWARD -p udp " ++ Match ++ " -j DROP")
                   || Match <- ["-d " ?PUB ".3 --dport 4434", "-s " ?PUB ".3 --sport 4434"]],
                  ?assertEqual(BN, call(A, erpc, call, [BN, erlang, node, [], 30000])),
                  put(stall, erlang:monotonic_time(millisecond) - T0)
          end,
    Result = traffic_intact_while({A, AN}, {B, BN}, 500, Cut),
    ct:pal("A lost relay 1, B did not: first call answered ~b ms after the cut", [get(stall)]),
    ?assertEqual(ok, Result),
    ?assertEqual([Url2], relay_of(A, BN)),
    ?assertEqual([Url2], relay_of(B, AN)),
    ?assertMatch([#{relay_url := Url1, connection := connected} | _],
                 call(B, macula_dist_cluster, status, [])).

%% The relay (its URL) whose client carries P's session with Peer.
relay_of(P, Peer) -> macula_ct:session_relay(call(P, macula_dist_cluster, status, []), Peer).
