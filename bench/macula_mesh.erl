%% Scale check: N BEAM nodes full-meshed through one relay.
%%
%% Run with bench/mesh.sh, which starts the relay and calls main/0 in a
%% controller VM (not distributed). The controller starts N light nodes
%% (`erl +S 1:1', -proto_dist macula) with `peer' over standard_io, waits
%% until all are up (each identified with the relay), then tells them to
%% connect and measures:
%%   mesh      from "go" to the moment the last node's nodes() reached N-1
%%             (each node stamps the moment itself, with os time, so the
%%             controller's polling does not add to it);
%%   global    from "go" until global:sync() returned on every node;
%%   multicall rpc:multicall over all N nodes from node 1 (first call, and
%%             the median of 10 more);
%%   RSS       relay (now and peak) and nodes (median, max; and PSS);
%%   CPU       seconds used during the mesh by the relay and by the nodes,
%%             split by thread: BEAM schedulers, the NIF's runtime
%%             ("macula-dist"), the rest;
%%   tunnels   "tunnel opened" / "e2e session opened" lines in the relay's
%%             log against the N(N-1)/2 links, nodeup/nodedown events, and
%%             global's "overlapping partition" disconnects in node logs.
%%
%% How nodes connect (MESH_CONNECT / --connect):
%%   ordered  node i connects to every node j > i, so no pair is dialled
%%            from both ends by the controller's plan (global's connect_all
%%            may still dial the other way);
%%   all      every node connects to every other node at once: each pair is
%%            dialled from both ends simultaneously;
%%   seed     every node connects to node 1 only; global's connect_all
%%            makes the rest of the mesh.
-module(macula_mesh).

-export([main/0]).
%% Run on the nodes.
-export([node_prepare/1, node_go/2, node_global_sync/0, node_result/0, node_status/0,
         node_reductions/0,
         multicall/2]).

-define(COOKIE, "macula_mesh").

main() ->
    %% Url, Pin, RelayPid and RelayLog are comma lists: one per relay of
    %% the set (bench/mesh.sh --relays).
    [NStr, Mode, Connect, Dir, Url, Pin, TokenFile, RelayPid, RelayLog] =
        init:get_plain_arguments(),
    N = list_to_integer(NStr),
    Env = #{n => N, mode => Mode, connect => Connect, dir => Dir, url => Url,
            pin => Pin, token_file => TokenFile, relay_pid => RelayPid,
            relay_log => RelayLog, root => root()},
    Code = try run(Env) of
               ok -> 0
           catch C:R:St ->
                   io:format("macula_mesh: FAILED ~p:~p~n  ~p~n", [C, R, St]),
                   1
           end,
    halt(Code).

root() ->
    Beam = filename:absname(code:which(?MODULE)),
    filename:dirname(filename:dirname(filename:dirname(Beam))).

env_int(Name, Default) ->
    case os:getenv(Name) of
        false -> Default;
        "" -> Default;
        V -> list_to_integer(V)
    end.

%% ---- controller ----

