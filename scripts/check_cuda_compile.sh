#!/usr/bin/env bash
# Compiles every csrc/*/*_cuda.cu to an object file (no link, no GPU needed), so
# CUDA sources can be checked on machines whose torch is a CPU build, and reads ptxas's
# resource report (-Xptxas -v) of every kernel: registers, spilled bytes, shared memory.
# Fails when a file does not compile or a kernel spills registers.
#
# Flags follow what setup.py and torch's CUDAExtension pass to nvcc, so a file
# that passes here should also pass in the real build.
#   TORCH_CUDA_ARCH_LIST  architectures, as in setup.py (default "8.0;9.0")
#   PYTHON                interpreter whose torch supplies the headers
#   NVCC                  compiler (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
#   REPORT                write the per-kernel resources here as JSON
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found; skipping the CUDA compile check."
  exit 0
fi

shopt -s nullglob
sources=(csrc/*/*_cuda.cu)
if (( ${#sources[@]} == 0 )); then
  echo "check_cuda_compile: no csrc/*/*_cuda.cu files."
  exit 0
fi

torch_info=$("$PYTHON" - <<'PY'
import sysconfig
import torch
from torch.utils import cpp_extension

try:
    paths = cpp_extension.include_paths(device_type="cuda")
except (TypeError, OSError, RuntimeError):
    # CPU builds of torch know no CUDA_HOME, but their wheel still ships the
    # CUDA headers; nvcc adds the toolkit's own include directory itself.
    paths = cpp_extension.include_paths()
paths.append(sysconfig.get_paths()["include"])
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(" ".join(paths))
PY
)
abi=$(sed -n 1p <<<"$torch_info")
read -r -a torch_includes <<<"$(sed -n 2p <<<"$torch_info")"

flags=(-std=c++17 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC -Icsrc -Xptxas -v)
for dir in "${torch_includes[@]}"; do
  flags+=("-I$dir")
  # This generated header exists only in CUDA builds of torch; on Linux it only
  # sets Windows export macros, so skipping it changes nothing here.
  if [[ -d "$dir/c10/cuda" && ! -f "$dir/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  fi
done
flags+=(
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "-D_GLIBCXX_USE_CXX11_ABI=$abi"
  -DPy_LIMITED_API=0x03090000 -DFASTDIFF_WITH_CUDA
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
)
IFS=';, ' read -r -a archs <<<"${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
for arch in "${archs[@]}"; do
  [[ -z "$arch" ]] && continue
  sm=${arch%+PTX}
  sm=${sm//./}
  flags+=(-gencode "arch=compute_$sm,code=sm_$sm")
  [[ "$arch" == *+PTX ]] && flags+=(-gencode "arch=compute_$sm,code=compute_$sm")
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failed=()
for src in "${sources[@]}"; do
  obj="$tmp/$(basename "${src%.cu}").o"
  echo "check_cuda_compile: $src"
  if ! "$NVCC" -c "$src" -o "$obj" "${flags[@]}" 2>"$tmp/$(basename "$src").ptxas"; then
    cat "$tmp/$(basename "$src").ptxas" >&2
    echo "check_cuda_compile: FAILED: $src" >&2
    failed+=("$src")
  fi
done

if (( ${#failed[@]} > 0 )); then
  echo "check_cuda_compile: ${#failed[@]} of ${#sources[@]} file(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "check_cuda_compile: ${#sources[@]} file(s) compiled for ${archs[*]}."

# ptxas -v: "Compiling entry function 'NAME' for 'sm_90'", then "N bytes stack frame, S bytes
# spill stores, L bytes spill loads" and "Used R registers, ... M bytes smem".
"$PYTHON" - "$tmp" "${REPORT:-}" <<'PY'
import glob, json, os, re, subprocess, sys

folder, report = sys.argv[1], sys.argv[2]
kernels, current = [], None
for path in sorted(glob.glob(os.path.join(folder, "*.ptxas"))):
    source = os.path.basename(path)[: -len(".ptxas")]
    for line in open(path):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = {"source": source, "mangled": m.group(1), "arch": m.group(2), "registers": 0,
                       "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
names = [k["mangled"] for k in kernels]
try:
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                               check=True).stdout.splitlines()
except (OSError, subprocess.CalledProcessError):
    demangled = names
for k, name in zip(kernels, demangled):
    name = name.replace("(anonymous namespace)", "{anon}")
    k["kernel"] = re.sub(r"\(.*", "", name)  # drop the parameter list
print(f"{'arch':<6} {'regs':>4} {'spill st/ld B':>13} {'stack B':>7} {'smem B':>7}  kernel")
for k in sorted(kernels, key=lambda k: (k["source"], k["kernel"], k["arch"])):
    print(f"{k['arch']:<6} {k['registers']:>4} {k['spill_stores']:>6}/{k['spill_loads']:<6} {k['stack']:>7} "
          f"{k['smem']:>7}  {k['kernel']}")
spilling = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
if report:
    with open(report, "w") as fh:
        json.dump(kernels, fh, indent=1)
if not kernels:
    sys.exit("check_cuda_compile: ptxas reported no kernels (was -Xptxas -v passed?)")
if spilling:
    for k in spilling:
        print(f"check_cuda_compile: SPILLS on {k['arch']}: {k['kernel']} "
              f"({k['spill_stores']} B stored, {k['spill_loads']} B loaded)", file=sys.stderr)
    sys.exit(1)
print(f"check_cuda_compile: {len(kernels)} kernel instantiations, none spills.")
PY
