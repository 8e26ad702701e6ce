%% @doc Supervises the relay client of `-proto_dist macula'. Started by
%% net_kernel's supervisor through `macula_dist:childspecs/0', before
%% distribution listens; `macula_dist:listen/2' starts the client in it,
%% once the node name is known.
-module(macula_dist_sup).
-behaviour(supervisor).

-export([start_link/0, start_client/3, stop_client/0, start_autoconnect/0]).
-export([init/1]).

start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% The client runs under a keeper that connects again whenever the relay
%% connection ends (and net_kernel's acceptor hands it the kernel again).
-spec start_client(binary() | string() | [binary() | string()], binary(), map()) -> {ok, pid()} | {error, term()}.
start_client(Url, Node, Opts) ->
    Spec = #{id => macula_dist_keeper,
             start => {macula_dist_keeper, start_link, [Url, Node, Opts]},
             restart => transient, shutdown => 10000, type => worker},
    _ = supervisor:delete_child(?MODULE, macula_dist_keeper),
    case supervisor:start_child(?MODULE, Spec) of
        {ok, Pid} -> {ok, Pid};
        {error, {already_started, Pid}} -> {ok, Pid};
        {error, {Reason, _Child}} -> {error, Reason};
        {error, _} = Error -> Error
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
    _ = supervisor:terminate_child(?MODULE, macula_dist_keeper),
    _ = supervisor:delete_child(?MODULE, macula_dist_keeper),
    ok.

init([]) ->
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, []}}.
