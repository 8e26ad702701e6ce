%% @doc Keeps a node's relay set current, under macula_dist_sup while the
%% node runs on a set:
%% <ul>
%% <li>a set named in DNS is resolved again when its TTL runs out; when
%%     the answer changed, macula_dist_sup:set_changed/1 joins the new
%%     homes (the node's name is claimed there before peers look for it
%%     there) and dials go by the new set; a failed lookup keeps the set
%%     and is retried;</li>
%% <li>a relay the node joined for a target (not a home) is left once it
%%     carried no tunnel or session at two checks in a row and is not a
%%     home of a node this one is connected to (a session fails over to
%%     its target's other home), and a relay that left the set once it
%%     carries nothing. A relay that stopped
%%     being a home is kept at least twice the TTL (and ?MIN_GRACE_MS)
%%     longer, for peers that still resolve the set as it was. Nothing is
%%     left while none of the node's homes is up.</li>
%% </ul>
-module(macula_dist_relay_set_server).
-behaviour(gen_server).

-export([start_link/3]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(IDLE_CHECK_MS, 5000).
-define(RETRY_MS, 5000).
-define(MIN_GRACE_MS, 10000).

-record(state, {source :: macula_dist_relay_set:source(),
                dns_opts :: [{atom(), term()}],
                homes :: [binary()],
                %% Former homes and when they may be left.
                kept_until = #{} :: #{binary() => integer()},
                %% Checks in a row a joined relay was found idle.
                idle = #{} :: #{binary() => pos_integer()},
                %% The homes of each connected peer, for the set they were
                %% computed over (a 100-node mesh hashed every peer over
                %% the set at every check: 15 % of the nodes' reductions).
                peer_homes = {undefined, #{}} :: {term(), #{node() => [binary()]}}}).

-spec start_link(macula_dist_relay_set:source(), [{atom(), term()}], pos_integer() | infinity) ->
          {ok, pid()} | {error, term()}.
start_link(Source, DnsOpts, Ttl) ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, {Source, DnsOpts, Ttl}, []).

init({Source, DnsOpts, Ttl}) ->
    resolve_after(Ttl),
    erlang:send_after(?IDLE_CHECK_MS, self(), idle_check),
    {ok, #state{source = Source, dns_opts = DnsOpts, homes = macula_dist_sup:homes()}}.

handle_call(_Request, _From, S) ->
    {reply, {error, unknown_call}, S}.

handle_cast(_Msg, S) ->
    {noreply, S}.

handle_info(resolve, #state{source = Source, dns_opts = DnsOpts} = S) ->
    case macula_dist_relay_set:resolve(Source, DnsOpts) of
        {ok, Set, Ttl} ->
            resolve_after(Ttl),
            {noreply, follow(Set, Ttl, S)};
        {error, Why} ->
            logger:warning("macula_dist: relay set ~p not resolved (~p); keeping the set it had",
                           [Source, Why]),
            erlang:send_after(?RETRY_MS, self(), resolve),
            {noreply, S}
    end;
handle_info(idle_check, S) ->
    erlang:send_after(?IDLE_CHECK_MS, self(), idle_check),
    {noreply, leave_idle(S)};
handle_info(_Other, S) ->
    {noreply, S}.

resolve_after(infinity) -> ok;
resolve_after(Ttl) -> erlang:send_after(Ttl * 1000, self(), resolve).

%% The set as resolved now: nothing to do if it is the one in use.
follow(Set, Ttl, #state{homes = Old, kept_until = Kept} = S) ->
    case macula_dist_sup:relay_set() of
        {Set, _K} ->
            S;
        _ ->
            Homes = macula_dist_sup:set_changed(Set),
            logger:notice("macula_dist: the relay set is now ~p; this node's homes ~p", [Set, Homes]),
            Until = now_ms() + max(2 * Ttl * 1000, ?MIN_GRACE_MS),
            S#state{homes = Homes,
                    kept_until = maps:merge(Kept, maps:from_list([{U, Until} || U <- Old -- Homes]))}
    end.

leave_idle(#state{homes = Homes, kept_until = Kept0, idle = Idle0} = S) ->
    Now = now_ms(),
    Kept = maps:filter(fun(_, Until) -> Until > Now end, Kept0),
    Joined = macula_dist_sup:joined_relays(),
    %% With no home up (the new set's relays do not answer, or not with a
    %% trusted certificate) the relays that work are kept.
    HomeUp = lists:any(fun({Url, Client}) -> lists:member(Url, Homes) andalso is_up(Client) end,
                       Joined),
    %% The homes of every node this one is connected to stay joined: a
    %% session on one of a peer's homes fails over to its other home.
    {_, ByPeer} = PeerHomes = peer_homes(S#state.peer_homes),
    Needed = Homes ++ lists:usort(lists:append(maps:values(ByPeer))),
    Candidates = [{Url, Client} || HomeUp, {Url, Client} <- Joined,
                                   not lists:member(Url, Needed), not maps:is_key(Url, Kept)],
    Idle = maps:from_list([{Url, maps:get(Url, Idle0, 0) + 1}
                           || {Url, Client} <- Candidates, not carries(Client)]),
    Leave = [Url || {Url, N} <- maps:to_list(Idle), N >= 2],
    [begin
         logger:info("macula_dist: leaving relay ~ts (not a home, nothing on it)", [Url]),
         ok = macula_dist_sup:leave_relay(Url)
     end || Url <- Leave],
    S#state{kept_until = Kept, idle = maps:without(Leave, Idle), peer_homes = PeerHomes}.

%% The homes of the peers connected now: those of the last check kept
%% while the set is the same, the new ones computed, the gone ones dropped.
peer_homes({SetNow, Known}) ->
    case macula_dist_sup:relay_set() of
        {Set, K} = SetNow ->
            {SetNow, by_peer(Known, Set, K)};
        {Set, K} = Changed ->
            {Changed, by_peer(#{}, Set, K)};
        undefined ->
            {undefined, #{}}
    end.

by_peer(Known, Set, K) ->
    maps:from_list([{Peer, case Known of
                               #{Peer := Homes} -> Homes;
                               #{} -> macula_dist_relay_set:homes(atom_to_binary(Peer, utf8), Set, K)
                           end} || Peer <- erlang:nodes(connected)]).

%% Whether a relay client is connected to its relay.
is_up(undefined) ->
    false;
is_up(Client) ->
    try macula_dist_relay_client:status(Client) of
        #{connection := connected} -> true;
        _ -> false
    catch
        exit:_ -> false
    end.

%% Whether a relay client has a tunnel or session (a client not connected
%% carries nothing).
carries(undefined) ->
    false;
carries(Client) ->
    try macula_dist_relay_client:status(Client) of
        #{active_tunnels := A, pending_tunnels := P, e2e_sessions := E} -> A + P + E > 0;
        _ -> false
    catch
        exit:_ -> false
    end.

now_ms() -> erlang:monotonic_time(millisecond).
