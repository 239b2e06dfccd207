"""Stable Diffusion end to end: fastdiff vs diffusers on the same small random pipeline.

The same folder, prompt, negative prompt and starting latents go to both; the images
are compared before anything is timed. 20 DPM-Solver++ steps with CFG, 128 x 128.

    pytest benchmarks/ --benchmark-only -k pipeline
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from sd_fixtures import make_pipeline, with_scheduler  # noqa: E402
from timing import bench  # noqa: E402

STEPS, SIZE = 20, 128


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_bench"))
    ref = with_scheduler(make_pipeline(folder, "sd1"), "dpmpp_2m")
    ours = fastdiff.Pipeline.from_pretrained(folder)
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    return ref, ours, latents


def run_diffusers(ref, latents):
    return ref("a red circle", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5,
               height=SIZE, width=SIZE, latents=latents.clone(), output_type="pt").images


def run_fastdiff(ours, latents):
    return ours.generate("a red circle", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5,
                         height=SIZE, width=SIZE, sampler="dpmpp_2m", latents=latents.clone(), output_type="pt",
                         progress=False)


@pytest.mark.parametrize("impl", ["fastdiff", "diffusers"])
def test_sd_pipeline_cpu_fp32(benchmark, pipes, impl):
    ref, ours, latents = pipes
    benchmark.group = f"sd pipeline cpu fp32 {SIZE}px {STEPS} steps dpmpp_2m cfg"
    got, want = run_fastdiff(ours, latents), run_diffusers(ref, latents)
    assert (got - want).abs().max().item() <= 2e-3
    fn = (lambda: run_fastdiff(ours, latents)) if impl == "fastdiff" else (lambda: run_diffusers(ref, latents))
    bench(benchmark, fn, device="cpu", rounds=5, calls=1, warmup_rounds=1, dtype="torch.float32", steps=STEPS,
          size=SIZE, shape=dict(latents=list(latents.shape)))
