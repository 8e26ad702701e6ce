%% @doc Keeps one of the node's relay clients running under -proto_dist
%% macula (one keeper per relay; the client is registered as `Name').
%%
%% The first connection is made while `macula_dist:listen/2' waits, so a
%% wrong relay or configuration fails the boot with its reason. A node with
%% several relays boots with those that answer (`optional'): a keeper whose
%% relay did not answer reports why and keeps trying. After that,
%% when the relay connection ends (the client stops with `{relay_closed, _}'),
%% the keeper connects again, with backoff, for as long as it takes: a relay
%% outage costs the node its connections, never the node itself (net_kernel's
%% supervisor would give up after a few quick restarts, and take the node
%% down with it).
-module(macula_dist_keeper).

-export([start_link/5]).
-export([init/6]).

-define(MIN_BACKOFF, 100).
-define(MAX_BACKOFF, 5000).

%% Returns `{ok, Pid, connected}', or, `optional', `{ok, Pid, {error, Why}}'
%% while it keeps trying.
-spec start_link(atom(), string() | binary(), binary(), map(), required | optional) ->
          {ok, pid(), connected | {error, term()}} | {error, term()}.
start_link(Name, Url, Node, Opts, Mode) ->
    proc_lib:start_link(?MODULE, init, [self(), Name, Url, Node, Opts, Mode]).

init(Parent, Name, Url, Node, Opts, Mode) ->
    process_flag(trap_exit, true),
    Args = {Name, Url, Node, Opts},
    case macula_dist_relay_client:start_link(Name, Url, Node, Opts) of
        {ok, Client} ->
            proc_lib:init_ack(Parent, {ok, self(), connected}),
            watch(Parent, Client, Args);
        {error, Reason} when Mode =:= optional ->
            proc_lib:init_ack(Parent, {ok, self(), {error, Reason}}),
            reconnect(Parent, Args, ?MIN_BACKOFF);
        {error, Reason} ->
            proc_lib:init_ack(Parent, {error, Reason}),
            exit(normal)
    end.

watch(Parent, Client, Args) ->
    receive
        {'EXIT', Parent, Reason} ->
            stop_client(Client),
            exit(Reason);
        {'EXIT', Client, {relay_closed, Why} = Reason} when is_binary(Why) ->
            case binary:match(Why, <<"replaced">>) of
                nomatch ->
                    logger:warning("macula_dist: relay client stopped (~p); connecting again", [Reason]),
                    reconnect(Parent, Args, ?MIN_BACKOFF);
                _ ->
                    %% Another connection with this node's name and key took
                    %% over (this one had stopped answering): taking the
                    %% name back would split the node in two.
                    logger:error("macula_dist: the relay gave this node's name to a newer "
                                 "connection; not connecting again"),
                    exit(normal)
            end;
        {'EXIT', Client, Reason} ->
            logger:warning("macula_dist: relay client stopped (~p); connecting again", [Reason]),
            reconnect(Parent, Args, ?MIN_BACKOFF)
    end.

reconnect(Parent, {Name, Url, Node, Opts} = Args, Backoff) ->
    receive
        {'EXIT', Parent, Reason} -> exit(Reason)
    after Backoff ->
            case start_client(Name, Url, Node, Opts) of
                {ok, Client} ->
                    logger:notice("macula_dist: connected to relay ~p again", [Url]),
                    watch(Parent, Client, Args);
                {error, Reason} ->
                    logger:warning("macula_dist: relay ~p not reachable (~p); next try in ~b ms",
                                   [Url, Reason, min(Backoff * 2, ?MAX_BACKOFF)]),
                    reconnect(Parent, Args, min(Backoff * 2, ?MAX_BACKOFF))
            end
    end.

%% A connection attempt may take the whole connect_timeout (the relay is
%% down or stopped). Meanwhile the keeper does not trap exits, so a
%% shutdown (the node stopping) ends it at once, and the client that is
%% still connecting with it, instead of waiting for the attempt.
start_client(Name, Url, Node, Opts) ->
    process_flag(trap_exit, false),
    Started = macula_dist_relay_client:start_link(Name, Url, Node, Opts),
    process_flag(trap_exit, true),
    Started.

stop_client(Client) ->
    unlink(Client),
    try gen_server:stop(Client, shutdown, 5000) catch _:_ -> ok end,
    ok.
