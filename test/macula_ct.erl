%% Helpers shared by the Common Test suites: relays, raw NIF clients,
%% tunnel I/O, and peer nodes running -proto_dist macula.
-module(macula_ct).
-include_lib("stdlib/include/assert.hrl").

-export([start_relay/0, start_relay/1, raw_client/3, raw_client/4, request/2, request/3,
         exchange/3, run_exchange/3, await_exchange/1, random_bytes/1]).
-export([peer_args/2, start_peer/3, start_peer/4, stop_peer/1, host/0, node_name/1]).
-export([make_ca/2, issue_cert/4]).
-export([spawn_os/2, wait_for_file/2, checked_both_ways/7, traffic_while/3, session_relay/2, free_udp_port/0,
         relay_process/3, relay_process/4, relay_metric/2, dns_server/3, dns_zone/2, dns_stop/1,
         case_started/0, case_ended/0, sh/1, all_ok/1, ms_until/2, ms_until/3,
         session_path/2, netns_peer/3, release_dir/1, netns_relay/5, relay_bin/0,
         namespace_suite/4]).
%% Run on peer nodes.
-export([big_exchange/2, make_busy/2, random_with_md5/1, watch/2, watch_result/1, ordered_sender/3,
         ordered_receiver/2, receiver_result/1, connect_all/1, register_here/1,
         checked_send/4, checked_send/5, checked_receiver/2, checked_result/2,
         capture_log/0, logged/1, mailbox_sampler/1, mailbox_max/1,
         echo_server/1, pingers/4, pid_ordered_receiver/2, pid_ordered_senders/4,
         last_words/1, name_monitor_order/3, acking_receiver/1, windowed_stream/4,
         pings_within/4]).
%% logger handler callback (capture_log/0).
-export([log/2]).

