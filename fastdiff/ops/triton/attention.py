"""Flash-style attention forward as one Triton kernel.

One program owns BLOCK_M queries of one (batch, head) and streams the keys and values
in tiles of BLOCK_N, keeping a running maximum and sum of the softmax (online softmax),
so no Lq x Lk matrix ever exists in memory. Accumulation is float32 whatever the
storage dtype; the probabilities are cast to V's dtype for the second product, as every
flash kernel does. (Triton's CPU interpreter cannot multiply bf16 tiles, so there, and only
there, bf16 tiles are widened to fp32 before each product; the roundings are the same.)

Head dimensions that are not a power of two (SD 1.5's 40/80/160, VQ-Diffusion's 88)
are split into two power-of-two parts D0 + D1 instead of being padded to the next
power of two: 80 = 64 + 16 and 160 = 128 + 32 exactly, 40 -> 32 + 16 and 88 -> 64 + 32
with a few padded lanes. The products q.k over the two parts add up; P.v writes two
accumulators. Padding 80 to 128 would waste 37% of the tensor-core work.

Short key sequences (cross-attention to 77 CLIP or 128 GLIDE tokens) fit on chip in one
tile: the loop then runs once and needs no rescaling.

Inputs may have any strides (views of a fused projection, transposed heads); the output
is written as [B, Lq, H, D] memory and returned as a [B, H, Lq, D] view, so the caller's
``transpose(1, 2).flatten(2)`` back to tokens is free. The host side reads only
metadata (no .item(), no copies to the host), so a call can be captured in a CUDA graph.
"""
from __future__ import annotations

import itertools
import os
import warnings
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from .._checks import check_attention
from ._launch import interpreting, is_out_of_resources, launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE = triton is not None

MAX_HEAD_DIM = 256
_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535
_LOG2E = 1.4426950408889634


def split_head_dim(d: int) -> Tuple[int, int]:
    """Two power-of-two tile widths (D0, D1), D1 = 0 or >= 16, covering d with least padding."""
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dimension {d} is outside 1..{MAX_HEAD_DIM}")
    d0 = max(16, 1 << (d.bit_length() - 1))  # the largest power of two <= d (tl.dot needs >= 16)
    if d0 >= d:
        return d0, 0
    rest = d - d0
    d1 = max(16, 1 << (rest - 1).bit_length())
    if d1 >= d0:  # e.g. 250 = 128 + 122 -> 128 + 128 would equal padding to 256
        return 2 * d0, 0
    return d0, d1


Config = Tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


# Register budget of a 16-bit tile (see launch_config), in values per program: BLOCK_M x
# (width + BLOCK_N). Read off ptxas for sm_90 (python -m fastdiff.tools.triton_resources, every
# family shape and tile): below 128 x 120 four warps hold a tile without spilling (64 x 256,
# d = 128 against a 128-key tile, spills), up to 128 x 208 eight warps do. Query tiles of 32
# rows spill at wide heads whatever the warps (Triton lays the warps along the keys then), so
# 16-bit tiles keep 64 or 128 rows. A wide head dim split with padded lanes (88 = 64 + 32)
# needs masked loads and more registers: at most 64 x 64 with eight warps (40 = 32 + 16 is
# narrow enough not to).
_FOUR_WARPS_MAX = 128 * 120
_EIGHT_WARPS_MAX = 128 * 208
_MIN_ROWS_16BIT = 64


def _footprint(block_m: int, block_n: int, width: int) -> int:
    return block_m * (width + block_n)


def _padded_wide(d0: int, d1: int, d: int) -> bool:
    """A head dim wider than 64 split into parts with padded lanes (88 = 64 + 32)."""
    return d != d0 + d1 and d0 + d1 > 64


def _warps_and_stages(block_m: int, block_n: int, d0: int, d1: int, d: int, lk: int,
                      dtype: torch.dtype) -> Tuple[int, int]:
    one_tile = lk <= block_n
    if dtype == torch.float32:
        return 4, 1 if one_tile else 2
    width = d0 + d1
    heavy = _padded_wide(d0, d1, d) or _footprint(block_m, block_n, width) >= _FOUR_WARPS_MAX
    num_warps = 8 if heavy else 4
    return num_warps, 1 if one_tile else (3 if width <= 128 else 2)


