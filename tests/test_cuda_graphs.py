"""Whole-step graphs (run_plan(cuda_graph=True), generate(cuda_graph=True)) and the host-sync guard.

Without a GPU the capture is replaced by graphs.EagerCapture, which keeps everything
else — static input buffers, one graph per step signature, noise drawn up front, the
history copies — so the graphed loop must give bit-identical samples to the eager loop.
The guard must reject a step that reads a device value on the host. On a GPU the real
capture runs (the cuda-marked tests).
"""
import pytest
import torch

import fastdiff
from fastdiff.guidance import ClassifierFreeGuidance
from fastdiff.sampling import SchedulerConfig, sample
from fastdiff.sampling.graphs import HostSyncError, StepGraphs, forbid_host_sync

from tolerances import fp32_bound, guidance_gain
from deps import require

CONFIG = SchedulerConfig.from_dict(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", prediction_type="epsilon"))


class ToyModel(torch.nn.Module):
    """A conditional eps model with a timestep embedding computed from the device tensor."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        for p in self.conv.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.2

    def forward(self, x, t, cond):
        temb = torch.sin(t.float().reshape(-1, 1, 1, 1) / 100.0)
        return self.conv(x) * 0.5 + cond.reshape(-1, 4, 1, 1) * temb + 0.1 * x


def guided_toy():
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    return ClassifierFreeGuidance(ToyModel(), cond, uncond, [3.0, 7.5])


@pytest.mark.parametrize("sampler, graphs", [("ddim", 1), ("euler_a", 1), ("dpmpp_2m", 2), ("pndm", None),
                                             ("heun", None), ("ddpm", 2), ("euler", 1)])
def test_graphed_loop_equals_eager_loop(sampler, graphs, eager_capture):
    denoiser = guided_toy()
    x = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    seen = {True: [], False: []}

    def run(graphed):
        def callback(info):
            seen[graphed].append((info.index, info.x.clone(), info.x0.clone()))
        with torch.no_grad():
            return sample(sampler, denoiser, x, CONFIG, 8, generator=torch.Generator().manual_seed(3),
                          progress=False, callback=callback, cuda_graph=graphed)

    eager, graphed = run(False), run(True)
    assert torch.equal(eager, graphed)
    assert len(seen[True]) == len(seen[False]) > 0
    for (i, xe, x0e), (j, xg, x0g) in zip(seen[False], seen[True]):
        assert i == j and torch.equal(xe, xg) and torch.equal(x0e, x0g)
    assert len(eager_capture) == 1
    # one capture per step signature, not per step
    signatures = _captured_graphs(eager_capture, run)
    assert signatures < len(seen[False]) and (graphs is None or signatures == graphs)


def _captured_graphs(made, run):
    calls = []
    original = StepGraphs.run

    def counting(self, signature, *args):
        calls.append(signature)
        return original(self, signature, *args)
    StepGraphs.run = counting
    try:
        run(True)
    finally:
        StepGraphs.run = original
    return len(set(calls))


def test_dpmpp_2m_captures_two_graphs_for_eight_steps(eager_capture, monkeypatch):
    counts = []
    original = StepGraphs.run

    def spy(self, *args):
        out = original(self, *args)
        counts.append(self.num_graphs)
        return out
    monkeypatch.setattr(StepGraphs, "run", spy)
    with torch.no_grad():
        sample("dpmpp_2m", guided_toy(), torch.randn(2, 4, 6, 5), CONFIG, 8, progress=False, cuda_graph=True)
    assert len(counts) == 8 and counts[-1] == 2


def test_a_step_that_reads_the_device_on_the_host_is_refused(eager_capture):
    def syncing(x, t):
        if t.item() > 500:  # a host read of the timestep
            return x * 0.9
        return x

    with pytest.raises(HostSyncError, match=r"Tensor\.item"):
        sample("ddim", syncing, torch.randn(1, 4, 4, 4), CONFIG, 4, progress=False, cuda_graph=True)

    def branching(x, t):
        return x * 0.5 if (x.abs().max() > 10) else x  # bool() of a tensor

    with pytest.raises(HostSyncError, match="__bool__"):
        sample("ddim", branching, torch.randn(1, 4, 4, 4), CONFIG, 4, progress=False, cuda_graph=True)


def test_the_guard_restores_torch():
    x = torch.ones(3)
    with pytest.raises(HostSyncError):
        with forbid_host_sync():
            x.tolist()
    assert x.sum().item() == 3.0 and bool(x[0]) and float(x[1]) == 1.0 and x.tolist() == [1.0] * 3


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        sample("ddim", lambda x, t: x, torch.randn(1, 4, 4, 4), CONFIG, 4, progress=False, cuda_graph=True)


def test_cuda_graph_refuses_user_code_inside_the_step(eager_capture):
    with pytest.raises(ValueError, match="cannot capture cond_fn or denoised_fn"):
        sample("ddim", lambda x, t: x, torch.randn(1, 4, 4, 4), CONFIG, 4, progress=False, cuda_graph=True,
               denoised_fn=lambda x0, t: x0)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_sd_pipeline_with_graphs_gives_the_same_images(sd_pipe, sampler, eager_capture):
    """The UNet step itself (timestep embedding, attention, group_norm, guided_step) passes the guard."""
    kw = dict(num_inference_steps=5, guidance_scale=6.0, sampler=sampler, seed=4, output_type="pt", progress=False)
    eager = sd_pipe.generate(["a cat", "a dog"], **kw)
    graphed = sd_pipe.generate(["a cat", "a dog"], cuda_graph=True, **kw)
    assert torch.equal(eager, graphed)


def test_sd_pipeline_cuda_graph_on_cpu_is_a_clear_error(sd_pipe):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        sd_pipe.generate("a cat", num_inference_steps=2, progress=False, cuda_graph=True)


@pytest.mark.cuda
class TestCUDA:
    def test_real_capture_equals_eager(self):
        model = ToyModel().cuda()
        gen = torch.Generator().manual_seed(1)
        cond, uncond = torch.randn(2, 4, generator=gen).cuda(), torch.randn(2, 4, generator=gen).cuda()
        denoiser = ClassifierFreeGuidance(model, cond, uncond, 5.0)
        x = torch.randn(2, 4, 16, 16, device="cuda")
        with torch.no_grad():
            runs = [sample("dpmpp_2m", denoiser, x, CONFIG, 10, progress=False, cuda_graph=g,
                           generator=torch.Generator("cuda").manual_seed(0)) for g in (False, True)]
        torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)

    def test_sd_pipeline_real_capture(self, sd_pipe):
        sd_pipe.to("cuda", torch.float16)
        try:
            kw = dict(num_inference_steps=6, guidance_scale=6.0, seed=0, output_type="pt", progress=False)
            eager = sd_pipe.generate("a cat", **kw)
            graphed = sd_pipe.generate("a cat", cuda_graph=True, **kw)
            torch.testing.assert_close(eager.float(), graphed.float(), atol=2e-3, rtol=0)
        finally:
            sd_pipe.to("cpu", torch.float32)


def test_channels_last_and_fused_projections_give_the_same_images(tmp_path):
    """The GPU-speed switches keep the images: NHWC UNet/VAE and fused q/k/v GEMMs, on CPU in fp32."""
    require("diffusers")
    from sd_fixtures import image_terms, make_pipeline

    make_pipeline(str(tmp_path), "sd1")
    pipe = fastdiff.Pipeline.from_pretrained(tmp_path)
    kw = dict(num_inference_steps=4, guidance_scale=6.0, seed=5, output_type="pt", progress=False)
    plain = pipe.generate(["a cat", "a dog"], **kw)
    pipe.to(memory_format=torch.channels_last).fuse_qkv_projections()
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "fused.weight" in "".join(pipe.unet.state_dict())
    nchw_inputs = []  # every conv of the UNet must see NHWC activations: no layout flips

    def check(module, inputs, output, name):
        if not inputs[0].is_contiguous(memory_format=torch.channels_last):
            nchw_inputs.append(name)
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: check(mod, i, o, name))
             for name, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d)]
    fast = pipe.generate(["a cat", "a dog"], **kw)
    for hook in hooks:
        hook.remove()
    assert not nchw_inputs, nchw_inputs
    # NHWC runs other convolution algorithms (and the fused q/k/v GEMM another blocking), so
    # only the order of the sums changes: through 4 guided UNet calls and the VAE's decode of
    # values ~1 (tests/tolerances.py). The bound is 5e-4; 1% more guidance, or one sampler
    # coefficient 1% off at one step, moves these images by 3e-3 to 1.4e-2.
    bound = fp32_bound(scale=1.0, terms=image_terms(pipe, unet_calls=4, gain=guidance_gain(kw["guidance_scale"])))
    assert (fast - plain).abs().max().item() <= bound
    with pytest.raises(ValueError, match="memory_format"):
        pipe.to(memory_format=torch.preserve_format)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_glide_pipeline_with_graphs_gives_the_same_images(tmp_path, sampler, eager_capture):
    """GLIDE's ADM U-Nets (base with CFG, then the upsampler) pass the guard and replay exactly."""
    from glide_fixtures import tiny_options, write_checkpoint, write_glide_tokenizer

    n_vocab = write_glide_tokenizer(str(tmp_path / "tokenizer"))
    base, up = tiny_options(), tiny_options(upsampler=True)
    write_checkpoint(str(tmp_path / "base.pt"), base, n_vocab, seed=0)
    write_checkpoint(str(tmp_path / "up.pt"), up, n_vocab, seed=1)
    pipe = fastdiff.Pipeline.from_glide(str(tmp_path / "base.pt"), str(tmp_path / "up.pt"),
                                        tokenizer=str(tmp_path / "tokenizer"), options=base, upsampler_options=up)
    kw = dict(guidance_scale=3.0, num_inference_steps="6" if sampler == "ddpm" else 6, upsample_steps="3",
              sampler=sampler, seed=2, output_type="pt", progress=False)
    eager = pipe.generate(["a corgi", "a red circle"], **kw)
    graphed = pipe.generate(["a corgi", "a red circle"], cuda_graph=True, **kw)
    assert torch.equal(eager, graphed)
