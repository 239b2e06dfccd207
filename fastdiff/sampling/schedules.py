"""Noise schedules, timestep spacings and sigma grids, computed on the host once per run.

Values a reference implementation materialises (betas, alphas_cumprod, sigmas,
timesteps) are rounded the way that reference rounds them, so a run reproduces it:
diffusers keeps betas and alphas_cumprod in float32, GLIDE in float64. Every
coefficient derived from them is computed in float64 (fastdiff/sampling/steps.py).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .names import SAMPLER_CLASS  # sampler name -> the diffusers class whose defaults it reads

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")


def _check_choice(kind: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def cosine_alpha_bar(t: float) -> float:
    """alpha_bar(t) of Nichol & Dhariwal 2021 (improved DDPM), eq. 17 with s = 0.008."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t) into betas, capped at max_beta (float64)."""
    betas = [
        min(1 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The training betas of a named schedule, in `dtype` (float32 for diffusers parity)."""
    _check_choice("beta schedule", schedule, BETA_SCHEDULES)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=dtype)
    if schedule == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta).
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=dtype) ** 2
    return torch.from_numpy(betas_for_alpha_bar(num_timesteps)).to(dtype)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has SNR 0 (Lin et al. 2023, Alg. 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """A trained model's forward process: alpha_bar per training timestep and what it predicts."""

    alphas_cumprod: np.ndarray  # float64 copy of the reference's values
    prediction_type: str = "epsilon"

    def __post_init__(self):
        _check_choice("prediction type", self.prediction_type, PREDICTION_TYPES)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigmas(self) -> np.ndarray:
        """Variance-exploding sigmas sqrt((1 - a) / a) per training timestep."""
        return np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)


# Per diffusers scheduler class: that class's constructor defaults. A diffusers
# scheduler_config.json holds every key of the class that wrote it; a key it lacks takes
# the default of the class that would read it, as diffusers does.
_COMMON = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear",
               prediction_type="epsilon", steps_offset=0, rescale_betas_zero_snr=False)
# Dynamic thresholding (Imagen): only these three classes have it.
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
CLASS_DEFAULTS = {
    "DDIMScheduler": dict(_COMMON, **_THRESHOLD, timestep_spacing="leading", set_alpha_to_one=True,
                          clip_sample=True, clip_sample_range=1.0),
    "DDPMScheduler": dict(_COMMON, **_THRESHOLD, timestep_spacing="leading", clip_sample=True,
                          clip_sample_range=1.0, variance_type="fixed_small"),
    "PNDMScheduler": dict(_COMMON, timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=False),
    "EulerDiscreteScheduler": dict(_COMMON, timestep_spacing="linspace", use_karras_sigmas=False,
                                   final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(_COMMON, timestep_spacing="linspace"),
    "HeunDiscreteScheduler": dict(_COMMON, beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace",
                                  clip_sample=False, clip_sample_range=1.0, use_karras_sigmas=False),
    "DPMSolverMultistepScheduler": dict(_COMMON, **_THRESHOLD, timestep_spacing="linspace", use_karras_sigmas=False,
                                        solver_order=2, lower_order_final=True, final_sigmas_type="zero"),
}
# The classes that keep sigmas (and need a finite first one under zero-terminal-SNR).
_SIGMA_CLASSES = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"scheduler config {name} must be a positive integer, got {value!r}")


def _is_number(value) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))


def _check_beta(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"scheduler config {name} must be a number in (0, 1), got {value!r}")


