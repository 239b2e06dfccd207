"""Pure-PyTorch twins of every fastdiff op: same signature, same semantics, eager.

These are the oracles the kernels are tested against, and the implementation that
runs when the extension is absent or ``FASTDIFF_BACKEND=reference`` is set. They are
written for clarity (one tensor expression per line of the op's formula), compute in
float32 whatever the storage dtype, and stay differentiable.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .coeffs import (
    DEN_P,
    DEN_X,
    DEN_X0,
    HIST0,
    LOGVAR_MAX,
    LOGVAR_MIN,
    NUM_FIXED,
    OUT_NOISE,
    OUT_P,
    OUT_X,
    OUT_X0,
    X0_P,
    X0_X,
    output_memory_format,
)


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """[1 or B] -> [1 or B, 1, 1, ...] to broadcast over one sample's elements."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def guided_step(
    x: Tensor,
    cond: Tensor,
    uncond: Optional[Tensor],
    guidance_scale: Optional[Tensor],
    coeffs: Tensor,
    noise: Optional[Tensor],
    history: Sequence[Tensor],
    clip_range: Optional[float],
    learned_variance: bool,
    write_denoised: bool,
) -> Tuple[Tensor, Tensor]:
    """One sampler step: CFG combine, prediction -> x0, clip, linear update, noise.

    See ``fastdiff.ops.guided_step`` for the contract; this is its eager twin.
    """
    if coeffs.dim() != 2 or coeffs.shape[1] != NUM_FIXED + len(history):
        raise ValueError(
            f"guided_step: coeffs must have shape [1 or B, {NUM_FIXED + len(history)}], "
            f"got {tuple(coeffs.shape)}"
        )
    channels = x.shape[1]
    nd = x.dim()
    k = [_per_sample(coeffs[:, j].float(), nd) for j in range(coeffs.shape[1])]
    xf = x.float()
    pred = cond[:, :channels].float()
    if uncond is not None:
        s = _per_sample(guidance_scale.float(), nd)
        u = uncond[:, :channels].float()
        pred = u + s * (pred - u)
    x0 = k[X0_X] * xf + k[X0_P] * pred
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    out = k[OUT_X] * xf + k[OUT_P] * pred + k[OUT_X0] * x0
    for j, h in enumerate(history):
        out = out + k[HIST0 + j] * h.float()
    if noise is not None:
        std = 1.0
        if learned_variance:
            frac = 0.5 * (cond[:, channels:].float() + 1.0)
            std = torch.exp(0.5 * (frac * k[LOGVAR_MAX] + (1.0 - frac) * k[LOGVAR_MIN]))
        out = out + k[OUT_NOISE] * std * noise.float()
    fmt = output_memory_format(x)
    out = out.to(x.dtype).contiguous(memory_format=fmt)
    if write_denoised:
        den = k[DEN_X] * xf + k[DEN_P] * pred + k[DEN_X0] * x0
        den = den.to(x.dtype).contiguous(memory_format=fmt)
    else:
        den = x.new_empty(0)
    return out, den


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v over [B, H, L, D] tensors, in float32.

    key_padding_mask: [B, Lk] bool, True where a key may be attended to. A query
    whose keys are all masked gets zeros (not NaN).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].to(torch.bool)
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float = 1e-5, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
               silu: bool = False) -> Tensor:
    """GroupNorm, then optionally x * (1 + scale) + shift per sample and channel (ADM's
    use_scale_shift_norm, scale/shift [B, C]), then optionally SiLU; float32 inside."""
    y = torch.nn.functional.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if scale is not None or shift is not None:
        extra = [1] * (x.dim() - 2)
        if scale is not None:
            y = y * (1 + scale.float().reshape(*scale.shape, *extra))
        if shift is not None:
            y = y + shift.float().reshape(*shift.shape, *extra)
    if silu:
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)
