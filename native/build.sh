#!/bin/sh
# Builds the NIF (release) and puts it where code:priv_dir(macula_dist) finds it.
# Called by rebar3 and mix before compiling the Erlang sources.
set -e
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet -p macula_dist_nif
mkdir -p priv
case "$(uname -s)" in
  Darwin) lib=libmacula_dist_nif.dylib ;;
  *) lib=libmacula_dist_nif.so ;;
esac
# Copy to a temporary name and rename, so a running VM never sees a half file.
cp "target/release/$lib" priv/.macula_dist_nif.so.tmp
mv -f priv/.macula_dist_nif.so.tmp priv/macula_dist_nif.so
