"""Every sampler against diffusers' scheduler: same toy denoiser, config and noise.

The comparison is step by step on what the model sees (its input and timestep at
every call), then on the final sample, to what float32 rounding in another order can
move them by (tests/tolerances.py): 3e-5 unguided, 2e-4 with guidance 7.5, where one
coefficient of one step 1% off moves the final sample by 3e-3 to 2e-2.
"""
import pytest
import torch

import fastdiff
from fastdiff.guidance import ClassifierFreeGuidance
from fastdiff.sampling import SAMPLERS, SchedulerConfig, sample
from tolerances import fp32_bound, guidance_gain
from deps import require

diffusers = require("diffusers")

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False, skip_prk_steps=True, timestep_spacing="leading")
# The diffusers class each sampler must equal is the registry's claim, tested here.
CLASSES = {name: spec.diffusers_class for name, spec in SAMPLERS.items()}
SHAPE = (2, 4, 8, 8)
# Both sides run the same recurrences in float32 in another order: diffusers' step formulas
# on float32 schedule tensors, fastdiff's float64-derived coefficients in one fused kernel,
# and the toy model on inputs that differ by that. About 30 roundings per model call
# between them; the values stay within max|noise| (the model's inputs, the samples).
TERMS_PER_CALL = 30


class ToyDenoiser:
    """The optimal denoiser for N(0, 0.5^2) data plus a small nonlinear, channel-mixing term.

    Close to what a trained model does (trajectories stay O(1)), yet nonlinear in x and
    dependent on t, so a wrong timestep, coefficient or history shows.
    """

    def __init__(self, cfg, learned_range=False):
        sched = SchedulerConfig.from_dict(cfg).noise_schedule("ddim")
        self.ac = torch.tensor(sched.alphas_cumprod, dtype=torch.float32)
        self.prediction = cfg.get("prediction_type", "epsilon")
        self.learned_range = learned_range

    def __call__(self, x, t, cond=None):
        t = t.float().clamp(0, len(self.ac) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(self.ac) - 1)
        ac = torch.lerp(self.ac[lo], self.ac[hi], t - lo)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        var = 0.25
        x0 = a * var * x / (ac * var + s * s) + 0.1 * torch.tanh(x.roll(1, dims=1))
        if cond is not None:
            x0 = x0 + 0.2 * cond.reshape(-1, 1, 1, 1) * torch.sin(x)
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.prediction]
        if self.learned_range:
            out = torch.cat([out, torch.tanh(x + t / 1000.0)], dim=1)
        return out


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, *args):
        self.calls.append((x.detach().clone(), float(t)))
        return self.fn(x, t, *args)


def run_diffusers(name, cfg, steps, noise, model, *, guidance=None, seed=0, eta=None):
    cls = getattr(diffusers, CLASSES[name])
    kwargs = dict(cfg)
    if name == "dpmpp_2m_karras":
        kwargs["use_karras_sigmas"] = True
    sched = cls.from_config(kwargs)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        if guidance is None:
            out = model(inp, t)
        else:
            cond, uncond, scale = guidance
            both = model(torch.cat([inp, inp]), t, torch.cat([uncond, cond]))
            u, c = both.chunk(2)
            out = u + scale.reshape(-1, 1, 1, 1) * (c - u)
        extra = {"generator": gen} if name in ("ddim", "ddpm", "euler_a") else {}
        if eta is not None:
            extra["eta"] = eta
        x = sched.step(out, t, x, **extra).prev_sample
    return x


def run_fastdiff(name, cfg, steps, noise, model, *, guidance=None, seed=0, eta=None):
    gen = torch.Generator().manual_seed(seed)
    kw = {"eta": eta} if eta is not None else {}
    if guidance is not None:
        cond, uncond, scale = guidance
        model = ClassifierFreeGuidance(model, cond, uncond, scale)
    return sample(name, model, noise, SchedulerConfig.from_dict(cfg), steps, generator=gen,
                  progress=False, **kw)


def compare(name, cfg, steps=50, learned_range=False, guidance=None, eta=None, step_slack=0.0):
    """Model inputs and final sample within fp32_bound; step_slack: what diffusers' own state
    adds to the model inputs where it holds larger values than they (see its use)."""
    model = ToyDenoiser(cfg, learned_range)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref_model, our_model = Recorder(model), Recorder(model)
    ref = run_diffusers(name, cfg, steps, noise, ref_model, guidance=guidance, eta=eta)
    ours = run_fastdiff(name, cfg, steps, noise, our_model, guidance=guidance, eta=eta)
    assert len(ref_model.calls) == len(our_model.calls)
    gain = 1.0 if guidance is None else guidance_gain(guidance[2])
    bound = fp32_bound(gain * max(1.0, noise.abs().max().item()), TERMS_PER_CALL * len(ref_model.calls))
    for i, ((rx, rt), (ox, ot)) in enumerate(zip(ref_model.calls, our_model.calls)):
        assert abs(rt - ot) < 1e-3, f"step {i}: timestep {ot} != diffusers {rt}"
        err = (rx - ox).abs().max().item()
        assert err <= bound + step_slack, f"step {i}: model input differs by {err} > {bound + step_slack}"
    err = (ref - ours).abs().max().item()
    assert err <= bound, f"final sample differs by {err} > {bound}"
    assert torch.isfinite(ours).all()


