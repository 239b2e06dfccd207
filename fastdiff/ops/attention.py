"""Attention over [B, H, L, D]: self- and cross-attention for the U-Nets and transformers.

Models call ``fastdiff.ops.attention`` and never a kernel directly, so the flash-style
kernels can replace the implementation without touching a model. Today: PyTorch's
scaled_dot_product_attention (SDPA), or the fp32 twin under the reference backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library, reference


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v; q [B, H, Lq, D], k/v [B, H, Lk, D]; mask [B, Lk] True = keep."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, H, L, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if _library.get_backend() == "reference":
        return reference.attention(q, k, v, key_padding_mask, scale)
    # SDPA's fused CPU kernel needs unit stride in the head dimension; with views such as
    # GLIDE's per-head [q | k | v] channel layout it falls back to the (2-3x slower) math path.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must be [B, Lk] = {(q.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:  # fully masked rows: zeros, as the twin gives, not NaN
        out = out.nan_to_num(0.0)
    return out


def implementation(device_type: str) -> str:
    if _library.get_backend() == "reference":
        return "reference"
    return "PyTorch SDPA"
