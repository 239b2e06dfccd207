"""Samplers: each is a short function that builds its plan (steps.py) and runs it.

Every sampler takes a denoiser ``denoiser(x, t) -> Tensor | ModelOutput`` (wrap a
conditional model with ``fastdiff.guidance.ClassifierFreeGuidance`` for CFG), unit
starting noise ``x``, a diffusers-style ``SchedulerConfig`` and the step count, and
returns the final sample. Which samplers there are, and what each can do, is the
registry's (registry.py). All of them share the conventions:

  generator   torch.Generator for every random draw (noise is drawn in the order and
              shape diffusers' schedulers draw it, so a seed reproduces their samples)
  noise       optional callable ``noise(step_index, like) -> Tensor`` replacing the draws
  callback    ``callback(StepInfo)`` after every model call
  progress    a tqdm bar over the model calls; False turns it off
  cond_fn     classifier guidance ``cond_fn(x, t) -> grad of log p(y | x)`` at the step's
              input x (model input space), on every sampler. The plan says how it enters
              (Plan.classifier_guidance): "mean" (ancestral DDPM, glide's condition_mean)
              shifts the step's mean by its variance times the gradient; "score" (the
              others, glide's condition_score) shifts eps by -sqrt(1 - alpha_bar) times it,
              i.e. x0 by (1 - alpha_bar) / sqrt(alpha_bar) times it -- k-diffusion's
              denoised + sigma^2 grad in its sigma form. A plan whose update reads x0 only
              gets the shift after clipping (as glide); one that reads the prediction itself
              (diffusers' DDIM, PNDM, Heun, DPM-Solver++) gets it on the prediction, before
              clipping, so its history holds the guided one (k-diffusion's guided denoiser).
              A cond_fn with a true attribute ``needs_alpha_bar`` (noised-CLIP guidance,
              which must know how noisy x is) is called ``cond_fn(x, t, alpha_bar=a)``: a, a
              float32 device tensor [1], is the alpha_bar of the step's input x (Step.alpha_bar:
              alphas_cumprod[t] on the integer-timestep samplers, 1 / (1 + sigma^2) on the
              sigma ones), from a table sent to the device once per run.

A plan with dynamic thresholding (Plan.threshold, from a config with thresholding=True;
ddpm, ddim, dpmpp_2m, dpmpp_2m_karras) runs each step as two op calls with the per-sample
quantile between them on the device (thresholding.py): x0 first, then the update reading
the thresholded x0 as a history operand. That x0 is what multistep history, callbacks
and classifier guidance see, as in diffusers (thresholding replaces clip_sample there).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from ..ops import coeffs as C
from ..ops.guided_step import guided_step
from . import steps as S
from .denoiser import Denoiser, ModelOutput, as_model_output
from .noise import randn_like
from .registry import SAMPLERS, get_sampler
from .thresholding import dynamic_threshold

GradFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class StepInfo:
    """What a callback sees after step `index` of `total`."""

    index: int
    total: int
    t: Tensor          # the timestep the model saw (device tensor; no sync unless you read it)
    x: Tensor          # the sample after the step (model input space)
    x0: Tensor         # the step's prediction of the clean sample
    stage: str = ""    # which model of a multi-stage pipeline (e.g. GLIDE's "base", "upsampler")


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


def _reads_only_x0(plan: S.Plan) -> bool:
    """Whether every update reads the model output only through its x0 prediction."""
    return not any(s.history or s.row[C.OUT_P] != 0.0 for s in plan.steps)


@dataclass
class _Tables:
    """A plan's per-step numbers on the device, made once per run."""

    rows: Tensor                          # the coefficient rows
    ts: Tensor                            # the timesteps
    x0_rows: Optional[Tensor] = None      # x0 alone (unclipped): previews, and a pasted step's first op call
    paste_rows: Optional[Tensor] = None   # the update reading the edited x0 as history operand 0, then its own
    alpha_bars: Optional[Tensor] = None   # per step: its input's alpha_bar (cond_fn's needs_alpha_bar)
    guidance: Optional[str] = None        # "mean", "score_x0" (shift the step's x0) or "score_p" (the prediction)
    grad_coeffs: Optional[Tensor] = None  # per step: what one unit of gradient adds (score forms)


def _coefficient_table(plan: S.Plan) -> np.ndarray:
    table = np.zeros((len(plan.steps), max(len(s.row) for s in plan.steps)))
    for i, s in enumerate(plan.steps):
        table[i, : len(s.row)] = s.row
    return table


