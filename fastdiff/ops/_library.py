"""Loading fastdiff._C and choosing, per op and device, which implementation runs.

Backends (``FASTDIFF_BACKEND`` or ``fastdiff.set_backend``):
  auto       compiled kernels where they exist: C++ on CPU; CUDA C++, else Triton, on CUDA
  reference  every op runs its pure-PyTorch twin (fastdiff/ops/reference.py)
  triton     Triton on CUDA even where a CUDA C++ kernel exists (C++ stays on CPU)
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

# The same strings as TORCH_LIBRARY(fastdiff, m) in csrc/fastdiff.cpp. They are used
# only when the extension is absent, so that torch.ops.fastdiff.* (and with it
# torch.compile and opcheck) works on the reference twins too.
SCHEMAS = {
    "guided_step": (
        "guided_step(Tensor x, Tensor cond, Tensor? uncond, Tensor? guidance_scale, "
        "Tensor coeffs, Tensor? noise, Tensor[] history, float? clip_range, "
        "bool learned_variance, bool write_denoised) -> (Tensor, Tensor)"
    ),
    "discrete_step": (
        "discrete_step(Tensor x_t, Tensor cond, Tensor? uncond, Tensor? guidance_scale, "
        "Tensor coeffs, Tensor? noise, float truncation_rate, bool write_log_probs) "
        "-> (Tensor, Tensor)"
    ),
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float? scale) -> Tensor",
    "group_norm": (
        "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
        "Tensor? scale, Tensor? shift, bool silu) -> Tensor"
    ),
}

BACKENDS = ("auto", "reference", "triton")
BUILD_HINT = "pip install --no-build-isolation -e .  (from the fastdiff checkout)"

_extension = None
_extension_error: Optional[str] = None
_python_library = None  # keeps the Python-side definitions alive
_backend = "auto"


def _load_extension() -> None:
    global _extension, _extension_error, _python_library
    try:
        _extension = importlib.import_module("fastdiff._C")
    except ImportError as exc:  # not built, or built against another torch
        _extension_error = str(exc)
    if _extension is None:
        _python_library = torch.library.Library("fastdiff", "DEF")
        for schema in SCHEMAS.values():
            _python_library.define(schema)
    else:
        # An extension built before an op was added lacks its schema: define the
        # missing ones here so that op still runs (on its twin) until the next build.
        missing = [s for name, s in SCHEMAS.items() if not hasattr(torch.ops.fastdiff, name)]
        if missing:
            _python_library = torch.library.Library("fastdiff", "FRAGMENT")
            for schema in missing:
                _python_library.define(schema)


def set_backend(name: str) -> None:
    """Select the implementation family for every op (see the module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown fastdiff backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def extension_loaded() -> bool:
    return _extension is not None


def extension_error() -> Optional[str]:
    return _extension_error


def extension_has_cuda() -> bool:
    return bool(getattr(_extension, "with_cuda", 0))


def has_kernel(op: str, key: str) -> bool:
    """Whether the dispatcher holds a kernel for fastdiff::op under dispatch key `key`."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{op}", key)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_load_extension()
_env_backend = os.environ.get("FASTDIFF_BACKEND", "auto").strip().lower() or "auto"
if _env_backend not in BACKENDS:
    raise ValueError(
        f"FASTDIFF_BACKEND={_env_backend!r} is not a fastdiff backend; valid backends: {', '.join(BACKENDS)}"
    )
_backend = _env_backend
if _extension is None and _backend != "reference":
    warnings.warn(
        "fastdiff._C is not built or failed to load "
        f"({_extension_error}); every op runs on its pure-PyTorch reference twin, "
        f"which is correct but slower. To build the kernels: {BUILD_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )
