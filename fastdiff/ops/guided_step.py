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
from ._checks import OpTypeError, OpValueError, check_guided_step
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


def _not_float64(backend, x, *rest) -> bool:
    """The C++, CUDA C++ and Triton kernels take 16/32-bit floats; float64 (gradcheck) goes to the twin."""
    return x.dtype != torch.float64


class _DirectStep(torch.autograd.Function):
    """A kernel called outside torch.ops.fastdiff.guided_step, with the op's backward attached.

    ``_dispatch.call`` runs some implementations directly, not through the op: Triton under
    the triton backend, and the twin for float64 where the extension fills the dispatch key
    (its kernels refuse float64). The op's registered autograd would not see those calls;
    this gives them the same backward (``_backward``), so gradcheck in float64 checks the
    formulas every backend uses. History tensors come last, unpacked: autograd.Function
    tracks only top-level tensors.
    """

    @staticmethod
    def forward(ctx, kernel, x, cond, uncond, guidance_scale, coeffs, noise, clip_range, learned_variance,
                write_denoised, *history):
        args = (x, cond, uncond, guidance_scale, coeffs, noise, list(history), clip_range,
                learned_variance, write_denoised)
        out, den = kernel(*args)
        _setup_context(ctx, args, (out, den))
        return out, den

    @staticmethod
    def backward(ctx, grad_out, grad_den):
        g = _backward(ctx, grad_out, grad_den)
        return (None, *g[:6], None, None, None, *g[6])


def _differentiable(kernel):
    """kernel as a table entry: with the backward attached when called with grad enabled.
    Inside torch.ops.fastdiff.guided_step (the registered autograd's forward) grad mode is
    off, so there the plain kernel runs and the registered backward applies."""
    def served(*args):
        x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range, learned, write_den = args
        tensors = [t for t in (x, cond, uncond, guidance_scale, noise, *history) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _DirectStep.apply(kernel, x, cond, uncond, guidance_scale, coeffs, noise, clip_range,
                                     learned, write_den, *history)
        return kernel(*args)
    served.__name__ = f"{kernel.__name__}_differentiable"
    return served


_dispatch.register(
    OP, _twin,
    cpu=[_dispatch.compiled("C++ (OpenMP)", _not_float64),
         _dispatch.Impl("reference", _dispatch.TORCH, _differentiable(_twin))],
    cuda=[_dispatch.compiled("CUDA C++", _not_float64),
          _dispatch.Impl("Triton", _dispatch.TRITON, _differentiable(_triton), serves=_not_float64),
          _dispatch.Impl("reference", _dispatch.TORCH, _differentiable(_twin))],
)


def _refuse_coeffs_grad(coeffs) -> None:
    """Coefficients are host-built constants of a schedule; the backward gives them no gradient,
    and a silent zero would mislead an optimiser, so asking for one is an error."""
    if isinstance(coeffs, Tensor) and coeffs.requires_grad:
        raise OpValueError("guided_step: coeffs must not require grad (the op gives coefficients no "
                           "gradient); pass coeffs.detach()")


def _setup_context(ctx, inputs, output) -> None:
    x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range, learned, write_den = inputs
    _refuse_coeffs_grad(coeffs)
    ctx.save_for_backward(x, cond, uncond, guidance_scale, coeffs, noise, *history)
    ctx.flags = (clip_range, learned, write_den)


def _backward(ctx, grad_out, grad_den):
    """Grads for the op's inputs in schema order (history a list; coeffs and flags None)."""
    x, cond, uncond, guidance_scale, coeffs, noise, *history = ctx.saved_tensors
    clip_range, learned, write_den = ctx.flags
    g_x, g_c, g_u, g_s, g_n, g_h = reference.guided_step_backward(
        grad_out, grad_den, x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
        learned, write_den)
    need = ctx.needs_input_grad
    g_u = g_u if need[2] else None
    g_s = g_s if need[3] else None
    return g_x, g_c, g_u, g_s, None, g_n, g_h, None, None, None


# One backward for every kernel that runs the forward (C++, CUDA C++, Triton, the twin).
torch.library.register_autograd("fastdiff::guided_step", _backward, setup_context=_setup_context)


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

    Differentiable in x, cond (both channel halves), uncond, guidance_scale, noise and every
    history tensor, whichever kernel runs the forward: the backward registered with
    torch.library (``reference.guided_step_backward``) is explicit formulas, so gradients
    through a whole sampler chain (x_T optimisation) cost one elementwise pass per step.
    coeffs get no gradient, and one that requires grad is refused.

    x:               the current sample [B, C, ...] (fp32, fp16 or bf16; float64 runs on
                     the reference twin only, for gradcheck).
    cond, uncond:    the model's conditional / unconditional outputs [B, C or 2C, ...],
                     typically the two halves (views) of one batched 2B model call;
                     without ``uncond`` there is no guidance combine.
    guidance_scale:  float32 [1] or [B]: one scale per sample (float64 allowed with float64 x).
    coeffs:          float32 [1 or B, 11 + len(history)], see ``fastdiff.ops.coeffs``
                     (float64 allowed with float64 x).
    noise:           the step's noise, same shape as x, or None for a deterministic step.
    history:         up to 4 earlier tensors (x0s, eps, samples) for multistep updates.
    clip_range:      clamp x0 to [-r, r] (GLIDE's clip_denoised), or None.
    learned_variance: cond has 2C channels; the last C give GLIDE's learned-range variance.
    write_denoised:  also return DEN_X * x + DEN_P * p + DEN_X0 * x0 (else an empty tensor).
    """
    if isinstance(history, Tensor) or not isinstance(history, Sequence):
        raise OpTypeError(f"guided_step: history must be a list of tensors, got {type(history).__name__}")
    history = list(history)
    _refuse_coeffs_grad(coeffs)
    check_guided_step(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                      learned_variance)
    args = (x, cond, uncond, guidance_scale, coeffs, noise, history,
            None if clip_range is None else float(clip_range), bool(learned_variance), bool(write_denoised))
    return _dispatch.call(OP, x.device.type, args)
