"""guided_step as one Triton kernel; the formula is in fastdiff/ops/coeffs.py.

Operands are prepared as in csrc/guided_step/guided_step_args.h: every input is a
base pointer plus a batch stride, with sample b's N = numel / B elements lying
contiguously in the output's memory order. The conditional and unconditional
halves of one CFG batch therefore stay zero-copy; anything laid out otherwise is
copied once to match.

The host side only reads tensor metadata (no .item()/.cpu()), so a call can be
captured in a CUDA graph.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..coeffs import (
    DEN_P,
    DEN_X,
    DEN_X0,
    HIST0,
    LOGVAR_MAX,
    LOGVAR_MIN,
    MAX_HISTORY,
    OUT_NOISE,
    OUT_P,
    OUT_X,
    OUT_X0,
    X0_P,
    X0_X,
    output_memory_format,
)

from .._checks import check_guided_step
from ._launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE = triton is not None

# 1024 elements over 4 warps gives each thread 8 contiguous values: wide enough
# for 16-byte loads in every storage dtype, small enough to keep many CTAs in
# flight on a memory-bound op.
_BLOCK = 1024
_NUM_WARPS = 4
# CUDA caps the second grid dimension, which carries the batch.
_MAX_GRID_Y = 65535
# In-sample offsets are 32-bit (cheaper address math); the batch offset is 64-bit.
_MAX_INNER = 2**31 - 1 - _BLOCK


if AVAILABLE:
    # Jitted code may only read globals that are constexpr.
    _X0_X = tl.constexpr(X0_X)
    _X0_P = tl.constexpr(X0_P)
    _OUT_X = tl.constexpr(OUT_X)
    _OUT_P = tl.constexpr(OUT_P)
    _OUT_X0 = tl.constexpr(OUT_X0)
    _OUT_NOISE = tl.constexpr(OUT_NOISE)
    _DEN_X = tl.constexpr(DEN_X)
    _DEN_P = tl.constexpr(DEN_P)
    _DEN_X0 = tl.constexpr(DEN_X0)
    _LOGVAR_MAX = tl.constexpr(LOGVAR_MAX)
    _LOGVAR_MIN = tl.constexpr(LOGVAR_MIN)
    _HIST0 = tl.constexpr(HIST0)

    @triton.jit
    def _load_sample(ptr, batch_stride, sample, offs, mask):
        return tl.load(ptr + sample * batch_stride + offs, mask=mask).to(tl.float32)

    @triton.jit
    def _guided_step_kernel(
        x_ptr, cond_ptr, uncond_ptr, var_ptr, noise_ptr,
        hist0_ptr, hist1_ptr, hist2_ptr, hist3_ptr,
        out_ptr, den_ptr, coeffs_ptr, scale_ptr,
        x_bstride, cond_bstride, uncond_bstride, var_bstride, noise_bstride,
        hist0_bstride, hist1_bstride, hist2_bstride, hist3_bstride,
        coeff_bstride, scale_bstride, inner, clip_range,
        HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, LEARNED: tl.constexpr,
        CLIP: tl.constexpr, WRITE_DEN: tl.constexpr, NUM_HISTORY: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        sample = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inner
        k = coeffs_ptr + sample * coeff_bstride

        x = _load_sample(x_ptr, x_bstride, sample, offs, mask)
        pred = _load_sample(cond_ptr, cond_bstride, sample, offs, mask)
        if HAS_UNCOND:
            scale = tl.load(scale_ptr + sample * scale_bstride)
            u = _load_sample(uncond_ptr, uncond_bstride, sample, offs, mask)
            pred = u + scale * (pred - u)

        x0 = tl.load(k + _X0_X) * x + tl.load(k + _X0_P) * pred
        if CLIP:
            # Comparisons rather than minimum/maximum, which may turn a NaN into a bound.
            x0 = tl.where(x0 < -clip_range, -clip_range, tl.where(x0 > clip_range, clip_range, x0))

        acc = tl.load(k + _OUT_X) * x + tl.load(k + _OUT_P) * pred + tl.load(k + _OUT_X0) * x0
        if NUM_HISTORY > 0:
            hist = _load_sample(hist0_ptr, hist0_bstride, sample, offs, mask)
            acc += tl.load(k + _HIST0) * hist
        if NUM_HISTORY > 1:
            hist = _load_sample(hist1_ptr, hist1_bstride, sample, offs, mask)
            acc += tl.load(k + _HIST0 + 1) * hist
        if NUM_HISTORY > 2:
            hist = _load_sample(hist2_ptr, hist2_bstride, sample, offs, mask)
            acc += tl.load(k + _HIST0 + 2) * hist
        if NUM_HISTORY > 3:
            hist = _load_sample(hist3_ptr, hist3_bstride, sample, offs, mask)
            acc += tl.load(k + _HIST0 + 3) * hist

        if HAS_NOISE:
            noise_scale = tl.load(k + _OUT_NOISE)
            if LEARNED:
                var = _load_sample(var_ptr, var_bstride, sample, offs, mask)
                frac = 0.5 * (var + 1.0)
                log_var = frac * tl.load(k + _LOGVAR_MAX) + (1.0 - frac) * tl.load(k + _LOGVAR_MIN)
                noise_scale = noise_scale * tl.exp(0.5 * log_var)
            acc += noise_scale * _load_sample(noise_ptr, noise_bstride, sample, offs, mask)

        # The outputs are fresh and dense, so sample b starts at b * inner.
        tl.store(out_ptr + sample * inner + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_DEN:
            den = tl.load(k + _DEN_X) * x + tl.load(k + _DEN_P) * pred + tl.load(k + _DEN_X0) * x0
            tl.store(den_ptr + sample * inner + offs, den.to(den_ptr.dtype.element_ty), mask=mask)


def _same_inner_layout(t: Tensor, ref: Tensor) -> bool:
    return all(ref.shape[d] <= 1 or t.stride(d) == ref.stride(d) for d in range(1, ref.dim()))


def _operand(t: Tensor, out: Tensor, fmt: torch.memory_format) -> Tuple[Tensor, int]:
    """(tensor, batch stride) with each sample laid out like one sample of `out`."""
    if not _same_inner_layout(t, out):
        t = t.contiguous(memory_format=fmt)
        if not _same_inner_layout(t, out):
            t = torch.empty_like(out).copy_(t)
    return t, (t.stride(0) if out.shape[0] > 1 else 0)


def guided_step_triton(
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
    """One sampler step in one kernel; same contract as fastdiff.ops.reference.guided_step."""
    if not AVAILABLE:
        raise RuntimeError(
            "guided_step_triton: Triton is not installed; install fastdiff[triton] "
            "or use another backend"
        )
    if isinstance(x, Tensor) and x.dtype == torch.float64:
        # The kernel computes in float32; the dispatch table (its `serves`) sends float64 to the twin.
        raise TypeError("guided_step_triton: x must be float32, float16 or bfloat16 (float64 runs on "
                        "the reference twin), got torch.float64")
    check_guided_step(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                      learned_variance)

    batch, channels = x.shape[0], x.shape[1]
    fmt = output_memory_format(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    den = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
           if write_denoised else x.new_empty(0))
    inner = x.numel() // batch if batch else 0
    if inner == 0:
        return out, den
    if inner > _MAX_INNER or batch > _MAX_GRID_Y:
        raise ValueError(
            f"guided_step: shape {tuple(x.shape)} is too large for the Triton kernel "
            f"(at most {_MAX_GRID_Y} samples of at most {_MAX_INNER} elements)"
        )

    x_op = _operand(x, out, fmt)
    cond_op = _operand(cond if cond.shape[1] == channels else cond.narrow(1, 0, channels), out, fmt)
    # Unused operands point at x with a zero stride so the kernel signature stays fixed.
    unused = (x, 0)
    uncond_op = _operand(uncond.narrow(1, 0, channels), out, fmt) if uncond is not None else unused
    needs_var = learned_variance and noise is not None
    var_op = _operand(cond.narrow(1, channels, channels), out, fmt) if needs_var else unused
    noise_op = _operand(noise, out, fmt) if noise is not None else unused
    hist_ops: List[Tuple[Tensor, int]] = [_operand(h, out, fmt) for h in history]
    hist_ops += [unused] * (MAX_HISTORY - len(hist_ops))

    coeffs = coeffs.contiguous()
    coeff_bstride = 0 if coeffs.shape[0] == 1 else coeffs.shape[1]
    if uncond is not None:
        scale = guidance_scale.reshape(-1).contiguous()
        scale_bstride = 0 if scale.numel() == 1 else 1
    else:
        scale, scale_bstride = coeffs, 0

    operands = [x_op, cond_op, uncond_op, var_op, noise_op, *hist_ops]
    grid = (triton.cdiv(inner, _BLOCK), batch)
    launch(
        _guided_step_kernel, grid, x.device,
        *(t for t, _ in operands),
        out, den if write_denoised else out, coeffs, scale,
        *(stride for _, stride in operands),
        coeff_bstride, scale_bstride, inner,
        float(clip_range) if clip_range is not None else 0.0,
        HAS_UNCOND=uncond is not None,
        HAS_NOISE=noise is not None,
        LEARNED=needs_var,
        CLIP=clip_range is not None,
        WRITE_DEN=write_denoised,
        NUM_HISTORY=len(history),
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
    )
    return out, den
