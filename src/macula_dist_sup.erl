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
-export([start_set_client/4, ensure_relay/1, relay_set/0]).
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

%% A relay set: the node joins its K home relays now (a client for each,
%% named by the relay's place in the set), and a target's homes when it
%% first dials it (ensure_relay/1). clients() lists the homes first.
-spec start_set_client([binary() | string()], pos_integer(), binary(), map()) ->
          {ok, pid()} | {error, term()}.
start_set_client(Urls, K, Node, Opts) ->
    stop_client(),
    Set = [unicode:characters_to_binary(U) || U <- Urls],
    Homes = macula_dist_relay_set:homes(Node, Set, K),
    Order = Homes ++ (Set -- Homes),
    persistent_term:put({macula_dist, relay_clients}, [set_client_name(U, Set) || U <- Order]),
    persistent_term:put({macula_dist, relay_set}, {Set, K, Node, Opts}),
    Mode = case Homes of [_] -> required; _ -> optional end,
    Started = [start_keeper(set_index(U, Set), set_client_name(U, Set), U, Node, Opts, Mode)
               || U <- Homes],
    case booted(Homes, Started) of
        {ok, _} = Ok -> Ok;
        {error, _} = Error -> stop_client(), Error
    end.

%% The node's relay set and how many homes a name has, if it runs on one.
-spec relay_set() -> {[binary()], pos_integer()} | undefined.
relay_set() ->
    case persistent_term:get({macula_dist, relay_set}, undefined) of
        {Set, K, _Node, _Opts} -> {Set, K};
        undefined -> undefined
    end.

%% The client of relay Url of the set, joined now if it is not (its keeper
%% then keeps it, as a home's): the pid, or `undefined' if it is not
%% connected.
-spec ensure_relay(binary()) -> pid() | undefined.
ensure_relay(Url) ->
    {Set, _K, Node, Opts} = persistent_term:get({macula_dist, relay_set}),
    Name = set_client_name(Url, Set),
    case whereis(Name) of
        undefined ->
            _ = start_keeper(set_index(Url, Set), Name, Url, Node, Opts, optional),
            whereis(Name);
        Pid ->
            Pid
    end.

set_index(Url, Set) -> length(lists:takewhile(fun(U) -> U =/= Url end, Set)) + 1.

set_client_name(Url, Set) -> macula_dist_relay_client:client_name(set_index(Url, Set)).

urls([First | _] = Urls) when is_list(First); is_binary(First) -> Urls;
urls(Url) -> [Url].

start_keeper(I, Name, Url, Node, Opts, Mode) ->
    Spec = #{id => {macula_dist_keeper, I},
             start => {macula_dist_keeper, start_link, [Name, Url, Node, Opts, Mode]},
             restart => transient, shutdown => 10000, type => worker},
    case supervisor:start_child(?MODULE, Spec) of
        {ok, Pid, connected} -> {ok, Pid};
        {ok, Pid, {error, Reason}} -> {waiting, Pid, Reason};
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
    Keepers = [Id || {{macula_dist_keeper, _} = Id, _, _, _} <- supervisor:which_children(?MODULE)],
    [begin
         _ = supervisor:terminate_child(?MODULE, Id),
         _ = supervisor:delete_child(?MODULE, Id)
     end || Id <- Keepers],
    ok.

init([]) ->
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, []}}.
