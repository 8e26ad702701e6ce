%% Every file and list option works from boot flags (`-macula_dist Key Value'
%% in vm.args or on the command line), where net_kernel listens before the
%% file server runs: real peer nodes boot with them and ping each other.
%%
%% `ca_cert' is tried against a relay whose certificate a CA of the test
%% issued (made with openssl, as the README shows), and `key_file' with a
%% key of the test's own.
-module(macula_dist_boot_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-include_lib("public_key/include/public_key.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, end_per_testcase/2]).
-export([token_file_flag/1, bad_token_file_fails_boot/1, relay_and_pin_lists/1,
         two_pins_one_matching/1, missing_ca_cert_fails_boot/1, ca_cert_flag/1,
         key_file_flag/1]).

-define(TOKEN, "boot-suite-token").

suite() -> [{timetrap, {minutes, 2}}].

all() ->
    [token_file_flag, bad_token_file_fails_boot, relay_and_pin_lists, two_pins_one_matching,
     missing_ca_cert_fails_boot, ca_cert_flag, key_file_flag].

%% One relay that wants a token (token_file cases), one that does not, and
%% one whose certificate a CA issued (ca_cert cases).
init_per_suite(Config) ->
    Dir = ?config(priv_dir, Config),
    {TokenRelay, TokenInfo} = macula_ct:start_relay(#{token => ?TOKEN}),
    {Relay, Info} = macula_ct:start_relay(),
    TokenFile = filename:join(Dir, "token"),
    ok = file:write_file(TokenFile, <<?TOKEN "\n">>),
    {CaPem, _} = Ca = macula_ct:make_ca(Dir, "relay_ca"),
    {Cert, Key} = macula_ct:issue_cert(Dir, "relay", Ca, "IP:127.0.0.1"),
    {CaRelay, CaInfo} = macula_ct:start_relay(#{cert_file => Cert, key_file => Key}),
    [{relays, [TokenRelay, Relay, CaRelay]}, {token_info, TokenInfo}, {info, Info},
     {token_file, TokenFile}, {ca_info, CaInfo}, {ca_pem, CaPem} | Config].

end_per_suite(Config) ->
    [macula_dist_relay:stop(R) || R <- ?config(relays, Config)],
    ok.

end_per_testcase(_Case, _Config) ->
    [macula_ct:stop_peer(P) || P <- erase_peers()],
    ok.

start_peer(Name, Info, Extra) ->
    {Peer, Node} = macula_ct:start_peer(Name, Info, Extra, #{args => args(Info, Extra)}),
    put(peers, [Peer | erase_peers()]),
    {Peer, Node}.

erase_peers() -> case erase(peers) of undefined -> []; L -> L end.

call(Peer, M, F, A) -> peer:call(Peer, M, F, A, 30000).

quoted(S) -> "\"" ++ S ++ "\"".

%% macula_ct's peer arguments; when Extra names the relay, macula_ct's own
%% relay flag goes (the first flag for a key is the one read).
args(Info, Extra) ->
    Args = macula_ct:peer_args(Info, Extra),
    case lists:member("relay", Extra) of
        true -> drop_relay(Args);
        false -> Args
    end.

drop_relay(["-macula_dist", "relay", _ | Rest]) -> Rest;
drop_relay([A | Rest]) -> [A | drop_relay(Rest)].

%% Two peers on one relay, both started with Extra; they ping each other.
ping_pair(Info, Names, Extra) ->
    [{A, AN}, {B, BN}] = [start_peer(N, Info, Extra) || N <- Names],
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ?assertEqual(pong, call(B, net_adm, ping, [AN])),
    ?assertEqual([BN], call(A, erlang, nodes, [])),
    ?assertEqual(AN, call(B, erpc, call, [AN, erlang, node, []])).

%% A node started with erl by hand, for boots that fail: its output.
failed_boot(Name, Info, Extra) ->
    Erl = os:find_executable("erl"),
    Args = args(Info, ["-noshell", "-sname", atom_to_list(Name), "-eval", "halt(0)" | Extra]),
    Cmd = lists:flatten(["timeout 60 ", Erl, [[" '", A, "'"] || A <- Args], " 2>&1; echo exit=$?"]),
    Out = os:cmd(Cmd),
    ct:log("~ts~n~ts", [Cmd, Out]),
    ?assertEqual(nomatch, string:find(Out, "exit=0")),
    ?assertEqual(nomatch, string:find(Out, "exit=124")),
    Out.

%% ---- cases ----

%% -macula_dist token_file "<file>": read at boot, before the file server.
token_file_flag(Config) ->
    ping_pair(?config(token_info, Config), [ta1, tb1],
              ["-macula_dist", "token_file", quoted(?config(token_file, Config))]).

%% A wrong token in the file, or no file: the boot stops with the reason.
bad_token_file_fails_boot(Config) ->
    Wrong = filename:join(?config(priv_dir, Config), "wrong_token"),
    ok = file:write_file(Wrong, <<"not-the-token">>),
    Out1 = failed_boot(tz2, ?config(token_info, Config), ["-macula_dist", "token_file", quoted(Wrong)]),
    ?assertNotEqual(nomatch, string:find(Out1, "bad_token")),
    Missing = filename:join(?config(priv_dir, Config), "no_such_token"),
    Out2 = failed_boot(tz2, ?config(token_info, Config), ["-macula_dist", "token_file", quoted(Missing)]),
    ?assertNotEqual(nomatch, string:find(Out2, "token_file")),
    ?assertNotEqual(nomatch, string:find(Out2, "enoent")).

%% -macula_dist relay '["quic://...","quic://..."]' and
%% -macula_dist pin_sha256 '["<hex>"]': the first relay is the one used.
relay_and_pin_lists(Config) ->
    Info = #{url := Url, fingerprint := Pin} = ?config(info, Config),
    Extra = ["-macula_dist", "relay", "[" ++ quoted(binary_to_list(Url)) ++ ",\"quic://127.0.0.1:1\"]",
             "-macula_dist", "pin_sha256", "[" ++ quoted(binary_to_list(Pin)) ++ "]"],
    %% No pin of macula_ct's own (and its relay flag is dropped).
    ping_pair(Info#{fingerprint := none}, [la3, lb3], Extra).

%% Two pins, the first not the relay's: the node still trusts the relay
%% (the NIF accepts a certificate that matches any pin).
two_pins_one_matching(Config) ->
    Info = #{fingerprint := Pin} = ?config(info, Config),
    Other = lists:duplicate(64, $0),
    Pins = "[" ++ quoted(Other) ++ "," ++ quoted(binary_to_list(Pin)) ++ "]",
    ping_pair(Info#{fingerprint := none}, [pa4, pb4], ["-macula_dist", "pin_sha256", Pins]).

%% -macula_dist ca_cert "<missing file>": checked at boot, named in the reason.
missing_ca_cert_fails_boot(Config) ->
    Info = ?config(info, Config),
    Missing = filename:join(?config(priv_dir, Config), "no_such_ca.pem"),
    Out = failed_boot(cz5, Info#{fingerprint := none}, ["-macula_dist", "ca_cert", quoted(Missing)]),
    ?assertNotEqual(nomatch, string:find(Out, "ca_cert")),
    ?assertNotEqual(nomatch, string:find(Out, "enoent")).

%% -macula_dist ca_cert "<file>": the relay's certificate is checked against
%% the CA (and its IP SAN against the URL); another CA's file stops the boot.
ca_cert_flag(Config) ->
    Info = ?config(ca_info, Config),
    ping_pair(Info#{fingerprint := none}, [ca6, cb6],
              ["-macula_dist", "ca_cert", quoted(?config(ca_pem, Config))]),
    {Other, _} = macula_ct:make_ca(?config(priv_dir, Config), "not_the_relay_ca"),
    Out = failed_boot(cz6, Info#{fingerprint := none}, ["-macula_dist", "ca_cert", quoted(Other)]),
    ?assertNotEqual(nomatch, string:find(Out, "UnknownIssuer")).

%% -macula_dist key_file "<file>": the node shows the relay that key, so
%% the relay's name table holds the name under that key's id.
key_file_flag(Config) ->
    Dir = ?config(priv_dir, Config),
    Ca = macula_ct:make_ca(Dir, "key_ca"),
    Flags = fun(Name) ->
                    {_, Key} = macula_ct:issue_cert(Dir, Name, Ca, "URI:macula://unused"),
                    ["-macula_dist", "key_file", quoted(Key)]
            end,
    Info = ?config(info, Config),
    [{A, AN}, {B, BN}] = [start_peer(N, Info, Flags(atom_to_list(N))) || N <- [ka7, kb7]],
    ?assertEqual(pong, call(A, net_adm, ping, [BN])),
    ?assertEqual(AN, call(B, erpc, call, [AN, erlang, node, []])),
    Status = call(A, macula_dist_relay_client, status,
                  [call(A, erlang, whereis, [macula_dist_relay_client])]),
    ?assertEqual(key_id_of(filename:join(Dir, "ka7.key")), maps:get(key_id, Status)).

%% The key id the relay gives a key: SHA-256 of its SubjectPublicKeyInfo.
key_id_of(KeyFile) ->
    {ok, Pem} = file:read_file(KeyFile),
    [Entry] = public_key:pem_decode(Pem),
    #'ECPrivateKey'{parameters = Params, publicKey = Pub} = public_key:pem_entry_decode(Entry),
    Spki = public_key:der_encode('SubjectPublicKeyInfo',
                                 #'SubjectPublicKeyInfo'{
                                    algorithm = #'AlgorithmIdentifier'{
                                                   algorithm = ?'id-ecPublicKey',
                                                   parameters = public_key:der_encode('EcpkParameters', Params)},
                                    subjectPublicKey = Pub}),
    string:lowercase(binary:encode_hex(crypto:hash(sha256, Spki))).
