#!/usr/bin/env bash
# The Python package, ready to test: a virtualenv in build-python/venv (git-ignored; the system
# Python may be externally managed) with torch, transformers (>= 5) and pytest, and the kvtier
# package built from integrations/hf into it. Installs only what is missing; run again, it
# rebuilds the module incrementally (seconds when nothing changed).
#   tools/setup_python.sh
# Environment:
#   KVTIER_PYTHON       interpreter the virtualenv is made from (default: python3)
#   KVTIER_TORCH_INDEX  pip index URL to take torch from. Default: PyTorch's CPU-only wheel index
#                       when no GPU is visible (PyPI's Linux wheel brings several GiB of CUDA
#                       libraries), PyPI when that index cannot be reached or a GPU is present
#                       (without a GPU, PyPI's wheel is installed without triton and pip's cache)
#   KVTIER_WITH_CUDA    ON/OFF: build the CUDA backend into the module. Default: ON only where
#                       nvidia-smi sees a GPU; elsewhere the tests run the CPU backend, and a
#                       CPU-only build takes minutes less.
#   KVTIER_NO_APT=1     skip Debian package installation
set -euo pipefail
cd "$(dirname "$0")/.."

tools/apt_deps.sh build-essential cmake ninja-build pkg-config libtbb-dev libhwloc-dev libboost-dev \
  python3-venv python3-dev

venv=build-python/venv
if ! "$venv/bin/python" -c "import sys" 2>/dev/null; then
  rm -rf "$venv"
  "${KVTIER_PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
gpu=0
if nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then gpu=1; fi
if ! "$venv/bin/python" - 2>/dev/null <<'PY'
import matplotlib, nanobind, pytest, scikit_build_core, torch, transformers
assert int(transformers.__version__.split(".")[0]) >= 5
PY
then
  echo "[kvtier setup] installing torch, transformers, pytest, matplotlib and the build tools into $venv"
  if [ -n "${KVTIER_TORCH_INDEX:-}" ]; then
    "${pip[@]}" install --index-url "$KVTIER_TORCH_INDEX" "torch>=2.4"
  elif [ "$gpu" = 1 ]; then
    "${pip[@]}" install "torch>=2.4"
  elif "${pip[@]}" install --timeout 30 --retries 1 \
    --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"; then
    : # no GPU here: PyTorch's CPU-only wheel (about 200 MB instead of several GB)
  else
    # No GPU and no CPU-only index: PyPI's CUDA wheel, without triton (torch.compile's GPU
    # compiler, about 1 GB that nothing here imports) and without pip's cache (a second copy
    # of some 3 GB of wheels).
    echo "[kvtier setup] PyTorch's CPU-only index cannot be reached: torch from PyPI (several GB)"
    "${pip[@]}" install --no-cache-dir --no-deps "torch>=2.4"
    mapfile -t torch_deps < <("$venv/bin/python" - <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for line in requires("torch") or []:
    req = Requirement(line)
    if req.name != "triton" and (req.marker is None or req.marker.evaluate({"extra": ""})):
        req.marker = None
        print(req)
PY
    )
    "${pip[@]}" install --no-cache-dir "${torch_deps[@]}"
  fi
  "${pip[@]}" install "transformers>=5" pytest "scikit-build-core>=0.10" "nanobind>=2.0" matplotlib
fi

cuda="${KVTIER_WITH_CUDA:-}"
if [ -z "$cuda" ]; then
  cuda=OFF
  if [ "$gpu" = 1 ]; then cuda=ON; fi
fi
echo "[kvtier setup] building the kvtier package (CUDA $cuda)"
# No build isolation: the build tools are in the venv, so the build directory stays valid from one
# run to the next and the module rebuilds incrementally.
KVTIER_WITH_CUDA="$cuda" "${pip[@]}" install --no-build-isolation --no-deps \
  --config-settings=build-dir="$PWD/build-python/module-$cuda" integrations/hf
