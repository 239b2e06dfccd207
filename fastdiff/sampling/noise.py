"""Standard normal draws as diffusers and glide-text2im draw them: on the generator's device.

A seeded CPU generator gives the same numbers whatever device the sample lives on, so
every draw is made where the generator is and then moved; this is the one place that
rule lives (samplers, pipelines and img2img all draw through it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def randn(shape: Sequence[int], *, generator: Optional[torch.Generator] = None, device=None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, 1) of `shape` drawn on the generator's device (or `device` without one), then moved to `device`."""
    target = torch.device(device) if device is not None else None
    where = generator.device if generator is not None else target
    z = torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype)
    return z if target is None else z.to(target)


def randn_like(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """N(0, 1) shaped, typed and placed like x, drawn on the generator's device."""
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
