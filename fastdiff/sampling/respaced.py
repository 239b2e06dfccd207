"""Respaced diffusion (improved DDPM / ADM / GLIDE): float64 schedules and their plans.

A model trained on T steps is sampled on a subset of its timesteps; the subset gets its
own betas, 1 - alpha_bar_k / alpha_bar_{k-1}, recomputed from the kept alpha_bars, and
every quantity of the sampler follows from those (Nichol & Dhariwal 2021, section 4).
This module holds that arithmetic exactly as glide-text2im does it (numpy float64
arrays; the model is called with the original timestep), as plans for ``run_plan``:

  respaced_ddpm_plan   ancestral sampling, fixed or learned-range variance (eq. 15),
                       classifier guidance by shifting the mean (Sohl-Dickstein 2015)
  respaced_ddim_plan   DDIM (Song et al. 2021, eq. 12) from the clipped x0, classifier
                       guidance through the score (Song et al. 2021b)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import steps as S
from .schedules import betas_for_alpha_bar, glide_respacing

NAMED_SCHEDULES = ("linear", "squaredcos_cap_v2")


def named_betas(name: str, num_timesteps: int) -> np.ndarray:
    """GLIDE's training betas (float64): "linear" scaled to any T, or the cosine schedule."""
    if name == "linear":
        scale = 1000 / num_timesteps  # Ho et al.'s 1e-4 .. 0.02 at T = 1000, stretched for other T
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_timesteps)
    raise ValueError(f"unknown noise_schedule {name!r}; valid: {', '.join(NAMED_SCHEDULES)}")


class RespacedSchedule:
    """The kept timesteps of a T-step schedule and the respaced process's alpha_bars.

    ``timesteps`` are original (model) timesteps, ascending; ``alphas_cumprod[k]`` is the
    respaced process's alpha_bar at its k-th step, computed as glide-text2im does: new
    betas from the kept alpha_bars, then their cumulative product again.
    """

    def __init__(self, betas: np.ndarray, kept: Sequence[int]):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        kept = sorted(set(int(t) for t in kept))
        if not kept or kept[0] < 0 or kept[-1] >= len(betas):
            raise ValueError(f"kept timesteps must lie in [0, {len(betas)}), got {kept[:3]}...{kept[-3:]}")
        base = np.cumprod(1.0 - betas)
        last, new_betas = 1.0, []
        for t in kept:
            new_betas.append(1.0 - base[t] / last)
            last = base[t]
        self.num_train_timesteps = len(betas)
        self.timesteps = kept
        self.betas = np.array(new_betas)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @classmethod
    def named(cls, schedule: str, num_timesteps: int, respacing) -> "RespacedSchedule":
        """e.g. named("squaredcos_cap_v2", 1000, "100") or ("linear", 1000, "fast27")."""
        if respacing in ("", None):
            respacing = str(num_timesteps)
        if isinstance(respacing, (int, np.integer)):
            respacing = str(int(respacing))
        return cls(named_betas(schedule, num_timesteps), glide_respacing(num_timesteps, respacing))

    def __len__(self) -> int:
        return len(self.timesteps)

    def posterior_log_variance_clipped(self) -> np.ndarray:
        # The posterior variance is 0 at the first step; GLIDE uses the second step's there.
        pv = self.posterior_variance
        return np.log(np.append(pv[1], pv[1:]) if len(pv) > 1 else np.maximum(pv, 1e-20))


def respaced_ddpm_plan(schedule: RespacedSchedule, learned_variance: bool = True, clip_denoised: bool = True,
                       fixed_variance: str = "small") -> S.Plan:
    """Ancestral sampling over the respaced steps, noisiest first (eps-prediction model).

    learned_variance: the model's extra channels v in [-1, 1] pick
    log var = (v+1)/2 * log beta + (1-v)/2 * log beta_tilde (clipped), per element;
    otherwise a fixed variance: "small" (beta_tilde) or "large" (beta, beta_tilde at the
    last step), glide-text2im's tables. In k-diffusion's form: see steps.ddpm_plan.
    """
    if fixed_variance not in ("small", "large"):
        raise ValueError(f"fixed_variance must be 'small' or 'large', got {fixed_variance!r}")
    order = list(reversed(range(len(schedule))))
    betas, pv = schedule.betas, schedule.posterior_variance
    variances = pv if fixed_variance == "small" else np.append(pv[1], betas[1:]) if len(pv) > 1 else betas
    min_log_variances = schedule.posterior_log_variance_clipped()[order] if learned_variance else None
    steps = S.ddpm_steps([schedule.timesteps[k] for k in order], schedule.alphas_cumprod[order],
                         schedule.alphas_cumprod_prev[order], betas[order], variances[order],
                         min_log_variances=min_log_variances, noise_at_last=False)
    return S.Plan(steps, clip_range=1.0 if clip_denoised else None, learned_variance=learned_variance,
                  name="ddpm", classifier_guidance="mean")


def respaced_ddim_plan(schedule: RespacedSchedule, eta: float = 0.0, clip_denoised: bool = True) -> S.Plan:
    """DDIM over the respaced steps: x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps(x0) + s z,
    with eps re-derived from the (clipped) x0 as glide-text2im does. In k-diffusion's form:
    see steps.ddim_plan."""
    eta = S.check_eta(eta)
    order = list(reversed(range(len(schedule))))
    steps = S.ddim_steps([schedule.timesteps[k] for k in order], schedule.alphas_cumprod[order],
                         schedule.alphas_cumprod_prev[order], eta=eta, eps_from_x0=True, noise_at_last=False)
    return S.Plan(steps, clip_range=1.0 if clip_denoised else None, name="ddim", classifier_guidance="score")
