%% @doc The Rust NIF behind macula_dist (native/macula_dist_nif).
%%
%% Nothing here waits on a normal scheduler: calls return at once and answer
%% by message, or run on a dirty scheduler.
%%
%% Client (owned by `macula_dist_relay_client'):
%%   `{macula_client, identified | {connect_failed, R} | {closed, R} | {log, Level, Text}}'
%%   (`{closed, replaced}' when the relay gave the node's name to a newer
%%   connection, else `{closed, Text}')
%%   `{macula_client, {cookie, Source, Tag}}': an e2e session from Source
%%   needs the cookie this node uses with it; answer `client_cookie(C, Tag, Cookie)'.
%% Tunnel requests answer the caller:
%%   `{macula_tunnel_reply, Tag, {ok, ConnRef, Tunnel} | {error, Reason}}'
%% Inbound tunnels go to the kernel set with `client_set_kernel/3':
%%   `{accept, AcceptPid, Tunnel, inet, macula}'
%%
%% Tunnel data API (a `Tunnel' is a resource reference):
%% <ul>
%% <li>`tunnel_send(T, IoData, Packets)': queue bytes; `ok', `busy' (queued,
%%     but wait for `{macula_tunnel, T, writable}' before sending more), or
%%     `{error, closed}'. Use `tunnel_send_dirty/3' for large iodata.</li>
%% <li>`tunnel_set_packet(T, 0 | 2 | 4)': raw, or 2/4-byte length framing
%%     parsed in Rust; switchable at any time, it applies to every byte not
%%     yet delivered.</li>
%% <li>`tunnel_activate(T, N)': allow N more `{macula_tunnel, T, {data, [binary()]}}'
%%     messages (like `{active, N}'); without credit the NIF stops reading and
%%     QUIC flow control pushes back on the peer.</li>
%% <li>`tunnel_set_owner(T, Pid)': messages go to Pid, which is monitored:
%%     the tunnel closes when its owner dies. Bytes that arrive before an
%%     owner activates the tunnel wait in the NIF.</li>
%% <li>`{macula_tunnel, T, closed}' when the peer or the relay ends it;
%%     `tunnel_close(T)' sends what is queued, then finishes the stream.</li>
%% <li>`tunnel_getstat(T)' gives `{RecvPackets, SendPackets, SendPendingBytes}';
%%     `tunnel_info(T)' a map with byte counts, id, peer and direction.</li>
%% <li>`tunnel_split_by_sender(T)': from now on (the distribution handshake
%%     is done, the strict-order flags rejected) each sending process's
%%     packets go on a QUIC stream of their own; `{error, not_e2e}' on a
%%     stream tunnel.</li>
%% </ul>
-module(macula_dist_nif).

-export([loaded/0]).
-export([client_start/1, client_stop/1, client_request_tunnel/4, client_close_tunnel/2,
         client_set_kernel/3, client_status/1, client_cookie/3, client_nodes/2]).
-export([tunnel_send/3, tunnel_send_dirty/3, tunnel_set_owner/2, tunnel_set_packet/2,
         tunnel_activate/2, tunnel_close/1, tunnel_getstat/1, tunnel_info/1,
         tunnel_split_by_sender/1]).
-export([relay_start/1, relay_info/1, relay_stop/1, live_counts/0]).
-export([dist_routes/1, dist_lane_of_pid/1]).

-define(STATE, {?MODULE, load_state}).

%% The library is loaded on first use, not in -on_load: in an embedded
%% release -on_load runs before the code server can find priv/.
-spec loaded() -> ok | {error, {nif_not_loaded, string(), term()}}.
loaded() ->
    case persistent_term:get(?STATE, undefined) of
        undefined -> load();
        State -> State
    end.

load() ->
    Path = filename:join(priv_dir(), "macula_dist_nif"),
    State = case erlang:load_nif(Path, 0) of
                ok -> ok;
                {error, {reload, _}} -> ok;
                {error, {upgrade, _}} -> ok;
                {error, Reason} ->
                    logger:error("macula_dist: cannot load the NIF ~ts.so: ~p", [Path, Reason]),
                    {error, {nif_not_loaded, Path ++ ".so", Reason}}
            end,
    persistent_term:put(?STATE, State),
    State.

priv_dir() ->
    case code:priv_dir(macula_dist) of
        {error, bad_name} ->
            filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        Dir ->
            Dir
    end.

%% A stub runs only while the library is not loaded: load it and call again.
not_loaded(Function, Args) ->
    Before = persistent_term:get(?STATE, undefined),
    case loaded() of
        ok when Before =:= undefined -> apply(?MODULE, Function, Args);
        ok -> erlang:nif_error({not_in_nif, Function});
        {error, Reason} -> erlang:nif_error(Reason)
    end.

client_start(Opts) -> not_loaded(?FUNCTION_NAME, [Opts]).
client_stop(Client) -> not_loaded(?FUNCTION_NAME, [Client]).
client_request_tunnel(Client, Target, Tag, Cookie) -> not_loaded(?FUNCTION_NAME, [Client, Target, Tag, Cookie]).
client_cookie(Client, Tag, Cookie) -> not_loaded(?FUNCTION_NAME, [Client, Tag, Cookie]).
client_nodes(Client, Tag) -> not_loaded(?FUNCTION_NAME, [Client, Tag]).
client_close_tunnel(Client, TunnelId) -> not_loaded(?FUNCTION_NAME, [Client, TunnelId]).
client_set_kernel(Client, Kernel, AcceptPid) -> not_loaded(?FUNCTION_NAME, [Client, Kernel, AcceptPid]).
client_status(Client) -> not_loaded(?FUNCTION_NAME, [Client]).

tunnel_send(Tunnel, IoData, Packets) -> not_loaded(?FUNCTION_NAME, [Tunnel, IoData, Packets]).
tunnel_send_dirty(Tunnel, IoData, Packets) -> not_loaded(?FUNCTION_NAME, [Tunnel, IoData, Packets]).
tunnel_set_owner(Tunnel, Pid) -> not_loaded(?FUNCTION_NAME, [Tunnel, Pid]).
tunnel_set_packet(Tunnel, HeaderLen) -> not_loaded(?FUNCTION_NAME, [Tunnel, HeaderLen]).
tunnel_activate(Tunnel, N) -> not_loaded(?FUNCTION_NAME, [Tunnel, N]).
tunnel_close(Tunnel) -> not_loaded(?FUNCTION_NAME, [Tunnel]).
tunnel_getstat(Tunnel) -> not_loaded(?FUNCTION_NAME, [Tunnel]).
tunnel_info(Tunnel) -> not_loaded(?FUNCTION_NAME, [Tunnel]).
tunnel_split_by_sender(Tunnel) -> not_loaded(?FUNCTION_NAME, [Tunnel]).

relay_start(Opts) -> not_loaded(?FUNCTION_NAME, [Opts]).
relay_info(Relay) -> not_loaded(?FUNCTION_NAME, [Relay]).
relay_stop(Relay) -> not_loaded(?FUNCTION_NAME, [Relay]).

%% @doc `#{tunnels, clients}' alive in the NIF, for leak checks.
live_counts() -> not_loaded(?FUNCTION_NAME, []).

%% @doc Where an e2e session's router sends each packet of a list, as
%% `dist_ctrl_get_data' gave them (in order; later fragments follow their
%% first): `control', `fence' or `{lane, N}'. For tests of what the VM sends.
-spec dist_routes([binary()]) -> [control | fence | {lane, non_neg_integer()}].
dist_routes(Packets) -> not_loaded(?FUNCTION_NAME, [Packets]).

%% @doc The lane of a pid's packets, from `term_to_binary(Pid)'.
-spec dist_lane_of_pid(binary()) -> non_neg_integer() | undefined.
dist_lane_of_pid(PidTerm) -> not_loaded(?FUNCTION_NAME, [PidTerm]).
