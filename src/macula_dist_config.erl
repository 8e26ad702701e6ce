%% @doc Relay URLs and client options: parsing and validation, no side effects.
-module(macula_dist_config).

-export([parse_url/1, client_opts/3, default_port/0, boot_config/0, boot_config/3]).

-define(DEFAULT_PORT, 4434).
-define(DEFAULTS, #{tunnel => e2e, congestion => cubic, direct => true,
                    connect_timeout => 10000, tunnel_timeout => 10000,
                    idle_timeout => 2000, keep_alive => 500}).

default_port() -> ?DEFAULT_PORT.

%% @doc `quic://host:port', `host:port', `host' (port 4434), `[::1]:4434'.
-spec parse_url(binary() | string()) ->
          {ok, {Host :: string(), Port :: 1..65535}} | {error, {bad_relay_url, term()}}.
parse_url(Url) when is_binary(Url) ->
    parse_url_string(Url, unicode:characters_to_list(Url));
parse_url(Url) when is_list(Url) ->
    parse_url_string(Url, Url);
parse_url(Url) ->
    {error, {bad_relay_url, Url}}.

parse_url_string(Orig, "quic://" ++ Rest) -> host_port(Orig, Rest);
parse_url_string(Orig, Rest) when is_list(Rest) ->
    case string:find(Rest, "://") of
        nomatch -> host_port(Orig, Rest);
        _ -> {error, {bad_relay_url, Orig}}
    end;
parse_url_string(Orig, _) -> {error, {bad_relay_url, Orig}}.

host_port(Orig, "[" ++ Rest) ->
    case string:split(Rest, "]") of
        [Host, ""] -> checked(Orig, Host, ?DEFAULT_PORT);
        [Host, ":" ++ Port] -> checked(Orig, Host, port(Port));
        _ -> {error, {bad_relay_url, Orig}}
    end;
host_port(Orig, HostPort) ->
    case string:split(string:trim(HostPort, trailing, "/"), ":", all) of
        [Host] -> checked(Orig, Host, ?DEFAULT_PORT);
        [Host, Port] -> checked(Orig, Host, port(Port));
        _ -> {error, {bad_relay_url, Orig}}
    end.

port(Text) ->
    case string:to_integer(Text) of
        {Port, ""} when Port > 0, Port < 65536 -> Port;
        _ -> bad
    end.

checked(Orig, Host, Port) ->
    Valid = Host =/= "" andalso is_integer(Port)
        andalso lists:all(fun(C) -> C > 32 andalso C < 127 andalso C =/= $/ end, Host),
    case Valid of
        true -> {ok, {Host, Port}};
        false -> {error, {bad_relay_url, Orig}}
    end.

%% @doc The NIF's connect options from the URL, node name and user options.
%% Url may be a list of URLs (as `boot_config/0' gives): each is checked and,
%% for now, the first is used.
%% Options: `token', `ca_cert' (PEM path), `pin_sha256' (hex, or a list of
%% them, each checked; see trust/2), `verify => none' (explicitly insecure),
%% `connect_timeout', `tunnel_timeout', `idle_timeout', `keep_alive'
%% (milliseconds), `tunnel' (`e2e', the default, or `stream'), `cookie'
%% (the cookie that keys e2e sessions when distribution is not running),
%% `congestion' (`cubic', the default, `bbr', `bbr_bounded' or `cubic_bounded'),
%% `key_file' (PEM: the node's key at the relay), `cluster_ca', `node_cert',
%% `node_key' (PEM paths, all three: cluster-CA mode, where e2e sessions are
%% authenticated by certificates the CA issued naming `macula://NODE').
-spec client_opts(binary() | string() | [binary() | string()],
                  binary() | atom() | string(), map()) ->
          {ok, map()} | {error, term()}.
