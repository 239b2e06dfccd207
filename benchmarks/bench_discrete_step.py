"""discrete_step (VQ-Diffusion's token step): fastdiff's fused op vs its eager twin vs diffusers.

One step t = 50 of 100 for B samples of N = 1024 tokens (a 32 x 32 grid) over K = 4097
classes (4096 codes + the mask), classifier-free guidance 5.0, truncation 0.86 and 1.0
(diffusers' default). The model output is one batch of 2B log-probs, split into the
unconditional and conditional halves as views, as VQDiffusionPipeline does. Each side does
the whole step from those halves to the next tokens, the draw of its Gumbel noise included:

  fastdiff   gumbel_uniform + fastdiff.ops.discrete_step (C++ on CPU; CUDA C++ on a GPU)
  triton     gumbel_uniform + the Triton kernel (GPU only)
  twin       gumbel_uniform + fastdiff.ops.reference.discrete_step (pure PyTorch)
  diffusers  VQDiffusionPipeline's log-space CFG and renormalisation, its truncate, clamp(-70),
             then VQDiffusionScheduler.step (which draws the same noise from the same generator)

Before timing, each side runs once from the same generator seed and its tokens must equal the
twin's (fastdiff's and Triton's log-probs too, to 1e-5). The log-probs are "model-like":
shared logits plus a small conditional difference that guidance amplifies; at 0.86 the
truncation keeps about 200 of the 4096 classes per token (recorded in extra_info). Every side
is timed the same way (timing.bench: rounds of back-to-back calls between CUDA events on a
GPU, the wall clock on the CPU; medians per call).

    pytest benchmarks/bench_discrete_step.py --benchmark-only
"""
import functools

import pytest
import torch

from fastdiff.ops import _library, reference
from fastdiff.ops.discrete_step import discrete_step
from fastdiff.sampling.discrete import discrete_step_rows, gumbel_uniform
from timing import assert_varied, bench

try:
    from diffusers import VQDiffusionPipeline, VQDiffusionScheduler
except ImportError:
    VQDiffusionPipeline = VQDiffusionScheduler = None

K, N, T, STEP, SCALE = 4097, 1024, 100, 50, 5.0
SEED = 1
LOGP_TOL = 1e-5
# Timed rounds per side on the CPU (after the equality run, which also warms up): the sides
# differ by 10x in cost, and each case should stay within a few seconds on a 2-core CPU.
# A step is 0.1-3 s there, so a round is one call. On a GPU every side gets CUDA_ROUNDS.
ROUNDS = {"fastdiff": 5, "triton": 5, "twin": 3, "diffusers": 2}
CUDA_ROUNDS = 20


