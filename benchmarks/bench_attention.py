"""attention at Stable Diffusion 1.5's shapes: fastdiff.ops.attention vs torch's SDPA.

SD 1.5 at 512 x 512 with CFG: batch 2, 8 heads; self-attention over Lq = Lk = 4096, 1024,
256, 64 tokens with head dims 40, 80, 160, 160 (one per UNet level), and cross-attention
of the same queries to Lk = 77 text tokens.

  GPU (fp16): fastdiff's flash Triton kernel (with its heuristic launch config, and with the
              config tune() measures fastest, which extra_info records) vs SDPA's default
              choice and each of its backends (flash, memory-efficient, cuDNN) that accepts
              the shape
  CPU (fp32): fastdiff's CPU path (PyTorch's SDPA) vs the twin's math (matmul-softmax-
              matmul), on the smaller shapes only

Each case first checks the output against the fp32 twin, then times both sides the same
way (timing.bench: rounds of back-to-back calls between CUDA events on a GPU, the wall
clock on the CPU; medians per call). TFLOP/s is in extra_info (4 * B * H * Lq * Lk * D per
call, from the per-call median).

    pytest benchmarks/bench_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.ops.reference import attention as twin
from fastdiff.ops.triton.attention import flops
from timing import assert_varied, bench

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
BATCH, HEADS = 2, 8
LEVELS = [(4096, 40), (1024, 80), (256, 160), (64, 160)]
CASES = [(lq, lq, d) for lq, d in LEVELS] + [(lq, 77, d) for lq, d in LEVELS]
if not CUDA:  # a 2-core CPU: leave out the 4096-token self-attention (about 20 GFLOP a call)
    CASES = [c for c in CASES if c[0] * c[1] <= 1024 * 1024]


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def tuned(q, k, v):
    """The Triton kernel with the launch config tune() measured fastest for this shape."""
    from fastdiff.ops.triton import attention as kernel

    key = (q.shape[2], k.shape[2], q.shape[3], q.dtype, False)
    if key not in kernel.tuned_configs():
        kernel.tune(q, k, v)
    return kernel.attention_triton(q, k, v)


# Tests run impl by impl (every shape of one impl, then the next), so that under a time limit
# fastdiff vs SDPA's default is complete for every shape first; the tuned kernel goes last,
# as tune() compiles and times each of its candidate configs (tune_candidates) per shape.
IMPLS = {"fastdiff": ops.attention, "sdpa": F.scaled_dot_product_attention}
if CUDA:
    IMPLS.update({f"sdpa-{n}": sdpa_backend(n) for n in ("flash", "efficient", "cudnn")})
    IMPLS["fastdiff-tuned"] = tuned
else:
    IMPLS["math"] = lambda q, k, v: twin(q, k, v)


def make(lq, lk, d):
    gen = torch.Generator().manual_seed(lq + lk + d)
    # Projections give [B, L, H, D] memory; the models hand attention [B, H, L, D] views of it.
    q, k, v = (torch.randn(BATCH, n, HEADS, d, generator=gen).to(DEVICE, DTYPE).transpose(1, 2)
               for n in (lq, lk, lk))
    return q, k, v


@pytest.mark.parametrize("lq, lk, d", CASES, ids=[f"{'self' if a == b else 'cross'}-Lq{a}-Lk{b}-d{d}"
                                                   for a, b, d in CASES])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention(benchmark, impl, lq, lk, d):
    q, k, v = make(lq, lk, d)
    fn = IMPLS[impl]
    try:
        out = fn(q, k, v)
    except RuntimeError as exc:  # an SDPA backend that does not take this shape or dtype
        pytest.skip(f"{impl}: {str(exc).splitlines()[0][:120]}")
    tol = 2e-3 if DTYPE == torch.float16 else 1e-5
    torch.testing.assert_close(out.float(), twin(q, k, v).float(), atol=tol, rtol=tol)

    assert_varied(q=q, k=k, v=v)
    benchmark.group = f"attention {DEVICE} {DTYPE} B{BATCH} H{HEADS} Lq{lq} Lk{lk} d{d}"
    bench(benchmark, lambda: fn(q, k, v), device=DEVICE, rounds=30 if CUDA else 5,
          flops=flops(BATCH, HEADS, lq, lk, d), impl=impl, dtype=str(DTYPE), layout="BHLD views of BLHD",
          shape=dict(B=BATCH, H=HEADS, Lq=lq, Lk=lk, d=d))
    if impl == "fastdiff-tuned":
        from fastdiff.ops.triton.attention import tuned_configs
        benchmark.extra_info["config"] = tuned_configs()[(lq, lk, d, DTYPE, False)]


# fp32 on CUDA (fastdiff.ops.attention.FP32_ON_CUDA): SDPA serves it by default; the Triton
# kernel's fp32 path (IEEE products on CUDA cores, 32 x 32 tiles) runs under the "triton"
# backend. These two figures decide which should be the default.
FP32_CASES = [(1024, 1024, 80), (1024, 77, 80), (4096, 77, 40), (256, 256, 160)]


@pytest.mark.skipif(not CUDA, reason="the fp32 choice is a GPU question (the CPU runs SDPA for every dtype)")
@pytest.mark.parametrize("lq, lk, d", FP32_CASES, ids=[f"{'self' if a == b else 'cross'}-Lq{a}-Lk{b}-d{d}"
                                                         for a, b, d in FP32_CASES])
@pytest.mark.parametrize("impl", ["triton-fp32", "sdpa-fp32"])
def test_attention_fp32(benchmark, impl, lq, lk, d):
    from fastdiff.ops.triton.attention import attention_triton

    q, k, v = (t.float() for t in make(lq, lk, d))
    fn = attention_triton if impl == "triton-fp32" else F.scaled_dot_product_attention
    out = fn(q, k, v)
    torch.testing.assert_close(out, twin(q, k, v), atol=1e-5, rtol=1e-5)
    assert_varied(q=q, k=k, v=v)
    benchmark.group = f"attention {DEVICE} float32 B{BATCH} H{HEADS} Lq{lq} Lk{lk} d{d}"
    bench(benchmark, lambda: fn(q, k, v), device=DEVICE, rounds=20, flops=flops(BATCH, HEADS, lq, lk, d),
          impl=impl, dtype="torch.float32", shape=dict(B=BATCH, H=HEADS, Lq=lq, Lk=lk, d=d))
