-module(macula_dist_config_tests).
-include_lib("eunit/include/eunit.hrl").

-define(PIN, "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").

url_forms_test_() ->
    [?_assertEqual({ok, {"relay.example", 4434}}, macula_dist_config:parse_url("quic://relay.example:4434")),
     ?_assertEqual({ok, {"relay.example", 4434}}, macula_dist_config:parse_url(<<"quic://relay.example">>)),
     ?_assertEqual({ok, {"10.0.0.1", 9000}}, macula_dist_config:parse_url("10.0.0.1:9000")),
     ?_assertEqual({ok, {"host", 4434}}, macula_dist_config:parse_url("host")),
     ?_assertEqual({ok, {"::1", 4434}}, macula_dist_config:parse_url("[::1]:4434")),
     ?_assertEqual({ok, {"::1", 4434}}, macula_dist_config:parse_url("quic://[::1]")),
     ?_assertEqual({ok, {"h", 1}}, macula_dist_config:parse_url("quic://h:1/"))].

bad_urls_test_() ->
    [?_assertEqual({error, {bad_relay_url, U}}, macula_dist_config:parse_url(U))
     || U <- ["", "quic://", "http://h:1", "h:0", "h:65536", "h:port", "h:1:2", "[::1", "[::1]x",
              "quic://:4434", "ho st:1", <<"h:-1">>, 42]].

opts(Opts) -> macula_dist_config:client_opts("quic://h:1", <<"a@h">>, Opts).

