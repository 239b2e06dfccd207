"""VQ-Diffusion end to end: fastdiff vs diffusers on the same small random pipeline.

The ITHQ model's token shapes scaled down for a CPU: a 32 x 32 token grid (1024 tokens) over
a 4096-entry codebook (K = 4097 classes with the mask), with a tiny transformer, so the
per-step work outside the model (guidance, truncation, posterior, sampling over
[2, 4097, 1024]) weighs as it does in the real model. 10 steps, guidance 5, truncation
0.86. Both pipelines get the same folder, prompt and generator; the images are compared
before anything is timed.

    pytest benchmarks/ --benchmark-only -k vq
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from vq_pipeline_fixtures import load_diffusers_pipeline, make_vq_components  # noqa: E402
from timing import bench  # noqa: E402

STEPS, CODES, GRID = 10, 4096, 32
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = make_vq_components(tmp_path_factory.mktemp("vq_bench"), learned=True, codes=CODES, grid=GRID,
                                heads=2, head_dim=8, layers=1, timesteps=STEPS)
    return load_diffusers_pipeline(folder), fastdiff.Pipeline.from_pretrained(folder)


def run_diffusers(ref):
    return ref(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, truncation_rate=0.86,
               generator=torch.Generator().manual_seed(0), output_type="np").images


def run_fastdiff(ours):
    return ours.generate(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, truncation_rate=0.86, seed=0,
                         output_type="np", progress=False)


@pytest.mark.parametrize("impl", ["fastdiff", "diffusers"])
def test_vq_pipeline_cpu_fp32(benchmark, pipes, impl):
    ref, ours = pipes
    benchmark.group = f"vq-diffusion pipeline cpu fp32 {GRID}x{GRID} tokens K={CODES + 1} {STEPS} steps cfg trunc"
    got, want = run_fastdiff(ours), run_diffusers(ref)
    assert abs(got - want).max() <= 1e-4
    fn = (lambda: run_fastdiff(ours)) if impl == "fastdiff" else (lambda: run_diffusers(ref))
    bench(benchmark, fn, device="cpu", rounds=3, calls=1, warmup_rounds=1, dtype="torch.float32", steps=STEPS,
          shape=dict(tokens=[GRID, GRID], classes=CODES + 1))
