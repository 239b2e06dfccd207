"""GroupNorm with optional per-sample scale-shift (ADM) and SiLU, for every U-Net.

Models call ``fastdiff.ops.group_norm``; the fused kernels arrive in their own issue.
Today: torch's group_norm plus eager scale-shift/SiLU, or the fp32 twin.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library, reference


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
               silu: bool = False) -> Tensor:
    """GroupNorm(x) [* (1 + scale) + shift] [-> SiLU]; scale/shift are [B, C]."""
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {x.shape[1] if x.dim() > 1 else '?'} channels are not divisible "
                         f"into {num_groups} groups (x of shape {tuple(x.shape)})")
    if _library.get_backend() == "reference":
        return reference.group_norm(x, num_groups, weight, bias, eps, scale, shift, silu)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None or shift is not None:
        extra = (1,) * (x.dim() - 2)
        if scale is not None:
            y = y * (1 + scale.reshape(*scale.shape, *extra))
        if shift is not None:
            y = y + shift.reshape(*shift.shape, *extra)
    return F.silu(y) if silu else y


def implementation(device_type: str) -> str:
    return "reference" if _library.get_backend() == "reference" else "PyTorch (eager)"
