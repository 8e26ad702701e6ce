%% @doc The Rust NIF behind macula_dist (native/macula_dist_nif).
%%
%% Nothing here waits on a normal scheduler: calls return at once and answer
%% by message, or run on a dirty scheduler.
%%
%% Client (owned by `macula_dist_relay_client'):
%%   `{macula_client, identified | {connect_failed, R} | {closed, R} | {log, Level, Text}}'
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
%% </ul>
-module(macula_dist_nif).

-export([loaded/0]).
-export([client_start/1, client_stop/1, client_request_tunnel/3, client_close_tunnel/2,
         client_set_kernel/3, client_status/1]).
-export([tunnel_send/3, tunnel_send_dirty/3, tunnel_set_owner/2, tunnel_set_packet/2,
         tunnel_activate/2, tunnel_close/1, tunnel_getstat/1, tunnel_info/1]).
-export([relay_start/1, relay_info/1, relay_stop/1, live_counts/0]).

-on_load(init/0).

-define(LOAD_ERROR, {?MODULE, load_error}).

init() ->
    Path = filename:join(priv_dir(), "macula_dist_nif"),
    case erlang:load_nif(Path, 0) of
        ok ->
            persistent_term:erase(?LOAD_ERROR),
            ok;
        {error, {reload, _}} ->
            ok;
        {error, Reason} ->
            %% Load the module anyway so callers get a clear error, not undef.
            persistent_term:put(?LOAD_ERROR, {Path, Reason}),
            logger:error("macula_dist: cannot load the NIF ~ts.so: ~p", [Path, Reason]),
            ok
    end.

priv_dir() ->
    case code:priv_dir(macula_dist) of
        {error, bad_name} ->
            filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        Dir ->
            Dir
    end.

%% @doc `ok' once the NIF is loaded, else why not.
-spec loaded() -> ok | {error, {nif_not_loaded, string(), term()}}.
loaded() ->
    case persistent_term:get(?LOAD_ERROR, undefined) of
        undefined -> ok;
        {Path, Reason} -> {error, {nif_not_loaded, Path ++ ".so", Reason}}
    end.

not_loaded() ->
    erlang:nif_error(case loaded() of ok -> nif_not_loaded; {error, E} -> E end).

client_start(_Opts) -> not_loaded().
client_stop(_Client) -> not_loaded().
client_request_tunnel(_Client, _Target, _Tag) -> not_loaded().
client_close_tunnel(_Client, _TunnelId) -> not_loaded().
client_set_kernel(_Client, _Kernel, _AcceptPid) -> not_loaded().
client_status(_Client) -> not_loaded().

tunnel_send(_Tunnel, _IoData, _Packets) -> not_loaded().
tunnel_send_dirty(_Tunnel, _IoData, _Packets) -> not_loaded().
tunnel_set_owner(_Tunnel, _Pid) -> not_loaded().
tunnel_set_packet(_Tunnel, _HeaderLen) -> not_loaded().
tunnel_activate(_Tunnel, _N) -> not_loaded().
tunnel_close(_Tunnel) -> not_loaded().
tunnel_getstat(_Tunnel) -> not_loaded().
tunnel_info(_Tunnel) -> not_loaded().

relay_start(_Opts) -> not_loaded().
relay_info(_Relay) -> not_loaded().
relay_stop(_Relay) -> not_loaded().

%% @doc `#{tunnels, clients}' alive in the NIF, for leak checks.
live_counts() -> not_loaded().
