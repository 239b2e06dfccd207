"""GLIDE base step with classifier-free guidance: fastdiff vs plain PyTorch, one run.

"Plain PyTorch" is tests/glide_reference.py: glide-text2im's forward pass and sampler
equations written out with torch.nn.functional, as glide-text2im runs them (the text
transformer re-run on every call, einsum attention, the DDPM step as separate tensor
ops). fastdiff runs its Text2ImUNet on the same weights with the text conditioning
computed once per run and the step fused in ``guided_step``. One step = one model call
on the CFG batch of 2 plus the learned-variance DDPM update; both give the same
result, checked before timing.

GLIDE's base architecture at reduced width for a CPU (the real one is 385M parameters):
64 x 64, num_channels 64, 3 res blocks, attention at 32/16/8 with 64-channel heads,
text transformer of width 256 with 4 layers over 128 tokens.

    pytest benchmarks/ --benchmark-only -k glide
"""
import pytest
import torch

import glide_reference as R
from fastdiff.guidance import ClassifierFreeGuidance
from fastdiff.models.adm_unet import Text2ImUNet
from fastdiff.ops.guided_step import guided_step
from fastdiff.sampling.respaced import RespacedSchedule, respaced_ddpm_plan
from timing import bench

OPTIONS = R.glide_options(num_channels=64, num_res_blocks=3, xf_width=256, xf_layers=4, xf_heads=4,
                          use_fp16=False, timestep_respacing="100")
N_VOCAB, SCALE, STEP = 50257, 3.0, 40  # STEP: a mid-schedule step of the "100" respacing


@pytest.fixture(scope="module")
def setup():
    state = R.random_glide_state_dict(OPTIONS, seed=0, n_vocab=N_VOCAB)
    model = Text2ImUNet(OPTIONS, n_vocab=N_VOCAB).eval().requires_grad_(False)
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, N_VOCAB - 1, (2, OPTIONS["text_ctx"]), generator=g)
    mask = torch.zeros(2, OPTIONS["text_ctx"], dtype=torch.bool)
    mask[0, :12] = True  # a 12-token prompt; the second row is the empty (unconditional) prompt
    tokens[1] = N_VOCAB - 1
    x = torch.randn(1, 3, 64, 64, generator=g)
    noise = torch.randn(1, 3, 64, 64, generator=g)

    diffusion = R.diffusion_from_options(OPTIONS)
    index = diffusion.num_timesteps - 1 - STEP
    t_index = torch.tensor([index, index])
    t_orig = diffusion.original_timesteps(t_index)

    def reference_step():
        model_fn = R.cfg_model_fn(lambda xx, tt: R.reference_forward(state, OPTIONS, xx, tt, tokens, mask), SCALE)
        x2 = torch.cat([x, x])
        out = model_fn(x2, t_orig)
        return diffusion.p_sample(out, x2, t_index, torch.cat([noise, noise]))["sample"][:1]

    plan = respaced_ddpm_plan(RespacedSchedule.named(OPTIONS["noise_schedule"], OPTIONS["diffusion_steps"], "100"))
    step = plan.steps[STEP]
    assert step.t == float(t_orig[0])
    row = torch.tensor(step.row, dtype=torch.float32)[None]
    text = model.encode_text(tokens[:1], mask[:1])
    empty = model.encode_text(tokens[1:], mask[1:])
    denoiser = ClassifierFreeGuidance(lambda xx, tt, c: model(xx, tt, c), text, empty, SCALE, uncond_first=False)
    t = torch.tensor(step.t, dtype=torch.int64)

    def fastdiff_step():
        out = denoiser(x, t)
        return guided_step(x, out.cond, out.uncond, out.scale, coeffs=row, noise=noise, clip_range=1.0,
                           learned_variance=True)[0]

    return reference_step, fastdiff_step


@pytest.mark.parametrize("impl", ["fastdiff", "plain-pytorch"])
def test_glide_base_step_cpu_fp32(benchmark, setup, impl):
    reference_step, fastdiff_step = setup
    benchmark.group = "glide base step cpu fp32 64px cfg batch 2"
    with torch.no_grad():
        got, want = fastdiff_step(), reference_step()
    assert (got - want).abs().max().item() <= 1e-4
    fn = fastdiff_step if impl == "fastdiff" else reference_step

    def run():
        with torch.no_grad():
            return fn()

    bench(benchmark, run, device="cpu", rounds=10, calls=1, warmup_rounds=2, dtype="torch.float32",
          shape=dict(x=[1, 3, 64, 64], model_batch=2, text_ctx=OPTIONS["text_ctx"]),
          options="num_channels=64 xf_width=256 xf_layers=4")
