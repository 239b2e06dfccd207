"""VQ-Diffusion's step over codebook tokens, fused: the discrete twin of guided_step.

Per token, over its K classes (K - 1 codebook classes, then the mask class):
  1. log-space classifier-free guidance  l = u + s (c - u), renormalised by logsumexp
     (only with ``uncond``; as diffusers' VQDiffusionPipeline);
  2. truncation: keep the most likely classes up to cumulative probability
     ``truncation_rate``, the rest -> -inf (``reference.truncate_log_probs``);
  3. clamp(min=-70), as the pipeline does to remove log(0);
  4. the q-posterior log p(x_{t-1} | x_t) of VQDiffusionScheduler.step, from the row of
     ``coeffs`` (fastdiff.sampling.discrete builds it; columns are ``reference.DS_*``);
     at t = 0 (DS_POSTERIOR = 0) the step samples x0 itself and the mask class is -inf;
  5. Gumbel-max sampling: argmax(log_probs - log(-log(u + 1e-30) + 1e-30)) for the
     uniform noise u, the same expression as diffusers' ``gumbel_noised``.

Reproducing diffusers' samples: draw u with ``fastdiff.sampling.discrete.gumbel_uniform``
from the generator diffusers' pipeline would get; it draws the same shapes in the same
order ([B, K, N] per step, [B, K-1, N] at t = 0), so the tokens are identical.

Implementations (``implementation(device)`` names the one in use): C++ with OpenMP on
CPU (csrc/discrete_step/discrete_step_cpu.cpp); on CUDA the CUDA C++ kernel
(discrete_step_cuda.cu), else, or under the "triton" backend, the Triton kernel
(fastdiff/ops/triton/discrete_step.py; past its MAX_CLASSES the next implementation in
fastdiff/ops/_dispatch.py's table serves: the CUDA C++ kernel, else the twin).
None of them sorts for the truncation: they select the kept prefix of the order. The
GPU kernels do not check x_t's range (that would need a host sync): a class outside
[0, K-1] is then treated as the twin treats it, as neither x_t's class nor the mask.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch, reference
from ._checks import check_discrete_step
from .reference import DS_NUM_COEFFS  # noqa: F401  (the row width, for callers)

OP = "discrete_step"


@torch.library.register_fake("fastdiff::discrete_step")
def _discrete_step_fake(x_t, cond, uncond, guidance_scale, coeffs, noise, truncation_rate,
                        write_log_probs):
    check_discrete_step(x_t, cond, uncond, guidance_scale, coeffs, noise, truncation_rate)
    B, N = x_t.shape
    K = cond.shape[1] + 1
    tokens = x_t.new_empty((B, N), dtype=torch.int64)
    shape = (B, K, N) if write_log_probs else (0,)
    return tokens, cond.new_empty(shape, dtype=torch.float32)


def _triton_serves(backend, x_t, cond, *rest) -> bool:
    """One Triton program holds at most MAX_CLASSES classes; past that the next one serves."""
    from .triton import discrete_step as triton_kernel
    return triton_kernel.AVAILABLE and cond.shape[1] <= triton_kernel.MAX_CLASSES


def _triton(*args):
    from .triton import discrete_step as triton_kernel
    return triton_kernel.discrete_step_triton(*args)


def _twin(*args):
    return reference.discrete_step(*args)


_dispatch.register(
    OP, _twin,
    cpu=[_dispatch.compiled("C++ (OpenMP)"), _dispatch.Impl("reference", _dispatch.TORCH, _twin)],
    cuda=[_dispatch.compiled("CUDA C++"),
          _dispatch.Impl("Triton", _dispatch.TRITON, _triton, serves=_triton_serves),
          _dispatch.Impl("reference", _dispatch.TORCH, _twin)],
)


def implementation(device_type: str) -> str:
    """Which implementation serves discrete_step on `device_type` under the current backend."""
    return _dispatch.implementation(OP, device_type)


def discrete_step(
    x_t: Tensor,
    cond: Tensor,
    uncond: Optional[Tensor] = None,
    guidance_scale: Optional[Tensor] = None,
    *,
    coeffs: Tensor,
    noise: Optional[Tensor] = None,
    truncation_rate: float = 1.0,
    write_log_probs: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One VQ-Diffusion step over a batch; returns ``(x_prev, log_probs)``.

    x_t:             int64 [B, N], the current tokens (class K-1 is the mask).
    cond, uncond:    the transformer's log-probabilities over the K-1 codebook classes,
                     [B, K-1, N] (classes on dim 1, as diffusers), fp32/fp16/bf16; any
                     strides, e.g. the two halves of one batched 2B model call.
                     Without ``uncond`` there is no guidance and no renormalisation.
    guidance_scale:  float32 [1] or [B].
    coeffs:          float32 [1 or B, DS_NUM_COEFFS]: a row of
                     ``fastdiff.sampling.discrete.discrete_step_rows``.
    noise:           float32 uniform [B, K, N] (see ``gumbel_uniform``); None samples the
                     argmax (greedy).
    truncation_rate: keep classes up to this cumulative probability; 1.0 (diffusers'
                     default) or more keeps every class (diffusers itself may drop a
                     rounding tail of classes below ~1e-7 there; see truncate_log_probs).
    write_log_probs: also return the float32 [B, K, N] log p(x_{t-1} | x_t) (else empty).
    """
    check_discrete_step(x_t, cond, uncond, guidance_scale, coeffs, noise, truncation_rate)
    args = (x_t, cond, uncond, guidance_scale, coeffs, noise, float(truncation_rate),
            bool(write_log_probs))
    return _dispatch.call(OP, x_t.device.type, args)
