"""group_norm: fastdiff's fused op vs PyTorch's F.group_norm followed by the eager scale-shift
and SiLU, at Stable Diffusion 1.5 U-Net shapes (batch 2 = one classifier-free pair, 32 groups).

  fastdiff  fastdiff.ops.group_norm (C++ with OpenMP on CPU; CUDA C++ on a GPU)
  triton    the Triton kernels (GPU only)
  torch     F.group_norm, then y * (1 + scale) + shift where the case has them, then F.silu

Cases: the resnet norms of SD 1.5 at 64x64 latents (320 ch at 64x64, 640 at 32x32, 1280 at
16x16), the VAE-decoder-like 128 ch at 64x64, one channels-last case, and one ADM-style case
with per-sample scale and shift. CPU in float32 (a small set: it should finish in well under a
minute on 2 cores); CUDA in float16 where a GPU is present. Before timing, each side's output
must equal the twin's (fastdiff.ops.reference.group_norm) within the tolerance of its dtype.
Every side is timed the same way (timing.bench: rounds of back-to-back calls between CUDA
events on a GPU, the wall clock on the CPU; medians per call); GB/s in extra_info counts one
read of x and one write of y per call.

    pytest benchmarks/bench_group_norm.py --benchmark-only
    pytest benchmarks/bench_group_norm.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=median,min,rounds
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops import _library, reference
from fastdiff.ops.group_norm import group_norm
from timing import assert_varied, bench

GROUPS, EPS = 32, 1e-5
# (name, shape, channels_last, scale_shift)
CASES = [
    ("sd-down0", (2, 320, 64, 64), False, False),
    ("sd-down1", (2, 640, 32, 32), False, False),
    ("sd-mid", (2, 1280, 16, 16), False, False),
    ("vae-128", (2, 128, 64, 64), False, False),
    ("sd-down0-nhwc", (2, 320, 64, 64), True, False),
    ("adm-scale-shift", (2, 320, 32, 32), False, True),
]
ROUNDS = {"cpu": 30, "cuda": 30}


@functools.lru_cache(maxsize=None)
def make_case(shape, channels_last, scale_shift, device, dtype):
    gen = torch.Generator().manual_seed(0)
    B, C = shape[:2]
    x = torch.randn(shape, generator=gen).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = (1 + 0.1 * torch.randn(C, generator=gen)).to(device, dtype)
    bias = (0.1 * torch.randn(C, generator=gen)).to(device, dtype)
    scale = shift = None
    if scale_shift:
        scale = (0.5 * torch.randn(B, C, generator=gen)).to(device, dtype)
        shift = torch.randn(B, C, generator=gen).to(device, dtype)
    return x, weight, bias, scale, shift


def fastdiff_side(x, weight, bias, scale, shift):
    return group_norm(x, GROUPS, weight, bias, EPS, scale=scale, shift=shift, silu=True)


def triton_side(x, weight, bias, scale, shift):
    from fastdiff.ops.triton.group_norm import group_norm_triton
    return group_norm_triton(x, GROUPS, weight, bias, EPS, scale, shift, True)


def torch_side(x, weight, bias, scale, shift):
    y = F.group_norm(x, GROUPS, weight, bias, EPS)
    if scale is not None:
        y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(y)


IMPLS = {"fastdiff": fastdiff_side, "triton": triton_side, "torch": torch_side}


def _implementation(impl, device):
    if impl == "fastdiff":
        from fastdiff.ops.group_norm import implementation
        return implementation(device)
    return {"triton": "Triton", "torch": "PyTorch F.group_norm + eager scale-shift + F.silu"}[impl]


def _bench(benchmark, impl, case, device, dtype):
    name, shape, channels_last, scale_shift = case
    args = make_case(shape, channels_last, scale_shift, device, dtype)
    fn = IMPLS[impl]
    with torch.no_grad():
        got = fn(*args)
        want = reference.group_norm(args[0], GROUPS, *args[1:3], EPS, *args[3:], True)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # torch's own fp16 path rounds its intermediate results too
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert_varied(x=args[0], weight=args[1], bias=args[2], scale=args[3], shift=args[4])

    def run():
        with torch.no_grad():
            return fn(*args)

    traffic = 2 * args[0].numel() * args[0].element_size()
    bench(benchmark, run, device=device, rounds=ROUNDS[device], bytes_moved=traffic, dtype=str(dtype),
          shape=list(shape), layout="NHWC" if channels_last else "NCHW", scale_shift=scale_shift,
          implementation=_implementation(impl, device))


@pytest.mark.skipif(not _library.extension_loaded(), reason="fastdiff._C not built")
@pytest.mark.parametrize("impl", ["fastdiff", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_group_norm_cpu(benchmark, case, impl):
    benchmark.group = f"group_norm cpu fp32 {case[0]} {list(case[1])}"
    _bench(benchmark, impl, case, "cpu", torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["fastdiff", "triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_group_norm_cuda(benchmark, case, impl):
    if impl == "triton":
        pytest.importorskip("triton")
    benchmark.group = f"group_norm cuda fp16 {case[0]} {list(case[1])}"
    _bench(benchmark, impl, case, "cuda", torch.float16)
