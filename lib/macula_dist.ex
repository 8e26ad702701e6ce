defmodule MaculaDist do
  @moduledoc """
  Erlang distribution through a QUIC relay, for Elixir users.

  Nodes start with `-proto_dist macula -no_epmd` and a relay to join
  (`-macula_dist relay "quic://host:4434"`, see the README); after that
  `Node.connect/1`, `:erpc`, `:global`, `:pg` and monitors work as usual.
  This module only reads the state of the relay connection (as the Erlang
  module `:macula_dist_cluster` does); the work is done by the Erlang
  modules and the Rust NIF.
  """

  @typedoc "What `status/0` reports about the relay connection."
  @type status :: %{
          relay_url: binary(),
          node: binary(),
          connection: :connecting | :connected | :closed,
          identified: boolean(),
          pending_tunnels: non_neg_integer(),
          active_tunnels: non_neg_integer(),
          bytes_in: non_neg_integer(),
          bytes_out: non_neg_integer(),
          rtt_us: non_neg_integer(),
          kernel_set: boolean()
        }

  @doc """
  The relay connection of this node, or `{:error, :not_running}` when the
  node does not run `-proto_dist macula` (or distribution is not started).
  """
  @spec status() :: {:ok, status()} | {:error, :not_running}
  def status do
    case :macula_dist_relay_client.whereis_client() do
      :undefined -> {:error, :not_running}
      pid -> {:ok, :macula_dist_relay_client.status(pid)}
    end
  end

  @doc """
  Every relay connection of this node, in the order of its relays (empty
  when the node does not run `-proto_dist macula`). Each status's
  `:sessions` names the peers whose e2e session that relay carries now.
  """
  @spec relays() :: [map()]
  def relays, do: :macula_dist_cluster.status()

  @doc """
  The other nodes on this node's relays, which it may connect to; `[]`
  when the node does not run `-proto_dist macula`. A name that is not an
  atom yet stays a binary (the relay's list never fills the atom table).
  With `-macula_dist autoconnect true` the node connects to them by itself.
  """
  @spec relay_nodes() :: [node() | binary()]
  def relay_nodes, do: :macula_dist_cluster.relay_nodes()

  @doc "The names of the other nodes on this node's relays, as binaries."
  @spec relay_node_names() :: [binary()]
  def relay_node_names, do: :macula_dist_cluster.relay_node_names()

  @doc """
  Parses a relay URL the way the node does: `quic://host:port`, `host:port`,
  `host` (port 4434) or `[::1]:4434`.
  """
  @spec parse_relay_url(String.t()) ::
          {:ok, {charlist(), :inet.port_number()}} | {:error, {:bad_relay_url, term()}}
  def parse_relay_url(url), do: :macula_dist_config.parse_url(url)
end