def _guidance_form(plan: S.Plan) -> str:
    if plan.classifier_guidance == "mean":
        return "mean"
    if plan.classifier_guidance == "score":
        return "score_x0" if _reads_only_x0(plan) else "score_p"
    raise ValueError(f"classifier guidance (cond_fn) has no meaning for {plan.name or 'this plan'}")


def _score_coefficients(plan: S.Plan, table: np.ndarray, form: str) -> np.ndarray:
    """eps - sqrt(1 - a) g moves x0 by (1 - a) / sqrt(a) g: through OUT_X0 into the step's
    output ("score_x0"), or as the prediction change that moves x0 so ("score_p")."""
    alpha_bar = np.array([s.alpha_bar for s in plan.steps], dtype=np.float64)
    x0_shift = (1.0 - alpha_bar) / np.sqrt(alpha_bar)
    if form == "score_x0":
        return table[:, C.OUT_X0] * x0_shift
    return x0_shift / table[:, C.X0_P]


def _device_tables(plan: S.Plan, device, *, want_x0: bool, denoised_fn: bool, guided: bool,
                   alpha_bar: bool = False) -> _Tables:
    table = _coefficient_table(plan)
    # Coefficients and timesteps go to the device once per run.
    tables = _Tables(torch.tensor(table, dtype=torch.float32, device=device),
                     torch.tensor([s.t for s in plan.steps], dtype=plan.t_dtype, device=device))
    pasted = denoised_fn or plan.threshold is not None
    if want_x0 or pasted:
        x0_table = np.zeros((len(plan.steps), C.NUM_FIXED))
        x0_table[:, [C.X0_X, C.X0_P]] = table[:, [C.X0_X, C.X0_P]]
        x0_table[:, C.OUT_X0] = 1.0
        tables.x0_rows = torch.tensor(x0_table, dtype=torch.float32, device=device)
    if pasted:
        paste = np.zeros((len(plan.steps), table.shape[1] + 1))
        paste[:, : C.NUM_FIXED] = table[:, : C.NUM_FIXED]
        paste[:, C.OUT_X0] = 0.0
        paste[:, C.NUM_FIXED] = table[:, C.OUT_X0]  # the edited x0, as history operand 0
        paste[:, C.NUM_FIXED + 1:] = table[:, C.NUM_FIXED:]  # then the step's own history
        tables.paste_rows = torch.tensor(paste, dtype=torch.float32, device=device)
    if alpha_bar:
        tables.alpha_bars = torch.tensor([s.alpha_bar for s in plan.steps], dtype=torch.float32, device=device)
    if guided:
        tables.guidance = _guidance_form(plan)
        if tables.guidance != "mean":
            tables.grad_coeffs = torch.tensor(_score_coefficients(plan, table, tables.guidance),
                                              dtype=torch.float32, device=device)
    return tables


def _check_run(plan: S.Plan, x: Tensor, graphed: bool, cond_fn, denoised_fn) -> None:
    if not plan.steps:
        raise ValueError("nothing to sample: the plan has no steps")
    if graphed and (cond_fn is not None or denoised_fn is not None):
        raise ValueError("cuda_graph=True cannot capture cond_fn or denoised_fn (user code inside the step); "
                         "run those without cuda_graph")
    if not torch.is_floating_point(x):
        raise TypeError(f"the starting sample must be a floating-point tensor, got {x.dtype}")
    if denoised_fn is not None and not _reads_only_x0(plan):
        raise ValueError(f"denoised_fn needs a sampler whose update reads the model output only through x0 "
                         f"(ddpm, euler, euler_a, ddim with use_clipped_model_output and GLIDE's plans do); "
                         f"{plan.name or 'this plan'} does not")
    if cond_fn is not None:
        _guidance_form(plan)


def run_plan(denoiser: Denoiser, x: Tensor, plan: S.Plan, *, generator: Optional[torch.Generator] = None,
             noise: Optional[Callable[[int, Tensor], Tensor]] = None,
             callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = True,
             x_is_noise: bool = True, cond_fn: Optional[GradFn] = None,
             denoised_fn: Optional[GradFn] = None, cuda_graph=False) -> Tensor:
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
    # True, or a GraphCache / GraphScope (an empty GraphCache is falsy: test for False/None)
    graphed = cuda_graph is not False and cuda_graph is not None
    _check_run(plan, x, graphed, cond_fn, denoised_fn)
    tables = _device_tables(plan, x.device, want_x0=callback is not None and not plan.denoised_is_x0,
                            denoised_fn=denoised_fn is not None, guided=cond_fn is not None,
                            alpha_bar=bool(getattr(cond_fn, "needs_alpha_bar", False)))
    if x_is_noise and plan.init_scale != 1.0:
        x = x * plan.init_scale
    if graphed:
        cache = None if cuda_graph is True else cuda_graph
        return _run_graphed(denoiser, x, plan, tables, generator=generator, noise=noise, callback=callback,
                            progress=progress, cache=cache)
    return _run_eager(denoiser, x, plan, tables, generator=generator, noise=noise, callback=callback,
                      progress=progress, cond_fn=cond_fn, denoised_fn=denoised_fn)


