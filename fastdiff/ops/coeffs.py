"""The coefficient layout of ``guided_step`` (mirrors csrc/guided_step/guided_step.h).

A sampler expresses one step as a row of these float coefficients per sample:

    p   = u + s * (c - u)                      (or c without an unconditional half)
    x0  = X0_X * x + X0_P * p                  then optionally clamped to +-clip_range
    out = OUT_X * x + OUT_P * p + OUT_X0 * x0 + sum_j HIST0+j * history[j]
          + OUT_NOISE * std * noise            std = 1, or GLIDE's learned-range std
    den = DEN_X * x + DEN_P * p + DEN_X0 * x0  (the optional second output)

with learned-range std = exp(0.5 * (f * LOGVAR_MAX + (1 - f) * LOGVAR_MIN)),
f = (v + 1) / 2 and v the model's variance channels of the conditional half.
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
