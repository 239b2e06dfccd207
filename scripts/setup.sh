#!/usr/bin/env bash
# Sets fastdiff up in the current Python environment and builds fastdiff._C.
#
#   bash scripts/setup.sh          the package, its kernels and runtime dependencies
#   bash scripts/setup.sh --test   also the test tools (pytest, triton, diffusers as the oracle)
#
# torch: an installed torch is kept (the build compiles against it, hence
# --no-build-isolation). Without one, a machine with an NVIDIA driver gets PyPI's
# default (CUDA) build and a CPU-only machine gets torch 2.13.0, which must resolve to
# a CPU wheel (this project's machines carry it locally; elsewhere, point pip at
# PyPI's torch CPU index first) -- a CPU machine never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip() { "$PYTHON" -m pip "$@"; }

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install torch
  else
    pip install "torch==2.13.0"
  fi
fi
pip install --quiet "setuptools>=64" wheel ninja pybind11
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
pip install --quiet --no-build-isolation -e ".${extras}"
"$PYTHON" - <<'PY'
import fastdiff
info = fastdiff.backend_info()
if not info["extension"]["loaded"]:
    raise SystemExit(f"fastdiff._C did not load: {info['extension']['error']}")
print("fastdiff ready:", {op: impls for op, impls in info["ops"].items()})
PY