def _run_eager(denoiser: Denoiser, x: Tensor, plan: S.Plan, tables: _Tables, *, generator, noise, callback,
               progress, cond_fn, denoised_fn) -> Tensor:
    """run_plan's loop, one step after another."""
    store = {}
    last_use = _last_uses(plan.steps)
    with progress_bar(len(plan.steps), plan.name or "sampling", progress) as tick:
        for i, step in enumerate(plan.steps):
            out = as_model_output(denoiser(x, tables.ts[i]))
            z = (noise(i, x) if noise is not None else randn_like(x, generator)) if step.noise else None
            grad = _gradient(cond_fn, x, tables, i) if cond_fn is not None else None
            if tables.guidance == "score_p":
                out = _shift_prediction(out, tables.grad_coeffs[i] * grad)
            want_x0 = callback is not None and plan.denoised_is_x0
            history = [store[ref] for ref in step.history]
            if denoised_fn is None and plan.threshold is None:
                x_next, den = guided_step(
                    x, out.cond, out.uncond, out.scale,
                    coeffs=tables.rows[i : i + 1, : len(step.row)], noise=z,
                    history=history, clip_range=plan.clip_range, learned_variance=plan.learned_variance,
                    write_denoised=step.write_denoised or want_x0)
            else:
                x_next, den = _pasted_step(x, out, tables.x0_rows[i : i + 1],
                                           tables.paste_rows[i : i + 1, : len(step.row) + 1],
                                           tables.ts[i], z, history, plan, denoised_fn)
            if tables.guidance in ("mean", "score_x0"):
                x_next = x_next + _step_shift(grad, tables, i, out, x, plan.learned_variance)
            _keep_history(store, last_use, i, x, den)
            if callback is not None:
                x0 = den if plan.denoised_is_x0 else guided_step(
                    x, out.cond, out.uncond, out.scale, coeffs=tables.x0_rows[i : i + 1],
                    clip_range=plan.clip_range)[0]
                callback(StepInfo(i, len(plan.steps), tables.ts[i], x_next, x0))
            x = x_next
            tick()
    return x


def _pasted_step(x: Tensor, out: ModelOutput, x0_row: Tensor, paste_row: Tensor, t: Tensor, z: Optional[Tensor],
                 history: list, plan: S.Plan, denoised_fn: Optional[GradFn] = None):
    """One step with x0 edited between two op calls: x0 first; then denoised_fn's edit, and
    dynamic thresholding or clipping; then the update on the edited x0 (history operand 0)."""
    den = guided_step(x, out.cond, out.uncond, out.scale, coeffs=x0_row)[0]
    if denoised_fn is not None:
        den = denoised_fn(den, t)
    if plan.threshold is not None:
        den = dynamic_threshold(den, *plan.threshold)
    elif plan.clip_range is not None:
        den = den.clamp(-plan.clip_range, plan.clip_range)
    x_next, _ = guided_step(x, out.cond, out.uncond, out.scale, coeffs=paste_row, noise=z,
                            history=[den, *history], learned_variance=plan.learned_variance)
    return x_next, den


def _gradient(cond_fn: GradFn, x: Tensor, tables: _Tables, i: int) -> Tensor:
    if tables.alpha_bars is not None:
        grad = cond_fn(x, tables.ts[i], alpha_bar=tables.alpha_bars[i : i + 1])
    else:
        grad = cond_fn(x, tables.ts[i])
    if not isinstance(grad, Tensor) or grad.shape != x.shape:
        shape = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(f"cond_fn returned a gradient of shape {shape} for x of {tuple(x.shape)}")
    return grad.float()


def _shift_prediction(out: ModelOutput, shift: Tensor) -> ModelOutput:
    """The model's prediction moved by `shift` (both CFG halves, so the guided combine moves
    by it too); extra channels (a learned variance) stay."""
    def moved(p: Optional[Tensor]) -> Optional[Tensor]:
        if p is None:
            return None
        channels = shift.shape[1]
        if p.shape[1] == channels:
            return p + shift.to(p.dtype)
        return torch.cat([p[:, :channels] + shift.to(p.dtype), p[:, channels:]], dim=1)
    return ModelOutput(moved(out.cond), moved(out.uncond), out.scale)


