"""Dynamic thresholding of the x0 prediction (Saharia et al. 2022, Imagen, section 2.3).

Per sample, s = clamp(quantile(|x0|, ratio), 1, max_value) over all of the sample's
elements, then x0 = clamp(x0, -s, s) / s: saturated pixels are pulled inwards instead of
clipped flat, which keeps large guidance scales from washing an image out. This is
diffusers' ``_threshold_sample`` (DDPM, DDIM and DPM-Solver++ with ``thresholding=True``),
bit for bit: the same float32 upcast, the same quantile, the same clamps.

The quantile is torch.quantile's linear interpolation computed without a sort: only the
order statistics at the quantile's rank are needed, and those are the last of the top
n - floor(rank) magnitudes (torch.topk, a small k at ratios near 1), interpolated with the
weight torch.quantile would use, known on the host from the shape alone. No device value
is read on the host, so a step that thresholds can still be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from ..ops.coeffs import output_memory_format


def quantile_rank(n: int, ratio: float, dtype: torch.dtype = torch.float32) -> Tuple[int, int, float]:
    """(rank below, rank above, interpolation weight) of torch.quantile(v, ratio) over n values.

    torch.quantile holds q in the input's dtype and forms rank = q * (n - 1) there, so the
    weight rank - floor(rank) is that dtype's, not the exact real one."""
    real = np.float64 if dtype == torch.float64 else np.float32
    rank = real(ratio) * real(n - 1)
    below = int(np.floor(rank))
    return below, int(np.ceil(rank)), float(rank - real(below))


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """x0 [B, ...] dynamically thresholded per sample, in x0's dtype and layout (see the module docstring)."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # as diffusers: the quantile and clamp in float32
    magnitude = flat.abs()
    n = magnitude.shape[1]
    below, above, weight = quantile_rank(n, ratio, flat.dtype)
    # top[:, j] is the (n-1-j)-th smallest magnitude: the ones at ranks below and above.
    top = torch.topk(magnitude, n - below, dim=1).values
    s = torch.lerp(top[:, n - 1 - below], top[:, n - 1 - above], weight)
    # torch.quantile's rule for a sample holding a NaN: the quantile is NaN (topk ranks NaN first).
    s = torch.where(top[:, 0].isnan(), top[:, 0], s)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    out = (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)
    return out.contiguous(memory_format=output_memory_format(x0))
