"""Noise schedules, timestep spacings and samplers as plain functions over a denoiser.

Names are resolved on first use (PEP 562), so the sampler names (names.py) are read without
importing torch: `fastdiff --help` lists them that way.
"""
from .._lazy import lazy_names

_EXPORTS = {
    "Denoiser": "denoiser", "ModelOutput": "denoiser", "as_model_output": "denoiser",
    "randn": "noise", "randn_like": "noise",
    "SAMPLER_NAMES": "names",
    "SAMPLERS": "registry", "SamplerSpec": "registry", "check_num_steps": "registry", "get_sampler": "registry",
    "StepInfo": "samplers", "build_plan": "samplers", "run_plan": "samplers", "sample": "samplers",
    "sample_ddim": "samplers", "sample_ddpm": "samplers", "sample_dpmpp_2m": "samplers",
    "sample_dpmpp_2m_karras": "samplers", "sample_euler": "samplers", "sample_euler_ancestral": "samplers",
    "sample_heun": "samplers", "sample_pndm": "samplers",
    "sample_discrete": "discrete",
    "NoiseSchedule": "schedules", "SchedulerConfig": "schedules", "as_scheduler_config": "schedules",
    "glide_respacing": "schedules", "karras_sigmas": "schedules", "make_betas": "schedules",
    "spaced_timesteps": "schedules",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
