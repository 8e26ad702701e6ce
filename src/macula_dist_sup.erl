%% @doc Supervises what `-proto_dist macula' runs besides its connections:
%% one `macula_dist_keeper' per relay (each keeps that relay's client
%% running) and, with `-macula_dist autoconnect true',
%% `macula_dist_autoconnect'. Started by net_kernel's supervisor through
%% `macula_dist:childspecs/0', before distribution listens;
%% `macula_dist:listen/2' starts the keepers in it, once the node name is
%% known.
-module(macula_dist_sup).
-behaviour(supervisor).

-export([start_link/0, start_client/3, stop_client/0, start_autoconnect/0]).
-export([start_set_client/4, ensure_relay/1, join_relay/1, relay_set/0, set_changed/1, joined_relays/0,
         leave_relay/1, homes/0]).
-export([init/1]).

start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% One client per relay, each under a keeper that connects again whenever
%% its relay connection ends (and net_kernel's acceptor hands each new
%% client the kernel). One relay: it must answer now. Several: the node
%% starts with those that answer, unless one refuses it (its name is
%% taken there, say), and the keepers of the others keep trying.
-spec start_client(binary() | string() | [binary() | string()], binary(), map()) -> {ok, pid()} | {error, term()}.
start_client(Urls, Node, Opts) ->
    stop_client(),
    List = urls(Urls),
    Mode = case List of [_] -> required; _ -> optional end,
    Names = [macula_dist_relay_client:client_name(I) || I <- lists:seq(1, length(List))],
    persistent_term:put({macula_dist, relay_clients}, Names),
    Started = [start_keeper(I, Name, Url, Node, Opts, Mode)
               || {I, Name, Url} <- lists:zip3(lists:seq(1, length(List)), Names, List)],
    case booted(List, Started) of
        {ok, _} = Ok -> Ok;
        {error, _} = Error -> stop_client(), Error
    end.

%% A relay set: the node joins its K home relays now (a client for each),
%% and a target's homes when it first dials it (ensure_relay/1).
%% clients() lists the homes first. A set named in DNS is resolved now
%% (the node does not start without it) and again as its TTL runs out by
%% macula_dist_relay_set_server, which also closes joined relays once
%% they carry nothing.
-spec start_set_client([binary() | string()], pos_integer(), binary(), map()) ->
          {ok, pid()} | {error, term()}.
start_set_client(Urls, K, Node, Opts0) ->
    stop_client(),
    Nameserver = maps:get(relay_set_nameserver, Opts0, undefined),
    Opts = maps:remove(relay_set_nameserver, Opts0),
    Configured = [unicode:characters_to_binary(U) || U <- Urls],
    case resolve_set(Configured, Nameserver) of
        {ok, Source, DnsOpts, Set, Ttl} ->
            Homes = install_set(Set, K, Node),
            persistent_term:put({macula_dist, relay_set}, {Set, K, Node, Opts}),
            Mode = case Homes of [_] -> required; _ -> optional end,
            Started = [start_keeper(relay_index(U), client_name(U), U, Node, Opts, Mode)
                       || U <- Homes],
            case booted(Homes, Started) of
                {ok, _} = Ok ->
                    {ok, _} = start_set_server(Source, DnsOpts, Ttl),
                    Ok;
                {error, _} = Error ->
                    stop_client(),
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

resolve_set(Configured, Nameserver) ->
    case {macula_dist_relay_set:source(Configured),
          macula_dist_relay_set:nameserver_opts(Nameserver)} of
        {{error, _} = Error, _} -> Error;
        {_, {error, _} = Error} -> Error;
        {Source, DnsOpts} ->
            case macula_dist_relay_set:resolve(Source, DnsOpts) of
                {ok, Set, Ttl} -> {ok, Source, DnsOpts, Set, Ttl};
                {error, Why} -> {error, {relay_set_unresolved, Why}}
            end
    end.

start_set_server(Source, DnsOpts, Ttl) ->
    Spec = #{id => macula_dist_relay_set_server,
             start => {macula_dist_relay_set_server, start_link, [Source, DnsOpts, Ttl]},
             restart => permanent, shutdown => 5000, type => worker},
    supervisor:start_child(?MODULE, Spec).

%% The set is now Set (it changed in DNS): the node joins its homes there
%% (its name is then claimed on them), and dials by it. Relays it no
%% longer needs are closed by the set server once idle. Answers the homes.
-spec set_changed([binary()]) -> [binary()].
set_changed(Set) ->
    {_Old, K, Node, Opts} = persistent_term:get({macula_dist, relay_set}),
    %% Every relay of the set has its client name before a dial can see it.
    Homes = install_set(Set, K, Node),
    persistent_term:put({macula_dist, relay_set}, {Set, K, Node, Opts}),
    _ = [ensure_relay(U) || U <- Homes],
    Homes.

