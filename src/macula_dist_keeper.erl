%% @doc Keeps one of the node's relay clients running under -proto_dist
%% macula (one keeper per relay; the client is registered as `Name').
%%
%% A `gen_statem' with two states: `connected' (its client runs, linked to
%% it) and `connecting' (waiting out the backoff, or a connection attempt
%% running). `sys:get_state/1' answers in both.
%%
%% The first connection is made while `macula_dist:listen/2' waits, so a
%% wrong relay or configuration fails the boot with its reason. A node with
%% several relays boots with those that answer (`optional'): a keeper whose
%% relay did not answer reports why and keeps trying. After that,
%% when the relay connection ends (the client stops with
%% `{shutdown, {relay_closed, _}}'),
%% the keeper connects again, with backoff (100 ms doubling to 5 s), for as
%% long as it takes: a relay outage costs the node its connections, never
%% the node itself (net_kernel's supervisor would give up after a few quick
%% restarts, and take the node down with it). Except when the relay gave
%% the node's name to a newer connection (`{relay_closed, replaced}'): the
%% keeper then stops for good.
%%
%% A keeper started `background' (a relay of the set joined as a dial
%% needs it) answers at once and makes its first attempt as it makes the
%% later ones, so that joins never queue behind each other in the node's
%% supervisor; `await_first/1' waits for its outcome.
%%
%% A connection attempt after the first runs in a process of its own (it
%% may wait the whole `connect_timeout' for a relay that is down), so the
%% keeper still answers `sys' and ends at once on its supervisor's
%% shutdown, stopping the attempt with it.
-module(macula_dist_keeper).
-behaviour(gen_statem).

-export([start_link/5, await_first/1]).
-export([init_it/6]).
-export([callback_mode/0, init/1, connecting/3, connected/3, terminate/3, format_status/1]).

-define(MIN_BACKOFF, 100).
-define(MAX_BACKOFF, 5000).
%% How long terminate/3 waits for a client to stop.
-define(STOP_TIMEOUT, 5000).

-record(data, {name :: atom(),
               url :: string() | binary(),
               node :: binary(),
               opts :: map(),
               %% The wait before the next attempt.
               backoff = ?MIN_BACKOFF :: pos_integer(),
               %% connected: the running client.
               client :: pid() | undefined,
               %% connecting: the process running an attempt, if any.
               dialer :: pid() | undefined,
               %% connecting: await_first/1 callers, answered by the
               %% attempt's outcome.
               waiters = [] :: [gen_statem:from()],
               %% Whether a connection was made before (the next is
               %% logged as made "again").
               connected_before = true :: boolean()}).

%% Returns `{ok, Pid, connected}', or, `optional', `{ok, Pid, {error, Why}}'
%% while it keeps trying, or, `background', `{ok, Pid, joining}' before
%% its first attempt.
-spec start_link(atom(), string() | binary(), binary(), map(),
                 required | optional | background) ->
          {ok, pid(), connected | joining | {error, term()}} | {error, term()}.
start_link(Name, Url, Node, Opts, Mode) ->
    proc_lib:start_link(?MODULE, init_it, [self(), Name, Url, Node, Opts, Mode]).

%% gen_statem's own start cannot answer with the first attempt's outcome:
%% this makes the attempt, answers start_link/5, then becomes the gen_statem.
init_it(Starter, Name, Url, Node, Opts, background) ->
    process_flag(trap_exit, true),
    proc_lib:init_ack(Starter, {ok, self(), joining}),
    Data = #data{name = Name, url = Url, node = Node, opts = Opts, connected_before = false},
    gen_statem:enter_loop(?MODULE, [], connecting, Data, [retry(0)]);
init_it(Starter, Name, Url, Node, Opts, Mode) ->
    process_flag(trap_exit, true),
    Data = #data{name = Name, url = Url, node = Node, opts = Opts},
    case macula_dist_relay_client:start_link(Name, Url, Node, Opts) of
        {ok, Client} ->
            proc_lib:init_ack(Starter, {ok, self(), connected}),
            gen_statem:enter_loop(?MODULE, [], connected, Data#data{client = Client});
        {error, Reason} when Mode =:= optional ->
            proc_lib:init_ack(Starter, {ok, self(), {error, Reason}}),
            gen_statem:enter_loop(?MODULE, [], connecting, Data, [retry(?MIN_BACKOFF)]);
        {error, Reason} ->
            proc_lib:init_ack(Starter, {error, Reason}),
            exit(normal)
    end.

%% The client of whichever keeper connects first (each answers after its
%% next attempt), or `{error, none_connected}' once every one has failed.
-spec await_first([pid()]) -> {ok, pid()} | {error, none_connected}.
await_first(Keepers) ->
    first_answer(lists:foldl(fun(K, Ids) -> gen_statem:send_request(K, await_client, K, Ids) end,
                             gen_statem:reqids_new(), Keepers)).

first_answer(Requests) ->
    case gen_statem:receive_response(Requests, infinity, true) of
        {{reply, {ok, Client}}, _Keeper, _Rest} -> {ok, Client};
        {{reply, {error, _}}, _Keeper, Rest} -> first_answer(Rest);
        {{error, _}, _Keeper, Rest} -> first_answer(Rest);
        no_request -> {error, none_connected}
    end.

callback_mode() ->
    state_functions.

%% Not used: start_link/5 starts the keeper through init_it/6.
init(_) ->
    {stop, use_start_link_5}.

%% ---- connecting ----

connecting(state_timeout, dial, Data) ->
    {keep_state, Data#data{dialer = dial(Data)}};
connecting({call, From}, await_client, #data{waiters = Waiters} = Data) ->
    {keep_state, Data#data{waiters = [From | Waiters]}};
connecting(info, {dialed, Dialer, {ok, Client}}, #data{dialer = Dialer, url = Url} = Data) ->
    link(Client),
    Dialer ! {linked, self()},
    Data#data.connected_before andalso
        logger:notice("macula_dist: connected to relay ~p again", [Url]),
    {next_state, connected,
     Data#data{dialer = undefined, client = Client, backoff = ?MIN_BACKOFF, waiters = [],
               connected_before = true},
     [{reply, From, {ok, Client}} || From <- Data#data.waiters]};
connecting(info, {dialed, Dialer, {error, Reason}}, #data{dialer = Dialer} = Data) ->
    not_reachable(Reason, Data);
%% The attempt crashed before it answered.
connecting(info, {'EXIT', Dialer, Reason}, #data{dialer = Dialer} = Data) ->
    not_reachable(Reason, Data);
connecting(Type, Event, _Data) ->
    other(Type, Event).

not_reachable(Reason, #data{url = Url, backoff = Backoff, waiters = Waiters} = Data) ->
    Next = min(Backoff * 2, ?MAX_BACKOFF),
    logger:warning("macula_dist: relay ~p not reachable (~p); next try in ~b ms",
                   [Url, Reason, Next]),
    {keep_state, Data#data{dialer = undefined, backoff = Next, waiters = []},
     [retry(Next) | [{reply, From, {error, Reason}} || From <- Waiters]]}.

retry(Backoff) ->
    {state_timeout, Backoff, dial}.

%% The attempt's process starts the client (which links to it), reports,
%% and lets go of the client once the keeper has linked to it: the client
%% is never without a linked owner, and a keeper that ends takes the
%% attempt, and the client it is starting, with it.
dial(#data{name = Name, url = Url, node = Node, opts = Opts}) ->
    Keeper = self(),
    proc_lib:spawn_link(fun() -> dialer(Keeper, Name, Url, Node, Opts) end).

dialer(Keeper, Name, Url, Node, Opts) ->
    case macula_dist_relay_client:start_link(Name, Url, Node, Opts) of
        {ok, Client} = Started ->
            Keeper ! {dialed, self(), Started},
            receive {linked, Keeper} -> unlink(Client) end;
        {error, _} = Error ->
            Keeper ! {dialed, self(), Error}
    end.

%% ---- connected ----

connected(info, {'EXIT', Client, {shutdown, {relay_closed, replaced}}},
          #data{client = Client} = Data) ->
    %% Another connection with this node's name and key took over (this
    %% one had stopped answering): taking the name back would split the
    %% node in two.
    logger:error("macula_dist: the relay gave this node's name to a newer "
                 "connection; not connecting again"),
    {stop, normal, Data#data{client = undefined}};
connected(info, {'EXIT', Client, Reason}, #data{client = Client} = Data) ->
    logger:warning("macula_dist: relay client stopped (~p); connecting again", [Reason]),
    {next_state, connecting, Data#data{client = undefined, backoff = ?MIN_BACKOFF},
     [retry(?MIN_BACKOFF)]};
connected({call, From}, await_client, #data{client = Client}) ->
    {keep_state_and_data, [{reply, From, {ok, Client}}]};
connected(Type, Event, _Data) ->
    other(Type, Event).

%% The attempt's process ending after it answered, and anything else.
other({call, From}, _Request) ->
    {keep_state_and_data, [{reply, From, {error, unknown_call}}]};
other(_Type, _Event) ->
    keep_state_and_data.

%% ---- stopping ----

terminate(_Reason, _State, #data{name = Name, client = Client, dialer = Dialer}) ->
    stop_dialer(Dialer, Name),
    stop_client(Client).

%% The client it was starting is registered already: once the attempt's
%% process is gone, wait for that client too, so the name is free for
%% whoever starts the next one.
stop_dialer(undefined, _Name) ->
    ok;
stop_dialer(Dialer, Name) ->
    unlink(Dialer),
    exit(Dialer, shutdown),
    await_down(Dialer),
    await_down(whereis(Name)).

await_down(undefined) ->
    ok;
await_down(Pid) ->
    Ref = monitor(process, Pid),
    receive {'DOWN', Ref, process, Pid, _} -> ok
    after ?STOP_TIMEOUT -> demonitor(Ref, [flush]), ok
    end.

stop_client(undefined) ->
    ok;
stop_client(Client) ->
    unlink(Client),
    try gen_server:stop(Client, shutdown, ?STOP_TIMEOUT) catch _:_ -> ok end,
    ok.

%% Reports show the relay and the node, not the options (the relay's token).
format_status(#{data := #data{url = Url, node = Node, backoff = Backoff,
                              client = Client, dialer = Dialer}} = Status) ->
    Status#{data := #{relay_url => Url, node => Node, backoff => Backoff,
                      client => Client, dialer => Dialer}};
format_status(Status) ->
    Status.
