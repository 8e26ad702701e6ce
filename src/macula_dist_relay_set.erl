%% @doc A relay set: which relays of the set a node name lives on (its
%% home relays), computed alike by every node with no coordinator. The
%% same rendezvous (highest-random-weight) hash as
%% `macula_relay_proto::node::relay_set': a name's weight at a relay is the
%% first 8 bytes of SHA-256(Relay, 0, Name), and its homes are the K relays
%% where it weighs most. Relays are named by their URL as configured, so
%% every node of a cluster must list the set's URLs alike.
%%
%% A set is a list of URLs, or a DNS name every node resolves alike:
%% `dns://NAME:PORT' (the A and AAAA records of NAME, each a relay on
%% PORT) or `srv://_SERVICE._udp.DOMAIN' (the SRV records: a relay at
%% each target's addresses and port). Resolved relays are named by
%% address, `quic://IP:PORT' (`quic://[IPv6]:PORT'), sorted. The answer
%% holds for its smallest TTL, kept within ?MIN_TTL..?MAX_TTL seconds.
-module(macula_dist_relay_set).

-export([weight/2, homes/3, meeting_order/2, default_homes/0]).
-export([source/1, resolve/2, nameserver_opts/1]).

-define(DEFAULT_HOMES, 2).
-define(MIN_TTL, 1).
-define(MAX_TTL, 300).
-define(DNS_TIMEOUT, 2000).
%% A set larger than this is refused (whoever answers DNS could make it
%% any size): an error, not a cut, so that every node sees the same set.
-define(MAX_RELAYS, 256).

-type source() :: {static, [binary()]}
                | {dns, Host :: string(), inet:port_number()}
                | {srv, Name :: string()}.
-export_type([source/0]).

default_homes() -> ?DEFAULT_HOMES.

-spec weight(iodata(), iodata()) -> non_neg_integer().
weight(Relay, Name) ->
    <<W:64, _/binary>> = crypto:hash(sha256, [Relay, 0, Name]),
    W.

%% @doc The K home relays of Name, heaviest first (a relay listed twice
%% counts once).
-spec homes(binary(), [binary()], pos_integer()) -> [binary()].
homes(Name, Relays, K) ->
    Weighed = lists:reverse(lists:sort([{weight(R, Name), R} || R <- lists:usort(Relays)])),
    [R || {_, R} <- lists:sublist(Weighed, K)].

%% @doc The relays a session to a target is asked at, in order: the
%% target's homes, one this node shares first (no extra connection).
-spec meeting_order([binary()], [binary()]) -> [binary()].
meeting_order(MyHomes, TargetHomes) ->
    {Shared, Others} = lists:partition(fun(R) -> lists:member(R, MyHomes) end, TargetHomes),
    Shared ++ Others.

%% @doc What a configured set names: one `dns://' or `srv://' URL is a
%% name to resolve, anything else the relays themselves.
-spec source([binary()]) -> source() | {error, term()}.
source([<<"dns://", HostPort/binary>> = Url]) ->
    case string:split(binary_to_list(HostPort), ":", trailing) of
        [Host, Port] when Host =/= "" ->
            case string:to_integer(Port) of
                {P, ""} when P > 0, P < 65536 -> {dns, Host, P};
                _ -> {error, {bad_relay_set, Url}}
            end;
        _ ->
            {error, {bad_relay_set, Url}}
    end;
source([<<"srv://", Name/binary>>]) when Name =/= <<>> ->
    {srv, binary_to_list(Name)};
source(Urls) ->
    {static, Urls}.

