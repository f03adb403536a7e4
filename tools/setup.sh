#!/usr/bin/env bash
# Installs what kvtier needs on a Debian/Ubuntu machine, and only what is missing, then
# configures and builds one preset. Quick and harmless to run again.
#   tools/setup.sh [preset]     preset: default (build/), asan (build-asan/), tsan (build-tsan/)
# Set KVTIER_NO_APT=1 to skip package installation (e.g. where dependencies come from elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-default}"

pkgs=(build-essential cmake ninja-build pkg-config libtbb-dev libhwloc-dev libboost-dev
      liburing-dev libgtest-dev libgmock-dev libbenchmark-dev)
if [ "${KVTIER_NO_APT:-0}" != "1" ] && command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "[kvtier setup] installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

jobs="${KVTIER_JOBS:-$(nproc)}"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j "$jobs"
