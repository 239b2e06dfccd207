"""The Stable Diffusion 1.5 architecture on the CPU, fp32: diffusers vs fastdiff (PyTorch) vs
fastdiff's ONNX export in ONNX Runtime, in one run.

Random weights in SD 1.5's shapes (sd15_arch.py: UNet 860M parameters, CLIP ViT-L/14, the
SD VAE), 256 x 256 images (32 x 32 latents), 77 text tokens, torch's threads (ONNX Runtime
takes the same count, spinning off: fastdiff/loaders/onnx_folder.py).

  unet call   one UNet call on the CFG batch of 2: diffusers' UNet2DConditionModel, fastdiff's
              UNet, and the exported unet/model.onnx (weights in external data beside it,
              3.4 GB) through Pipeline.from_onnx's UNet; with the call's FLOPs
              (torch.utils.flop_counter) and so the fraction of the machine's fp32 peak reached
  generation  4 DPM-Solver++(2M) steps with guidance 7.5, text encoding and VAE decode
              included: diffusers' StableDiffusionPipeline, fastdiff generate(), and
              Pipeline.from_onnx(folder).generate()

Outputs are compared before anything is timed: fastdiff's UNet with diffusers' and ONNX
Runtime's with fastdiff's within float32's rounding of reordered sums (tests/tolerances.py's
fp32_bound, its terms counted on this call), the images within the bound the tests derive for
the pipelines (below).

    pytest benchmarks/bench_sd15_cpu.py --benchmark-only            (about 10 minutes on 2 cores)
    FASTDIFF_BENCH_SD15_TINY=1 pytest benchmarks/bench_sd15_cpu.py  (the harness on tiny models)
"""
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fastdiff  # noqa: E402
import fastdiff.export  # noqa: E402
import sd15_arch  # noqa: E402
from timing import assert_varied, bench  # noqa: E402
from tolerances import fp32_bound, reduction_terms  # noqa: E402

TINY = os.environ.get("FASTDIFF_BENCH_SD15_TINY") == "1"
SAMPLE_SIZE = 32  # latent pixels: 256 x 256 images
STEPS, SCALE = 4, 7.5
PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"
if TINY:
    ARCH = dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                          attention_head_dim=8, norm_num_groups=16,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8))
    SAMPLE_SIZE = 8
else:
    ARCH = {}
IMAGE_SIZE = SAMPLE_SIZE * 2 ** (len((ARCH.get("vae") or sd15_arch.VAE)["block_out_channels"]) - 1)
# Images in [0, 1] from pipelines whose every network agrees within float32's rounding (the
# UNet check above): bench_onnx_sd.py's and bench_pipeline_sd.py's bound, which a wrong
# coefficient or a 1% guidance error exceeds many times over.
IMAGE_ATOL = 2e-3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd15_arch.write_folder(str(tmp_path_factory.mktemp("sd15_cpu")), sample_size=SAMPLE_SIZE, **ARCH)


@pytest.fixture(scope="module")
def pipes(folder, tmp_path_factory):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = fastdiff.Pipeline.from_pretrained(folder)
    out = str(tmp_path_factory.mktemp("sd15_cpu_onnx"))
    manifest = fastdiff.export.onnx(ours, out)
    return ref, ours, fastdiff.Pipeline.from_onnx(out), manifest


def unet_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    dim = sd15_arch.MAX_TOKENS, (ARCH.get("unet") or sd15_arch.UNET)["cross_attention_dim"]
    x = torch.randn(2, 4, SAMPLE_SIZE, SAMPLE_SIZE, generator=gen)
    return x, torch.tensor([500]), torch.randn(2, *dim, generator=gen)


def unet_flops(unet, x, t, context) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, encoder_hidden_states=context)
    return float(counter.get_total_flops())


