"""fastdiff.export.onnx's options on Stable Diffusion: float16 graphs (the VAE and the ops'
softmax and statistics kept float32), float32 inputs/outputs around float16 networks, opset
21's GroupNormalization, static shapes (checked against every call before any work), ONNX
Runtime's CUDA optimiser, and a manifest that no longer matches its graphs."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from deps import require
from sd_fixtures import generate_counting_unet_calls, image_terms, make_pipeline
from tolerances import HEADROOM, fp32_bound, guidance_gain, reduction_terms

require("diffusers")
onnx = require("onnx")
ort = require("onnxruntime")
require("onnxscript")
import fastdiff  # noqa: E402
import fastdiff.export  # noqa: E402
from fastdiff.export.graphs import reference_ops  # noqa: E402
from fastdiff.export.stable_diffusion import _UNet  # noqa: E402
from onnx_fixtures import layer_weight_dtypes  # noqa: E402

U16 = 2.0 ** -11  # float16's unit roundoff, where tolerances.U is float32's


def fp16_bound(scale, terms):
    """tolerances.fp32_bound's model with float16's unit roundoff: both sides store every
    intermediate in float16 (the same roundings at the same places) and sum in another order."""
    return HEADROOM * np.sqrt(terms) * U16 * scale


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1_options"))
    make_pipeline(folder, "sd1")
    return fastdiff.Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def half(pipe, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("half") / "onnx")
    return out, fastdiff.export.onnx(pipe, out, dtype="float16", io_dtype="float32", opset=21)


@pytest.fixture(scope="module")
def static(pipe, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("static") / "onnx")
    return out, fastdiff.export.onnx(pipe, out, static=dict(batch_size=1, height=64, width=64))


def test_float16_keeps_the_vae_and_the_softmax_float32(half):
    out, manifest = half
    dtypes = {g["name"]: (g["dtype"], g["io_dtype"]) for g in manifest["graphs"]}
    assert dtypes == {"text_encoder": ("float32", "float32"), "unet": ("float16", "float32"),
                      "vae_encoder": ("float32", "float32"), "vae_decoder": ("float32", "float32")}
    for name, (dtype, _) in dtypes.items():
        model, weights = layer_weight_dtypes(os.path.join(out, name, "model.onnx"))
        assert weights == {np.dtype(dtype)}, name
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
        softmax = [n for n in inferred.graph.node if n.op_type == "Softmax"]
        assert softmax and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in softmax), name
        # float32 in and out, as asked, around the float16 network
        assert {i.type.tensor_type.elem_type for i in model.graph.input} <= {onnx.TensorProto.FLOAT,
                                                                               onnx.TensorProto.INT64}
        assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}


def test_opset_21_writes_the_standard_group_normalization(half, pipe):
    out, manifest = half
    assert manifest["opset"] == 21
    for name in ("unet", "vae_decoder"):
        ops = {n.op_type for n in onnx.load(os.path.join(out, name, "model.onnx")).graph.node}
        assert "GroupNormalization" in ops and "InstanceNormalization" not in ops, name


def test_the_float16_unet_matches_pytorch_in_float16(half, pipe):
    """The graph against the PyTorch UNet cast to float16 on a shape it was not traced with."""
    out, _ = half
    g = torch.Generator().manual_seed(1)
    c, length = pipe.unet.config["in_channels"], pipe.tokenizer.model_max_length
    inputs = dict(sample=torch.randn(3, c, 16, 8, generator=g), timestep=torch.tensor([321.0]),
                  encoder_hidden_states=torch.randn(3, length, pipe.text_encoder.config.hidden_size, generator=g))
    session = ort.InferenceSession(os.path.join(out, "unet", "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    unet = _UNet(pipe.unet).half()
    try:
        with reference_ops(), torch.no_grad():
            want = unet(*(v.half() for v in inputs.values())).float()
            terms = reduction_terms(unet, lambda: unet(*(v.half() for v in inputs.values())))
    finally:
        unet.float()
    err = np.abs(got - want.numpy()).max()
    assert err <= fp16_bound(max(1.0, want.abs().max().item()), terms)
    assert err > 0  # float16 arithmetic, not a float32 graph


class _Float16UNet:
    """The pipeline's UNet evaluated in float16 (a copy; inputs cast in, the output cast back
    to float32), standing in for it in generate()."""

    def __init__(self, unet):
        self.unet, self.half = unet, copy.deepcopy(unet).half()

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, x, t, encoder_hidden_states):
        return self.half(x.half(), t, encoder_hidden_states=encoder_hidden_states.half()).float()


def test_from_onnx_runs_a_float16_export(half, pipe):
    """The images of the float16 UNet graph against the float32 pipeline's. float16's sqrt(terms)
    bound is vacuous for whole images (u16 = 2^-11 over ~10^6 terms exceeds 1), so the reference
    is the same computation's own float16 error: the PyTorch pipeline with its UNet evaluated in
    float16 (VAE and text encoder float32, as the export keeps them). Both differ from float32 by
    the roundings of one float16 network, summed in other orders, so their largest errors are of
    one size; HEADROOM (4) allows for the spread of a maximum over the image. Measured here
    (2026-12-07): ONNX 3.3e-3, PyTorch float16 5.7e-3, so the bound is 2.3e-2, which a wrong
    coefficient or a wrong half of the guided batch exceeds many times over; a 1% guidance
    error (1.8e-3 here) is below float16's own error and is caught by the float32 tests."""
    out, _ = half
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    kw = dict(num_inference_steps=5, guidance_scale=5.0, sampler="ddim", seed=3, output_type="pt", progress=False)
    want = pipe.generate("a red circle", **kw)
    got = onnx_pipe.generate("a red circle", **kw)
    unet = pipe.unet
    pipe.unet = _Float16UNet(unet)
    try:
        torch16 = pipe.generate("a red circle", **kw)
    finally:
        pipe.unet = unet
    own = (torch16 - want).abs().max().item()
    err = (got - want).abs().max().item()
    assert torch.isfinite(got).all() and 0 < err <= HEADROOM * own, (err, own)


