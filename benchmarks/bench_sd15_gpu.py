"""The Stable Diffusion 1.5 architecture on a GPU: fastdiff vs diffusers eager fp16, in one run.

Random weights in SD 1.5's shapes (UNet 860M parameters, CLIP ViT-L/14 text encoder,
the SD VAE), 512 x 512 (64 x 64 latents), batch 1 with classifier-free guidance (UNet
calls of batch 2), 77 text tokens. Speed does not depend on the weights' values.

  unet step   one UNet call on the CFG batch: diffusers' UNet2DConditionModel (its default
              SDPA attention) vs fastdiff's UNet (flash Triton attention, fused GroupNorm,
              channels-last, fused q/k/v), eager and replayed from a CUDA graph
  generation  50 DPM-Solver++(2M) steps, text encoding and VAE decode included:
              diffusers' StableDiffusionPipeline vs fastdiff generate(), eager and with
              cuda_graph=True

Before timing: the UNet outputs are compared, and the images of both fp16 pipelines
are compared with diffusers' fp32 image; fastdiff's fp16 error must stay within twice
diffusers' own fp16 error (plus 1e-3). The graphed variants are compared with fastdiff's
eager output: the UNet graph's replay (on a fresh input written into its static buffer)
with an eager UNet call, the graphed images with the eager images.

Graphs are captured once, outside the timed rounds: the UNet step before its rounds; the
generation's step graphs by one untimed warm-up generate(cuda_graph=True), which the
pipeline keeps in ``pipe.graph_cache`` (fastdiff.sampling.graphs.GraphCache) and replays in
every timed round; the test asserts that ``graph_cache.captures`` does not move while timing.
Every variant is timed the same way (timing.bench: CUDA events around back-to-back calls,
medians per call; the wall clock on the CPU).

    pytest benchmarks/bench_sd15_gpu.py --benchmark-only

Without a GPU the module is skipped; FASTDIFF_BENCH_SD15_TINY=1 runs the same code on a
tiny configuration on the CPU (fp32) to check the harness itself, with the graph variants
captured by fastdiff.sampling.graphs.EagerCapture, the CPU stand-in for CUDA graph capture.
"""
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff.sampling import graphs, samplers  # noqa: E402
import sd15_arch  # noqa: E402
from timing import assert_varied, bench  # noqa: E402

TINY = os.environ.get("FASTDIFF_BENCH_SD15_TINY") == "1"
if not torch.cuda.is_available() and not TINY:
    pytest.skip("the SD 1.5 benchmark needs a GPU (about 1.7 TFLOP per UNet call at 512 x 512)",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
STEPS = 50 if not TINY else 3
PROMPT, SEED = "a red circle above a blue square", 0

if TINY:
    UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
    SAMPLE_SIZE = 8
else:  # SD 1.5 at 512 x 512
    UNET, TEXT, VAE, SAMPLE_SIZE = sd15_arch.UNET, sd15_arch.TEXT, sd15_arch.VAE, 64
MAX_TOKENS = sd15_arch.MAX_TOKENS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd15_arch.write_folder(str(tmp_path_factory.mktemp("sd15")), sample_size=SAMPLE_SIZE, unet=UNET,
                                  text=TEXT, vae=VAE)


def load_diffusers(folder, dtype):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(DEVICE)


def load_fastdiff(folder):
    pipe = fastdiff.Pipeline.from_pretrained(folder, device=DEVICE, dtype=DTYPE)
    return pipe.to(memory_format=torch.channels_last).fuse_qkv_projections()


@pytest.fixture(scope="module")
def pipes(folder):
    return load_diffusers(folder, DTYPE), load_fastdiff(folder)


def latents():
    size = SAMPLE_SIZE
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(SEED)).to(DEVICE)


def run_diffusers(pipe, start, dtype=DTYPE):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, latents=start.to(dtype),
                output_type="pt").images.float()


def run_fastdiff(pipe, start, cuda_graph):
    return pipe.generate(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, sampler="dpmpp_2m",
                         latents=start.to(DTYPE), output_type="pt", progress=False,
                         cuda_graph=cuda_graph).float()


