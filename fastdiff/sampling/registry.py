"""Every sampler fastdiff has, once: name -> plan builder, diffusers class, what it can do.

The sampler functions (samplers.py), img2img's part-way start and the pipelines all read
this table. Its names and diffusers classes come from names.py, the torch-free part that
the command line and the scheduler-config defaults (schedules.py) read; building the table
checks that every name there has a spec here and no spec has a name that is not there.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Union

from . import steps as S
from .names import SAMPLER_CLASS, SAMPLER_NAMES
from .schedules import SchedulerConfig, as_scheduler_config


def _train_timesteps(cfg: SchedulerConfig) -> int:
    return len(cfg.trained_betas) if cfg.trained_betas is not None else cfg.num_train_timesteps


def _dpm_solver_steps(cfg: SchedulerConfig, karras: Optional[bool] = None) -> int:
    # DPM-Solver++ spaces num_steps + 1 points over the training timesteps and drops the
    # last: with linspace or leading spacing, T of them repeat a timestep (h = 0, so NaN).
    T = _train_timesteps(cfg)
    if karras or (karras is None and cfg.use_karras_sigmas) or cfg.timestep_spacing == "trailing":
        return T
    return T - 1


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: how to build its plan and what it can do."""

    name: str                      # "ddim", "dpmpp_2m", ...
    diffusers_class: str           # the diffusers scheduler class it must equal
    build_plan: Callable           # (config, num_steps, *, start=0, **options) -> Plan
    options: frozenset             # keyword options it accepts, e.g. {"eta"} for ddim
    classifier_guidance: bool      # cond_fn has a meaning (mean or score form)
    img2img: bool                  # can start part-way (strength < 1)
    cuda_graph: bool               # its steps can be captured
    respaced: bool = False         # also runs on GLIDE's respaced schedules (sampling.respaced)
    thresholding: bool = False     # dynamic thresholding of x0 (its diffusers class has thresholding=True)
    max_steps: Callable = _train_timesteps  # (resolved config) -> the most steps it can take
    min_steps: Callable = lambda cfg: 1    # (resolved config) -> the fewest


def _spec(name, builder, options=(), thresholding=False, **kw) -> SamplerSpec:
    return SamplerSpec(name, SAMPLER_CLASS.get(name, ""), _checked(name, builder, frozenset(options), thresholding),
                       frozenset(options), classifier_guidance=True, img2img=True, cuda_graph=True,
                       thresholding=thresholding, **kw)


def _refuse_thresholding(name: str, cfg: SchedulerConfig, has_it: bool) -> None:
    if cfg.thresholding and not has_it:
        able = ", ".join(spec.name for spec in SAMPLERS.values() if spec.thresholding)
        raise ValueError(f"the {name} sampler has no dynamic thresholding (diffusers' {SAMPLER_CLASS.get(name, name)} "
                         f"lacks it), which the scheduler config turns on (thresholding=True); samplers with "
                         f"dynamic thresholding: {able}")


def check_thresholding(name: str, config) -> None:
    """Refuse, before any work, a config with thresholding=True for a sampler without it."""
    _refuse_thresholding(name, as_scheduler_config(config), get_sampler(name).thresholding)


def _checked(name: str, builder: Callable, options: frozenset, thresholding: bool) -> Callable:
    """`builder` behind every argument check, so a spec's build_plan refuses bad input before any work."""
    def build_plan(config, num_steps, *, start: int = 0, **given) -> S.Plan:
        unknown = sorted(set(given) - options)
        if unknown:
            raise TypeError(f"the {name} sampler takes no option {unknown[0]!r} "
                            f"(its options: {', '.join(sorted(options)) or 'none'})")
        cfg = as_scheduler_config(config)
        _refuse_thresholding(name, cfg, thresholding)
        if given.get("timesteps") is not None:
            num_steps = len(given["timesteps"])
        num_steps = check_num_steps(name, cfg, num_steps)
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= start <= num_steps:
            raise ValueError(f"start must be an integer in [0, {num_steps}] (the first step to run), got {start!r}")
        if "eta" in given:
            given["eta"] = S.check_eta(given["eta"])
        return builder(cfg, num_steps, start=int(start), **given)
    build_plan.__doc__ = f"The {name} sampler's plan, its arguments checked first (see registry.SamplerSpec)."
    return build_plan


def _pndm_min_steps(cfg: SchedulerConfig) -> int:
    return 1 if cfg.skip_prk_steps else 4  # the Runge-Kutta warm-up runs over the last 4 timesteps


_SPECS = (
    _spec("ddpm", lambda c, n, *, start=0, timesteps=None: S.ddpm_plan(c, n, timesteps, start),
          {"timesteps"}, respaced=True, thresholding=True),
    _spec("ddim",
          lambda c, n, *, start=0, eta=0.0, use_clipped_model_output=False:
          S.ddim_plan(c, n, eta, use_clipped_model_output, start),
          {"eta", "use_clipped_model_output"}, respaced=True, thresholding=True),
    _spec("pndm", lambda c, n, *, start=0: S.pndm_plan(c, n, start), min_steps=_pndm_min_steps),
    _spec("euler", lambda c, n, *, start=0: S.euler_plan(c, n, start=start)),
    _spec("euler_a", lambda c, n, *, start=0: S.euler_plan(c, n, ancestral=True, start=start)),
    _spec("heun", lambda c, n, *, start=0: S.heun_plan(c, n, start)),
    _spec("dpmpp_2m", lambda c, n, *, start=0, karras=None: S.dpmpp_2m_plan(c, n, karras, start), {"karras"},
          max_steps=_dpm_solver_steps, thresholding=True),
    _spec("dpmpp_2m_karras", lambda c, n, *, start=0: S.dpmpp_2m_plan(c, n, True, start),
          max_steps=lambda cfg: _dpm_solver_steps(cfg, karras=True), thresholding=True),
)
if tuple(spec.name for spec in _SPECS) != SAMPLER_NAMES:
    raise RuntimeError(f"the sampler specs ({', '.join(spec.name for spec in _SPECS)}) must be the samplers of "
                       f"fastdiff/sampling/names.py in its order ({', '.join(SAMPLER_NAMES)})")
SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def get_sampler(name: str) -> SamplerSpec:
    """The spec of sampler `name`."""
    if not isinstance(name, str):
        raise TypeError(f"sampler must be a string, one of {', '.join(SAMPLERS)}; got {name!r}")
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None


def check_num_steps(name: str, config: Union[SchedulerConfig, dict, str, None], num_steps) -> int:
    """num_steps as an int, refused (ValueError, before any allocation) unless it is a positive
    integer the sampler can take on this config: never more steps than training timesteps."""
    spec = get_sampler(name)
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    cfg = as_scheduler_config(config).resolved(name)
    most, fewest = spec.max_steps(cfg), spec.min_steps(cfg)
    if num_steps > most:
        raise ValueError(f"num_steps={num_steps} is more than the {name} sampler can take on this scheduler config "
                         f"({_train_timesteps(cfg)} training timesteps, timestep_spacing={cfg.timestep_spacing!r}): "
                         f"at most {most}")
    if num_steps < fewest:
        raise ValueError(f"num_steps={num_steps} is too few for the {name} sampler on this scheduler config "
                         f"(skip_prk_steps={cfg.skip_prk_steps}): at least {fewest}")
    return num_steps