def test_float16_inputs_and_outputs(pipe, tmp_path):
    """io_dtype float16: the graphs take and return float16, a float32 VAE included (casts in
    the graph), and the ONNX pipeline feeds them."""
    from fastdiff.export.graphs import ExportOptions, write_graph
    from fastdiff.export.stable_diffusion import _graphs

    options = ExportOptions(dtype="float16", io_dtype="float16")
    spec = next(s for s in _graphs(pipe, options) if s.name == "vae_decoder")
    record = write_graph(spec, str(tmp_path), options)
    model = onnx.load(tmp_path / "vae_decoder" / "model.onnx")
    assert record.dtype == "float32" and record.io_dtype == "float16"
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT16]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT16]
    assert record.max_abs_error <= record.bound


def test_a_static_export_fixes_every_axis_and_checks_each_call_first(static, pipe):
    out, manifest = static
    assert manifest["static"] == dict(batch_size=1, height=64, width=64)
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        model = onnx.load(os.path.join(out, name, "model.onnx"))
        for value in model.graph.input:
            assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), (name, value.name)
    unet = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(os.path.join(out, "unet", "model.onnx")).graph.input}
    assert unet["sample"] == [2, pipe.unet.config["in_channels"], 8, 8]  # the guided batch: twice the images
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    kw = dict(num_inference_steps=4, guidance_scale=7.5, sampler="dpmpp_2m", seed=1, output_type="pt", progress=False)
    want, calls = generate_counting_unet_calls(pipe, "a blue square", **kw)
    got = onnx_pipe.generate("a blue square", **kw)
    ids = torch.zeros(2, pipe.tokenizer.model_max_length, dtype=torch.long)
    text = reduction_terms(pipe.text_encoder, lambda: pipe.text_encoder(ids))
    gain = guidance_gain(7.5)
    assert (got - want).abs().max().item() <= fp32_bound(1.0, image_terms(pipe, calls, gain=gain)
                                                         + gain ** 2 * calls * text)
    for kwargs, words in ((dict(prompt=["a", "b"]), r"\[4, 4, 8, 8\]"),
                          (dict(prompt="a", guidance_scale=1.0), r"\[1, 4, 8, 8\]"),
                          (dict(prompt="a", height=128), r"\[2, 4, 16, 8\]")):
        prompt = kwargs.pop("prompt")
        with pytest.raises(ValueError, match=r"exported with static shapes: .*" + words):
            onnx_pipe.generate(prompt, progress=False, callback=pytest.fail, **kwargs)


