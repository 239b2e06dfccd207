"""guided_step (CFG combine + DPM-Solver++(2M) update) fused vs its eager PyTorch twin.

Each case first asserts the fused kernel equals the twin on the same inputs, then
times both in the same process with the same thread count, the same way (timing.bench:
rounds of back-to-back calls between CUDA events on a GPU, the wall clock on the CPU;
medians per call). Shapes are the sample x = B x C x H x W; the model output is the CFG
batch 2B x C x H x W, split in views. GB/s in extra_info counts the fused kernel's minimum
traffic: read x, cond, uncond and the history, write x_next and x0.

    pytest benchmarks/ --benchmark-only
"""
import pytest
import torch

from fastdiff.ops import _library, reference
from fastdiff.ops.guided_step import guided_step
from fastdiff.sampling import SchedulerConfig, steps as S
from timing import assert_varied, bench

SHAPES = [(2, 4, 64, 64), (2, 4, 128, 128), (2, 3, 256, 256)]
SD = SchedulerConfig.from_dict(dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    steps_offset=1, set_alpha_to_one=False))


def dpmpp_2m_case(shape, device, dtype):
    """A second-order DPM-Solver++ step from a real 25-step plan, with CFG at scale 7.5."""
    step = S.dpmpp_2m_plan(SD, 25).steps[10]
    gen = torch.Generator().manual_seed(0)
    b = shape[0]
    model_out = torch.randn(2 * b, *shape[1:], generator=gen).to(device, dtype)
    return dict(
        x=torch.randn(shape, generator=gen).to(device, dtype),
        cond=model_out[b:], uncond=model_out[:b],
        guidance_scale=torch.full((b,), 7.5, device=device),
        coeffs=torch.from_numpy(step.row).float()[None].to(device), noise=None,
        history=[torch.randn(shape, generator=gen).to(device, dtype)],
        clip_range=None, learned_variance=False, write_denoised=True,
    )


def fused(case):
    return guided_step(case["x"], case["cond"], case["uncond"], case["guidance_scale"],
                       coeffs=case["coeffs"], history=case["history"], write_denoised=True)


def eager(case):
    return reference.guided_step(*case.values())


def _bench(benchmark, impl, case, tol):
    got, want = impl(case), eager(case)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)
    x = case["x"]
    assert_varied(x=x, cond=case["cond"], uncond=case["uncond"], history=case["history"][0])
    traffic = (5 + len(case["history"])) * x.numel() * x.element_size()
    bench(benchmark, lambda: impl(case), device=x.device, rounds=30 if x.is_cuda else 20, bytes_moved=traffic,
          dtype=str(x.dtype), shape=list(x.shape))


@pytest.mark.skipif(not _library.extension_loaded(), reason="fastdiff._C not built")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fused_cpp", "eager_twin"])
def test_guided_step_cpu_fp32(benchmark, impl, shape):
    benchmark.group = f"guided_step cpu fp32 {'x'.join(map(str, shape))}"
    case = dpmpp_2m_case(shape, "cpu", torch.float32)
    _bench(benchmark, fused if impl == "fused_cpp" else eager, case, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fused", "triton", "eager_twin"])
def test_guided_step_cuda_fp16(benchmark, impl, shape):
    benchmark.group = f"guided_step cuda fp16 {'x'.join(map(str, shape))}"
    case = dpmpp_2m_case(shape, "cuda", torch.float16)
    if impl == "triton":
        from fastdiff.ops.triton.guided_step import guided_step_triton
        fn = lambda c: guided_step_triton(*c.values())  # noqa: E731
    else:
        fn = fused if impl == "fused" else eager
    _bench(benchmark, fn, case, 2e-3)
