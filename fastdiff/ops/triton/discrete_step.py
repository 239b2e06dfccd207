"""discrete_step (VQ-Diffusion's token step) as one Triton kernel; the formula is in
fastdiff/ops/discrete_step.py and fastdiff.ops.reference.discrete_step.

A program owns BLOCK_N neighbouring tokens of one sample and all their M = K - 1
codebook classes at once, as a [BLOCK_N, BLOCK_K] tile in registers (BLOCK_K is M
rounded up to a power of two; the mask class is a separate [BLOCK_N] vector). The
inputs keep diffusers' layout, classes on dim 1 and tokens innermost, so each class
row of the tile is a run of BLOCK_N contiguous tokens; any strides work, including
the two halves of one batched CFG model call, without copies.

Truncation without sorting. The kept classes are a prefix of the descending order
(value, then class index): class r is kept when the classes before it sum to less
than the rate. Each class gets an integer key that orders exactly like that (value
bits in the high part, the reversed class index in the low part), and the prefix
is {key >= c*} for the largest c* whose set {key >= c*} carries mass that reaches
the rate (float64 sum, compared in float32, as the reference). c* is found by
bisection over the key range, one float64 tile reduction per step, until one
class is left between the bounds (or the bounds meet): about 15 to 45 steps. The kept set is the same
as after a sort; only the float64 sums run in another order than the reference's
cumsum, which can change a sum by about 1e-16 and so decides differently only if a
partial sum lies that close to a float32 rounding boundary around the rate.

Transcendentals use libdevice on the GPU (the functions torch's own CUDA kernels
call), so exp() of a log-probability matches torch's bit for bit; under the
interpreter (TRITON_INTERPRET=1) they are numpy's.

The host side only reads tensor metadata (no .item()/.cpu()), so a call can be
captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference as R
from .._checks import check_discrete_step
from ._launch import interpreting, launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE = triton is not None

# The tile of one program holds about this many classes x tokens: 32 values per
# thread per live tensor at 8 warps, which keeps lp, p and the keys in registers.
_TILE = 8192
_MAX_BLOCK_N = 16
# Larger class counts would not fit one program's registers; the CUDA C++ kernel
# (or the reference) serves them.
MAX_CLASSES = 32768
_MAX_GRID_Y = 65535


if AVAILABLE:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # older Triton: the CUDA module holds it
        from triton.language.extra.cuda import libdevice

    _POSTERIOR = tl.constexpr(R.DS_POSTERIOR)
    _CUM_SAME = tl.constexpr(R.DS_CUM_SAME)
    _CUM_OTHER = tl.constexpr(R.DS_CUM_OTHER)
    _CUM_MASK = tl.constexpr(R.DS_CUM_MASK)
    _PREV_A = tl.constexpr(R.DS_PREV_A)
    _PREV_B = tl.constexpr(R.DS_PREV_B)
    _PREV_C = tl.constexpr(R.DS_PREV_C)
    _STEP_SAME = tl.constexpr(R.DS_STEP_SAME)
    _STEP_OTHER = tl.constexpr(R.DS_STEP_OTHER)
    _STEP_MASK = tl.constexpr(R.DS_STEP_MASK)
    _STEP_UNMASK = tl.constexpr(R.DS_STEP_UNMASK)
    _CLAMP_MIN = tl.constexpr(R.DS_CLAMP_MIN)
    _GUMBEL_EPS = tl.constexpr(R.DS_GUMBEL_EPS)

    @triton.jit
    def _exp(x, PRECISE: tl.constexpr):
        if PRECISE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _log(x, PRECISE: tl.constexpr):
        if PRECISE:
            return libdevice.log(x)
        else:
            return tl.log(x)

    @triton.jit
    def _log1p(x, PRECISE: tl.constexpr):
        if PRECISE:
            return libdevice.log1p(x)
        else:
            # log(1 + x) with the rounding of 1 + x undone (Goldberg), for x in [0, 1].
            u = 1.0 + x
            return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))

    @triton.jit
    def _logsumexp(v, valid, PRECISE: tl.constexpr):
        """torch.logsumexp over axis 1: an infinite maximum is not subtracted."""
        m = tl.max(tl.where(valid, v, float("-inf")), axis=1)
        m = tl.where(tl.abs(m) == float("inf"), 0.0, m)
        s = tl.sum(tl.where(valid, _exp(v - m[:, None], PRECISE), 0.0), axis=1)
        return _log(s, PRECISE) + m

    @triton.jit
    def _value_keys(lp, valid):
        """int32 keys in the order of the values (NaN above +inf, -0.0 equal to +0.0);
        padding below every class."""
        bits = tl.where(lp == 0.0, 0.0, lp).to(tl.int32, bitcast=True)
        # Monotone in the value as a signed integer: flip the magnitude bits of negatives.
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(lp != lp, 0x7FFFFFFF, key)
        return tl.where(valid, key, -2147483647 - 1)

    @triton.jit
    def _at_or_above(key, rev, bound, index_bits):
        """Whether (key, rev) ranks at or above the composite int64 bound."""
        bound_key = (bound >> index_bits).to(tl.int32)[:, None]
        bound_rev = (bound & ((1 << index_bits) - 1)).to(tl.int32)[:, None]
        return (key > bound_key) | ((key == bound_key) & (rev >= bound_rev))

    @triton.jit
    def _truncate(lp, k, valid, tok_ok, M, index_bits, rate, PRECISE: tl.constexpr):
        """reference.truncate_log_probs over axis 1 of the tile (see the module docstring).

        A class's place in the order is the int64 key * 2^index_bits + (M - 1 - class):
        larger comes earlier. The search bounds are such composites; the tile keeps the
        two halves as int32 (fewer registers than one int64 per class)."""
        p = tl.where(valid, _exp(lp, PRECISE), 0.0)
        key = _value_keys(lp, valid)
        rev = (M - 1 - k).to(tl.int32)[None, :]
        order = (key.to(tl.int64) << index_bits) + rev.to(tl.int64)
        top = tl.max(order, axis=1)
        lo = tl.min(tl.where(valid, order, 9223372036854775807), axis=1)
        # The first class alone: its own probability, no sum.
        top_mass = tl.sum(tl.where(order == top[:, None], p, 0.0), axis=1)
        total = tl.sum(p.to(tl.float64), axis=1)
        keep_top = ~(top_mass < rate)
        keep_all = total.to(tl.float32) < rate
        # Invariant while searching: the classes at or above lo reach the rate, those at or
        # above hi do not; cnt_lo and cnt_hi count them.
        lo = tl.where(keep_top, top, lo)
        hi = top
        cnt_lo = tl.sum(valid.to(tl.int32), axis=1)
        cnt_hi = tl.full(cnt_lo.shape, 1, tl.int32)
        active = tok_ok & ~keep_top & ~keep_all & (cnt_lo - cnt_hi > 1) & (hi - lo > 1)
        while tl.max(active.to(tl.int32), axis=0) > 0:
            # floor((lo + hi) / 2) without overflow
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
            inside = _at_or_above(key, rev, mid, index_bits)
            mass = tl.sum(tl.where(inside, p.to(tl.float64), 0.0), axis=1)
            cnt = tl.sum(inside.to(tl.int32), axis=1)
            reaches = ~(mass.to(tl.float32) < rate)
            up = active & reaches
            down = active & ~reaches
            lo = tl.where(up, mid, lo)
            cnt_lo = tl.where(up, cnt, cnt_lo)
            hi = tl.where(down, mid, hi)
            cnt_hi = tl.where(down, cnt, cnt_hi)
            active = active & (cnt_lo - cnt_hi > 1) & (hi - lo > 1)
        return tl.where(_at_or_above(key, rev, lo, index_bits), lp, float("-inf"))

    @triton.jit
    def _discrete_step_kernel(
        x_ptr, cond_ptr, uncond_ptr, noise_ptr, coeffs_ptr, scale_ptr, tokens_ptr, logp_ptr,
        x_sb, x_sn, c_sb, c_sk, c_sn, u_sb, u_sk, u_sn, z_sb, z_sk, z_sn,
        coeff_bstride, scale_bstride, M, N, rate, index_bits,
        GUIDED: tl.constexpr, HAS_NOISE: tl.constexpr, TRUNCATE: tl.constexpr,
        WRITE_LOGP: tl.constexpr, PRECISE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(1).to(tl.int64)
        n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        k = tl.arange(0, BLOCK_K).to(tl.int64)
        tok_ok = n < N
        cls_ok = k < M
        valid = tok_ok[:, None] & cls_ok[None, :]

        c_offs = b * c_sb + k[None, :] * c_sk + n[:, None] * c_sn
        lp = tl.load(cond_ptr + c_offs, mask=valid, other=0.0).to(tl.float32)
        if GUIDED:
            s = tl.load(scale_ptr + b * scale_bstride)
            u_offs = b * u_sb + k[None, :] * u_sk + n[:, None] * u_sn
            u = tl.load(uncond_ptr + u_offs, mask=valid, other=0.0).to(tl.float32)
            lp = u + s * (lp - u)
            lp = lp - _logsumexp(lp, valid, PRECISE)[:, None]
        if TRUNCATE:
            lp = _truncate(lp, k, valid, tok_ok, M, index_bits, rate, PRECISE)
        lp = tl.where(lp < _CLAMP_MIN, _CLAMP_MIN, lp)  # keeps NaN, as torch.clamp

        row = coeffs_ptr + b * coeff_bstride
        if tl.load(row + _POSTERIOR) > 0.5:
            # q-posterior (VQDiffusionScheduler.q_posterior), the twin's operation order.
            x = tl.load(x_ptr + b * x_sb + n * x_sn, mask=tok_ok, other=0)
            masked = (x == M)[:, None]
            same = k[None, :] == x[:, None]
            cum = tl.where(masked, tl.load(row + _CUM_MASK),
                           tl.where(same, tl.load(row + _CUM_SAME), tl.load(row + _CUM_OTHER)))
            q = lp - cum
            norm = _logsumexp(q, valid, PRECISE)
            a = q - norm[:, None] + tl.load(row + _PREV_A)
            pb = tl.load(row + _PREV_B)
            # torch.logaddexp(a, pb), infinities of one sign included
            big = tl.where(a > pb, a, pb)
            q = big + _log1p(_exp(-tl.abs(a - pb), PRECISE), PRECISE)
            q = tl.where((tl.abs(a) == float("inf")) & (a == pb), a, q)
            step = tl.where(masked, tl.load(row + _STEP_MASK),
                            tl.where(same, tl.load(row + _STEP_SAME), tl.load(row + _STEP_OTHER)))
            out = q + step + norm[:, None]
            unmask = tl.where(x == M, 0.0, tl.load(row + _STEP_UNMASK))
            out_mask = tl.load(row + _PREV_C) + unmask + norm
        else:
            # The last step samples x0 itself; the mask class is impossible.
            out = lp
            out_mask = tl.full((BLOCK_N,), float("-inf"), tl.float32)

        # Gumbel-max, argmax as torch's: the first maximum, and a NaN counts as the maximum.
        v = out
        v_mask = out_mask
        if HAS_NOISE:
            z_offs = b * z_sb + k[None, :] * z_sk + n[:, None] * z_sn
            z = tl.load(noise_ptr + z_offs, mask=valid, other=0.5)
            v = -_log(-_log(z + _GUMBEL_EPS, PRECISE) + _GUMBEL_EPS, PRECISE) + out
            z_mask = tl.load(noise_ptr + b * z_sb + M * z_sk + n * z_sn, mask=tok_ok, other=0.5)
            v_mask = -_log(-_log(z_mask + _GUMBEL_EPS, PRECISE) + _GUMBEL_EPS, PRECISE) + out_mask
        is_nan = valid & (v != v)
        first_nan = tl.min(tl.where(is_nan, k[None, :], BLOCK_K), axis=1)
        v = tl.where(valid & ~is_nan, v, float("-inf"))
        best = tl.max(v, axis=1)
        best_k = tl.min(tl.where(valid & (v == best[:, None]), k[None, :], BLOCK_K), axis=1)
        best_k = tl.where(best_k == BLOCK_K, 0, best_k)  # every class NaN-free and -inf
        token = tl.where(v_mask > best, M, best_k)
        token = tl.where(v_mask != v_mask, M, token)
        token = tl.where(first_nan < BLOCK_K, first_nan, token)
        tl.store(tokens_ptr + b * N + n, token, mask=tok_ok)

        if WRITE_LOGP:
            base = logp_ptr + b * (M + 1) * N
            tl.store(base + k[None, :] * N + n[:, None], out, mask=valid)
            tl.store(base + M * N + n, out_mask, mask=tok_ok)


def _tile(num_codes: int, num_tokens: int) -> Tuple[int, int, int]:
    """(BLOCK_K, BLOCK_N, num_warps) for M codebook classes and N tokens."""
    block_k = max(16, triton.next_power_of_2(num_codes))
    block_n = max(1, min(_MAX_BLOCK_N, _TILE // block_k, triton.next_power_of_2(num_tokens)))
    elements = block_k * block_n
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_k, block_n, num_warps


def discrete_step_triton(
    x_t: Tensor,
    cond: Tensor,
    uncond: Optional[Tensor],
    guidance_scale: Optional[Tensor],
    coeffs: Tensor,
    noise: Optional[Tensor],
    truncation_rate: float,
    write_log_probs: bool,
) -> Tuple[Tensor, Tensor]:
    """One VQ-Diffusion step in one kernel; same contract as fastdiff.ops.reference.discrete_step."""
    if not AVAILABLE:
        raise RuntimeError(
            "discrete_step_triton: Triton is not installed; install fastdiff[triton] "
            "or use another backend"
        )
    check_discrete_step(x_t, cond, uncond, guidance_scale, coeffs, noise, truncation_rate)
    B, N = x_t.shape
    M = cond.shape[1]
    K = M + 1
    tokens = torch.empty((B, N), dtype=torch.int64, device=x_t.device)
    log_probs = torch.empty((B, K, N) if write_log_probs else (0,), dtype=torch.float32,
                            device=x_t.device)
    if B == 0 or N == 0:
        return tokens, log_probs
    if M > MAX_CLASSES or B > _MAX_GRID_Y:
        raise RuntimeError(
            f"discrete_step: {K} classes x {B} samples is too large for the Triton kernel (at most "
            f"{MAX_CLASSES + 1} classes and {_MAX_GRID_Y} samples); use the CUDA C++ kernel "
            "(build fastdiff._C with CUDA) or the reference backend"
        )

    guided = uncond is not None
    if guided:
        scale = guidance_scale.reshape(-1).contiguous()
        scale_bstride = 0 if scale.numel() == 1 else 1
        u, u_strides = uncond, uncond.stride()
    else:
        scale, scale_bstride, u, u_strides = coeffs, 0, cond, (0, 0, 0)
    coeffs = coeffs.contiguous()
    coeff_bstride = 0 if coeffs.shape[0] == 1 else coeffs.shape[1]
    z, z_strides = (noise, noise.stride()) if noise is not None else (cond, (0, 0, 0))
    truncate = float(truncation_rate) < 1.0

    block_k, block_n, num_warps = _tile(M, N)
    grid = (triton.cdiv(N, block_n), B)
    launch(
        _discrete_step_kernel, grid, x_t.device,
        x_t, cond, u, z, coeffs, scale, tokens, log_probs if write_log_probs else tokens,
        x_t.stride(0), x_t.stride(1), *cond.stride(), *u_strides, *z_strides,
        coeff_bstride, scale_bstride, M, N,
        float(truncation_rate) if truncate else 1.0,
        max(1, (M - 1).bit_length()),
        GUIDED=guided,
        HAS_NOISE=noise is not None,
        TRUNCATE=truncate,
        WRITE_LOGP=write_log_probs,
        PRECISE=not interpreting(),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return tokens, log_probs
