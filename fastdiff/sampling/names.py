"""The sampler names and the diffusers scheduler class each one must equal, without torch.

The command line lists them (``--sampler`` choices, ``fastdiff --help``) without importing
torch, and the scheduler configs (schedules.py) read a sampler's class defaults from here.
registry.py builds SAMPLERS from this table, one spec per name in this order, and refuses
at import a spec this table lacks or a name without a spec.
"""
from types import MappingProxyType
from typing import Mapping

# name -> the diffusers scheduler class it must equal, in the order help and errors list them
SAMPLER_CLASS: Mapping[str, str] = MappingProxyType({
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
})
SAMPLER_NAMES = tuple(SAMPLER_CLASS)
