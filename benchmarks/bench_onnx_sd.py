"""Stable Diffusion with its networks in ONNX Runtime (CPU) vs fastdiff's PyTorch modules vs
diffusers, on the same small random pipeline and on the built-in model.

The same folder, prompt, negative prompt and starting latents go to all three; the images
are compared before anything is timed (the ONNX pipeline against fastdiff's within the bound
of tests/test_export_onnx.py's kind, diffusers against fastdiff as in bench_pipeline_sd.py).
20 DPM-Solver++ steps with CFG, 128 x 128 (the random pipeline) and 64 x 64 (built-in).

    pytest benchmarks/bench_onnx_sd.py --benchmark-only
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fastdiff  # noqa: E402
import fastdiff.export  # noqa: E402
from bench_pipeline_sd import SIZE, STEPS, run_diffusers, run_fastdiff  # noqa: E402  (the same case)
from sd_fixtures import make_pipeline, with_scheduler  # noqa: E402
from timing import bench  # noqa: E402


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_onnx_bench"))
    ref = with_scheduler(make_pipeline(folder, "sd1"), "dpmpp_2m")
    ours = fastdiff.Pipeline.from_pretrained(folder)
    out = str(tmp_path_factory.mktemp("sd_onnx_bench_out"))
    fastdiff.export.onnx(ours, out)
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    return ref, ours, onnx_pipe, latents


@pytest.mark.parametrize("impl", ["onnxruntime", "fastdiff", "diffusers"])
def test_sd_pipeline_onnx_cpu_fp32(benchmark, pipes, impl):
    ref, ours, onnx_pipe, latents = pipes
    benchmark.group = f"sd pipeline cpu fp32 {SIZE}px {STEPS} steps dpmpp_2m cfg: onnx runtime vs torch"
    torch_images = run_fastdiff(ours, latents)
    # Bounds as the tests derive them for these models (tests/test_pipeline_sd.py, test_export_onnx.py).
    assert (run_fastdiff(onnx_pipe, latents) - torch_images).abs().max().item() <= 2e-3
    assert (run_diffusers(ref, latents) - torch_images).abs().max().item() <= 2e-3
    fn = {"onnxruntime": lambda: run_fastdiff(onnx_pipe, latents), "fastdiff": lambda: run_fastdiff(ours, latents),
          "diffusers": lambda: run_diffusers(ref, latents)}[impl]
    bench(benchmark, fn, device="cpu", rounds=5, calls=1, warmup_rounds=1, dtype="torch.float32", steps=STEPS,
          size=SIZE, shape=dict(latents=list(latents.shape)))


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    pipe = fastdiff.Pipeline()
    out = str(tmp_path_factory.mktemp("builtin_onnx"))
    fastdiff.export.onnx(pipe, out)
    return pipe, fastdiff.Pipeline.from_onnx(out)


@pytest.mark.parametrize("impl", ["onnxruntime", "fastdiff"])
def test_built_in_model_onnx_cpu_fp32(benchmark, built_in, impl):
    pipe, onnx_pipe = built_in
    benchmark.group = "built-in model cpu fp32 64px 20 steps dpmpp_2m guidance 3: onnx runtime vs torch"
    kw = dict(seed=0, output_type="pt", progress=False)
    assert (onnx_pipe.generate("a red circle", **kw) - pipe.generate("a red circle", **kw)).abs().max().item() <= 2e-3
    target = onnx_pipe if impl == "onnxruntime" else pipe
    bench(benchmark, lambda: target.generate("a red circle", **kw), device="cpu", rounds=5, calls=1,
          warmup_rounds=1, dtype="torch.float32", steps=20, size=64, shape=dict(batch=1))
