#!/usr/bin/env bash
# Prints the path of a Python with aioquic and msgpack, made once in a
# virtual environment under target/ (never pip into the system Python).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/interop-venv
if ! "$venv/bin/python3" -c 'import aioquic, msgpack' 2>/dev/null; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2; }
    else
      echo "python3-venv is missing: apt-get install python3-venv" >&2; exit 1
    fi
  fi
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python3" -m pip install --quiet aioquic msgpack >&2
fi
echo "$PWD/$venv/bin/python3"
