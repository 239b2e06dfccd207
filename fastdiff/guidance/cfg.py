"""Classifier-free guidance as one batched model call (Ho & Salimans 2022).

The conditional and unconditional passes run as a single call on a batch of 2N; the
two halves of its output are handed to the sampler as views, and the combine
``u + s * (c - u)`` happens inside the fused ``guided_step``, not here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

from ..sampling.denoiser import ModelOutput
from ..sampling.graphs import conditioning_signature, conditioning_tensors


def _cat_conditioning(first: Any, second: Any) -> Any:
    """Batch two conditionings (tensors, or dicts/tuples/dataclasses of them) along dim 0."""
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: _cat_conditioning(getattr(first, f.name), getattr(second, f.name))
                                             for f in dataclasses.fields(first)})
    if isinstance(first, dict):
        return {k: _cat_conditioning(first[k], second[k]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_conditioning(a, b) for a, b in zip(first, second))
    if first is None:
        return None
    raise TypeError(f"cannot batch conditioning of type {type(first).__name__}")


class ClassifierFreeGuidance:
    """Wraps ``model(x, t, cond) -> Tensor`` into a guided denoiser ``(x, t) -> ModelOutput``.

    scale: one float, or one per sample. A scale of exactly 1 everywhere skips the
    unconditional pass (the guided prediction equals the conditional one).
    uncond_first: order of the halves in the batched call: diffusers puts the
    unconditional half first, GLIDE the conditional one. Only the model sees it.
    rescale: guidance rescale phi of Lin et al. 2023 (eq. 15-16): the guided output's
    per-sample std is pulled towards the conditional one's. It needs a reduction over
    each sample, so with phi > 0 the combine runs here (eagerly) instead of in the op.
    """

    def __init__(self, model: Callable[[Tensor, Tensor, Any], Tensor], cond: Any, uncond: Any,
                 scale: Union[float, Sequence[float], Tensor], *, uncond_first: bool = True,
                 rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.rescale = float(rescale)
        self.model = model
        self.cond = cond
        scale_t = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if not torch.isfinite(scale_t).all():
            raise ValueError(f"guidance scale must be finite, got {scale_t.tolist()}")
        self.guided = bool((scale_t != 1.0).any()) and uncond is not None
        self.uncond_first = uncond_first
        self._scale_cpu = scale_t
        self._scale = {}
        # Batched once per run, not once per step.
        self.batched_cond = (
            (_cat_conditioning(uncond, cond) if uncond_first else _cat_conditioning(cond, uncond))
            if self.guided else None
        )

    def graph_key(self) -> tuple:
        """What a captured step bakes in about this denoiser (besides the model's weights):
        runs with equal keys can replay each other's graphs after ``graph_inputs`` are
        copied over (fastdiff.sampling.graphs.GraphCache)."""
        conditioning = self.batched_cond if self.guided else self.cond
        return (self.guided, self.uncond_first, self.rescale, self._scale_cpu.numel(),
                conditioning_signature(conditioning))

    def graph_inputs(self, device: torch.device) -> list:
        """The tensors a captured step reads from this denoiser, in graph_key's order."""
        conditioning = self.batched_cond if self.guided else self.cond
        return conditioning_tensors(conditioning) + [self.scale_on(device)]

    def scale_on(self, device: torch.device) -> Tensor:
        if device not in self._scale:
            self._scale[device] = self._scale_cpu.to(device)
        return self._scale[device]

    def __call__(self, x: Tensor, t: Tensor) -> ModelOutput:
        if not self.guided:
            return ModelOutput(self.model(x, t, self.cond))
        n = x.shape[0]
        scale = self.scale_on(x.device)
        if scale.numel() not in (1, n):
            raise ValueError(f"{scale.numel()} guidance scales for a batch of {n}")
        out = self.model(torch.cat([x, x]), t, self.batched_cond)
        first, second = out[:n], out[n:]
        uncond, cond = (first, second) if self.uncond_first else (second, first)
        if self.rescale > 0:
            return ModelOutput(rescale_guidance(cond, uncond, scale, self.rescale))
        return ModelOutput(cond, uncond, scale)


def rescale_guidance(cond: Tensor, uncond: Tensor, scale: Tensor, phi: float) -> Tensor:
    """CFG combine, then std rescale towards the conditional output (Lin et al. 2023)."""
    shape = (-1,) + (1,) * (cond.dim() - 1)
    guided = uncond + scale.to(cond.dtype).reshape(shape) * (cond - uncond)
    dims = list(range(1, cond.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided
