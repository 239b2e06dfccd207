"""GroupNorm with optional per-sample scale-shift (ADM) and SiLU, fused, for every U-Net.

    y = GroupNorm(x; num_groups, weight, bias, eps)      statistics in float32
    y = y * (1 + scale[b, c]) + shift[b, c]              ADM's use_scale_shift_norm (either alone)
    y = SiLU(y)                                          when ``silu``

x is [B, C, *spatial] in float32, float16 or bfloat16; the output has x's dtype and layout
(channels-last in, channels-last out). The twin is ``fastdiff.ops.reference.group_norm``.
weight/bias ([C]) and scale/shift ([B, C] or [1, C]) may have any float dtype and strides;
the kernels read them where they lie and widen them to float32 in registers, so an fp16
model's parameters cost no cast per call (the CUDA C++ kernel converts, once per call, only
dtypes other than float32 and x's, and channel strides other than 1).

Implementations (``implementation(device)`` names the one in use): C++ with OpenMP on CPU
(csrc/group_norm/group_norm_cpu.cpp); on CUDA the CUDA C++ kernel (group_norm_cuda.cu),
else, or under the "triton" backend, the Triton kernel (fastdiff/ops/triton/group_norm.py).
Without the extension: torch's own group_norm plus eager scale-shift/SiLU.

Autograd: the kernels compute no gradient. ``group_norm`` takes the eager, differentiable
path whenever grad mode is on and an input requires grad (training). The op itself
(``torch.ops.fastdiff.group_norm``) registers no autograd formula on purpose: a Python
autograd kernel would add tens of microseconds to every inference call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library, reference

OP = "group_norm"
_compiled_keys = set()  # dispatch keys the C++ extension filled (not the Python fallbacks)


def _channels_last_order(dim: int):
    return [0, *range(2, dim), 1]


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() >= 3 and x.permute(_channels_last_order(x.dim())).is_contiguous()


def _output_like(x: Tensor) -> Tensor:
    """The output layout every implementation uses (csrc/group_norm/group_norm_args.h
    output_like): channels-last for a channels-last x that is not also contiguous, else
    contiguous."""
    if x.is_contiguous() or not _is_channels_last(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    order = _channels_last_order(x.dim())
    inverse = [order.index(d) for d in range(x.dim())]
    return torch.empty([x.shape[d] for d in order], dtype=x.dtype, device=x.device).permute(inverse)


def _check_args(x, num_groups, weight, bias, scale, shift) -> None:
    """The checks of group_norm_args.h, for the Python implementations (fake, Triton, eager)."""
    if x.dim() < 2:
        raise RuntimeError(f"group_norm: x must have shape [B, C, *spatial], got {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"group_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if num_groups <= 0:
        raise RuntimeError(f"group_norm: num_groups must be positive, got {num_groups}")
    B, C = x.shape[0], x.shape[1]
    if C % num_groups:
        raise RuntimeError(f"group_norm: {C} channels are not divisible into {num_groups} groups "
                           f"(x of shape {list(x.shape)})")
    for name, t, per_sample in [("weight", weight, False), ("bias", bias, False),
                                ("scale", scale, True), ("shift", shift, True)]:
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"group_norm: {name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise RuntimeError(f"group_norm: {name} must be a floating-point tensor, got {t.dtype}")
        ok = (t.dim() == 2 and t.shape[1] == C and t.shape[0] in (1, B)) if per_sample else \
            (t.dim() == 1 and t.shape[0] == C)
        if not ok:
            want = f"[B, C] = [{B}, {C}] (or [1, C])" if per_sample else f"[C] = [{C}]"
            raise RuntimeError(f"group_norm: {name} has shape {list(t.shape)}, expected {want}")


@torch.library.register_fake("fastdiff::group_norm")
def _group_norm_fake(x, num_groups, weight, bias, eps, scale, shift, silu):
    _check_args(x, num_groups, weight, bias, scale, shift)
    return _output_like(x)


def _eager(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           scale: Optional[Tensor], shift: Optional[Tensor], silu: bool) -> Tensor:
    """torch's group_norm, then scale-shift and SiLU as separate ops: differentiable."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None or shift is not None:
        extra = (1,) * (x.dim() - 2)
        if scale is not None:
            y = y * (1 + scale.reshape(*scale.shape, *extra))
        if shift is not None:
            y = y + shift.reshape(*shift.shape, *extra)
    return F.silu(y) if silu else y


def _eager_kernel(x, num_groups, weight, bias, eps, scale, shift, silu):
    """The op's kernel where the extension has none: the eager path, with the arguments the
    compiled kernels accept (any float dtype of the parameters) and their output layout."""
    _check_args(x, num_groups, weight, bias, scale, shift)
    cast = [None if t is None else t.to(x.dtype) for t in (weight, bias, scale, shift)]
    y = _eager(x, num_groups, cast[0], cast[1], eps, cast[2], cast[3], silu)
    return _output_like(x).copy_(y)


def _triton_kernel(*args):
    from .triton.group_norm import group_norm_triton
    return group_norm_triton(*args)


def _cuda_fallback(*args):
    """CUDA without the compiled kernel: Triton, else the eager path."""
    if _library.triton_available():
        return _triton_kernel(*args)
    return _eager_kernel(*args)


def _register_python_kernels() -> None:
    """Kernels for the dispatch keys the C++ extension did not fill."""
    if _library.has_kernel(OP, "CPU"):
        _compiled_keys.add("CPU")
    else:
        torch.library.impl(f"fastdiff::{OP}", "CPU")(_eager_kernel)
    if _library.has_kernel(OP, "CUDA"):
        _compiled_keys.add("CUDA")
    else:
        torch.library.impl(f"fastdiff::{OP}", "CUDA")(_cuda_fallback)


_register_python_kernels()


def implementation(device_type: str) -> str:
    """Which implementation serves group_norm on `device_type` under the current backend
    (for inputs that need no gradient; those take the eager path)."""
    backend = _library.get_backend()
    if backend == "reference":
        return "reference"
    if device_type == "cpu":
        return "C++ (OpenMP)" if "CPU" in _compiled_keys else "PyTorch (eager)"
    if device_type == "cuda":
        if backend == "triton" and _library.triton_available():
            return "Triton"
        if "CUDA" in _compiled_keys:
            return "CUDA C++"
        return "Triton" if _library.triton_available() else "PyTorch (eager)"
    return "reference"


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
               silu: bool = False) -> Tensor:
    """GroupNorm(x) [* (1 + scale) + shift] [-> SiLU]; scale/shift are [B, C] (or [1, C]).

    A contiguous or channels-last x gives an output of the same layout; any other strides
    give a contiguous output."""
    if x.dim() < 2 or num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {x.shape[1] if x.dim() > 1 else '?'} channels are not divisible "
                         f"into {num_groups} groups (x of shape {tuple(x.shape)})")
    backend = _library.get_backend()
    if backend == "reference":
        return reference.group_norm(x, num_groups, weight, bias, eps, scale, shift, silu)
    if _needs_grad(x, weight, bias, scale, shift):
        return _eager(x, num_groups, weight, bias, eps, scale, shift, silu)
    args = (x, num_groups, weight, bias, float(eps), scale, shift, bool(silu))
    if backend == "triton" and x.is_cuda and _library.triton_available():
        return _triton_kernel(*args)  # (without Triton installed, the op's kernel serves)
    return torch.ops.fastdiff.group_norm(*args)