%% Gives each relay of the set a client name that stays its own while
%% the set changes, and lists the clients (homes first).
install_set(Set, K, Node) ->
    Index = persistent_term:get({macula_dist, relay_index}, #{}),
    New = [U || U <- Set, not maps:is_key(U, Index)],
    Next = lists:max([0 | maps:values(Index)]) + 1,
    Numbered = lists:zip(New, lists:seq(Next, Next + length(New) - 1)),
    persistent_term:put({macula_dist, relay_index}, maps:merge(Index, maps:from_list(Numbered))),
    Homes = macula_dist_relay_set:homes(Node, Set, K),
    %% Relays that left the set stay listed (last) while they carry sessions.
    Left = maps:keys(Index) -- Set,
    persistent_term:put({macula_dist, relay_clients},
                        [client_name(U) || U <- Homes ++ (Set -- Homes) ++ Left]),
    Homes.

%% The node's relay set and how many homes a name has, if it runs on one.
-spec relay_set() -> {[binary()], pos_integer()} | undefined.
relay_set() ->
    case persistent_term:get({macula_dist, relay_set}, undefined) of
        {Set, K, _Node, _Opts} -> {Set, K};
        undefined -> undefined
    end.

%% This node's home relays in the set it runs on now.
-spec homes() -> [binary()].
homes() ->
    {Set, K, Node, _Opts} = persistent_term:get({macula_dist, relay_set}),
    macula_dist_relay_set:homes(Node, Set, K).

%% The client of relay Url of the set, joined now if it is not (its keeper
%% then keeps it until the set server closes it): the pid, or `undefined'
%% if it is not connected.
-spec ensure_relay(binary()) -> pid() | undefined.
ensure_relay(Url) ->
    case join_relay(Url) of
        {client, Client} ->
            Client;
        {joining, Keeper} ->
            case macula_dist_keeper:await_first([Keeper]) of
                {ok, Client} -> Client;
                {error, _} -> undefined
            end;
        {error, _} ->
            undefined
    end.

%% Joins relay Url of the set unless the node is on it: its client if it
%% is connected now, else its keeper, which connects in the background.
%% The supervisor starts such a keeper at once (it does not wait for the
%% relay), so a dial never waits for another dial's join.
-spec join_relay(binary()) -> {client, pid()} | {joining, pid()} | {error, term()}.
join_relay(Url) ->
    Name = client_name(Url),
    case whereis(Name) of
        undefined ->
            {_Set, _K, Node, Opts} = persistent_term:get({macula_dist, relay_set}),
            case start_keeper(relay_index(Url), Name, Url, Node, Opts, background) of
                {ok, Keeper} -> {joining, Keeper};
                {error, {already_started, Keeper}} -> {joining, Keeper};
                {error, _} = Error -> Error
            end;
        Client ->
            {client, Client}
    end.

%% The relays of the set this node has a client for (joined), with it.
-spec joined_relays() -> [{binary(), pid() | undefined}].
joined_relays() ->
    Index = persistent_term:get({macula_dist, relay_index}, #{}),
    Running = [I || {{macula_dist_keeper, I}, _, _, _} <- supervisor:which_children(?MODULE)],
    [{Url, whereis(client_name(Url))} || {Url, I} <- maps:to_list(Index), lists:member(I, Running)].

%% Leaves relay Url of the set (its keeper and client stop).
-spec leave_relay(binary()) -> ok.
leave_relay(Url) ->
    Id = {macula_dist_keeper, relay_index(Url)},
    _ = supervisor:terminate_child(?MODULE, Id),
    _ = supervisor:delete_child(?MODULE, Id),
    ok.

relay_index(Url) -> maps:get(Url, persistent_term:get({macula_dist, relay_index})).

client_name(Url) -> macula_dist_relay_client:client_name(relay_index(Url)).

urls([First | _] = Urls) when is_list(First); is_binary(First) -> Urls;
urls(Url) -> [Url].

start_keeper(I, Name, Url, Node, Opts, Mode) ->
    Spec = #{id => {macula_dist_keeper, I},
             start => {macula_dist_keeper, start_link, [Name, Url, Node, Opts, Mode]},
             restart => transient, shutdown => 10000, type => worker},
    case supervisor:start_child(?MODULE, Spec) of
        {ok, Pid, connected} -> {ok, Pid};
        {ok, Pid, joining} -> {ok, Pid};
        {ok, Pid, {error, Reason}} -> {waiting, Pid, Reason};
        {error, {already_started, Pid}} -> {error, {already_started, Pid}};
        {error, {Reason, _Child}} -> {error, Reason};
        {error, _} = Error -> Error
    end.

%% The node is up when one relay took it and none refused it.
booted(Urls, Started) ->
    Failed = [{Url, Why} || {Url, {W, _, Why}} <- lists:zip(Urls, Started), W =:= waiting]
        ++ [{Url, Why} || {Url, {error, Why}} <- lists:zip(Urls, Started)],
    Refused = [Why || {_, {refused, _} = Why} <- Failed],
    Up = [Pid || {ok, Pid} <- Started],
    [logger:warning("macula_dist: relay ~ts not joined yet (~p); trying again in the background",
                    [Url, Why]) || Up =/= [], Refused =:= [], {Url, Why} <- Failed],
    case {Up, Refused, Failed} of
        {[First | _], [], _} -> {ok, First};
        {_, [Why | _], _} -> {error, Why};
        {[], [], [{_, Why} | _]} -> {error, Why}
    end.

%% `-macula_dist autoconnect true': connect to the relay's other nodes as
%% they appear (as libcluster strategies do).
start_autoconnect() ->
    Spec = #{id => macula_dist_autoconnect,
             start => {macula_dist_autoconnect, start_link, []},
             restart => permanent, type => worker},
    case supervisor:start_child(?MODULE, Spec) of
        {ok, _} -> true;
        {error, {already_started, _}} -> true;
        {error, _} -> false
    end.

stop_client() ->
    _ = persistent_term:erase({macula_dist, relay_set}),
    _ = persistent_term:erase({macula_dist, relay_index}),
    Keepers = [Id || {Id, _, _, _} <- supervisor:which_children(?MODULE), is_client_child(Id)],
    [begin
         _ = supervisor:terminate_child(?MODULE, Id),
         _ = supervisor:delete_child(?MODULE, Id)
     end || Id <- Keepers],
    ok.

is_client_child({macula_dist_keeper, _}) -> true;
is_client_child(macula_dist_relay_set_server) -> true;
is_client_child(_) -> false.

init([]) ->
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, []}}.
