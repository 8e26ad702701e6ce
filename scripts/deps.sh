#!/usr/bin/env bash
# What the build and the tests need: the Erlang/Elixir Debian packages
# (installed when missing, as root; otherwise it stops and prints the command
# to run) and cargo. Called by scripts/demo.sh, scripts/test.sh and .ci/run.
set -euo pipefail

packages=(erlang-nox erlang-dev erlang-src erlang-examples erlang-common-test
          erlang-eunit erlang-dialyzer rebar3 elixir)
# Commands the scripts run, and the package that gives each.
commands=(erl:erlang-nox erlc:erlang-nox rebar3:rebar3 mix:elixir)

missing=()
if command -v dpkg >/dev/null; then
  for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "missing Debian packages: ${missing[*]}" >&2
      echo "install them (as root), then run this again:" >&2
      echo "  sudo sh -c 'apt-get update && apt-get install -y ${missing[*]}'" >&2
      exit 1
    fi
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
  fi
fi

# Kernel NATs for macula_dist_nat_SUITE (iptables, conntrack) and a DNS
# server for macula_dist_dns_SUITE (dnsmasq): installed when root; without
# them those suites say why and skip.
if command -v dpkg >/dev/null && [ "$(id -u)" -eq 0 ]; then
  nat_missing=()
  for p in iptables conntrack dnsmasq-base; do
    dpkg -s "$p" >/dev/null 2>&1 || nat_missing+=("$p")
  done
  if [ ${#nat_missing[@]} -gt 0 ]; then
    echo "installing: ${nat_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${nat_missing[@]}"
  fi
fi

# Installed or not by dpkg, the commands must be on PATH.
for c in "${commands[@]}"; do
  if ! command -v "${c%%:*}" >/dev/null; then
    echo "${c%%:*} not found on PATH (Debian package ${c#*:}; Erlang/OTP 25 or newer, rebar3, Elixir)" >&2
    exit 1
  fi
done
command -v cargo >/dev/null || { echo "cargo is required (Rust: https://rustup.rs)" >&2; exit 1; }
