%% @doc A relay set: which relays of the set a node name lives on (its
%% home relays), computed alike by every node with no coordinator. The
%% same rendezvous (highest-random-weight) hash as
%% `macula_relay_proto::node::relay_set': a name's weight at a relay is the
%% first 8 bytes of SHA-256(Relay, 0, Name), and its homes are the K relays
%% where it weighs most. Relays are named by their URL as configured, so
%% every node of a cluster must list the set's URLs alike.
-module(macula_dist_relay_set).

-export([weight/2, homes/3, meeting_order/2, default_homes/0]).

-define(DEFAULT_HOMES, 2).

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
