#!/usr/bin/env escript
%% Writes native/macula_relay_proto/tests/vectors/control_messages.bin:
%% every control message of OTP's erl_dist_protocol that names a sender (and
%% some that do not), encoded by this VM as a pass-through distribution
%% packet (112, term_to_binary(Control), term_to_binary(Message)), each with
%% the sender the router must find. Run it again after an OTP upgrade.
%%
%% Record: <<PacketLen:32, Packet, SenderLen:32, Sender>>, where Sender is
%% term_to_binary of the sending pid, or empty when the packet must be
%% fenced (no sender, or one named by a registered name).
-mode(compile).

main([Out]) ->
    Pids = [self(), list_to_pid("<0.32767.8191>"), far_pid(long_node()), far_pid('n@h')],
    Ref = make_ref(),
    FarRef = binary_to_term(far_ref(long_node())),
    Big = lists:seq(1, 300),
    Records = lists:append(
        [[rec({1, From, To}, none, From),
          rec({2, '', To}, <<"m">>, undefined),
          rec({3, From, To, {shutdown, Big}}, none, From),
          rec({4, From, To}, none, From),
          rec({6, From, '', some_registered_name}, {call, Big}, From),
          rec({7, From, To}, none, From),
          rec({8, From, To, kill}, none, From),
          rec({12, '', To, {trace, token}}, hello, undefined),
          rec({13, From, To, {trace, token}, normal}, none, From),
          rec({16, From, '', reg, {trace, token}}, hello, From),
          rec({18, From, To, {trace, token}, normal}, none, From),
          rec({19, From, To, Ref}, none, From),
          rec({19, From, registered_name, FarRef}, none, From),
          rec({20, From, To, Ref}, none, From),
          rec({21, From, To, Ref, noproc}, none, From),
          rec({21, registered_name, To, FarRef, noproc}, none, undefined),
          rec({22, From, To}, lists:duplicate(100, <<"x">>), From),
          rec({23, From, To, {trace, token}}, x, From),
          rec({24, From, To}, {'EXIT', Big}, From),
          rec({25, From, To, {trace, token}}, x, From),
          rec({26, From, To}, x, From),
          rec({27, From, To, {trace, token}}, x, From),
          rec({28, From, To, Ref}, {reason, Big}, From),
          rec({28, registered_name, To, Ref}, reason, undefined),
          rec({29, Ref, From, To, {erlang, apply, 2}, [monitor, {priority, high}]},
              [fun lists:sum/1, [Big]], From),
          rec({30, FarRef, From, To, {m, f, 0}, [], {trace, token}}, [], From),
          rec({31, Ref, To, 3, From}, none, From),
          rec({31, Ref, To, 0, system_limit}, none, undefined),
          rec({32, Ref, To, 0, From, {trace, token}}, none, From),
          rec({33, From, make_ref()}, #{a => Big}, From),
          rec({34, From, FarRef, {trace, token}}, 1.5, From),
          rec({35, 1 bsl 70, From, To}, none, From),
          rec({36, 12345, From, To}, none, From),
          %% ALTACT_SIG_SEND (OTP 28: priority messages, exits through an
          %% alias): {37, Flags, From, To} or, with a token, a fifth element.
          rec({37, 0, From, To}, hello, From),
          rec({37, 2, From, make_ref(), {trace, token}}, {'EXIT', Big}, From),
          rec({37, 1, From, registered_name}, x, From),
          rec({5}, none, undefined),
          rec({99, From, To}, none, undefined)]
         || From <- Pids, To <- [hd(Pids), lists:last(Pids)]]),
    ok = file:write_file(Out, Records).

rec(Control, none, Sender) -> record(term_to_binary(Control), Sender);
rec(Control, Message, Sender) ->
    record([term_to_binary(Control), term_to_binary(Message)], Sender).

record(Body, Sender) ->
    Packet = iolist_to_binary([112, Body]),
    S = case Sender of undefined -> <<>>; _ -> term_to_binary(Sender) end,
    <<(byte_size(Packet)):32, Packet/binary, (byte_size(S)):32, S/binary>>.

%% A node name of 255 characters, most of them two bytes in UTF-8.
long_node() ->
    binary_to_atom(unicode:characters_to_binary(lists:duplicate(250, 16#e9) ++ "@host"), utf8).

far_pid(Node) ->
    N = atom_to_binary(Node, utf8),
    binary_to_term(<<131, 88, 118, (byte_size(N)):16, N/binary, 7:32, 3:32, 16#5eed:32>>).

far_ref(Node) ->
    N = atom_to_binary(Node, utf8),
    <<131, 90, 3:16, 118, (byte_size(N)):16, N/binary, 9:32, 1:32, 2:32, 3:32>>.
