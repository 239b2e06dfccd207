"""``fastdiff.export.onnx`` and the checks of its arguments; the package re-exports these names.

The family's exporter module (``EXPORTERS``) lists its graphs and writes what its ONNX
pipeline reads; graphs.py writes, checks and records each graph.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Mapping, Optional, Sequence, Union

from .graphs import DEFAULT_OPSET, DTYPES, ExportOptions

# The lowest opset the exporter writes every graph in (torch.onnx's dynamo exporter); at 21
# and above, group_norm's twin is written as the standard GroupNormalization operator.
MIN_OPSET = 18
# The pipeline family (a class in the pipeline's MRO) -> its exporter module.
EXPORTERS = {"StableDiffusionPipeline": "stable_diffusion", "GlidePipeline": "glide",
             "VQDiffusionPipeline": "vq_diffusion"}
STATIC_KEYS = ("batch_size", "height", "width")


def onnx(pipe, out_dir: Union[str, os.PathLike], *, opset: int = DEFAULT_OPSET, verify: bool = True,
         dtype: str = "float32", io_dtype: Optional[str] = None, static: Optional[Mapping[str, int]] = None,
         optimize: Optional[str] = None, step: Optional[Mapping[str, Sequence[int]]] = None,
         progress: Optional[Callable[[str], None]] = None) -> dict:
    """Export `pipe`'s networks to ONNX under `out_dir` and return the manifest (also written
    there as fastdiff_onnx.json). Everything is checked before anything is written.

    verify=True runs each graph in ONNX Runtime on inputs of another shape and holds it to
    the PyTorch module (within float32's, or float16's, rounding: graphs.verify).
    dtype "float32" or "float16" (the VAEs and the ops' softmax / statistics stay float32);
    io_dtype: the graphs' floating inputs and outputs (default: dtype).
    static={"batch_size": N, "height": H, "width": W}: every axis fixed (images per call and
    their size in pixels; the guided networks take 2N), which some runtimes run faster;
    default: dynamic batch, height and width.
    optimize="cuda": after the check, ONNX Runtime's transformer optimiser fuses GroupNorm and
    attention into contrib ops that only its CUDA execution provider runs.
    step={"dpmpp_2m": [20, 50], ...} (Stable Diffusion) also writes, per sampler, the whole
    guided step (the UNet on the CFG batch + guided_step's formula) as one graph, with the
    coefficient table of each step count (fastdiff/export/step.py)."""
    from ..pipelines.base import Pipeline

    if not isinstance(pipe, Pipeline):
        raise TypeError(f"pipe must be a fastdiff pipeline, got {type(pipe).__name__}")
    options = check_options(opset=opset, verify=verify, dtype=dtype, io_dtype=io_dtype, static=static,
                            optimize=optimize)
    out_dir = check_out_dir(out_dir)
    require_packages(verify or optimize is not None)
    step = _check_step(step)
    exporter = exporter_for(pipe)
    exporter.check_exportable(pipe, options, step)  # every refusal before anything is written
    os.makedirs(out_dir, exist_ok=True)
    return exporter.export(pipe, out_dir, options, progress=progress, step=step)


def exporter_for(pipe):
    """The exporter module of `pipe`'s family; ValueError naming the class when there is none."""
    if getattr(pipe, "is_onnx", False):
        raise ValueError(f"{type(pipe).__name__} already runs exported graphs; export the PyTorch pipeline")
    for cls in type(pipe).__mro__:
        if cls.__name__ in EXPORTERS:
            return importlib.import_module(f".{EXPORTERS[cls.__name__]}", __package__)
    raise ValueError(f"ONNX export of {type(pipe).__name__} is not supported; fastdiff exports "
                     f"{', '.join(EXPORTERS)}")


def check_options(*, opset=DEFAULT_OPSET, verify=True, dtype="float32", io_dtype=None, static=None,
                  optimize=None) -> ExportOptions:
    """The export keywords as ExportOptions; TypeError / ValueError naming the first bad one."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}")
    dtype = _dtype_name("dtype", dtype)
    io_dtype = None if io_dtype is None else _dtype_name("io_dtype", io_dtype)
    if static is not None:
        if not isinstance(static, Mapping):
            raise TypeError(f"static must map {', '.join(STATIC_KEYS)} to sizes, got {type(static).__name__}")
        unknown = sorted(set(static) - set(STATIC_KEYS))
        if unknown:
            raise ValueError(f"static takes {', '.join(STATIC_KEYS)}, not {', '.join(map(str, unknown))}")
        for key, value in static.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"static[{key!r}] must be a positive integer, got {value!r}")
        static = dict(static)
    if optimize not in (None, "cuda"):
        raise ValueError(f"optimize must be None or 'cuda' (ONNX Runtime's fused ops for its CUDA provider), "
                         f"got {optimize!r}")
    return ExportOptions(opset=opset, dtype=dtype, io_dtype=io_dtype, static=static, verify=verify,
                         optimize=optimize)


def _dtype_name(name: str, value) -> str:
    for key, torch_dtype in DTYPES.items():
        if value == key or value is torch_dtype:
            return key
    raise ValueError(f"{name} must be 'float32' or 'float16', got {value!r}")


def check_out_dir(out_dir: Union[str, os.PathLike]) -> str:
    """`out_dir` as a path, refused (ValueError) when it is a file or a folder that is not empty."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} is not empty; give a new or empty folder")
    return out_dir


def require_packages(verify: bool = True) -> None:
    """RuntimeError naming what to install when the exporter (or, to verify or optimise, ONNX
    Runtime) is missing."""
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

