"""Dynamic thresholding (Imagen; diffusers' thresholding=True) against diffusers' schedulers.

The threshold itself must equal diffusers' ``_threshold_sample`` bit for bit (its quantile
is torch.quantile's, computed here with topk). Whole runs are compared step by step on
what the model sees, to the float32 bound of the other sampler tests (tests/tolerances.py),
with a fake model whose x0 goes well past 1, per sample below, inside and above the
[1, sample_max_value] range the threshold is clamped to, so that every branch bites. The
cond_fn alpha_bar hook is checked here too: it must be the noise level of the step's input.
"""
import dataclasses
import math

import pytest
import torch

from fastdiff.sampling import SAMPLERS, SchedulerConfig, build_plan, run_plan, sample
from fastdiff.sampling.graphs import HostSyncError, forbid_host_sync
from fastdiff.sampling.respaced import RespacedSchedule, respaced_ddim_plan, respaced_ddpm_plan
from fastdiff.sampling.thresholding import dynamic_threshold, quantile_rank
from tolerances import fp32_bound
from deps import require

diffusers = require("diffusers")

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
THRESHOLDING = ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras"]
RATIO, MAX_VALUE = 0.9, 2.5
SHAPE = (3, 4, 7, 5)
GAINS = (0.4, 1.2, 8.0)   # x0 quantiles below 1, inside (1, MAX_VALUE), above MAX_VALUE
TERMS_PER_CALL = 30       # as tests/test_samplers_vs_diffusers.py


def _diffusers_class(name):
    return getattr(diffusers, SAMPLERS[name].diffusers_class)


class BoldDenoiser:
    """tests/test_samplers_vs_diffusers.py's ToyDenoiser for data far wider than [-1, 1]: the
    optimal denoiser for N(0, g^2) data, g = gains[b] per sample, plus a small nonlinear,
    channel-mixing term. Its x0 is consistent with x, so a sampler damps rounding differences
    as it does for a trained model (an x0 unrelated to x would amplify them at every step)."""

    def __init__(self, cfg, gains):
        sched = SchedulerConfig.from_dict(cfg).noise_schedule("ddim")
        self.ac = torch.tensor(sched.alphas_cumprod, dtype=torch.float32)
        self.prediction = cfg.get("prediction_type", "epsilon")
        self.gains = torch.tensor(gains, dtype=torch.float32)

    def __call__(self, x, t):
        t = t.float().clamp(0, len(self.ac) - 1)
        lo = t.floor().long()
        ac = torch.lerp(self.ac[lo], self.ac[(lo + 1).clamp(max=len(self.ac) - 1)], t - lo)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        xf = x.float()
        g = self.gains.reshape(-1, *[1] * (x.dim() - 1))
        x0 = a * g * g * xf / (ac * g * g + s * s) + 0.1 * g * torch.tanh(xf.roll(1, dims=1))
        eps = (xf - a * x0) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.prediction]
        return out.to(x.dtype)


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append((x.detach().float().clone(), float(t)))
        return self.fn(x, t)


def run_diffusers(name, cfg, steps, noise, model, seed=0, quantiles=None, **step_kw):
    kwargs = dict(cfg, use_karras_sigmas=True) if name == "dpmpp_2m_karras" else dict(cfg)
    sched = _diffusers_class(name).from_config(kwargs)
    if quantiles is not None:  # record the raw per-sample quantiles diffusers thresholds with, and max |x0|
        original = sched._threshold_sample

        def recording(x0):
            flat = x0.float().reshape(x0.shape[0], -1).abs()
            quantiles.append(torch.stack([torch.quantile(flat, sched.config.dynamic_thresholding_ratio, dim=1),
                                          flat.amax(dim=1)]))
            return original(x0)
        sched._threshold_sample = recording
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        extra = {"generator": gen} if name in ("ddim", "ddpm") else {}
        x = sched.step(out, t, x, **extra, **step_kw).prev_sample
    return x


def run_fastdiff(name, cfg, steps, noise, model, seed=0, **kw):
    return sample(name, model, noise, SchedulerConfig.from_dict(cfg), steps,
                  generator=torch.Generator().manual_seed(seed), progress=False, **kw)


def thresholded(cfg, ratio=RATIO, max_value=MAX_VALUE):
    return dict(cfg, thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)


