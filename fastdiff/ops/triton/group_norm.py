"""group_norm (GroupNorm + optional scale-shift + optional SiLU) as two Triton kernels; the
formula is in fastdiff/ops/group_norm.py and fastdiff.ops.reference.group_norm.

A group (b, g) is its D = C / G channels over the S spatial positions: N = D * S values.
In either layout it is a matrix of R rows of L contiguous values, rows RS apart:
  channels-first (contiguous x)  rows are channels:   R = D, L = S, RS = S,
                                 from (b C + g D) S; row r is channel g D + r;
  channels-last  ([B, *spatial, C] in memory)  rows are positions:  R = S, L = D, RS = C,
                                 from b S C + g D; column j is channel g D + j.
Both kernels walk it in 2-D tiles [BR rows, BL columns] (BL = the power of two that
covers L, up to BLOCK; BR = BLOCK / BL), so a value's channel is its tile row or column:
no integer division per value, and each tile row is a contiguous run for vector loads.

1. _stats_kernel, grid (B * G, row chunks, column chunks): each program takes one chunk,
   a rectangle of ROW_TILES x COL_TILES tiles, each tile by the corrected two-pass
   formula (mean, then the sums of d = x - mean and d^2, in registers), and merges the
   tiles in float64 (Chan et al.). It writes the chunk's count, mean and M2 (float64).
2. _write_kernel, same grid: each program merges its group's chunk moments (at most
   MAX_CHUNKS of them) into mean and rstd, then writes its chunk as
   y = (x - mean) a + o, a = rstd w (1 + scale), o = bias (1 + scale) + shift, SiLU'd,
   in x's dtype. The coefficients are computed once per tile row (channels-first) or
   tile column (channels-last) from the parameters as given: any float dtype, any
   strides, read in place and widened to float32 (no cast or copy per call).

Chunks are sized so a group has at most MAX_CHUNKS of them; every group of a U-Net is
spread over many programs. The host side only reads tensor metadata (no .item()), so a
call can be captured in a CUDA graph; launches go through fastdiff.ops.triton._launch
(on x's device). Under TRITON_INTERPRET=1 the kernels run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_group_norm
from .._layout import group_norm_output, is_channels_last
from ._launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE = triton is not None

BLOCK = 1024        # values per tile: 8 per thread at 4 warps
MAX_CHUNKS = 1024   # chunks per group, merged by one vector load in the write kernel


if AVAILABLE:

    @triton.jit
    def _group_base(bg, S, C, D, G, CHANNELS_LAST: tl.constexpr):
        """The offset of group bg's first value."""
        if CHANNELS_LAST:
            b = bg // G
            return b * S * C + (bg - b * G) * D
        else:
            return bg * D * S

    @triton.jit
    def _silu(y):
        """y / (1 + e^-y) without the IEEE division's slow path (a subroutine call, which
        costs a stack frame): an approximate quotient, then one correction step (Markstein),
        as in group_norm_cuda.cu. e^-y is capped at e^80 so that d and 1 / d stay normal;
        below y = -80 that gives y e^-80 instead of y e^y, both 0 to any tolerance."""
        d = 1.0 + tl.exp(tl.minimum(-y, 80.0))
        r = tl.fdiv(tl.full(y.shape, 1.0, tl.float32), d, ieee_rounding=False)
        q = y * r
        corrected = tl.fma(tl.fma(-d, q, y), r, q)
        return tl.where(tl.abs(q) == float("inf"), q, corrected)

    @triton.jit
    def _stats_kernel(x_ptr, part_ptr, part_stride, R, L, RS, S, C, D, G, num_chunks, col_chunks,
                      CHANNELS_LAST: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
                      ROW_TILES: tl.constexpr, COL_TILES: tl.constexpr):
        bg = tl.program_id(0).to(tl.int64)
        rc = tl.program_id(1)
        cc = tl.program_id(2)
        base = _group_base(bg, S, C, D, G, CHANNELS_LAST)
        row0 = rc.to(tl.int64) * (ROW_TILES * BR)
        col0 = cc.to(tl.int64) * (COL_TILES * BL)
        rows = tl.arange(0, BR)[:, None]
        cols = tl.arange(0, BL)[None, :]
        run_n = tl.zeros([], dtype=tl.float64)
        run_mean = tl.zeros([], dtype=tl.float64)
        run_m2 = tl.zeros([], dtype=tl.float64)
        # Static trip counts (only a group's last chunks are short; their empty tiles
        # merge with weight 0).
        for rt in range(ROW_TILES):
            for ct in range(COL_TILES):
                first_row = row0 + rt * BR
                first_col = col0 + ct * BL
                r = first_row + rows
                c = first_col + cols
                valid = (r < R) & (c < L)
                v = tl.load(x_ptr + base + r * RS + c, mask=valid, other=0.0).to(tl.float32)
                n_rows = tl.minimum(tl.maximum(R - first_row, 0), BR)
                n_cols = tl.minimum(tl.maximum(L - first_col, 0), BL)
                nb = (n_rows * n_cols).to(tl.float64)
                n = tl.maximum(nb, 1.0).to(tl.float32)
                mu = tl.sum(tl.sum(v, axis=1), axis=0) / n
                d = tl.where(valid, v - mu, 0.0)
                c1 = tl.sum(tl.sum(d, axis=1), axis=0).to(tl.float64)
                c2 = tl.sum(tl.sum(d * d, axis=1), axis=0).to(tl.float64)
                mean_b = mu.to(tl.float64) + c1 / n.to(tl.float64)
                m2_b = c2 - c1 * c1 / n.to(tl.float64)
                total = run_n + nb
                frac = nb / tl.maximum(total, 1.0)
                delta = mean_b - run_mean
                run_mean += delta * frac
                run_m2 += m2_b + delta * delta * (run_n * frac)
                run_n = total
        at = bg * num_chunks + rc * col_chunks + cc
        tl.store(part_ptr + at, run_n)
        tl.store(part_ptr + part_stride + at, run_mean)
        tl.store(part_ptr + 2 * part_stride + at, run_m2)

    @triton.jit
    def _coefficients(ch, mask, b, rstd, w_ptr, w_stride, bias_ptr, bias_stride,
                      scale_ptr, scale_bstride, scale_stride, shift_ptr, shift_bstride, shift_stride,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_SHIFT: tl.constexpr):
        """a, o of channels ch (of sample b): y = (x - mean) a + o."""
        a = tl.zeros(ch.shape, dtype=tl.float32) + rstd
        o = tl.zeros(ch.shape, dtype=tl.float32)
        if HAS_WEIGHT:
            a = a * tl.load(w_ptr + ch * w_stride, mask=mask, other=1.0).to(tl.float32)
        if HAS_BIAS:
            o = tl.load(bias_ptr + ch * bias_stride, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = 1.0 + tl.load(scale_ptr + b * scale_bstride + ch * scale_stride, mask=mask,
                              other=0.0).to(tl.float32)
            a = a * s
            o = o * s
        if HAS_SHIFT:
            o = o + tl.load(shift_ptr + b * shift_bstride + ch * shift_stride, mask=mask,
                            other=0.0).to(tl.float32)
        return a, o

    @triton.jit
    def _write_tile(x_ptr, y_ptr, base, r, c, R, L, RS, mean, a, o, SILU: tl.constexpr):
        """y = (x - mean) a + o [SiLU'd] over the tile of rows r and columns c of a group."""
        valid = (r < R) & (c < L)
        offs = base + r * RS + c
        v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        y = (v - mean) * a + o
        if SILU:
            y = _silu(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _write_kernel(x_ptr, y_ptr, w_ptr, w_stride, bias_ptr, bias_stride,
                      scale_ptr, scale_bstride, scale_stride, shift_ptr, shift_bstride, shift_stride,
                      part_ptr, part_stride, R, L, RS, S, C, D, G, num_chunks, col_chunks, eps,
                      CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                      SILU: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
                      ROW_TILES: tl.constexpr, COL_TILES: tl.constexpr, CHUNKS: tl.constexpr):
        bg = tl.program_id(0).to(tl.int64)
        rc = tl.program_id(1)
        cc = tl.program_id(2)
        b = bg // G
        g = bg - b * G
        # The group's moments from its chunks' (batch form of Chan et al.'s merge).
        ks = tl.arange(0, CHUNKS)
        kvalid = ks < num_chunks
        at = bg * num_chunks + ks
        nk = tl.load(part_ptr + at, mask=kvalid, other=0.0)
        pm = tl.load(part_ptr + part_stride + at, mask=kvalid, other=0.0)
        pq = tl.load(part_ptr + 2 * part_stride + at, mask=kvalid, other=0.0)
        total = tl.sum(nk, axis=0)  # N
        mean64 = tl.sum(nk * pm, axis=0) / total
        dev = tl.where(kvalid, pm - mean64, 0.0)
        m2 = tl.sum(pq + nk * dev * dev, axis=0)
        var = tl.maximum(m2 / total, 0.0)
        rstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
        mean = mean64.to(tl.float32)

        base = _group_base(bg, S, C, D, G, CHANNELS_LAST)
        row0 = rc.to(tl.int64) * (ROW_TILES * BR)
        col0 = cc.to(tl.int64) * (COL_TILES * BL)
        rows = tl.arange(0, BR)[:, None]
        cols = tl.arange(0, BL)[None, :]
        if CHANNELS_LAST:
            # Channels along the columns: coefficients once per column tile, rows stream past.
            for ct in range(COL_TILES):
                c = col0 + ct * BL + cols
                a, o = _coefficients(g * D + c, c < L, b, rstd, w_ptr, w_stride, bias_ptr,
                                     bias_stride, scale_ptr, scale_bstride, scale_stride,
                                     shift_ptr, shift_bstride, shift_stride,
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
                for rt in range(ROW_TILES):
                    _write_tile(x_ptr, y_ptr, base, row0 + rt * BR + rows, c, R, L, RS, mean, a, o, SILU)
        else:
            # One channel per row: coefficients once per row tile, columns stream past.
            for rt in range(ROW_TILES):
                r = row0 + rt * BR + rows
                a, o = _coefficients(g * D + r, r < R, b, rstd, w_ptr, w_stride, bias_ptr,
                                     bias_stride, scale_ptr, scale_bstride, scale_stride,
                                     shift_ptr, shift_bstride, shift_stride,
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
                for ct in range(COL_TILES):
                    _write_tile(x_ptr, y_ptr, base, r, col0 + ct * BL + cols, R, L, RS, mean, a, o, SILU)


def _geometry(R: int, L: int):
    """Tile shape [BR, BL] and chunking of an R x L group: (BR, BL, ROW_TILES, COL_TILES,
    row chunks, column chunks), with row chunks x column chunks <= MAX_CHUNKS."""
    BL = min(triton.next_power_of_2(L), BLOCK)
    BR = BLOCK // BL
    tiles_r, tiles_c = triton.cdiv(R, BR), triton.cdiv(L, BL)
    row_tiles = triton.cdiv(tiles_r, MAX_CHUNKS)
    row_chunks = triton.cdiv(tiles_r, row_tiles)               # <= MAX_CHUNKS
    split = max(1, min(tiles_c, MAX_CHUNKS // row_chunks))    # column chunks wanted
    col_tiles = triton.cdiv(tiles_c, split)
    col_chunks = triton.cdiv(tiles_c, col_tiles)               # <= split
    return BR, BL, row_tiles, col_tiles, row_chunks, col_chunks


def _per_channel(t: Optional[Tensor]):
    """(tensor or None, channel stride)."""
    return (None, 0) if t is None else (t, t.stride(0))


def _per_sample(t: Optional[Tensor]):
    """(tensor or None, sample stride (0 for one shared row), channel stride)."""
    if t is None:
        return None, 0, 0
    return t, (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def group_norm_triton(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float, scale: Optional[Tensor], shift: Optional[Tensor],
                      silu: bool) -> Tensor:
    """GroupNorm [+ scale-shift] [+ SiLU] in two kernels; same contract as
    fastdiff.ops.reference.group_norm, output in x's dtype and layout. The parameters are
    read as given (dtype and strides), nothing is cast."""
    if not AVAILABLE:
        raise RuntimeError(
            "group_norm_triton: Triton is not installed; install fastdiff[triton] or use another backend"
        )
    check_group_norm(x, num_groups, weight, bias, eps, scale, shift)
    out = group_norm_output(x)
    if out.numel() == 0:
        return out
    channels_last = not x.is_contiguous() and is_channels_last(x)
    if not channels_last:
        x = x.contiguous()
    B, C = x.shape[0], x.shape[1]
    G = num_groups
    D = C // G
    S = x.numel() // (B * C)
    R, L, RS = (S, D, C) if channels_last else (D, S, S)
    BR, BL, row_tiles, col_tiles, row_chunks, col_chunks = _geometry(R, L)
    num_chunks = row_chunks * col_chunks
    part = torch.empty(3 * B * G * num_chunks, dtype=torch.float64, device=x.device)
    part_stride = B * G * num_chunks
    w, w_stride = _per_channel(weight)
    bi, bias_stride = _per_channel(bias)
    sc, scale_bstride, scale_stride = _per_sample(scale)
    sh, shift_bstride, shift_stride = _per_sample(shift)
    dummy = part  # any pointer for the operands a flag switches off
    grid = (B * G, row_chunks, col_chunks)
    tiles = dict(BR=BR, BL=BL, ROW_TILES=row_tiles, COL_TILES=col_tiles)
    launch(_stats_kernel, grid, x.device, x, part, part_stride, R, L, RS, S, C, D, G, num_chunks,
           col_chunks, CHANNELS_LAST=channels_last, **tiles, num_warps=4)
    launch(_write_kernel, grid, x.device,
           x, out, dummy if w is None else w, w_stride, dummy if bi is None else bi, bias_stride,
           dummy if sc is None else sc, scale_bstride, scale_stride,
           dummy if sh is None else sh, shift_bstride, shift_stride,
           part, part_stride, R, L, RS, S, C, D, G, num_chunks, col_chunks, float(eps),
           CHANNELS_LAST=channels_last, HAS_WEIGHT=w is not None, HAS_BIAS=bi is not None,
           HAS_SCALE=sc is not None, HAS_SHIFT=sh is not None, SILU=bool(silu), **tiles,
           CHUNKS=triton.next_power_of_2(num_chunks), num_warps=4)
    return out