client_opts(Url, Node, Opts) when is_map(Opts) ->
    maybe_all([fun() -> first_url(Url) end,
               fun() -> node_name(Node) end,
               fun() -> check_opts(maps:to_list(Opts)) end],
              fun([{Host, Port}, NodeBin, ok]) ->
                      All = maps:merge(?DEFAULTS, Opts),
                      trust(All, #{host => list_to_binary(Host), port => Port, node => NodeBin,
                                   token => text(maps:get(token, All, <<>>)),
                                   connect_timeout => maps:get(connect_timeout, All),
                                   tunnel_timeout => maps:get(tunnel_timeout, All),
                                   idle_timeout => maps:get(idle_timeout, All),
                                   keep_alive => maps:get(keep_alive, All),
                                   mode => atom_to_binary(maps:get(tunnel, All)),
                                   congestion => atom_to_binary(maps:get(congestion, All)),
                                   key_file => text(maps:get(key_file, All, <<>>)),
                                   cluster_ca => text(maps:get(cluster_ca, All, <<>>)),
                                   node_cert => text(maps:get(node_cert, All, <<>>)),
                                   node_key => text(maps:get(node_key, All, <<>>)),
                                   direct => maps:get(direct, All),
                                   advertise => advertise(maps:get(advertise, All, [])),
                                   default_key_file => default_key_file(All, NodeBin)})
              end);
client_opts(_Url, _Node, Opts) ->
    {error, {bad_options, Opts}}.

%% The node's own key, made on first use and kept in `state_dir' (default:
%% the user's data directory, as `~/.erlang.cookie' is kept in the home
%% directory), so that a restarted node shows the relay the same key and
%% takes its name back at once. None when `key_file' or a cluster
%% certificate gives the key, or when there is no place to keep it (the
%% NIF then makes a key for this run only).
default_key_file(#{key_file := K}, _Node) when K =/= "", K =/= <<>> -> <<>>;
default_key_file(#{node_key := K}, _Node) when K =/= "", K =/= <<>> -> <<>>;
default_key_file(All, Node) ->
    case maps:get(state_dir, All, default_state_dir()) of
        "" -> <<>>;
        <<>> -> <<>>;
        Dir -> unicode:characters_to_binary(filename:join(Dir, <<Node/binary, ".key">>))
    end.

default_state_dir() ->
    try filename:basedir(user_data, "macula_dist")
    catch _:_ -> ""
    end.

%% A list of URLs: all must parse; the first is the one used.
first_url([First | _] = Urls) when is_list(First); is_binary(First) ->
    case [E || U <- Urls, {error, _} = E <- [parse_url(U)]] of
        [] -> parse_url(First);
        [Error | _] -> Error
    end;
first_url(Url) ->
    parse_url(Url).

maybe_all(Steps, Done) -> maybe_all(Steps, [], Done).
maybe_all([], Acc, Done) -> Done(lists:reverse(Acc));
maybe_all([Step | Rest], Acc, Done) ->
    case Step() of
        {ok, V} -> maybe_all(Rest, [V | Acc], Done);
        ok -> maybe_all(Rest, [ok | Acc], Done);
        {error, _} = E -> E
    end.

node_name(Node) when is_atom(Node) -> node_name(atom_to_binary(Node, utf8));
node_name(Node) when is_list(Node) -> node_name(unicode:characters_to_binary(Node));
node_name(Node) when is_binary(Node), byte_size(Node) > 0, byte_size(Node) =< 255 -> {ok, Node};
node_name(Node) -> {error, {bad_node_name, Node}}.

check_opts([]) -> ok;
check_opts([{token, V} | Rest]) when is_binary(V); is_list(V) -> check_opts(Rest);
check_opts([{ca_cert, V} | Rest]) when is_binary(V); is_list(V) -> check_opts(Rest);
check_opts([{pin_sha256, V} | Rest]) when is_binary(V); is_list(V) ->
    case [P || P <- pins(V), not is_pin(P)] of
        [] -> check_opts(Rest);
        [Bad | _] -> {error, {bad_option, {pin_sha256, Bad}}}
    end;
check_opts([{verify, none} | Rest]) -> check_opts(Rest);
check_opts([{tunnel, e2e} | Rest]) -> check_opts(Rest);
check_opts([{key_file, V} | Rest]) when is_binary(V); is_list(V) -> check_opts(Rest);
check_opts([{state_dir, V} | Rest]) when is_binary(V); is_list(V) -> check_opts(Rest);
check_opts([{cluster_ca, V} | Rest]) when is_binary(V); is_list(V) -> check_opts(Rest);
check_opts([{node_cert, V} | Rest]) when is_binary(V); is_list(V) -> check_opts(Rest);
check_opts([{node_key, V} | Rest]) when is_binary(V); is_list(V) -> check_opts(Rest);
check_opts([{autoconnect, V} | Rest]) when is_boolean(V) -> check_opts(Rest);
check_opts([{direct, V} | Rest]) when is_boolean(V) -> check_opts(Rest);
check_opts([{advertise, V} | Rest]) when is_binary(V); is_list(V) ->
    case [A || A <- pins(V), not is_address(A)] of
        [] -> check_opts(Rest);
        [Bad | _] -> {error, {bad_option, {advertise, Bad}}}
    end;
check_opts([{tunnel, stream} | Rest]) -> check_opts(Rest);
check_opts([{congestion, cubic} | Rest]) -> check_opts(Rest);
check_opts([{congestion, bbr} | Rest]) -> check_opts(Rest);
check_opts([{congestion, bbr_bounded} | Rest]) -> check_opts(Rest);
check_opts([{congestion, cubic_bounded} | Rest]) -> check_opts(Rest);
check_opts([{cookie, V} | Rest]) when is_atom(V); is_binary(V) -> check_opts(Rest);
check_opts([{verify, verify_peer} | Rest]) -> check_opts(Rest);
check_opts([{K, V} | Rest])
  when (K =:= connect_timeout orelse K =:= tunnel_timeout orelse K =:= idle_timeout
        orelse K =:= keep_alive), is_integer(V), V > 0 ->
    check_opts(Rest);
check_opts([Opt | _]) -> {error, {bad_option, Opt}}.

%% One pin (a string or binary) or a list of them.
pins([First | _] = Pins) when is_list(First); is_binary(First) -> Pins;
pins(Pin) -> [Pin].

is_pin(Pin) when is_list(Pin) ->
    try unicode:characters_to_binary(Pin) of
        Bin when is_binary(Bin) -> is_pin(Bin);
        _ -> false
    catch error:_ -> false
    end;
is_pin(Pin) when is_binary(Pin) ->
    Hex = binary:replace(Pin, <<":">>, <<>>, [global]),
    byte_size(Hex) =:= 64 andalso
        lists:all(fun(C) -> (C >= $0 andalso C =< $9) orelse (C >= $a andalso C =< $f)
                                orelse (C >= $A andalso C =< $F) end,
                  binary_to_list(Hex));
is_pin(_) ->
    false.

%% An `ip:port' (IPv6 in brackets) to advertise for direct paths.
is_address(A) ->
    case parse_url(A) of
        {ok, {Host, _Port}} -> element(1, inet:parse_address(Host)) =:= ok;
        {error, _} -> false
    end.