start_relay() -> start_relay(#{}).

%% An embedded relay, owned by a process that outlives the caller.
start_relay(Opts) ->
    {ok, Relay} = macula_dist_relay:start(Opts),
    {Relay, macula_dist_relay:info(Relay)}.

raw_client(Url, Pin, Node) -> raw_client(Url, Pin, Node, #{}).

%% The cookie of every test node: peers boot with it, and raw clients key
%% their e2e sessions with it.
-define(COOKIE, <<"macula_ct_cookie">>).

%% A second client in this VM, straight on the NIF (the gen_server is
%% registered once per VM). Its owner is a process linked to the caller
%% that answers the NIF's cookie requests and passes everything else on.
raw_client(Url, Pin, Node, Extra) ->
    {ok, Opts} = macula_dist_config:client_opts(Url, Node, maps:merge(#{pin_sha256 => Pin}, Extra)),
    Caller = self(),
    Owner = spawn_link(fun() ->
                               {ok, Client} = macula_dist_nif:client_start(Opts),
                               Caller ! {raw_client, self(), Client},
                               relay_owner(Caller, Client)
                       end),
    Client = receive {raw_client, Owner, C} -> C end,
    receive
        {macula_client, identified} -> {ok, Client};
        {macula_client, {connect_failed, Reason}} -> {error, Reason}
    after 15000 -> {error, timeout}
    end.

relay_owner(Caller, Client) ->
    receive
        {macula_client, {cookie, _Source, Tag}} ->
            ok = macula_dist_nif:client_cookie(Client, Tag, ?COOKIE),
            relay_owner(Caller, Client);
        {macula_client, {Ended, _}} = Last when Ended =:= closed; Ended =:= connect_failed ->
            Caller ! Last;
        Other ->
            Caller ! Other,
            relay_owner(Caller, Client)
    end.

%% A tunnel request from a raw client (an e2e session when it runs them);
%% the caller owns the tunnel.
request(Client, Target) ->
    request(Client, Target, ?COOKIE).

request(Client, Target, Cookie) ->
    Tag = erlang:unique_integer([positive]),
    ok = macula_dist_nif:client_request_tunnel(Client, Target, Tag, Cookie),
    receive {macula_tunnel_reply, Tag, Reply} -> Reply
    after 15000 -> {error, no_reply}
    end.

%% In a new process that owns Tunnel: send Data (raw, honouring busy and
%% writable) while reading Expect bytes. Returns what it read.
exchange(Tunnel, Data, Expect) ->
    await_exchange(run_exchange(Tunnel, Data, Expect)).

run_exchange(Tunnel, Data, Expect) ->
    Parent = self(),
    Pid = spawn_link(fun() ->
                             receive go -> ok end,
                             ok = macula_dist_nif:tunnel_set_packet(Tunnel, 0),
                             ok = macula_dist_nif:tunnel_activate(Tunnel, 4),
                             Got = loop(Tunnel, Data, Expect, [], 0),
                             Parent ! {self(), Got}
                     end),
    ok = macula_dist_nif:tunnel_set_owner(Tunnel, Pid),
    Pid ! go,
    Pid.

await_exchange(Pid) ->
    receive {Pid, Got} -> Got after 120000 -> error(exchange_timeout) end.

-define(CHUNK, 65536).

loop(_Tunnel, <<>>, Expect, Acc, Got) when Got >= Expect ->
    iolist_to_binary(lists:reverse(Acc));
loop(Tunnel, Data, Expect, Acc, Got) ->
    {Data1, Busy} = send_some(Tunnel, Data),
    Timeout = case {Data1, Busy} of {<<>>, _} -> 60000; {_, true} -> 60000; _ -> 0 end,
    receive
        {macula_tunnel, Tunnel, {data, Chunks}} ->
            ok = macula_dist_nif:tunnel_activate(Tunnel, 1),
            N = lists:sum([byte_size(C) || C <- Chunks]),
            loop(Tunnel, Data1, Expect, lists:reverse(Chunks, Acc), Got + N);
        {macula_tunnel, Tunnel, writable} ->
            loop(Tunnel, Data1, Expect, Acc, Got);
        {macula_tunnel, Tunnel, closed} ->
            {closed, Got}
    after Timeout ->
            case Timeout of
                0 -> loop(Tunnel, Data1, Expect, Acc, Got);
                _ -> {stalled, Got}
            end
    end.

%% Sends until the NIF says busy (then wait for writable) or all is sent.
send_some(_Tunnel, <<>>) ->
    {<<>>, false};
send_some(Tunnel, Data) ->
    Size = min(?CHUNK, byte_size(Data)),
    <<Chunk:Size/binary, Rest/binary>> = Data,
    case macula_dist_nif:tunnel_send(Tunnel, Chunk, 1) of
        ok -> send_some(Tunnel, Rest);
        busy -> {Rest, true}
    end.

random_bytes(N) -> crypto:strong_rand_bytes(N).

%% ---- certificates, made with openssl as the README shows ----

%% A CA: Dir/Name.pem and its key Dir/Name.key.
make_ca(Dir, Name) ->
    Key = filename:join(Dir, Name ++ ".key"),
    Pem = filename:join(Dir, Name ++ ".pem"),
    openssl(["genpkey -algorithm ed25519 -out ", q(Key)]),
    openssl(["req -x509 -new -key ", q(Key), " -subj /CN=", Name, " -days 30 -out ", q(Pem)]),
    {Pem, Key}.

%% A certificate issued by the CA {CaPem, CaKey} for a new P-256 key, with
%% the subjectAltName San (openssl syntax: "URI:macula://a@h", "IP:127.0.0.1"):
%% {Dir/Name.pem, Dir/Name.key}.
issue_cert(Dir, Name, {CaPem, CaKey}, San) ->
    [Key, Csr, Ext, Pem] = [filename:join(Dir, Name ++ Suffix)
                            || Suffix <- [".key", ".csr", ".ext", ".pem"]],
    ok = file:write_file(Ext, ["subjectAltName=", San, "\n"]),
    openssl(["genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ", q(Key)]),
    openssl(["req -new -key ", q(Key), " -subj /CN=", Name, " -out ", q(Csr)]),
    openssl(["x509 -req -in ", q(Csr), " -CA ", q(CaPem), " -CAkey ", q(CaKey),
             " -CAcreateserial -days 30 -extfile ", q(Ext), " -out ", q(Pem)]),
    {Pem, Key}.

openssl(Args) ->
    Cmd = lists:flatten(["openssl ", Args]),
    Out = os:cmd(Cmd ++ " 2>&1; echo exit=$?"),
    case string:find(Out, "exit=0") of
        nomatch -> error({openssl_failed, Cmd, Out});
        _ -> ok
    end.

q(Path) -> "'" ++ Path ++ "'".

%% ---- peers ----

host() ->
    {ok, Host} = inet:gethostname(),
    Host.

node_name(Name) -> list_to_atom(atom_to_list(Name) ++ "@" ++ host()).

%% Command-line arguments for a node that joins the relay (pinning its
%% certificate unless the fingerprint is `none').
%% `url' and `fingerprint' may be lists: a node on several relays.
peer_args(#{url := Url, fingerprint := Pin} = Info, Extra) ->
    Paths = lists:append([["-pa", D] || D <- code:get_path(), is_project_path(D)]),
    Trust = case Pin of
                none -> [];
                _ -> ["-macula_dist", "pin_sha256", term_arg(Pin)]
            end,
    %% `tunnel' in Info: the mode (e2e or stream) to ask for.
    Mode = case Info of
               #{tunnel := T} -> ["-macula_dist", "tunnel", atom_to_list(T)];
               _ -> []
           end,
    %% `set' in Info: the URLs are a relay set (the node joins its homes).
    Key = case Info of
              #{set := true} -> "relay_set";
              _ -> "relay"
          end,
    ["-proto_dist", "macula", "-no_epmd",
     "-macula_dist", Key, term_arg(Url),
     "-setcookie", "macula_ct_cookie"] ++ Trust ++ Mode ++ Paths ++ Extra.

%% A binary, or a list of them, as an Erlang string term for -macula_dist.
term_arg(Bin) when is_binary(Bin) -> "\"" ++ binary_to_list(Bin) ++ "\"";
term_arg(List) when is_list(List) ->
    lists:flatten(["[", lists:join(",", [term_arg(B) || B <- List]), "]"]).

is_project_path(Dir) ->
    string:find(Dir, "_build") =/= nomatch.

start_peer(Name, RelayInfo, Extra) ->
    start_peer(Name, RelayInfo, Extra, #{}).

%% A peer controlled over standard_io (this test node need not be
%% distributed); it joins the cluster through the relay.
start_peer(Name, RelayInfo, Extra, Opts) ->
    {ok, Peer, Node} = peer:start(maps:merge(#{name => Name,
                                               connection => standard_io,
                                               args => peer_args(RelayInfo, Extra),
                                               wait_boot => 30000}, Opts)),
    {Peer, Node}.

stop_peer(Peer) ->
    try peer:stop(Peer) catch _:_ -> ok end,
    ok.

%% Moves enough through the session between peer P and node Peer for it to
%% look for a direct path: a session does once it carried 256 KiB through
%% its relay (`BUSY_BYTES' in the protocol crate's direct.rs), and this is
%% 512 KiB, each side sending half.
make_busy(P, Peer) ->
    {ok, _} = peer:call(P, ?MODULE, big_exchange, [Peer, 128 * 1024], 120000),
    ok.

%% ---- run on peers ----

%% 64 MiB-class binaries both ways through rpc and erpc, checked by md5.
big_exchange(Node, Size) ->
    Out = crypto:strong_rand_bytes(Size),
    Md5 = erlang:md5(Out),
    Md5 = erpc:call(Node, erlang, md5, [Out], 120000),
    Md5 = rpc:call(Node, erlang, md5, [Out], 120000),
    {In1, InMd5_1} = erpc:call(Node, ?MODULE, random_with_md5, [Size], 120000),
    InMd5_1 = erlang:md5(In1),
    {In2, InMd5_2} = rpc:call(Node, ?MODULE, random_with_md5, [Size], 120000),
    InMd5_2 = erlang:md5(In2),
    {ok, byte_size(In1) + byte_size(In2)}.

random_with_md5(Size) ->
    B = crypto:strong_rand_bytes(Size),
    {B, erlang:md5(B)}.

%% Watches Node from here: monitor_node and a process monitor on a process
%% there. watch_result/1 says how both ended.
%% The release binaries of Packages, built now: the directory they are in.
release_dir(Packages) ->
    Root = filename:absname(filename:join(code:lib_dir(macula_dist), "../../../..")),
    Out = os:cmd("cd '" ++ Root ++ "' && cargo build --release --quiet"
                 ++ lists:append([" -p " ++ P || P <- Packages]) ++ " 2>&1; echo exit=$?"),
    ?assertNotEqual(nomatch, string:find(Out, "exit=0"), Out),
    filename:join([Root, "target", "release"]).

%% The relay binary, built now.
relay_bin() ->
    filename:join(release_dir(["macula_dist_relay"]), "macula-dist-relay").

%% init_per_suite of a suite in network namespaces: Setup() makes them
%% (after Teardown() clears what a crashed run left); the relay binary is
%% built. Where they cannot be made, the suite is skipped, saying why
%% (What names the suite in that line).
namespace_suite(Config, Setup, Teardown, What) ->
    Teardown(),
    case Setup() of
        ok ->
            [{relay_bin, relay_bin()} | Config];
        {error, Why} ->
            Teardown(),
            Reason = What ++ " cannot be made here (" ++ Why ++ "): suite skipped",
            io:format(user, "~nNOTE: ~ts~n", [Reason]),
            {skip, Reason}
    end.

%% A shell command: ok, or {error, Text} with its output.
sh(Cmd) ->
    Out = os:cmd(Cmd ++ " 2>&1; echo \"exit=$?\""),
    case string:find(Out, "exit=0\n") of
        nomatch -> {error, string:trim(Cmd ++ ": " ++ Out)};
        _ -> ok
    end.

%% Shell commands in order, up to the first that fails.
all_ok([]) -> ok;
all_ok([Cmd | Rest]) ->
    case sh(Cmd) of
        ok -> all_ok(Rest);
        Error -> Error
    end.

%% Ms until Fun() is true (since T0, default now), polling every 50 ms, or
%% false after Limit ms.
ms_until(Fun, Limit) -> ms_until(Fun, Limit, erlang:monotonic_time(millisecond)).
ms_until(Fun, Limit, T0) ->
    Ms = erlang:monotonic_time(millisecond) - T0,
    case Fun() of
        true -> Ms;
        false when Ms > Limit -> false;
        false -> timer:sleep(50), ms_until(Fun, Limit, T0)
    end.

%% The path of the session with Peer in a node's
%% macula_dist_cluster:status(): relay, {direct, Address}, or none.
session_path(Status, Peer) ->
    Name = atom_to_binary(Peer, utf8),
    case [Path || #{sessions := Ss} <- Status, #{peer := N, path := Path} <- Ss, N =:= Name] of
        [Path] -> Path;
        [] -> none
    end.

%% The relay binary in network namespace Ns, on Addr:4434, its identity in
%% Dir; Extra: more arguments. #{url, fingerprint}.
netns_relay(Bin, Ns, {Addr, Port}, Dir, Extra) ->
    maps:remove(os_pid, spawn_relay("ip netns exec " ++ Ns ++ " ", Bin, Addr, Port, Dir, Extra)).

%% Starts the relay binary (after Prefix, a command it runs under) on
%% Addr:Port with its identity in Dir and Extra arguments; waits for its
%% fingerprint. #{os_pid, url, fingerprint}.
spawn_relay(Prefix, Bin, Addr, Port, Dir, Extra) ->
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    FpFile = filename:join(Dir, "fingerprint"),
    _ = file:delete(FpFile),
    Cmd = lists:flatten(io_lib:format("exec ~ts'~ts' --listen ~ts:~b --state-dir '~ts' "
                                      "--allow-anonymous --fingerprint-file '~ts' ~ts",
                                      [Prefix, Bin, Addr, Port, Dir, FpFile, Extra])),
    Pid = spawn_os(Cmd, filename:join(Dir, "relay.log")),
    Fp = wait_for_file(FpFile, 100),
    #{os_pid => Pid, url => iolist_to_binary(io_lib:format("quic://~ts:~b", [Addr, Port])),
      fingerprint => Fp}.

%% A peer on Relay inside network namespace Ns (recorded in `peers').
netns_peer(Name, Ns, Relay) ->
    Exec = {os:find_executable("ip"), ["netns", "exec", Ns, os:find_executable("erl")]},
    {Peer, Node} = start_peer(Name, Relay, [], #{exec => Exec}),
    put(peers, [Peer | get(peers)]),
    {Peer, Node}.

%% A case that starts peers (put in `peers') and OS processes (spawn_os/2)
%% begins with case_started/0 and ends with case_ended/0, which stops them.
case_started() ->
    put(os_pids, []),
    put(peers, []),
    ok.

case_ended() ->
    [stop_peer(P) || P <- get(peers)],
    [os:cmd("kill -9 " ++ P) || P <- get(os_pids)],
    ok.

free_udp_port() ->
    {ok, S} = gen_udp:open(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(S),
    ok = gen_udp:close(S),
    Port.

%% The relay binary Bin on 127.0.0.1:Port, its identity kept in Dir (so a
%% restart keeps the certificate that nodes pin). #{os_pid, url, fingerprint}.
relay_process(Bin, Dir, Port) ->
    relay_process(Bin, Dir, "127.0.0.1", Port).

%% ... listening on Ip (a loopback address).
relay_process(Bin, Dir, Ip, Port) ->
    %% Its metrics on the same port number, over TCP.
    Metrics = lists:flatten(io_lib:format("--metrics ~ts:~b", [Ip, Port])),
    (spawn_relay("", Bin, Ip, Port, Dir, Metrics))#{metrics => {Ip, Port}}.

%% A gauge or counter (no labels) of a relay_process's metrics, or
%% `undefined' when the relay does not answer.
relay_metric(#{metrics := {Ip, Port}}, Name) ->
    {ok, Addr} = inet:parse_address(Ip),
    case gen_tcp:connect(Addr, Port, [binary, {active, false}], 2000) of
        {ok, S} ->
            ok = gen_tcp:send(S, "GET /metrics HTTP/1.0\r\n\r\n"),
            Body = recv_all(S, []),
            Prefix = <<Name/binary, " ">>,
            case [V || Line <- binary:split(Body, <<"\n">>, [global]),
                       <<P:(byte_size(Prefix))/binary, V/binary>> <- [Line], P =:= Prefix] of
                [V | _] -> binary_to_integer(string:trim(V));
                [] -> undefined
            end;
        {error, _} ->
            undefined
    end.

recv_all(S, Acc) ->
    case gen_tcp:recv(S, 0, 5000) of
        {ok, Data} -> recv_all(S, [Acc, Data]);
        {error, _} -> gen_tcp:close(S), iolist_to_binary(Acc)
    end.

%% ---- a DNS server on loopback (dnsmasq) ----

%% dnsmasq on 127.0.0.1 (a free port), authoritative for macula.test with
%% a TTL of 1 s: the A records of Hosts (`[{Name, [Ip]}]', in a hosts
%% directory it reads again when a file there changes) and the SRV
%% records Srvs (`[{Name, Target, Port}]', fixed). Returns
%% `#{os_pid, port, dir}', or `{skip, Why}' without dnsmasq.
dns_server(Dir, Hosts, Srvs) ->
    case os:find_executable("dnsmasq") of
        false ->
            {skip, "dnsmasq is not installed (apt-get install dnsmasq-base)"};
        Exe ->
            HostsDir = filename:join(Dir, "hosts"),
            ok = filelib:ensure_dir(filename:join(HostsDir, "x")),
            Server = #{port => free_udp_port(), dir => HostsDir},
            ok = dns_zone(Server, Hosts),
            Args = ["-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
                    "--bind-interfaces", "--listen-address=127.0.0.1",
                    "--port=" ++ integer_to_list(maps:get(port, Server)), "--user=root",
                    "--pid-file=", "--local=/macula.test/", "--local-ttl=1",
                    "--hostsdir=" ++ HostsDir]
                ++ ["--srv-host=" ++ Name ++ "," ++ Target ++ "," ++ integer_to_list(Port) ++ ",0,0"
                    || {Name, Target, Port} <- Srvs],
            Cmd = lists:flatten(["exec '", Exe, "'", [[" '", A, "'"] || A <- Args]]),
            Pid = spawn_os(Cmd, filename:join(Dir, "dnsmasq.log")),
            Server#{os_pid => Pid}
    end.

%% Replaces the A records dnsmasq serves (it sees the file change).
dns_zone(#{dir := HostsDir}, Hosts) ->
    Lines = [[Ip, " ", Name, "\n"] || {Name, Ips} <- Hosts, Ip <- Ips],
    Tmp = filename:join(filename:dirname(HostsDir), "zone.tmp"),
    ok = file:write_file(Tmp, Lines),
    file:rename(Tmp, filename:join(HostsDir, "zone")).

dns_stop(#{os_pid := Pid}) ->
    _ = os:cmd("kill " ++ Pid),
    ok.

%% The relays (their URLs) whose clients carry a session with Peer, in a
%% node's macula_dist_cluster:status().
session_relay(Status, Peer) ->
    Name = atom_to_binary(Peer, utf8),
    [Url || #{relay_url := Url, sessions := Ss} <- Status, #{peer := N} <- Ss, N =:= Name].

watch(Node, Name) ->
    Parent = self(),
    Pid = spawn(fun() ->
                        true = monitor_node(Node, true),
                        Remote = erlang:spawn(Node, timer, sleep, [infinity]),
                        Ref = monitor(process, Remote),
                        Parent ! {watching, self()},
                        receive {go, From} -> ok end,
                        T0 = erlang:monotonic_time(millisecond),
                        NodeDown = receive {nodedown, Node} -> nodedown end,
                        Down = receive {'DOWN', Ref, process, Remote, R} -> R end,
                        From ! {watched, NodeDown, Down, erlang:monotonic_time(millisecond) - T0}
                end),
    receive {watching, Pid} -> register(Name, Pid), ok after 10000 -> error(watch_failed) end.

watch_result({Name, Timeout}) ->
    whereis(Name) ! {go, self()},
    receive {watched, NodeDown, Down, Ms} -> {NodeDown, Down, Ms}
    after Timeout -> timeout
    end.

connect_all(Nodes) ->
    [pong = net_adm:ping(N) || N <- Nodes, N =/= node()],
    lists:sort(nodes()).

%% Checked traffic both ways between each pair of peers ({{A, AN}, {B,
%% BN}}): Count messages of Size, PauseMs apart, each A watching BN for a
%% nodedown. Disturb() runs meanwhile; then every message must have
%% arrived once, in order, intact, with no nodedown. Returns what
%% Disturb() returned.
traffic_while(Pairs, {Count, Size, PauseMs}, Disturb) ->
    [ok = peer:call(A, ?MODULE, watch, [BN, traffic_watch], 120000) || {{A, _}, {_, BN}} <- Pairs],
    Self = self(),
    [spawn_link(fun() ->
                        Self ! {traffic, A, checked_both_ways(A, AN, B, BN, Count, Size, PauseMs)}
                end) || {{A, AN}, {B, BN}} <- Pairs],
    Disturbed = Disturb(),
    [receive
         {traffic, A, Results} -> [{ok, Count, _, _} = R || R <- Results]
     after 180000 -> error({no_traffic_result, A})
     end || {{A, _}, _} <- Pairs],
    [timeout = peer:call(A, ?MODULE, watch_result, [{traffic_watch, 100}], 120000)
     || {{A, _}, _} <- Pairs],
    Disturbed.

%% Sends 1..Count to a registered receiver on Node, in order.
ordered_sender(Node, Name, Count) ->
    lists:foreach(fun(I) -> {Name, Node} ! {seq, node(), I} end, lists:seq(1, Count)),
    ok.

%% Registers a receiver that checks each sender's numbers arrive 1, 2, 3...
ordered_receiver(Name, Expected) ->
    Pid = spawn(fun() -> receive_in_order(#{}, Expected) end),
    register(Name, Pid),
    ok.

receive_in_order(Seen, 0) ->
    receive {result, From} -> From ! {in_order, Seen} end;
receive_in_order(Seen, Left) ->
    receive
        {seq, From, I} ->
            case maps:get(From, Seen, 0) of
                Prev when I =:= Prev + 1 -> receive_in_order(Seen#{From => I}, Left - 1);
                Prev -> exit({out_of_order, From, Prev, I})
            end
    end.

receiver_result(Name) ->
    whereis(Name) ! {result, self()},
    receive {in_order, Seen} -> {ok, Seen} after 120000 -> timeout end.

register_here(Name) ->
    Pid = spawn(timer, sleep, [infinity]),
    yes = global:register_name(Name, Pid),
    Pid.

%% Sends Count messages of Size random bytes to the registered process Name
%% on Node, each `{chk, Sender, Seq, Crc32, Payload}', Seq 1, 2, 3...
checked_send(Node, Name, Count, Size) ->
    checked_send(Node, Name, Count, Size, 0).

%% The same, pausing PauseMs after each message (traffic that spans a fault).
checked_send(Node, Name, Count, Size, PauseMs) ->
    Payload = crypto:strong_rand_bytes(Size),
    Crc = erlang:crc32(Payload),
    lists:foreach(fun(Seq) ->
                          {Name, Node} ! {chk, node(), Seq, Crc, Payload},
                          PauseMs > 0 andalso timer:sleep(PauseMs)
                  end,
                  lists:seq(1, Count)),
    ok.

%% Registers a receiver for checked_send/4: every message must come once, in
%% order, intact. It times the stream from its first message to its last.
checked_receiver(Name, Count) ->
    register(Name, spawn(fun() -> check_loop(Count, 0, 0, undefined) end)),
    ok.

check_loop(Left, Seq, Bytes, T0) when Left =:= 0 ->
    Us = erlang:monotonic_time(microsecond) - T0,
    receive {result, From} -> From ! {checked, {ok, Seq, Bytes, Us}} end;
check_loop(Left, Seq, Bytes, T0) ->
    receive
        {chk, _From, Next, Crc, Payload} when Next =:= Seq + 1 ->
            case erlang:crc32(Payload) of
                Crc ->
                    T = case T0 of undefined -> erlang:monotonic_time(microsecond); _ -> T0 end,
                    check_loop(Left - 1, Next, Bytes + byte_size(Payload), T);
                _ ->
                    check_failed({altered, Next})
            end;
        {chk, _From, Other, _, _} ->
            check_failed({out_of_order, Seq, Other})
    end.

check_failed(Reason) ->
    receive {result, From} -> From ! {checked, {error, Reason}} end.

%% {ok, Messages, Bytes, Microseconds} or {error, Why}, or `timeout'.
checked_result(Name, Timeout) ->
    whereis(Name) ! {result, self()},
    receive {checked, Result} -> Result after Timeout -> timeout end.

%% Registers Name: answers `{echo, Seq, Payload}' to each `{ping, From, Seq,
%% Payload}'.
echo_server(Name) ->
    register(Name, spawn(fun Loop() ->
                                 receive {ping, From, Seq, P} -> From ! {echo, Seq, P} end,
                                 Loop()
                         end)),
    ok.

%% Registers Name: acknowledges every {win, From, Seq, _} to From.
acking_receiver(Name) ->
    register(Name, spawn(fun Loop() ->
                                 receive {win, From, Seq, _} -> From ! {win_ack, Seq} end,
                                 Loop()
                         end)),
    ok.

%% Streams Size-byte messages to Name on Node without end, at most Window
%% unacknowledged (acking_receiver/1), as a windowed transfer does; stopped
%% by exit(Pid, kill).
windowed_stream(Node, Name, Window, Size) ->
    Payload = crypto:strong_rand_bytes(Size),
    spawn(fun() -> window_loop({Name, Node}, Payload, 1, 0, Window) end).

window_loop(To, Payload, Seq, Acked, Window) when Seq - Acked > Window ->
    receive {win_ack, A} -> window_loop(To, Payload, Seq, max(A, Acked), Window) end;
window_loop(To, Payload, Seq, Acked, Window) ->
    To ! {win, self(), Seq, Payload},
    window_loop(To, Payload, Seq + 1, Acked, Window).

%% Count round trips with the echo server Name on Node, one after another:
%% `ok' when all came back within Ms in all, else how many did.
pings_within(Node, Name, Count, Ms) ->
    Self = self(),
    Pinger = spawn(fun() -> Self ! {pings, ping_loop({Name, Node}, 1, Count)} end),
    receive
        {pings, Result} -> Result
    after Ms ->
        Done = case process_info(Pinger, dictionary) of
                   {dictionary, D} -> proplists:get_value(pinged, D, 0);
                   undefined -> Count
               end,
        exit(Pinger, kill),
        receive {pings, Result} -> Result after 0 -> {not_in_time, Done} end
    end.

%% Pingers processes, each Count round trips of 64 random bytes with the
%% echo server Name on Node: `ok' when every answer came back intact and
%% in order, else the first pinger's complaint.
pingers(Node, Name, Pingers, Count) ->
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {pinged, self(), ping_loop({Name, Node}, 1, Count)} end)
            || _ <- lists:seq(1, Pingers)],
    Results = [receive {pinged, P, R} -> R end || P <- Pids],
    case lists:usort(Results) of
        [ok] -> ok;
        Bad -> {error, Bad -- [ok]}
    end.

ping_loop(_To, Seq, Count) when Seq > Count ->
    ok;
ping_loop(To, Seq, Count) ->
    put(pinged, Seq - 1),
    P = crypto:strong_rand_bytes(64),
    To ! {ping, self(), Seq, P},
    receive
        {echo, Seq, P} -> ping_loop(To, Seq + 1, Count);
        {echo, Other, _} -> {out_of_order, Seq, Other}
    after 120000 -> {timeout, Seq}
    end.

%% Registers Name: checks that each sending process's numbers arrive 1, 2,
%% 3..., Total messages in all (receiver_result/1 gives the outcome).
pid_ordered_receiver(Name, Total) ->
    register(Name, spawn(fun() -> receive_in_order(#{}, Total) end)),
    ok.

%% Senders processes, each sending 1..Count to Name on Node.
pid_ordered_senders(Node, Name, Senders, Count) ->
    Self = self(),
    Pids = [spawn_link(fun() ->
                               [{Name, Node} ! {seq, self(), I} || I <- lists:seq(1, Count)],
                               Self ! {sent, self()}
                       end) || _ <- lists:seq(1, Senders)],
    [receive {sent, P} -> ok end || P <- Pids],
    ok.

%% Registers a process as Name that answers the first `{hello, From}' with
%% `last_words' and exits: its DOWN, to a monitor by name, names no pid.
last_words(Name) ->
    Pid = spawn(fun() -> receive {hello, From} -> From ! last_words end end),
    register(Name, Pid),
    ok.

%% Count times: a process on Node registered as Name (last_words/1) is
%% monitored by name, greeted, and must say its last words before its DOWN
%% arrives. `ok' or the first round where the DOWN came first.
name_monitor_order(Node, Name, Count) ->
    name_monitor_order(Node, Name, 1, Count).

name_monitor_order(_Node, _Name, I, Count) when I > Count ->
    ok;
name_monitor_order(Node, Name, I, Count) ->
    ok = erpc:call(Node, ?MODULE, last_words, [Name]),
    Ref = monitor(process, {Name, Node}),
    {Name, Node} ! {hello, self()},
    receive
        last_words ->
            receive {'DOWN', Ref, process, _, _} -> name_monitor_order(Node, Name, I + 1, Count)
            after 30000 -> {no_down, I}
            end;
        {'DOWN', Ref, process, _, Reason} ->
            {down_first, I, Reason}
    end.

%% Keeps this node's log messages from now on, for logged/1.
capture_log() ->
    Keeper = spawn(fun() -> log_keeper([]) end),
    true = register(macula_ct_log, Keeper),
    logger:add_handler(macula_ct_log, ?MODULE, #{}).

log(#{msg := Msg}, _Config) ->
    Text = case Msg of
               {string, S} -> S;
               {report, R} -> io_lib:format("~p", [R]);
               {Format, Args} -> io_lib:format(Format, Args)
           end,
    try macula_ct_log ! {log, unicode:characters_to_binary(Text)} catch _:_ -> ok end,
    ok.

log_keeper(Logs) ->
    receive
        {log, Text} -> log_keeper([Text | Logs]);
        {get, From} -> From ! {logs, lists:reverse(Logs)}, log_keeper(Logs)
    end.

%% The kept log messages that contain Part.
logged(Part) ->
    macula_ct_log ! {get, self()},
    receive {logs, Logs} -> [L || L <- Logs, binary:match(L, Part) =/= nomatch]
    after 5000 -> error(no_log_keeper)
    end.

%% Samples the message queue of the process registered as Name every
%% 10 ms; mailbox_max/1 stops it and gives the largest seen.
mailbox_sampler(Name) ->
    spawn(fun() -> sample_mailbox(Name, 0) end).

sample_mailbox(Name, Max) ->
    receive
        {max, From} -> From ! {mailbox_max, Max}
    after 10 ->
            Len = case whereis(Name) of
                      undefined -> 0;
                      Pid -> element(2, process_info(Pid, message_queue_len))
                  end,
            sample_mailbox(Name, max(Max, Len))
    end.

mailbox_max(Sampler) ->
    Sampler ! {max, self()},
    receive {mailbox_max, Max} -> Max after 5000 -> error(no_sampler) end.

%% ---- for suites that run OS processes and checked traffic ----

%% Starts an OS process in the background, its output in Log; its OS pid,
%% also kept in the test process's `os_pids' (to kill at the end).
spawn_os(Cmd, Log) ->
    Pid = string:trim(os:cmd(Cmd ++ " >>'" ++ Log ++ "' 2>&1 & echo $!")),
    put(os_pids, [Pid | get(os_pids)]),
    Pid.

%% The contents of File once it holds a fingerprint (64 hex characters),
%% polling every 100 ms, Tries times.
wait_for_file(File, 0) -> error({no_file, File});
wait_for_file(File, Tries) ->
    case file:read_file(File) of
        {ok, <<_:64/binary, _/binary>> = Bin} -> string:trim(Bin);
        _ -> timer:sleep(100), wait_for_file(File, Tries - 1)
    end.

%% Checked traffic both ways between peers A and B: Count messages of Size
%% (PauseMs after each). The receivers' results, B's first.
checked_both_ways(A, AN, B, BN, Count, Size, PauseMs) ->
    Call = fun(P, F, Args) -> peer:call(P, ?MODULE, F, Args, 120000) end,
    ok = Call(A, checked_receiver, [macula_chk, Count]),
    ok = Call(B, checked_receiver, [macula_chk, Count]),
    Self = self(),
    [spawn_link(fun() ->
                        Self ! {sent, From, Call(From, checked_send,
                                                 [To, macula_chk, Count, Size, PauseMs])}
                end)
     || {From, To} <- [{A, BN}, {B, AN}]],
    [receive {sent, P, ok} -> ok after 120000 -> error({send_timeout, P}) end || P <- [A, B]],
    [Call(P, checked_result, [macula_chk, 120000]) || P <- [B, A]].
