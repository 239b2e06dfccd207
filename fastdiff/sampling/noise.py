"""Random draws as diffusers and glide-text2im make them: on the generator's device.

A seeded CPU generator gives the same numbers whatever device the sample lives on, so
every draw is made where the generator is and then moved; this is the one place that
rule lives (samplers, pipelines and img2img all draw through it).

`generator` may also be a list with one generator per sample, as diffusers accepts: row i
of every draw then comes from generator i alone (drawn with shape [1, ...]), so a sample's
noise, initial and at every stochastic step, depends only on its own generator, not on
the batch it runs in. That is what makes image i of a large run regenerable by itself.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Generators = Union[torch.Generator, Sequence[torch.Generator]]


def is_per_sample(generator) -> bool:
    """True for a list (or tuple) of per-sample generators."""
    return isinstance(generator, (list, tuple))


def draw_device(generator: Optional[Generators], default=None):
    """Where draws from `generator` are made: its device (the first one's, for a list)."""
    if generator is None:
        return default
    return generator[0].device if is_per_sample(generator) else generator.device


def _draw(fn, shape: Sequence[int], generator: Optional[Generators], device, dtype) -> Tensor:
    target = torch.device(device) if device is not None else None
    shape = tuple(shape)
    if is_per_sample(generator):
        if not shape or shape[0] != len(generator):
            raise ValueError(f"{len(generator)} per-sample generators for a draw of shape {shape}: "
                             f"give one generator per sample")
        z = torch.cat([fn((1,) + shape[1:], generator=g, device=g.device, dtype=dtype).to(generator[0].device)
                       for g in generator])
    else:
        z = fn(shape, generator=generator, device=draw_device(generator, target), dtype=dtype)
    return z if target is None else z.to(target)


def randn(shape: Sequence[int], *, generator: Optional[Generators] = None, device=None,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, 1) of `shape` drawn on the generator's device (or `device` without one), then moved to `device`."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape: Sequence[int], *, generator: Optional[Generators] = None, device=None,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """U[0, 1) of `shape`, drawn as randn draws."""
    return _draw(torch.rand, shape, generator, device, dtype)


def randn_like(x: Tensor, generator: Optional[Generators] = None) -> Tensor:
    """N(0, 1) shaped, typed and placed like x, drawn on the generator's device."""
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
