#!/usr/bin/env bash
# The build, EUnit, Common Test (test/macula_dist_SUITE) and ExUnit on the
# Erlang/OTP and Elixir of other Debian releases, each in a chroot made with
# debootstrap (kept, and reused, under $MACULA_CHROOTS):
#   trixie  OTP 27, Elixir 1.18        sid  OTP 29, Elixir 1.20
# The host's NIF build (target/, priv/) and Rust toolchain (~/.cargo,
# ~/.rustup) are reused: the repository and both are bind-mounted at the
# same paths. Each release builds into its own _build/otp<N> (rebar3) and
# _build/otp<N>-mix (mix), so the host's _build is left as it is.
#
# Usage (as root): scripts/otp-matrix.sh [trixie|sid ...]   (default: trixie sid)
# Environment: MACULA_CHROOTS (default /var/cache/macula-dist/chroots),
#              DEBIAN_MIRROR (default: the host's apt mirror, else deb.debian.org).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)

releases=("$@")
[ ${#releases[@]} -gt 0 ] || releases=(trixie sid)
for r in "${releases[@]}"; do
  case "$r" in trixie|sid) ;; *) echo "unknown release: $r (trixie or sid)" >&2; exit 2 ;; esac
done
[ "$(id -u)" -eq 0 ] || { echo "otp-matrix.sh needs root (debootstrap, chroot, mount)" >&2; exit 1; }