def _step_shift(grad: Tensor, tables: _Tables, i: int, out: ModelOutput, x: Tensor, learned_variance: bool) -> Tensor:
    """What classifier guidance adds to a step's output: variance * grad ("mean"), or the
    x0 shift carried through the update ("score_x0")."""
    row = tables.rows[i]
    if tables.guidance == "score_x0":
        shift = tables.grad_coeffs[i] * grad
    elif learned_variance:  # the variance the step's noise used: exp of the interpolated log variance
        frac = 0.5 * (out.cond[:, x.shape[1]:].float() + 1.0)
        shift = torch.exp(frac * row[C.LOGVAR_MAX] + (1.0 - frac) * row[C.LOGVAR_MIN]) * grad
    else:
        shift = row[C.OUT_NOISE] ** 2 * grad
    return shift.to(x.dtype)


# How run_plan(cuda_graph=True) captures a step: fastdiff.sampling.graphs.default_capture
# (CUDA graphs); tests on machines without a GPU swap in graphs.EagerCapture.
_capture_factory = None


def _graph_key(denoiser, x: Tensor, plan: S.Plan, ts: Tensor):
    """What a run's captured steps bake in besides the denoiser's weights, or None when the
    denoiser does not say what it bakes in (then its graphs are not kept)."""
    key = getattr(denoiser, "graph_key", None)
    if key is None:
        return None
    return (key(), tuple(x.shape), x.stride(), x.dtype, x.device, ts.dtype, plan.clip_range, plan.learned_variance,
            plan.threshold)


def _run_graphed(denoiser: Denoiser, x: Tensor, plan: S.Plan, tables: _Tables, *, generator, noise, callback,
                 progress, cache=None) -> Tensor:
    """run_plan's loop with each step replayed from a captured graph (see graphs.py)."""
    from .graphs import StepSignature

    # The whole run's noise first, in the eager loop's order: same generator, same draws.
    draws = {i: (noise(i, x) if noise is not None else randn_like(x, generator))
             for i, s in enumerate(plan.steps) if s.noise}
    want_x0 = callback is not None and plan.denoised_is_x0
    graphs = _step_graphs(denoiser, x, plan, tables.ts, cache)
    store = {}
    last_use = _last_uses(plan.steps)
    # A thresholded step's row: its x0 row, then its pasted update's (the body splits them).
    rows = tables.rows if plan.threshold is None else torch.cat([tables.x0_rows, tables.paste_rows], dim=1)
    with progress_bar(len(plan.steps), plan.name or "sampling", progress) as tick:
        for i, step in enumerate(plan.steps):
            width = len(step.row) if plan.threshold is None else C.NUM_FIXED + len(step.row) + 1
            signature = StepSignature(step.noise, len(step.history),
                                      step.write_denoised or want_x0 or plan.threshold is not None, width)
            cond, uncond, scale, x_next, den = graphs.run(signature, rows[i : i + 1, :width], draws.get(i),
                                                          [store[ref] for ref in step.history], tables.ts[i])
            _keep_history(store, last_use, i, graphs.x, den, copy=True)
            draws.pop(i, None)
            if callback is not None:
                x0 = den if plan.denoised_is_x0 else guided_step(
                    graphs.x, cond, uncond, scale, coeffs=tables.x0_rows[i : i + 1], clip_range=plan.clip_range)[0]
                callback(StepInfo(i, len(plan.steps), tables.ts[i], x_next.clone(), x0.clone()))
            graphs.x.copy_(x_next)
            tick()
    return graphs.x.clone()