def compare(name, cfg, steps=20, shape=SHAPE, gains=GAINS, dtype=torch.float32, **options):
    """Model inputs and final sample within fp32_bound of diffusers; returns (ours, bound, quantiles)."""
    model = BoldDenoiser(cfg, gains)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref_model, our_model = Recorder(model), Recorder(model)
    quantiles = []
    ref = run_diffusers(name, cfg, steps, noise, ref_model, quantiles=quantiles, **options)
    ours = run_fastdiff(name, cfg, steps, noise, our_model, **options)
    assert len(ref_model.calls) == len(our_model.calls) == steps
    quantiles, largest = torch.stack(quantiles).unbind(1)
    # The values on the path: the noise, and x0 before it is thresholded.
    bound = fp32_bound(max(1.0, noise.abs().max().item(), largest.max().item()), TERMS_PER_CALL * steps)
    for i, ((rx, rt), (ox, ot)) in enumerate(zip(ref_model.calls, our_model.calls)):
        assert abs(rt - ot) < 1e-3, f"step {i}: timestep {ot} != diffusers {rt}"
        err = (rx - ox).abs().max().item()
        assert err <= bound, f"step {i}: model input differs by {err} > {bound}"
    err = (ref.float() - ours.float()).abs().max().item()
    assert err <= bound, f"final sample differs by {err} > {bound}"
    assert torch.isfinite(ours).all()
    return ours, bound, quantiles


# --------------------------------------------------------------------------- the threshold itself

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 4, 7, 5), (9, 3, 8, 8), (2, 5, 3), (17, 2, 3, 1, 4)])
@pytest.mark.parametrize("ratio", [0.995, 0.9, 0.5, 0.37, 1.0, 0.01])
def test_threshold_equals_diffusers_bit_for_bit(shape, ratio, dtype):
    gen = torch.Generator().manual_seed(len(shape) * 7 + shape[0])
    x0 = torch.randn(shape, generator=gen) * 3 * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen)
    if shape[0] > 2:
        x0[1] = x0[1].round()  # ties at the quantile's ranks
    x0 = x0.to(dtype)
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=MAX_VALUE)
    ours = dynamic_threshold(x0, ratio, MAX_VALUE)
    assert ours.dtype == dtype and torch.equal(ours, ref._threshold_sample(x0))
    # and its topk quantile is torch.quantile's, bit for bit
    flat = x0.reshape(shape[0], -1).abs()
    flat = flat if dtype == torch.float64 else flat.float()
    n = flat.shape[1]
    below, above, weight = quantile_rank(n, ratio, flat.dtype)
    top = torch.topk(flat, n - below, dim=1).values
    assert torch.equal(torch.lerp(top[:, n - 1 - below], top[:, n - 1 - above], weight),
                       torch.quantile(flat, ratio, dim=1))


def test_threshold_nan_inf_and_max_value_below_one_as_diffusers():
    x0 = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 2
    x0[1, 2, 3, 3], x0[2, 0, 0, 0] = float("nan"), float("inf")
    for max_value in (MAX_VALUE, 0.5):  # diffusers' clamp(s, min=1, max=0.5) is 0.5
        ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=max_value)
        torch.testing.assert_close(dynamic_threshold(x0, 0.9, max_value), ref._threshold_sample(x0),
                                   rtol=0, atol=0, equal_nan=True)


def test_threshold_keeps_channels_last():
    x0 = (torch.randn(2, 4, 6, 5) * 3).contiguous(memory_format=torch.channels_last)
    out = dynamic_threshold(x0, RATIO, MAX_VALUE)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, dynamic_threshold(x0.contiguous(), RATIO, MAX_VALUE))


def test_threshold_reads_nothing_on_the_host():
    """forbid_host_sync (graphs.py) fails any .item(), .tolist(), bool(tensor) or device-to-host
    copy, as its own check below shows; fullgraph compilation fails Python branching on a
    tensor's value (torch 2.13's dynamo traces .item() itself without a break, so it alone
    would not do)."""
    x0 = torch.randn(SHAPE) * 3
    with forbid_host_sync("dynamic thresholding"):
        out = dynamic_threshold(x0, RATIO, MAX_VALUE)
    compiled = torch.compile(lambda v: dynamic_threshold(v, RATIO, MAX_VALUE), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x0), out)
    for host_read in (lambda v: v / max(1.0, v.abs().max().item()), lambda v: v / 2 if bool((v > 1).any()) else v):
        with pytest.raises(HostSyncError), forbid_host_sync("a threshold read on the host"):
            host_read(x0)


