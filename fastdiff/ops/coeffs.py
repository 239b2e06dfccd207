"""The coefficient layout of ``guided_step`` (mirrors csrc/guided_step/guided_step.h).

A sampler expresses one step as a row of these float coefficients per sample:

    p   = u + s * (c - u)                      (or c without an unconditional half)
    x0  = X0_X * x + X0_P * p                  then optionally clamped to +-clip_range
    out = OUT_X * x + OUT_P * p + OUT_X0 * x0 + sum_j HIST0+j * history[j]
          + OUT_NOISE * std * noise            std = 1, or GLIDE's learned-range std
    den = DEN_X * x + DEN_P * p + DEN_X0 * x0  (the optional second output)

with learned-range std = exp(0.5 * (f * LOGVAR_MAX + (1 - f) * LOGVAR_MIN)),
f = (v + 1) / 2 and v the model's variance channels of the conditional half.

The columns of ``discrete_step``'s row (DS_*, mirrored by
csrc/discrete_step/discrete_step_coeffs.h) follow at the end.
"""
from __future__ import annotations

import torch

X0_X = 0
X0_P = 1
OUT_X = 2
OUT_P = 3
OUT_X0 = 4
OUT_NOISE = 5
DEN_X = 6
DEN_P = 7
DEN_X0 = 8
LOGVAR_MAX = 9
LOGVAR_MIN = 10
HIST0 = 11
NUM_FIXED = 11
MAX_HISTORY = 4

NAMES = (
    "X0_X", "X0_P", "OUT_X", "OUT_P", "OUT_X0", "OUT_NOISE",
    "DEN_X", "DEN_P", "DEN_X0", "LOGVAR_MAX", "LOGVAR_MIN",
)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of guided_step's outputs: channels-last iff x is (and is not also plain)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# --- discrete_step's row: VQ-Diffusion's step over codebook tokens ---------------------------
#
# Columns of discrete_step's coefficient row (built on the host in float64 by
# fastdiff.sampling.discrete; the row of timestep t). In VQ-Diffusion (Gu et al. 2022,
# eq. 7) a token keeps its class with probability a, moves to each of the M = K-1
# codebook classes with b, and becomes the mask class with c; the *_cum values are the
# cumulative products 0 -> t. Each entry below is a log-probability of one row of those
# transition matrices as diffusers' VQDiffusionScheduler builds it from log one-hot
# vectors (a log(1e-30) floor stands in for log 0, so "other" is log(b + 1e-30 * a)).
DS_POSTERIOR = 0      # 1: q-posterior p(x_{t-1} | x_t) (t > 0); 0: last step, sample x0 itself
DS_CUM_SAME = 1       # log q(x_t = i | x_0 = i),  x_t not masked: log(a_cum_t + b_cum_t)
DS_CUM_OTHER = 2      # log q(x_t = j | x_0 = i), j != i:         log(b_cum_t + 1e-30 a_cum_t)
DS_CUM_MASK = 3       # log q(x_t = mask | x_0 = i):              log c_cum_t
DS_PREV_A = 4         # log a_cum_{t-1}
DS_PREV_B = 5         # log b_cum_{t-1}
DS_PREV_C = 6         # log c_cum_{t-1}
DS_STEP_SAME = 7      # log q(x_t = i | x_{t-1} = i):             log(a_t + b_t)
DS_STEP_OTHER = 8     # log q(x_t = j | x_{t-1} = i), j != i:     log(b_t + 1e-30 a_t)
DS_STEP_MASK = 9      # log q(x_t = mask | x_{t-1} = i):          log c_t
DS_STEP_UNMASK = 10   # log q(x_t = j | x_{t-1} = mask), j not mask: log 1e-30 (the one-hot floor)
DS_NUM_COEFFS = 11
DS_CLAMP_MIN = -70.0  # the pipeline's clamp after truncation: removes log(0) = -inf
DS_GUMBEL_EPS = 1e-30  # gumbel = -log(-log(u + eps) + eps), as diffusers' gumbel_noised
