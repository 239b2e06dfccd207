"""Noise schedules, timestep spacings and samplers as plain functions over a denoiser."""
from .denoiser import Denoiser, ModelOutput, as_model_output
from .noise import randn, randn_like
from .registry import SAMPLERS, SamplerSpec, check_num_steps, get_sampler
from .samplers import (
    StepInfo,
    build_plan,
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
    as_scheduler_config,
    glide_respacing,
    karras_sigmas,
    make_betas,
    spaced_timesteps,
)

__all__ = [
    "Denoiser", "ModelOutput", "as_model_output", "randn", "randn_like",
    "SAMPLERS", "SamplerSpec", "check_num_steps", "get_sampler", "StepInfo", "build_plan", "run_plan", "sample",
    "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_karras", "sample_euler",
    "sample_euler_ancestral", "sample_heun", "sample_pndm", "sample_discrete", "NoiseSchedule", "SchedulerConfig",
    "as_scheduler_config", "glide_respacing", "karras_sigmas", "make_betas", "spaced_timesteps",
]
