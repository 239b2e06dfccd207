"""The sampler registry, the checks it runs before any work, and classifier guidance on every sampler."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import glide_reference as R
from tolerances import fp32_bound
from fastdiff.sampling import SAMPLERS, SchedulerConfig, build_plan, check_num_steps, get_sampler, run_plan, sample
from fastdiff.sampling import schedules
from fastdiff.sampling import steps as S
from fastdiff.sampling.respaced import RespacedSchedule, respaced_ddim_plan, respaced_ddpm_plan

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          clip_sample=False)
SHAPE = (2, 3, 4, 4)
TERMS_PER_CALL = 30  # as tests/test_samplers_vs_diffusers.py: the roundings per model call on either path


def never_called(x, t):
    raise AssertionError("the denoiser ran before the arguments were checked")


def toy(x, t):
    """A nonlinear, t-dependent eps prediction (a wrong evaluation point or timestep shows)."""
    return torch.tanh(x.roll(1, dims=1) + 0.5 * x) * (1 + t.float() / 2000)


def grad_fn(x, t):
    return 0.3 * torch.sin(x) + 0.05


# --------------------------------------------------------------------------- the registry

def test_one_table_in_todays_order():
    assert list(SAMPLERS) == ["ddpm", "ddim", "pndm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras"]
    for name, spec in SAMPLERS.items():
        assert spec.name == name and get_sampler(name) is spec
        assert spec.classifier_guidance and spec.img2img and spec.cuda_graph
        assert build_plan(name, SD, 4).name == name
    assert {n for n, s in SAMPLERS.items() if s.respaced} == {"ddpm", "ddim"}
    assert SAMPLERS["ddim"].options == {"eta", "use_clipped_model_output"}
    # what the scheduler configs and img2img read is the registry's, not a table of their own
    assert schedules.SAMPLER_CLASS == {n: s.diffusers_class for n, s in SAMPLERS.items()}


@pytest.mark.parametrize("name", ["", "DDIM", "euler-a", "nope"])
def test_unknown_sampler_names_are_refused(name):
    with pytest.raises(ValueError, match=f"unknown sampler {name!r}; valid samplers: ddpm, ddim, pndm"):
        get_sampler(name)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(name, never_called, torch.zeros(SHAPE), SD, 4, progress=False)


@pytest.mark.parametrize("name", [None, 3, b"ddim", ["ddim"]])
def test_non_string_sampler_names_are_refused(name):
    with pytest.raises(TypeError, match="sampler must be a string"):
        get_sampler(name)


def test_a_specs_plan_builder_checks_its_arguments():
    spec = get_sampler("ddim")
    assert len(spec.build_plan(SD, 10, start=4, eta=0.5).steps) == 6  # a dict config is read as sample() reads it
    for start in (-1, 11, 2.0, True):
        with pytest.raises(ValueError, match="start must be an integer in \\[0, 10\\]"):
            spec.build_plan(SD, 10, start=start)


def test_an_option_the_sampler_lacks_is_refused():
    with pytest.raises(TypeError, match="the euler sampler takes no option 'eta'"):
        sample("euler", never_called, torch.zeros(SHAPE), SD, 4, eta=0.5, progress=False)


def test_sampling_imports_nothing_above_it():
    """sampling sits below guidance (ARCHITECTURE.md): ModelOutput is its own (tests/test_house.py walks
    the whole package)."""
    import ast
    import pathlib

    root = pathlib.Path(S.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert not (node.module or "").startswith(("guidance", "pipelines", "loaders")), (path, node.module)


# --------------------------------------------------------------------------- step counts

@pytest.fixture
def no_plan_building(monkeypatch):
    """Every plan builder fails if called: a refusal must come before the plan (and its memory)."""
    for name in ("ddim_plan", "ddpm_plan", "pndm_plan", "euler_plan", "heun_plan", "dpmpp_2m_plan"):
        monkeypatch.setattr(S, name, lambda *a, **k: pytest.fail("a plan was built before num_steps was checked"))


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1001, 2000, 10**9])
def test_more_steps_than_training_timesteps_are_refused(name, steps, no_plan_building):
    with pytest.raises(ValueError, match=f"num_steps={steps} is more than the {name} sampler can take .*at most (1000|999)$"):
        sample(name, never_called, torch.zeros(SHAPE), SD, steps, progress=False)


@pytest.mark.parametrize("spacing,limit", [("linspace", 999), ("leading", 999), ("trailing", 1000)])
def test_dpm_solver_takes_as_many_steps_as_give_distinct_timesteps(spacing, limit, no_plan_building):
    """DPM-Solver++ spaces num_steps + 1 points and drops the last: with linspace or leading
    spacing, 1000 steps on 1000 timesteps repeat one (h = 0: NaN from the second step on)."""
    cfg = dict(SD, timestep_spacing=spacing)
    assert check_num_steps("dpmpp_2m", cfg, limit) == limit
    with pytest.raises(ValueError, match=f"at most {limit}"):
        check_num_steps("dpmpp_2m", cfg, limit + 1)
    assert check_num_steps("dpmpp_2m_karras", cfg, 1000) == 1000


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_the_most_steps_a_sampler_takes_give_a_finite_plan(name, spacing):
    cfg = SchedulerConfig.from_dict(dict(SD, num_train_timesteps=40, timestep_spacing=spacing, skip_prk_steps=True))
    most = SAMPLERS[name].max_steps(cfg.resolved(name))
    try:
        plan = build_plan(name, cfg, most)
    except ValueError as exc:  # DDPM on trailing spacing can repeat a timestep: said so, before any work
        assert name == "ddpm" and "repeats timesteps" in str(exc)
        return
    assert np.isfinite(np.concatenate([s.row for s in plan.steps])).all() and math.isfinite(plan.init_scale)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", None])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_step_counts_that_are_not_positive_integers_are_refused(name, steps, no_plan_building):
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        sample(name, never_called, torch.zeros(SHAPE), SD, steps, progress=False)


def test_pndm_with_its_runge_kutta_warm_up_needs_four_steps(no_plan_building):
    with pytest.raises(ValueError, match="num_steps=3 is too few for the pndm sampler .* at least 4"):
        sample("pndm", never_called, torch.zeros(SHAPE), dict(SD, skip_prk_steps=False), 3, progress=False)


# --------------------------------------------------------------------------- eta

BAD_ETAS = [(float("nan"), ValueError), (float("inf"), ValueError), (-0.1, ValueError), ("0.5", TypeError),
            (None, TypeError)]


@pytest.mark.parametrize("eta,error", BAD_ETAS)
def test_bad_eta_is_refused(eta, error):
    with pytest.raises(error, match="eta must be"):
        sample("ddim", never_called, torch.zeros(SHAPE), SD, 4, eta=eta, progress=False)
    with pytest.raises(error, match="eta must be"):
        respaced_ddim_plan(RespacedSchedule.named("squaredcos_cap_v2", 1000, "10"), eta)


# --------------------------------------------------------------------------- scheduler configs

BAD_CONFIGS = [
    (dict(num_train_timesteps=0), "num_train_timesteps must be a positive integer, got 0"),
    (dict(num_train_timesteps=-5), "num_train_timesteps"),
    (dict(num_train_timesteps=2.5), "num_train_timesteps"),
    (dict(beta_start=0.0), "beta_start must be a number in \\(0, 1\\), got 0.0"),
    (dict(beta_end=1.0), "beta_end must be a number in \\(0, 1\\)"),
    (dict(beta_end=1.5, beta_schedule="scaled_linear"), "beta_end"),
    (dict(beta_start=float("nan")), "beta_start"),
    (dict(trained_betas=[0.1, 1.0]), "trained_betas must all lie in \\(0, 1\\), got 1.0"),
    (dict(trained_betas=[0.0, 0.1]), "trained_betas"),
    (dict(trained_betas=[float("nan")]), "trained_betas"),
    (dict(trained_betas=[]), "trained_betas is empty"),
    (dict(beta_schedule="cosine"), "unknown beta schedule 'cosine'"),
    (dict(prediction_type="eps"), "unknown prediction type 'eps'"),
    (dict(timestep_spacing="uniform"), "unknown timestep spacing"),
    (dict(variance_type="learned"), "unknown variance type"),
    (dict(steps_offset=-1), "steps_offset"),
]


@pytest.mark.parametrize("config,message", BAD_CONFIGS)
def test_bad_scheduler_configs_are_refused_at_construction(config, message):
    with pytest.raises(ValueError, match=message) as exc:
        SchedulerConfig.from_dict(config)
    assert "\n" not in str(exc.value)
    if "trained_betas" not in config:
        with pytest.raises(ValueError, match=message):
            SchedulerConfig(**config)


# --------------------------------------------------------------------------- classifier guidance

def _run(name, cond_fn=None, denoiser=toy, config=SD, steps=5):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    return sample(name, denoiser, x, config, steps, generator=torch.Generator().manual_seed(2), progress=False,
                  cond_fn=cond_fn)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_zero_gradient_changes_nothing(name):
    config = dict(SD, skip_prk_steps=True)
    plain = _run(name, config=config)
    assert torch.equal(_run(name, lambda x, t: torch.zeros_like(x), config=config), plain)
    assert not torch.equal(_run(name, grad_fn, config=config), plain)


@pytest.mark.parametrize("plan", ["ddpm", "ddim"])
def test_a_zero_gradient_changes_nothing_on_glides_plans(plan):
    schedule = RespacedSchedule.named("squaredcos_cap_v2", 1000, "6")
    p = respaced_ddpm_plan(schedule) if plan == "ddpm" else respaced_ddim_plan(schedule, 0.5)
    model = (lambda x, t: torch.cat([toy(x, t), torch.tanh(x)], 1)) if plan == "ddpm" else toy
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))

    def run(cond_fn):
        return run_plan(model, x, p, generator=torch.Generator().manual_seed(2), progress=False, cond_fn=cond_fn)
    assert torch.equal(run(lambda x, t: torch.zeros_like(x)), run(None))


class ScoreGuided:
    """The restatement: classifier guidance as k-diffusion's guided denoiser, eps - sqrt(1 - a) grad
    (glide's condition_score), at the alpha_bar of the sample the model is called on."""

    def __init__(self, plan):
        self.alpha_bars, self.calls = [s.alpha_bar for s in plan.steps], 0

    def __call__(self, x, t):
        a = self.alpha_bars[self.calls]
        self.calls += 1
        return toy(x, t) - math.sqrt(1.0 - a) * grad_fn(x, t)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "ddpm"])
