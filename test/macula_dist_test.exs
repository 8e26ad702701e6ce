defmodule MaculaDistTest do
  use ExUnit.Case

  alias MaculaDist.TestPeer

  setup_all do
    {:ok, relay} = MaculaDist.Relay.start_link(port: 0)
    Process.unlink(relay)
    on_exit(fn -> MaculaDist.Relay.stop(relay) end)
    %{relay: relay, info: MaculaDist.Relay.info(relay)}
  end

  test "an embedded relay reports where it listens", %{info: info} do
    assert %{url: "quic://127.0.0.1:" <> _, fingerprint: pin} = info
    assert byte_size(pin) == 64
    assert {:ok, {~c"127.0.0.1", port}} = MaculaDist.parse_relay_url(info.url)
    assert port == info.port
    assert {:error, :not_running} = MaculaDist.status()
  end

  # The same in both tunnel modes: e2e sessions (the default) and stream tunnels.
  for mode <- [:e2e, :stream] do
    @mode mode
    test "two peers connect through the relay in #{mode} mode; erpc and Node.monitor work",
         %{info: info} do
      mode = @mode
      extra = [~c"-macula_dist", ~c"tunnel", Atom.to_charlist(mode)]
      {a, a_node} = TestPeer.start(:"ex_alice_#{mode}", info, extra)
      {b, b_node} = TestPeer.start(:"ex_bob_#{mode}", info, extra)

      try do
        assert :peer.call(a, Node, :connect, [b_node]) == true
        assert :peer.call(a, Node, :list, []) == [b_node]
        assert :peer.call(a, :erpc, :call, [b_node, Node, :self, []]) == b_node

        # The relay carries it: the connection's carrier is macula, in this mode.
        {:ok, node_info} = :peer.call(a, :net_kernel, :node_info, [b_node])
        assert {:net_address, :relay, _, :macula, :inet} = node_info[:address]
        assert {:ok, [mode: ^mode]} = :peer.call(a, :net_kernel, :getopts, [b_node, [:mode]])

        assert {:ok, %{connection: :connected, active_tunnels: 1}} =
                 :peer.call(a, MaculaDist, :status, [])

        assert [%{connection: :connected}] = :peer.call(a, MaculaDist, :relays, [])
        assert b_node in :peer.call(a, MaculaDist, :relay_nodes, [])
        assert Atom.to_string(b_node) in :peer.call(a, MaculaDist, :relay_node_names, [])

        :ok = :peer.call(a, TestPeer, :watch, [b_node])
        :peer.stop(b)
        assert :peer.call(a, TestPeer, :watch_result, [], 60_000) == :nodedown
        assert :peer.call(a, Node, :list, []) == []
        assert a_node in [:peer.call(a, Node, :self, [])]
      after
        :peer.stop(a)
        catch_exit(:peer.stop(b))
      end
    end
  end
end
