%% The seed's client API against a real (embedded) relay over real QUIC.
-module(macula_dist_relay_client_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, init_per_suite/1, end_per_suite/1, init_per_group/2, end_per_group/2,
         init_per_testcase/2, end_per_testcase/2]).
-export([identify_and_status/1, round_trip_8_mib_both_ways/1, inbound_accept_reaches_kernel/1,
         tunnel_errors/1, twenty_concurrent_tunnels_both_ways/1, wrong_token_refused/1,
         wrong_pin_refused/1, unknown_ca_refused/1, unreachable_and_bad_url/1,
         relay_stop_closes_tunnels/1, tunnel_owner_death_closes_it/1,
         close_tunnel_by_id/1, inbound_without_kernel_is_closed/1, ipv6_relay/1]).

%% Every case runs with e2e sessions (the default) and with stream tunnels.
all() ->
    [{group, e2e}, {group, stream}].

groups() ->
    Cases = [identify_and_status, round_trip_8_mib_both_ways, inbound_accept_reaches_kernel,
             tunnel_errors, twenty_concurrent_tunnels_both_ways, wrong_token_refused,
             wrong_pin_refused, unknown_ca_refused, unreachable_and_bad_url,
             tunnel_owner_death_closes_it, close_tunnel_by_id, inbound_without_kernel_is_closed,
             ipv6_relay, relay_stop_closes_tunnels],
    [{e2e, [], Cases}, {stream, [], Cases}].

