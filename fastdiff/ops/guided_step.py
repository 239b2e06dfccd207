"""The fused sampler step: CFG combine + prediction conversion + update + noise, one pass.

``guided_step`` is torch.ops.fastdiff.guided_step with a typed Python face. Its
coefficient layout is documented in ``fastdiff.ops.coeffs``; samplers build the
rows (fastdiff/sampling/) and never touch elements themselves.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _library, reference
from .coeffs import output_memory_format

OP = "guided_step"


@torch.library.register_fake("fastdiff::guided_step")
def _guided_step_fake(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                      learned_variance, write_denoised):
    for name, t in [("cond", cond), ("uncond", uncond), ("noise", noise), ("coeffs", coeffs),
                    ("guidance_scale", guidance_scale), *[("history tensor", h) for h in history]]:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"guided_step: {name} is on {t.device} but x is on {x.device}")
    fmt = output_memory_format(x)
    out = torch.empty_like(x, memory_format=fmt)
    den = torch.empty_like(x, memory_format=fmt) if write_denoised else x.new_empty(0)
    return out, den


def _register_python_kernels() -> None:
    """Kernels for the dispatch keys the C++ extension did not fill."""
    if not _library.has_kernel(OP, "CPU"):
        torch.library.impl(f"fastdiff::{OP}", "CPU")(reference.guided_step)
    if not _library.has_kernel(OP, "CUDA"):
        def _cuda(*args):
            if _library.triton_available():
                from .triton.guided_step import guided_step_triton
                return guided_step_triton(*args)
            return reference.guided_step(*args)
        torch.library.impl(f"fastdiff::{OP}", "CUDA")(_cuda)


_register_python_kernels()


def implementation(device_type: str) -> str:
    """Which implementation serves guided_step on `device_type` under the current backend."""
    backend = _library.get_backend()
    if backend == "reference":
        return "reference"
    if device_type == "cpu":
        return "C++ (OpenMP)" if _library.extension_loaded() else "reference"
    if device_type == "cuda":
        cuda_cpp = _library.extension_loaded() and _library.extension_has_cuda()
        if cuda_cpp and backend != "triton":
            return "CUDA C++"
        return "Triton" if _library.triton_available() else "reference"
    return "reference"


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
    args = (x, cond, uncond, guidance_scale, coeffs, noise, list(history), clip_range,
            learned_variance, write_denoised)
    backend = _library.get_backend()
    if backend == "reference":
        return reference.guided_step(*args)
    if backend == "triton" and x.is_cuda:
        from .triton.guided_step import guided_step_triton
        return guided_step_triton(*args)
    return torch.ops.fastdiff.guided_step(*args)
