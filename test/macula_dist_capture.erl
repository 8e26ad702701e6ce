%% What the VM really hands the carrier: on a live e2e connection from
%% this node to another, every control message of OTP's erl_dist_protocol
%% that names a sender (and a few that name none), with trace tokens,
%% fragments and atoms over 255 bytes, is captured as `dist_ctrl_get_data'
%% returned it (call trace on the BIF) and given to the NIF's router, which
%% must put each on the lane of the process it concerns, or behind a fence
%% when that is a registered name.
%%
%% Each step is followed by a marker message whose packet closes it, so
%% the packets between two markers are the step's. Steps whose packet the
%% VM sends later (on an exit, a monitor's DOWN, a spawn reply, an unlink
%% acknowledgement) wait until the other node saw it.
-module(macula_dist_capture).
-export([check/1, agent/1, idle/0]).

-define(MARK, "macula-capture-mark-").

%% Runs on the sending node; `B' is the other node. Returns the steps
%% checked, or raises with the first step routed wrongly.
check(B) ->
    true = net_kernel:connect_node(B),
    C = self(),
    {Agent, AgentMon} = spawn_monitor(B, ?MODULE, agent, [C]),
    receive
        {Agent, ready} -> ok;
        {'DOWN', AgentMon, process, Agent, Why} -> error({agent_failed, Why})
    after 10000 -> error(no_agent)
    end,
    demonitor(AgentMon, [flush]),
    Marker = spawn_link(fun marker/0),
    1 = erlang:trace_pattern({erlang, dist_ctrl_get_data, 1}, [{'_', [], [{return_trace}]}], [local]),
    _ = erlang:trace(all, true, [call]),
    try
        {_Before, _} = mark(Marker, Agent, 0),
        Steps = steps(B, Agent),
        [check_step(I, Name, Step, Marker, Agent) || {I, {Name, Step}} <- lists:zip(lists:seq(1, length(Steps)), Steps)]
    after
        erlang:trace(all, false, [call]),
        erlang:trace_pattern({erlang, dist_ctrl_get_data, 1}, false, [local])
    end.

%% {Name, fun() -> [Expected]}: the step runs, then says what its packets
%% must be: `{pid, P}' (one packet on P's lane), `{fragments, P}' (two or
%% more, all on P's lane), `fence'.
steps(B, Agent) ->
    C = self(),
    LongName = list_to_atom(lists:duplicate(200, $ä)),
    Big = binary:copy(<<"fragment">>, 1 bsl 17),
    [{send, fun() -> Agent ! {small, 1}, [{pid, C}] end},
     {send_long_atom_payload, fun() -> Agent ! {LongName, LongName}, [{pid, C}] end},
     {send_from_other_process, fun() -> by_new(fun() -> Agent ! hello end) end},
     {reg_send, fun() -> {capture_target, B} ! hi, [{pid, C}] end},
     {reg_send_long_name, fun() -> {LongName, B} ! hi, [{pid, C}] end},
     {send_fragments, fun() -> Agent ! {big, Big}, [{fragments, C}] end},
     {reg_send_fragments, fun() -> {capture_target, B} ! {big, Big}, [{fragments, C}] end},
     {send_tt, fun() -> traced(fun() -> Agent ! traced end) end},
     {reg_send_tt, fun() -> traced(fun() -> {capture_target, B} ! traced end) end},
     {alias_send, fun() -> Alias = ask(Agent, alias), Alias ! via_alias, [{pid, C}, {pid, C}] end},
     {alias_send_tt, fun() -> Alias = ask(Agent, alias),
                              [{pid, C} | traced(fun() -> Alias ! via_alias end)] end},
     {link, fun() -> true = link(Agent), [{pid, C}] end},
     {unlink, fun() -> true = unlink(Agent), [{pid, C}] end},
     {monitor, fun() -> put(mref, monitor(process, Agent)), [{pid, C}] end},
     {demonitor, fun() -> true = demonitor(get(mref)), [{pid, C}] end},
     {monitor_name, fun() -> put(mref, monitor(process, {LongName, B})), [{pid, C}] end},
     {demonitor_name, fun() -> true = demonitor(get(mref)), [{pid, C}] end},
     {exit2, fun() -> true = exit(Agent, go_on), [{pid, C}] end},
     {exit2_tt, fun() -> traced(fun() -> exit(Agent, go_on) end) end},
     {exit2_big_reason, fun() -> true = exit(Agent, {go_on, Big}), [{fragments, C}] end},
     {group_leader, fun() -> by_new(fun() -> group_leader(self(), Agent) end) end},
     {spawn_request, fun() -> _ = spawn_request(B, ?MODULE, idle, [], []), [{pid, C}] end},
     {spawn_request_tt, fun() -> traced(fun() -> spawn_request(B, ?MODULE, idle, [], []) end) end},
     {exit_on_death, fun() -> exit_on_death(Agent, boom) end},
     {exit_on_death_tt, fun() -> exit_on_death(Agent, {traced, boom}) end},
     {monitor_exit, fun() -> monitor_exit(Agent) end},
     {monitor_exit_of_a_name, fun() -> monitor_exit_of_a_name(Agent) end},
     {spawn_reply, fun() -> [{pid, C}, {pid, ask(Agent, {spawn_on, node()})}] end},
     {unlink_ack, fun() -> unlink_ack(Agent) end}]
        ++ priority_steps(Agent).

