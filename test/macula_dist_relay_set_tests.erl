-module(macula_dist_relay_set_tests).
-include_lib("eunit/include/eunit.hrl").

%% The same value the Rust side's test asserts: both sides place names alike.
weight_matches_the_rust_side_test() ->
    ?assertEqual(3565356807364408549,
                 macula_dist_relay_set:weight(<<"relay0.example:4434">>, <<"a@h">>)).

homes_are_the_heaviest_in_any_order_test() ->
    Set = [iolist_to_binary(["quic://r", integer_to_list(I), ":4434"]) || I <- lists:seq(1, 10)],
    Homes = macula_dist_relay_set:homes(<<"a@h">>, Set, 2),
    ?assertEqual(2, length(Homes)),
    Sorted = lists:reverse(lists:sort([macula_dist_relay_set:weight(R, <<"a@h">>) || R <- Set])),
    ?assertEqual(lists:sublist(Sorted, 2),
                 [macula_dist_relay_set:weight(R, <<"a@h">>) || R <- Homes]),
    ?assertEqual(Homes, macula_dist_relay_set:homes(<<"a@h">>, lists:reverse(Set), 2)),
    ?assertEqual([hd(Set)], macula_dist_relay_set:homes(<<"a@h">>, [hd(Set), hd(Set)], 2)).

meeting_order_puts_a_shared_home_first_test() ->
    ?assertEqual([<<"r2">>, <<"r3">>],
                 macula_dist_relay_set:meeting_order([<<"r1">>, <<"r2">>], [<<"r3">>, <<"r2">>])),
    ?assertEqual([<<"r3">>, <<"r4">>],
                 macula_dist_relay_set:meeting_order([<<"r1">>], [<<"r3">>, <<"r4">>])).

sources_test() ->
    ?assertEqual({dns, "relays.example", 4434},
                 macula_dist_relay_set:source([<<"dns://relays.example:4434">>])),
    ?assertEqual({srv, "_macula._udp.example"},
                 macula_dist_relay_set:source([<<"srv://_macula._udp.example">>])),
    ?assertEqual({static, [<<"quic://a:1">>, <<"quic://b:1">>]},
                 macula_dist_relay_set:source([<<"quic://a:1">>, <<"quic://b:1">>])),
    ?assertEqual({error, {bad_relay_set, <<"dns://relays.example">>}},
                 macula_dist_relay_set:source([<<"dns://relays.example">>])),
    ?assertEqual({error, {bad_relay_set, <<"dns://relays.example:0">>}},
                 macula_dist_relay_set:source([<<"dns://relays.example:0">>])),
    ?assertEqual({ok, [<<"quic://a:1">>, <<"quic://b:1">>], infinity},
                 macula_dist_relay_set:resolve({static, [<<"quic://b:1">>, <<"quic://a:1">>]}, [])),
    %% An address needs no lookup (and is named as it is written).
    ?assertEqual({ok, [<<"quic://[::1]:5">>], 300},
                 macula_dist_relay_set:resolve({dns, "::1", 5}, [])).

nameserver_test() ->
    ?assertEqual([], macula_dist_relay_set:nameserver_opts(undefined)),
    ?assertEqual([{nameservers, [{{127, 0, 0, 1}, 8600}]}],
                 macula_dist_relay_set:nameserver_opts("127.0.0.1:8600")),
    ?assertEqual([{nameservers, [{{0, 0, 0, 0, 0, 0, 0, 1}, 53}]}],
                 macula_dist_relay_set:nameserver_opts(<<"[::1]:53">>)),
    ?assertMatch({error, {bad_nameserver, _}}, macula_dist_relay_set:nameserver_opts("dns.example")).

a_set_too_large_is_refused_test() ->
    Urls = [iolist_to_binary(["quic://r", integer_to_list(I), ":1"]) || I <- lists:seq(1, 257)],
    ?assertEqual({error, {too_many_relays, 257}},
                 macula_dist_relay_set:resolve({static, Urls}, [])),
    ?assertMatch({ok, [_ | _], infinity},
                 macula_dist_relay_set:resolve({static, tl(Urls)}, [])).