trust_is_required_test() ->
    ?assertEqual({error, no_relay_trust}, opts(#{})).

pin_test() ->
    {ok, M} = opts(#{pin_sha256 => ?PIN}),
    ?assertMatch(#{host := <<"h">>, port := 1, node := <<"a@h">>, pin_sha256 := <<?PIN>>,
                   ca_cert := <<>>, insecure := false, token := <<>>}, M),
    Colons = lists:flatten(lists:join(":", [[A, B] || [A, B] <- chunks(?PIN)])),
    ?assertMatch({ok, _}, opts(#{pin_sha256 => Colons})),
    ?assertEqual({error, {bad_option, {pin_sha256, "abc"}}}, opts(#{pin_sha256 => "abc"})).

chunks([A, B | T]) -> [[A, B] | chunks(T)];
chunks([]) -> [].

ca_and_insecure_test() ->
    ?assertMatch({ok, #{ca_cert := <<"/x.pem">>, insecure := false}}, opts(#{ca_cert => "/x.pem"})),
    ?assertMatch({ok, #{insecure := true}}, opts(#{verify => none})).

timeouts_and_defaults_test() ->
    {ok, M} = opts(#{verify => none, tunnel_timeout => 500, token => "t"}),
    ?assertMatch(#{tunnel_timeout := 500, connect_timeout := 10000, token := <<"t">>}, M).

bad_options_test_() ->
    [?_assertEqual({error, {bad_option, O}}, opts(maps:from_list([O, {pin_sha256, ?PIN}])))
     || O <- [{connect_timeout, 0}, {tunnel_timeout, -1}, {keep_alive, "5"}, {verify, 'maybe'},
              {nonsense, 1}, {token, 5}]].

bad_node_and_url_test() ->
    ?assertEqual({error, {bad_node_name, <<>>}},
                 macula_dist_config:client_opts("h", <<>>, #{verify => none})),
    ?assertEqual({error, {bad_relay_url, "http://x"}},
                 macula_dist_config:client_opts("http://x", <<"a@h">>, #{verify => none})),
    ?assertEqual({error, {bad_options, nope}}, macula_dist_config:client_opts("h", <<"a@h">>, nope)).

boot(InitArgs, App, Os) ->
    macula_dist_config:boot_config(InitArgs,
                                   fun(K) -> proplists:get_value(K, App) end,
                                   fun(V) -> proplists:get_value(V, Os, false) end).

boot_precedence_test() ->
    %% init arguments beat the application environment, which beats OS variables.
    ?assertEqual({ok, ["quic://a:1"], #{}}, boot([{"relay", "\"quic://a:1\""}], [{relay, "b"}], [{"MACULA_DIST_RELAY", "c"}])),
    ?assertEqual({ok, ["b"], #{}}, boot([], [{relay, "b"}], [{"MACULA_DIST_RELAY", "c"}])),
    ?assertEqual({ok, ["c"], #{connect_timeout => 7}},
                 boot([], [], [{"MACULA_DIST_RELAY", "c"}, {"MACULA_DIST_CONNECT_TIMEOUT", "7"}])),
    %% An unquoted URL on the command line is taken as it is.
    ?assertEqual({ok, ["quic://a:1"], #{verify => none}},
                 boot([{"relay", "quic://a:1"}, {"verify", "none"}], [], [])).

-define(PIN2, "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210").

boot_relay_lists_test_() ->
    Relay = fun(Arg) -> boot([{"relay", Arg}], [], []) end,
    [%% -macula_dist relay '["quic://a:1","quic://b:2"]'
     ?_assertEqual({ok, ["quic://a:1", "quic://b:2"], #{}}, Relay("[\"quic://a:1\",\"quic://b:2\"]")),
     ?_assertEqual({ok, ["quic://a:1", "b:2"], #{}}, Relay("[\"quic://a:1\", <<\"b:2\">>]")),
     ?_assertEqual({ok, ["quic://a:1"], #{}}, Relay("[\"quic://a:1\"]")),
     %% Unquoted, alone or comma-separated, as they are.
     ?_assertEqual({ok, ["quic://a:1"], #{}}, Relay("quic://a:1")),
     ?_assertEqual({ok, ["[::1]:4434"], #{}}, Relay("[::1]:4434")),
     ?_assertEqual({ok, ["host"], #{}}, Relay("host")),
     ?_assertEqual({ok, ["quic://a:1", "quic://b:2"], #{}}, Relay("quic://a:1,quic://b:2")),
     ?_assertEqual({ok, ["quic://a:1", "quic://b:2"], #{}}, Relay("\"quic://a:1, quic://b:2\"")),
     %% The application environment and OS variables.
     ?_assertEqual({ok, ["a:1", "b:2"], #{}}, boot([], [{relay, ["a:1", <<"b:2">>]}], [])),
     ?_assertEqual({ok, ["a:1"], #{}}, boot([], [{relay, <<"a:1">>}], [])),
     ?_assertEqual({ok, ["a:1", "b:2"], #{}}, boot([], [], [{"MACULA_DIST_RELAY", "a:1,b:2"}])),
     %% Nothing usable.
     ?_assertEqual({error, {bad_relay_url, []}}, Relay("[]")),
     ?_assertEqual({error, {bad_relay_url, ["a:1", 7]}}, Relay("[\"a:1\", 7]")),
     ?_assertEqual({error, {bad_relay_url, ","}}, boot([], [], [{"MACULA_DIST_RELAY", ","}]))].

boot_pin_lists_test_() ->
    Pin = fun(Arg) -> boot([{"relay", "h"}, {"pin_sha256", Arg}], [], []) end,
    [%% -macula_dist pin_sha256 '["hex1","hex2"]'
     ?_assertEqual({ok, ["h"], #{pin_sha256 => [?PIN, ?PIN2]}},
                   Pin("[\"" ?PIN "\",\"" ?PIN2 "\"]")),
     %% One pin, quoted or not, is a list of one.
     ?_assertEqual({ok, ["h"], #{pin_sha256 => [?PIN]}}, Pin("\"" ?PIN "\"")),
     ?_assertEqual({ok, ["h"], #{pin_sha256 => [?PIN]}}, Pin(?PIN)),
     ?_assertEqual({ok, ["h"], #{pin_sha256 => [?PIN, ?PIN2]}}, Pin(?PIN "," ?PIN2)),
     ?_assertEqual({ok, ["h"], #{pin_sha256 => [?PIN, ?PIN2]}},
                   boot([], [{relay, "h"}], [{"MACULA_DIST_PIN_SHA256", ?PIN "," ?PIN2}])),
     ?_assertEqual({ok, ["h"], #{pin_sha256 => [?PIN]}},
                   boot([], [{relay, "h"}, {pin_sha256, list_to_binary(?PIN)}], [])),
     ?_assertEqual({error, {bad_boot_option, pin_sha256, {bad, [foo]}}}, Pin("[foo]")),
     ?_assertEqual({error, {bad_boot_option, pin_sha256, {bad, []}}}, Pin("[]"))].

%% What boot_config gives is what client_opts takes: the first relay is
%% used, every pin goes to the NIF (joined with commas).
boot_lists_to_client_opts_test() ->
    {ok, Urls, Opts} = boot([{"relay", "[\"quic://a:1\",\"quic://b:2\"]"},
                             {"pin_sha256", "[\"" ?PIN "\",\"" ?PIN2 "\"]"}], [], []),
    {ok, M} = macula_dist_config:client_opts(Urls, <<"n@h">>, Opts),
    ?assertMatch(#{host := <<"a">>, port := 1, pin_sha256 := <<?PIN "," ?PIN2>>}, M).

client_opts_lists_test() ->
    ?assertMatch({ok, #{host := <<"a">>, port := 1}},
                 macula_dist_config:client_opts(["quic://a:1", <<"b:2">>], <<"n@h">>, #{verify => none})),
    ?assertEqual({error, {bad_relay_url, "http://b"}},
                 macula_dist_config:client_opts(["quic://a:1", "http://b"], <<"n@h">>, #{verify => none})),
    ?assertMatch({ok, #{pin_sha256 := <<?PIN>>}}, opts(#{pin_sha256 => [?PIN]})),
    ?assertMatch({ok, #{pin_sha256 := <<?PIN>>}}, opts(#{pin_sha256 => list_to_binary(?PIN)})),
    ?assertMatch({ok, #{pin_sha256 := <<?PIN "," ?PIN2>>}},
                 opts(#{pin_sha256 => [list_to_binary(?PIN), ?PIN2]})),
    %% Each pin is checked; the bad one is named.
    ?assertEqual({error, {bad_option, {pin_sha256, "abc"}}}, opts(#{pin_sha256 => [?PIN, "abc"]})),
    ?assertEqual({error, {bad_option, {pin_sha256, 5}}}, opts(#{pin_sha256 => [?PIN, 5]})),
    ?assertEqual({error, {bad_option, {pin_sha256, []}}}, opts(#{pin_sha256 => []})).

boot_errors_test() ->
    ?assertMatch({error, {no_relay_configured, _}}, boot([], [], [])),
    ?assertEqual({error, {bad_boot_option, connect_timeout, {bad, "soon"}}},
                 boot([], [], [{"MACULA_DIST_RELAY", "c"}, {"MACULA_DIST_CONNECT_TIMEOUT", "soon"}])),
    ?assertMatch({error, {token_file, "/nonexistent/t", enoent}},
                 boot([], [{relay, "c"}, {token_file, "/nonexistent/t"}], [])).

token_file_test() ->
    File = filename:join(os:getenv("TMPDIR", "/tmp"), "macula_token_" ++ os:getpid()),
    ok = file:write_file(File, <<"s3cret\n">>),
    try
        ?assertEqual({ok, ["c"], #{token => <<"s3cret">>}}, boot([], [{relay, "c"}, {token_file, File}], [])),
        ?assertEqual({ok, ["c"], #{token => <<"s3cret">>}},
                     boot([{"relay", "c"}, {"token_file", "\"" ++ File ++ "\""}], [], []))
    after
        file:delete(File)
    end.

%% The CA file is read by the NIF, but a missing one stops the boot here,
%% with its name.
ca_cert_checked_test() ->
    ?assertEqual({error, {ca_cert, "/nonexistent/ca.pem", enoent}},
                 boot([{"relay", "c"}, {"ca_cert", "\"/nonexistent/ca.pem\""}], [], [])),
    File = filename:join(os:getenv("TMPDIR", "/tmp"), "macula_ca_" ++ os:getpid()),
    ok = file:write_file(File, <<"-----BEGIN CERTIFICATE-----\n">>),
    try
        ?assertEqual({ok, ["c"], #{ca_cert => File}}, boot([], [{relay, "c"}, {ca_cert, File}], []))
    after
        file:delete(File)
    end.

%% Every file-valued key is checked the same way: a missing file is named.
key_files_checked_test() ->
    [?assertEqual({error, {Key, "/nonexistent/f.pem", enoent}},
                  boot([{"relay", "c"}, {atom_to_list(Key), "\"/nonexistent/f.pem\""}], [], []))
     || Key <- [key_file, cluster_ca, node_cert, node_key]],
    ?assertEqual({error, {node_key, "/nonexistent/k.pem", enoent}},
                 boot([], [], [{"MACULA_DIST_RELAY", "c"},
                               {"MACULA_DIST_NODE_KEY", "/nonexistent/k.pem"}])).

%% Cluster-CA mode's files go to the NIF as paths.
cluster_ca_opts_test() ->
    {ok, Opts} = opts(#{verify => none, cluster_ca => "/ca.pem", node_cert => <<"/n.pem">>,
                        node_key => "/n.key"}),
    ?assertMatch(#{cluster_ca := <<"/ca.pem">>, node_cert := <<"/n.pem">>, node_key := <<"/n.key">>},
                 Opts),
    ?assertMatch({ok, #{cluster_ca := <<>>, node_cert := <<>>, node_key := <<>>}},
                 opts(#{verify => none})).

congestion_test() ->
    ?assertMatch({ok, #{congestion := <<"cubic">>}}, opts(#{verify => none})),
    ?assertMatch({ok, #{congestion := <<"bbr">>}}, opts(#{verify => none, congestion => bbr})),
    ?assertEqual({error, {bad_option, {congestion, reno}}},
                 opts(#{verify => none, congestion => reno})),
    ?assertMatch({ok, _, #{congestion := bbr}},
                 boot([{"relay", "c"}, {"congestion", "bbr"}], [], [])).

direct_and_advertise_test() ->
    ?assertMatch({ok, #{direct := true, advertise := <<>>}}, opts(#{verify => none})),
    ?assertMatch({ok, #{direct := false}}, opts(#{verify => none, direct => false})),
    ?assertEqual({error, {bad_option, {direct, yes}}}, opts(#{verify => none, direct => yes})),
    ?assertMatch({ok, #{advertise := <<"203.0.113.7:4500">>}},
                 opts(#{verify => none, advertise => "203.0.113.7:4500"})),
    ?assertMatch({ok, #{advertise := <<"203.0.113.7:4500,[2001:db8::1]:4500">>}},
                 opts(#{verify => none, advertise => ["203.0.113.7:4500", <<"[2001:db8::1]:4500">>]})),
    %% An address, not a host name.
    ?assertEqual({error, {bad_option, {advertise, "relay.example.com:4500"}}},
                 opts(#{verify => none, advertise => "relay.example.com:4500"})),
    ?assertMatch({ok, _, #{direct := false, advertise := ["203.0.113.7:4500"]}},
                 boot([{"relay", "c"}, {"direct", "false"}], [],
                      [{"MACULA_DIST_ADVERTISE", "203.0.113.7:4500"}])).

boot_relay_set_test() ->
    %% A relay set stands for the relay list, and is marked in the options.
    ?assertEqual({ok, ["quic://a:1", "quic://b:1"], #{relay_set => true, homes => 3}},
                 boot([{"relay_set", "[\"quic://a:1\",\"quic://b:1\"]"}, {"homes", "3"}], [], [])),
    ?assertEqual({ok, ["a", "b"], #{relay_set => true}},
                 boot([], [], [{"MACULA_DIST_RELAY_SET", "a,b"}])),
    ?assertEqual({error, {conflicting_boot_options, relay, relay_set}},
                 boot([{"relay", "a"}, {"relay_set", "b"}], [], [])),
    ?assertMatch({error, {bad_boot_option, homes, 0}},
                 boot([{"relay_set", "a"}, {"homes", "0"}], [], [])).
