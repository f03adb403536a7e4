#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, and runs every test.
#   tools/test.sh            default build (all labels; GPU tests skip without a device),
#                            then the ASan+UBSan and TSan presets (CPU tests), then the Python
#                            package's tests (integrations/hf, pytest in build-python/venv)
#   tools/test.sh default|asan|tsan|python   one of them only
# KVTIER_REQUIRE_GPU=1 turns a skipped GPU test into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(default asan tsan python)
for preset in "${presets[@]}"; do
  echo "=== kvtier tests: preset $preset ==="
  if [ "$preset" = python ]; then
    tools/setup_python.sh
    tools/setup_smollm2.sh  # the real model of test_smollm2.py
    build-python/venv/bin/python -m pytest -p no:cacheprovider integrations/hf/tests
    continue
  fi
  tools/setup.sh "$preset"
  case "$preset" in
    default) ctest --preset default -j "${KVTIER_JOBS:-$(nproc)}" ;;
    # TSan in GCC 12 needs a fixed address-space layout on kernels with high mmap randomness.
    tsan) setarch "$(uname -m)" -R ctest --preset tsan -L cpu -j "${KVTIER_JOBS:-$(nproc)}" ;;
    *) ctest --preset "$preset" -L cpu -j "${KVTIER_JOBS:-$(nproc)}" ;;
  esac
done
