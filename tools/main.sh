#!/usr/bin/env bash
# The main job: installs what is missing, builds, then runs the memory-tier demo and the fetch
# benchmark (GPU gather kernel and copy engine against one large memcpy; the CPU reference gather
# without a GPU). Extra arguments go to the demo (see tools/demo/kvtier_demo.cpp --help).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh default
build/tools/kvtier_demo "$@"
echo
echo "=== fetch benchmark (bench/bench_memory) ==="
if [ -x build/bench/bench_memory ]; then
  build/bench/bench_memory --benchmark_counters_tabular=true
fi
