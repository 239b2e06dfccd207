"""group_norm (GroupNorm + optional scale-shift + optional SiLU) as two Triton kernels; the
formula is in fastdiff/ops/group_norm.py and fastdiff.ops.reference.group_norm.

A group (b, g) is its D = C / G channels over the S spatial positions: N = D * S values.
They are read in memory order, for either layout:
  channels-first (contiguous x)  value i of the group lies at  b C S + g D S + i;
  channels-last  ([B, *spatial, C] in memory)  value i = s D + j lies at  (b S + s) C + g D + j.

1. _stats_kernel, grid (B * G, chunks): each program takes one chunk of a group, BLOCK values
   at a time, each block by the corrected two-pass formula (mean, then the sums of
   d = x - mean and d^2, in registers), and merges the blocks in float64 (Chan et al.).
   It writes the chunk's mean and M2 (float64).
2. _write_kernel, same grid: each program merges its group's chunk moments (at most
   MAX_CHUNKS of them) into mean and rstd, then writes its chunk:
   y = ((x - mean) rstd w + bias) (1 + scale) + shift, SiLU'd, in x's dtype.

Chunks are sized so a group has at most MAX_CHUNKS of them; every group of a U-Net is
spread over many programs. The host side only reads tensor metadata (no .item()), so a
call can be captured in a CUDA graph. Under TRITON_INTERPRET=1 the kernels run on CPU
tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE = triton is not None

BLOCK = 1024        # values per block: 8 per thread at 4 warps
MAX_CHUNKS = 1024   # chunks per group, merged by one vector load in the write kernel


if AVAILABLE:

    @triton.jit
    def _addresses(i, b, g, S, C, D, CHANNELS_LAST: tl.constexpr):
        """Offsets of the group's values i, and their channels."""
        if CHANNELS_LAST:
            s = i // D
            j = i - s * D
            return (b * S + s) * C + g * D + j, g * D + j
        else:
            return (b * C + g * D) * S + i, g * D + i // S

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, N, S, C, D, G, num_chunks,
                      CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        bg = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        b = bg // G
        g = bg - b * G
        start = k.to(tl.int64) * CHUNK
        end = tl.minimum(start + CHUNK, N)
        run_n = tl.zeros([], dtype=tl.float64)
        run_mean = tl.zeros([], dtype=tl.float64)
        run_m2 = tl.zeros([], dtype=tl.float64)
        # A static trip count (only the group's last chunk is short; its empty blocks
        # merge with weight 0).
        for first_in_chunk in range(0, CHUNK, BLOCK):
            first = start + first_in_chunk
            i = first + tl.arange(0, BLOCK)
            valid = i < end
            offs, _ = _addresses(i, b, g, S, C, D, CHANNELS_LAST)
            v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            nb = tl.minimum(tl.maximum(end - first, 0), BLOCK).to(tl.float64)
            n = tl.maximum(nb, 1.0).to(tl.float32)
            mu = tl.sum(v, axis=0) / n
            d = tl.where(valid, v - mu, 0.0)
            c1 = tl.sum(d, axis=0).to(tl.float64)
            c2 = tl.sum(d * d, axis=0).to(tl.float64)
            mean_b = mu.to(tl.float64) + c1 / n.to(tl.float64)
            m2_b = c2 - c1 * c1 / n.to(tl.float64)
            total = run_n + nb
            frac = nb / tl.maximum(total, 1.0)
            delta = mean_b - run_mean
            run_mean += delta * frac
            run_m2 += m2_b + delta * delta * (run_n * frac)
            run_n = total
        tl.store(mean_ptr + bg * num_chunks + k, run_mean)
        tl.store(m2_ptr + bg * num_chunks + k, run_m2)

    @triton.jit
    def _write_kernel(x_ptr, y_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, m2_ptr,
                      N, S, C, D, G, num_chunks, scale_bstride, shift_bstride, eps,
                      CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                      SILU: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                      CHUNKS: tl.constexpr):
        bg = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        b = bg // G
        g = bg - b * G
        # The group's moments from its chunks' (batch form of Chan et al.'s merge).
        ks = tl.arange(0, CHUNKS)
        kvalid = ks < num_chunks
        pm = tl.load(mean_ptr + bg * num_chunks + ks, mask=kvalid, other=0.0)
        pq = tl.load(m2_ptr + bg * num_chunks + ks, mask=kvalid, other=0.0)
        nk = tl.where(kvalid, tl.minimum(N - ks.to(tl.int64) * CHUNK, CHUNK), 0).to(tl.float64)
        total = tl.sum(nk, axis=0)  # N
        mean64 = tl.sum(nk * pm, axis=0) / total
        dev = tl.where(kvalid, pm - mean64, 0.0)
        m2 = tl.sum(pq + nk * dev * dev, axis=0)
        var = tl.maximum(m2 / total, 0.0)
        rstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
        mean = mean64.to(tl.float32)

        start = k.to(tl.int64) * CHUNK
        end = tl.minimum(start + CHUNK, N)
        for first_in_chunk in range(0, CHUNK, BLOCK):
            i = start + first_in_chunk + tl.arange(0, BLOCK)
            valid = i < end
            offs, c = _addresses(i, b, g, S, C, D, CHANNELS_LAST)
            v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            y = (v - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + c, mask=valid, other=1.0)
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + c, mask=valid, other=0.0)
            if HAS_SCALE:
                y = y * (1.0 + tl.load(scale_ptr + b * scale_bstride + c, mask=valid, other=0.0))
            if HAS_SHIFT:
                y = y + tl.load(shift_ptr + b * shift_bstride + c, mask=valid, other=0.0)
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)