init_per_group(e2e, Config) ->
    %% This test node is not distributed: the cookie is an option.
    [{mode, e2e}, {opts, #{cookie => <<"macula_ct_cookie">>}} | Config];
init_per_group(stream, Config) ->
    [{mode, stream}, {opts, #{tunnel => stream}} | Config].

end_per_group(_, _Config) ->
    ok.

init_per_suite(Config) ->
    {Relay, Info} = macula_ct:start_relay(),
    [{relay, Relay}, {info, Info}, {baseline, baseline()} | Config].

end_per_suite(Config) ->
    macula_dist_relay:stop(?config(relay, Config)),
    %% Everything the suite made is gone: processes, NIF tunnels and
    %% clients, and the VM's memory is back near where it started.
    {Procs0, Mem0} = ?config(baseline, Config),
    Clean = #{tunnels => 0, clients => 0},
    wait_until(fun() -> macula_dist_nif:live_counts() =:= Clean end),
    ?assertEqual(Clean, macula_dist_nif:live_counts()),
    {Procs, Mem} = baseline(),
    ct:pal("processes ~p -> ~p, memory ~p -> ~p", [Procs0, Procs, Mem0, Mem]),
    ?assert(Procs =< Procs0 + 5),
    ?assert(Mem < Mem0 + 16 * 1024 * 1024),
    ok.

baseline() ->
    [garbage_collect(P) || P <- processes()],
    {length(processes()), erlang:memory(total)}.

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(Case, _Config) ->
    case macula_dist_relay_client:whereis_client() of
        undefined -> ok;
        Pid -> unlink(Pid), gen_server:stop(Pid)
    end,
    [garbage_collect(P) || P <- processes()],
    ct:log("after ~p: ~p", [Case, macula_dist_nif:live_counts()]),
    ok.

url(Config) -> maps:get(url, ?config(info, Config)).
pin(Config) -> maps:get(fingerprint, ?config(info, Config)).

client(Config, Node) ->
    Opts = maps:merge(?config(opts, Config), #{pin_sha256 => pin(Config)}),
    {ok, C} = macula_dist_relay_client:start_link(url(Config), Node, Opts),
    C.

raw(Config, Node) ->
    macula_ct:raw_client(url(Config), pin(Config), Node, ?config(opts, Config)).

%% ---- cases ----

identify_and_status(Config) ->
    C = client(Config, <<"a@h">>),
    ?assertEqual(C, macula_dist_relay_client:whereis_client()),
    Status = macula_dist_relay_client:status(C),
    ?assertMatch(#{node := <<"a@h">>, connection := connected, identified := true,
                   pending_tunnels := 0, active_tunnels := 0}, Status),
    ?assertEqual(url(Config), maps:get(relay_url, Status)),
    ?assert(maps:get(rtt_us, Status) > 0),
    ?assert(maps:get(bytes_out, Status) > 0),
    ?assertEqual(?config(mode, Config), maps:get(mode, Status)).

round_trip_8_mib_both_ways(Config) ->
    C = client(Config, <<"a@h">>),
    {ok, B} = raw(Config, <<"b@h">>),
    ok = macula_dist_nif:client_set_kernel(B, self(), self()),
    {ok, ConnRef, TA} = macula_dist_relay_client:request_tunnel(C, <<"b@h">>),
    ?assert(is_reference(ConnRef) andalso is_reference(TA)),
    TB = receive {accept, _, T, inet, macula} -> T after 10000 -> error(no_accept) end,
    AtoB = macula_ct:random_bytes(8 bsl 20),
    BtoA = macula_ct:random_bytes(8 bsl 20),
    PA = macula_ct:run_exchange(TA, AtoB, byte_size(BtoA)),
    PB = macula_ct:run_exchange(TB, BtoA, byte_size(AtoB)),
    ?assert(macula_ct:await_exchange(PA) =:= BtoA),
    ?assert(macula_ct:await_exchange(PB) =:= AtoB),
    #{recv_bytes := RB, send_bytes := SB, mode := Mode} = macula_dist_nif:tunnel_info(TA),
    ?assertEqual({8 bsl 20, 8 bsl 20}, {RB, SB}),
    ?assertEqual(?config(mode, Config), Mode),
    macula_dist_nif:client_stop(B).

inbound_accept_reaches_kernel(Config) ->
    C = client(Config, <<"a@h">>),
    %% A tunnel that arrives before any kernel is set waits for one.
    {ok, B} = raw(Config, <<"b@h">>),
    Self = self(),
    spawn_link(fun() -> Self ! {requested, give_back(macula_ct:request(B, <<"a@h">>), Self)} end),
    {ok, _, TB} = receive {requested, R} -> R after 10000 -> error(no_tunnel) end,
    ok = macula_dist_relay_client:set_kernel(C, self()),
    TA = receive {accept, AcceptPid, T, inet, macula} -> ?assertEqual(C, AcceptPid), T
         after 10000 -> error(no_accept)
         end,
    #{peer := <<"b@h">>, direction := inbound} = macula_dist_nif:tunnel_info(TA),
    PA = macula_ct:run_exchange(TA, <<"ping">>, 4),
    PB = macula_ct:run_exchange(TB, <<"pong">>, 4),
    ?assertEqual(<<"pong">>, macula_ct:await_exchange(PA)),
    ?assertEqual(<<"ping">>, macula_ct:await_exchange(PB)),
    macula_dist_nif:client_stop(B).

%% The asking process exits; its tunnel goes to the test process first.
give_back({ok, Conn, Tunnel}, To) ->
    ok = macula_dist_nif:tunnel_set_owner(Tunnel, To),
    {ok, Conn, Tunnel};
give_back(Other, _To) ->
    Other.

tunnel_errors(Config) ->
    C = client(Config, <<"a@h">>),
    ?assertEqual({error, {tunnel_error, target_not_connected}},
                 macula_dist_relay_client:request_tunnel(C, <<"nobody@h">>)),
    ?assertEqual({error, {tunnel_error, self_tunnel}},
                 macula_dist_relay_client:request_tunnel(C, <<"a@h">>)),
    ?assertEqual({error, {bad_target, 42}}, macula_dist_relay_client:request_tunnel(C, 42)).

twenty_concurrent_tunnels_both_ways(Config) ->
    C = client(Config, <<"a@h">>),
    {ok, B} = raw(Config, <<"b@h">>),
    Self = self(),
    ok = macula_dist_relay_client:set_kernel(C, Self),
    ok = macula_dist_nif:client_set_kernel(B, Self, Self),
    %% 10 requests from each side at once, each from its own process.
    Ask = fun(Fun) -> spawn_link(fun() -> Self ! {mine, give_back(Fun(), Self)} end) end,
    [Ask(fun() -> macula_dist_relay_client:request_tunnel(C, <<"b@h">>) end) || _ <- lists:seq(1, 10)],
    [Ask(fun() -> macula_ct:request(B, <<"a@h">>) end) || _ <- lists:seq(1, 10)],
    Mine = [receive {mine, {ok, _, T}} -> T after 15000 -> error(missing_tunnel) end
            || _ <- lists:seq(1, 20)],
    Theirs = [receive {accept, _, T, inet, macula} -> T after 15000 -> error(missing_accept) end
              || _ <- lists:seq(1, 20)],
    Id = fun(T) -> maps:get(id, macula_dist_nif:tunnel_info(T)) end,
    ByIdTheirs = maps:from_list([{Id(T), T} || T <- Theirs]),
    ?assertEqual(lists:sort([Id(T) || T <- Mine]), lists:sort(maps:keys(ByIdTheirs))),
    ?assertMatch(#{active_tunnels := 20}, macula_dist_relay_client:status(C)),
    Runs = [begin
                Other = maps:get(Id(T), ByIdTheirs),
                X = macula_ct:random_bytes(256 * 1024),
                Y = macula_ct:random_bytes(128 * 1024),
                {X, Y, macula_ct:run_exchange(T, X, byte_size(Y)),
                 macula_ct:run_exchange(Other, Y, byte_size(X))}
            end || T <- Mine],
    [begin
         ?assert(macula_ct:await_exchange(P1) =:= Y),
         ?assert(macula_ct:await_exchange(P2) =:= X)
     end || {X, Y, P1, P2} <- Runs],
    macula_dist_nif:client_stop(B).

wrong_token_refused(_Config) ->
    {Relay, #{url := Url, fingerprint := Pin}} = macula_ct:start_relay(#{token => "s3cret"}),
    try
        ?assertEqual({error, {refused, bad_token}},
                     macula_dist_relay_client:start_link(Url, <<"a@h">>, #{pin_sha256 => Pin, token => "wrong"})),
        ?assertEqual({error, {refused, bad_token}},
                     macula_dist_relay_client:start_link(Url, <<"a@h">>, #{pin_sha256 => Pin})),
        {ok, C} = macula_dist_relay_client:start_link(Url, <<"a@h">>, #{pin_sha256 => Pin, token => <<"s3cret">>}),
        ?assertMatch(#{identified := true}, macula_dist_relay_client:status(C)),
        unlink(C),
        gen_server:stop(C)
    after
        macula_dist_relay:stop(Relay)
    end.

wrong_pin_refused(Config) ->
    WrongPin = binary:copy(<<"ab">>, 32),
    ?assertMatch({error, {tls, _}},
                 macula_dist_relay_client:start_link(url(Config), <<"a@h">>, #{pin_sha256 => WrongPin})).

unknown_ca_refused(Config) ->
    %% A CA the relay's self-signed certificate does not chain to.
    #{cert := CaDer} = public_key:pkix_test_root_cert("Unrelated CA", []),
    File = filename:join(?config(priv_dir, Config), "ca.pem"),
    ok = file:write_file(File, public_key:pem_encode([{'Certificate', CaDer, not_encrypted}])),
    ?assertMatch({error, {tls, _}},
                 macula_dist_relay_client:start_link(url(Config), <<"a@h">>, #{ca_cert => File})),
    %% A CA file that is not there is a configuration error, said as such.
    ?assertMatch({error, {tls_config, <<"reading ", _/binary>>}},
                 macula_dist_relay_client:start_link(url(Config), <<"a@h">>, #{ca_cert => File ++ ".missing"})).

unreachable_and_bad_url(_Config) ->
    ?assertEqual({error, {bad_relay_url, "http://x"}},
                 macula_dist_relay_client:start_link("http://x", <<"a@h">>, #{verify => none})),
    ?assertEqual({error, no_relay_trust}, macula_dist_relay_client:start_link("127.0.0.1:1", <<"a@h">>)),
    %% Nobody answers on this port: the connect timeout ends the wait.
    {ok, Sock} = gen_udp:open(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(Sock),
    ?assertEqual({error, timeout},
                 macula_dist_relay_client:start_link("127.0.0.1:" ++ integer_to_list(Port), <<"a@h">>,
                                                     #{verify => none, connect_timeout => 500})),
    gen_udp:close(Sock),
    ?assertMatch({error, {unreachable, _}},
                 macula_dist_relay_client:start_link("no-such-host.invalid", <<"a@h">>, #{verify => none})).

tunnel_owner_death_closes_it(Config) ->
    C = client(Config, <<"a@h">>),
    {ok, B} = raw(Config, <<"b@h">>),
    ok = macula_dist_nif:client_set_kernel(B, self(), self()),
    Self = self(),
    Owner = spawn(fun() ->
                          {ok, _, T} = macula_dist_relay_client:request_tunnel(C, <<"b@h">>),
                          Self ! {got, T},
                          receive stop -> ok end
                  end),
    TA = receive {got, T0} -> T0 after 10000 -> error(no_tunnel) end,
    TB = receive {accept, _, T1, inet, macula} -> T1 after 10000 -> error(no_accept) end,
    ok = macula_dist_nif:tunnel_set_owner(TB, self()),
    ok = macula_dist_nif:tunnel_activate(TB, 1),
    exit(Owner, kill),
    receive {macula_tunnel, TB, closed} -> ok after 10000 -> error(peer_not_closed) end,
    ?assertMatch(#{closed := true}, macula_dist_nif:tunnel_info(TA)),
    macula_dist_nif:client_stop(B).

close_tunnel_by_id(Config) ->
    C = client(Config, <<"a@h">>),
    {ok, B} = raw(Config, <<"b@h">>),
    ok = macula_dist_nif:client_set_kernel(B, self(), self()),
    {ok, _, TA} = macula_dist_relay_client:request_tunnel(C, <<"b@h">>),
    TB = receive {accept, _, T1, inet, macula} -> T1 after 10000 -> error(no_accept) end,
    [ok = macula_dist_nif:tunnel_activate(T, 1) || T <- [TA]],
    ok = macula_dist_nif:tunnel_set_owner(TB, self()),
    ok = macula_dist_nif:tunnel_activate(TB, 1),
    #{id := Id} = macula_dist_nif:tunnel_info(TA),
    ok = macula_dist_relay_client:close_tunnel(C, Id),
    [receive {macula_tunnel, T, closed} -> ok after 10000 -> error({not_closed, T}) end || T <- [TA, TB]],
    macula_dist_nif:client_stop(B).

inbound_without_kernel_is_closed(Config) ->
    %% No set_kernel: the inbound tunnel waits a bounded time, then the
    %% client closes it and the requester hears so.
    C = client(Config, <<"a@h">>),
    {ok, B} = raw(Config, <<"b@h">>),
    {ok, _, TB} = macula_ct:request(B, <<"a@h">>),
    %% (An e2e session's target has its end once the stream's first bytes
    %% came: maybe just after the requester has its own.)
    wait_until(fun() -> maps:get(active_tunnels, macula_dist_relay_client:status(C)) =:= 1 end),
    ?assertMatch(#{active_tunnels := 1, kernel_set := false}, macula_dist_relay_client:status(C)),
    ok = macula_dist_nif:tunnel_activate(TB, 1),
    receive {macula_tunnel, TB, closed} -> ok after 20000 -> error(not_closed) end,
    ?assertMatch(#{active_tunnels := 0}, macula_dist_relay_client:status(C)),
    macula_dist_nif:client_stop(B).

ipv6_relay(Config) ->
    {Relay, #{url := Url, fingerprint := Pin}} = macula_ct:start_relay(#{ip => "::1"}),
    try
        ?assertMatch(<<"quic://[::1]:", _/binary>>, Url),
        Opts = ?config(opts, Config),
        {ok, C} = macula_dist_relay_client:start_link(Url, <<"a@h">>, Opts#{pin_sha256 => Pin}),
        {ok, B} = macula_ct:raw_client(Url, Pin, <<"b@h">>, Opts),
        ok = macula_dist_nif:client_set_kernel(B, self(), self()),
        {ok, _, TA} = macula_dist_relay_client:request_tunnel(C, <<"b@h">>),
        TB = receive {accept, _, T, inet, macula} -> T after 10000 -> error(no_accept) end,
        PA = macula_ct:run_exchange(TA, <<"v6 ping">>, 7),
        PB = macula_ct:run_exchange(TB, <<"v6 pong">>, 7),
        ?assertEqual(<<"v6 pong">>, macula_ct:await_exchange(PA)),
        ?assertEqual(<<"v6 ping">>, macula_ct:await_exchange(PB)),
        macula_dist_nif:client_stop(B),
        unlink(C),
        gen_server:stop(C)
    after
        macula_dist_relay:stop(Relay)
    end.

%% Sessions kept on the relay (`direct false'; a direct one outlives its
%% relay, see macula_dist_SUITE:relay_restart_reconnects).
relay_stop_closes_tunnels(Config) ->
    {Relay, #{url := Url, fingerprint := Pin}} = macula_ct:start_relay(),
    process_flag(trap_exit, true),
    Opts = (?config(opts, Config))#{direct => false},
    {ok, C} = macula_dist_relay_client:start_link(Url, <<"a@h">>, Opts#{pin_sha256 => Pin}),
    {ok, B} = macula_ct:raw_client(Url, Pin, <<"b@h">>, Opts),
    ok = macula_dist_nif:client_set_kernel(B, self(), self()),
    {ok, _, TA} = macula_dist_relay_client:request_tunnel(C, <<"b@h">>),
    TB = receive {accept, _, T1, inet, macula} -> T1 after 10000 -> error(no_accept) end,
    ok = macula_dist_nif:tunnel_set_owner(TB, self()),
    [ok = macula_dist_nif:tunnel_activate(T, 1) || T <- [TA, TB]],
    macula_dist_relay:stop(Relay),
    %% With no relay left, a session waits KEEP_WAIT (10 s) for one before
    %% it closes: about 9.9 s from here, so give it 15.
    [receive {macula_tunnel, T, closed} -> ok after 15000 -> error({not_closed, T}) end || T <- [TA, TB]],
    %% A shutdown, not a crash: OTP writes no crash report for it.
    receive {'EXIT', C, {shutdown, {relay_closed, _}}} -> ok
    after 10000 -> error(client_did_not_stop) end,
    receive {macula_client, {closed, _}} -> ok after 10000 -> error(raw_client_not_told) end,
    process_flag(trap_exit, false).

wait_until(Fun) -> wait_until(Fun, 100).
wait_until(_Fun, 0) -> timeout;
wait_until(Fun, N) ->
    case Fun() of
        true -> ok;
        false -> timer:sleep(100), wait_until(Fun, N - 1)
    end.