DETERMINISTIC = ["ddim", "pndm", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras"]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_sampler_matches_diffusers(name, prediction):
    compare(name, dict(SD_CONFIG, prediction_type=prediction), steps=50)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "dpmpp_2m"])
def test_timestep_spacings(name, spacing):
    compare(name, dict(SD_CONFIG, timestep_spacing=spacing), steps=20)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "pndm"])
def test_class_defaults_linear_schedule(name):
    # Only what every class shares: the rest from each class's own defaults.
    compare(name, dict(num_train_timesteps=1000), steps=25)


def test_pndm_with_runge_kutta_warmup():
    compare("pndm", dict(SD_CONFIG, skip_prk_steps=False), steps=30)


def test_dpmpp_2m_few_steps_lower_order_and_sigma_min():
    compare("dpmpp_2m", dict(SD_CONFIG, final_sigmas_type="sigma_min"), steps=8)
    compare("dpmpp_2m", dict(SD_CONFIG, final_sigmas_type="sigma_min"), steps=20)


def test_squaredcos_and_sample_prediction():
    cfg = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
               clip_sample=False)
    for name in ["ddim", "dpmpp_2m"]:
        compare(name, cfg, steps=20)


def test_ddim_clip_sample():
    compare("ddim", dict(SD_CONFIG, clip_sample=True, clip_sample_range=0.5), steps=20)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_matches_with_same_generator(variance, prediction):
    compare("ddpm", dict(SD_CONFIG, variance_type=variance, prediction_type=prediction), steps=50)


def test_ddpm_learned_range_matches():
    cfg = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
               clip_sample=True)
    compare("ddpm", cfg, steps=50, learned_range=True)


@pytest.mark.parametrize("name", ["euler_a", "ddim"])
def test_ancestral_samplers_match_with_same_generator(name):
    compare(name, SD_CONFIG, steps=50, eta=1.0 if name == "ddim" else None)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler_a", "pndm"])
def test_classifier_free_guidance_in_the_loop(name):
    cond = torch.tensor([1.0, -0.5])
    uncond = torch.zeros(2)
    scale = torch.tensor([7.5, 3.0])  # one scale per sample
    compare(name, SD_CONFIG, steps=20, guidance=(cond, uncond, scale))


def test_reference_backend_gives_the_same_trajectory():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    cfg = SchedulerConfig.from_dict(SD_CONFIG)
    toy_model = ToyDenoiser(SD_CONFIG)
    fused = sample("dpmpp_2m", toy_model, noise, cfg, 20, progress=False)
    fastdiff.set_backend("reference")
    try:
        ref = sample("dpmpp_2m", toy_model, noise, cfg, 20, progress=False)
    finally:
        fastdiff.set_backend("auto")
    # the fused kernel and its twin: the same formula per element, ~10 roundings a step
    torch.testing.assert_close(fused, ref, atol=fp32_bound(max(1.0, noise.abs().max().item()), terms=10 * 20),
                               rtol=0)


def test_zero_terminal_snr_trailing_v_prediction():
    cfg = dict(SD_CONFIG, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    for name in ["ddim", "dpmpp_2m"]:
        compare(name, cfg, steps=25)
    # diffusers' Euler keeps x_ve = x / alpha in fp32, which starts at sigma_0 = 4096 here:
    # its rounding there reaches the next model input divided by sigma_1 (~52), one rounding
    # at a scale sigma_0 / sigma_1 * max|noise| (~260). fastdiff keeps the state in the
    # model's input space, so only the intermediate inputs get that slack.
    sched = diffusers.EulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(25)
    sigma_0, sigma_1 = sched.sigmas[0].item(), sched.sigmas[1].item()
    max_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).abs().max().item()
    compare("euler", cfg, steps=25, step_slack=fp32_bound(sigma_0 / sigma_1 * max_noise, terms=1))


def test_trained_betas():
    betas = torch.linspace(1e-4, 2e-2, 1000).tolist()
    compare("ddim", dict(num_train_timesteps=1000, trained_betas=betas, clip_sample=False), steps=20)
