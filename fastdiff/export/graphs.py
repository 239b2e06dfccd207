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
import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

HEADROOM = 4.0
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11}
DEFAULT_OPSET = 18
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Above this, a graph's weights go to an external data file beside model.onnx (protobuf's
# 2 GiB limit on one message).
EXTERNAL_DATA_BYTES = 2 ** 31 - 2 ** 26


@dataclass
class ExportOptions:
    """How every graph of one export is written (fastdiff.export.onnx's keywords, checked there).

    dtype: the networks' weights and arithmetic, "float32" or "float16". In float16, graphs
        whose spec says keep_fp32 stay float32 (the VAEs: fp16 VAEs give NaNs and black
        images; networks run once per call whose softmax would be float16, such as
        transformers' CLIP text encoder), and fastdiff's ops keep their softmax and
        normalisation statistics in float32 inside every graph (their twins compute in float32).
    io_dtype: the dtype of the graphs' floating inputs and outputs ("float32" or
        "float16"); None: the same as dtype. Integer inputs (token ids) stay int64.
    static: None for dynamic batch / height / width, or {"batch_size": N, "height": H,
        "width": W} (images per call and their size in pixels) to fix every axis.
    verify: run each graph in ONNX Runtime on the CPU and hold it to the PyTorch module.
    optimize: None, or "cuda": after the check, rewrite the graphs with ONNX Runtime's
        transformer optimiser (fused GroupNorm / attention contrib ops), which only the CUDA
        execution provider runs.
    """

    opset: int = DEFAULT_OPSET
    dtype: str = "float32"
    io_dtype: Optional[str] = None
    static: Optional[Dict[str, int]] = None
    verify: bool = True
    optimize: Optional[str] = None

    @property
    def float_io(self) -> str:
        return self.io_dtype or self.dtype


@dataclass
class GraphSpec:
    """One graph an exporter writes: the module, inputs to trace it on and inputs of another
    shape to check it on (the same shape when the export is static), the axes named per input
    and output (position -> name; "2*batch_size" for an axis twice another), and the config
    written beside it as <name>/config.json."""

    name: str
    module: nn.Module
    trace: Dict[str, torch.Tensor]
    check: Dict[str, torch.Tensor]
    input_axes: Dict[str, Dict[int, str]]
    output_axes: Dict[str, Dict[int, str]]
    keep_fp32: bool = False
    config: Optional[Dict[str, Any]] = None
    # onnxruntime.transformers' model type for optimize="cuda" ("unet", "vae", "clip"), or
    # None for a graph the optimiser has no fusions for.
    optimizer_type: Optional[str] = None


@dataclass
class GraphRecord:
    """What the manifest says of one graph."""

    name: str                                   # "unet"
    file: str                                   # "unet/model.onnx"
    inputs: Dict[str, List[str]]                # name -> shape, with the dynamic axes named
    outputs: Dict[str, List[str]]
    dtype: str = "float32"                      # the weights' and arithmetic's
    io_dtype: str = "float32"                   # the floating inputs' and outputs'
    optimized: Optional[str] = None             # "cuda": rewritten with ORT's contrib ops
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
    if isinstance(module, _Cast):  # forward(*args): the axes of the one variadic argument
        dynamic_shapes = (dynamic_shapes,)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    with reference_ops(), torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), tuple(args), dynamo=True, opset_version=opset,
                                    input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(path, external_data=size > EXTERNAL_DATA_BYTES)


def verify(path: str, module: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
           output_names: Sequence[str], record: GraphRecord, dtype: str = "float32") -> None:
    """Run the graph in ONNX Runtime (CPU) on `inputs` and hold every output to the module's
    (run in PyTorch in the graph's `dtype`: the same arithmetic, summed in another order)."""
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
    unit = max(UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[record.io_dtype])
    record.bound = HEADROOM * math.sqrt(terms) * unit * max(1.0, record.reference_scale)
    record.check_shapes = {name: list(t.shape) for name, t in inputs.items()}
    if not record.max_abs_error <= record.bound:
        raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {record.max_abs_error:.3g} "
                           f"(bound {record.bound:.3g}); the graph is not trustworthy")


class _Cast(nn.Module):
    """`module` computing in `compute`, its floating inputs and outputs in `io` (the casts are
    part of the graph, so a float16 network can take and return float32)."""

    def __init__(self, module: nn.Module, compute: torch.dtype, io: torch.dtype):
        super().__init__()
        self.module, self.compute, self.io = module, compute, io

    def forward(self, *args):
        out = self.module(*[a.to(self.compute) if a.is_floating_point() else a for a in args])
        if isinstance(out, torch.Tensor):
            return out.to(self.io) if out.is_floating_point() else out
        return tuple(o.to(self.io) if o.is_floating_point() else o for o in out)


