defmodule Mix.Tasks.Compile.MaculaDistNif do
  @moduledoc "Builds the Rust NIF with cargo into priv/, when a Rust source is newer than it."
  use Mix.Task.Compiler

  @nif "priv/macula_dist_nif.so"

  @impl true
  def run(_args) do
    root = Path.expand(__DIR__)

    sources =
      [Path.join(root, "Cargo.toml"), Path.join(root, "Cargo.lock")] ++
        Path.wildcard(Path.join(root, "native/**/*.{rs,toml}"))

    if Mix.Utils.stale?(sources, [Path.join(root, @nif)]) do
      Mix.shell().info("Building the macula_dist NIF with cargo")

      case System.cmd("sh", [Path.join(root, "native/build.sh")], into: IO.stream(:stdio, :line)) do
        {_, 0} -> {:ok, []}
        {_, status} -> Mix.raise("cargo build of the macula_dist NIF failed (exit #{status})")
      end
    else
      {:noop, []}
    end
  end
end

defmodule MaculaDist.MixProject do
  use Mix.Project

  def project do
    [
      app: :macula_dist,
      version: "0.1.0",
      elixir: "~> 1.14",
      compilers: [:macula_dist_nif] ++ Mix.compilers(),
      erlc_options: [:debug_info, :warnings_as_errors],
      elixirc_paths: elixirc_paths(Mix.env()),
      start_permanent: Mix.env() == :prod,
      deps: [],
      description: "Erlang distribution through a QUIC relay (-proto_dist macula)"
    ]
  end

  def application do
    [extra_applications: [:logger, :crypto]]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
