#!/usr/bin/env bash
# Compiles every csrc/*/*_cuda.cu to an object file (no link, no GPU needed), so
# CUDA sources can be checked on machines whose torch is a CPU build.
#
# Flags follow what setup.py and torch's CUDAExtension pass to nvcc, so a file
# that passes here should also pass in the real build.
#   TORCH_CUDA_ARCH_LIST  architectures, as in setup.py (default "8.0;9.0")
#   PYTHON                interpreter whose torch supplies the headers
#   NVCC                  compiler (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
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

flags=(-std=c++17 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC -Icsrc)
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
  if ! "$NVCC" -c "$src" -o "$obj" "${flags[@]}"; then
    echo "check_cuda_compile: FAILED: $src" >&2
    failed+=("$src")
  fi
done

if (( ${#failed[@]} > 0 )); then
  echo "check_cuda_compile: ${#failed[@]} of ${#sources[@]} file(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "check_cuda_compile: ${#sources[@]} file(s) compiled for ${archs[*]}."