run(#{n := N, mode := Mode, connect := Connect, relay_pid := RelayPid} = Env) ->
    Variant = variant(Connect) ++ relays_variant(RelayPid),
    io:format("mesh: N=~b mode=~s connect=~s relay pid ~s~n", [N, Mode, Variant, RelayPid]),
    ok = tls_optfile(Env),
    Boot0 = now_us(),
    Nodes = start_nodes(N, Env),
    BootS = (now_us() - Boot0) / 1.0e6,
    Names = [Name || {_, Name, _} <- Nodes],
    io:format("  all ~b nodes up in ~.1f s (boot; not part of the mesh time)~n", [N, BootS]),
    _ = pmap(fun({P, _, _}) -> ok = peer:call(P, ?MODULE, node_prepare, [N - 1]) end, Nodes, 8),
    Red0 = pmap(fun({P, _, _}) -> peer:call(P, ?MODULE, node_reductions, []) end, Nodes, 8),
    Rss0 = relays_kib(RelayPid, "VmRSS"),
    Cpu0 = cpu_snapshot(RelayPid, Nodes),
    Net0 = net_sent(),
    Plan = plan(Connect, Names),
    %% Go: each node stamps when it reached N-1 nodes; the plan is cast to
    %% all nodes back to back.
    T0 = os:system_time(microsecond),
    DialPar = dial_par(),
    lists:foreach(fun({{P, _, _}, Targets}) -> peer:cast(P, ?MODULE, node_go, [Targets, DialPar]) end,
                  lists:zip(Nodes, Plan)),
    CastS = (os:system_time(microsecond) - T0) / 1.0e6,
    Timeout = env_int("MESH_TIMEOUT", 120) * 1000,
    {Complete, Results} = wait_mesh(Nodes, N - 1, erlang:monotonic_time(millisecond) + Timeout),
    Cpu1 = cpu_snapshot(RelayPid, Nodes),
    Net1 = net_sent(),
    Red1 = pmap(fun({P, _, _}) -> peer:call(P, ?MODULE, node_reductions, []) end, Nodes, 8),
    Reached = [R || #{reached := R} <- Results, R =/= undefined],
    MeshS = case Complete of
                true -> (lists:max(Reached) - T0) / 1.0e6;
                false -> undefined
            end,
    ReachP50 = case Reached of
                   [] -> undefined;
                   _ -> (median(Reached) - T0) / 1.0e6
               end,
    %% global:sync() on every node, after the mesh.
    lists:foreach(fun({P, _, _}) -> peer:cast(P, ?MODULE, node_global_sync, []) end, Nodes),
    {_, GResults} = wait_key(Nodes, global_synced, erlang:monotonic_time(millisecond) + Timeout),
    GlobalS = case [G || #{global_synced := G} <- GResults, G =/= undefined] of
                  Gs when length(Gs) =:= N -> (lists:max(Gs) - T0) / 1.0e6;
                  _ -> undefined
              end,
    %% A moment later: is the mesh still whole?
    timer:sleep(1000),
    Final = pmap(fun({P, _, _}) -> peer:call(P, ?MODULE, node_result, []) end, Nodes, 8),
    Counts = [C || #{nodes := C} <- Final],
    Ups = lists:sum([U || #{ups := U} <- Final]),
    Downs = lists:sum([D || #{downs := D} <- Final]),
    Pangs = lists:sum([P || #{pangs := P} <- Final]),
    %% rpc:multicall over every node, from node 1.
    {P1, _, _} = hd(Nodes),
    #{first := McFirst, median := McMedian, results := McResults, bad := McBad} =
        peer:call(P1, ?MODULE, multicall, [11, N], 120000),
    %% CPU of the idle mesh (keep-alives, ticks) over IdleS seconds.
    IdleS = env_int("MESH_IDLE", 10),
    CpuI0 = cpu_snapshot(RelayPid, Nodes),
    timer:sleep(IdleS * 1000),
    #{relay := IRelay, sched := ISched, nif := INif, other := IOther} =
        cpu_diff(CpuI0, cpu_snapshot(RelayPid, Nodes)),
    %% Memory, after the mesh and the calls.
    RelayRss = relays_kib(RelayPid, "VmRSS"),
    RelayHwm = relays_kib(RelayPid, "VmHWM"),
    NodeRss = lists:sort([rss_kib(OsPid) || {_, _, OsPid} <- Nodes]),
    NodePss = lists:sort([pss_kib(OsPid) || {_, _, OsPid} <- Nodes]),
    Statuses = pmap(fun({P, _, _}) -> peer:call(P, ?MODULE, node_status, []) end, Nodes, 8),
    Active = lists:sum([maps:get(active_tunnels, S, 0) || S <- Statuses]),
    Sessions = lists:sum([maps:get(e2e_sessions, S, 0) || S <- Statuses]),
    Refused = lists:sum([maps:get(refused_sessions, S, 0) || S <- Statuses]),
    {Tunnels, E2e, Closed} = relay_log_counts(maps:get(relay_log, Env)),
    #{overlap := Overlap, warnings := Warnings, errors := Errors, timeouts := SetupTimeouts} =
        node_log_counts(maps:get(dir, Env)),
    Links = N * (N - 1) div 2,
    CpuD = cpu_diff(Cpu0, Cpu1),
    WallS = case MeshS of undefined -> Timeout / 1000; _ -> MeshS end,

    io:format("  go cast to all nodes in ~.3f s~n", [CastS]),
    io:format("  full mesh: ~s (node reached N-1: median ~s s over ~b nodes, last ~s s)~n",
              [case Complete of true -> fmt(MeshS) ++ " s"; false -> "NOT REACHED" end,
               fmt(ReachP50), length(Reached), fmt(MeshS)]),
    io:format("  nodes() lengths afterwards: min ~b max ~b (want ~b); nodeup ~b (links x2 = ~b), nodedown ~b, failed connects ~b~n",
              [lists:min(Counts), lists:max(Counts), N - 1, Ups, 2 * Links, Downs, Pangs]),
    io:format("  global:sync() done on all nodes: ~s s after go~n", [fmt(GlobalS)]),
    io:format("  rpc:multicall over ~b nodes: first ~.1f ms, median ~.1f ms; ~b results, bad nodes ~p~n",
              [N, McFirst, McMedian, McResults, McBad]),
    io:format("  relay RSS (the largest relay's): ~.1f MiB before go, ~.1f MiB after, peak ~.1f MiB~n",
              [Rss0 / 1024, RelayRss / 1024, RelayHwm / 1024]),
    io:format("  node RSS: median ~.1f MiB, max ~.1f MiB (PSS median ~.1f MiB, max ~.1f MiB)~n",
              [median(NodeRss) / 1024, lists:max(NodeRss) / 1024,
               median(NodePss) / 1024, lists:max(NodePss) / 1024]),
    io:format("  relay log: ~b tunnel opened (~b closed already), ~b e2e session opened; links ~b~n",
              [Tunnels, Closed, E2e, Links]),
    io:format("  node status: active_tunnels sum ~b, e2e_sessions sum ~b, refused_sessions ~b (links x2 = ~b)~n",
              [Active, Sessions, Refused, 2 * Links]),
    io:format("  node logs: ~b overlapping-partition lines; ~b warnings, ~b errors; ~b \"timed out\" lines~n",
              [Overlap, Warnings, Errors, SetupTimeouts]),
    #{relay := RCpu, sched := SCpu, nif := NCpu, other := OCpu, busy := BusyCpu,
      controller := CtlCpu} = CpuD,
    Foreign = BusyCpu - RCpu - SCpu - NCpu - OCpu - CtlCpu,
    io:format("  CPU during the mesh (~.2f s wall, 2 cores = ~.2f cpu-s): relay ~.2f s, "
              "nodes ~.2f s (schedulers ~.2f, NIF runtime ~.2f, other ~.2f), controller ~.2f s; "
              "other processes on the machine ~.2f s~n",
              [WallS, 2 * WallS, RCpu, SCpu + NCpu + OCpu, SCpu, NCpu, OCpu, CtlCpu, max(0.0, Foreign)]),
    {Udp, Tcp} = {maps:get(udp, Net1) - maps:get(udp, Net0), maps:get(tcp, Net1) - maps:get(tcp, Net0)},
    io:format("  sent on the machine during the mesh: ~b UDP sends (~b a link), ~b TCP segments (~b a link)~n",
              [Udp, Udp div Links, Tcp, Tcp div Links]),
    Foreign > max(0.2, 0.2 * WallS) andalso
        io:format("  NOTE: other processes used the CPU during the mesh; times are skewed~n"),
    io:format("  idle mesh for ~b s: relay ~.1f%, nodes ~.1f% of one core (schedulers ~.1f, NIF runtime ~.1f, other ~.1f)~n",
              [IdleS, 100 * IRelay / IdleS, 100 * (ISched + INif + IOther) / IdleS,
               100 * ISched / IdleS, 100 * INif / IdleS, 100 * IOther / IdleS]),
    print_reductions(Red0, Red1),
    %% One markdown row for the summary table (bench/mesh.sh prints it).
    io:format("ROW| ~s | ~s | ~b | ~.1f | ~s | ~s | ~s | ~.1f / ~.1f | ~b/~b ~s | ~.1f (~.1f) | ~.1f / ~.1f | ~b / ~b / ~b | ~b / ~b | ~b | ~.2f / ~.2f / ~.2f / ~.2f | ~.1f |~n",
              [Mode, Variant, N, BootS, fmt(MeshS),
               fmt(case Complete of true -> ReachP50; false -> undefined end), fmt(GlobalS),
               McFirst, McMedian, McResults, N, case McBad of [] -> "ok"; _ -> "BAD" end,
               RelayRss / 1024, RelayHwm / 1024,
               median(NodeRss) / 1024, lists:max(NodeRss) / 1024,
               Tunnels, E2e, Links, Ups, Downs, Overlap,
               RCpu, SCpu, NCpu, OCpu, max(0.0, Foreign)]),
    stop_nodes(Nodes),
    ok.

%% How many targets a node dials at once (0: all). 8 by default: with all
%% at once, e2e meshes of 100 nodes on 2 cores do not converge (sessions
%% time out while thousands of handshakes share the CPU).
dial_par() -> env_int("MESH_DIAL_PAR", 8).

%% The connect plan, MESH_DIAL_PAR and MESH_ERL_ARGS, for the table.
variant(Connect) ->
    Dial = case dial_par() of
               0 -> "/dial-all";
               P -> "/dial" ++ integer_to_list(P)
           end,
    Extra = case string:trim(os:getenv("MESH_ERL_ARGS", "")) of
                "" -> "";
                A -> " `" ++ A ++ "`"
            end,
    Connect ++ Dial ++ Extra.

fmt(undefined) -> "-";
fmt(X) -> float_to_list(float(X), [{decimals, 2}]).

now_us() -> erlang:monotonic_time(microsecond).

median(L) ->
    S = lists:sort(L),
    lists:nth((length(S) + 1) div 2, S).

plan("ordered", Names) ->
    [[B || B <- Names, B > A] || A <- Names];
plan("all", Names) ->
    [[B || B <- Names, B =/= A] || A <- Names];
plan("seed", [Seed | _] = Names) ->
    [[Seed || A <- [Name], A =/= Seed] || Name <- Names].

%% Nodes are named mesh001.. so that atom order is index order.
node_name(I) ->
    list_to_atom(lists:flatten(io_lib:format("mesh~3..0b", [I]))).

start_nodes(N, #{dir := Dir} = Env) ->
    Par = env_int("MESH_START_PAR", 4),
    PidFile = filename:join(Dir, "pids"),
    pmap(fun(I) -> start_node(I, Env, PidFile) end, lists:seq(1, N), Par).

start_node(I, #{root := Root, dir := Dir} = Env, PidFile) ->
    Name = node_name(I),
    Log = filename:join(Dir, atom_to_list(Name) ++ ".log"),
    Args = ["+S", "1:1", "+SDcpu", "1:1", "+SDio", "1", "+A", "1",
            "+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none",
            "-setcookie", ?COOKIE,
            "-pa", filename:join(Root, "_build/default/lib/macula_dist/ebin"),
            "-pa", filename:join(Root, "bench/ebin"),
            "-kernel", "logger",
            lists:flatten(io_lib:format("[{handler,default,logger_std_h,#{config=>#{file=>~p}}}]",
                                        [Log]))]
        ++ carrier_args(Env)
        ++ string:lexemes(os:getenv("MESH_ERL_ARGS", ""), " "),
    {ok, Peer, Node} = peer:start(#{name => Name, connection => standard_io,
                                    args => Args, wait_boot => 60000}),
    OsPid = peer:call(Peer, os, getpid, []),
    ok = file:write_file(PidFile, [OsPid, "\n"], [append]),
    {Peer, Node, OsPid}.

%% tcp: plain inet_tcp_dist, for comparison (bench/mesh.sh runs a private
%% epmd and sets ERL_EPMD_PORT); tls: inet_tls_dist the same way, both ends
%% proving a certificate (see tls_optfile/1); e2e and stream: -proto_dist
%% macula. The relay connection's idle timeout is raised from 2 s to 10 s:
%% a hundred VMs on two cores starve each other's NIF threads for seconds
%% while the mesh forms, and with 2 s the relay connections time out (the
%% mesh then never forms: measured).
carrier_args(#{mode := "tcp"}) ->
    [];
carrier_args(#{mode := "tls", dir := Dir}) ->
    ["-proto_dist", "inet_tls", "-ssl_dist_optfile", tls_optfile_name(Dir)];
carrier_args(#{mode := Mode, url := Urls, pin := Pins, token_file := Token}) ->
    Relay = case string:lexemes(Urls, ",") of
                [Url] -> ["-macula_dist", "relay", quoted(Url)];
                Set -> ["-macula_dist", "relay_set", list_arg(Set)]
            end,
    ["-proto_dist", "macula", "-no_epmd"] ++ Relay ++
    ["-macula_dist", "pin_sha256", list_arg(string:lexemes(Pins, ",")),
     "-macula_dist", "token_file", quoted(Token),
     "-macula_dist", "tunnel", Mode,
     "-macula_dist", "idle_timeout", "10000"].

%% The tls mode's inet_tls_dist options, as close to what an e2e session
%% proves as OTP offers: TLS 1.3, Ed25519 certificates from a test CA,
%% and each end checks the other's (verify_peer both ways; no host name
%% check, the certificate names no host).
tls_optfile(#{mode := "tls", dir := Dir}) ->
    Key = [{key, {namedCurve, ed25519}}],
    Chain = #{root => Key, intermediates => [], peer => Key},
    #{server_config := Server, client_config := Client} =
        public_key:pkix_test_data(#{server_chain => Chain, client_chain => Chain}),
    Common = [{versions, ['tlsv1.3']}, {verify, verify_peer}],
    Opts = [{server, Server ++ Common ++ [{fail_if_no_peer_cert, true}]},
            {client, Client ++ Common ++ [{server_name_indication, disable}]}],
    file:write_file(tls_optfile_name(Dir), io_lib:format("~p.~n", [Opts]));
tls_optfile(_) ->
    ok.

tls_optfile_name(Dir) -> filename:join(Dir, "ssl_dist.conf").

quoted(S) -> "\"" ++ S ++ "\"".

%% A list of strings as one argument: ["a","b"].
list_arg([One]) -> quoted(One);
list_arg(Strings) -> lists:flatten(["[", lists:join(",", [quoted(S) || S <- Strings]), "]"]).

stop_nodes(Nodes) ->
    _ = pmap(fun({P, _, _}) -> try peer:stop(P) catch _:_ -> ok end end, Nodes, 16),
    ok.

%% Poll the nodes that have not reached the count yet (the nodes stamp the
%% time themselves).
wait_mesh(Nodes, _Want, Deadline) ->
    wait_key(Nodes, reached, Deadline).

wait_key(Nodes, Key, Deadline) ->
    wait_key(Nodes, Key, Deadline, #{}).

wait_key(Nodes, Key, Deadline, Done) ->
    Pending = [Nd || {P, _, _} = Nd <- Nodes, not maps:is_key(P, Done)],
    New = maps:from_list(
            [{P, R} || {P, R} <- pmap(fun({P, _, _}) -> {P, peer:call(P, ?MODULE, node_result, [])} end,
                                      Pending, 8),
                       maps:get(Key, R, undefined) =/= undefined]),
    Done1 = maps:merge(Done, New),
    case map_size(Done1) =:= length(Nodes) of
        true ->
            {true, [maps:get(P, Done1) || {P, _, _} <- Nodes]};
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true ->
                    Rest = pmap(fun({P, _, _}) -> peer:call(P, ?MODULE, node_result, []) end,
                                Nodes, 8),
                    io:format("  TIMEOUT waiting for ~p: ~b of ~b nodes done~n",
                              [Key, map_size(Done1), length(Nodes)]),
                    {false, Rest};
                false ->
                    timer:sleep(250),
                    wait_key(Nodes, Key, Deadline, Done1)
            end
    end.

%% Map F over L with at most Par at a time; results in order.
pmap(F, L, Par) ->
    Parent = self(),
    Indexed = lists:zip(lists:seq(1, length(L)), L),
    Shards = [[X || {I, _} = X <- Indexed, I rem Par =:= K] || K <- lists:seq(0, Par - 1)],
    Pids = [spawn_link(fun() -> Parent ! {self(), [{I, F(X)} || {I, X} <- Shard]} end)
            || Shard <- Shards],
    Results = lists:append([receive {Pid, R} -> R end || Pid <- Pids]),
    [R || {_, R} <- lists:keysort(1, Results)].

%% Reductions during the mesh by kind of process, summed over the nodes;
%% "exited" is what processes that ended meanwhile used.
print_reductions(Before, After) ->
    Sum = fun(Maps) -> lists:foldl(fun(M, Acc) ->
                                           maps:fold(fun(K, V, A) -> A#{K => V + maps:get(K, A, 0)} end,
                                                     Acc, M)
                                   end, #{}, Maps)
          end,
    B = Sum(Before),
    A = Sum(After),
    Total = maps:get(total, A) - maps:get(total, B),
    Kinds = maps:without([total], A),
    Diff = [{K, V - maps:get(K, B, 0)} || {K, V} <- maps:to_list(Kinds)],
    Live = lists:sum([V || {_, V} <- Diff]),
    Top = lists:sublist(lists:reverse(lists:keysort(2, [{"exited", Total - Live} | Diff])), 8),
    io:format("  reductions during the mesh, all nodes: ~.1f M; by process kind: ~ts~n",
              [Total / 1.0e6,
               lists:join(", ", [io_lib:format("~ts ~b%", [K, round(100 * V / max(1, Total))]) || {K, V} <- Top])]).

%% ---- /proc ----

rss_kib(OsPid) -> status_kib(OsPid, "VmRSS").

%% The largest value of `Key' over the relays (each has its own bound).
relays_kib(RelayPids, Key) ->
    lists:max([0 | [status_kib(P, Key) || P <- relay_pids(RelayPids)]]).

relay_pids(RelayPids) -> string:lexemes(RelayPids, ",").

relays_variant(RelayPids) ->
    case relay_pids(RelayPids) of
        [_, _ | _] = Pids -> "/" ++ integer_to_list(length(Pids)) ++ "relays";
        _ -> ""
    end.

status_kib(OsPid, Key) ->
    proc_kib("/proc/" ++ OsPid ++ "/status", Key).

pss_kib(OsPid) ->
    proc_kib("/proc/" ++ OsPid ++ "/smaps_rollup", "Pss").

proc_kib(File, Key) ->
    case file:read_file(File) of
        {ok, Bin} -> proc_kib_(Bin, Key);
        {error, _} -> 0
    end.

proc_kib_(Bin, Key) ->
    KeyB = list_to_binary(Key ++ ":"),
    [Line | _] = [L || L <- binary:split(Bin, <<"\n">>, [global]),
                       binary:longest_common_prefix([L, KeyB]) =:= byte_size(KeyB)],
    [_, Kb | _] = string:lexemes(binary_to_list(Line), " \t"),
    list_to_integer(Kb).

%% UDP sends (a GSO batch counts once) and TCP segments sent so far,
%% machine-wide: what the mesh's packets cost in syscalls and crypto.
net_sent() ->
    {ok, Bin} = file:read_file("/proc/net/snmp"),
    Lines = [string:lexemes(binary_to_list(L), " ") || L <- binary:split(Bin, <<"\n">>, [global]), L =/= <<>>],
    Value = fun(Proto, Key) ->
                    [Names, Values] = [tl(L) || [P | _] = L <- Lines, P =:= Proto ++ ":"],
                    list_to_integer(element(2, lists:keyfind(Key, 1, lists:zip(Names, Values))))
            end,
    #{udp => Value("Udp", "OutDatagrams"), tcp => Value("Tcp", "OutSegs")}.

%% CPU ticks per thread kind: #{relay, sched, nif, other}.
cpu_snapshot(RelayPid, Nodes) ->
    Busy = machine_busy(),
    Me = lists:sum([T || {_, T} <- threads(os:getpid())]),
    Relay = lists:sum([T || Pid <- relay_pids(RelayPid), {_, T} <- threads(Pid)]),
    Node = [threads(OsPid) || {_, _, OsPid} <- Nodes],
    Acc = lists:foldl(fun({Comm, T}, A) ->
                              K = kind(Comm),
                              A#{K := maps:get(K, A) + T}
                      end, #{sched => 0, nif => 0, other => 0}, lists:append(Node)),
    Acc#{relay => Relay, controller => Me, busy => Busy}.

%% Busy ticks of the whole machine (user nice system irq softirq steal).
machine_busy() ->
    {ok, Bin} = file:read_file("/proc/stat"),
    [Cpu | _] = binary:split(Bin, <<"\n">>),
    [_ | Fields] = string:lexemes(binary_to_list(Cpu), " "),
    [User, Nice, System, _Idle, _Iowait, Irq, SoftIrq, Steal | _] = [list_to_integer(F) || F <- Fields],
    User + Nice + System + Irq + SoftIrq + Steal.

kind("macula-dist" ++ _) -> nif;
kind(Comm) ->
    case string:find(Comm, "_scheduler") of
        nomatch -> other;
        _ -> case string:find(Comm, "dirty") of nomatch -> sched; _ -> other end
    end.

cpu_diff(A, B) ->
    Hz = clk_tck(),
    maps:map(fun(K, V) -> (V - maps:get(K, A)) / Hz end, B).

clk_tck() ->
    list_to_integer(string:trim(os:cmd("getconf CLK_TCK"))).

threads(OsPid) ->
    Dir = "/proc/" ++ OsPid ++ "/task",
    case file:list_dir(Dir) of
        {ok, Tids} -> lists:append([thread(Dir ++ "/" ++ Tid ++ "/stat") || Tid <- Tids]);
        {error, _} -> []
    end.

thread(File) ->
    case file:read_file(File) of
        {ok, Bin} ->
            S = binary_to_list(Bin),
            Open = string:chr(S, $(),
            Close = string:rchr(S, $)),
            Comm = lists:sublist(S, Open + 1, Close - Open - 1),
            Fields = string:lexemes(lists:nthtail(Close + 1, S), " "),
            %% After the comm: state(3) ... utime(14) stime(15), 1-based in stat.
            Utime = list_to_integer(lists:nth(12, Fields)),
            Stime = list_to_integer(lists:nth(13, Fields)),
            [{Comm, Utime + Stime}];
        {error, _} ->
            []
    end.

%% ---- logs ----

relay_log_counts(Files) ->
    Bin = iolist_to_binary([B || F <- string:lexemes(Files, ","),
                                 {ok, B} <- [file:read_file(F)]]),
    Lines = binary:split(Bin, <<"\n">>, [global]),
    Count = fun(P) -> length([L || L <- Lines, binary:match(L, P) =/= nomatch]) end,
    {Count(<<"tunnel opened">>), Count(<<"e2e session opened">>), Count(<<"tunnel closed">>)}.

node_log_counts(Dir) ->
    Files = filelib:wildcard(filename:join(Dir, "mesh*.log")),
    Lines = lists:append([begin {ok, B} = file:read_file(F), binary:split(B, <<"\n">>, [global]) end
                          || F <- Files]),
    Count = fun(P) -> length([L || L <- Lines, binary:match(L, P) =/= nomatch]) end,
    #{overlap => Count(<<"overlapping partition">>),
      warnings => Count([<<"WARNING REPORT">>, <<"warning:">>]),
      errors => Count([<<"ERROR REPORT">>, <<"error:">>]),
      timeouts => Count(<<"timed out">>)}.

%% ---- on the nodes ----

node_prepare(Want) ->
    Parent = self(),
    Pid = spawn(fun() ->
                        ok = net_kernel:monitor_nodes(true),
                        Parent ! {self(), ready},
                        watch(#{want => Want, reached => undefined, ups => 0, downs => 0,
                                pangs => 0, global_synced => undefined})
                end),
    receive {Pid, ready} -> ok end,
    true = register(mesh_watch, Pid),
    ok.

watch(#{want := Want} = S) ->
    receive
        {nodeup, _} ->
            S1 = S#{ups := maps:get(ups, S) + 1},
            case length(nodes()) >= Want andalso maps:get(reached, S) =:= undefined of
                true -> watch(S1#{reached := os:system_time(microsecond)});
                false -> watch(S1)
            end;
        {nodedown, _} ->
            watch(S#{downs := maps:get(downs, S) + 1});
        {pangs, P} ->
            watch(S#{pangs := maps:get(pangs, S) + P});
        {global_synced, T} ->
            watch(S#{global_synced := T});
        {get, From} ->
            From ! {mesh_watch, S#{nodes => length(nodes())}},
            watch(S)
    end.

%% Connect to every target at once, each from its own process.
%% Connect to the targets, at most Par at a time (0: all at once), each
%% from its own process.
node_go(Targets, Par) ->
    _ = spawn(fun() ->
                      Limit = case Par of 0 -> length(Targets); _ -> Par end,
                      Fails = dial(Targets, Limit, 0, 0),
                      mesh_watch ! {pangs, Fails}
              end),
    ok.

dial([], _Limit, 0, Fails) ->
    Fails;
dial([T | Rest], Limit, Running, Fails) when Running < Limit ->
    Self = self(),
    _ = spawn(fun() -> Self ! {dialed, net_kernel:connect_node(T)} end),
    dial(Rest, Limit, Running + 1, Fails);
dial(Targets, Limit, Running, Fails) ->
    receive
        {dialed, true} -> dial(Targets, Limit, Running - 1, Fails);
        {dialed, _} -> dial(Targets, Limit, Running - 1, Fails + 1)
    end.

node_global_sync() ->
    _ = spawn(fun() ->
                      ok = global:sync(),
                      mesh_watch ! {global_synced, os:system_time(microsecond)}
              end),
    ok.

node_result() ->
    mesh_watch ! {get, self()},
    receive {mesh_watch, S} -> S after 10000 -> #{} end.

%% Reductions by kind of process, and in all (without this call's own).
node_reductions() ->
    Kinds = [{proc_kind(P), R} || P <- processes(), P =/= self(),
                                  {reductions, R} <- [process_info(P, reductions)]],
    {Total, _} = erlang:statistics(reductions),
    {reductions, Mine} = process_info(self(), reductions),
    lists:foldl(fun({K, R}, A) -> A#{K => R + maps:get(K, A, 0)} end,
                #{total => Total - Mine}, Kinds).

proc_kind(P) ->
    case process_info(P, [registered_name, initial_call, dictionary, current_function]) of
        [{registered_name, Name} | _] when is_atom(Name) ->
            atom_to_list(Name);
        [_, {initial_call, Init}, {dictionary, Dict}, {current_function, Current}] ->
            %% A spawned fun says erlang:apply/2: where it is now is more telling.
            {M, F, A} = case lists:keyfind('$initial_call', 1, Dict) of
                            {_, MFA} -> MFA;
                            false when Init =:= {erlang, apply, 2}, is_tuple(Current) -> Current;
                            false -> Init
                        end,
            lists:flatten(io_lib:format("~s:~s/~b", [M, F, A]));
        _ ->
            "exited"
    end.

%% Counts summed over the node's relay clients (one per relay it joined).
node_status() ->
    lists:foldl(fun(S, Acc) ->
                        maps:fold(fun(K, V, A) when is_integer(V) ->
                                          A#{K => maps:get(K, A, 0) + V};
                                     (_, _, A) -> A
                                  end, Acc, S)
                end, #{}, macula_dist:status()).

%% Times of rpc:multicall(AllNodes, erlang, node, []) in ms: the first and
%% the median of the rest; the results of the last call.
multicall(Times, Want) ->
    All = [node() | nodes()],
    Runs = [begin
                T0 = erlang:monotonic_time(microsecond),
                {Res, Bad} = rpc:multicall(All, erlang, node, [], 60000),
                {(erlang:monotonic_time(microsecond) - T0) / 1000, Res, Bad}
            end || _ <- lists:seq(1, Times)],
    [{First, _, _} | Rest] = Runs,
    {_, LastRes, LastBad} = lists:last(Runs),
    Ok = length(All) =:= Want andalso lists:sort(LastRes) =:= lists:sort(All) andalso
        lists:all(fun({_, R, B}) -> length(R) =:= Want andalso B =:= [] end, Runs),
    #{first => First, median => median([T || {T, _, _} <- Rest]),
      results => length(LastRes),
      bad => case Ok of true -> LastBad; false -> LastBad ++ [{not_all_nodes, length(All)}] end}.
