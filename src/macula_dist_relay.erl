%% @doc A relay inside this VM, for tests and demos (the same Rust relay as
%% the `macula-dist-relay' binary). A process owns it; stopping the process
%% stops the relay.
%%
%% ```
%% {ok, Relay} = macula_dist_relay:start(#{port => 0}),
%% #{url := Url, fingerprint := Pin} = macula_dist_relay:info(Relay).
%% '''
-module(macula_dist_relay).
-behaviour(gen_server).

-export([start/1, start_link/1, info/1, stop/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-type opts() :: #{ip => string() | binary(), port => 0..65535,
                  token => string() | binary(),
                  cert_file => file:filename(), key_file => file:filename()}.
-export_type([opts/0]).

%% @doc Starts an unlinked relay. Options: `ip' (default "127.0.0.1"),
%% `port' (default 0: any free port), `token' (default none), `cert_file' and
%% `key_file' (PEM; default: a self-signed certificate made at start).
-spec start(opts()) -> {ok, pid()} | {error, term()}.
start(Opts) -> gen_server:start(?MODULE, Opts, []).

-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(Opts) -> gen_server:start_link(?MODULE, Opts, []).

%% @doc `#{url, address, port, fingerprint, nodes, tunnels}'.
-spec info(pid()) -> map().
info(Relay) -> gen_server:call(Relay, info).

-spec stop(pid()) -> ok.
stop(Relay) -> gen_server:stop(Relay).

init(Opts) when is_map(Opts) ->
    NifOpts = #{ip => text(maps:get(ip, Opts, "127.0.0.1")),
                port => maps:get(port, Opts, 0),
                token => text(maps:get(token, Opts, "")),
                cert_file => text(maps:get(cert_file, Opts, "")),
                key_file => text(maps:get(key_file, Opts, ""))},
    case macula_dist_nif:loaded() of
        ok ->
            case macula_dist_nif:relay_start(NifOpts) of
                {ok, Relay} -> {ok, Relay};
                {error, Reason} -> {stop, {relay_start_failed, Reason}}
            end;
        {error, Reason} ->
            {stop, Reason}
    end.

handle_call(info, _From, Relay) ->
    Info = #{address := Addr, port := Port} = macula_dist_nif:relay_info(Relay),
    Host = case string:find(Addr, ":") of nomatch -> Addr; _ -> [$[, Addr, $]] end,
    Url = iolist_to_binary(io_lib:format("quic://~ts:~b", [Host, Port])),
    {reply, Info#{url => Url}, Relay}.

handle_cast(_Msg, Relay) -> {noreply, Relay}.

handle_info(_Msg, Relay) -> {noreply, Relay}.

terminate(_Reason, Relay) ->
    macula_dist_nif:relay_stop(Relay).

text(V) when is_binary(V) -> V;
text(V) when is_list(V) -> unicode:characters_to_binary(V).