def _max_tiles(d0: int, d1: int, d: int, dtype: torch.dtype) -> Tuple[int, int]:
    """The largest BLOCK_M and BLOCK_N a problem of this head dim and dtype may use."""
    width = d0 + d1
    if dtype == torch.float32:  # IEEE products on CUDA cores: a 32 x 32 tile of a wide head spills
        return (32, 32) if width <= 128 else (16, 16)
    if _padded_wide(d0, d1, d):
        return 64, 64
    return (128, 128) if width <= 128 else (64, 64)


def launch_config(lq: int, lk: int, d0: int, d1: int, dtype: torch.dtype = torch.float16,
                  d: Optional[int] = None) -> Config:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a problem (head dim d = split d0 + d1,
    maybe with padded lanes; d defaults to d0 + d1).

    Chosen to fit sm_80/sm_90 (shared memory, and no register spills for 16-bit tiles);
    fastdiff/tools/triton_resources.py compiles every choice for the shapes of the three
    model families ahead of time and the suite holds them to sm_90's limits. Not yet
    tuned for speed on a GPU (benchmarks/RESULTS.md).

    16-bit: a key sequence that fits one tile (CLIP's 77, GLIDE's 128) is loaded once, so
    nothing is pipelined (one stage); longer keys stream in tiles of 64 (32 for head widths
    above 128), pipelined over 3 (2) stages. The warps follow the tile's register
    footprint (_FOUR_WARPS_MAX): 4 warps spill a 128 x 128 score tile (255 registers).
    fp32: products run on CUDA cores in IEEE fp32 and every operand tile is held in
    registers, so the tiles are 32 x 32 (16 x 16 for heads wider than 128); ops.attention
    serves fp32 on CUDA with SDPA by default (see fastdiff/ops/attention.py) and this kernel
    only when the "triton" backend asks for it. Under the interpreter the tile sizes only
    change how many numpy products run.
    """
    d = d0 + d1 if d is None else d
    width = d0 + d1
    max_m, max_n = _max_tiles(d0, d1, d, dtype)
    block_m = min(max_m, _pow2_at_least(lq))
    if dtype == torch.float32:
        block_n = min(max_n, _pow2_at_least(lk))
    elif lk <= max_n:
        block_n = _pow2_at_least(lk)
    else:
        block_n = 64 if width <= 128 else 32
    while dtype != torch.float32 and _footprint(block_m, block_n, width) > _EIGHT_WARPS_MAX and \
            block_m > _MIN_ROWS_16BIT:
        block_m //= 2
    return (block_m, block_n) + _warps_and_stages(block_m, block_n, d0, d1, d, lk, dtype)


def tune_candidates(lq: int, lk: int, d0: int, d1: int, dtype: torch.dtype = torch.float16,
                    d: Optional[int] = None) -> Tuple[Config, ...]:
    """The configs tune() times for a problem: the heuristic's first, then its tiles halved
    or doubled within the same bounds (_max_tiles, 64-row minimum for 16-bit, the
    eight-warp register budget), with the warps the rule gives and, where it gives 4,
    with 8 as well. fastdiff.tools.triton_resources compiles every one of them for sm_90."""
    d = d0 + d1 if d is None else d
    base = launch_config(lq, lk, d0, d1, dtype, d)
    block_m, block_n = base[:2]
    width = d0 + d1
    max_m, max_n = _max_tiles(d0, d1, d, dtype)
    min_m = 16 if dtype == torch.float32 else _MIN_ROWS_16BIT
    ms = {min(m, _pow2_at_least(lq)) for m in (block_m // 2, block_m, block_m * 2) if min_m <= m <= max_m}
    ns = {n for n in (block_n // 2, block_n, block_n * 2) if 16 <= n <= min(max_n, _pow2_at_least(lk))}
    out = [base]
    for m, n in itertools.product(sorted(ms), sorted(ns)):
        if dtype != torch.float32 and _footprint(m, n, width) > _EIGHT_WARPS_MAX:
            continue
        warps, stages = _warps_and_stages(m, n, d0, d1, d, lk, dtype)
        for w in ((4, 8) if dtype != torch.float32 and warps == 4 else (warps,)):
            if (m, n, w, stages) not in out:
                out.append((m, n, w, stages))
    return tuple(out)


def fallback_configs(config: Config) -> Tuple[Config, ...]:
    """Smaller tilings to retry when a launch does not fit the GPU at hand, last to first
    resort: the key tile halved, then the query tile, down to 16 x 16 with one stage."""
    block_m, block_n, num_warps, _ = config
    out = []
    while block_m > 16 or block_n > 16:
        if block_n >= block_m and block_n > 16:
            block_n //= 2
        else:
            block_m //= 2
        out.append((block_m, block_n, 4 if block_m * block_n < 128 * 128 else num_warps, 1))
    return tuple(out)


# Configs measured fastest by tune(), or found to fit after a launch failed, per
# (Lq, Lk, D, dtype, masked); launch_config's heuristic serves shapes not in it.
# FASTDIFF_ATTENTION_AUTOTUNE=1 tunes each new shape on its first call (never during a
# CUDA graph capture, where timing is impossible: the heuristic serves it then).
_tuned: Dict[tuple, Config] = {}
_AUTOTUNE = os.environ.get("FASTDIFF_ATTENTION_AUTOTUNE", "0").strip() not in ("", "0")
_warned: set = set()


def _tune_key(q: Tensor, k: Tensor, masked: bool) -> tuple:
    return (q.shape[2], k.shape[2], q.shape[3], q.dtype, masked)


def _should_tune(q: Tensor) -> bool:
    return _AUTOTUNE and q.is_cuda and not torch.cuda.is_current_stream_capturing()


def tune(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
         candidates: Optional[Iterable[Config]] = None) -> Config:
    """Time every candidate launch config (tune_candidates by default) on these operands (a
    GPU only), remember the fastest for their shape, and return it. Configs the GPU cannot
    run are skipped. It synchronises the device: call it before a run, not inside a
    captured step."""
    if not q.is_cuda:
        raise RuntimeError("attention tuning times kernels on a GPU; these operands are on "
                           f"{q.device}")
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("attention tuning cannot run inside a CUDA graph capture; tune before capturing")
    if candidates is None:
        candidates = tune_candidates(q.shape[2], k.shape[2], *split_head_dim(q.shape[3]), q.dtype, q.shape[3])
    best, best_ms = None, float("inf")
    for config in candidates:
        try:
            ms = triton.testing.do_bench(
                lambda: attention_triton(q, k, v, key_padding_mask, config=config, fallback=False),
                warmup=5, rep=20)
        except Exception as exc:  # noqa: BLE001  (OutOfResources moved between Triton versions)
            if is_out_of_resources(exc):
                continue
            raise
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError("attention tuning: no candidate config ran on this GPU")
    _tuned[_tune_key(q, k, key_padding_mask is not None)] = best
    return best


def tuned_configs() -> Dict[tuple, Config]:
    """What tune() found so far (for benchmarks and for making the heuristic better)."""
    return dict(_tuned)


if AVAILABLE:

    @triton.jit
    def _attention_fwd(
        Q, K, V, O, MASK,
        s_qb, s_qh, s_qm, s_qd,
        s_kb, s_kh, s_kn, s_kd,
        s_vb, s_vh, s_vn, s_vd,
        s_ob, s_oh, s_om, s_od,
        s_mb, s_mn,
        H, LQ, LK, qk_scale,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        Q += b * s_qb + h * s_qh
        K += b * s_kb + h * s_kh
        V += b * s_vb + h * s_vh
        O += b * s_ob + h * s_oh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, D0)
        row_ok = offs_m < LQ
        d0_ok = offs_d0 < D
        q0 = tl.load(Q + offs_m[:, None] * s_qm + offs_d0[None, :] * s_qd,
                     mask=row_ok[:, None] & d0_ok[None, :], other=0.0)
        if UPCAST:
            q0 = q0.to(tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        if D1 > 0:
            offs_d1 = D0 + tl.arange(0, D1)
            d1_ok = offs_d1 < D
            q1 = tl.load(Q + offs_m[:, None] * s_qm + offs_d1[None, :] * s_qd,
                         mask=row_ok[:, None] & d1_ok[None, :], other=0.0)
            if UPCAST:
                q1 = q1.to(tl.float32)
            acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        for start_n in range(0, LK, BLOCK_N):
            offs_n = start_n + offs_n0
            col_ok = offs_n < LK
            # K tile loaded transposed, [D0, BLOCK_N], for q @ k^T.
            if EVEN_KV:
                k0 = tl.load(K + offs_n[None, :] * s_kn + offs_d0[:, None] * s_kd)
            else:
                k0 = tl.load(K + offs_n[None, :] * s_kn + offs_d0[:, None] * s_kd,
                             mask=col_ok[None, :] & d0_ok[:, None], other=0.0)
            if UPCAST:
                k0 = k0.to(tl.float32)
            if IEEE:
                s = tl.dot(q0, k0, input_precision="ieee")
            else:
                s = tl.dot(q0, k0)
            if D1 > 0:
                if EVEN_KV:
                    k1 = tl.load(K + offs_n[None, :] * s_kn + offs_d1[:, None] * s_kd)
                else:
                    k1 = tl.load(K + offs_n[None, :] * s_kn + offs_d1[:, None] * s_kd,
                                 mask=col_ok[None, :] & d1_ok[:, None], other=0.0)
                if UPCAST:
                    k1 = k1.to(tl.float32)
                if IEEE:
                    s += tl.dot(q1, k1, input_precision="ieee")
                else:
                    s += tl.dot(q1, k1)
            s = s * qk_scale
            if HAS_MASK:
                keep = tl.load(MASK + b * s_mb + offs_n * s_mn, mask=col_ok, other=0)
                s = tl.where((col_ok & (keep != 0))[None, :], s, float("-inf"))
            elif not EVEN_N:
                s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no attendable key so far keeps m = -inf; subtract 0 instead so
            # that exp2 gives 0 rather than NaN.
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_base)
            p = tl.exp2(s - m_base[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

            if EVEN_KV:
                v0 = tl.load(V + offs_n[:, None] * s_vn + offs_d0[None, :] * s_vd)
            else:
                v0 = tl.load(V + offs_n[:, None] * s_vn + offs_d0[None, :] * s_vd,
                             mask=col_ok[:, None] & d0_ok[None, :], other=0.0)
            p_v = p.to(v0.dtype)
            if UPCAST:
                v0 = v0.to(tl.float32)
                p_v = p_v.to(tl.float32)
            if IEEE:
                acc0 = acc0 * alpha[:, None] + tl.dot(p_v, v0, input_precision="ieee")
            else:
                acc0 = acc0 * alpha[:, None] + tl.dot(p_v, v0)
            if D1 > 0:
                if EVEN_KV:
                    v1 = tl.load(V + offs_n[:, None] * s_vn + offs_d1[None, :] * s_vd)
                else:
                    v1 = tl.load(V + offs_n[:, None] * s_vn + offs_d1[None, :] * s_vd,
                                 mask=col_ok[:, None] & d1_ok[None, :], other=0.0)
                if UPCAST:
                    v1 = v1.to(tl.float32)
                if IEEE:
                    acc1 = acc1 * alpha[:, None] + tl.dot(p_v, v1, input_precision="ieee")
                else:
                    acc1 = acc1 * alpha[:, None] + tl.dot(p_v, v1)

        # Queries whose keys are all masked out have acc = 0 and l = 0: they get zeros,
        # as the twin gives.
        inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
        out0 = acc0 * inv_l[:, None]
        tl.store(O + offs_m[:, None] * s_om + offs_d0[None, :] * s_od, out0.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d0_ok[None, :])
        if D1 > 0:
            out1 = acc1 * inv_l[:, None]
            tl.store(O + offs_m[:, None] * s_om + offs_d1[None, :] * s_od, out1.to(O.dtype.element_ty),
                     mask=row_ok[:, None] & d1_ok[None, :])


def check_supported(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the kernel cannot serve these operands, or None when it can."""
    if not AVAILABLE:
        return "Triton is not installed"
    if q.dtype not in _STORAGE_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (needs one of fp32/fp16/bf16 for all three)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dimension {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        return f"batch x heads = {q.shape[0] * q.shape[1]} > {_MAX_GRID_Y}"
    return None


def attention_triton(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                     scale: Optional[float] = None, out: Optional[Tensor] = None,
                     config: Optional[Config] = None, fallback: bool = True) -> Tensor:
    """softmax(q k^T * scale) v for [B, H, L, D] operands of any strides; mask [B, Lk], True = keep.

    ``out``: an optional [B, H, Lq, D] tensor of q's dtype (any strides) to write into;
    by default a new one is made with [B, Lq, H, D] memory. ``config``: (BLOCK_M, BLOCK_N,
    num_warps, num_stages) instead of the tuned or heuristic one. The arguments are checked
    as ``fastdiff.ops.attention`` checks them (fastdiff/ops/_checks.py).

    A launch the GPU refuses for resources (a config too large for this GPU's shared
    memory or registers) is retried with smaller tiles (``fallback_configs``), with one
    warning per shape, and the config that ran is remembered for the shape; with
    ``fallback=False`` (tuning) the error propagates.
    """
    key_padding_mask = check_attention(q, k, v, key_padding_mask, scale)
    reason = check_supported(q, k, v)
    if reason is not None:
        raise RuntimeError(f"attention_triton: unsupported operands: {reason}")
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty((batch, lq, heads, d), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"attention_triton: out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if out.numel() == 0:
        return out
    if lk == 0:
        return out.zero_()
    d0, d1 = split_head_dim(d)
    key = _tune_key(q, k, key_padding_mask is not None)
    if config is None:
        config = _tuned.get(key)
    if config is None and _should_tune(q):
        config = tune(q, k, v, key_padding_mask)
    if config is None:
        config = launch_config(lq, lk, d0, d1, q.dtype, d)
    if key_padding_mask is not None:
        mask = key_padding_mask
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes, a dtype every Triton version loads
        mask_args = (mask, mask.stride(0), mask.stride(1))
    else:
        mask_args = (q, 0, 0)  # never read

    def run(config: Config) -> None:
        block_m, block_n, num_warps, num_stages = config
        grid = (triton.cdiv(lq, block_m), batch * heads)
        launch(
            _attention_fwd, grid, q.device,
            q, k, v, out, mask_args[0],
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), mask_args[1], mask_args[2],
            heads, lq, lk, scale * _LOG2E,
            D=d, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_MASK=key_padding_mask is not None, EVEN_N=lk % block_n == 0,
            EVEN_KV=lk % block_n == 0 and d == d0 + d1,
            IEEE=q.dtype == torch.float32, UPCAST=q.dtype == torch.bfloat16 and interpreting(),
            num_warps=num_warps, num_stages=num_stages,
        )

    try:
        run(config)
        return out
    except Exception as exc:  # noqa: BLE001
        if not fallback or not is_out_of_resources(exc):
            raise
        first_error = exc
    for smaller in fallback_configs(config):
        try:
            run(smaller)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_resources(exc):
                raise
            continue
        _tuned[key] = smaller
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"attention: launch config {config} does not fit this GPU ({first_error}); "
                          f"using {smaller} for Lq={lq}, Lk={lk}, D={d}, {q.dtype}", RuntimeWarning, stacklevel=3)
        return out
    raise first_error


def flops(batch: int, heads: int, lq: int, lk: int, d: int) -> float:
    """Floating-point operations of one forward (the two products), for TFLOP/s figures."""
    return 4.0 * batch * heads * lq * lk * d


__all__ = ["AVAILABLE", "MAX_HEAD_DIM", "attention_triton", "check_supported", "fallback_configs", "flops",
           "launch_config", "split_head_dim", "tune", "tune_candidates", "tuned_configs"]
