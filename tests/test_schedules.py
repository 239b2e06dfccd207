"""Schedules, spacings, GLIDE respacing, config loading and bad names."""

import numpy as np
import pytest
import torch

from fastdiff.sampling import SchedulerConfig, glide_respacing, karras_sigmas, make_betas, sample
from fastdiff.sampling.schedules import betas_for_alpha_bar, spaced_timesteps
from deps import require

diffusers = require("diffusers")


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers_bitwise(schedule):
    ours = SchedulerConfig.from_dict(dict(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)) \
        .noise_schedule("ddim").alphas_cumprod
    ref = diffusers.DDIMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert np.array_equal(ours, ref.double().numpy())


def test_glide_respacing_sections():
    # 10 steps from [0, 100) in sections of 50: 5 evenly strided steps from each half.
    assert glide_respacing(100, "5,5") == [0, 12, 24, 37, 49, 50, 62, 74, 87, 99]
    assert glide_respacing(1000, "ddim50") == list(range(0, 1000, 20))
    assert glide_respacing(1000, "100") == [round(i * 999 / 99) for i in range(100)]
    fast = glide_respacing(1000, "fast27")
    assert len(fast) == 27 and 997 in fast and 999 not in fast and fast[0] == 0
    assert glide_respacing(1000, "10,10,3,2,2")[-1] == 999


@pytest.mark.parametrize("bad", ["ddim7x", "fast", "3,a", "2000"])
def test_glide_respacing_rejects_bad_strings(bad):
    with pytest.raises(ValueError):
        glide_respacing(1000, bad)


def test_glide_respacing_drives_ddpm():
    kept = glide_respacing(1000, "fast27")[::-1]
    cfg = SchedulerConfig.from_dict(dict(beta_schedule="squaredcos_cap_v2", clip_sample=True))
    seen = []
    x = sample("ddpm", lambda x, t: seen.append(int(t)) or 0.1 * x, torch.randn(1, 3, 4, 4), cfg,
               timesteps=kept, generator=torch.Generator().manual_seed(0), progress=False)
    assert seen == kept and torch.isfinite(x).all()


def test_cosine_betas_follow_the_improved_ddpm_formula():
    betas = betas_for_alpha_bar(1000)
    assert betas.dtype == np.float64 and betas.max() <= 0.999 and betas[0] > 0
    assert torch.allclose(make_betas("squaredcos_cap_v2", 1000), torch.from_numpy(betas))


def test_karras_sigmas_endpoints_and_monotone():
    s = karras_sigmas(0.03, 14.6, 10)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03) and np.all(np.diff(s) < 0)


def test_spacings_match_diffusers():
    for spacing in ["leading", "trailing", "linspace"]:
        ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
        ref.set_timesteps(37)
        ours = spaced_timesteps(1000, 37, spacing, steps_offset=1)
        assert ours.tolist() == ref.timesteps.tolist()


def test_config_from_diffusers_json(tmp_path):
    diffusers.PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True).save_config(tmp_path)
    cfg = SchedulerConfig.from_json(tmp_path)
    assert cfg.class_name == "PNDMScheduler" and cfg.default_sampler == "pndm"
    assert cfg.skip_prk_steps is True and cfg.beta_schedule == "scaled_linear"
    dpm = SchedulerConfig.from_dict(dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True))
    assert dpm.default_sampler == "dpmpp_2m_karras"


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        SchedulerConfig.from_json(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SchedulerConfig.from_json(tmp_path)
    # thresholding is read now (tests/test_thresholding.py); the keys fastdiff cannot honour are refused
    assert SchedulerConfig.from_dict(dict(thresholding=True)).thresholding is True
    for key, value in [("use_exponential_sigmas", True), ("use_lu_lambdas", True), ("timestep_type", "continuous"),
                       ("interpolation_type", "log_linear"), ("euler_at_final", True)]:
        with pytest.raises(ValueError, match=f"sets {key}={value!r}, which fastdiff does not support"):
            SchedulerConfig.from_dict({key: value})


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid samplers: ddpm, ddim, pndm, euler, euler_a, heun"):
        sample("lms", lambda x, t: x, torch.randn(1, 1, 2, 2), None, 5)
    with pytest.raises(ValueError, match="valid: linear, scaled_linear, squaredcos_cap_v2"):
        SchedulerConfig.from_dict(dict(beta_schedule="cosine")).noise_schedule()
    with pytest.raises(ValueError, match="valid: leading, trailing, linspace"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="valid: epsilon, v_prediction, sample"):
        SchedulerConfig.from_dict(dict(prediction_type="eps")).noise_schedule()


@pytest.mark.parametrize("steps", [0, -3, 2.5, 1001])
def test_bad_step_counts(steps):
    with pytest.raises(ValueError):
        sample("ddim", lambda x, t: x, torch.randn(1, 1, 2, 2), None, steps, progress=False)


def test_callback_progress_and_seed_reproduce():
    seen = []
    cfg = SchedulerConfig()
    run = lambda seed: sample("euler_a", lambda x, t: 0.5 * x, torch.ones(1, 2, 3, 3), cfg, 6,  # noqa: E731
                              generator=torch.Generator().manual_seed(seed), progress=False,
                              callback=lambda info: seen.append((info.index, info.total, info.x0.shape)))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert seen[:6] == [(i, 6, torch.Size([1, 2, 3, 3])) for i in range(6)]


def test_callback_gets_x0_for_pndm():
    cfg = SchedulerConfig.from_dict(dict(skip_prk_steps=True))
    x0s = []
    sample("pndm", lambda x, t: 0 * x, torch.randn(1, 2, 3, 3), cfg, 5, progress=False,
           callback=lambda info: x0s.append(info.x0))
    # eps = 0 predicts x0 = x / sqrt(alpha_bar): finite and non-zero
    assert len(x0s) == 6 and all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in x0s)