def test_score_guidance_is_the_guided_denoiser(name):
    """eps -= sqrt(1 - alpha_bar) grad, i.e. x0 += (1 - alpha_bar) / sqrt(alpha_bar) grad: in
    k-diffusion's sigma form denoised += sigma^2 grad. Unclipped, the shift after the step's x0
    (euler, euler_a) and on the prediction (ddim, pndm, heun, dpm-solver) are both this."""
    config = dict(SD, skip_prk_steps=True)
    plan = build_plan(name, config, 5)
    ours = _run(name, grad_fn, config=config)
    restated = _run(name, denoiser=ScoreGuided(plan), config=config)
    bound = fp32_bound(max(1.0, restated.abs().max().item()), TERMS_PER_CALL * len(plan.steps))
    assert (ours - restated).abs().max().item() <= bound


@pytest.mark.parametrize("name", ["ddim", "heun"])
def test_score_guidance_on_a_clipping_sampler_that_reads_the_prediction_is_clipped_with_it(name):
    config = dict(SD, clip_sample=True, clip_sample_range=0.5)
    plan = build_plan(name, config, 5)
    assert plan.clip_range == 0.5
    ours = _run(name, grad_fn, config=config)
    restated = _run(name, denoiser=ScoreGuided(plan), config=config)
    bound = fp32_bound(max(1.0, restated.abs().max().item()), TERMS_PER_CALL * len(plan.steps))
    assert (ours - restated).abs().max().item() <= bound


