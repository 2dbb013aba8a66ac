#!/usr/bin/env bash
# Installs everything Ensemble needs to build, test and run its demo, from Debian's packages.
# Idempotent: packages already present are skipped, and apt-get runs only when something is missing.
#
#   --nats   also NATS (nats-server, libnats-dev), for the benchmarks' NATS peer: bench_all's NATS
#            core columns and bench_streams' JetStream side.
#            Opt-in: nothing else needs it, and CI does not install it.
set -euo pipefail

nats=0
for arg in "$@"; do
  case "$arg" in
    --nats) nats=1 ;;
    *) echo "install-deps: unknown option '$arg' (known: --nats)" >&2; exit 2 ;;
  esac
done

packages=(
  build-essential cmake ninja-build pkg-config git
  libzmq3-dev cppzmq-dev libmsgpack-cxx-dev
  libboost-dev libboost-program-options-dev
  libspdlog-dev libfmt-dev libgtest-dev libgmock-dev
  nlohmann-json3-dev libsqlite3-dev libcli11-dev libyaml-cpp-dev
  python3 python3-zmq python3-msgpack
)
if [ "$nats" -eq 1 ]; then
  packages+=(nats-server libnats-dev)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
