defmodule Cluster.MixProject do
  use Mix.Project

  def project do
    [
      app: :cluster,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      # A path dependency here; in your project, `git:` works the same way.
      deps: [{:macula_dist, path: "../.."}],
      releases: [cluster: [include_executables_for: [:unix]]]
    ]
  end

  def application do
    [mod: {Cluster.Application, []}, extra_applications: [:logger]]
  end
end
