"""The closed-form optimal denoiser of a finite dataset.

For data {y_k} and x_t = sqrt(a) y + sqrt(1 - a) eps, the MMSE estimate of y is
the softmax-weighted mean  sum_k w_k y_k,  w = softmax(-|x_t - sqrt(a) y_k|^2 / (2 (1 - a))).
It is exact (no training) and samples only training images; fastdiff uses it as a
self-contained stand-in model for demos and tests of the sampling engine. A
conditioning selects the subset of the data a caption describes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


class ExactDenoiser:
    """``model(x, t, cond) -> eps`` for data `images` [N, C, H, W].

    cond: a [B, N] mask of which data points each sample may come from (all ones =
    unconditional); `alphas_cumprod` is the training schedule that maps t to alpha_bar.
    """

    def __init__(self, images: Tensor, alphas_cumprod: np.ndarray):
        self.data = images.reshape(images.shape[0], -1).float()
        self.shape = images.shape[1:]
        self.ac = torch.tensor(alphas_cumprod, dtype=torch.float32)

    def masks(self, captions: Sequence[str], prompts: Sequence[Optional[str]]) -> Tensor:
        """[len(prompts), N]: 1 where a data caption contains every word of the prompt."""
        rows = []
        for prompt in prompts:
            words = [] if prompt is None else prompt.lower().split()
            hits = [all(w in c.split() for w in words if w not in ("a", "an", "the")) for c in captions]
            if not any(hits):
                raise ValueError(f"no data matches the prompt {prompt!r}")
            rows.append(hits)
        return torch.tensor(rows, dtype=torch.float32)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        ac = self.ac.to(x.device)[t.long().clamp(0, len(self.ac) - 1)]
        a, s = ac.sqrt(), (1 - ac).sqrt()
        flat = x.reshape(x.shape[0], -1).float()
        data = self.data.to(x.device)
        dist = torch.cdist(flat, a * data) ** 2
        logits = -dist / (2 * s * s) + torch.log(cond.to(x.device).clamp_min(1e-30))
        x0 = torch.softmax(logits, dim=1) @ data
        eps = (flat - a * x0) / s
        return eps.reshape(x.shape).to(x.dtype)
