"""group_norm's output layout, one rule for every implementation (the C++ kernels'
csrc/group_norm/group_norm_args.h output_like, the Triton wrapper, the fake and eager kernels)."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor


def channels_last_order(dim: int) -> List[int]:
    """[0, 2, 3, ..., dim-1, 1]: the order in which a channels-last tensor is stored."""
    return [0, *range(2, dim), 1]


def is_channels_last(x: Tensor) -> bool:
    return x.dim() >= 3 and x.permute(channels_last_order(x.dim())).is_contiguous()


def group_norm_output(x: Tensor) -> Tensor:
    """An empty output for x: channels-last for a channels-last x that is not also
    contiguous, else contiguous."""
    if x.is_contiguous() or not is_channels_last(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    order = channels_last_order(x.dim())
    inverse = [order.index(d) for d in range(x.dim())]
    return torch.empty([x.shape[d] for d in order], dtype=x.dtype, device=x.device).permute(inverse)
