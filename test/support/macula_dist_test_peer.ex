defmodule MaculaDist.TestPeer do
  @moduledoc false
  # Starts peer nodes on -proto_dist macula, and runs on them.

  @doc "A peer that joins the relay `info` describes, controlled over stdio."
  def start(name, %{url: url, fingerprint: pin}, extra \\ []) do
    paths = Enum.flat_map(:code.get_path(), fn dir -> [~c"-pa", dir] end)

    args =
      [
        ~c"-proto_dist", ~c"macula", ~c"-no_epmd", ~c"-setcookie", ~c"macula_exunit",
        ~c"-macula_dist", ~c"relay", ~c"\"#{url}\"",
        ~c"-macula_dist", ~c"pin_sha256", ~c"\"#{pin}\""
      ] ++ paths ++ extra

    {:ok, peer, node} =
      :peer.start(%{name: name, connection: :standard_io, args: args, wait_boot: 30_000})

    {peer, node}
  end

  @doc "Runs on a peer: watches `node` with Node.monitor/2 from a process that waits for `:go`."
  def watch(node) do
    parent = self()

    pid =
      spawn(fn ->
        true = Node.monitor(node, true)
        send(parent, :watching)

        receive do
          {:go, from} ->
            receive do
              {:nodedown, ^node} -> send(from, {:watched, :nodedown})
            after
              30_000 -> send(from, {:watched, :timeout})
            end
        end
      end)

    receive do
      :watching -> Process.register(pid, :macula_exunit_watch)
    end

    :ok
  end

  @doc "Runs on a peer: what the watcher saw."
  def watch_result do
    send(:macula_exunit_watch, {:go, self()})

    receive do
      {:watched, result} -> result
    end
  end
end
