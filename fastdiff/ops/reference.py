"""Pure-PyTorch twins of every fastdiff op: same signature, same semantics, eager.

These are the oracles the kernels are tested against, and the implementation that
runs when the extension is absent or ``FASTDIFF_BACKEND=reference`` is set. They are
written for clarity (one tensor expression per line of the op's formula), compute in
float32 whatever the (16- or 32-bit) storage dtype, and stay differentiable. guided_step
computes in torch.promote_types(dtype, float32), so its float64 inputs (gradcheck) stay
float64; ``guided_step_backward`` is its explicit backward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import check_attention, check_discrete_step, check_group_norm, check_guided_step
from .coeffs import (
    DEN_P,
    DEN_X,
    DEN_X0,
    HIST0,
    LOGVAR_MAX,
    LOGVAR_MIN,
    OUT_NOISE,
    OUT_P,
    OUT_X,
    OUT_X0,
    X0_P,
    X0_X,
    output_memory_format,
)
from .coeffs import (  # noqa: F401  (discrete_step's columns, re-exported as reference.DS_*)
    DS_POSTERIOR,
    DS_CUM_SAME,
    DS_CUM_OTHER,
    DS_CUM_MASK,
    DS_PREV_A,
    DS_PREV_B,
    DS_PREV_C,
    DS_STEP_SAME,
    DS_STEP_OTHER,
    DS_STEP_MASK,
    DS_STEP_UNMASK,
    DS_NUM_COEFFS,
    DS_CLAMP_MIN,
    DS_GUMBEL_EPS,
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
    check_guided_step(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                      learned_variance)
    ct, k, xf, _, _, _, pred = _operands(x, cond, uncond, guidance_scale, coeffs)
    x0 = k[X0_X] * xf + k[X0_P] * pred
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    out = k[OUT_X] * xf + k[OUT_P] * pred + k[OUT_X0] * x0
    for j, h in enumerate(history):
        out = out + k[HIST0 + j] * h.to(ct)
    if noise is not None:
        std = _noise_std(cond, x.shape[1], k, ct) if learned_variance else 1.0
        out = out + k[OUT_NOISE] * std * noise.to(ct)
    fmt = output_memory_format(x)
    out = out.to(x.dtype).contiguous(memory_format=fmt)
    if write_denoised:
        den = k[DEN_X] * xf + k[DEN_P] * pred + k[DEN_X0] * x0
        den = den.to(x.dtype).contiguous(memory_format=fmt)
    else:
        den = x.new_empty(0)
    return out, den


def _operands(x: Tensor, cond: Tensor, uncond: Optional[Tensor], guidance_scale: Optional[Tensor], coeffs: Tensor):
    """What guided_step and its backward both start from, in the compute dtype ct: (ct, the
    coefficient columns k broadcast per sample, x, cond's prediction half c, uncond's u, the
    scale s, the guided prediction u + s (c - u)); u and s are None without CFG."""
    ct = compute_dtype(x.dtype)
    channels, nd = x.shape[1], x.dim()
    k = [_per_sample(coeffs[:, j].to(ct), nd) for j in range(coeffs.shape[1])]
    c = cond[:, :channels].to(ct)
    u = s = None
    pred = c
    if uncond is not None:
        s = _per_sample(guidance_scale.to(ct), nd)
        u = uncond[:, :channels].to(ct)
        pred = u + s * (c - u)
    return ct, k, x.to(ct), c, u, s, pred


def _noise_std(cond: Tensor, channels: int, k: list, ct: torch.dtype) -> Tensor:
    """A learned variance's noise scale: exp of half the log-variance interpolated by cond's second half."""
    frac = 0.5 * (cond[:, channels:].to(ct) + 1.0)
    return torch.exp(0.5 * (frac * k[LOGVAR_MAX] + (1.0 - frac) * k[LOGVAR_MIN]))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the 16- and 32-bit storage dtypes, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _grad_like(g: Tensor, t: Tensor) -> Tensor:
    """A gradient in t's dtype and memory format (channels-last inputs get channels-last grads)."""
    return g.to(t.dtype).contiguous(memory_format=output_memory_format(t))


def _reduce_scale(g: Tensor, scale: Tensor) -> Tensor:
    """Sum a per-element gradient to guidance_scale's own shape ([1], [B] or a 0-d tensor):
    a scale shared by the batch gets the sum over the batch."""
    per_sample = g.reshape(g.shape[0], -1).sum(dim=1)
    if scale.numel() == 1:
        per_sample = per_sample.sum()
    return per_sample.reshape(scale.shape)


