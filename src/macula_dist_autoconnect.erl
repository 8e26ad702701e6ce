%% @doc `-macula_dist autoconnect true': every second, asks the relays which
%% nodes are on them and connects to those this node is not connected to
%% yet, as a libcluster strategy would. Hidden nodes are left alone.
%%
%% The names come from the relay, which (like any other token holder) may
%% list names made up to fill the atom table. So a name becomes an atom
%% only when this node is about to connect to it, only if it looks like a
%% node name, and at a bounded rate: each new name spends a token of a
%% bucket (`?BURST' tokens, one back every `?REFILL_MS'), a name that
%% connects gives its token back, and a name that failed is not tried
%% again for `?RETRY_MS'. Made-up names cost at most `?BURST' atoms at
%% once, then one per `?REFILL_MS'.
-module(macula_dist_autoconnect).
-behaviour(gen_server).

-export([start_link/0, looks_like_node_name/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(INTERVAL, 1000).
-define(BURST, 32).
-define(REFILL_MS, 5000).
-define(RETRY_MS, 60000).
%% Failed names remembered, at most.
-define(MAX_FAILED, 1024).

-record(state, {tokens = ?BURST :: non_neg_integer(),
                refilled :: integer(),
                %% Name => monotonic ms when it may be tried again.
                failed = #{} :: #{binary() => integer()},
                %% Connection attempts running: Pid => Name.
                trying = #{} :: #{pid() => binary()}}).

-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

init([]) ->
    erlang:send_after(?INTERVAL, self(), tick),
    {ok, #state{refilled = now_ms()}}.

handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info(tick, State) ->
    erlang:send_after(?INTERVAL, self(), tick),
    {noreply, connect_new(refill(State))};
handle_info({'DOWN', _, process, Pid, Connected}, #state{trying = Trying} = State) ->
    case maps:take(Pid, Trying) of
        {Name, Rest} -> {noreply, attempted(Name, Connected, State#state{trying = Rest})};
        error -> {noreply, State}
    end;
handle_info(_Info, State) ->
    {noreply, State}.

refill(#state{tokens = Tokens, refilled = Then} = State) ->
    Now = now_ms(),
    Earned = (Now - Then) div ?REFILL_MS,
    State#state{tokens = min(?BURST, Tokens + Earned), refilled = Then + Earned * ?REFILL_MS}.

connect_new(#state{tokens = Tokens, failed = Failed, trying = Trying} = State) ->
    Now = now_ms(),
    Known = [atom_to_binary(N) || N <- [node() | nodes(connected)]],
    Candidates = [N || N <- macula_dist_cluster:relay_node_names(),
                       not lists:member(N, Known),
                       not lists:member(N, maps:values(Trying)),
                       maps:get(N, Failed, Now) =< Now,
                       looks_like_node_name(N)],
    Chosen = lists:sublist(Candidates, Tokens),
    New = maps:from_list([{try_connect(N), N} || N <- Chosen]),
    State#state{tokens = Tokens - length(Chosen), trying = maps:merge(Trying, New)}.

%% The atom is made here, for a connection about to be tried.
try_connect(Name) ->
    {Pid, _} = spawn_monitor(fun() ->
                                     exit(net_kernel:connect_node(binary_to_atom(Name, utf8)))
                             end),
    Pid.

attempted(_Name, true, #state{tokens = Tokens} = State) ->
    State#state{tokens = min(?BURST, Tokens + 1)};
attempted(Name, _, #state{failed = Failed} = State) ->
    Now = now_ms(),
    Live = maps:filter(fun(_, Until) -> Until > Now end, Failed),
    Kept = case map_size(Live) >= ?MAX_FAILED of
               true -> #{};
               false -> Live
           end,
    State#state{failed = Kept#{Name => Now + ?RETRY_MS}}.

%% `name@host', each part of letters, digits, `_', `-' (and `.' in the
%% host), at most 255 bytes in all: what -sname and -name accept.
-spec looks_like_node_name(binary()) -> boolean().
looks_like_node_name(Name) when is_binary(Name), byte_size(Name) =< 255 ->
    case binary:split(Name, <<"@">>) of
        [Local, Host] when Local =/= <<>>, Host =/= <<>> ->
            only(Local, fun name_char/1) andalso only(Host, fun host_char/1);
        _ ->
            false
    end;
looks_like_node_name(_) ->
    false.

only(Bin, Allowed) -> lists:all(Allowed, binary_to_list(Bin)).

name_char(C) -> (C >= $a andalso C =< $z) orelse (C >= $A andalso C =< $Z)
                    orelse (C >= $0 andalso C =< $9) orelse C =:= $_ orelse C =:= $-.

host_char(C) -> name_char(C) orelse C =:= $..

now_ms() -> erlang:monotonic_time(millisecond).
