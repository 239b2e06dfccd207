#!/usr/bin/env bash
# GPU validation in one call (../shared/GPU.md), sized for the one ~9-minute call a lent
# H100/H200 allows:
#
#   OUT=/some/dir bash scripts/gpu_check.sh [quick]
#
#   1. build fastdiff._C for the GPU (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise)
#   2. backends   assert that every op reports its compiled GPU kernel
#   3. tests      every GPU test file as its own phase, all in parallel (never stopping at the
#                 first failure), and beside them compute-sanitizer memcheck of one call of
#                 each CUDA op, with PyTorch's caching allocator off so an out-of-bounds access
#                 inside a cached block is seen, after a probe that the sanitizer works here
#   4. benchmarks one after another on the idle GPU ("quick" skips them), timed with CUDA
#                 events, each result appended to $OUT/bench.jsonl as soon as it is measured
#
# Every phase has a time limit, cut to what is left of GPU_CHECK_SECONDS (default 540) so
# the whole call ends in time; a phase cut short counts as failed and what it wrote stays.
# $OUT gets at most 8 files (the device tool returns no more): gpu.txt (the machine),
# summary.txt (one line per phase, written as each ends), logs.tar.gz (every phase's log,
# repacked after each phase), bench.jsonl. The exit status is non-zero when any phase
# failed or was cut short.
#
# diffusers (the SD benchmark's oracle) may come as a wheel in .whl/ (the device tool's
# README); without it the SD 1.5 benchmark phase fails with the reason in its log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-540}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export FASTDIFF_BENCH_JSONL="$OUT/bench.jsonl"
FAILED=0
: >"$OUT/summary.txt"

pack() { tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }

limit_for() {  # limit_for SECONDS: the phase's own limit, or what is left of the budget
  local left=$((BUDGET - SECONDS - 5))
  ((left < 10)) && left=10
  echo $(($1 < left ? $1 : left))
}

record() {  # record NAME RC SECONDS
  local status=ok
  if (($2 == 124)); then status="CUT SHORT (time limit)"; elif (($2 != 0)); then status="FAILED (rc=$2)"; fi
  [[ $status == ok ]] || FAILED=1
  echo "[$1] $status $3s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$LOGS/$1.log" | sed 's/^/    /'
}

phase() {  # phase NAME SECONDS command...   (in the foreground)
  local name=$1 limit
  limit=$(limit_for "$2")
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  record "$name" $? $((SECONDS - start))
  pack
}

declare -A PIDS STARTS
background() {  # background NAME SECONDS command...   (collected by wait_all)
  local name=$1 limit
  limit=$(limit_for "$2")
  shift 2
  STARTS[$name]=$SECONDS
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1 &
  PIDS[$name]=$!
}

wait_all() {
  local name
  for name in "${!PIDS[@]}"; do
    wait "${PIDS[$name]}"
    record "$name" $? $((SECONDS - STARTS[$name]))
  done
  PIDS=() STARTS=()
  pack
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -n 1
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# --- 1. build, and 2. every op on its GPU kernel
phase build 300 $PY -m pip install --no-build-isolation --no-deps -e .
phase backends 60 $PY - <<'PY'
import json
import fastdiff

info = fastdiff.backend_info()
print(json.dumps(info, indent=1))
assert info["extension"]["loaded"] and info["extension"]["cuda_kernels"], "fastdiff._C has no CUDA kernels"
assert info["triton"], "Triton is not importable"
want = {"guided_step": "CUDA C++", "discrete_step": "CUDA C++", "group_norm": "CUDA C++", "attention": "Triton (flash)"}
for op, prefix in want.items():
    got = info["ops"][op]["cuda"]
    assert got.startswith(prefix), f"{op} runs {got!r} on CUDA, expected {prefix}"
print("every op reports its GPU kernel")
PY

# --- 3. the GPU tests, one phase per file, in parallel; memcheck beside them
for file in tests/test_attention.py tests/test_attention_triton.py tests/test_group_norm.py \
  tests/test_group_norm_triton.py tests/test_guided_step.py tests/test_guided_step_triton.py \
  tests/test_discrete_step.py tests/test_discrete_step_triton.py tests/test_cuda_graphs.py \
  tests/test_graph_cache.py tests/test_pipeline_sd.py tests/test_onnx_io_binding.py; do
  [[ -f $file ]] || continue
  name=$(basename "$file" .py)
  background "$name" 240 $PY -m pytest -q -p no:cacheprovider -rfE "$file"
done
background memcheck 240 bash -c '
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  probe=$(mktemp -d)/probe.py
  printf "import torch\nx = torch.ones(4, device=\"cuda\")\ntorch.cuda.synchronize()\nprint(\"probe ok\", (x * 2).sum().item())\n" >"$probe"
  if ! command -v compute-sanitizer >/dev/null; then echo "compute-sanitizer: not installed here"; exit 3; fi
  if ! compute-sanitizer --tool memcheck --error-exitcode 3 '"$PY"' "$probe"; then
    echo "compute-sanitizer refuses this machine (the probe failed): memcheck NOT RUN"; exit 4
  fi
  compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 '"$PY"' scripts/cuda_ops_once.py'
wait_all

# --- 4. benchmarks, alone on the GPU
# (the memory-bound ops first, they are quick; the SD 1.5 UNet step and generation, the
# headline figures; attention last, since its tuned variant compiles candidate tilings)
if [[ "${1:-}" != quick ]]; then
  phase bench_ops 90 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_group_norm.py benchmarks/bench_guided_step.py \
    benchmarks/bench_discrete_step.py --benchmark-only --benchmark-columns=median,ops
  phase bench_sd15 240 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_sd15_gpu.py --benchmark-only \
    --benchmark-columns=median,ops
  phase bench_attention 150 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_attention.py --benchmark-only \
    --benchmark-columns=median,ops
fi
echo "--- summary ($SECONDS s)"
cat "$OUT/summary.txt"
rm -rf "$LOGS"
exit $FAILED