def test_optimize_for_cuda_fuses_contrib_ops_and_refuses_the_cpu(pipe, tmp_path):
    out = tmp_path / "cuda"
    manifest = fastdiff.export.onnx(pipe, out, optimize="cuda")
    assert manifest["optimized"] == "cuda" and all(g["optimized"] == "cuda" for g in manifest["graphs"])
    assert all(g["max_abs_error"] <= g["bound"] for g in manifest["graphs"])  # the standard graph was checked
    ops = {(n.domain, n.op_type) for n in onnx.load(out / "unet" / "model.onnx").graph.node}
    assert ("com.microsoft", "GroupNorm") in ops or ("com.microsoft", "SkipGroupNorm") in ops
    with pytest.raises(ValueError, match="optimised for CUDAExecutionProvider"):
        fastdiff.Pipeline.from_onnx(out)


def test_a_manifest_that_does_not_match_its_graphs_is_named(static, tmp_path):
    out, _ = static
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / "fastdiff_onnx.json").read_text())
    unet = next(g for g in manifest["graphs"] if g["name"] == "unet")
    unet["inputs"] = {"latents": unet["inputs"]["sample"], **{k: v for k, v in unet["inputs"].items() if k != "sample"}}
    (broken / "fastdiff_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"unet/model.onnx: its inputs .* do not match the manifest"):
        fastdiff.Pipeline.from_onnx(broken)
    unet["inputs"] = {k: v[:2] if k == "latents" else v for k, v in unet["inputs"].items()}
    unet["inputs"] = {"sample" if k == "latents" else k: v for k, v in unet["inputs"].items()}
    (broken / "fastdiff_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"unet/model.onnx: input 'sample' has rank 4"):
        fastdiff.Pipeline.from_onnx(broken)
    manifest["family"] = "GlidePipeline"
    (broken / "fastdiff_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="fastdiff_onnx.json: the manifest is of a 'GlidePipeline' export"):
        fastdiff.Pipeline.from_onnx(broken)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(dtype="float64"), ValueError, "dtype must be 'float32' or 'float16'"),
    (dict(dtype=torch.bfloat16), ValueError, "dtype must be"),
    (dict(io_dtype="int8"), ValueError, "io_dtype must be"),
    (dict(static=[1, 64, 64]), TypeError, "static must map"),
    (dict(static=dict(batch=1)), ValueError, "static takes batch_size, height, width, not batch"),
    (dict(static=dict(batch_size=0, height=64, width=64)), ValueError, r"static\['batch_size'\] must be a positive"),
    (dict(static=dict(batch_size=1, height=60, width=64)), ValueError, "multiple of 8"),
    (dict(static=dict(batch_size=1)), ValueError, "needs batch_size, height and width; missing height, width"),
    (dict(static=dict(batch_size=1, height=64, width=64), step={"ddim": [4]}), ValueError, "drop static or step"),
    (dict(dtype="float16", step={"ddim": [4]}), ValueError, "step graphs are exported in float32"),
    (dict(optimize="tensorrt"), ValueError, "optimize must be None or 'cuda'"),
    (dict(verify="yes"), TypeError, "verify must be True or False"),
])
def test_bad_options_are_refused_before_anything_is_written(pipe, tmp_path, kwargs, error, words):
    with pytest.raises(error, match=words):
        fastdiff.export.onnx(pipe, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
