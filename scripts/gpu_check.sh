#!/usr/bin/env bash
# GPU validation in one call (../shared/GPU.md): build for the GPU, check that every op
# reports its compiled kernel, run the GPU tests, memcheck each CUDA op once, then the GPU
# benchmarks. Logs and benchmark JSON go to $OUT (default ./gpu_out).
#
#   OUT=/some/dir bash scripts/gpu_check.sh [quick]
#
# "quick" skips the benchmarks. Each phase has its own time limit so that one slow phase
# cannot eat the others. diffusers (the benchmarks' oracle) may come as wheels in .whl/
# (see the device tool's README); without it the SD 1.5 benchmark is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

phase() {  # phase NAME SECONDS command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log"
  return 0
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

phase build 420 $PY -m pip install --no-build-isolation --no-deps -e .
phase backends 60 $PY -c "import json, fastdiff; print(json.dumps(fastdiff.backend_info(), indent=1))"
phase tests 420 $PY -m pytest -q -x -p no:cacheprovider tests/test_attention.py tests/test_attention_triton.py \
  tests/test_group_norm.py tests/test_group_norm_triton.py tests/test_guided_step.py tests/test_guided_step_triton.py \
  tests/test_discrete_step.py tests/test_discrete_step_triton.py tests/test_cuda_graphs.py
phase memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/cuda_ops_once.py
if [[ "${1:-}" != quick ]]; then
  phase bench_ops 600 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_attention.py benchmarks/bench_group_norm.py \
    benchmarks/bench_guided_step.py --benchmark-only --benchmark-json="$OUT/bench_ops.json" --benchmark-columns=median,ops
  phase bench_sd15 600 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_sd15_gpu.py --benchmark-only \
    --benchmark-json="$OUT/bench_sd15.json" --benchmark-columns=median,ops
fi
cat "$OUT/summary.txt"
