%% Attacks on a node through the relay, replayed against real peers:
%% a peer without the cookie must not make the target create atoms (or run
%% dist_util at all), and a peer must not claim another node's name in the
%% distribution handshake.
-module(macula_dist_security_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([sessions_without_the_cookie_make_no_atoms/1, handshake_name_must_be_the_peers/1]).

suite() -> [{timetrap, {minutes, 5}}].

all() ->
    [{group, e2e}, {group, stream}].

groups() ->
    [{e2e, [], [sessions_without_the_cookie_make_no_atoms, handshake_name_must_be_the_peers]},
     {stream, [], [handshake_name_must_be_the_peers]}].

init_per_suite(Config) ->
    {Relay, Info} = macula_ct:start_relay(),
    [{relay, Relay}, {info, Info} | Config].

end_per_suite(Config) ->
    macula_dist_relay:stop(?config(relay, Config)).

init_per_group(Mode, Config) ->
    Info = ?config(info, Config),
    {Peer, Node} = macula_ct:start_peer(list_to_atom("target_" ++ atom_to_list(Mode)),
                                        Info#{tunnel => Mode}, []),
    [{mode, Mode}, {target, {Peer, Node}} | Config].

end_per_group(_Mode, Config) ->
    {Peer, _} = ?config(target, Config),
    macula_ct:stop_peer(Peer).

%% 10 clients that do not know the cookie open 100 e2e sessions each to the
%% target. Every session fails in the TLS handshake (the key the target
%% expects of that name is derived from the cookie), so no byte of it
%% reaches Erlang: the target's atom table does not grow and
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
                                    macula_dist_nif:client_stop(C),
                                    Self ! {self(), Results}
                            end)
                 || I <- lists:seq(1, 10)],
    Results = lists:append([receive {A, R} -> R after 120000 -> error(attacker_hung) end
                            || A <- Attackers]),
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

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 60000).

wait_until(_Fun, 0) -> timeout;
wait_until(Fun, N) ->
    case Fun() of
        true -> ok;
        false -> timer:sleep(100), wait_until(Fun, N - 1)
    end.