# --------------------------------------------------------------------------- samplers vs diffusers

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", THRESHOLDING)
def test_sampler_with_thresholding_matches_diffusers(name, prediction):
    cfg = thresholded(dict(SD_CONFIG, prediction_type=prediction))
    ours, bound, quantiles = compare(name, cfg)
    # every branch of the clamp was taken: a threshold of 1, one in between, one at the max
    assert (quantiles < 1).any() and ((quantiles > 1) & (quantiles < MAX_VALUE)).any() \
        and (quantiles > MAX_VALUE).any()
    # and thresholding bites: far from the run without it
    plain = run_fastdiff(name, dict(SD_CONFIG, prediction_type=prediction), 20,
                         torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), BoldDenoiser(cfg, GAINS))
    assert (plain - ours).abs().max().item() > 1e4 * bound


@pytest.mark.parametrize("name", THRESHOLDING)
def test_default_ratio_batch_of_one(name):
    compare(name, thresholded(SD_CONFIG, ratio=0.995, max_value=1.0), steps=15, shape=(1, 3, 5, 9), gains=(3.0,))


def test_ddim_options_and_class_defaults_with_thresholding():
    # eta > 0 (noise from the same generator), eps re-derived from the thresholded x0, and a
    # config that leaves clip_sample at DDIM's default True: thresholding replaces clipping.
    compare("ddim", thresholded(SD_CONFIG), eta=1.0)
    compare("ddim", thresholded(SD_CONFIG), use_clipped_model_output=True)
    cfg = thresholded(dict(num_train_timesteps=1000))
    for name in THRESHOLDING:
        compare(name, cfg, steps=12)


def test_ddpm_fixed_large_and_dpm_sigma_min():
    compare("ddpm", thresholded(dict(SD_CONFIG, variance_type="fixed_large")))
    compare("dpmpp_2m", thresholded(dict(SD_CONFIG, timestep_spacing="linspace", final_sigmas_type="sigma_min")),
            steps=10)


@pytest.mark.parametrize("name", THRESHOLDING)
def test_fp16_as_close_as_diffusers_own_fp16(name):
    """STYLE.md item 6: the float16 run's error against the float32 reference at most about
    twice diffusers' own float16 error (which also rounds x0 to float16 before thresholding)."""
    cfg = thresholded(SD_CONFIG)
    model = BoldDenoiser(cfg, GAINS)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    exact = run_diffusers(name, cfg, 12, noise, model)
    theirs = run_diffusers(name, cfg, 12, noise.half(), model).float()
    ours = run_fastdiff(name, cfg, 12, noise.half(), model)
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert (ours.float() - exact).abs().max() <= 2 * (theirs - exact).abs().max() + fp32_bound(1.0, 30 * 12)


# --------------------------------------------------------------------------- the loop's other paths

@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "ddpm"])
def test_callbacks_history_and_graphs_see_the_thresholded_x0(name, eager_capture):
    cfg = SchedulerConfig.from_dict(thresholded(SD_CONFIG))
    model = BoldDenoiser(SD_CONFIG, GAINS)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    seen = {False: [], True: []}

    def run(graphed):
        return sample(name, model, noise, cfg, 10, generator=torch.Generator().manual_seed(3), progress=False,
                      cuda_graph=graphed, callback=lambda info: seen[graphed].append((info.x.clone(), info.x0.clone())))
    eager, graphed = run(False), run(True)
    assert torch.equal(eager, graphed) and len(eager_capture) == 1
    for (xe, x0e), (xg, x0g) in zip(seen[False], seen[True]):
        assert torch.equal(xe, xg) and torch.equal(x0e, x0g)
        assert x0e.abs().max() <= 1.0  # clamp(x0, -s, s) / s
    assert any(x0.abs().amax(dim=(1, 2, 3)).eq(1.0).any() for _, x0 in seen[False])  # clamped at s


def test_a_run_with_thresholding_reads_nothing_on_the_host():
    model = BoldDenoiser(SD_CONFIG, GAINS)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for name in THRESHOLDING:
        plan = build_plan(name, thresholded(SD_CONFIG), 8)
        with forbid_host_sync("a thresholded run"):
            run_plan(model, noise, plan, generator=torch.Generator().manual_seed(0), progress=False,
                     callback=lambda info: None)