chroots=${MACULA_CHROOTS:-/var/cache/macula-dist/chroots}
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\/debian\)\/*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}
# No C compiler: the NIF is built on the host (below) and cargo in the chroot
# finds it up to date; one linked there against a newer glibc would not load
# on the host.
packages=(erlang-nox erlang-dev erlang-src erlang-common-test erlang-eunit erlang-dialyzer
          rebar3 elixir ca-certificates openssl procps)
cargo_home=${CARGO_HOME:-$HOME/.cargo}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}

export DEBIAN_FRONTEND=noninteractive
export LANG=${LANG:-C.UTF-8} LC_ALL=${LC_ALL:-C.UTF-8}

# ---- mounts, all undone on exit ----
mounted=()
unmount_all() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount -R "${mounted[i]}" 2>/dev/null || umount -R -l "${mounted[i]}" 2>/dev/null ||
      echo "could not unmount ${mounted[i]}" >&2
  done
  mounted=()
}
child=
trap unmount_all EXIT
trap '[ -z "$child" ] || { kill -TERM "$child" 2>/dev/null; wait "$child"; }; exit 130' INT TERM

bind() { # bind SRC DIR-IN-CHROOT
  mkdir -p "$2"
  mount --rbind "$1" "$2"
  mounted+=("$2")
  mount --make-rslave "$2"
}

# Anything mounted below $1 (never delete a tree with the repo mounted in it).
mounted_below() { awk -v d="$1/" 'index($5 "/", d) == 1 { print $5 }' /proc/self/mountinfo; }

# ---- the root filesystems ----
make_root() { # make_root RELEASE DIR
  local release=$1 dir=$2 want
  want=$(printf '%s\n' "${packages[@]}")
  if [ -f "$dir/.macula-packages" ] && [ "$(cat "$dir/.macula-packages")" = "$want" ]; then
    echo "== $release: reusing $dir"
    return
  fi
  if [ -n "$(mounted_below "$dir")" ]; then
    echo "$dir has mounts below it; unmount them first:" >&2; mounted_below "$dir" >&2; exit 1
  fi
  command -v debootstrap >/dev/null || apt-get install -y -q debootstrap
  if [ ! -f "$dir/.macula-debootstrap" ]; then
    echo "== $release: debootstrap into $dir ($mirror)"
    rm -rf "$dir"
    mkdir -p "$dir"
    debootstrap --variant=minbase "$release" "$dir" "$mirror" > "$dir.debootstrap.log" 2>&1 ||
      { tail -n 30 "$dir.debootstrap.log" >&2; echo "debootstrap $release failed" >&2; exit 1; }
    touch "$dir/.macula-debootstrap"
  fi
  # sid's Release file may be past its Valid-Until on the mirror.
  echo 'Acquire::Check-Valid-Until "false";' > "$dir/etc/apt/apt.conf.d/99macula-valid-until"
  setup_files "$dir"
  echo "== $release: apt-get install ${packages[*]}"
  bind /proc "$dir/proc"
  chroot "$dir" apt-get update -q > "$dir.apt.log" 2>&1 &&
    chroot "$dir" apt-get install -y -q --no-install-recommends "${packages[@]}" >> "$dir.apt.log" 2>&1 ||
    { tail -n 30 "$dir.apt.log" >&2; echo "apt-get install in $release failed" >&2; exit 1; }
  chroot "$dir" apt-get clean
  unmount_all
  printf '%s\n' "$want" > "$dir/.macula-packages"
}

# Files from the host: CA bundle, pip configuration, name resolution.
setup_files() {
  local dir=$1 f
  mkdir -p "$dir/etc/ssl/certs"
  for f in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf /etc/resolv.conf /etc/hosts; do
    [ -f "$f" ] && cp -L "$f" "$dir$f"
  done
  return 0
}

# ---- the steps, in a chroot ----
summary=$(mktemp)
run_release() { # run_release RELEASE
  local release=$1 dir="$chroots/$1" t0 otp elixir base=/nonexistent step status t
  t0=$SECONDS
  make_root "$release" "$dir"
  local setup_s=$((SECONDS - t0))
  setup_files "$dir"
  bind /proc "$dir/proc"
  bind /dev "$dir/dev"
  bind /sys "$dir/sys"
  bind "$repo" "$dir$repo"
  bind "$cargo_home" "$dir/root/.cargo"
  bind "$rustup_home" "$dir/root/.rustup"
  in_root() {
    setsid chroot "$dir" /usr/bin/env -i HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=dumb \
      PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      CARGO_HOME=/root/.cargo RUSTUP_HOME=/root/.rustup MIX_ENV=test \
      REBAR_BASE_DIR="$base" MIX_BUILD_ROOT="$base-mix" \
      bash -c "cd '$repo' && $1" &
    # In its own process group (setsid), waited for: a signal stops it all.
    step_pid=$!
    wait $step_pid
  }
  otp=$(in_root "erl -noshell -eval 'io:put_chars(erlang:system_info(otp_release)), halt().'")
  base="$repo/_build/otp$otp"
  elixir=$(in_root "elixir --version" | sed -n 's/^Elixir \([^ ]*\).*/\1/p')
  echo "== $release: OTP $otp, Elixir $elixir (root filesystem ready in ${setup_s} s)"
  local failed=0 line="$release (OTP $otp, Elixir $elixir; setup ${setup_s} s):"
  local steps=("rebar3 compile"
               "rebar3 eunit"
               "rebar3 ct --suite test/macula_dist_SUITE --logdir '$base/test/logs'"
               "mix test")
  for step in "${steps[@]}"; do
    echo "== $release: $step"
    t=$SECONDS
    if in_root "$step"; then status=pass; else status=FAIL; failed=1; fi
    line+=" ${step%% --logdir*} $status ($((SECONDS - t)) s);"
    [ "$step" = "rebar3 compile" ] && [ $status = FAIL ] && { line+=" rest skipped"; break; }
  done
  unmount_all
  echo "$line total $((SECONDS - t0)) s" >> "$summary"
  return $failed
}

# The NIF is built once, here, with the host's toolchain; in the chroots the
# build hooks find it up to date.
echo "== host: native/build.sh"
sh native/build.sh

# One subshell per release: errexit holds in it, and its mounts go with it.
rc=0
set +e
for r in "${releases[@]}"; do
  (set -e
   step_pid=
   trap unmount_all EXIT
   trap '[ -z "$step_pid" ] || kill -TERM -- -"$step_pid" 2>/dev/null; exit 130' INT TERM
   run_release "$r") &
  child=$!
  wait $child
  st=$?
  if [ $st -ne 0 ]; then
    rc=1
    grep -q "^$r " "$summary" || echo "$r: FAILED before the tests (exit $st)" >> "$summary"
  fi
done
echo
echo "== OTP matrix summary"
cat "$summary"
rm -f "$summary"
exit $rc