%% Advertised addresses go to the NIF as one comma-separated binary.
advertise([]) -> <<>>;
advertise(V) -> iolist_to_binary(lists:join(<<",">>, [text(A) || A <- pins(V)])).

%% The relay is verified unless the user says otherwise, explicitly.
trust(#{pin_sha256 := Pin}, Nif) ->
    %% Several pins go to the NIF as one binary, joined with ","; the Rust
    %% side splits it on commas (a pin itself never holds one).
    Joined = iolist_to_binary(lists:join(<<",">>, [text(P) || P <- pins(Pin)])),
    {ok, Nif#{pin_sha256 => Joined, ca_cert => <<>>, insecure => false}};
trust(#{ca_cert := Ca}, Nif) ->
    {ok, Nif#{pin_sha256 => <<>>, ca_cert => text(Ca), insecure => false}};
trust(#{verify := none}, Nif) ->
    {ok, Nif#{pin_sha256 => <<>>, ca_cert => <<>>, insecure => true}};
trust(_, _) ->
    {error, no_relay_trust}.

text(V) when is_binary(V) -> V;
text(V) when is_list(V) -> unicode:characters_to_binary(V).

%% @doc The distribution's relay settings, each from the first of:
%% init arguments (`-macula_dist relay \'"quic://h:4434"\''), the `macula_dist'
%% application environment, OS variables (`MACULA_DIST_RELAY', ...).
%% Returns the relay URLs and client options (`pin_sha256' as a list), or
%% why not. `relay' and `pin_sha256' take one value or a list
%% (`-macula_dist relay \'["quic://a:4434","quic://b:4434"]\'', or
%% comma-separated in an OS variable or an unquoted argument).
%%
%% This runs while net_kernel starts, before the file server: files
%% (`token_file', `ca_cert') are read with `prim_file'.
-spec boot_config() -> {ok, [string(), ...], map()} | {error, term()}.
boot_config() ->
    boot_config(init_args(), fun app_env/1, fun os:getenv/1).

-define(BOOT_KEYS, [{relay, "MACULA_DIST_RELAY", list},
                    {relay_set, "MACULA_DIST_RELAY_SET", list},
                    {homes, "MACULA_DIST_HOMES", integer},
                    {relay_set_nameserver, "MACULA_DIST_RELAY_SET_NAMESERVER", string},
                    {token, "MACULA_DIST_TOKEN", string},
                    {token_file, "MACULA_DIST_TOKEN_FILE", string},
                    {pin_sha256, "MACULA_DIST_PIN_SHA256", list},
                    {ca_cert, "MACULA_DIST_CA_CERT", string},
                    {verify, "MACULA_DIST_VERIFY", atom},
                    {tunnel, "MACULA_DIST_TUNNEL", atom},
                    {congestion, "MACULA_DIST_CONGESTION", atom},
                    {key_file, "MACULA_DIST_KEY_FILE", string},
                    {state_dir, "MACULA_DIST_STATE_DIR", string},
                    {cluster_ca, "MACULA_DIST_CLUSTER_CA", string},
                    {node_cert, "MACULA_DIST_NODE_CERT", string},
                    {node_key, "MACULA_DIST_NODE_KEY", string},
                    {autoconnect, "MACULA_DIST_AUTOCONNECT", atom},
                    {direct, "MACULA_DIST_DIRECT", atom},
                    {advertise, "MACULA_DIST_ADVERTISE", list},
                    {connect_timeout, "MACULA_DIST_CONNECT_TIMEOUT", integer},
                    {tunnel_timeout, "MACULA_DIST_TUNNEL_TIMEOUT", integer},
                    {idle_timeout, "MACULA_DIST_IDLE_TIMEOUT", integer},
                    {keep_alive, "MACULA_DIST_KEEP_ALIVE", integer}]).

%% Testable core: the three sources as a proplist and two lookups.
boot_config(InitArgs, AppEnv, OsEnv) ->
    Found = [{K, V} || {K, Var, Type} <- ?BOOT_KEYS,
                       V <- [lookup(K, Var, Type, InitArgs, AppEnv, OsEnv)], V =/= undefined],
    case relay_or_set(Found) of
        {error, _} = Error -> Error;
        Relays -> relays(Relays)
    end.

%% `relay_set' (a set the node joins its home relays of) stands for
%% `relay'; not both. The set is then marked in the options.
relay_or_set(Found) ->
    case {lists:keymember(relay, 1, Found), lists:keytake(relay_set, 1, Found)} of
        {true, {value, _, _}} ->
            {error, {conflicting_boot_options, relay, relay_set}};
        {false, {value, {relay_set, Set}, Rest}} ->
            [{relay, Set}, {relay_set, true} | Rest];
        {_, false} ->
            Found
    end.

relays(Found) ->
    case lists:keytake(relay, 1, Found) of
        false ->
            {error, {no_relay_configured,
                     "pass -macula_dist relay '\"quic://host:4434\"' "
                     "or set MACULA_DIST_RELAY"}};
        {value, {relay, {bad, Raw}}, _} ->
            {error, {bad_relay_url, Raw}};
        {value, {relay, Urls}, Rest} ->
            case [K || {K, V} <- Rest, bad_boot_value(K, V)] of
                [] -> with_files(Urls, maps:from_list(Rest));
                [Bad | _] -> {error, {bad_boot_option, Bad, proplists:get_value(Bad, Rest)}}
            end
    end.

bad_boot_value(homes, K) -> not (is_integer(K) andalso K > 0);
bad_boot_value(_, {bad, _}) -> true;
bad_boot_value(_, _) -> false.

%% The token file is read here; the other files only checked (the NIF
%% reads them), so a missing one is named at boot.
with_files(Urls, #{token_file := File} = Opts) ->
    case prim_file:read_file(File) of
        {ok, Token} ->
            with_files(Urls, maps:put(token, string:trim(Token), maps:remove(token_file, Opts)));
        {error, Reason} ->
            {error, {token_file, File, Reason}}
    end;
with_files(Urls, Opts) ->
    Unreadable = [{Key, File, Reason}
                  || Key <- [ca_cert, key_file, cluster_ca, node_cert, node_key],
                     File <- [maps:get(Key, Opts, undefined)], File =/= undefined,
                     {error, Reason} <- [prim_file:read_file(File)]],
    case Unreadable of
        [] -> {ok, Urls, Opts};
        [First | _] -> {error, First}
    end.

lookup(Key, Var, Type, InitArgs, AppEnv, OsEnv) ->
    case proplists:get_value(atom_to_list(Key), InitArgs) of
        undefined ->
            case AppEnv(Key) of
                undefined ->
                    case OsEnv(Var) of
                        false -> undefined;
                        "" -> undefined;
                        Text -> typed(Type, Text)
                    end;
                Value -> checked_type(Type, Value)
            end;
        Text ->
            %% -macula_dist Key Value: Value is an Erlang term, as for
            %% -App Par Val; an unquoted string is taken as it is.
            case {parse_term(Text), Type} of
                {{ok, Value}, _} when Type =/= string, Type =/= list; is_list(Value) ->
                    checked_type(Type, Value);
                {_, string} -> Text;
                {_, list} -> typed(list, Text);
                _ -> {bad, Text}
            end
    end.

typed(string, Text) -> Text;
typed(list, Text) ->
    case [string:trim(P) || P <- string:split(Text, ",", all), string:trim(P) =/= ""] of
        [] -> {bad, Text};
        List -> List
    end;
typed(atom, Text) -> list_to_atom(Text);
typed(integer, Text) ->
    case string:to_integer(Text) of
        {N, ""} -> N;
        _ -> {bad, Text}
    end.

checked_type(string, V) when is_list(V); is_binary(V) -> unicode:characters_to_list(V);
%% One string (comma-separated values allowed), or a non-empty list of them.
checked_type(list, V) when is_binary(V); is_list(V) ->
    Items = case io_lib:char_list(V) of
                true -> [V];
                false when is_binary(V) -> [V];
                false -> V
            end,
    Split = [case (is_binary(E) orelse io_lib:char_list(E)) andalso
                     unicode:characters_to_list(E) of
                 L when is_list(L) -> typed(list, L);
                 _ -> {bad, E}
             end || E <- Items],
    case Split =/= [] andalso lists:all(fun is_list/1, Split) of
        true -> lists:append(Split);
        false -> {bad, V}
    end;
checked_type(atom, V) when is_atom(V) -> V;
checked_type(integer, V) when is_integer(V) -> V;
checked_type(_, V) -> {bad, V}.

parse_term(Text) ->
    case erl_scan:string(Text ++ ".") of
        {ok, Tokens, _} ->
            case erl_parse:parse_term(Tokens) of
                {ok, Term} -> {ok, Term};
                _ -> error
            end;
        _ -> error
    end.

init_args() ->
    case init:get_argument(macula_dist) of
        {ok, Lists} -> pairs(lists:append(Lists));
        error -> []
    end.

pairs([K, V | Rest]) -> [{K, V} | pairs(Rest)];
pairs(_) -> [].

app_env(Key) ->
    _ = application:load(macula_dist),
    case application:get_env(macula_dist, Key) of
        {ok, V} -> V;
        undefined -> undefined
    end.
