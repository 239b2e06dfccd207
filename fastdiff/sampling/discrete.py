"""VQ-Diffusion's discrete schedule as rows of discrete_step coefficients, in float64.

The schedule is that of diffusers' VQDiffusionScheduler (Gu et al. 2022, sec. 4.1):
the cumulative keep probability a_cum falls and the cumulative mask probability c_cum
rises linearly over the training steps; b_cum = (1 - a_cum - c_cum) / M spreads the
rest over the M = K - 1 codebook classes, and the one-step a_t, c_t follow from the
ratios of consecutive cumulative values. Rows are computed once per run here and kept
on the device, so the sampling loop holds no host syncs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from ..ops import reference as R
from .noise import draw_device, rand

# log of the floor diffusers' index_to_log_onehot uses for the zeros of a one-hot vector.
_LOG_ONEHOT_FLOOR = float(np.log(1e-30))


@dataclass(frozen=True)
class DiscreteScheduleConfig:
    """The fields of a diffusers VQDiffusionScheduler config (scheduler_config.json)."""
    num_vec_classes: int
    num_train_timesteps: int = 100
    alpha_cum_start: float = 0.99999
    alpha_cum_end: float = 0.000009
    gamma_cum_start: float = 0.000009
    gamma_cum_end: float = 0.99999

    @classmethod
    def from_dict(cls, config: dict) -> "DiscreteScheduleConfig":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in dict(config).items() if k in names})


@dataclass(frozen=True)
class DiscreteSchedule:
    """Per training timestep, float64: one-step and cumulative a, b, c (K classes incl. mask)."""
    num_classes: int
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    a_cum: np.ndarray
    b_cum: np.ndarray
    c_cum: np.ndarray

    @classmethod
    def from_config(cls, cfg: DiscreteScheduleConfig) -> "DiscreteSchedule":
        T, M = cfg.num_train_timesteps, cfg.num_vec_classes - 1
        frac = np.arange(T, dtype=np.float64) / (T - 1)
        a_cum = cfg.alpha_cum_start + frac * (cfg.alpha_cum_end - cfg.alpha_cum_start)
        c_cum = cfg.gamma_cum_start + frac * (cfg.gamma_cum_end - cfg.gamma_cum_start)
        # One step from t-1 to t; before step 0 nothing is corrupted (a_cum = 1, c_cum = 0).
        a = a_cum / np.concatenate(([1.0], a_cum[:-1]))
        keep_unmasked = 1.0 - c_cum
        c = 1.0 - keep_unmasked / np.concatenate(([1.0], keep_unmasked[:-1]))
        b = (1.0 - a - c) / M
        b_cum = (1.0 - a_cum - c_cum) / M
        return cls(cfg.num_vec_classes, a, b, c, a_cum, b_cum, c_cum)


def discrete_step_row(schedule: DiscreteSchedule, t: int) -> np.ndarray:
    """The float64 coefficient row of the step from x_t to x_{t-1} (columns: reference.DS_*)."""
    row = np.zeros(R.DS_NUM_COEFFS, dtype=np.float64)
    if t == 0:  # the last step samples x0 from the model's prediction itself
        return row
    log = np.log
    row[R.DS_POSTERIOR] = 1.0
    a_cum, b_cum = schedule.a_cum[t], schedule.b_cum[t]
    row[R.DS_CUM_SAME] = np.logaddexp(log(a_cum), log(b_cum))
    row[R.DS_CUM_OTHER] = np.logaddexp(_LOG_ONEHOT_FLOOR + log(a_cum), log(b_cum))
    row[R.DS_CUM_MASK] = log(schedule.c_cum[t])
    row[R.DS_PREV_A] = log(schedule.a_cum[t - 1])
    row[R.DS_PREV_B] = log(schedule.b_cum[t - 1])
    row[R.DS_PREV_C] = log(schedule.c_cum[t - 1])
    a, b = schedule.a[t], schedule.b[t]
    row[R.DS_STEP_SAME] = np.logaddexp(log(a), log(b))
    row[R.DS_STEP_OTHER] = np.logaddexp(_LOG_ONEHOT_FLOOR + log(a), log(b))
    row[R.DS_STEP_MASK] = log(schedule.c[t])
    row[R.DS_STEP_UNMASK] = _LOG_ONEHOT_FLOOR
    return row


def discrete_step_rows(config, timesteps: Optional[Iterable[int]] = None,
                       device=None) -> torch.Tensor:
    """float32 [len(timesteps), 1, DS_NUM_COEFFS]: row i is the ``coeffs`` of step i.

    config: a DiscreteScheduleConfig, or a dict / diffusers config with its fields.
    timesteps: default the scheduler's own order, T-1 down to 0.
    """
    if not isinstance(config, DiscreteScheduleConfig):
        config = DiscreteScheduleConfig.from_dict(config)
    schedule = DiscreteSchedule.from_config(config)
    if timesteps is None:
        timesteps = range(config.num_train_timesteps - 1, -1, -1)
    rows = np.stack([discrete_step_row(schedule, int(t)) for t in timesteps])
    return torch.from_numpy(rows).float().unsqueeze(1).to(device)


def gumbel_uniform(batch: int, num_classes: int, num_tokens: int, last_step: bool,
                   generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """The uniform noise of one discrete_step, drawn as diffusers' ``gumbel_noised`` does.

    diffusers draws ``torch.rand(log_probs.shape, generator=generator)``: [B, K, N] for
    t > 0, but [B, K-1, N] at t = 0, where the scheduler samples x0 without the mask
    class. Drawing the same shape from the same generator and padding the mask row
    (never sampled at t = 0) reproduces diffusers' tokens exactly.
    """
    rows = num_classes - 1 if last_step else num_classes
    u = rand((batch, rows, num_tokens), generator=generator, device=device)
    if last_step:
        u = torch.cat([u, u.new_zeros(batch, 1, num_tokens)], dim=1)
    return u


def sample_discrete(denoise, x: torch.Tensor, config, num_inference_steps: int, *,
                    guidance_scale: Optional[float] = None, truncation_rate: float = 1.0,
                    generator: Optional[torch.Generator] = None, progress: bool = True,
                    callback=None) -> torch.Tensor:
    """VQ-Diffusion's reverse process (Gu et al. 2022, eq. 11): one model call and one fused
    ``discrete_step`` per timestep, from t = num_inference_steps - 1 down to 0.

    denoise(x_t, t) -> (cond, uncond): log p(x0 | x_t) over the K - 1 codebook classes,
    [B, K-1, N] each; uncond is None without guidance. The two may be views of one
    batched 2B model call (the op takes any strides).
    x: int64 [B, N] tokens at the first timestep (all masked: class K - 1).
    guidance_scale: None (or <= 1) for no guidance, else the log-space scale.

    As diffusers' VQDiffusionScheduler, fewer steps than training run the last
    timesteps of the training chain (t = steps - 1, ..., 0), not a respaced one.
    The Gumbel noise is drawn as diffusers draws it (``gumbel_uniform``), so the same
    generator gives the same tokens. callback(StepInfo) sees the tokens after each step
    and, as ``x0``, the argmax tokens of the step's guided, truncated p(x0 | x_t).
    """
    from ..ops import discrete_step
    from .samplers import StepInfo, progress_bar

    if not isinstance(config, DiscreteScheduleConfig):
        config = DiscreteScheduleConfig.from_dict(config)
    T = config.num_train_timesteps
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, {T}] (the model's training "
                         f"timesteps), got {num_inference_steps!r}")
    if not 0.0 < truncation_rate <= 1.0:
        raise ValueError(f"truncation_rate must be in (0, 1], got {truncation_rate}")
    device = x.device
    timesteps = list(range(num_inference_steps - 1, -1, -1))
    rows = discrete_step_rows(config, timesteps, device=device)
    x0_row = discrete_step_rows(config, [0], device=device)[0]
    ts = torch.tensor(timesteps, dtype=torch.int64, device=device)
    scale = None
    if guidance_scale is not None and guidance_scale > 1.0:
        scale = torch.tensor([float(guidance_scale)], dtype=torch.float32, device=device)
    where = draw_device(generator, device)
    with progress_bar(len(timesteps), "vq-diffusion", progress) as tick:
        for i, t in enumerate(timesteps):
            cond, uncond = denoise(x, ts[i : i + 1])
            if (uncond is None) != (scale is None):
                raise ValueError("denoise must return an unconditional half exactly when guidance is on")
            noise = gumbel_uniform(x.shape[0], config.num_vec_classes, x.shape[1], last_step=t == 0,
                                   generator=generator, device=where).to(device)
            x_prev, _ = discrete_step(x, cond, uncond, scale, coeffs=rows[i], noise=noise,
                                      truncation_rate=truncation_rate)
            if callback is not None:
                x0 = discrete_step(x, cond, uncond, scale, coeffs=x0_row, truncation_rate=truncation_rate)[0]
                callback(StepInfo(i, len(timesteps), ts[i], x_prev, x0, stage="vq-diffusion"))
            x = x_prev
            tick()
    return x
