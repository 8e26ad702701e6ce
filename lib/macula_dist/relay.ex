defmodule MaculaDist.Relay do
  @moduledoc """
  A relay inside this VM (the same Rust relay as `macula-dist-relay`), for
  development and tests. Put it under a supervisor:

      children = [{MaculaDist.Relay, port: 4434}]

  or start one on any free port and ask where it is:

      {:ok, relay} = MaculaDist.Relay.start_link(port: 0)
      %{url: url, fingerprint: pin} = MaculaDist.Relay.info(relay)
  """

  @typedoc "`:ip` (default \"127.0.0.1\"), `:port` (default 0, any free port), `:token`."
  @type option :: {:ip, String.t()} | {:port, :inet.port_number()} | {:token, String.t()}

  @doc "Starts a relay linked to the caller."
  @spec start_link([option()]) :: GenServer.on_start()
  def start_link(opts \\ []) do
    :macula_dist_relay.start_link(Map.new(opts))
  end

  @doc false
  def child_spec(opts) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [opts]}, type: :worker}
  end

  @doc """
  Where the relay listens and how to trust it: `%{url: binary, address:
  binary, port: integer, fingerprint: binary}`, plus its node and tunnel counts.
  """
  @spec info(pid()) :: map()
  def info(relay), do: :macula_dist_relay.info(relay)

  @doc "Stops the relay; its nodes see their connection close."
  @spec stop(pid()) :: :ok
  def stop(relay), do: :macula_dist_relay.stop(relay)
end