@pytest.mark.cuda
@pytest.mark.parametrize("name", THRESHOLDING)
def test_cuda_thresholded_steps_do_not_sync_and_capture(name):
    """On a GPU forbid_host_sync also sets torch.cuda's sync debug mode to "error", and the real
    capture runs each step body under it before capturing it (graphs.CUDAGraphCapture)."""
    x0 = (torch.randn(SHAPE) * 3).cuda()
    with forbid_host_sync("dynamic thresholding on CUDA"):
        on_gpu = dynamic_threshold(x0, RATIO, MAX_VALUE)
    assert torch.equal(on_gpu.cpu(), dynamic_threshold(x0.cpu(), RATIO, MAX_VALUE))
    model = BoldDenoiser(SD_CONFIG, GAINS)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    plan = build_plan(name, thresholded(SD_CONFIG), 8)
    zeros = dict(noise=lambda i, like: torch.zeros_like(like), progress=False)
    ref = run_plan(model, noise, plan, **zeros)
    model.ac, model.gains = model.ac.cuda(), model.gains.cuda()
    eager = run_plan(model, noise.cuda(), plan, **zeros)
    graphed = run_plan(model, noise.cuda(), plan, cuda_graph=True, **zeros)
    bound = fp32_bound(max(GAINS) * noise.abs().max().item(), TERMS_PER_CALL * 8)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=bound)
    torch.testing.assert_close(eager.cpu(), ref, rtol=0, atol=bound)


def test_classifier_guidance_and_denoised_fn_with_thresholding():
    cfg = SchedulerConfig.from_dict(thresholded(SD_CONFIG))
    model = BoldDenoiser(SD_CONFIG, GAINS)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

    def run(name, **kw):
        return sample(name, model, noise, cfg, 10, generator=torch.Generator().manual_seed(3), progress=False, **kw)
    for name in THRESHOLDING:  # "mean" (ddpm) and "score" on the prediction (ddim, DPM-Solver++)
        base = run(name)
        assert torch.equal(run(name, cond_fn=lambda x, t: torch.zeros_like(x)), base)
        pushed = run(name, cond_fn=lambda x, t: torch.ones_like(x))
        assert torch.isfinite(pushed).all() and not torch.equal(pushed, base)
    # "score" on x0 (ddim reading x0 only), after thresholding as after clipping
    base = run("ddim", use_clipped_model_output=True)
    pushed = run("ddim", use_clipped_model_output=True, cond_fn=lambda x, t: torch.ones_like(x))
    assert torch.isfinite(pushed).all() and not torch.equal(pushed, base)
    # denoised_fn edits x0 before it is thresholded (as GLIDE's before clipping)
    assert torch.equal(run("ddpm", denoised_fn=lambda x0, t: x0), run("ddpm"))
    seen = []
    run("ddpm", denoised_fn=lambda x0, t: x0 * 10, callback=lambda info: seen.append(info.x0))
    assert all(x0.abs().max() <= 1.0 for x0 in seen)


# --------------------------------------------------------------------------- refusals and the config

def test_config_reads_and_round_trips_thresholding(tmp_path):
    diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5).save_config(
        tmp_path)
    cfg = SchedulerConfig.from_json(tmp_path)
    assert (cfg.thresholding, cfg.dynamic_thresholding_ratio, cfg.sample_max_value) == (True, 0.95, 1.5)
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg
    plan = build_plan("ddim", cfg, 10)
    assert plan.threshold == (0.95, 1.5) and plan.clip_range is None  # replaces clip_sample=True
    assert build_plan("ddim", SchedulerConfig(), 10).threshold is None
    on = dataclasses.replace(SchedulerConfig.from_dict(SD_CONFIG), thresholding=True, sample_max_value=2.0)
    assert build_plan("dpmpp_2m", on, 10).threshold == (0.995, 2.0)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in THRESHOLDING])
def test_samplers_without_thresholding_refuse_it(name):
    assert not SAMPLERS[name].thresholding
    with pytest.raises(ValueError, match="samplers with dynamic thresholding: ddpm, ddim, dpmpp_2m, dpmpp_2m_karras"):
        sample(name, lambda x, t: x, torch.randn(1, 1, 2, 2), thresholded(SD_CONFIG, max_value=1.0), 5,
               progress=False)
    assert all(SAMPLERS[n].thresholding for n in THRESHOLDING)


@pytest.mark.parametrize("key, value", [
    ("dynamic_thresholding_ratio", 0.0), ("dynamic_thresholding_ratio", 1.5), ("dynamic_thresholding_ratio", -0.1),
    ("dynamic_thresholding_ratio", float("nan")), ("dynamic_thresholding_ratio", True),
    ("dynamic_thresholding_ratio", "0.9"), ("sample_max_value", float("nan")), ("sample_max_value", math.inf),
    ("sample_max_value", 0.0), ("sample_max_value", -1.0), ("sample_max_value", "2"), ("thresholding", 1),
    ("thresholding", "yes"),
])
def test_bad_thresholding_values_are_refused(key, value):
    with pytest.raises(ValueError, match=f"scheduler config {key} must be"):
        SchedulerConfig.from_dict({key: value})
    with pytest.raises(ValueError, match=f"scheduler config {key} must be"):
        dataclasses.replace(SchedulerConfig(), **{key: value})


