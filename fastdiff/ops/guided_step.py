"""The fused sampler step: CFG combine + prediction conversion + update + noise, one pass.

``guided_step`` is torch.ops.fastdiff.guided_step with a typed Python face. Its
coefficient layout is documented in ``fastdiff.ops.coeffs``; samplers build the
rows (fastdiff/sampling/) and never touch elements themselves.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _dispatch, reference
from ._checks import OpTypeError, check_guided_step
from .coeffs import output_memory_format

OP = "guided_step"


@torch.library.register_fake("fastdiff::guided_step")
def _guided_step_fake(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                      learned_variance, write_denoised):
    check_guided_step(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                      learned_variance)
    fmt = output_memory_format(x)
    out = torch.empty_like(x, memory_format=fmt)
    den = torch.empty_like(x, memory_format=fmt) if write_denoised else x.new_empty(0)
    return out, den


def _triton(*args):
    from .triton.guided_step import guided_step_triton
    return guided_step_triton(*args)


def _twin(*args):
    return reference.guided_step(*args)


_dispatch.register(
    OP, _twin,
    cpu=[_dispatch.compiled("C++ (OpenMP)"), _dispatch.Impl("reference", _dispatch.TORCH, _twin)],
    cuda=[_dispatch.compiled("CUDA C++"), _dispatch.Impl("Triton", _dispatch.TRITON, _triton),
          _dispatch.Impl("reference", _dispatch.TORCH, _twin)],
)


def implementation(device_type: str) -> str:
    """Which implementation serves guided_step on `device_type` under the current backend."""
    return _dispatch.implementation(OP, device_type)


def guided_step(
    x: Tensor,
    cond: Tensor,
    uncond: Optional[Tensor] = None,
    guidance_scale: Optional[Tensor] = None,
    *,
    coeffs: Tensor,
    noise: Optional[Tensor] = None,
    history: Sequence[Tensor] = (),
    clip_range: Optional[float] = None,
    learned_variance: bool = False,
    write_denoised: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One fused sampler step over a batch; returns ``(x_next, denoised)``.

    x:               the current sample [B, C, ...] (fp32, fp16 or bf16).
    cond, uncond:    the model's conditional / unconditional outputs [B, C or 2C, ...],
                     typically the two halves (views) of one batched 2B model call;
                     without ``uncond`` there is no guidance combine.
    guidance_scale:  float32 [1] or [B]: one scale per sample.
    coeffs:          float32 [1 or B, 11 + len(history)], see ``fastdiff.ops.coeffs``.
    noise:           the step's noise, same shape as x, or None for a deterministic step.
    history:         up to 4 earlier tensors (x0s, eps, samples) for multistep updates.
    clip_range:      clamp x0 to [-r, r] (GLIDE's clip_denoised), or None.
    learned_variance: cond has 2C channels; the last C give GLIDE's learned-range variance.
    write_denoised:  also return DEN_X * x + DEN_P * p + DEN_X0 * x0 (else an empty tensor).
    """
    if isinstance(history, Tensor) or not isinstance(history, Sequence):
        raise OpTypeError(f"guided_step: history must be a list of tensors, got {type(history).__name__}")
    history = list(history)
    check_guided_step(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                      learned_variance)
    args = (x, cond, uncond, guidance_scale, coeffs, noise, history,
            None if clip_range is None else float(clip_range), bool(learned_variance), bool(write_denoised))
    return _dispatch.call(OP, x.device.type, args)
