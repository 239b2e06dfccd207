"""Noise schedules, timestep spacings and samplers as plain functions over a denoiser."""
from .samplers import (
    SAMPLERS,
    StepInfo,
    get_sampler,
    run_plan,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_karras,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_pndm,
)
from .discrete import sample_discrete
from .schedules import (
    NoiseSchedule,
    SchedulerConfig,
    glide_respacing,
    karras_sigmas,
    make_betas,
    spaced_timesteps,
)

__all__ = [
    "SAMPLERS", "StepInfo", "get_sampler", "run_plan", "sample", "sample_ddim", "sample_ddpm",
    "sample_dpmpp_2m", "sample_dpmpp_2m_karras", "sample_euler", "sample_euler_ancestral",
    "sample_heun", "sample_pndm", "sample_discrete", "NoiseSchedule", "SchedulerConfig", "glide_respacing",
    "karras_sigmas", "make_betas", "spaced_timesteps",
]