# --------------------------------------------------------------------------- cond_fn's alpha_bar

class AlphaBarProbe:
    """A cond_fn that asks for alpha_bar, records it with the sample, and pushes nowhere."""

    needs_alpha_bar = True

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, alpha_bar):
        assert alpha_bar.dtype == torch.float32 and alpha_bar.shape == (1,) and alpha_bar.device == x.device
        self.seen.append((x.clone(), float(alpha_bar)))
        return torch.zeros_like(x)


def _expected_alpha_bars(name, cfg, steps, eps):
    """alphas_cumprod[t] (integer timesteps) or 1 / (1 + sigma^2) per model call, from diffusers."""
    kwargs = dict(cfg, use_karras_sigmas=True) if name == "dpmpp_2m_karras" else dict(cfg)
    sched = _diffusers_class(name).from_config(kwargs)
    sched.set_timesteps(steps)
    x, expected = torch.randn(eps.shape) * sched.init_noise_sigma, []
    for i, t in enumerate(sched.timesteps):
        sched.scale_model_input(x, t)
        if hasattr(sched, "sigmas"):
            index = sched.step_index if sched.step_index is not None else i
            expected.append(1.0 / (1.0 + sched.sigmas[index].double().item() ** 2))
        else:
            expected.append(sched.alphas_cumprod[int(t)].double().item())
        extra = {"generator": torch.Generator().manual_seed(0)} if name in ("ddpm", "ddim", "euler_a") else {}
        x = sched.step(eps, t, x, **extra).prev_sample
    return expected


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cond_fn_alpha_bar_is_the_noise_level_of_the_step_input(name):
    cfg = dict(SD_CONFIG, skip_prk_steps=False)
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    probe = AlphaBarProbe()
    sample(name, lambda x, t: eps, torch.randn(eps.shape, generator=torch.Generator().manual_seed(6)),
           SchedulerConfig.from_dict(cfg), 10, generator=torch.Generator().manual_seed(0), progress=False,
           cond_fn=probe)
    got = [a for _, a in probe.seen]
    expected = _expected_alpha_bars(name, cfg, 10, eps)
    assert len(got) == len(expected)
    # alpha_bar rounded to float32 once (the device table), from a sigma grid that is float32
    # arithmetic in another order than diffusers' (the Karras grid lies ~3e-7 relative apart)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=fp32_bound(1.0, terms=TERMS_PER_CALL), atol=0)
    if name not in ("ddpm", "euler_a"):  # deterministic: a constant eps keeps x on one line
        _assert_on_one_line(probe.seen, eps)


def _assert_on_one_line(seen, eps):
    """x_i = sqrt(a_i) x0 + sqrt(1 - a_i) eps with one x0 for every step i: the a_i are the
    noise levels the sampler really moved its sample through."""
    x0s = [(x - math.sqrt(1 - a) * eps) / math.sqrt(a) for x, a in seen]
    scale = max(x.abs().max().item() for x, _ in seen)
    for (x, a), x0 in zip(seen, x0s):
        bound = fp32_bound(scale, TERMS_PER_CALL * len(seen)) * (1 / math.sqrt(a) + 1 / math.sqrt(seen[0][1]))
        assert (x0 - x0s[0]).abs().max().item() <= bound


@pytest.mark.parametrize("plan_of", [lambda s: respaced_ddim_plan(s, clip_denoised=False),
                                     lambda s: respaced_ddpm_plan(s, learned_variance=False)])
def test_cond_fn_alpha_bar_on_glide_respaced_plans(plan_of):
    schedule = RespacedSchedule.named("squaredcos_cap_v2", 1000, "25")
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    probe = AlphaBarProbe()
    plan = plan_of(schedule)
    run_plan(lambda x, t: eps, torch.randn(eps.shape), plan, generator=torch.Generator().manual_seed(0),
             progress=False, cond_fn=probe)
    base = torch.cumprod(1 - torch.tensor(RespacedSchedule.named("squaredcos_cap_v2", 1000, "1000").betas), 0)
    expected = [base[int(s.t)].item() for s in plan.steps]  # the training alpha_bar at the model's timestep
    torch.testing.assert_close(torch.tensor([a for _, a in probe.seen], dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=fp32_bound(1.0, terms=2), atol=0)
    if plan.name == "ddim":
        _assert_on_one_line(probe.seen, eps)
