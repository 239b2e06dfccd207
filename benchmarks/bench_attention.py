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

Each case first checks the output against the fp32 twin, then times; TFLOP/s is in
extra_info (4 * B * H * Lq * Lk * D per call).

    pytest benchmarks/bench_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.ops.reference import attention as twin
from fastdiff.ops.triton.attention import flops

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


IMPLS = {"fastdiff": ops.attention, "sdpa": F.scaled_dot_product_attention}
if CUDA:
    IMPLS["fastdiff-tuned"] = tuned
    IMPLS.update({f"sdpa-{n}": sdpa_backend(n) for n in ("flash", "efficient", "cudnn")})
else:
    IMPLS["math"] = lambda q, k, v: twin(q, k, v)


def make(lq, lk, d):
    gen = torch.Generator().manual_seed(lq + lk + d)
    # Projections give [B, L, H, D] memory; the models hand attention [B, H, L, D] views of it.
    q, k, v = (torch.randn(BATCH, n, HEADS, d, generator=gen).to(DEVICE, DTYPE).transpose(1, 2)
               for n in (lq, lk, lk))
    return q, k, v


def sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("lq, lk, d", CASES, ids=[f"{'self' if a == b else 'cross'}-Lq{a}-Lk{b}-d{d}"
                                                   for a, b, d in CASES])
def test_attention(benchmark, impl, lq, lk, d):
    q, k, v = make(lq, lk, d)
    fn = IMPLS[impl]
    try:
        out = fn(q, k, v)
    except RuntimeError as exc:  # an SDPA backend that does not take this shape or dtype
        pytest.skip(f"{impl}: {str(exc).splitlines()[0][:120]}")
    tol = 2e-3 if DTYPE == torch.float16 else 1e-5
    torch.testing.assert_close(out.float(), twin(q, k, v).float(), atol=tol, rtol=tol)

    def timed():
        fn(q, k, v)
        sync()

    benchmark.group = f"attention {DEVICE} {DTYPE} B{BATCH} H{HEADS} Lq{lq} Lk{lk} d{d}"
    benchmark.extra_info.update(impl=impl, device=torch.cuda.get_device_name() if CUDA else "cpu",
                                threads=torch.get_num_threads())
    benchmark.pedantic(timed, rounds=50 if CUDA else 5, warmup_rounds=5 if CUDA else 1)
    benchmark.extra_info["tflops"] = flops(BATCH, HEADS, lq, lk, d) / benchmark.stats.stats.median / 1e12
    if impl == "fastdiff-tuned":
        from fastdiff.ops.triton.attention import tuned_configs
        benchmark.extra_info["config"] = tuned_configs()[(lq, lk, d, DTYPE, False)]
