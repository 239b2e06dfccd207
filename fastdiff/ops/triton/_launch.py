"""How fastdiff's Triton wrappers launch a kernel: on the operands' device, and recordable.

Every wrapper ends in ``launch(kernel, grid, device, *args, **meta)`` instead of
``kernel[grid](...)``, for three reasons:

- Triton launches on the *current* CUDA device and stream. A tensor on ``cuda:1`` while
  ``cuda:0`` is current would get a launch on the wrong GPU, so the launch enters the
  operands' device first (as ``c10::cuda::CUDAGuard`` does in the CUDA C++ kernels).
- Under Triton's CPU interpreter (``TRITON_INTERPRET=1``, CPU tensors) there is no software
  pipelining: ``num_stages`` is set to 1 here, in one place, and nowhere else.
- ``recording()`` makes launches be recorded instead of run. With meta tensors as operands
  a wrapper then computes nothing, allocates nothing, and still says exactly which kernel,
  specialisation and launch options it would use; fastdiff/tools/triton_resources.py compiles
  those records ahead of time for a GPU (sm_90) and checks them against its limits.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple

import torch


class Launch(NamedTuple):
    """One kernel launch as a wrapper would make it."""

    kernel: Any                 # the @triton.jit function (a JITFunction outside the interpreter)
    grid: Tuple[int, ...]
    device: torch.device
    args: Tuple[Any, ...]       # positional arguments, tensors included
    meta: dict                  # constexpr keyword arguments and launch options (num_warps, num_stages)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))


_recorder: Optional[List[Launch]] = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@contextlib.contextmanager
def recording() -> Iterator[List[Launch]]:
    """Inside, ``launch`` appends to the yielded list instead of running anything."""
    global _recorder
    saved, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = saved


def launch(kernel: Any, grid: Tuple[int, ...], device: torch.device, *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` on ``device`` (see the module docstring)."""
    grid = tuple(int(g) for g in grid)
    if _recorder is not None:
        _recorder.append(Launch(kernel, grid, torch.device(device), args, dict(meta)))
        return
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
        return
    if "num_stages" in meta:  # the interpreter has no software pipelining
        meta["num_stages"] = 1
    kernel[grid](*args, **meta)


def is_out_of_resources(exc: BaseException) -> bool:
    """Whether a launch failed because its configuration does not fit the GPU (shared
    memory, registers); Triton has moved and renamed its exception between versions."""
    if type(exc).__name__ == "OutOfResources":
        return True
    message = str(exc).lower()
    return "out of resource" in message or "shared memory" in message


__all__ = ["Launch", "interpreting", "is_out_of_resources", "launch", "recording"]