def _step_graphs(denoiser: Denoiser, x: Tensor, plan: S.Plan, ts: Tensor, cache):
    """The run's StepGraphs, holding x: an earlier run's from `cache` (refilled with what this
    run's denoiser reads), or new ones that capture each step signature on first use."""
    from .graphs import StepGraphs, default_capture

    key = _graph_key(denoiser, x, plan, ts) if cache is not None else None
    kept = cache.get(key) if key is not None else None
    if kept is not None:
        graphs, kept_denoiser = kept
        for static, fresh in zip(kept_denoiser.graph_inputs(x.device), denoiser.graph_inputs(x.device)):
            static.copy_(fresh)
        graphs.x.copy_(x)
        return graphs

    def body(signature, x_in, t, row, z, history):
        out = as_model_output(denoiser(x_in, t))
        if plan.threshold is not None:
            x_next, den = _pasted_step(x_in, out, row[:, : C.NUM_FIXED], row[:, C.NUM_FIXED :], t, z, history, plan)
            return out.cond, out.uncond, out.scale, x_next, den
        x_next, den = guided_step(x_in, out.cond, out.uncond, out.scale, coeffs=row, noise=z,
                                  history=history, clip_range=plan.clip_range,
                                  learned_variance=plan.learned_variance,
                                  write_denoised=signature.write_denoised)
        return out.cond, out.uncond, out.scale, x_next, den

    capture = (_capture_factory or default_capture)(x.device)
    graphs = StepGraphs(body, x, ts[0], capture, on_capture=None if cache is None else cache.count_capture)
    if key is not None:
        cache.put(key, (graphs, denoiser))
    return graphs


def sample_ddim(denoiser, x, config=None, num_steps=50, *, eta=0.0, use_clipped_model_output=False, start=0, **kw):
    """DDIM, Song et al. 2021 (eq. 12); eta=0 deterministic, eta=1 DDPM-like."""
    return sample("ddim", denoiser, x, config, num_steps, eta=eta, use_clipped_model_output=use_clipped_model_output,
                  start=start, **kw)


def sample_ddpm(denoiser, x, config=None, num_steps=1000, *, timesteps=None, start=0, **kw):
    """Ancestral DDPM, Ho et al. 2020; fixed or learned-range variance (Nichol & Dhariwal 2021)."""
    if timesteps is not None:
        num_steps = len(timesteps)
    return sample("ddpm", denoiser, x, config, num_steps, timesteps=timesteps, start=start, **kw)


def sample_pndm(denoiser, x, config=None, num_steps=50, *, start=0, **kw):
    """PNDM, Liu et al. 2022: pseudo Runge-Kutta warm-up then pseudo linear multistep."""
    return sample("pndm", denoiser, x, config, num_steps, start=start, **kw)


def sample_euler(denoiser, x, config=None, num_steps=50, *, start=0, **kw):
    """Euler on the probability-flow ODE, Karras et al. 2022 (Alg. 1, no churn)."""
    return sample("euler", denoiser, x, config, num_steps, start=start, **kw)


def sample_euler_ancestral(denoiser, x, config=None, num_steps=50, *, start=0, **kw):
    """Euler with ancestral noise: step to sigma_down, add sigma_up noise (k-diffusion)."""
    return sample("euler_a", denoiser, x, config, num_steps, start=start, **kw)


def sample_heun(denoiser, x, config=None, num_steps=50, *, start=0, **kw):
    """Heun's second-order method, Karras et al. 2022 (Alg. 1); 2 * steps - 1 model calls."""
    return sample("heun", denoiser, x, config, num_steps, start=start, **kw)


def sample_dpmpp_2m(denoiser, x, config=None, num_steps=25, *, karras=None, start=0, **kw):
    """DPM-Solver++(2M), Lu et al. 2022 (Alg. 2, midpoint); karras=True for Karras sigmas."""
    return sample("dpmpp_2m", denoiser, x, config, num_steps, karras=karras, start=start, **kw)


def sample_dpmpp_2m_karras(denoiser, x, config=None, num_steps=25, **kw):
    """DPM-Solver++(2M) on the Karras et al. 2022 sigma grid (rho = 7)."""
    return sample("dpmpp_2m_karras", denoiser, x, config, num_steps, **kw)


def build_plan(name: str, config, num_steps: int, *, start: int = 0, **options) -> S.Plan:
    """The plan of sampler `name` (see registry.SAMPLERS), every argument checked first."""
    return get_sampler(name).build_plan(config, num_steps, start=start, **options)


_RUN_OPTIONS = ("generator", "noise", "callback", "progress", "x_is_noise", "cond_fn", "denoised_fn", "cuda_graph")


def sample(name: str, denoiser, x, config=None, num_steps=50, *, start: int = 0, **kw) -> Tensor:
    """Run the sampler called `name` (see SAMPLERS): its options (e.g. eta) build the plan,
    the rest go to run_plan."""
    run = {k: kw.pop(k) for k in _RUN_OPTIONS if k in kw}
    return run_plan(denoiser, x, build_plan(name, config, num_steps, start=start, **kw), **run)


__all__ = ["SAMPLERS", "StepInfo", "build_plan", "get_sampler", "run_plan", "sample"]