def cast_inputs(inputs: Mapping[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in inputs.items()}


def graph_shapes(path: str):
    """({input: shape}, {output: shape}) as the ONNX file declares them (named axes as names)."""
    import onnx

    model = onnx.load(path, load_external_data=False)

    def shape(value) -> List[str]:
        return [d.dim_param or str(d.dim_value) if (d.dim_param or d.HasField("dim_value")) else "?"
                for d in value.type.tensor_type.shape.dim]

    initializers = {i.name for i in model.graph.initializer}
    return ({v.name: shape(v) for v in model.graph.input if v.name not in initializers},
            {v.name: shape(v) for v in model.graph.output})


def traced_latent_side(unet) -> int:
    """The latent side a UNet is traced on: torch.export specialises a size of 1 seen while
    tracing, so the UNet's deepest level must be at least 2 x 2 (16 x 16 for SD's four levels)."""
    return max(8, 2 * 2 ** (len(unet.config["block_out_channels"]) - 1))


def write_graph(spec: GraphSpec, out_dir: str, options: ExportOptions) -> GraphRecord:
    """Export `spec` to <out_dir>/<name>/model.onnx as `options` say, check it, and return its record."""
    import json

    compute = "float32" if spec.keep_fp32 else options.dtype
    io = options.float_io
    module = spec.module
    if compute != "float32" or io != "float32":
        inner = copy.deepcopy(module).to(DTYPES[compute]) if compute != "float32" else module
        module = _Cast(inner, DTYPES[compute], DTYPES[io])
    path = os.path.join(out_dir, spec.name, "model.onnx")
    trace = cast_inputs(spec.trace, io)
    check = cast_inputs(spec.check, io)
    if options.static:
        shapes = {k: tuple(v.shape) for k, v in trace.items()}
        if {k: tuple(v.shape) for k, v in check.items()} != shapes:
            raise AssertionError(f"{spec.name}: a static export checks on the traced shapes")
    export_graph(module, list(trace.values()), path, input_names=list(trace), output_names=list(spec.output_axes),
                 dynamic_axes={} if options.static else spec.input_axes, opset=options.opset)
    inputs, outputs = graph_shapes(path)
    record = GraphRecord(spec.name, f"{spec.name}/model.onnx", inputs=inputs, outputs=outputs, dtype=compute,
                         io_dtype=io)
    if options.verify:
        verify(path, module, check, list(spec.output_axes), record, compute)
    if spec.config is not None:
        with open(os.path.join(out_dir, spec.name, "config.json"), "w") as fh:
            json.dump(spec.config, fh, indent=2, default=str)
    if options.optimize and spec.optimizer_type:
        optimize_for_cuda(path, spec.optimizer_type, module)
        record.optimized = options.optimize
    return record


def optimize_for_cuda(path: str, model_type: str, module: nn.Module) -> None:
    """Rewrite `path` with ONNX Runtime's transformer optimiser for the CUDA execution provider:
    GroupNorm and attention become its fused contrib ops (com.microsoft), which have CUDA
    kernels only. The standard graph was checked before; this one is not run here."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    size = sum(p.numel() * p.element_size() for p in module.parameters())
    fusion = FusionOptions(model_type)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        optimized = optimize_model(path, model_type=model_type, opt_level=0, optimization_options=fusion,
                                   use_gpu=True, only_onnxruntime=False)
    model = optimized.model
    for stale in os.listdir(os.path.dirname(path)):
        if stale.startswith("model.onnx"):
            os.remove(os.path.join(os.path.dirname(path), stale))
    onnx.save_model(model, path, save_as_external_data=size > EXTERNAL_DATA_BYTES,
                    location="model.onnx.data", all_tensors_to_one_file=True)


MANIFEST = "fastdiff_onnx.json"


def write_graphs(specs, out_dir: str, options: ExportOptions, progress=None) -> List[GraphRecord]:
    """write_graph for each spec in turn, naming each to `progress` first; their records."""
    records = []
    for spec in specs:
        if progress:
            progress(f"exporting {spec.name}")
        records.append(write_graph(spec, out_dir, options))
    return records


def write_index_and_manifest(out_dir: str, pipe, index: Dict[str, Any], family: str, options: ExportOptions,
                             records: Sequence[GraphRecord], **extra) -> dict:
    """model_index.json (`index`, plus the pipeline's folder defaults) and the manifest, which
    it returns: format, family, the options, and every graph's record."""
    import json

    if getattr(pipe, "folder_defaults", None):
        index = dict(index, _fastdiff_defaults=dict(pipe.folder_defaults))
    with open(os.path.join(out_dir, "model_index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
    manifest = dict(format="fastdiff-onnx", version=2, family=family, opset=options.opset, dtype=options.dtype,
                    io_dtype=options.float_io, static=options.static, optimized=options.optimize,
                    verified=options.verify, graphs=[r.as_dict() for r in records], **extra)
    with open(os.path.join(out_dir, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return manifest
