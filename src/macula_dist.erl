%% @doc `-proto_dist macula': Erlang distribution through macula QUIC relays.
%%
%% ```
%% erl -proto_dist macula -no_epmd -sname alice \
%%     -macula_dist relay '"quic://127.0.0.1:4434"' -macula_dist pin_sha256 '"<hex>"'
%% '''
%%
%% This is the carrier module that net_kernel calls; what a user may ask
%% about the cluster is in `macula_dist_cluster'.
%%
%% `listen/2' starts one relay client per relay, each under a keeper,
%% under `macula_dist_sup' (which net_kernel's supervisor starts from
%% `childspecs/0'). Each connection is a tunnel (an end-to-end session, or
%% a stream in stream mode): `setup/5' asks the node's relays for one by
%% node name, in order; inbound ones arrive as `{accept, ...}' at
%% net_kernel. Node names are `name@host'; the host part is a name only,
%% never dialled.
%%
%% Per connection, as in OTP's gen_tcp_dist example: the handshake process
%% (which then runs dist_util's connection loop, ticks included), a
%% controller process (handshake I/O, then output: it pulls
%% `dist_ctrl_get_data' and hands whole batches to the NIF, which in an
%% e2e session puts each sending process's packets on a QUIC stream of
%% their own, so no process waits behind another's), and an input
%% process (owns the tunnel after the handshake; feeds
%% `dist_ctrl_put_data' from batches that the NIF framed).
-module(macula_dist).

-export([listen/1, listen/2, accept/1, accept_connection/5, setup/5, close/1, select/1,
         address/0, is_node_name/1, childspecs/0, setopts/2, getopts/2]).
-export([do_setup/6, do_accept/5, acceptor/1, controller/2, input_handler/3]).
%% Moved to macula_dist_cluster; kept for callers of the old names.
-export([relay_nodes/0, relay_node_names/0, status/0]).
-deprecated([{relay_nodes, 0, "use macula_dist_cluster:relay_nodes/0"},
             {relay_node_names, 0, "use macula_dist_cluster:relay_node_names/0"},
             {status, 0, "use macula_dist_cluster:status/0"}]).

-include_lib("kernel/include/net_address.hrl").
-include_lib("kernel/include/dist_util.hrl").

-define(SPAWN_OPTS, [{message_queue_data, off_heap}, {fullsweep_after, 0}]).
%% Dist packets pulled per NIF call, at most, and their bytes.
-define(BATCH_PACKETS, 1024).
-define(BATCH_BYTES, 262144).
%% Iodata over this goes to the NIF on a dirty scheduler.
-define(DIRTY_BYTES, 1048576).
%% Batches the NIF may have in flight to the input handler.
-define(INPUT_CREDIT, 4).

%% ---- listening ----

childspecs() ->
    {ok, [#{id => macula_dist_sup, start => {macula_dist_sup, start_link, []},
            type => supervisor}]}.

listen(Name) ->
    {ok, Host} = inet:gethostname(),
    listen(Name, Host).

listen(Name, Host) ->
    Node = iolist_to_binary([atom_to_list(Name), "@", Host]),
    case macula_dist_config:boot_config() of
        {ok, Urls, Opts} ->
            case ensure_client(Urls, Node, Opts) of
                {ok, Client} ->
                    maps:get(autoconnect, Opts, false) andalso macula_dist_sup:start_autoconnect(),
                    {ok, {Client, address(Host), creation()}};
                {error, Reason} ->
                    logger:error("macula_dist: cannot join relay ~p as ~ts: ~p",
                                 [Urls, Node, Reason]),
                    {error, {relay, Reason}}
            end;
        {error, Reason} ->
            logger:error("macula_dist: ~p", [Reason]),
            {error, Reason}
    end.

%% Under net_kernel's supervisor when there is one (a node that booted with
%% -proto_dist macula); else started here, standalone.
ensure_client(Url, Node, Opts) ->
    case whereis(macula_dist_sup) of
        undefined ->
            case macula_dist_sup:start_link() of
                {ok, Sup} -> unlink(Sup);
                {error, {already_started, _}} -> ok
            end;
        _ ->
            ok
    end,
    ClientOpts = maps:without([relay_set, homes], Opts),
    case maps:get(relay_set, Opts, false) of
        true ->
            K = maps:get(homes, Opts, macula_dist_relay_set:default_homes()),
            macula_dist_sup:start_set_client(Url, K, Node, ClientOpts);
        false ->
            macula_dist_sup:start_client(Url, Node, maps:remove(relay_set_nameserver, ClientOpts))
    end.

%% @doc Deprecated: use `macula_dist_cluster:relay_nodes/0'.
-spec relay_nodes() -> [node() | binary()].
relay_nodes() -> macula_dist_cluster:relay_nodes().

%% @doc Deprecated: use `macula_dist_cluster:relay_node_names/0'.
-spec relay_node_names() -> [binary()].
relay_node_names() -> macula_dist_cluster:relay_node_names().

%% @doc Deprecated: use `macula_dist_cluster:status/0'.
-spec status() -> [map()].
status() -> macula_dist_cluster:status().

creation() ->
    rand:uniform((1 bsl 32) - 5) + 3.

address() ->
    {ok, Host} = inet:gethostname(),
    address(Host).

address(Host) ->
    #net_address{address = relay, host = Host, protocol = macula, family = inet}.

%% net_kernel links to the acceptor. It hands the kernel to every relay
%% client: those running now, and each new one (a keeper's reconnect), which
%% announces itself with `{macula_client_up, Client}' once identified.
accept(_Client) ->
    spawn_opt(?MODULE, acceptor, [self()], [link, {priority, max}]).

acceptor(Kernel) ->
    register_acceptor(50),
    [hand_kernel(Client, Kernel) || Client <- macula_dist_relay_client:clients()],
    accept_loop(Kernel).

accept_loop(Kernel) ->
    receive
        {macula_client_up, Client} ->
            hand_kernel(Client, Kernel),
            accept_loop(Kernel)
    end.

%% The acceptor of a net_kernel that just stopped may still hold the name.
register_acceptor(Tries) ->
    try register(macula_dist_acceptor, self())
    catch error:badarg when Tries > 0 ->
            timer:sleep(20),
            register_acceptor(Tries - 1)
    end.

%% A client that stopped meanwhile is skipped: its successor announces itself.
hand_kernel(Client, Kernel) ->
    try macula_dist_relay_client:set_kernel(Client, Kernel)
    catch exit:_ -> ok
    end.

close(_Client) ->
    macula_dist_sup:stop_client().

select(Node) -> is_node_name(Node).

is_node_name(Node) when is_atom(Node) ->
    case string:split(atom_to_list(Node), "@", all) of
        [Name, Host] -> Name =/= "" andalso Host =/= "";
        _ -> false
    end;
is_node_name(_) ->
    false.

setopts(_Listen, []) -> ok;
setopts(_Listen, Opts) -> {error, {badopts, Opts}}.

getopts(_Listen, _Opts) -> {ok, []}.

%% ---- connecting ----

setup(Node, Type, MyNode, LongOrShortNames, SetupTime) ->
    spawn_opt(?MODULE, do_setup, [self(), Node, Type, MyNode, LongOrShortNames, SetupTime],
              dist_util:net_ticker_spawn_options()).

do_setup(Kernel, Node, Type, MyNode, _LongOrShortNames, SetupTime) ->
    Timer = dist_util:start_timer(SetupTime),
    case is_node_name(Node) andalso dial_clients(Node) of
        [_ | _] = Clients ->
            %% Joining the target's relays is finding where it is (as
            %% inet_tls_dist resets its timer after the address lookup):
            %% the session gets the whole set-up time.
            dist_util:reset_timer(Timer),
            case request_tunnel(Clients, atom_to_binary(Node, utf8), []) of
                {ok, _ConnRef, Tunnel} ->
                    %% The session is up (the node reached, keys and
                    %% cookie proven): the distribution handshake gets
                    %% the whole set-up time, as inet_tls_dist's
                    %% accepting side starts its timer after the TLS
                    %% handshake.
                    dist_util:reset_timer(Timer),
                    Ctrl = start_controller(Tunnel, undefined),
                    HSData = (hs_data(Ctrl, Tunnel))#hs_data{
                               kernel_pid = Kernel, other_node = Node, this_node = MyNode,
                               timer = Timer, this_flags = 0, other_version = 6,
                               request_type = Type},
                    dist_util:handshake_we_started(HSData);
                {error, Reason} ->
                    ?shutdown2(Node, {macula_tunnel, Reason})
            end;
        false ->
            ?shutdown2(Node, bad_node_name);
        [] ->
            ?shutdown2(Node, no_relay_client)
    end.

%% The relay clients to ask for a tunnel to Node, in order: every client of
%% a relay list; with a relay set, the target's home relays this node is
%% on (one it shares first). Those it is not on are joined in the
%% background (a session fails over to its target's other home); if it is
%% on none, the dial waits for the first of them to answer.
dial_clients(Node) ->
    case macula_dist_sup:relay_set() of
        undefined ->
            macula_dist_relay_client:clients();
        {Set, K} ->
            Mine = macula_dist_relay_set:homes(atom_to_binary(node(), utf8), Set, K),
            Theirs = macula_dist_relay_set:homes(atom_to_binary(Node, utf8), Set, K),
            Joins = [macula_dist_sup:join_relay(Url)
                     || Url <- macula_dist_relay_set:meeting_order(Mine, Theirs)],
            case [Client || {client, Client} <- Joins] of
                [] -> first_joined(Joins);
                Clients -> Clients
            end
    end.

%% The setup timer bounds the wait.
first_joined(Joins) ->
    case macula_dist_keeper:await_first([Keeper || {joining, Keeper} <- Joins]) of
        {ok, Client} -> [Client];
        {error, _} -> []
    end.

%% Through the node's relays in order: the first that has the target gives
%% the tunnel. None has it: `no_relay_in_common', logged (net_kernel sends
%% no nodedown for a connection that never came up). Else the first
%% relay's error.
request_tunnel([Client | Rest], Target, Errors) ->
    case macula_dist_relay_client:request_tunnel(Client, Target) of
        {ok, _, _} = Ok -> Ok;
        {error, _} = Error -> request_tunnel(Rest, Target, [Error | Errors])
    end;
request_tunnel([], Target, Errors) ->
    case lists:usort(Errors) of
        [{error, {tunnel_error, target_not_connected}}] ->
            logger:warning("macula_dist: no relay in common with ~ts: it is on none of the "
                           "~b relay(s) this node is on", [Target, length(Errors)]),
            {error, no_relay_in_common};
        _ ->
            lists:last(Errors)
    end.

accept_connection(_AcceptPid, Tunnel, MyNode, Allowed, SetupTime) ->
    spawn_opt(?MODULE, do_accept, [self(), Tunnel, MyNode, Allowed, SetupTime],
              dist_util:net_ticker_spawn_options()).

%% The peer's name in the handshake must be the name the relay (stream
%% tunnel) or the peer's key (e2e session) vouched for: the controller
%% checks it before dist_util sees it.
do_accept(Kernel, Tunnel, MyNode, Allowed, SetupTime) ->
    Timer = dist_util:start_timer(SetupTime),
    #{peer := Peer} = macula_dist_nif:tunnel_info(Tunnel),
    Ctrl = start_controller(Tunnel, Peer),
    HSData = (hs_data(Ctrl, Tunnel))#hs_data{
               kernel_pid = Kernel, this_node = MyNode, timer = Timer,
               this_flags = 0, allowed = Allowed},
    dist_util:handshake_other_started(HSData).

%% The controller owns the tunnel from here; it is linked to this process,
%% which becomes the connection's supervisor (dist_util's con_loop).
start_controller(Tunnel, ExpectedPeer) ->
    Ctrl = spawn_opt(?MODULE, controller, [Tunnel, ExpectedPeer],
                     [link, {priority, max} | ?SPAWN_OPTS]),
    case macula_dist_nif:tunnel_set_owner(Tunnel, Ctrl) of
        ok -> Ctrl;
        {error, closed} -> ?shutdown2(tunnel, tunnel_closed)
    end.

hs_data(Ctrl, Tunnel) ->
    #hs_data{socket = Ctrl,
             f_send = fun(C, Packet) -> call(C, {send, Packet}) end,
             f_recv = fun(C, Length, Timeout) -> call(C, {recv, Length, Timeout}) end,
             f_setopts_pre_nodeup = fun(C) -> call(C, packet_4) end,
             f_setopts_post_nodeup = fun(_C) -> ok end,
             f_getll = fun(C) -> {ok, C} end,
             f_address = fun(_C, Node) -> node_address(Node) end,
             f_handshake_complete = fun(C, _Node, DHandle) -> call(C, {handshake_complete, DHandle}) end,
             mf_tick = fun(_C) -> tick(Tunnel) end,
             mf_getstat = fun(_C) -> getstat(Tunnel) end,
             mf_setopts = fun(_C, _Opts) -> {error, enotsup} end,
             mf_getopts = fun(_C, Opts) -> getopts_tunnel(Tunnel, Opts) end,
             reject_flags = reject_flags(Tunnel)}.

%% An e2e session carries each sending process on a stream of its own
%% (macula_dist_nif:tunnel_split_by_sender/1), so only the order between
%% two processes holds: the VM must not use what needs one order for all
%% (the atom cache). A stream tunnel keeps one stream, and every flag.
reject_flags(Tunnel) ->
    case macula_dist_nif:tunnel_info(Tunnel) of
        #{mode := e2e} -> dist_util:strict_order_flags();
        #{mode := stream} -> 0
    end.

%% `net_kernel:getopts(Node, [mode, peer, tunnel_id, path, lanes, fences,
%% send_pending, quic])': how the connection runs; `path' is `relay' or
%% `{direct, "ip:port"}'; `lanes' the streams by sender used so far to
%% send, `fences' the packets sent behind a fence (no sender to route them
%% by), `send_pending' the bytes the carrier holds not yet handed to QUIC,
%% `quic' the e2e session's path (`#{rtt_us, min_rtt_us, cwnd,
%% congestion_events, lost_packets, lost_bytes, sent_packets, mtu}'),
%% `undefined' in stream mode.
getopts_tunnel(Tunnel, Opts) ->
    Info = macula_dist_nif:tunnel_info(Tunnel),
    Keys = #{mode => mode, peer => peer, tunnel_id => id, path => path,
             lanes => lanes, fences => fences, send_pending => send_pending, quic => quic},
    {ok, [{Opt, maps:get(Key, Info)} || Opt <- Opts, {ok, Key} <- [maps:find(Opt, Keys)]]}.

node_address(Node) ->
    case string:split(atom_to_list(Node), "@") of
        [_, Host] -> address(Host);
        _ -> ?shutdown(no_node)
    end.

%% A tick is an empty 4-byte-framed packet. The NIF takes whole batches, so
%% it can come between any two of the controller's.
tick(Tunnel) ->
    _ = macula_dist_nif:tunnel_send(Tunnel, <<0:32>>, 1),
    ok.

getstat(Tunnel) ->
    {Recv, Send, Pending} = macula_dist_nif:tunnel_getstat(Tunnel),
    {ok, Recv, Send, Pending}.

call(Ctrl, Request) ->
    Ref = monitor(process, Ctrl),
    Ctrl ! {Ref, self(), Request},
    receive
        {Ref, Reply} ->
            demonitor(Ref, [flush]),
            Reply;
        {'DOWN', Ref, process, Ctrl, Reason} ->
            exit({macula_dist_controller, Reason})
    end.

%% ---- the controller: handshake I/O, then output ----

%% ExpectedPeer: on an inbound connection, the name the first packet
%% (send_name) must carry; `undefined' once checked, or outbound (where
%% dist_util checks the name in the challenge against the node it dialled).
controller(Tunnel, ExpectedPeer) ->
    handshake_loop(Tunnel, ExpectedPeer).

handshake_loop(Tunnel, Expected) ->
    receive
        {Ref, From, {send, Packet}} ->
            Reply = case macula_dist_nif:tunnel_send(Tunnel, [<<(iolist_size(Packet)):16>>, Packet], 1) of
                        {error, _} = Error -> Error;
                        _ -> ok
                    end,
            From ! {Ref, Reply},
            handshake_loop(Tunnel, Expected);
        {Ref, From, {recv, _Length, Timeout}} ->
            From ! {Ref, recv_packet(Tunnel, Expected, Timeout)},
            handshake_loop(Tunnel, undefined);
        {Ref, From, packet_4} ->
            From ! {Ref, macula_dist_nif:tunnel_set_packet(Tunnel, 4)},
            handshake_loop(Tunnel, Expected);
        {Ref, From, {handshake_complete, DHandle}} ->
            From ! {Ref, ok},
            start_data_path(Tunnel, DHandle);
        {macula_tunnel, Tunnel, closed} ->
            exit(connection_closed);
        _ ->
            handshake_loop(Tunnel, Expected)
    end.

recv_packet(Tunnel, Expected, Timeout) ->
    ok = macula_dist_nif:tunnel_set_packet(Tunnel, 2),
    ok = macula_dist_nif:tunnel_activate(Tunnel, 1),
    receive
        {macula_tunnel, Tunnel, {data, [Packet]}} -> checked_name(Tunnel, Expected, Packet);
        {macula_tunnel, Tunnel, closed} -> {error, closed}
    after Timeout ->
            {error, timeout}
    end.

checked_name(_Tunnel, undefined, Packet) ->
    {ok, binary_to_list(Packet)};
checked_name(Tunnel, Expected, Packet) ->
    case send_name(Packet) of
        Expected ->
            {ok, binary_to_list(Packet)};
        Other ->
            logger:warning("macula_dist: refused a handshake from ~ts that claimed to be ~0p",
                           [Expected, Other]),
            macula_dist_nif:tunnel_close(Tunnel),
            {error, {name_mismatch, Expected}}
    end.

%% The node name in a send_name packet (OTP 23+ 'N', or the older 'n').
send_name(<<$N, _Flags:64, _Creation:32, Len:16, Name:Len/binary, _/binary>>) -> Name;
send_name(<<$n, _Version:16, _Flags:32, Name/binary>>) -> Name;
send_name(_) -> malformed.

start_data_path(Tunnel, DHandle) ->
    Input = spawn_opt(?MODULE, input_handler, [self(), Tunnel, DHandle], [link | ?SPAWN_OPTS]),
    ok = erlang:dist_ctrl_input_handler(DHandle, Input),
    case macula_dist_nif:tunnel_set_owner(Tunnel, Input) of
        ok -> ok;
        {error, closed} -> exit(connection_closed)
    end,
    Input ! {Tunnel, owner},
    _ = macula_dist_nif:tunnel_split_by_sender(Tunnel),
    process_flag(priority, normal),
    _ = erlang:dist_ctrl_set_opt(DHandle, get_size, true),
    erlang:dist_ctrl_get_data_notification(DHandle),
    output_loop(Tunnel, DHandle).

output_loop(Tunnel, DHandle) ->
    receive
        dist_data ->
            send_data(Tunnel, DHandle);
        {macula_tunnel, Tunnel, closed} ->
            exit(connection_closed);
        _ ->
            output_loop(Tunnel, DHandle)
    end.

%% Pull what the VM has, in batches, until it has nothing (then ask to be
%% told) or the NIF is over budget (then wait for writable: the VM's dist
%% buffer fills meanwhile, and busy_dist_port suspends the senders).
send_data(Tunnel, DHandle) ->
    case pull(DHandle, [], 0, 0) of
        {none, [], _, _} ->
            erlang:dist_ctrl_get_data_notification(DHandle),
            output_loop(Tunnel, DHandle);
        {More, Batch, Bytes, Packets} ->
            case push(Tunnel, Batch, Bytes, Packets) of
                ok when More =:= more -> send_data(Tunnel, DHandle);
                ok ->
                    erlang:dist_ctrl_get_data_notification(DHandle),
                    output_loop(Tunnel, DHandle);
                busy -> wait_writable(Tunnel, DHandle);
                {error, closed} -> exit(connection_closed)
            end
    end.

pull(_DHandle, Acc, Bytes, Packets) when Packets >= ?BATCH_PACKETS; Bytes >= ?BATCH_BYTES ->
    {more, Acc, Bytes, Packets};
pull(DHandle, Acc, Bytes, Packets) ->
    case erlang:dist_ctrl_get_data(DHandle) of
        none -> {none, Acc, Bytes, Packets};
        {Size, Data} -> pull(DHandle, [Acc, <<Size:32>> | Data], Bytes + Size + 4, Packets + 1)
    end.

push(Tunnel, Batch, Bytes, Packets) when Bytes > ?DIRTY_BYTES ->
    macula_dist_nif:tunnel_send_dirty(Tunnel, Batch, Packets);
push(Tunnel, Batch, _Bytes, Packets) ->
    macula_dist_nif:tunnel_send(Tunnel, Batch, Packets).

wait_writable(Tunnel, DHandle) ->
    receive
        {macula_tunnel, Tunnel, writable} -> send_data(Tunnel, DHandle);
        {macula_tunnel, Tunnel, closed} -> exit(connection_closed)
    end.

%% ---- the input handler ----

input_handler(Ctrl, Tunnel, DHandle) ->
    receive
        {Tunnel, owner} ->
            ok = macula_dist_nif:tunnel_activate(Tunnel, ?INPUT_CREDIT),
            input_loop(Ctrl, Tunnel, DHandle)
    end.

input_loop(Ctrl, Tunnel, DHandle) ->
    receive
        {macula_tunnel, Tunnel, {data, Packets}} ->
            put_data(DHandle, Packets),
            ok = macula_dist_nif:tunnel_activate(Tunnel, 1),
            input_loop(Ctrl, Tunnel, DHandle);
        {macula_tunnel, Tunnel, writable} = Writable ->
            Ctrl ! Writable,
            input_loop(Ctrl, Tunnel, DHandle);
        {macula_tunnel, Tunnel, closed} ->
            exit(connection_closed);
        _ ->
            input_loop(Ctrl, Tunnel, DHandle)
    end.

put_data(_DHandle, []) ->
    ok;
put_data(DHandle, [Packet | Rest]) ->
    %% notsup: the VM took the connection down (a disconnect) and this
    %% handler is about to go with its controller; what it read is for a
    %% connection that no longer exists.
    try erlang:dist_ctrl_put_data(DHandle, Packet) of
        _ -> put_data(DHandle, Rest)
    catch
        error:notsup -> exit(connection_closed)
    end.
