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

from . import _dispatch, _layout, _library, reference
from ._checks import check_group_norm

OP = "group_norm"


_output_like = _layout.group_norm_output  # the output layout of every implementation


@torch.library.register_fake("fastdiff::group_norm")
def _group_norm_fake(x, num_groups, weight, bias, eps, scale, shift, silu):
    check_group_norm(x, num_groups, weight, bias, eps, scale, shift)
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
    check_group_norm(x, num_groups, weight, bias, eps, scale, shift)
    cast = [None if t is None else t.to(x.dtype) for t in (weight, bias, scale, shift)]
    y = _eager(x, num_groups, cast[0], cast[1], eps, cast[2], cast[3], silu)
    return _output_like(x).copy_(y)


def _triton(*args):
    from .triton.group_norm import group_norm_triton
    return group_norm_triton(*args)


def _twin(*args):
    return reference.group_norm(*args)


_dispatch.register(
    OP, _twin,
    cpu=[_dispatch.compiled("C++ (OpenMP)"), _dispatch.Impl("PyTorch (eager)", _dispatch.TORCH, _eager_kernel)],
    cuda=[_dispatch.compiled("CUDA C++"), _dispatch.Impl("Triton", _dispatch.TRITON, _triton),
          _dispatch.Impl("PyTorch (eager)", _dispatch.TORCH, _eager_kernel)],
)


def implementation(device_type: str) -> str:
    """Which implementation serves group_norm on `device_type` under the current backend
    (for inputs that need no gradient; those take the eager path)."""
    return _dispatch.implementation(OP, device_type)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
               silu: bool = False) -> Tensor:
    """GroupNorm(x) [* (1 + scale) + shift] [-> SiLU]; scale/shift are [B, C] (or [1, C]).

    A contiguous or channels-last x gives an output of the same layout; any other strides
    give a contiguous output."""
    check_group_norm(x, num_groups, weight, bias, eps, scale, shift)
    backend = _library.get_backend()
    if backend == "reference":
        return reference.group_norm(x, num_groups, weight, bias, eps, scale, shift, silu)
    if _needs_grad(x, weight, bias, scale, shift):
        return _eager(x, num_groups, weight, bias, eps, scale, shift, silu)
    args = (x, int(num_groups), weight, bias, float(eps), scale, shift, bool(silu))
    return _dispatch.call(OP, x.device.type, args)
