defmodule Cluster.Application do
  @moduledoc """
  Joins the node named in CLUSTER_PEER (if any) through the relay and says
  what it sees. The relay itself comes from `rel/vm.args.eex` and the
  MACULA_DIST_* environment.
  """
  use Application
  require Logger

  @impl true
  def start(_type, _args) do
    children =
      case System.get_env("CLUSTER_PEER") do
        nil -> []
        peer -> [{Task, fn -> join(String.to_atom(peer), 50) end}]
      end

    Supervisor.start_link(children, strategy: :one_for_one, name: Cluster.Supervisor)
  end

  defp join(peer, 0), do: IO.puts("cluster: could not reach #{peer}")

  defp join(peer, tries) do
    if Node.connect(peer) do
      {:ok, status} = MaculaDist.status()
      answer = :erpc.call(peer, Node, :self, [])

      IO.puts(
        "cluster: #{Node.self()} connected to #{answer} through #{status.relay_url}; " <>
          "Node.list() = #{inspect(Node.list())}"
      )
    else
      Process.sleep(200)
      join(peer, tries - 1)
    end
  end
end
