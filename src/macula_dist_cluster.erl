%% @doc What a node running `-proto_dist macula' can ask about its cluster:
%% the other nodes on its relays, and the state of each relay connection.
%%
%% On a node without `-proto_dist macula' (or before distribution starts)
%% each answers with an empty list.
-module(macula_dist_cluster).

-export([relay_nodes/0, relay_node_names/0, status/0]).

%% @doc The other nodes on this node's relays, which it may connect to: an
%% atom for each name that already is one, a binary for the others. No atom
%% is made here: the names come from the relay, and a relay (or a token
%% holder cycling names) could otherwise fill the atom table.
-spec relay_nodes() -> [node() | binary()].
relay_nodes() ->
    [known_atom(N) || N <- relay_node_names()].

%% @doc The names of the other nodes on this node's relays, as binaries,
%% sorted, each once (a node on several of this node's relays is listed
%% once).
-spec relay_node_names() -> [binary()].
relay_node_names() ->
    lists:usort([N || Client <- macula_dist_relay_client:clients(),
                      {ok, Ns} <- [macula_dist_relay_client:relay_nodes(Client)], N <- Ns]).

%% @doc Every relay client's status, in the node's relay order. Each shows
%% its relay (`relay_url', `connection', `rtt_us', ...) and the e2e
%% sessions it carries now (`sessions': `#{peer, id, rtt_us, path}'), so the
%% relay a connection uses is the one whose `sessions' name its peer. A
%% client that does not answer (it is connecting again) is left out.
-spec status() -> [map()].
status() ->
    [S || Client <- macula_dist_relay_client:clients(),
          S <- [status_of(Client)], is_map(S)].

known_atom(Name) ->
    try binary_to_existing_atom(Name, utf8)
    catch error:badarg -> Name
    end.

%% A client that stopped since clients/0 listed it is skipped.
status_of(Client) ->
    try macula_dist_relay_client:status(Client)
    catch _:_ -> unavailable
    end.
