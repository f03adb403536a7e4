#!/usr/bin/env bash
# clang-format the C++/CUDA files changed against a base (default: HEAD), or all with --all.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--all" ]; then
  files=$(git ls-files '*.h' '*.cpp' '*.cu' '*.cuh')
else
  files=$(git diff --name-only --diff-filter=ACMR "${1:-HEAD}" -- '*.h' '*.cpp' '*.cu' '*.cuh')
fi
[ -z "$files" ] || clang-format -i $files