%% @doc `relay_set_nameserver' ("IP:PORT") as inet_res options (none: the
%% system's resolver configuration).
-spec nameserver_opts(undefined | string() | binary()) -> [{atom(), term()}] | {error, term()}.
nameserver_opts(undefined) ->
    [];
nameserver_opts(Text) ->
    case string:split(unicode:characters_to_list(Text), ":", trailing) of
        [Ip, Port] ->
            case {inet:parse_address(string:trim(Ip, both, "[]")), string:to_integer(Port)} of
                {{ok, Addr}, {P, ""}} when P > 0, P < 65536 -> [{nameservers, [{Addr, P}]}];
                _ -> {error, {bad_nameserver, Text}}
            end;
        _ ->
            {error, {bad_nameserver, Text}}
    end.

%% @doc The relays a source names now, and for how many seconds that holds
%% (`infinity' for a static list).
-spec resolve(source(), [{atom(), term()}]) ->
          {ok, [binary()], pos_integer() | infinity} | {error, term()}.
resolve(Source, Opts) ->
    case resolve_source(Source, Opts) of
        {ok, Set, _} when length(Set) > ?MAX_RELAYS -> {error, {too_many_relays, length(Set)}};
        Answer -> Answer
    end.

resolve_source({static, Urls}, _Opts) ->
    {ok, lists:usort(Urls), infinity};
resolve_source({dns, Host, Port}, Opts) ->
    case addresses(Host, Opts) of
        {ok, [], _} -> {error, {no_relays, Host}};
        {ok, Addrs, Ttl} -> {ok, lists:usort([url(A, Port) || A <- Addrs]), ttl(Ttl)};
        {error, _} = Error -> Error
    end;
resolve_source({srv, Name}, Opts) ->
    case lookup(Name, srv, Opts) of
        {ok, [], _} ->
            {error, {no_relays, Name}};
        {ok, Targets, _} when length(Targets) > ?MAX_RELAYS ->
            {error, {too_many_relays, length(Targets)}};
        {ok, Targets, SrvTtl} ->
            Found = [{T, Port, addresses(T, Opts)} || {_Prio, _Weight, Port, T} <- Targets],
            Urls = [url(A, Port) || {_, Port, {ok, As, _}} <- Found, A <- As],
            Ttls = [SrvTtl | [Ttl || {_, _, {ok, [_ | _], Ttl}} <- Found]],
            case Urls of
                [] -> {error, {no_relays, Name}};
                _ -> {ok, lists:usort(Urls), ttl(lists:min(Ttls))}
            end;
        {error, _} = Error ->
            Error
    end.

%% A and AAAA records of Host (an address is its own answer); the
%% smallest TTL of those found.
addresses(Host, Opts) ->
    case inet:parse_address(Host) of
        {ok, Addr} ->
            {ok, [Addr], ?MAX_TTL};
        {error, _} ->
            case {lookup(Host, a, Opts), lookup(Host, aaaa, Opts)} of
                {{error, Why}, {error, _}} -> {error, {dns, Host, Why}};
                {A, AAAA} ->
                    Found = [R || {ok, _, _} = R <- [A, AAAA]],
                    {ok, lists:append([As || {ok, As, _} <- Found]),
                     lists:min([Ttl || {ok, [_ | _], Ttl} <- Found] ++ [?MAX_TTL])}
            end
    end.

%% The data of Name's records of Type, and their smallest TTL.
lookup(Name, Type, Opts) ->
    case inet_res:resolve(Name, in, Type, [{timeout, ?DNS_TIMEOUT} | Opts]) of
        {ok, Msg} ->
            Records = [R || R <- inet_dns:msg(Msg, anlist), inet_dns:rr(R, type) =:= Type],
            {ok, [inet_dns:rr(R, data) || R <- Records],
             lists:min([inet_dns:rr(R, ttl) || R <- Records] ++ [?MAX_TTL])};
        {error, Why} ->
            {error, Why}
    end.

url({_, _, _, _} = Ip, Port) ->
    iolist_to_binary(["quic://", inet:ntoa(Ip), ":", integer_to_list(Port)]);
url(Ip, Port) ->
    iolist_to_binary(["quic://[", inet:ntoa(Ip), "]:", integer_to_list(Port)]).

ttl(Ttl) -> min(max(Ttl, ?MIN_TTL), ?MAX_TTL).
