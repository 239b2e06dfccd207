"""Export of fastdiff pipelines: ``fastdiff.export.onnx(pipe, out_dir)``.

Stable Diffusion is exported today (fastdiff/export/stable_diffusion.py: optimum's folder
layout and names, each graph checked against PyTorch in ONNX Runtime); GLIDE and
VQ-Diffusion are refused by name until their graphs exist.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Sequence, Union

from .graphs import DEFAULT_OPSET

# The lowest opset the exporter writes every graph in (torch.onnx's dynamo exporter).
MIN_OPSET = 18


def onnx(pipe, out_dir: Union[str, os.PathLike], *, opset: int = DEFAULT_OPSET, verify: bool = True,
         step: Optional[Mapping[str, Sequence[int]]] = None,
         progress: Optional[Callable[[str], None]] = None) -> dict:
    """Export `pipe`'s networks to ONNX under `out_dir` and return the manifest (also written
    there as fastdiff_onnx.json). verify=True runs each graph in ONNX Runtime on inputs of
    another shape and holds it to the PyTorch module (within float32's rounding, graphs.verify).

    step={"dpmpp_2m": [20, 50], ...} also writes, per sampler, the whole guided step (the UNet
    on the CFG batch + guided_step's formula) as one graph, with the coefficient table of each
    step count (fastdiff/export/step.py), so a plain ONNX Runtime loop samples."""
    from ..pipelines import StableDiffusionPipeline
    from ..pipelines.base import Pipeline

    if not isinstance(pipe, Pipeline):
        raise TypeError(f"pipe must be a fastdiff pipeline, got {type(pipe).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    out_dir = check_out_dir(out_dir)
    require_packages(verify)
    step = _check_step(step)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise ValueError(f"ONNX export of {type(pipe).__name__} is not supported yet; fastdiff exports "
                         f"StableDiffusionPipeline")
    from . import stable_diffusion

    from .step import plan_table

    stable_diffusion.check_exportable(pipe)
    for sampler, counts in step.items():
        for n in counts:  # every table's plan built (and so checked) before anything is written
            plan_table(pipe, sampler, n)
    os.makedirs(out_dir, exist_ok=True)
    return stable_diffusion.export(pipe, out_dir, opset=opset, verify_graphs=verify, progress=progress, step=step)


def check_out_dir(out_dir: Union[str, os.PathLike]) -> str:
    """`out_dir` as a path, refused (ValueError) when it is a file or a folder that is not empty."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is not empty; give a new or empty folder")
    return out_dir


def require_packages(verify: bool = True) -> None:
    """RuntimeError naming what to install when the exporter (or, to verify, ONNX Runtime) is missing."""
    import importlib.util

    needed = ("onnx", "onnxscript") + (("onnxruntime",) if verify else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def _check_step(step) -> dict:
    from ..sampling import get_sampler

    if step is None:
        return {}
    if not isinstance(step, Mapping):
        raise TypeError(f"step must map sampler names to step counts, got {type(step).__name__}")
    checked = {}
    for sampler, counts in step.items():
        get_sampler(sampler)
        counts = [counts] if isinstance(counts, int) else list(counts)
        if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            raise ValueError(f"step[{sampler!r}] must be positive step counts, got {step[sampler]!r}")
        checked[sampler] = counts
    return checked


__all__ = ["onnx", "check_out_dir", "require_packages", "DEFAULT_OPSET"]
