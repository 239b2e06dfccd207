"""Stable Diffusion end to end: fastdiff vs diffusers on the same small random pipeline.

The same folder, prompt, negative prompt and starting latents go to both; the images
are compared before anything is timed. 20 DPM-Solver++ steps with CFG, 128 x 128.

  test_sd_pipeline_cpu_fp32           each pipeline on its own (pytest-benchmark's table)
  test_sd_pipeline_cpu_fp32_alternated  diffusers, fastdiff on the torch runtime and on the
                                      onnxruntime one (Pipeline.from_pretrained(...,
                                      runtime="onnxruntime")) in turn each round, with where a
                                      generation's time goes: the UNet calls, the text encoder,
                                      the VAE decoder (forward hooks), and the rest (the
                                      sampler's update, guidance, Python) per step

    pytest benchmarks/ --benchmark-only -k pipeline_sd -s
"""
import statistics
import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from sd_fixtures import make_pipeline, with_scheduler  # noqa: E402
from timing import alternate, bench  # noqa: E402

STEPS, SIZE = 20, 128
ATOL = 2e-3  # images in [0, 1]; a 1% guidance error or a wrong coefficient moves them far more


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_bench"))
    ref = with_scheduler(make_pipeline(folder, "sd1"), "dpmpp_2m")
    ours = fastdiff.Pipeline.from_pretrained(folder)
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    return ref, ours, latents, folder


def run_diffusers(ref, latents):
    return ref("a red circle", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5,
               height=SIZE, width=SIZE, latents=latents.clone(), output_type="pt").images


def run_fastdiff(ours, latents):
    return ours.generate("a red circle", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=7.5,
                         height=SIZE, width=SIZE, sampler="dpmpp_2m", latents=latents.clone(), output_type="pt",
                         progress=False)


@pytest.mark.parametrize("impl", ["fastdiff", "diffusers"])
def test_sd_pipeline_cpu_fp32(benchmark, pipes, impl):
    ref, ours, latents, _ = pipes
    benchmark.group = f"sd pipeline cpu fp32 {SIZE}px {STEPS} steps dpmpp_2m cfg"
    got, want = run_fastdiff(ours, latents), run_diffusers(ref, latents)
    assert (got - want).abs().max().item() <= ATOL
    fn = (lambda: run_fastdiff(ours, latents)) if impl == "fastdiff" else (lambda: run_diffusers(ref, latents))
    bench(benchmark, fn, device="cpu", rounds=5, calls=1, warmup_rounds=1, dtype="torch.float32", steps=STEPS,
          size=SIZE, shape=dict(latents=list(latents.shape)))


class Stopwatch:
    """Seconds spent inside the given modules' forward calls (hooks), per module name."""

    def __init__(self, **modules):
        self.spent = dict.fromkeys(modules, 0.0)
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._start(name)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._stop(name)))

    def _start(self, name):
        self.began = time.perf_counter()

    def _stop(self, name):
        self.spent[name] += time.perf_counter() - self.began

    def remove(self):
        for h in self.handles:
            h.remove()


def breakdown(run, modules, runs: int = 3) -> dict:
    """{part: seconds} of a run, the median over `runs`: each module's forward time and the rest."""
    samples = []
    for _ in range(runs):
        watch = Stopwatch(**modules)
        try:
            start = time.perf_counter()
            run()
            total = time.perf_counter() - start
        finally:
            watch.remove()
        samples.append(dict(watch.spent, rest=total - sum(watch.spent.values()), total=total))
    return {part: statistics.median(s[part] for s in samples) for part in samples[0]}


def test_sd_pipeline_cpu_fp32_alternated(benchmark, pipes, tmp_path_factory):
    ref, ours, latents, folder = pipes
    onnx_pipe = fastdiff.Pipeline.from_pretrained(folder, runtime="onnxruntime", progress=False,
                                                  cache_dir=str(tmp_path_factory.mktemp("sd_bench_cache")))
    runs = {"diffusers": lambda: run_diffusers(ref, latents), "fastdiff": lambda: run_fastdiff(ours, latents),
            "onnxruntime": lambda: run_fastdiff(onnx_pipe, latents)}
    want = runs["diffusers"]()
    errors = {name: (run() - want).abs().max().item() for name, run in runs.items()}
    assert max(errors.values()) <= ATOL, errors
    benchmark.group = f"sd pipeline cpu fp32 {SIZE}px {STEPS} steps dpmpp_2m cfg, alternated"
    times = alternate(benchmark, runs, rounds=7)
    median = {name: statistics.median(v) for name, v in times.items()}
    parts = {"diffusers": breakdown(runs["diffusers"], dict(unet=ref.unet, text_encoder=ref.text_encoder,
                                                            vae=ref.vae.decoder)),
             "fastdiff": breakdown(runs["fastdiff"], dict(unet=ours.unet, text_encoder=ours.text_encoder,
                                                          vae=ours.vae.decoder))}
    rows = []
    for name in runs:
        p = parts.get(name)
        split = (f"{p['unet'] * 1e3:.0f} / {p['text_encoder'] * 1e3:.0f} / {p['vae'] * 1e3:.0f} / "
                 f"{p['rest'] / STEPS * 1e3:.2f}" if p else "not split (graphs)")
        rows.append(f"| {name} | {median[name] * 1e3:.1f} ms | {median['diffusers'] / median[name]:.2f}x | {split} | "
                    f"{errors[name]:.1e} |")
    table = "\n".join(["| pipeline | median | vs diffusers | UNet / text / VAE ms, rest per step ms | "
                       "max abs image error |", "|---|---|---|---|---|"] + rows)
    benchmark.extra_info.update(errors=errors, bound=ATOL, breakdown=parts, table=table, dtype="torch.float32",
                                steps=STEPS, size=SIZE)
    print(f"\n{benchmark.group}\n{table}")