# Keys fastdiff reads, and values it cannot honour (an error beats a silent mismatch).
_UNSUPPORTED = {
    "use_exponential_sigmas": (True,), "use_beta_sigmas": (True,),
    "use_lu_lambdas": (True,), "use_flow_sigmas": (True,), "interpolation_type": ("log_linear",),
    "timestep_type": ("continuous",), "euler_at_final": (True,),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers ``scheduler_config.json``, kept as written (None = key absent)."""

    class_name: Optional[str] = None
    num_train_timesteps: Optional[int] = None
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    beta_schedule: Optional[str] = None
    trained_betas: Optional[tuple] = None
    prediction_type: Optional[str] = None
    timestep_spacing: Optional[str] = None
    steps_offset: Optional[int] = None
    set_alpha_to_one: Optional[bool] = None
    clip_sample: Optional[bool] = None
    clip_sample_range: Optional[float] = None
    variance_type: Optional[str] = None
    skip_prk_steps: Optional[bool] = None
    use_karras_sigmas: Optional[bool] = None
    solver_order: Optional[int] = None
    lower_order_final: Optional[bool] = None
    final_sigmas_type: Optional[str] = None
    rescale_betas_zero_snr: Optional[bool] = None
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    thresholding: Optional[bool] = None          # dynamic thresholding of x0 (replaces clip_sample)
    dynamic_thresholding_ratio: Optional[float] = None  # the quantile of |x0| that sets the threshold
    sample_max_value: Optional[float] = None     # the largest threshold
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        # A bad config is refused here, not as NaN samples later.
        if self.num_train_timesteps is not None:
            _check_positive_int("num_train_timesteps", self.num_train_timesteps)
        if self.beta_schedule in (None, "linear", "scaled_linear"):  # the schedules that read them
            for name in ("beta_start", "beta_end"):
                if getattr(self, name) is not None:
                    _check_beta(name, getattr(self, name))
        if self.trained_betas is not None:
            if len(self.trained_betas) == 0:
                raise ValueError("scheduler config trained_betas is empty")
            bad = [b for b in self.trained_betas if not (isinstance(b, (int, float)) and 0.0 < b < 1.0)]
            if bad:
                raise ValueError(f"scheduler config trained_betas must all lie in (0, 1), got {bad[0]!r} "
                                 f"({len(bad)} of {len(self.trained_betas)} outside)")
        for kind, name, valid in (("beta schedule", "beta_schedule", BETA_SCHEDULES),
                                  ("prediction type", "prediction_type", PREDICTION_TYPES),
                                  ("timestep spacing", "timestep_spacing", TIMESTEP_SPACINGS),
                                  ("variance type", "variance_type", VARIANCE_TYPES),
                                  ("final sigmas type", "final_sigmas_type", FINAL_SIGMAS_TYPES)):
            if getattr(self, name) is not None:
                _check_choice(kind, getattr(self, name), valid)
        if self.steps_offset is not None and (isinstance(self.steps_offset, bool) or
                                              not isinstance(self.steps_offset, (int, np.integer)) or
                                              self.steps_offset < 0):
            raise ValueError(f"scheduler config steps_offset must be an integer >= 0, got {self.steps_offset!r}")
        self._check_thresholding()

    def _check_thresholding(self) -> None:
        """diffusers takes any value here; these are the ones that give a threshold at all: a
        ratio outside (0, 1] has no quantile, a NaN or infinite max value gives NaN or no bound,
        and one <= 0 divides by zero or flips signs. (A max value in (0, 1) is diffusers'
        clamp(s, min=1, max=m) = m: clip to +-m, rescaled to +-1.)"""
        if self.thresholding is not None and not isinstance(self.thresholding, (bool, np.bool_)):
            raise ValueError(f"scheduler config thresholding must be true or false, got {self.thresholding!r}")
        ratio, top = self.dynamic_thresholding_ratio, self.sample_max_value
        if ratio is not None and not (_is_number(ratio) and 0.0 < float(ratio) <= 1.0):
            raise ValueError(f"scheduler config dynamic_thresholding_ratio must be a number in (0, 1] "
                             f"(the quantile of |x0| that sets the threshold), got {ratio!r}")
        if top is not None and not (_is_number(top) and math.isfinite(float(top)) and float(top) > 0.0):
            raise ValueError(f"scheduler config sample_max_value must be a finite number > 0 "
                             f"(the largest dynamic threshold), got {top!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerConfig":
        names = {f.name for f in fields(cls)} - {"class_name", "extra"}
        known = {k: v for k, v in data.items() if k in names}
        if known.get("trained_betas") is not None:
            known["trained_betas"] = tuple(float(b) for b in known["trained_betas"])
        extra = {k: v for k, v in data.items() if k not in names and not k.startswith("_")}
        for key, bad in _UNSUPPORTED.items():
            if key in extra and extra[key] in bad:
                raise ValueError(f"scheduler config sets {key}={extra[key]!r}, which fastdiff does not support")
        if extra.get("algorithm_type", "dpmsolver++") != "dpmsolver++" or \
                extra.get("solver_type", "midpoint") != "midpoint":
            raise ValueError("fastdiff's DPM-Solver supports algorithm_type='dpmsolver++' with "
                             "solver_type='midpoint' only")
        return cls(class_name=data.get("_class_name"), extra=extra, **known)

    def to_dict(self) -> dict:
        """The scheduler_config.json this config was read from (from_dict's inverse: the keys
        it set, unset ones left to the scheduler class's defaults)."""
        names = [f.name for f in fields(self) if f.name not in ("class_name", "extra")]
        data = {"_class_name": self.class_name} if self.class_name else {}
        for name in names:
            value = getattr(self, name)
            if value is not None:
                data[name] = list(value) if name == "trained_betas" else value
        return {**data, **self.extra}

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "SchedulerConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"scheduler config not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"scheduler config {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @property
    def default_sampler(self) -> str:
        """The sampler that equals this config's diffusers class (ddim for a class fastdiff lacks);
        a DPM-Solver config with Karras sigmas picks the Karras variant."""
        names = [name for name, cls in SAMPLER_CLASS.items() if cls == self.class_name]
        if not names:
            return "ddim"
        karras = [name for name in names if name.endswith("_karras")]
        return karras[0] if self.use_karras_sigmas and karras else names[0]

    def resolved(self, sampler: str) -> "SchedulerConfig":
        """Every key filled in: the file's value, else the reading class's default."""
        if sampler not in SAMPLER_CLASS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLER_CLASS)}")
        defaults = CLASS_DEFAULTS[SAMPLER_CLASS[sampler]]
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        cfg = replace(self, **updates)
        _check_choice("beta schedule", cfg.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction type", cfg.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        if cfg.variance_type is not None:
            _check_choice("variance type", cfg.variance_type, VARIANCE_TYPES)
        return cfg

    def noise_schedule(self, sampler: str = "ddim") -> NoiseSchedule:
        """alphas_cumprod exactly as diffusers computes them (float32), held in float64."""
        cfg = self.resolved(sampler)
        if cfg.trained_betas is not None:
            betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
        else:
            betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start,
                               cfg.beta_end, dtype=torch.float32)
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if cfg.rescale_betas_zero_snr and SAMPLER_CLASS[sampler] in _SIGMA_CLASSES:
            # As diffusers' sigma-based schedulers: a tiny alpha_bar instead of 0 keeps
            # the first sigma finite (its DDIM/DDPM/PNDM keep the exact 0).
            alphas_cumprod[-1] = 2**-24
        return NoiseSchedule(alphas_cumprod.double().numpy(), cfg.prediction_type)


