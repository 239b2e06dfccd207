"""What a sampler calls: a denoiser ``(x, t) -> Tensor | ModelOutput``.

A plain model output is the prediction itself; classifier-free guidance
(fastdiff.guidance) hands back both halves and the scale instead, so the combine
happens inside the fused step.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Union

from torch import Tensor


class ModelOutput(NamedTuple):
    """What a denoiser gives a sampler: the conditional output, and for CFG the rest."""

    cond: Tensor
    uncond: Optional[Tensor] = None
    scale: Optional[Tensor] = None  # float32 [1] or [N]


class Denoiser(Protocol):
    """``denoiser(x, t)``: the model's prediction at sample x (model input space) and timestep t."""

    def __call__(self, x: Tensor, t: Tensor) -> Union[Tensor, ModelOutput]: ...


def as_model_output(out: Union[Tensor, ModelOutput]) -> ModelOutput:
    return out if isinstance(out, ModelOutput) else ModelOutput(out)
