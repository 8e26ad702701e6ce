%% @doc Client for one macula dist relay.
%%
%% A node keeps one client per relay of its list (registered as
%% `client_name(N)' for its `N'th relay; `clients/0' lists them in order),
%% each with its own QUIC connection to that relay (in the NIF), all of
%% them over the node's one UDP socket. Under `-proto_dist macula' each
%% client runs under a `macula_dist_keeper' that connects again, with
%% backoff, when the relay connection ends.
%%
%% Each distribution connection is a tunnel between two nodes. By default
%% (`tunnel => e2e') it is an end-to-end QUIC session between the nodes:
%% the relay only forwards its datagrams, which it cannot read or change,
%% and both ends prove they know the cookie for each other (SPAKE2, bound
%% to the session's TLS; in cluster-CA mode, certificates of the cluster's
%% CA) before a byte reaches `dist_util'. When a relay dies, a session
%% moves to another relay both nodes are on, or waits for the node's next
%% connection to this one, under the same QUIC connection; it may also go
%% direct between the nodes. Only with `tunnel => stream' (version 1, a
%% relay trusted with everything) is a tunnel a QUIC stream pair through
%% the relay, which splices its bytes.
%%
%% Lifecycle: `start_link/2,3,4' connects and identifies, and returns once the
%% relay answered (or with `{error, Reason}'). `request_tunnel/2' returns
%% `{ok, ConnRef, Tunnel}' once the tunnel is up; the caller owns it.
%% Inbound tunnels are handed to the kernel given with `set_kernel/2' as
%% `{accept, AcceptPid, Tunnel, inet, macula}'. When the relay connection
%% ends the client stops with `{shutdown, {relay_closed, Reason}}' (a
%% shutdown: the warning it logs is the report, not a crash report),
%% `Reason' being `replaced' when the relay gave this node's name to a
%% newer connection (of the same key), else the relay's text; stream tunnel owners get
%% `{macula_tunnel, Tunnel, closed}', e2e sessions carry on as above.
%%
%% Options (`start_link/3,4'; missing ones come from the `macula_dist'
%% application environment): `token', `pin_sha256' (hex SHA-256 of the
%% relay's certificate), `ca_cert' (PEM path), `verify => none' (explicitly
%% insecure, logged), `connect_timeout', `tunnel_timeout', `idle_timeout',
%% `keep_alive' (milliseconds), `tunnel' (`e2e' or `stream'), `cookie',
%% and the others of `macula_dist_config:client_opts/3'.
%%
%% The tunnel data API (send, framing, credit, owner, counters) is
%% documented in `macula_dist_nif'.
-module(macula_dist_relay_client).
-behaviour(gen_server).

-export([start_link/2, start_link/3, start_link/4, request_tunnel/2, close_tunnel/2,
         set_kernel/2, status/1, whereis_client/0, clients/0, client_name/1, relay_nodes/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2, format_status/1]).

-define(APP_OPTS, [token, pin_sha256, ca_cert, verify, connect_timeout, tunnel_timeout,
                   idle_timeout, keep_alive, tunnel, congestion, key_file, cluster_ca, node_cert,
                   node_key, direct, advertise, state_dir]).

-record(state, {client :: reference(), url :: binary(), node :: binary(),
                tunnel_timeout :: pos_integer(),
                cookie :: atom() | binary() | undefined}).

-spec start_link(binary() | string() | [binary() | string()], binary()) -> {ok, pid()} | {error, term()}.
start_link(RelayUrl, NodeName) ->
    start_link(RelayUrl, NodeName, #{}).

%% @doc Start the client with a locally-registered name so macula_dist can
%% find it without being passed the pid: `macula_dist_relay_client', the
%% name of a node's first relay's client (see `start_link/4' for the
%% others).
-spec start_link(binary() | string() | [binary() | string()], binary(), map()) -> {ok, pid()} | {error, term()}.
start_link(RelayUrl, NodeName, Opts) ->
    start_link(?MODULE, RelayUrl, NodeName, Opts).

%% @doc As `start_link/3', registered as `Name': a node with several relays
%% runs one client per relay (see `client_name/1').
-spec start_link(atom(), binary() | string() | [binary() | string()], binary(), map()) ->
          {ok, pid()} | {error, term()}.
start_link(Name, RelayUrl, NodeName, Opts) when is_atom(Name), is_map(Opts) ->
    case macula_dist_config:client_opts(RelayUrl, NodeName, maps:merge(app_opts(), Opts)) of
        {ok, NifOpts} ->
            %% The node shows the relay its own key (kept in state_dir, or
            %% key_file's): its name is then that key's. The cookie stays
            %% inside e2e sessions.
            Cookie = maps:get(cookie, Opts, undefined),
            gen_server:start_link({local, Name}, ?MODULE,
                                  {url_text(RelayUrl), NifOpts, Cookie}, []);
        {error, _} = Error ->
            Error
    end;
start_link(_Name, _RelayUrl, _NodeName, Opts) ->
    {error, {bad_options, Opts}}.

%% @doc The registered name of the client for the node's `N'th relay.
-spec client_name(pos_integer()) -> atom().
client_name(1) -> ?MODULE;
client_name(N) when is_integer(N), N > 1 ->
    list_to_atom("macula_dist_relay_client_" ++ integer_to_list(N)).

url_text([First | _]) when is_list(First); is_binary(First) -> url_text(First);
url_text(Url) -> unicode:characters_to_binary(Url).

app_opts() ->
    maps:from_list([{K, V} || K <- ?APP_OPTS, {ok, V} <- [application:get_env(macula_dist, K)]]).

%% @doc Request a tunnel to TargetNode. Blocks until the tunnel (an e2e
%% session, or a stream in stream mode) is ready or the request fails or
%% times out. Returns a `{ConnRef, Tunnel}' pair suitable for use as the
%% dist Socket in macula_dist; the caller owns the tunnel.
-spec request_tunnel(pid(), binary()) -> {ok, reference(), reference()} | {error, term()}.
request_tunnel(Client, Target) when is_atom(Target) ->
    request_tunnel(Client, atom_to_binary(Target, utf8));
request_tunnel(Client, Target) when is_binary(Target) ->
    case call(Client, handle) of
        {ok, Nif, Timeout, CookieOpt} ->
            %% The cookie authenticates an e2e session (in stream mode the
            %% NIF ignores it). A target that cannot take e2e sessions is
            %% an error, never a fallback to a stream the relay can read.
            request(Nif, Target, cookie(CookieOpt, Target), Timeout);
        {error, _} = Error ->
            Error
    end;
request_tunnel(_Client, Target) ->
    {error, {bad_target, Target}}.

request(Nif, Target, Cookie, Timeout) ->
    Tag = erlang:unique_integer([positive]),
    case macula_dist_nif:client_request_tunnel(Nif, Target, Tag, Cookie) of
        ok ->
            %% The NIF answers within Timeout; the margin only guards
            %% against a client that died meanwhile.
            receive {macula_tunnel_reply, Tag, Reply} -> Reply
            after Timeout + 5000 -> {error, timeout}
            end;
        {error, _} = Error ->
            Error
    end.

%% The cookie this node uses with Peer: the `cookie' option when given,
%% else erlang:get_cookie(Peer) (per-node cookies included). No atom is
%% made from a peer's name: a name that is not an atom yet has no cookie
%% of its own.
cookie(Cookie, _Peer) when is_binary(Cookie) -> Cookie;
cookie(Cookie, _Peer) when is_atom(Cookie), Cookie =/= undefined -> atom_to_binary(Cookie, utf8);
cookie(undefined, Peer) ->
    %% auth answers before distribution is up (while net_kernel listens).
    Own = try binary_to_existing_atom(text(Peer), utf8) of
              Node -> auth:get_cookie(Node)
          catch error:badarg -> auth:get_cookie()
          end,
    case Own of
        nocookie -> <<>>;
        _ -> atom_to_binary(Own, utf8)
    end.

text(Name) when is_atom(Name) -> atom_to_binary(Name, utf8);
text(Name) -> unicode:characters_to_binary(Name).

%% @doc The other nodes identified on this node's relay (its auth domain):
%% the nodes this node may reach there. `{error, unsupported}' from a
%% version 1 relay.
-spec relay_nodes(pid()) -> {ok, [binary()]} | {error, term()}.
relay_nodes(Client) ->
    case call(Client, handle) of
        {ok, Nif, Timeout, _} ->
            Tag = erlang:unique_integer([positive]),
            case macula_dist_nif:client_nodes(Nif, Tag) of
                ok ->
                    receive {macula_nodes_reply, Tag, Reply} -> Reply
                    after Timeout -> {error, timeout}
                    end;
                {error, _} = Error ->
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

-spec close_tunnel(pid(), binary()) -> ok.
close_tunnel(Client, TunnelId) when is_binary(TunnelId) ->
    case call(Client, handle) of
        {ok, Nif, _, _} -> _ = macula_dist_nif:client_close_tunnel(Nif, TunnelId), ok;
        {error, _} -> ok
    end.

%% @doc Tell the client which process to deliver `{accept, ...}' messages to
%% when inbound tunnels arrive. Called by `macula_dist:accept/1' with the
%% net_kernel pid (self() at that call site).
-spec set_kernel(pid(), pid()) -> ok.
set_kernel(Client, Kernel) when is_pid(Kernel) ->
    ok = gen_server:call(Client, {set_kernel, Kernel}).

-spec status(pid()) -> map().
status(Client) ->
    gen_server:call(Client, status).

%% @doc Locate the registered client, if any: with several relays, the
%% client of the first relay that has one now.
-spec whereis_client() -> pid() | undefined.
whereis_client() ->
    case clients() of
        [Client | _] -> Client;
        [] -> undefined
    end.

%% @doc The node's running relay clients, in the order of its relays.
-spec clients() -> [pid()].
clients() ->
    Names = persistent_term:get({macula_dist, relay_clients}, [?MODULE]),
    [Pid || Name <- Names, Pid <- [whereis(Name)], is_pid(Pid)].

call(Client, Request) ->
    try gen_server:call(Client, Request)
    catch exit:{noproc, _} -> {error, no_client};
          exit:{normal, _} -> {error, no_client};
          exit:{{shutdown, {relay_closed, _}}, _} -> {error, relay_closed}
    end.

%% gen_server

init({Url, #{node := Node, connect_timeout := ConnectTimeout,
             tunnel_timeout := TunnelTimeout} = NifOpts, Cookie}) ->
    process_flag(trap_exit, true),
    case start_nif(NifOpts) of
        {ok, Client} ->
            receive
                {macula_client, identified} ->
                    %% Distribution's acceptor hands every new client the kernel.
                    _ = [A ! {macula_client_up, self()} || A <- [whereis(macula_dist_acceptor)],
                                                           is_pid(A)],
                    {ok, #state{client = Client, url = Url, node = Node,
                                tunnel_timeout = TunnelTimeout, cookie = Cookie}};
                {macula_client, {connect_failed, {refused, relay_without_e2e}}} ->
                    logger:error("macula_dist: relay ~ts offers no end-to-end sessions (protocol "
                                 "v1 only): refused, as it could read and change distribution "
                                 "traffic. Use another relay, or -macula_dist tunnel stream to "
                                 "trust this one", [Url]),
                    fail_init({refused, {relay_without_e2e, Url}});
                {macula_client, {connect_failed, Reason}} ->
                    fail_init(Reason);
                {'EXIT', _Starter, Why} ->
                    %% Whoever started this gave up (the node is stopping).
                    macula_dist_nif:client_stop(Client),
                    exit(Why)
            after ConnectTimeout + 5000 ->
                    macula_dist_nif:client_stop(Client),
                    fail_init(timeout)
            end;
        {error, Reason} ->
            fail_init(Reason)
    end.

start_nif(#{insecure := Insecure} = NifOpts) ->
    Insecure andalso logger:warning("macula_dist: relay certificate NOT verified (verify => none)"),
    case macula_dist_nif:loaded() of
        ok ->
            try macula_dist_nif:client_start(NifOpts)
            catch error:Reason -> {error, Reason}
            end;
        {error, _} = Error ->
            Error
    end.

%% Answer start_link with {error, Reason} and exit normally, so a linked
%% caller gets an error value, not an exit signal.
fail_init(Reason) ->
    proc_lib:init_ack({error, Reason}),
    exit(normal).

handle_call(handle, _From, #state{client = C, tunnel_timeout = T, cookie = Cookie} = S) ->
    {reply, {ok, C, T, Cookie}, S};
handle_call({set_kernel, Kernel}, _From, #state{client = C} = S) ->
    %% This process is the AcceptPid: net_kernel's {Kernel, controller, Pid}
    %% replies come here (the handshake process claims its tunnel itself).
    ok = macula_dist_nif:client_set_kernel(C, Kernel, self()),
    {reply, ok, S};
handle_call(status, _From, #state{client = C, url = Url} = S) ->
    {reply, maps:put(relay_url, Url, macula_dist_nif:client_status(C)), S};
handle_call(Request, _From, S) ->
    {reply, {error, {unknown_call, Request}}, S}.

handle_cast(_Msg, S) ->
    {noreply, S}.

%% Reason is `replaced' when the relay gave this node's name to a newer
%% connection (its keeper then stops), else the relay's text.
handle_info({macula_client, {closed, Reason}}, S) ->
    logger:warning("macula_dist: relay connection closed: ~ts", [Reason]),
    {stop, {shutdown, {relay_closed, Reason}}, S};
handle_info({macula_client, {cookie, Source, Tag}}, #state{client = C, cookie = Cookie} = S) ->
    ok = macula_dist_nif:client_cookie(C, Tag, cookie(Cookie, Source)),
    {noreply, S};
handle_info({macula_client, {log, Level, Text}}, S) ->
    logger:log(Level, "macula_dist: ~ts", [Text]),
    {noreply, S};
handle_info({Kernel, controller, Pid}, S) when is_pid(Kernel), is_pid(Pid) ->
    {noreply, S};
handle_info({Kernel, unsupported_protocol}, S) when is_pid(Kernel) ->
    logger:error("macula_dist: net_kernel does not know the macula protocol"),
    {noreply, S};
handle_info({'EXIT', _Pid, Reason}, S) ->
    {stop, Reason, S};
handle_info(_Info, S) ->
    {noreply, S}.

%% Reports show the relay and node, not the NIF handle (a log that kept the
%% handle would keep the client alive).
format_status(#{state := #state{url = Url, node = Node}} = Status) ->
    Status#{state := #{relay_url => Url, node => Node}};
format_status(Status) ->
    Status.

terminate(_Reason, #state{client = C}) ->
    macula_dist_nif:client_stop(C),
    ok.
