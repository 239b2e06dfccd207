"""What the ONNX export tests of every family share: a graph's outputs held to its module's
within float32's rounding, the dtypes of a graph's layer weights, and a broken copy of an
exported folder whose files are spoiled one at a time."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff
from sd_fixtures import image_terms
from tolerances import fp32_bound, guidance_gain, reduction_terms

def reference_outputs(module, inputs):
    """(the module's outputs as a list, the reduction terms of the call) on its ops' PyTorch
    twins, which is what the graphs were traced from."""
    from fastdiff.export.graphs import reference_ops

    with reference_ops(), torch.no_grad():
        want = module(*inputs.values())
        terms = reduction_terms(module, lambda: module(*inputs.values()))
    return ([want] if isinstance(want, torch.Tensor) else list(want)), terms


def assert_outputs_match(got, want, terms: int, what) -> None:
    """Each ONNX Runtime output (numpy) of the module's shape and within float32's rounding of
    the reordered sums at the output's scale (tests/tolerances.py)."""
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape), what
        bound = fp32_bound(max(1.0, w.abs().max().item()), terms)
        err = np.abs(g - w.numpy()).max()
        assert err <= bound, (what, err, bound)


def onnx_bound(pipe, calls, guidance, encode=False):
    """The images of the ONNX and PyTorch pipelines: the same math in another order, as
    test_pipeline_sd.py's bound against diffusers (tests/tolerances.py), plus the text
    encoder, which here differs too and feeds every UNet call."""
    ids = torch.zeros(2, pipe.tokenizer.model_max_length, dtype=torch.long)
    text = reduction_terms(pipe.text_encoder, lambda: pipe.text_encoder(ids))
    gain = guidance_gain(guidance) if guidance > 1 else 1.0
    return fp32_bound(1.0, image_terms(pipe, calls, gain=gain, encode=encode) + gain ** 2 * calls * text)


def renamed_input(graph: str, old: str, new: str):
    """A manifest spoiler: graph's input `old` recorded as `new` (the graph itself unchanged)."""
    def edit(manifest):
        record = next(g for g in manifest["graphs"] if g["name"] == graph)
        record["inputs"] = {(new if k == old else k): v for k, v in record["inputs"].items()}
    return edited_json(edit)


def assert_bfloat16_refused(pipe, out) -> None:
    """Exporting the pipeline cast to bfloat16 (a copy: a bfloat16 round trip would change the
    fixture's weights) is refused before anything is written to `out`."""
    import fastdiff.export

    cast = copy.deepcopy(pipe).to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 pipeline"):
        fastdiff.export.onnx(cast, out)
    assert not Path(out).exists()


def assert_onnx_refuses(onnx_pipe, prompt: str, cases) -> None:
    """generate() on an ONNX pipeline refuses each (kwargs, argument name) of `cases` by name
    (what needs the PyTorch modules), and to() is refused."""
    for kwargs, what in cases:
        with pytest.raises(ValueError, match=f"{what} is not available on an ONNX pipeline"):
            onnx_pipe.generate(prompt, progress=False, **kwargs)
    with pytest.raises(ValueError, match="cannot be moved"):
        onnx_pipe.to("cpu", torch.float16)


# Operators whose initializer inputs are layer weights (what convolutions, matrix products and
# embedding lookups read).
WEIGHT_OPS = ("Conv", "MatMul", "Gemm", "Gather")


def layer_weight_dtypes(path: str):
    """(the loaded model, the numpy dtypes of its layer weights). The norms are left out: their
    statistics are taken in float32 whatever the network's dtype (the ops' GroupNorm upcasts, as
    GLIDE's GroupNorm32 does), so their scale and shift are float32. So are tensors of 64
    elements or fewer: the timestep embedding's frequency row ([1, channels / 2], built in
    float32 on purpose, as diffusers does) and scalar constants are operands too but no layer's
    weight, and a weight has a few hundred elements even in the tests' small models."""
    import onnx

    model = onnx.load(path)
    layers = {name for n in model.graph.node if n.op_type in WEIGHT_OPS for name in n.input}
    return model, {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in model.graph.initializer
                   if i.name in layers and int(np.prod(i.dims)) > 64}


def removed(path: Path) -> None:
    os.remove(path)


def overwritten(data: bytes):
    return lambda path: path.write_bytes(data)


def truncated(size: int):
    def spoil(path: Path) -> None:
        with open(path, "r+b") as fh:
            fh.truncate(size)
    return spoil


def edited_json(edit):
    """The file's JSON, changed in place by edit(obj) (which may return a replacement)."""
    def spoil(path: Path) -> None:
        obj = json.loads(path.read_text())
        new = edit(obj)
        path.write_text(json.dumps(obj if new is None else new))
    return spoil


class BrokenFolder:
    """A copy of an exported folder: refuses() spoils one of its files, checks that
    Pipeline.from_onnx raises `error` matching `match` (which names the file), and restores it,
    so each case sees an otherwise intact folder."""

    def __init__(self, out, tmp_path: Path):
        self.out, self.root = Path(out), Path(tmp_path) / "broken"
        shutil.copytree(self.out, self.root)

    def refuses(self, relative: str, spoil, error, match: str) -> None:
        spoil(self.root / relative)
        with pytest.raises(error, match=match):
            fastdiff.Pipeline.from_onnx(self.root)
        original = self.out / relative
        if original.exists():
            shutil.copy(original, self.root / relative)