# Bounds of a graph against eager. A replay launches the kernels of the eager call, with the
# same launch configurations, on the same operands, and none of fastdiff's kernels reduces
# with atomics: the result should be bit-identical, and on the CPU (EagerCapture runs the very
# same ops) it must be. On a GPU the bounds leave room only for a BLAS/cuDNN algorithm picked
# differently under capture (the actual difference is recorded in extra_info): 2e-3 of the
# UNet output's scale, 10x tighter than fastdiff vs diffusers (2e-2, different kernels), and
# 2e-3 on images in [0, 1] (4 fp16 ulps at 1.0; tests/test_cuda_graphs.py's bound for the
# pipeline). A replay that read a stale input or left a stale output is off by O(scale).
UNET_GRAPH_RTOL = 2e-3 if DEVICE == "cuda" else 0.0
IMAGE_GRAPH_ATOL = 2e-3 if DEVICE == "cuda" else 0.0


@pytest.fixture(scope="module", autouse=True)
def capture_here():
    """On the CPU, graph capture is graphs.EagerCapture, through samplers' own seam."""
    if DEVICE == "cuda":
        yield
        return
    saved = samplers._capture_factory
    samplers._capture_factory = lambda device: graphs.EagerCapture()
    try:
        yield
    finally:
        samplers._capture_factory = saved


def capture_for(device):
    """The capture generate(cuda_graph=True) uses here: CUDA graphs, or the CPU stand-in."""
    return (samplers._capture_factory or graphs.default_capture)(torch.device(device))


def unet_inputs(seed=1):
    size, dim = SAMPLE_SIZE, UNET["cross_attention_dim"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=gen).to(DEVICE, DTYPE)
    context = torch.randn(2, MAX_TOKENS, dim, generator=gen).to(DEVICE, DTYPE)
    return x, torch.tensor(500, device=DEVICE), context


def graphed_unet(unet, x, t, context):
    """The UNet call captured once; returns (replay, its max |replay - eager|) after checking it.

    The check writes a different sample into the graph's static input, replays, and compares
    with an eager call on that sample: a graph that ignored its input would fail it.
    """
    static_x = x.clone()
    with torch.no_grad():
        (out,), replay = capture_for(DEVICE)(lambda: (unet(static_x, t, encoder_hidden_states=context),))
        fresh = unet_inputs(seed=2)[0].contiguous(memory_format=torch.channels_last)
        static_x.copy_(fresh)
        replay()
        want = unet(fresh, t, encoder_hidden_states=context).float()
        err = (out.float() - want).abs().max().item()
    bound = UNET_GRAPH_RTOL * max(want.abs().max().item(), 1.0)
    assert err <= bound, f"UNet graph replay differs from eager by {err} (bound {bound})"
    return replay, err


def device_info():
    return dict(dtype=str(DTYPE), unet=dict(UNET), tiny=TINY)


@pytest.fixture(scope="module")
def unet_error(pipes):
    """max |fastdiff UNet - diffusers UNet| on the step's inputs, and the bound it must meet."""
    ref, ours = pipes
    x, t, context = unet_inputs()
    with torch.no_grad():
        want = ref.unet(x, t, encoder_hidden_states=context).sample.float()
        got = ours.unet(x.contiguous(memory_format=torch.channels_last), t, encoder_hidden_states=context).float()
    scale = want.abs().max().item()
    return (got - want).abs().max().item(), (2e-2 if DTYPE == torch.float16 else 1e-4) * max(scale, 1.0)


@pytest.mark.parametrize("impl", ["diffusers", "fastdiff", "fastdiff-graph"])
def test_unet_step(benchmark, pipes, unet_error, impl):
    err, bound = unet_error
    assert err <= bound, f"fastdiff's UNet differs from diffusers' by {err} (bound {bound})"
    ref, ours = pipes
    x, t, context = unet_inputs()
    xc = x.contiguous(memory_format=torch.channels_last)
    assert_varied(x=x, context=context)
    benchmark.extra_info.update(unet_err_vs_diffusers=err)

    if impl == "diffusers":
        def fn():
            return ref.unet(x, t, encoder_hidden_states=context).sample
    elif impl == "fastdiff":
        def fn():
            return ours.unet(xc, t, encoder_hidden_states=context)
    else:
        fn, replay_err = graphed_unet(ours.unet, xc, t, context)
        benchmark.extra_info.update(replay_vs_eager_max_abs=replay_err, replay_bound_rel=UNET_GRAPH_RTOL)

    def call():
        with torch.no_grad():
            fn()

    benchmark.group = f"SD 1.5 UNet step {DEVICE} {DTYPE} batch 2 (CFG) {SAMPLE_SIZE}x{SAMPLE_SIZE}"
    timing = bench(benchmark, call, device=DEVICE, rounds=20 if DEVICE == "cuda" else 2, impl=impl,
                   shape=dict(x=list(x.shape), context=list(context.shape)), **device_info())
    if timing is not None:
        benchmark.extra_info["it_per_s"] = 1.0 / timing.per_call_s


