%% @doc `-macula_dist autoconnect true': every second, asks the relay which
%% nodes are on it and connects to those this node is not connected to
%% yet, as a libcluster strategy would. Hidden nodes are left alone.
-module(macula_dist_autoconnect).

-export([start_link/0, init/0]).

-define(INTERVAL, 1000).

-spec start_link() -> {ok, pid()}.
start_link() ->
    {ok, proc_lib:spawn_link(?MODULE, init, [])}.

init() ->
    loop().

loop() ->
    timer:sleep(?INTERVAL),
    Known = [node() | nodes(connected)],
    [spawn(net_kernel, connect_node, [N]) || N <- macula_dist:relay_nodes(),
                                             not lists:member(N, Known)],
    loop().
