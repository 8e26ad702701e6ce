%% Attacks on a node through the relay, replayed against real peers:
%% a peer without the cookie must not make the target create atoms (or run
%% dist_util at all), and a peer must not claim another node's name in the
%% distribution handshake.
-module(macula_dist_security_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([sessions_without_the_cookie_make_no_atoms/1, handshake_name_must_be_the_peers/1,
         relay_without_e2e_is_refused/1, inbound_stream_tunnel_is_refused/1,
         stream_tunnel_to_an_e2e_node_is_refused/1, relay_names_make_no_atoms/1,
         relay_never_sees_a_cookie_derived_key/1, session_flood_is_bounded/1]).

suite() -> [{timetrap, {minutes, 5}}].

all() ->
    [{group, e2e}, {group, stream}, {group, hostile_relay}].

groups() ->
    [{e2e, [], [sessions_without_the_cookie_make_no_atoms, handshake_name_must_be_the_peers,
                stream_tunnel_to_an_e2e_node_is_refused, relay_names_make_no_atoms,
                relay_never_sees_a_cookie_derived_key]},
     {stream, [], [handshake_name_must_be_the_peers]},
     {hostile_relay, [], [relay_without_e2e_is_refused, inbound_stream_tunnel_is_refused,
                          session_flood_is_bounded]}].

init_per_suite(Config) ->
    {Relay, Info} = macula_ct:start_relay(),
    Root = filename:absname(filename:join(code:lib_dir(macula_dist), "../../../..")),
    [{relay, Relay}, {info, Info}, {root, Root} | Config].

end_per_suite(Config) ->
    macula_dist_relay:stop(?config(relay, Config)).

init_per_group(hostile_relay, Config) ->
    %% The fake relay runs on aioquic, in the interop suite's venv.
    Out = os:cmd("bash '" ++ ?config(root, Config) ++ "/test/interop/python.sh' 2>&1"),
    Python = lists:last(string:lexemes(Out, "\n")),
    ?assert(filelib:is_regular(Python), Out),
    [{python, Python} | Config];
init_per_group(Mode, Config) ->
    Info = ?config(info, Config),
    {Peer, Node} = macula_ct:start_peer(list_to_atom("target_" ++ atom_to_list(Mode)),
                                        Info#{tunnel => Mode}, []),
    [{mode, Mode}, {target, {Peer, Node}} | Config].

end_per_group(hostile_relay, _Config) ->
    ok;
end_per_group(_Mode, Config) ->
    {Peer, _} = ?config(target, Config),
    macula_ct:stop_peer(Peer).

%% 10 clients that do not know the cookie open 100 e2e sessions each to the
%% target. Every session fails in its PAKE (the confirmation needs the
%% cookie), so no byte of it reaches Erlang: the target's atom table does not grow and
%% macula_dist:do_accept/5, which runs dist_util, is never called.
sessions_without_the_cookie_make_no_atoms(Config) ->
    {Peer, Target} = ?config(target, Config),
    #{url := Url, fingerprint := Pin} = ?config(info, Config),
    TargetBin = atom_to_binary(Target),
    call(Peer, erlang, trace_pattern, [{macula_dist, do_accept, 5}, true, [call_count]]),
    Self = self(),
    %% A first refused session loads what refusing needs (the logger's
    %% formatting, say): its atoms are made once, not per session.
    %% (Measured: one refusal or two add 50 atoms at once, then none.)
    {ok, Warm} = macula_ct:raw_client(Url, Pin, <<"intruder0@h">>),
    [{error, _} = macula_ct:request(Warm, TargetBin, <<"not the cookie">>) || _ <- lists:seq(1, 10)],
    macula_dist_nif:client_stop(Warm),
    timer:sleep(1000),
    Before = call(Peer, erlang, system_info, [atom_count]),
    Attackers = [spawn_link(fun() ->
                                    Name = iolist_to_binary(["intruder", integer_to_list(I), "@h"]),
                                    {ok, C} = macula_ct:raw_client(Url, Pin, Name),
                                    Results = [macula_ct:request(C, TargetBin, <<"not the cookie">>)
                                               || _ <- lists:seq(1, 100)],
                                    Self ! {self(), Results, C}
                            end)
                 || I <- lists:seq(1, 10)],
    %% The attackers' clients stay up until the target counted every
    %% refusal: a client stopped at once can cut its last session before
    %% the target's PAKE ends, which the target then sees as a lost session.
    {PerAttacker, Clients} =
        lists:unzip([receive {A, R, C} -> {R, C} after 120000 -> error(attacker_hung) end
                     || A <- Attackers]),
    Results = lists:append(PerAttacker),
    ?assertEqual(1000, length(Results)),
    ?assertEqual([{error, {tunnel_error, e2e_handshake_failed}}], lists:usort(Results)),
    After = call(Peer, erlang, system_info, [atom_count]),
    ct:pal("target atoms: ~p before, ~p after 1000 sessions without the cookie", [Before, After]),
    ?assert(After - Before =< 5),
    ?assertEqual({call_count, 0},
                 call(Peer, erlang, trace_info, [{macula_dist, do_accept, 5}, call_count])),
    %% Each was refused by the target's NIF (some only when the
    %% requester's abort reaches it, so wait for the count).
    Client = call(Peer, erlang, whereis, [macula_dist_relay_client]),
    Refused = fun() ->
                      #{refused_sessions := N} = call(Peer, macula_dist_relay_client, status, [Client]),
                      N
              end,
    wait_until(fun() -> Refused() >= 1010 end, 600),
    ct:pal("refused_sessions on the target: ~p", [Refused()]),
    ?assert(Refused() >= 1010),
    [macula_dist_nif:client_stop(C) || C <- Clients],
    ?assertEqual([], call(Peer, erlang, nodes, [connected])).

%% A client that knows the cookie opens a tunnel to the target and sends a
%% handshake in the name of another node: the target closes the tunnel
%% before dist_util sees the name (no atom for it), while the same client
%% under its own name gets dist_util's answer.
handshake_name_must_be_the_peers(Config) ->
    {Peer, Target} = ?config(target, Config),
    #{url := Url, fingerprint := Pin} = ?config(info, Config),
    Opts = case ?config(mode, Config) of stream -> #{tunnel => stream}; e2e -> #{} end,
    {ok, C} = macula_ct:raw_client(Url, Pin, <<"liar@h">>, Opts),
    Victim = <<"victim_", (integer_to_binary(erlang:unique_integer([positive])))/binary, "@h">>,
    ?assertEqual(closed, send_name(C, Target, Victim)),
    ?assertError(badarg, call(Peer, erlang, binary_to_existing_atom, [Victim])),
    ?assertMatch({reply, <<"s", _/binary>>}, send_name(C, Target, <<"liar@h">>)),
    macula_dist_nif:client_stop(C).

%% Opens a tunnel and sends a distribution send_name ('N') claiming Name;
%% returns the target's first reply packet, or `closed'.
send_name(Client, Target, Name) ->
    {ok, _, T} = macula_ct:request(Client, atom_to_binary(Target)),
    ok = macula_dist_nif:tunnel_set_packet(T, 2),
    ok = macula_dist_nif:tunnel_activate(T, 1),
    Flags = 16#1ffffff,
    Packet = <<$N, Flags:64, 1:32, (byte_size(Name)):16, Name/binary>>,
    ok = macula_dist_nif:tunnel_send(T, [<<(byte_size(Packet)):16>>, Packet], 1),
    receive
        {macula_tunnel, T, {data, [Reply]}} -> macula_dist_nif:tunnel_close(T), {reply, Reply};
        {macula_tunnel, T, closed} -> closed
    after 10000 -> error(no_answer)
    end.

%% Issue: a relay answered id_ok without `v' (a v1-only relay), and nodes
%% fell back to stream tunnels it can read and write. A node in e2e mode
%% (the default) now refuses such a relay at boot, naming it.
relay_without_e2e_is_refused(Config) ->
    {Url, Pin, Events} = fake_relay(Config, "v1"),
    Args = macula_ct:peer_args(#{url => Url, fingerprint => Pin}, []),
    Cmd = "timeout 60 " ++ os:find_executable("erl") ++ " -noshell -sname fakev1 "
        ++ lists:join(" ", ["'" ++ A ++ "'" || A <- Args]) ++ " -eval 'halt(0)' 2>&1; echo exit=$?",
    Out = os:cmd(lists:flatten(Cmd)),
    ct:log("~ts", [Out]),
    %% The boot error names the reason and the relay.
    ?assertNotEqual(nomatch, string:find(Out, "relay_without_e2e")),
    ?assertNotEqual(nomatch, string:find(Out, binary_to_list(Url))),
    ?assertEqual(nomatch, string:find(Out, "exit=0")),
    %% It did reach the fake relay, and left it.
    ?assertMatch([_ | _], events(Events, "identified fakev1@")).

%% Issue: a relay announced an inbound stream tunnel to an e2e node and
%% sent a distribution handshake on it; the node ran dist_util on it (and,
%% with a cookie-less relay splicing two nodes, ran the rpc it injected).
%% Now the node refuses the tunnel (tun_close) without reading its
%% stream: no answer on it, no atom of the claimed name, no do_accept.
inbound_stream_tunnel_is_refused(Config) ->
    {Url, Pin, Events} = fake_relay(Config, "inject"),
    {Peer, _} = macula_ct:start_peer(fakeinject, #{url => Url, fingerprint => Pin}, []),
    call(Peer, erlang, trace_pattern, [{macula_dist, do_accept, 5}, true, [call_count]]),
    [Injected] = wait_events(Events, "injected ", 100),
    Tid = lists:nthtail(length("injected "), Injected),
    ?assertMatch([_], wait_events(Events, "tun_close " ++ Tid, 100)),
    timer:sleep(1000),
    ?assertEqual([], events(Events, "stream_data")),
    ?assertEqual({call_count, 0},
                 call(Peer, erlang, trace_info, [{macula_dist, do_accept, 5}, call_count])),
    ?assertError(badarg, call(Peer, erlang, binary_to_existing_atom, [<<"mallory@h">>])),
    ?assertEqual([], call(Peer, erlang, nodes, [connected])),
    macula_ct:stop_peer(Peer).

%% A node in stream mode (which trusts its relay) dials an e2e node: the
%% real relay offers the target a stream tunnel, which it refuses; the
%% dialler gets an error and the target never runs dist_util.
stream_tunnel_to_an_e2e_node_is_refused(Config) ->
    {Peer, Target} = ?config(target, Config),
    #{url := Url, fingerprint := Pin} = ?config(info, Config),
    call(Peer, erlang, trace_pattern, [{macula_dist, do_accept, 5}, true, [call_count]]),
    {ok, C} = macula_ct:raw_client(Url, Pin, <<"streamer@h">>, #{tunnel => stream}),
    %% The relay may hand the dialler its half first; the target's refusal
    %% then closes it, and nothing comes back.
    case macula_ct:request(C, atom_to_binary(Target)) of
        {error, _} -> ok;
        {ok, _, T} ->
            ok = macula_dist_nif:tunnel_activate(T, 1),
            _ = macula_dist_nif:tunnel_send(T, [<<"any bytes">>], 1),
            receive
                {macula_tunnel, T, closed} -> ok;
                {macula_tunnel, T, {data, D}} -> error({answered, D})
            after 10000 -> error(not_closed)
            end
    end,
    macula_dist_nif:client_stop(C),
    ?assertEqual({call_count, 0},
                 call(Peer, erlang, trace_info, [{macula_dist, do_accept, 5}, call_count])),
    ?assertError(badarg, call(Peer, erlang, binary_to_existing_atom, [<<"streamer@h">>])).

%% Issue: relay_nodes/0 and autoconnect made an atom of every name the
%% relay listed. 1000 made-up names on the relay: relay_nodes/0 makes
%% none, autoconnect (running on a node of its own) a bounded few.
relay_names_make_no_atoms(Config) ->
    {Peer, _Target} = ?config(target, Config),
    Info = ?config(info, Config),
    #{url := Url, fingerprint := Pin} = Info,
    {Auto, _} = macula_ct:start_peer(autoatoms, Info, ["-macula_dist", "autoconnect", "true"]),
    %% Warm: a first made-up name, tried and refused, loads what failing
    %% needs (its modules' atoms are made once, not per name).
    {ok, W} = macula_ct:raw_client(Url, Pin, <<"warmup@h">>),
    timer:sleep(3000),
    macula_dist_nif:client_stop(W),
    Names = [iolist_to_binary(["fresh", integer_to_list(I), "x", integer_to_list(erlang:unique_integer([positive])), "@h"])
             || I <- lists:seq(1, 1000)],
    Before = call(Peer, erlang, system_info, [atom_count]),
    AutoBefore = call(Auto, erlang, system_info, [atom_count]),
    Clients = [begin {ok, C} = macula_ct:raw_client(Url, Pin, N), C end || N <- Names],
    Listed = call(Peer, macula_dist_cluster, relay_nodes, []),
    ?assert(length([N || N <- Names, lists:member(N, Listed)]) >= 1000),
    ?assert(lists:all(fun is_binary/1, [L || L <- Listed, lists:member(L, Names)])),
    ?assertEqual(1000, length([N || N <- call(Peer, macula_dist_cluster, relay_node_names, []),
                                    lists:member(N, Names)])),
    After = call(Peer, erlang, system_info, [atom_count]),
    %% Autoconnect gets a few seconds to try the made-up names.
    timer:sleep(5000),
    AutoAfter = call(Auto, erlang, system_info, [atom_count]),
    [macula_dist_nif:client_stop(C) || C <- Clients],
    ct:pal("atoms: relay_nodes ~p -> ~p; autoconnect ~p -> ~p", [Before, After, AutoBefore, AutoAfter]),
    ?assert(After - Before < 50),
    ?assert(AutoAfter - AutoBefore < 50),
    macula_ct:stop_peer(Auto).

%% Issue: a node's key at the relay was HKDF(cookie, name), so the relay
%% or any token holder could test cookie guesses offline. The key a node
%% shows is now its own (kept in its state dir): not the cookie-derived
%% one, the same across restarts of the node.
relay_never_sees_a_cookie_derived_key(Config) ->
    {Peer, Target} = ?config(target, Config),
    Client = call(Peer, erlang, whereis, [macula_dist_relay_client]),
    #{key_id := Shown} = call(Peer, macula_dist_relay_client, status, [Client]),
    ?assertNotEqual(old_derived_key_id(<<"macula_ct_cookie">>, atom_to_binary(Target)), Shown),
    %% Made on first use in the node's state dir, and kept there.
    KeyFile = filename:join(call(Peer, filename, basedir, [user_data, "macula_dist"]),
                            atom_to_list(Target) ++ ".key"),
    ?assert(filelib:is_regular(KeyFile)),
    {ok, Pem} = file:read_file(KeyFile),
    ?assertMatch([{'PrivateKeyInfo', _, not_encrypted}], public_key:pem_decode(Pem)).

%% The key id a node showed before: SHA-256 of the SubjectPublicKeyInfo of
%% the Ed25519 key whose seed is HKDF-SHA256(salt, cookie, node name).
old_derived_key_id(Cookie, Node) ->
    Prk = crypto:mac(hmac, sha256, <<"macula-dist e2e node key v1">>, Cookie),
    <<Seed:32/binary, _/binary>> = crypto:mac(hmac, sha256, Prk, <<Node/binary, 1>>),
    {Pub, _} = crypto:generate_key(eddsa, ed25519, Seed),
    Spki = <<16#30, 16#2a, 16#30, 16#05, 16#06, 16#03, 16#2b, 16#65, 16#70, 16#03, 16#21, 16#00,
             Pub/binary>>,
    string:lowercase(binary:encode_hex(crypto:hash(sha256, Spki))).

%% Issue: a token holder without the cookie sent tun_req/tun_close pairs;
%% each left a cookie wait, a matcher entry, a route and a TLS server
%% config on the target for 10 s (78 000 in 12 s: 43 -> 837 MiB, the relay
%% client's mailbox at 2637). Replayed for 12 s (test/interop/flood.py on
%% aioquic, against the real relay): the target's RSS grows by less than
%% 64 MiB, its relay client's mailbox stays small, and it still works.
session_flood_is_bounded(Config) ->
    {Relay, Info} = macula_ct:start_relay(),
    #{url := Url} = Info,
    {match, [Port]} = re:run(Url, ":(\\d+)$", [{capture, all_but_first, list}]),
    {Peer, Target} = macula_ct:start_peer(floodtarget, Info, []),
    {Other, OtherNode} = macula_ct:start_peer(floodfriend, Info, []),
    OsPid = call(Peer, os, getpid, []),
    Rss = fun() -> rss_kib(OsPid) end,
    %% Warm: a first session, so what it loads is not counted.
    ?assertEqual(pong, call(Other, net_adm, ping, [Target])),
    Before = Rss(),
    Sampler = call(Peer, macula_ct, mailbox_sampler, [macula_dist_relay_client]),
    Script = filename:join([?config(root, Config), "test", "interop", "flood.py"]),
    Out = os:cmd("timeout 60 '" ++ ?config(python, Config) ++ "' '" ++ Script ++ "' " ++ Port
                 ++ " " ++ atom_to_list(Target) ++ " 12 2>&1"),
    ct:pal("flood: ~ts", [Out]),
    {match, [Requested]} = re:run(Out, "requested (\\d+)", [{capture, all_but_first, list}]),
    After = Rss(),
    MaxQueue = call(Peer, macula_ct, mailbox_max, [Sampler]),
    #{refused_sessions := Refused} =
        call(Peer, macula_dist_relay_client, status, [call(Peer, erlang, whereis, [macula_dist_relay_client])]),
    ct:pal("~s sessions requested; target RSS ~p -> ~p KiB; relay client mailbox at most ~p; "
           "refused ~p", [Requested, Before, After, MaxQueue, Refused]),
    ?assert(list_to_integer(Requested) >= 1000),
    ?assert(After - Before < 64 * 1024),
    ?assert(MaxQueue < 300),
    %% And the target still takes real sessions.
    ?assertEqual(pong, call(Other, net_adm, ping, [Target])),
    ?assertEqual(Target, call(Other, erpc, call, [Target, erlang, node, []])),
    _ = OtherNode,
    macula_ct:stop_peer(Other),
    macula_ct:stop_peer(Peer),
    macula_dist_relay:stop(Relay).

rss_kib(OsPid) ->
    {ok, Status} = file:read_file("/proc/" ++ OsPid ++ "/status"),
    {match, [Kib]} = re:run(Status, "VmRSS:\\s+(\\d+)", [{capture, all_but_first, list}]),
    list_to_integer(Kib).

%% A fake relay on aioquic (test/interop/fake_relay.py) in Mode: its URL,
%% pin, and the file its events go to.
fake_relay(Config, Mode) ->
    Dir = ?config(priv_dir, Config),
    PortFile = filename:join(Dir, "fake_relay_" ++ Mode ++ ".port"),
    Events = filename:join(Dir, "fake_relay_" ++ Mode ++ ".events"),
    Script = filename:join([?config(root, Config), "test", "interop", "fake_relay.py"]),
    _ = os:cmd("timeout 120 '" ++ ?config(python, Config) ++ "' '" ++ Script ++ "' " ++ Mode
               ++ " '" ++ PortFile ++ "' > '" ++ Events ++ "' 2>&1 &"),
    [Port, Pin] = string:lexemes(wait_file(PortFile, 100), " \n"),
    {list_to_binary("quic://127.0.0.1:" ++ Port), list_to_binary(Pin), Events}.

wait_file(_File, 0) -> error(fake_relay_did_not_start);
wait_file(File, N) ->
    case file:read_file(File) of
        {ok, Bin} -> binary_to_list(Bin);
        _ -> timer:sleep(100), wait_file(File, N - 1)
    end.

events(File, Prefix) ->
    {ok, Bin} = file:read_file(File),
    [L || L <- string:lexemes(binary_to_list(Bin), "\n"), lists:prefix(Prefix, L)].

wait_events(File, Prefix, 0) -> error({no_event, Prefix, file:read_file(File)});
wait_events(File, Prefix, N) ->
    case events(File, Prefix) of
        [] -> timer:sleep(100), wait_events(File, Prefix, N - 1);
        Found -> Found
    end.

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 60000).

wait_until(_Fun, 0) -> timeout;
wait_until(Fun, N) ->
    case Fun() of
        true -> ok;
        false -> timer:sleep(100), wait_until(Fun, N - 1)
    end.