def _single_steps(plan):
    return [S.Plan([step], clip_range=plan.clip_range, learned_variance=plan.learned_variance, name=plan.name,
                   classifier_guidance=plan.classifier_guidance) for step in plan.steps]


def test_mean_guidance_adds_the_posterior_variance_times_the_gradient():
    """Ancestral DDPM (glide's condition_mean): mean += variance * grad, variance the fixed
    posterior one, (1 - a') / (1 - a) (1 - a / a'), restated from the config's alpha_bars."""
    cfg = SchedulerConfig.from_dict(dict(SD, clip_sample=False))
    plan = build_plan("ddpm", cfg, 5)
    ac = cfg.noise_schedule("ddpm").alphas_cumprod
    ts = [int(s.t) for s in plan.steps]
    for k, one in enumerate(_single_steps(plan)):
        a, ap = ac[ts[k]], (ac[ts[k + 1]] if k + 1 < len(ts) else 1.0)
        variance = (1 - ap) / (1 - a) * (1 - a / ap)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + k))
        plain = run_plan(toy, x, one, noise=lambda i, like: z, progress=False)
        guided = run_plan(toy, x, one, noise=lambda i, like: z, progress=False, cond_fn=grad_fn)
        shift = variance * grad_fn(x, None).double()
        assert ((guided - plain).double() - shift).abs().max().item() <= fp32_bound(x.abs().max().item(), 4)


def test_mean_guidance_on_glides_plan_adds_glides_variance():
    """The learned-range variance glide's p_mean_variance gives, times the gradient."""
    schedule = RespacedSchedule.named("squaredcos_cap_v2", 1000, "6")
    ref = R.SpacedDiffusionRef(R.named_betas("squaredcos_cap_v2", 1000), R.space_timesteps(1000, "6"))
    plan = respaced_ddpm_plan(schedule)
    n = len(plan.steps)
    for k, one in enumerate(_single_steps(plan)):
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        out = torch.cat([toy(x, torch.tensor(one.steps[0].t)), torch.rand(SHAPE, generator=torch.Generator()
                                                                           .manual_seed(50 + k)) * 2 - 1], 1)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + k))
        plain = run_plan(lambda x_, t: out, x, one, noise=lambda i, like: z, progress=False)
        guided = run_plan(lambda x_, t: out, x, one, noise=lambda i, like: z, progress=False, cond_fn=grad_fn)
        variance = ref.p_mean_variance(out, x, torch.full((SHAPE[0],), n - 1 - k))["variance"]
        shift = variance * grad_fn(x, None)
        bound = fp32_bound(max(1.0, x.abs().max().item()), 8)
        assert ((guided - plain) - shift).abs().max().item() <= bound
