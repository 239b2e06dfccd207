"""The kernel layer: each op is a torch.library op with a pure-PyTorch twin.

``fastdiff.ops.guided_step``  fused CFG + sampler update + noise (see coeffs.py)
``fastdiff.ops.discrete_step`` VQ-Diffusion's token step: log-space CFG, truncation, q-posterior, Gumbel
``fastdiff.ops.attention``    flash-style attention (Triton on CUDA, SDPA on CPU)
``fastdiff.ops.group_norm``   GroupNorm + scale-shift + SiLU, fused (C++ on CPU, CUDA C++ / Triton on CUDA)
``fastdiff.ops.reference``    the twins, the oracle for every kernel

Which implementation serves each op is one table (_dispatch.py); each op's arguments are
checked once, the same way for every backend (_checks.py).
"""
from typing import Optional

import torch

from . import _dispatch, _library, coeffs, reference
from ._checks import OpTypeError, OpValueError
from ._library import get_backend, set_backend
from .guided_step import guided_step
from .discrete_step import discrete_step
from .attention import attention
from .group_norm import group_norm

__all__ = ["guided_step", "discrete_step", "attention", "group_norm", "reference", "coeffs", "set_backend",
           "get_backend", "backend_info", "describe_backends", "OpValueError", "OpTypeError"]


def _gpu() -> Optional[str]:
    """The name of the current CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.get_device_name()
    except RuntimeError:  # a driver that answers is_available but cannot name the device
        return "CUDA device"


def backend_info() -> dict:
    """Per op and device type, the implementation that serves it under the current backend
    (fastdiff/ops/_dispatch.py's table); how the extension loaded; whether a GPU is present.
    The "cuda" entries say what serves on a GPU even where there is none ("gpu": None)."""
    return {
        "backend": _library.get_backend(),
        "extension": {
            "loaded": _library.extension_loaded(),
            "cuda_kernels": _library.extension_has_cuda(),
            "error": _library.extension_error(),
        },
        "triton": _library.triton_available(),
        "gpu": _gpu(),
        "ops": _dispatch.table(),
    }


def describe_backends() -> str:
    """backend_info() as text for people (``fastdiff info``)."""
    info = backend_info()
    ext = info["extension"]
    if ext["loaded"]:
        extension = "loaded, " + ("with CUDA kernels" if ext["cuda_kernels"] else "CPU kernels only (built without CUDA)")
    else:
        extension = f"not loaded ({ext['error']}); build it with: {_library.BUILD_HINT}"
    gpu = info["gpu"]
    lines = [
        f"backend      {info['backend']} (FASTDIFF_BACKEND or fastdiff.set_backend: {', '.join(_library.BACKENDS)})",
        f"fastdiff._C  {extension}",
        f"Triton       {'installed' if info['triton'] else 'not installed'}",
        f"GPU          {gpu}" if gpu else "GPU          none (torch.cuda.is_available() is False): every op runs on the CPU",
        "",
    ]
    cuda_head = "on CUDA" if gpu else "on CUDA (no GPU here: what would serve on one)"
    width = max(len(op) for op in info["ops"]) + 2
    cpu_width = max(len("on CPU"), *(len(d["cpu"]) for d in info["ops"].values())) + 2
    lines.append(f"{'op':<{width}}{'on CPU':<{cpu_width}}{cuda_head}")
    for op, where in info["ops"].items():
        lines.append(f"{op:<{width}}{where['cpu']:<{cpu_width}}{where['cuda']}")
    if ext["loaded"] and not ext["cuda_kernels"]:
        lines.append("(the CUDA C++ kernels, preferred on a GPU, are not in this build: "
                     "FASTDIFF_CUDA=1 pip install --no-build-isolation -e .)")
    return "\n".join(lines)
