#!/usr/bin/env bash
# Installs what kvtier needs on a Debian/Ubuntu machine, and only what is missing, then
# configures and builds one preset. Quick and harmless to run again.
#   tools/setup.sh [preset]     preset: default (build/), asan (build-asan/), tsan (build-tsan/)
# Set KVTIER_NO_APT=1 to skip package installation (e.g. where dependencies come from elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-default}"

tools/apt_deps.sh build-essential cmake ninja-build pkg-config libtbb-dev libhwloc-dev libboost-dev \
  liburing-dev libgtest-dev libgmock-dev libbenchmark-dev

jobs="${KVTIER_JOBS:-$(nproc)}"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j "$jobs"