@pytest.fixture(scope="module")
def unet_outputs(pipes):
    """Each implementation's UNet output on the same inputs, compared once, and the bound."""
    ref, ours, onnx_pipe, _ = pipes
    x, t, context = unet_inputs()
    with torch.no_grad():
        want = ref.unet(x, t, encoder_hidden_states=context).sample
        mine = ours.unet(x, t, encoder_hidden_states=context)
        terms = reduction_terms(ours.unet, lambda: ours.unet(x, t, encoder_hidden_states=context))
    ort = onnx_pipe.unet(x, t, encoder_hidden_states=context)
    bound = fp32_bound(max(1.0, want.abs().max().item()), terms)
    errors = dict(fastdiff=(mine - want).abs().max().item(), onnxruntime=(ort - mine).abs().max().item())
    for name, err in errors.items():
        assert err <= bound, f"{name} UNet output is {err} off (bound {bound})"
    return errors, bound, unet_flops(ours.unet, x, t, context)


@pytest.mark.parametrize("impl", ["diffusers", "fastdiff", "onnxruntime"])
def test_sd15_unet_call_cpu_fp32(benchmark, pipes, unet_outputs, impl):
    ref, ours, onnx_pipe, _ = pipes
    errors, bound, flops = unet_outputs
    x, t, context = unet_inputs()
    assert_varied(x=x, context=context)
    benchmark.group = f"SD 1.5 UNet call cpu fp32 batch 2 (CFG) {SAMPLE_SIZE}x{SAMPLE_SIZE} latents"
    benchmark.extra_info.update(max_abs_error=errors.get(impl, 0.0), bound=bound, tiny=TINY,
                                against="diffusers" if impl == "fastdiff" else "fastdiff")
    unet = {"diffusers": lambda: ref.unet(x, t, encoder_hidden_states=context).sample,
            "fastdiff": lambda: ours.unet(x, t, encoder_hidden_states=context),
            "onnxruntime": lambda: onnx_pipe.unet(x, t, encoder_hidden_states=context)}[impl]

    def fn():
        with torch.no_grad():
            return unet()

    bench(benchmark, fn, device="cpu", rounds=3, calls=1, warmup_rounds=1, dtype="torch.float32", flops=flops,
          shape=dict(sample=list(x.shape), encoder_hidden_states=list(context.shape)))


def start_latents():
    return torch.randn(1, 4, SAMPLE_SIZE, SAMPLE_SIZE, generator=torch.Generator().manual_seed(0))


def run(impl, pipes, start):
    ref, ours, onnx_pipe, _ = pipes
    if impl == "diffusers":
        return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                   height=IMAGE_SIZE, width=IMAGE_SIZE, latents=start, output_type="pt").images
    pipe = ours if impl == "fastdiff" else onnx_pipe
    return pipe.generate(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                         sampler="dpmpp_2m", height=IMAGE_SIZE, width=IMAGE_SIZE, latents=start, output_type="pt",
                         progress=False)


@pytest.fixture(scope="module")
def images(pipes):
    start = start_latents()
    return {impl: run(impl, pipes, start) for impl in ("diffusers", "fastdiff", "onnxruntime")}


@pytest.mark.parametrize("impl", ["diffusers", "fastdiff", "onnxruntime"])
def test_sd15_generation_cpu_fp32(benchmark, pipes, images, impl):
    errors = dict(fastdiff=(images["fastdiff"] - images["diffusers"]).abs().max().item(),
                  onnxruntime=(images["onnxruntime"] - images["fastdiff"]).abs().max().item())
    for name, err in errors.items():
        assert err <= IMAGE_ATOL, f"{name} images are {err} off (bound {IMAGE_ATOL})"
    benchmark.group = f"SD 1.5 generation cpu fp32 {IMAGE_SIZE}px {STEPS} steps dpmpp_2m cfg {SCALE}"
    benchmark.extra_info.update(max_abs_error=errors.get(impl, 0.0), bound=IMAGE_ATOL, tiny=TINY)
    start = start_latents()
    bench(benchmark, lambda: run(impl, pipes, start), device="cpu", rounds=3, calls=1, warmup_rounds=0,
          dtype="torch.float32", steps=STEPS, size=IMAGE_SIZE, shape=dict(latents=list(start.shape)))
