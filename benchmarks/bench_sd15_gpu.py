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
diffusers' own fp16 error (plus 1e-3).

    pytest benchmarks/bench_sd15_gpu.py --benchmark-only

Without a GPU the module is skipped; FASTDIFF_BENCH_SD15_TINY=1 runs the same code on a
tiny configuration on the CPU (fp32, no graphs), to check the harness itself.
"""
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from sd_fixtures import write_tokenizer  # noqa: E402

TINY = os.environ.get("FASTDIFF_BENCH_SD15_TINY") == "1"
if not torch.cuda.is_available() and not TINY:
    pytest.skip("the SD 1.5 benchmark needs a GPU (about 1.7 TFLOP per UNet call at 512 x 512)",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
STEPS = 50 if not TINY else 3
PROMPT, SEED = "a red circle above a blue square", 0

if TINY:
    UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
else:  # SD 1.5 (runwayml/stable-diffusion-v1-5 configs)
    UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
MAX_TOKENS = 77


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = str(tmp_path_factory.mktemp("sd15"))
    torch.manual_seed(0)
    vocab = write_tokenizer(os.path.join(root, "_tok"), max_length=MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "_tok"), local_files_only=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, max_position_embeddings=MAX_TOKENS,
                                                bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                                pad_token_id=vocab - 1, projection_dim=768, **TEXT))
    unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **UNET)
    blocks = len(VAE["block_out_channels"])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                                  down_block_types=("DownEncoderBlock2D",) * blocks,
                                  up_block_types=("UpDecoderBlock2D",) * blocks, **VAE)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear", steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root)
    return root


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


def latents(pipe):
    size = UNET["sample_size"]
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(SEED)).to(DEVICE)


def run_diffusers(pipe, start, dtype=DTYPE):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, latents=start.to(dtype),
                output_type="pt").images.float()


def run_fastdiff(pipe, start, cuda_graph):
    return pipe.generate(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, sampler="dpmpp_2m",
                         latents=start.to(DTYPE), output_type="pt", progress=False,
                         cuda_graph=cuda_graph).float()


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def unet_inputs():
    size, dim = UNET["sample_size"], UNET["cross_attention_dim"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=gen).to(DEVICE, DTYPE)
    context = torch.randn(2, MAX_TOKENS, dim, generator=gen).to(DEVICE, DTYPE)
    return x, torch.tensor(500, device=DEVICE), context


def graphed(fn, *args):
    """fn(*args) captured as a CUDA graph; returns a replay that refreshes the output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph.replay, out


@pytest.mark.parametrize("impl", ["diffusers", "fastdiff", "fastdiff-graph"])
def test_unet_step(benchmark, pipes, impl):
    if impl == "fastdiff-graph" and DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    ref, ours = pipes
    x, t, context = unet_inputs()
    with torch.no_grad():
        want = ref.unet(x, t, encoder_hidden_states=context).sample.float()
        got = ours.unet(x.contiguous(memory_format=torch.channels_last), t, encoder_hidden_states=context).float()
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= (2e-2 if DTYPE == torch.float16 else 1e-4) * max(scale, 1.0)

    if impl == "diffusers":
        def fn():
            return ref.unet(x, t, encoder_hidden_states=context).sample
    elif impl == "fastdiff":
        xc = x.contiguous(memory_format=torch.channels_last)

        def fn():
            return ours.unet(xc, t, encoder_hidden_states=context)
    else:
        xc = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            replay, _ = graphed(lambda: ours.unet(xc, t, encoder_hidden_states=context))

        def fn():
            replay()

    def timed():
        with torch.no_grad():
            fn()
        sync()

    benchmark.group = f"SD 1.5 UNet step {DEVICE} {DTYPE} batch 2 (CFG) {UNET['sample_size']}x{UNET['sample_size']}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                                dtype=str(DTYPE), impl=impl)
    benchmark.pedantic(timed, rounds=20 if DEVICE == "cuda" else 2, warmup_rounds=3 if DEVICE == "cuda" else 1)
    benchmark.extra_info["it_per_s"] = 1.0 / benchmark.stats.stats.median


@pytest.fixture(scope="module")
def image_errors(folder, pipes):
    """Max |image - diffusers fp32 image| for diffusers fp16 and fastdiff fp16 (each once)."""
    ref, ours = pipes
    start = latents(ref)
    with torch.no_grad():
        exact = run_diffusers(load_diffusers(folder, torch.float32), start, torch.float32)
        theirs = (run_diffusers(ref, start) - exact).abs().max().item()
        mine = (run_fastdiff(ours, start, DEVICE == "cuda") - exact).abs().max().item()
    return theirs, mine


@pytest.mark.parametrize("impl", ["diffusers", "fastdiff", "fastdiff-graph"])
def test_generation_50_steps(benchmark, pipes, image_errors, impl):
    if impl == "fastdiff-graph" and DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    theirs, mine = image_errors
    assert mine <= 2 * theirs + 1e-3, (mine, theirs)
    ref, ours = pipes
    start = latents(ref)

    def timed():
        with torch.no_grad():
            if impl == "diffusers":
                run_diffusers(ref, start)
            else:
                run_fastdiff(ours, start, impl == "fastdiff-graph")
        sync()

    benchmark.group = f"SD 1.5 generation {DEVICE} {DTYPE} {UNET['sample_size'] * 8}px {STEPS} steps dpmpp_2m cfg 7.5"
    benchmark.extra_info.update(image_err_vs_diffusers_fp32=mine if impl == "fastdiff" else theirs, steps=STEPS)
    benchmark.pedantic(timed, rounds=5 if DEVICE == "cuda" else 1, warmup_rounds=1)
    benchmark.extra_info["steps_per_s_incl_text_and_vae"] = STEPS / benchmark.stats.stats.median