@functools.lru_cache(maxsize=None)
def _inputs(B, device):
    gen = torch.Generator().manual_seed(B)
    base = torch.randn(B, K - 1, N, generator=gen) * 2.0
    halves = [base + 0.3 * torch.randn(B, K - 1, N, generator=gen) for _ in range(2)]
    model_output = torch.log_softmax(torch.cat(halves), 1).to(device)
    uncond, cond = model_output.chunk(2)
    x = torch.full((B, N), K - 1)
    x[:, ::2] = torch.randint(0, K - 1, (B, N // 2), generator=gen)  # half still masked
    return dict(x_t=x.to(device), cond=cond, uncond=uncond,
                guidance_scale=torch.tensor([SCALE], device=device),
                coeffs=discrete_step_rows(dict(num_vec_classes=K, num_train_timesteps=T),
                                          [STEP], device=device)[0])


def make_case(B, rate, device):
    return dict(_inputs(B, device), rate=rate)


def _kept_classes(case):
    """Per token, how many classes the truncation keeps (the twin's truncate)."""
    guided = case["uncond"] + SCALE * (case["cond"] - case["uncond"])
    guided = guided - guided.logsumexp(1, keepdim=True)
    return (reference.truncate_log_probs(guided, case["rate"]) > float("-inf")).sum(1).float()


def fastdiff_step(case, gen, write=False):
    B = case["x_t"].shape[0]
    noise = gumbel_uniform(B, K, N, False, gen, device=case["x_t"].device)
    return discrete_step(case["x_t"], case["cond"], case["uncond"], case["guidance_scale"],
                         coeffs=case["coeffs"], noise=noise, truncation_rate=case["rate"],
                         write_log_probs=write)


def triton_step(case, gen, write=False):
    from fastdiff.ops.triton.discrete_step import discrete_step_triton
    B = case["x_t"].shape[0]
    noise = gumbel_uniform(B, K, N, False, gen, device=case["x_t"].device)
    return discrete_step_triton(case["x_t"], case["cond"], case["uncond"], case["guidance_scale"],
                                case["coeffs"], noise, case["rate"], write)


def twin_step(case, gen, write=False):
    B = case["x_t"].shape[0]
    noise = gumbel_uniform(B, K, N, False, gen, device=case["x_t"].device)
    return reference.discrete_step(case["x_t"], case["cond"], case["uncond"],
                                   case["guidance_scale"], case["coeffs"], noise, case["rate"],
                                   write)


@functools.lru_cache(maxsize=None)
def _scheduler():
    return VQDiffusionScheduler(num_vec_classes=K, num_train_timesteps=T)


def diffusers_step(case, gen, write=False):
    """VQDiffusionPipeline.__call__'s loop body after the transformer, as written there."""
    uncond, cond = case["uncond"], case["cond"]
    model_output = uncond + SCALE * (cond - uncond)
    model_output -= torch.logsumexp(model_output, dim=1, keepdim=True)
    model_output = VQDiffusionPipeline.truncate(None, model_output, case["rate"])
    model_output = model_output.clamp(-70)
    tokens = _scheduler().step(model_output, timestep=STEP, sample=case["x_t"],
                               generator=gen).prev_sample
    return tokens, None


@functools.lru_cache(maxsize=None)
def _twin_result(B, rate, device):
    return twin_step(make_case(B, rate, device), _generator(device), write=True)


def _generator(device):
    return torch.Generator(device=device).manual_seed(SEED)


IMPLS = {"fastdiff": fastdiff_step, "triton": triton_step, "twin": twin_step,
         "diffusers": diffusers_step}


def _bench(benchmark, impl, B, rate, device):
    if impl == "diffusers" and VQDiffusionScheduler is None:
        pytest.skip("diffusers not installed")
    fn = IMPLS[impl]
    case = make_case(B, rate, device)
    want_tokens, want_logp = _twin_result(B, rate, device)
    got_tokens, got_logp = fn(case, _generator(device), write=True)
    assert torch.equal(got_tokens, want_tokens), f"{impl} tokens differ from the twin's"
    if impl in ("fastdiff", "triton"):
        torch.testing.assert_close(got_logp, want_logp, atol=LOGP_TOL, rtol=0)
    assert_varied(cond=case["cond"], uncond=case["uncond"], x_t=case["x_t"])
    kept = _kept_classes(case)
    gen = _generator(device)
    if device == "cuda":
        timing = dict(rounds=CUDA_ROUNDS)
    else:  # one call per round, and the equality run was the warm-up: no probe
        timing = dict(rounds=ROUNDS[impl], calls=1, warmup_rounds=0)
    bench(benchmark, lambda: fn(case, gen), device=device, **timing,
          dtype="float32", shape=dict(log_probs=[B, K - 1, N], tokens=[B, N]), B=B, N=N, K=K, guidance_scale=SCALE, truncation_rate=rate, t=STEP,
          kept_classes_median=kept.median().item(), implementation=_implementation(impl, device))


def _implementation(impl, device):
    if impl == "fastdiff":
        from fastdiff.ops.discrete_step import implementation
        return implementation(device)
    return {"triton": "Triton", "twin": "reference (PyTorch)", "diffusers": "diffusers 0.42.1 path"}[impl]


@pytest.mark.skipif(not _library.extension_loaded(), reason="fastdiff._C not built")
@pytest.mark.parametrize("rate", [0.86, 1.0])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("impl", ["fastdiff", "twin", "diffusers"])
def test_discrete_step_cpu(benchmark, impl, B, rate):
    benchmark.group = f"discrete_step cpu fp32 B={B} N={N} K={K} cfg trunc={rate}"
    _bench(benchmark, impl, B, rate, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rate", [0.86, 1.0])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("impl", ["fastdiff", "triton", "twin", "diffusers"])
def test_discrete_step_cuda(benchmark, impl, B, rate):
    if impl == "triton":
        pytest.importorskip("triton")
    benchmark.group = f"discrete_step cuda fp32 B={B} N={N} K={K} cfg trunc={rate}"
    _bench(benchmark, impl, B, rate, "cuda")