def _as_float(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def group_norm_triton(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float, scale: Optional[Tensor], shift: Optional[Tensor],
                      silu: bool) -> Tensor:
    """GroupNorm [+ scale-shift] [+ SiLU] in two kernels; same contract as
    fastdiff.ops.reference.group_norm, output in x's dtype and layout."""
    if not AVAILABLE:
        raise RuntimeError(
            "group_norm_triton: Triton is not installed; install fastdiff[triton] or use another backend"
        )
    from ..group_norm import _check_args, _is_channels_last, _output_like

    _check_args(x, num_groups, weight, bias, scale, shift)
    out = _output_like(x)
    if out.numel() == 0:
        return out
    channels_last = not x.is_contiguous() and _is_channels_last(x)
    if not channels_last:
        x = x.contiguous()
    B, C = x.shape[0], x.shape[1]
    G = num_groups
    D = C // G
    S = x.numel() // (B * C)
    N = D * S
    blocks = triton.cdiv(N, BLOCK)
    chunk = BLOCK * triton.cdiv(blocks, MAX_CHUNKS)
    num_chunks = triton.cdiv(N, chunk)
    mean = torch.empty(B * G * num_chunks, dtype=torch.float64, device=x.device)
    m2 = torch.empty_like(mean)
    w, bi, sc, sh = (_as_float(t) for t in (weight, bias, scale, shift))
    dummy = mean  # any pointer for the operands a flag switches off
    grid = (B * G, num_chunks)
    _stats_kernel[grid](x, mean, m2, N, S, C, D, G, num_chunks,
                        CHANNELS_LAST=channels_last, BLOCK=BLOCK, CHUNK=chunk, num_warps=4)
    _write_kernel[grid](
        x, out, dummy if w is None else w, dummy if bi is None else bi,
        dummy if sc is None else sc, dummy if sh is None else sh, mean, m2,
        N, S, C, D, G, num_chunks,
        0 if sc is None or sc.shape[0] == 1 else C, 0 if sh is None or sh.shape[0] == 1 else C,
        float(eps),
        CHANNELS_LAST=channels_last, HAS_WEIGHT=w is not None, HAS_BIAS=bi is not None,
        HAS_SCALE=sc is not None, HAS_SHIFT=sh is not None, SILU=bool(silu),
        BLOCK=BLOCK, CHUNK=chunk, CHUNKS=triton.next_power_of_2(num_chunks), num_warps=4,
    )
    return out