def guided_step_backward(
    grad_out: Optional[Tensor],
    grad_den: Optional[Tensor],
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
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], List[Tensor]]:
    """The vector-Jacobian product of guided_step, by its formulas (fastdiff.ops.coeffs):
    returns grads for (x, cond, uncond, guidance_scale, noise, history).

    Written out rather than derived by autograd through the twin, so that the backward of
    any forward kernel (C++, CUDA C++, Triton) costs one elementwise pass and no re-run of
    the forward; pure PyTorch, no host sync (CUDA-graph safe). With g_x0 the gradient
    reaching the (clamped) x0, the clamp passes it where |x0| <= r, as torch.clamp does:

        g_x0   = OUT_X0 g_out + DEN_X0 g_den                         (masked by the clamp)
        g_p    = OUT_P g_out + DEN_P g_den + X0_P g_x0
        g_x    = OUT_X g_out + DEN_X g_den + X0_X g_x0
        g_c    = s g_p,  g_u = (1 - s) g_p,  g_s = sum g_p (c - u)     (with CFG; else g_c = g_p)
        g_h_j  = HIST_j g_out,  g_noise = OUT_NOISE std g_out
        g_v    = OUT_NOISE noise g_out * d std / d v,  d std / d v = std (LOGVAR_MAX - LOGVAR_MIN) / 4
    """
    ct, k, xf, c, u, s, pred = _operands(x, cond, uncond, guidance_scale, coeffs)
    channels = x.shape[1]
    zeros = torch.zeros((), dtype=ct, device=x.device)
    go = zeros if grad_out is None else grad_out.to(ct)
    gd = zeros if grad_den is None or not write_denoised or grad_den.numel() == 0 else grad_den.to(ct)
    g_x0 = k[OUT_X0] * go + k[DEN_X0] * gd
    if clip_range is not None:
        x0 = k[X0_X] * xf + k[X0_P] * pred
        g_x0 = torch.where(x0.abs() <= clip_range, g_x0, zeros)
    g_pred = k[OUT_P] * go + k[DEN_P] * gd + k[X0_P] * g_x0
    g_x = (k[OUT_X] * go + k[DEN_X] * gd + k[X0_X] * g_x0).expand(x.shape)
    g_u = g_s = None
    g_c = g_pred
    if uncond is not None:
        g_c = s * g_pred
        g_u = (1.0 - s) * g_pred
        g_s = _reduce_scale((g_pred * (c - u)).expand(x.shape), guidance_scale).to(guidance_scale.dtype)
    g_c = g_c.expand(x.shape)
    g_var = None
    g_noise = None
    if noise is not None:
        std = 1.0
        nf = noise.to(ct)
        if learned_variance:
            std = _noise_std(cond, channels, k, ct)
            g_var = (k[OUT_NOISE] * go * nf * std * (0.25 * (k[LOGVAR_MAX] - k[LOGVAR_MIN]))).expand(x.shape)
        g_noise = _grad_like((k[OUT_NOISE] * std * go).expand(x.shape), noise)
    if cond.shape[1] != channels:   # 2C channels: the variance half (zero grad when unread)
        g_c = torch.cat([g_c, torch.zeros_like(g_c) if g_var is None else g_var], dim=1)
    if uncond is not None:
        if uncond.shape[1] != channels:   # the unconditional variance half is never read
            g_u = torch.cat([g_u.expand(x.shape), torch.zeros(x.shape, dtype=ct, device=x.device)], dim=1)
        g_u = _grad_like(g_u.expand(uncond.shape), uncond)
    g_hist = [_grad_like((k[HIST0 + j] * go).expand(x.shape), h) for j, h in enumerate(history)]
    return _grad_like(g_x, x), _grad_like(g_c, cond), g_u, g_s, g_noise, g_hist


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v over [B, H, L, D] tensors, in float32.

    key_padding_mask: [B, Lk] bool, True where a key may be attended to. A query
    whose keys are all masked gets zeros (not NaN).
    """
    key_padding_mask = check_attention(q, k, v, key_padding_mask, scale)
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
    check_group_norm(x, num_groups, weight, bias, eps, scale, shift)
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


# --- discrete_step: VQ-Diffusion's step over codebook tokens --------------------------------
# The columns of its coefficient row (DS_*) are documented in fastdiff/ops/coeffs.py.


def truncate_log_probs(log_p: Tensor, truncation_rate: float) -> Tensor:
    """Keep, per token, the most likely classes until their cumulative probability reaches
    ``truncation_rate``; the rest become -inf (diffusers' VQDiffusionPipeline.truncate).

    Class i (in descending order of log-probability, ties by class index) is kept when
    the classes before it sum to less than the rate, the most likely one always. The sum
    runs in float64 and is compared in float32, as torch's CPU cumsum and ``<`` do.

    A rate of 1 or more keeps every class: diffusers documents 1.0 as "no truncation",
    but its float32 cumsum of a sharp distribution reaches 1.0 early and drops a tail of
    classes (each below ~1e-7) chosen by rounding, which no other kernel, nor diffusers
    on another device, reproduces. That tail is the only difference at 1.0.
    """
    if truncation_rate >= 1.0:
        return log_p
    sorted_lp, order = torch.sort(log_p, dim=1, descending=True, stable=True)
    mass = torch.exp(sorted_lp).double().cumsum(dim=1).float()
    keep_sorted = torch.cat([torch.ones_like(mass[:, :1], dtype=torch.bool),
                             mass[:, :-1] < truncation_rate], dim=1)
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return log_p.masked_fill(~keep, float("-inf"))


def discrete_step(
    x_t: Tensor,
    cond: Tensor,
    uncond: Optional[Tensor],
    guidance_scale: Optional[Tensor],
    coeffs: Tensor,
    noise: Optional[Tensor],
    truncation_rate: float,
    write_log_probs: bool,
) -> Tuple[Tensor, Tensor]:
    """One VQ-Diffusion step: log-space CFG, renormalise, truncate, clamp, q-posterior,
    Gumbel-max sample. See ``fastdiff.ops.discrete_step`` for the contract."""
    check_discrete_step(x_t, cond, uncond, guidance_scale, coeffs, noise, truncation_rate)
    num_codes = cond.shape[1]                   # M = K - 1; class M is the mask
    log_p = cond.float()
    if uncond is not None:
        scale = guidance_scale.float().reshape(-1, 1, 1)
        u = uncond.float()
        log_p = u + scale * (log_p - u)
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    log_p = truncate_log_probs(log_p, truncation_rate).clamp(min=DS_CLAMP_MIN)

    def col(j):
        return coeffs[:, j].reshape(-1, 1, 1)

    classes = torch.arange(num_codes, device=x_t.device).reshape(1, -1, 1)
    masked = (x_t == num_codes).unsqueeze(1)                      # [B, 1, N]
    same = classes == x_t.unsqueeze(1)                            # [B, M, N]
    log_q_cum = torch.where(masked, col(DS_CUM_MASK), torch.where(same, col(DS_CUM_SAME), col(DS_CUM_OTHER)))
    log_q_step = torch.where(masked, col(DS_STEP_MASK), torch.where(same, col(DS_STEP_SAME), col(DS_STEP_OTHER)))
    log_q_step_mask = torch.where(masked, torch.zeros_like(col(DS_STEP_UNMASK)), col(DS_STEP_UNMASK))
    # p(x_{t-1} | x_t) = sum_x0 q(x_t | x_{t-1}) q(x_{t-1} | x_0) p(x_0 | x_t) / q(x_t | x_0),
    # normalised over x_0 in log space (the scheduler's q_posterior, same operation order).
    q = log_p - log_q_cum
    q_norm = torch.logsumexp(q, dim=1, keepdim=True)
    q = torch.logaddexp(q - q_norm + col(DS_PREV_A), col(DS_PREV_B))
    posterior = torch.cat([q + log_q_step + q_norm,
                           col(DS_PREV_C) + log_q_step_mask + q_norm], dim=1)
    last = torch.cat([log_p, torch.full_like(log_p[:, :1], float("-inf"))], dim=1)
    log_probs = torch.where(col(DS_POSTERIOR) > 0.5, posterior, last)
    if noise is not None:
        gumbel = -torch.log(-torch.log(noise + DS_GUMBEL_EPS) + DS_GUMBEL_EPS)
        tokens = (gumbel + log_probs).argmax(dim=1)
    else:
        tokens = log_probs.argmax(dim=1)
    return tokens, log_probs if write_log_probs else log_probs.new_empty(0)
