"""Starting a sampler part-way, from a noised image (SDEdit, Meng et al. 2022)."""
from __future__ import annotations

import numpy as np
from torch import Tensor

from .registry import check_num_steps, get_sampler
from .samplers import build_plan


def start_index(num_steps: int, strength: float) -> int:
    """The first of `num_steps` steps to run for `strength` in (0, 1] (diffusers' get_timesteps)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(num_steps - min(int(num_steps * strength), num_steps), 0)


def noised_start(x0: Tensor, noise: Tensor, sampler: str, config, num_steps: int, strength: float,
                 kw: dict) -> Tensor:
    """x0 noised to the first step's level, in the model's input space; sets kw for sample()."""
    if not get_sampler(sampler).img2img:
        raise ValueError(f"the {sampler} sampler cannot start part-way (img2img)")
    start = start_index(check_num_steps(sampler, config, num_steps), strength)
    plan = build_plan(sampler, config, num_steps, start=start)
    if not plan.steps:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run")
    ab = float(plan.steps[0].alpha_bar)
    kw.update(start=start, x_is_noise=False)
    return np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
