#!/usr/bin/env bash
# On a machine with a GPU: configure, build, and run the GPU tests with KVTIER_REQUIRE_GPU=1, so a
# test that would skip fails instead. Arguments go to ctest (e.g. -R GpuFetch).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh default
KVTIER_REQUIRE_GPU=1 ctest --preset default -L gpu "$@"