def as_scheduler_config(config: Optional[Union[SchedulerConfig, dict, str, os.PathLike]]) -> SchedulerConfig:
    """A SchedulerConfig from one, a dict of scheduler_config.json's keys, or a path (None: the defaults)."""
    if config is None:
        return SchedulerConfig()
    if isinstance(config, SchedulerConfig):
        return config
    if isinstance(config, dict):
        return SchedulerConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return SchedulerConfig.from_json(config)
    raise TypeError(f"config must be a SchedulerConfig, a dict or a path to scheduler_config.json, "
                    f"got {type(config).__name__}")


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """Descending training timesteps for `num_steps` steps (diffusers' DDIM/DDPM spacing)."""
    _check_choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    ratio = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


def float_timesteps(num_train_timesteps: int, num_steps: int, spacing: str,
                    steps_offset: int = 0) -> np.ndarray:
    """The float32 timesteps of diffusers' sigma-based schedulers (Euler, Heun)."""
    _check_choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.float32) + steps_offset
    ratio = num_train_timesteps / num_steps
    return np.arange(num_train_timesteps, 0, -ratio).round().astype(np.float32) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), descending."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def glide_respacing(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """GLIDE's timestep respacing: "100", "ddim50", "fast27" or sections "10,10,3,2,2".

    Returns the kept training timesteps, ascending. Sections split [0, T) into equal
    parts and take the given number of evenly strided steps (rounded) from each part.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            wanted = int(text[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {wanted} evenly strided steps from {num_timesteps}")
        if text == "fast27":
            # GLIDE's fast schedule: the sections below, with the noisiest step moved
            # two steps earlier to reduce DDIM artifacts.
            steps = set(glide_respacing(num_timesteps, "10,10,3,2,2"))
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return sorted(steps)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"invalid respacing {section_counts!r}; use a step count ('100'), 'ddimN', "
                "'fast27' or comma-separated section counts ('10,10,3,2,2')") from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"invalid respacing {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))
