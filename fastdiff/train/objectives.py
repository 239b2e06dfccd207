"""The diffusion training objective: forward process, targets, P2 weights, conditioning dropout.

The training noise schedule is read from the same scheduler config the exported pipeline
samples with (fastdiff's SchedulerConfig -> diffusers' float32 alphas_cumprod), so the
model is trained on exactly the alpha_bar(t) it is later sampled with.

Default schedule, for 4x8x8 latents: squaredcos_cap_v2 (Nichol & Dhariwal 2021) with
v-prediction (Salimans & Ho 2022). The cosine schedule was made for low-resolution
images, where SD's scaled_linear leaves the last timestep at alpha_bar = 0.0047: on 256
latent values that still carries the layout and colours, so training never sees the
pure noise sampling starts from (Lin et al. 2023). Cosine ends at alpha_bar ~ 1e-9,
where an epsilon model's x0 = (x - sigma eps) / alpha divides by ~5e-5 and the first
solver step explodes; v-prediction's x0 = alpha x - sigma v stays bounded. Hence "auto":
cosine for v_prediction, scaled_linear (SD's 0.00085..0.012) for epsilon.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor

from ..sampling.schedules import SchedulerConfig
from .config import DiffusionTraining

SD_BETA_START, SD_BETA_END = 0.00085, 0.012


def beta_schedule_for(d: DiffusionTraining) -> str:
    if d.beta_schedule != "auto":
        return d.beta_schedule
    return "squaredcos_cap_v2" if d.prediction_type == "v_prediction" else "scaled_linear"


def scheduler_config(d: DiffusionTraining) -> dict:
    """diffusers DPMSolverMultistepScheduler config over the training schedule: DPM-Solver++(2M)
    gives good samples in ~20 steps, and its linspace spacing starts at t = T-1, the step trained
    on pure noise. clip_sample false as in SD's configs: a latent model's x0 must not be clipped
    to [-1, 1], which DDIM and DDPM (read from this config) would otherwise do by default."""
    return {
        "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1",
        "num_train_timesteps": d.num_train_timesteps, "beta_start": SD_BETA_START, "beta_end": SD_BETA_END,
        "beta_schedule": beta_schedule_for(d), "trained_betas": None, "prediction_type": d.prediction_type,
        "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
        "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "final_sigmas_type": "zero", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0, "timestep_spacing": "linspace",
        "steps_offset": 1,  # unused by linspace spacing; 1 is what diffusers' SD pipeline insists on
        "rescale_betas_zero_snr": False, "variance_type": None,
    }


def training_alphas_cumprod(d: DiffusionTraining) -> Tensor:
    """alpha_bar per training timestep [T], float64, as the exported scheduler computes it."""
    config = SchedulerConfig.from_dict(scheduler_config(d))
    return torch.from_numpy(config.noise_schedule("dpmpp_2m").alphas_cumprod.copy())


def snr(alphas_cumprod: Tensor) -> Tensor:
    return alphas_cumprod / (1 - alphas_cumprod)


def p2_weights(alphas_cumprod: Tensor, gamma: float, k: float) -> Tensor:
    """Choi et al. 2022 (Perception Prioritized training), eq. 8: lambda'_t = 1 / (k + SNR(t))^gamma."""
    return (k + snr(alphas_cumprod)) ** -gamma


def noised(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """q(x_t | x_0) = N(sqrt(alpha_bar) x0, (1 - alpha_bar) I); alpha_bar is [B]."""
    a = alpha_bar.sqrt().view(-1, *([1] * (x0.dim() - 1)))
    s = (1 - alpha_bar).sqrt().view_as(a)
    return a * x0 + s * noise


def target(x0: Tensor, noise: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "epsilon":
        return noise
    # v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4), as diffusers' get_velocity
    a = alpha_bar.sqrt().view(-1, *([1] * (x0.dim() - 1)))
    s = (1 - alpha_bar).sqrt().view_as(a)
    return a * noise - s * x0


def drop_captions(captions: Sequence[str], rate: float, generator: torch.Generator) -> List[str]:
    """Each caption replaced by "" with probability `rate` (one draw per caption, always drawn, so
    the random stream does not depend on the rate): the model also learns the unconditional
    prediction that classifier-free guidance needs, from the empty prompt's embedding, which is
    the one the pipeline uses as its unconditional input."""
    draws = torch.rand(len(captions), generator=generator)
    return ["" if float(u) < rate else c for u, c in zip(draws, captions)]


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over each sample's latent: [B]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str):
    """Linear warm-up to the base rate, then constant or cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor
