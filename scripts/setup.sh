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
#
# pip runs with --quiet, so the output is one "setup:" line per stage (and pip's own
# errors, if any); a failing stage is named on the last line.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip() { "$PYTHON" -m pip "$@"; }

stage="starting"
say() { stage="$1"; echo "setup: $*"; }
trap 'echo "setup: FAILED while ${stage} (see the messages above)" >&2' ERR

say "checking torch"
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "setup:   keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  say "installing torch" "(CUDA build: an NVIDIA driver is present; a few GB)"
  pip install --quiet torch
else
  say "installing torch 2.13.0" "(CPU build: no NVIDIA driver found)"
  pip install --quiet "torch==2.13.0"
fi

say "installing build tools" "(setuptools, wheel, ninja, pybind11)"
pip install --quiet "setuptools>=64" wheel ninja pybind11

say "building fastdiff._C" "(takes a few minutes)"
start=$SECONDS
pip install --quiet --no-build-isolation -e .
echo "setup:   built in $((SECONDS - start)) s"

# ONNX export (onnx, onnxscript) and ONNX Runtime: its GPU build where a driver is present.
say "checking ONNX export and runtime"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  ort="onnxruntime-gpu>=1.18"
else
  ort="onnxruntime>=1.18"
fi
if "$PYTHON" -c "import onnx, onnxscript, onnxruntime" >/dev/null 2>&1; then
  echo "setup:   keeping the installed onnx, onnxscript and onnxruntime"
else
  say "installing ONNX export and runtime" "(onnx, onnxscript, ${ort%%>=*})"
  pip install --quiet "onnx>=1.16" "onnxscript>=0.5" "$ort"
fi

if [[ "${1:-}" == "--test" ]]; then
  say "installing test tools" "(the [test] extra of pyproject.toml)"
  # Read from pyproject.toml rather than `pip install -e .[test]`, which would build the
  # extension a second time.
  mapfile -t test_tools < <("$PYTHON" - <<'PY'
import re
try:
    import tomllib
    with open("pyproject.toml", "rb") as fh:
        print("\n".join(tomllib.load(fh)["project"]["optional-dependencies"]["test"]))
except ImportError:  # Python 3.10: the list's quoted items, read by hand
    text = open("pyproject.toml", encoding="utf-8").read()
    block = re.search(r"^test = \[(.*?)\]", text, re.M | re.S).group(1)
    print("\n".join(re.findall(r'"([^"]+)"', block)))
PY
  )
  pip install --quiet "${test_tools[@]}"
  # The IS/FID/KID oracle, without its torchvision requirement (see pyproject.toml's [test] extra).
  pip install --quiet --no-deps "torch-fidelity==0.4.0"
fi

say "checking the build"
"$PYTHON" - <<'PY'
import fastdiff
info = fastdiff.backend_info()
if not info["extension"]["loaded"]:
    raise SystemExit(f"fastdiff._C did not load: {info['extension']['error']}")
print("setup: fastdiff ready; `python -m fastdiff info` shows which kernel runs each op")
PY