%% OTP 28 added priority messages (ALTACT_SIG_SEND).
priority_steps(Agent) ->
    case list_to_integer(erlang:system_info(otp_release)) >= 28 of
        true ->
            C = self(),
            [{altact_sig_send,
              fun() -> PAlias = ask(Agent, priority_alias),
                       ok = erlang:send(PAlias, urgent, [priority]),
                       [{pid, C}, {pid, C}] end}];
        false ->
            []
    end.

check_step(I, Name, Step, Marker, Agent) ->
    Expected = lists:flatten([Step()]),
    {Packets, MarkPacket} = mark(Marker, Agent, I),
    Routes = macula_dist_nif:dist_routes(Packets),
    Want = expected(Expected, Packets),
    Want =:= Routes orelse error({wrong_route, Name, #{want => Want, got => Routes,
                                                      heads => [head(P) || P <- Packets]}}),
    [{lane, _} = lane(Marker)] =:= macula_dist_nif:dist_routes([MarkPacket])
        orelse error({marker_misrouted, Name}),
    {Name, length(Packets)}.

%% What `dist_routes' must answer for a step's packets.
expected([], []) -> [];
expected([fence | Rest], [_ | Packets]) -> [fence | expected(Rest, Packets)];
expected([{pid, P} | Rest], [_ | Packets]) -> [lane(P) | expected(Rest, Packets)];
expected([{fragments, P} | Rest], [<<131, $E, _/binary>> | _] = Packets) ->
    {Fragments, Others} = lists:splitwith(fun(<<131, F, _/binary>>) -> F =:= $E orelse F =:= $F;
                                             (_) -> false end, Packets),
    length(Fragments) >= 2 orelse error({not_fragmented, [head(F) || F <- Fragments]}),
    [lane(P) || _ <- Fragments] ++ expected(Rest, Others);
expected(Expected, Packets) ->
    error({packets_not_as_expected, Expected, [head(P) || P <- Packets]}).

lane(Pid) -> {lane, macula_dist_nif:dist_lane_of_pid(term_to_binary(Pid))}.

head(Packet) -> binary:part(Packet, 0, min(24, byte_size(Packet))).

%% The marker process sends a marker to the agent; the packets before the
%% marker's are the step's.
mark(Marker, Agent, I) ->
    Marker ! {mark, Agent, I},
    packets_until(<<?MARK, I:32>>, []).

marker() ->
    receive {mark, Agent, I} -> Agent ! {mark, <<?MARK, I:32>>} end,
    marker().

packets_until(Mark, Acc) ->
    receive
        {trace, _, return_from, {erlang, dist_ctrl_get_data, 1}, {_Size, Data}} ->
            Packet = iolist_to_binary(Data),
            case binary:match(Packet, Mark) of
                nomatch -> packets_until(Mark, [Packet | Acc]);
                _ -> {lists:reverse(Acc), Packet}
            end;
        {trace, _, _, _} -> packets_until(Mark, Acc);
        {trace, _, _, _, _} -> packets_until(Mark, Acc)
    after 10000 ->
        error({marker_not_seen, Mark, [head(P) || P <- lists:reverse(Acc)]})
    end.

%% The step run by a fresh process: its packets go on its lane.
by_new(Fun) ->
    C = self(),
    P = spawn(fun() -> Fun(), C ! {self(), done} end),
    receive {P, done} -> [{pid, P}] end.

%% The same in a process carrying a seq_trace token (the _TT messages).
traced(Fun) ->
    by_new(fun() -> seq_trace:set_token(label, 17), Fun() end).

%% A process linked to the agent dies: EXIT (or PAYLOAD_EXIT) from it.
exit_on_death(Agent, Reason) ->
    C = self(),
    P = spawn(fun() ->
                  case Reason of
                      {traced, _} -> seq_trace:set_token(label, 17);
                      _ -> ok
                  end,
                  link(Agent), C ! {self(), linked},
                  receive die -> exit(Reason) end
              end),
    receive {P, linked} -> ok end,
    P ! die,
    receive {got, {'EXIT', P, Reason}} -> ok after 10000 -> error(no_exit) end,
    [{pid, P}, {pid, P}].

%% The agent monitors a process here that then dies: MONITOR_P_EXIT (or
%% its payload form) from that process.
monitor_exit(Agent) ->
    C = self(),
    M = spawn(?MODULE, idle, []),
    monitoring = ask(Agent, {monitor, M}),
    exit(M, kill),
    receive {got, {'DOWN', _, process, M, killed}} -> ok after 10000 -> error(no_down) end,
    [{pid, C}, {pid, M}].

%% ... a process monitored by its registered name: the DOWN names it by
%% name, so it goes behind a fence.
monitor_exit_of_a_name(Agent) ->
    C = self(),
    M = spawn(?MODULE, idle, []),
    true = register(capture_named, M),
    monitoring = ask(Agent, {monitor, {capture_named, node()}}),
    exit(M, kill),
    receive {got, {'DOWN', _, process, _, killed}} -> ok after 10000 -> error(no_down) end,
    [{pid, C}, fence].

%% The agent links to a process here and unlinks: UNLINK_ID_ACK from it,
%% sent when it handled the unlink (before it answers a later message).
unlink_ack(Agent) ->
    C = self(),
    X = spawn(fun X() -> receive {ping, From} -> From ! pong, X() end end),
    unlinked = ask(Agent, {link_unlink, X}),
    X ! {ping, self()},
    receive pong -> ok end,
    exit(X, kill),
    [{pid, C}, {pid, X}].

ask(Agent, Request) ->
    Agent ! {request, self(), Request},
    receive {Agent, Reply} -> Reply after 10000 -> error({no_reply, Request}) end.

idle() ->
    receive stop -> ok end.

%% ---- the other node ----

%% Registered as capture_target (and a forwarder under a name of 200
%% two-byte characters), traps exits, answers requests and tells the
%% checking process what it got.
agent(C) ->
    process_flag(trap_exit, true),
    true = register(capture_target, self()),
    Agent = self(),
    Forwarder = spawn_link(fun F() -> receive M -> Agent ! M, F() end end),
    true = register(list_to_atom(lists:duplicate(200, $ä)), Forwarder),
    C ! {self(), ready},
    agent_loop(C).

agent_loop(C) ->
    receive
        {request, From, Request} ->
            From ! {self(), answer(Request)};
        {mark, _} ->
            ok;
        {big, _} ->
            ok;
        Other ->
            C ! {got, Other}
    end,
    agent_loop(C).

answer(alias) -> alias();
answer(priority_alias) -> alias([priority]);
answer({monitor, Target}) -> _ = monitor(process, Target), monitoring;
answer({link_unlink, X}) -> true = link(X), true = unlink(X), unlinked;
answer({spawn_on, Node}) ->
    Ref = spawn_request(Node, ?MODULE, idle, [], []),
    receive {spawn_reply, Ref, ok, Pid} -> Pid end.