@pytest.fixture(scope="module")
def images(folder, pipes):
    """Each once, from the same latents: diffusers fp32 (the exact image), diffusers and fastdiff (eager) in DTYPE."""
    ref, ours = pipes
    start = latents()
    with torch.no_grad():
        exact = run_diffusers(load_diffusers(folder, torch.float32), start, torch.float32)
        return dict(exact=exact, diffusers=run_diffusers(ref, start), fastdiff=run_fastdiff(ours, start, False))


def graph_cache(pipe):
    cache = getattr(pipe, "graph_cache", None)
    if cache is None or not isinstance(getattr(cache, "captures", None), int):
        pytest.fail("the pipeline has no graph_cache with an int `captures` (fastdiff.sampling.graphs.GraphCache): "
                    "without graph reuse across generate() calls every timed round would capture its graphs again")
    return cache


@pytest.mark.parametrize("impl", ["diffusers", "fastdiff", "fastdiff-graph"])
def test_generation_50_steps(benchmark, pipes, images, impl):
    theirs = (images["diffusers"] - images["exact"]).abs().max().item()
    mine = (images["fastdiff"] - images["exact"]).abs().max().item()
    assert mine <= 2 * theirs + 1e-3, (mine, theirs)
    ref, ours = pipes
    start = latents()
    assert_varied(latents=start)
    benchmark.extra_info.update(image_err_vs_diffusers_fp32=theirs if impl == "diffusers" else mine, steps=STEPS)

    if impl == "diffusers":
        def fn():
            return run_diffusers(ref, start)
    elif impl == "fastdiff":
        def fn():
            return run_fastdiff(ours, start, False)
    else:
        before = getattr(getattr(ours, "graph_cache", None), "captures", 0)
        with torch.no_grad():  # the untimed warm-up: captures the step graphs, kept in pipe.graph_cache
            graphed = run_fastdiff(ours, start, True)
        cache = graph_cache(ours)
        captured = cache.captures
        assert captured >= 1, "generate(cuda_graph=True) captured no graphs"
        err = (graphed - images["fastdiff"]).abs().max().item()
        assert err <= IMAGE_GRAPH_ATOL, f"graphed images differ from eager ones by {err} (bound {IMAGE_GRAPH_ATOL})"
        benchmark.extra_info.update(graphed_vs_eager_max_abs=err, graphed_bound_abs=IMAGE_GRAPH_ATOL,
                                    captures_in_warmup=captured - before,
                                    image_err_vs_diffusers_fp32=(graphed - images["exact"]).abs().max().item())

        def fn():
            return run_fastdiff(ours, start, True)

    def call():
        with torch.no_grad():
            fn()

    benchmark.group = f"SD 1.5 generation {DEVICE} {DTYPE} {SAMPLE_SIZE * 8}px {STEPS} steps dpmpp_2m cfg 7.5"
    # One generation per round; one untimed warm-up generation first (for the graphs, the one above).
    timing = bench(benchmark, call, device=DEVICE, rounds=5 if DEVICE == "cuda" else 1, calls=1,
                   warmup_rounds=0 if impl == "fastdiff-graph" else 1, impl=impl,
                   shape=dict(latents=list(start.shape)), **device_info())
    if impl == "fastdiff-graph":
        assert cache.captures == captured, f"the timed rounds captured {cache.captures - captured} graphs"
    if timing is not None:
        benchmark.extra_info["steps_per_s_incl_text_and_vae"] = STEPS / timing.per_call_s
