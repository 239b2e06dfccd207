"""Starting a sampler part-way, from a noised image (SDEdit, Meng et al. 2022)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import steps as S
from .samplers import _check_steps, _config

_PLANS = {
    "ddim": lambda c, n, s: S.ddim_plan(c, n, start=s),
    "ddpm": lambda c, n, s: S.ddpm_plan(c, n, start=s),
    "pndm": lambda c, n, s: S.pndm_plan(c, n, start=s),
    "euler": lambda c, n, s: S.euler_plan(c, n, start=s),
    "euler_a": lambda c, n, s: S.euler_plan(c, n, ancestral=True, start=s),
    "heun": lambda c, n, s: S.heun_plan(c, n, start=s),
    "dpmpp_2m": lambda c, n, s: S.dpmpp_2m_plan(c, n, start=s),
    "dpmpp_2m_karras": lambda c, n, s: S.dpmpp_2m_plan(c, n, karras=True, start=s),
}


def start_index(num_steps: int, strength: float) -> int:
    """The first of `num_steps` steps to run for `strength` in (0, 1] (diffusers' get_timesteps)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(num_steps - min(int(num_steps * strength), num_steps), 0)


def noised_start(x0: Tensor, noise: Tensor, sampler: str, config, num_steps: int, strength: float,
                 kw: dict) -> Tensor:
    """x0 noised to the first step's level, in the model's input space; sets kw for sample()."""
    cfg = _config(config)
    start = start_index(_check_steps(num_steps), strength)
    plan = _PLANS[sampler](cfg, num_steps, start)
    if not plan.steps:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run")
    ab = float(plan.steps[0].alpha_bar)
    kw.update(start=start, x_is_noise=False)
    return np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
