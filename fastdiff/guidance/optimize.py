"""CLIP-guided optimisation of the starting noise x_T (reference 003, approach 2, after DiffusionCLIP).

The sample is a deterministic function of x_T through a DDIM chain (eta = 0, or any sampler
that draws no noise), so the CLIP cosine distance between the final image and a caption can be
lowered by gradient descent on x_T itself. 003 could keep only ~100 steps' activations in
memory; here every step is checkpointed (torch.utils.checkpoint): the forward keeps only each
step's input sample, and the backward recomputes one step at a time, so memory stays that of
one step (plus the samples, a few KB each) whatever the step count. Gradients go through the
fused ``guided_step`` (its backward is registered with torch.library), the model, the decoder
and CLIP.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..ops.guided_step import guided_step
from ..sampling import steps as S
from ..sampling.denoiser import as_model_output
from .contrastive import ClipEncoders


@dataclass
class LatentOptimization:
    """What ``optimize_latents`` returns."""

    latents: Tensor          # the optimised x_T (unit-noise scale: generate(latents=...) takes it)
    images: object           # its images, in the requested output type
    distances: Tensor        # [iterations + 1, B]: CLIP cosine distance before each update, and at the end

    @property
    def losses(self) -> List[float]:
        """The mean distance per iteration (and at the end)."""
        return self.distances.mean(dim=1).tolist()


def check_optimisation(plan: S.Plan, iterations, lr) -> tuple:
    """(iterations, lr) checked, and the plan refused unless it is deterministic."""
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if plan.threshold is not None:
        raise ValueError("x_T optimisation does not run dynamic thresholding; use a scheduler config with "
                         "thresholding off")
    noisy = [i for i, s in enumerate(plan.steps) if s.noise]
    if noisy:
        raise ValueError(f"x_T optimisation needs a deterministic sampler (ddim with eta=0, euler, heun, dpmpp_2m, "
                         f"pndm): {plan.name or 'this plan'} draws noise at {len(noisy)} of its {len(plan.steps)} "
                         f"steps, so the image is not a function of x_T")
    return int(iterations), float(lr)


def run_chain(denoiser, x: Tensor, plan: S.Plan, *, checkpoint: bool = True) -> Tensor:
    """The plan's final sample from unit noise x, differentiable in x; each step checkpointed.
    Its coefficient table and history bookkeeping are run_plan's (sampling.samplers)."""
    from ..sampling.samplers import _coefficient_table, _keep_history, _last_uses

    rows = torch.tensor(_coefficient_table(plan), dtype=torch.float32, device=x.device)
    ts = torch.tensor([s.t for s in plan.steps], dtype=plan.t_dtype, device=x.device)
    last_use = _last_uses(plan.steps)
    store = {}
    x = x * plan.init_scale if plan.init_scale != 1.0 else x
    for i, step in enumerate(plan.steps):
        def one_step(x_in: Tensor, *history: Tensor, i=i, step=step):
            out = as_model_output(denoiser(x_in, ts[i]))
            return guided_step(x_in, out.cond, out.uncond, out.scale, coeffs=rows[i : i + 1, : len(step.row)],
                               history=list(history), clip_range=plan.clip_range,
                               learned_variance=plan.learned_variance, write_denoised=step.write_denoised)
        history = [store[ref] for ref in step.history]
        if checkpoint and torch.is_grad_enabled():
            x_next, den = _checkpoint(one_step, x, *history, use_reentrant=False)
        else:
            x_next, den = one_step(x, *history)
        _keep_history(store, last_use, i, x, den)
        x = x_next
    return x


def cosine_distance(z_image: Tensor, z_text: Tensor) -> Tensor:
    """1 - cos between unit image and caption embeddings, per image (DiffusionCLIP's global CLIP loss)."""
    return 1.0 - (z_image * z_text).sum(-1)


def optimize_start(denoiser, x_T: Tensor, plan: S.Plan, *, clip: ClipEncoders, z_text: Tensor,
                   to_image: Callable[[Tensor], Tensor], iterations: int, lr: float, checkpoint: bool = True,
                   progress: bool = True, callback: Optional[Callable[[int, Tensor], None]] = None):
    """Adam on x_T for `iterations` updates, minimising the mean CLIP cosine distance of
    to_image(final sample) to z_text ([1 or B, D], unit). Returns (x_T, final image, distances)."""
    from ..sampling.samplers import progress_bar

    t0 = torch.zeros(x_T.shape[0], dtype=torch.long, device=x_T.device)
    z_text = z_text.to(x_T.device)
    x = x_T.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    distances = []

    def distance(image: Tensor) -> Tensor:
        return cosine_distance(clip.image_embeddings(image.float(), t0 if clip.noised else None), z_text)

    with torch.inference_mode(False), torch.enable_grad(), progress_bar(iterations, "optimising x_T", progress) as tick:
        for k in range(iterations):
            d = distance(to_image(run_chain(denoiser, x, plan, checkpoint=checkpoint)))
            distances.append(d.detach())
            optimizer.zero_grad(set_to_none=True)
            d.mean().backward()
            if x.grad is None:
                raise RuntimeError("no gradient reached x_T: the chain is not differentiable (a model or op "
                                   "without a backward?)")
            optimizer.step()
            if callback is not None:
                callback(k, d.detach())
            tick()
    with torch.no_grad():
        image = to_image(run_chain(denoiser, x.detach(), plan, checkpoint=False))
        distances.append(distance(image))
    return x.detach(), image, torch.stack(distances)
