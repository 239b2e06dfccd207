"""Exporting one network to ONNX and checking the graph against the module it came from.

Every graph is traced with fastdiff's ops on their pure-PyTorch twins
(``fastdiff.set_backend("reference")`` for the duration of the export), so the graph holds
standard ONNX operators only and every ONNX Runtime execution provider takes it: the twin of
``group_norm`` becomes normalisation + scale-shift + SiLU, the twin of ``attention`` a
decomposed softmax(q k^T) v with the key padding mask kept.

After writing, ``verify`` runs the graph in ONNX Runtime on the CPU on inputs of a second
shape (so the dynamic axes are exercised, not only the traced ones) and compares it with the
module in float32. Both sides compute the same sums in another order, so they differ by
float32's rounding of reordered sums (tests/tolerances.py's model):
``HEADROOM * sqrt(terms) * 2^-24 * max(1, |reference|)``, where ``terms``, the summed lengths
of the reductions along the graph, is bounded from above without running anything: each
layer's reduction (a fan-in) is at most its weights, and attention's (head dim + 2 x keys)
at most the inputs' elements, so ``terms <= parameters + input elements``. That is loose for
large models (~7e-3 relative at SD 1.5's 860M weights) yet far under what a wrong operator,
layout or weight gives (an O(1) relative error); the suite holds the graphs to the tight
bound of counted terms (tests/test_export_onnx.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Mapping, Sequence

import torch

HEADROOM = 4.0
UNIT_ROUNDOFF = 2.0 ** -24  # float32
DEFAULT_OPSET = 18
# Above this, a graph's weights go to an external data file beside model.onnx (protobuf's
# 2 GiB limit on one message).
EXTERNAL_DATA_BYTES = 2 ** 31 - 2 ** 26


@dataclass
class GraphRecord:
    """What the manifest says of one graph."""

    name: str                                   # "unet"
    file: str                                   # "unet/model.onnx"
    inputs: Dict[str, List[str]]                # name -> shape, with the dynamic axes named
    outputs: Dict[str, List[str]]
    dtype: str = "float32"
    max_abs_error: float = float("nan")         # ONNX Runtime against PyTorch, on the check inputs
    reference_scale: float = float("nan")       # max |PyTorch output|
    bound: float = float("nan")                 # what the error was held to
    check_shapes: Dict[str, List[int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """fastdiff's ops on their twins (standard PyTorch, so standard ONNX) while a graph is traced."""
    from ..ops import get_backend, set_backend

    previous = get_backend()
    set_backend("reference")
    try:
        yield
    finally:
        set_backend(previous)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's progress lines and its notes on optional operator libraries, silenced."""
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        logger.setLevel(level)


def export_graph(module: torch.nn.Module, args: Sequence[torch.Tensor], path: str, *,
                 input_names: Sequence[str], output_names: Sequence[str],
                 dynamic_axes: Mapping[str, Mapping[int, str]], opset: int = DEFAULT_OPSET) -> None:
    """Trace `module(*args)` into `path` (weights beside it above EXTERNAL_DATA_BYTES)."""
    from torch.export import Dim

    os.makedirs(os.path.dirname(path), exist_ok=True)
    dims: Dict[str, Dim] = {}

    def dim(label: str):
        # "2*batch_size": an axis twice another (the CFG batch of a step graph).
        factor, _, base = label.rpartition("*")
        d = dims.setdefault(base, Dim(base.replace(" ", "_"), min=1))
        return int(factor) * d if factor else d

    dynamic_shapes = tuple({axis: dim(label) for axis, label in dynamic_axes.get(name, {}).items()} or None
                           for name in input_names)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    with reference_ops(), torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), tuple(args), dynamo=True, opset_version=opset,
                                    input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(path, external_data=size > EXTERNAL_DATA_BYTES)


def verify(path: str, module: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
           output_names: Sequence[str], record: GraphRecord) -> None:
    """Run the graph in ONNX Runtime (CPU) on `inputs` and hold every output to the module's."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
    got = session.run(list(output_names), feeds)
    with reference_ops(), torch.no_grad():
        want = module.eval()(*inputs.values())
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    errors, scales = [], []
    for name, g, w in zip(output_names, got, want):
        w = w.detach().float().cpu().numpy()
        if g.shape != w.shape:
            raise RuntimeError(f"{path}: output {name} has shape {g.shape}, PyTorch gives {w.shape}")
        errors.append(float(np.abs(g.astype(np.float32) - w).max()))
        scales.append(float(np.abs(w).max()))
    record.max_abs_error, record.reference_scale = max(errors), max(scales)
    terms = sum(p.numel() for p in module.parameters()) + sum(t.numel() for t in inputs.values())
    record.bound = HEADROOM * math.sqrt(terms) * UNIT_ROUNDOFF * max(1.0, record.reference_scale)
    record.check_shapes = {name: list(t.shape) for name, t in inputs.items()}
    if not record.max_abs_error <= record.bound:
        raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {record.max_abs_error:.3g} "
                           f"(bound {record.bound:.3g}); the graph is not trustworthy")
