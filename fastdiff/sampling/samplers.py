"""Samplers: each is a short function that builds its plan (steps.py) and runs it.

Every sampler takes a denoiser ``denoiser(x, t) -> Tensor | ModelOutput`` (wrap a
conditional model with ``fastdiff.guidance.ClassifierFreeGuidance`` for CFG), unit
starting noise ``x``, a diffusers-style ``SchedulerConfig`` and the step count, and
returns the final sample. All of them share the conventions:

  generator   torch.Generator for every random draw (noise is drawn in the order and
              shape diffusers' schedulers draw it, so a seed reproduces their samples)
  noise       optional callable ``noise(step_index, like) -> Tensor`` replacing the draws
  callback    ``callback(StepInfo)`` after every model call
  progress    a tqdm bar over the model calls; False turns it off
  cond_fn     classifier guidance ``cond_fn(x, t) -> grad of log p(y | x)`` (plans that
              declare how: "mean" shifts the step's mean by its variance times the
              gradient, "score" shifts eps by -sqrt(1 - alpha_bar) times it)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..guidance.cfg import ModelOutput, as_model_output
from ..ops import coeffs as C
from ..ops.guided_step import guided_step
from . import steps as S
from .schedules import SchedulerConfig

Denoiser = Callable[[Tensor, Tensor], Union[Tensor, ModelOutput]]


@dataclass
class StepInfo:
    """What a callback sees after step `index` of `total`."""

    index: int
    total: int
    t: Tensor          # the timestep the model saw (device tensor; no sync unless you read it)
    x: Tensor          # the sample after the step (model input space)
    x0: Tensor         # the step's prediction of the clean sample
    stage: str = ""    # which model of a multi-stage pipeline (e.g. GLIDE's "base", "upsampler")


def _randn(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal noise like `like`, drawn on the generator's device as diffusers does."""
    device = generator.device if generator is not None else like.device
    z = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return z.to(like.device)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A tqdm bar over `total` model calls, closed however the loop ends; yields its tick.
    Disabled, it yields a tick that does nothing."""
    if not enabled:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()


def _keep_history(store: dict, last_use: dict, i: int, x: Tensor, den: Tensor, copy: bool = False) -> None:
    """Keep step i's input and x0 where a later step's history reads them (copies when the
    tensors are buffers the next step overwrites), and drop what no later step reads."""
    for ref, value in ((("x", i), x), (("den", i), den)):
        if ref in last_use:
            store[ref] = value.clone() if copy else value
    for ref in [r for r, last in last_use.items() if last == i]:
        store.pop(ref, None)


def _last_uses(steps) -> dict:
    last = {}
    for i, s in enumerate(steps):
        for ref in s.history:
            last[ref] = i
    return last


def run_plan(denoiser: Denoiser, x: Tensor, plan: S.Plan, *, generator: Optional[torch.Generator] = None,
             noise: Optional[Callable[[int, Tensor], Tensor]] = None,
             callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = True,
             x_is_noise: bool = True, cond_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
             denoised_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
             cuda_graph=False) -> Tensor:
    """Execute a plan: one model call and one fused guided_step per step, no host syncs.

    x is unit starting noise (scaled by the plan's init_scale), or with x_is_noise=False
    an already noised sample in the model's input space (img2img). cond_fn adds
    classifier guidance (module docstring); the gradient is taken at the step's input.
    denoised_fn(x0, t) -> x0 edits each step's x0 prediction before it is clipped and
    used (e.g. inpainting pastes the known pixels in); the step then runs as two op
    calls, x0 first, and the edited x0 enters the update as a history operand.

    cuda_graph=True captures a whole step (model call + guided_step) as a CUDA graph
    per step signature and replays it (fastdiff/sampling/graphs.py): same samples, no
    per-launch host overhead. The model must not read device values on the host. Not
    with cond_fn or denoised_fn (they run user code between the step's parts). Instead of
    True, a ``graphs.GraphCache`` (or one of its scopes) keeps the graphs for later runs:
    a run with the same shapes and a denoiser that declares what it bakes in
    (``graph_key()``/``graph_inputs()``, as ``ClassifierFreeGuidance`` does) replays them
    without capturing.
    """
    if not plan.steps:
        raise ValueError("nothing to sample: the plan has no steps")
    # True, or a GraphCache / GraphScope (an empty GraphCache is falsy: test for False/None)
    graphed = cuda_graph is not False and cuda_graph is not None
    if graphed and (cond_fn is not None or denoised_fn is not None):
        raise ValueError("cuda_graph=True cannot capture cond_fn or denoised_fn (user code inside the step); "
                         "run those without cuda_graph")
    if not torch.is_floating_point(x):
        raise TypeError(f"the starting sample must be a floating-point tensor, got {x.dtype}")
    device = x.device
    width = max(len(s.row) for s in plan.steps)
    table = np.zeros((len(plan.steps), width))
    for i, s in enumerate(plan.steps):
        table[i, : len(s.row)] = s.row
    # Coefficients and timesteps go to the device once per run.
    rows = torch.tensor(table, dtype=torch.float32, device=device)
    ts = torch.tensor([s.t for s in plan.steps], dtype=plan.t_dtype, device=device)
    guidance = plan.extra.get("guidance") if cond_fn is not None else None
    if cond_fn is not None and guidance not in ("mean", "score"):
        raise ValueError(f"classifier guidance (cond_fn) is supported by the respaced ddpm and ddim samplers, "
                         f"not by {plan.name or 'this plan'}")
    if (denoised_fn is not None or guidance == "score") and \
            any(s.history or s.row[C.OUT_P] != 0.0 for s in plan.steps):
        raise ValueError(f"denoised_fn and score guidance need a sampler whose update reads the model output "
                         f"only through x0 (the respaced ddpm and ddim do); {plan.name or 'this plan'} does not")
    # x0 alone (first output, unclipped): for the callback of plans whose `denoised` is not
    # x0, and as the first of the two op calls of a step with denoised_fn.
    x0_rows = None
    if (callback is not None and not plan.denoised_is_x0) or denoised_fn is not None:
        x0_table = np.zeros((len(plan.steps), C.NUM_FIXED))
        x0_table[:, [C.X0_X, C.X0_P]] = table[:, [C.X0_X, C.X0_P]]
        x0_table[:, C.OUT_X0] = 1.0
        x0_rows = torch.tensor(x0_table, dtype=torch.float32, device=device)
    grad_coeffs = None
    if guidance == "score":
        # eps - sqrt(1 - a) g moves x0 by (1 - a) / sqrt(a) g, which enters the step through OUT_X0.
        alpha_bar = np.array([s.alpha_bar for s in plan.steps])
        grad_coeffs = torch.tensor(table[:, C.OUT_X0] * (1.0 - alpha_bar) / np.sqrt(alpha_bar),
                                   dtype=torch.float32, device=device)
    paste_rows = None
    if denoised_fn is not None:
        paste = np.zeros((len(plan.steps), C.NUM_FIXED + 1))
        paste[:, : C.NUM_FIXED] = table[:, : C.NUM_FIXED]
        paste[:, C.OUT_X0] = 0.0
        paste[:, C.NUM_FIXED] = table[:, C.OUT_X0]  # the edited x0, as history operand 0
        paste_rows = torch.tensor(paste, dtype=torch.float32, device=device)

    if x_is_noise and plan.init_scale != 1.0:
        x = x * plan.init_scale
    if graphed:
        cache = None if cuda_graph is True else cuda_graph
        return _run_graphed(denoiser, x, plan, rows, ts, x0_rows, generator=generator, noise=noise,
                            callback=callback, progress=progress, cache=cache)
    store = {}
    last_use = _last_uses(plan.steps)
    with progress_bar(len(plan.steps), plan.name or "sampling", progress) as tick:
        for i, step in enumerate(plan.steps):
            out = as_model_output(denoiser(x, ts[i]))
            z = None
            if step.noise:
                z = noise(i, x) if noise is not None else _randn(x, generator)
            want_x0 = callback is not None and plan.denoised_is_x0
            if denoised_fn is None:
                x_next, den = guided_step(
                    x, out.cond, out.uncond, out.scale,
                    coeffs=rows[i : i + 1, : len(step.row)], noise=z,
                    history=[store[ref] for ref in step.history],
                    clip_range=plan.clip_range, learned_variance=plan.learned_variance,
                    write_denoised=step.write_denoised or want_x0)
            else:
                den = denoised_fn(guided_step(x, out.cond, out.uncond, out.scale, coeffs=x0_rows[i : i + 1])[0],
                                  ts[i])
                if plan.clip_range is not None:
                    den = den.clamp(-plan.clip_range, plan.clip_range)
                x_next, _ = guided_step(x, out.cond, out.uncond, out.scale, coeffs=paste_rows[i : i + 1], noise=z,
                                        history=[den], learned_variance=plan.learned_variance)
            if guidance is not None:
                x_next = x_next + _guidance_shift(cond_fn(x, ts[i]), guidance, out, x, rows[i],
                                                  None if grad_coeffs is None else grad_coeffs[i],
                                                  plan.learned_variance)
            _keep_history(store, last_use, i, x, den)
            if callback is not None:
                x0 = den if plan.denoised_is_x0 else guided_step(
                    x, out.cond, out.uncond, out.scale, coeffs=x0_rows[i : i + 1],
                    clip_range=plan.clip_range)[0]
                callback(StepInfo(i, len(plan.steps), ts[i], x_next, x0))
            x = x_next
            tick()
    return x


# How run_plan(cuda_graph=True) captures a step: fastdiff.sampling.graphs.default_capture
# (CUDA graphs); tests on machines without a GPU swap in graphs.EagerCapture.
_capture_factory = None


def _graph_key(denoiser, x: Tensor, plan: S.Plan, ts: Tensor):
    """What a run's captured steps bake in besides the denoiser's weights, or None when the
    denoiser does not say what it bakes in (then its graphs are not kept)."""
    key = getattr(denoiser, "graph_key", None)
    if key is None:
        return None
    return (key(), tuple(x.shape), x.stride(), x.dtype, x.device, ts.dtype, plan.clip_range, plan.learned_variance)


def _run_graphed(denoiser: Denoiser, x: Tensor, plan: S.Plan, rows: Tensor, ts: Tensor, x0_rows: Optional[Tensor],
                 *, generator, noise, callback, progress, cache=None) -> Tensor:
    """run_plan's loop with each step replayed from a captured graph (see graphs.py)."""
    from .graphs import StepGraphs, StepSignature, default_capture

    # The whole run's noise first, in the eager loop's order: same generator, same draws.
    draws = {i: (noise(i, x) if noise is not None else _randn(x, generator))
             for i, s in enumerate(plan.steps) if s.noise}
    want_x0 = callback is not None and plan.denoised_is_x0

    key = _graph_key(denoiser, x, plan, ts) if cache is not None else None
    kept = cache.get(key) if key is not None else None
    if kept is not None:  # the graphs of an earlier run: refill what they read, replay
        graphs, kept_denoiser = kept
        for static, fresh in zip(kept_denoiser.graph_inputs(x.device), denoiser.graph_inputs(x.device)):
            static.copy_(fresh)
        graphs.x.copy_(x)
    else:
        def body(signature, x_in, t, row, z, history):
            out = as_model_output(denoiser(x_in, t))
            x_next, den = guided_step(x_in, out.cond, out.uncond, out.scale, coeffs=row, noise=z,
                                      history=history, clip_range=plan.clip_range,
                                      learned_variance=plan.learned_variance,
                                      write_denoised=signature.write_denoised)
            return out.cond, out.uncond, out.scale, x_next, den

        capture = (_capture_factory or default_capture)(x.device)
        graphs = StepGraphs(body, x, ts[0], capture, on_capture=None if cache is None else cache.count_capture)
        if key is not None:
            cache.put(key, (graphs, denoiser))
    store = {}
    last_use = _last_uses(plan.steps)
    with progress_bar(len(plan.steps), plan.name or "sampling", progress) as tick:
        for i, step in enumerate(plan.steps):
            width = len(step.row)
            signature = StepSignature(step.noise, len(step.history), step.write_denoised or want_x0, width)
            cond, uncond, scale, x_next, den = graphs.run(signature, rows[i : i + 1, :width], draws.get(i),
                                                          [store[ref] for ref in step.history], ts[i])
            _keep_history(store, last_use, i, graphs.x, den, copy=True)
            draws.pop(i, None)
            if callback is not None:
                x0 = den if plan.denoised_is_x0 else guided_step(
                    graphs.x, cond, uncond, scale, coeffs=x0_rows[i : i + 1], clip_range=plan.clip_range)[0]
                callback(StepInfo(i, len(plan.steps), ts[i], x_next.clone(), x0.clone()))
            graphs.x.copy_(x_next)
            tick()
    return graphs.x.clone()


def _guidance_shift(grad: Tensor, mode: str, out: ModelOutput, x: Tensor, row: Tensor,
                    grad_coeff: Optional[Tensor], learned_variance: bool) -> Tensor:
    """What classifier guidance adds to a step's output (see the module docstring)."""
    if grad.shape != x.shape:
        raise ValueError(f"cond_fn returned a gradient of shape {tuple(grad.shape)} for x of {tuple(x.shape)}")
    grad = grad.float()
    if mode == "score":
        shift = grad_coeff * grad
    elif learned_variance:  # the variance the step's noise used: exp of the interpolated log variance
        frac = 0.5 * (out.cond[:, x.shape[1]:].float() + 1.0)
        shift = torch.exp(frac * row[C.LOGVAR_MAX] + (1.0 - frac) * row[C.LOGVAR_MIN]) * grad
    else:
        shift = row[C.OUT_NOISE] ** 2 * grad
    return shift.to(x.dtype)


def _config(config: Optional[Union[SchedulerConfig, dict, str]]) -> SchedulerConfig:
    if config is None:
        return SchedulerConfig()
    if isinstance(config, SchedulerConfig):
        return config
    if isinstance(config, dict):
        return SchedulerConfig.from_dict(config)
    return SchedulerConfig.from_json(config)


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return int(num_steps)


def sample_ddim(denoiser, x, config=None, num_steps=50, *, eta=0.0, use_clipped_model_output=False, start=0, **kw):
    """DDIM, Song et al. 2021 (eq. 12); eta=0 deterministic, eta=1 DDPM-like."""
    plan = S.ddim_plan(_config(config), _check_steps(num_steps), eta, use_clipped_model_output, start)
    return run_plan(denoiser, x, plan, **kw)


def sample_ddpm(denoiser, x, config=None, num_steps=1000, *, timesteps=None, start=0, **kw):
    """Ancestral DDPM, Ho et al. 2020; fixed or learned-range variance (Nichol & Dhariwal 2021)."""
    num_steps = len(timesteps) if timesteps is not None else _check_steps(num_steps)
    return run_plan(denoiser, x, S.ddpm_plan(_config(config), num_steps, timesteps, start), **kw)


def sample_pndm(denoiser, x, config=None, num_steps=50, *, start=0, **kw):
    """PNDM, Liu et al. 2022: pseudo Runge-Kutta warm-up then pseudo linear multistep."""
    return run_plan(denoiser, x, S.pndm_plan(_config(config), _check_steps(num_steps), start), **kw)


def sample_euler(denoiser, x, config=None, num_steps=50, *, start=0, **kw):
    """Euler on the probability-flow ODE, Karras et al. 2022 (Alg. 1, no churn)."""
    return run_plan(denoiser, x, S.euler_plan(_config(config), _check_steps(num_steps), start=start), **kw)


def sample_euler_ancestral(denoiser, x, config=None, num_steps=50, *, start=0, **kw):
    """Euler with ancestral noise: step to sigma_down, add sigma_up noise (k-diffusion)."""
    plan = S.euler_plan(_config(config), _check_steps(num_steps), ancestral=True, start=start)
    return run_plan(denoiser, x, plan, **kw)


def sample_heun(denoiser, x, config=None, num_steps=50, *, start=0, **kw):
    """Heun's second-order method, Karras et al. 2022 (Alg. 1); 2 * steps - 1 model calls."""
    return run_plan(denoiser, x, S.heun_plan(_config(config), _check_steps(num_steps), start), **kw)


def sample_dpmpp_2m(denoiser, x, config=None, num_steps=25, *, karras=None, start=0, **kw):
    """DPM-Solver++(2M), Lu et al. 2022 (Alg. 2, midpoint); karras=True for Karras sigmas."""
    plan = S.dpmpp_2m_plan(_config(config), _check_steps(num_steps), karras, start)
    return run_plan(denoiser, x, plan, **kw)


def sample_dpmpp_2m_karras(denoiser, x, config=None, num_steps=25, **kw):
    """DPM-Solver++(2M) on the Karras et al. 2022 sigma grid (rho = 7)."""
    return sample_dpmpp_2m(denoiser, x, config, num_steps, karras=True, **kw)


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "pndm": sample_pndm,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m_karras,
}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None


def sample(name: str, denoiser, x, config=None, num_steps=50, **kw) -> Tensor:
    """Run the sampler called `name` (see SAMPLERS); keyword arguments as its function's."""
    return get_sampler(name)(denoiser, x, config, num_steps, **kw)
