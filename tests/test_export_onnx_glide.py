"""ONNX export of GLIDE (fastdiff.export.onnx on a GlidePipeline) and running it back
(fastdiff.Pipeline.from_onnx -> OnnxGlidePipeline).

Every comparison is between two float32 computations of the same math that order their sums
differently (ONNX Runtime's kernels against PyTorch's), so every bound is float32's rounding
of reordered sums, tests/tolerances.py's fp32_bound(scale, terms), with `terms` counted on the
very call compared (tolerances.reduction_terms: the layers' fan-ins, normalisations and
attention lengths) and, through a sampler, times its model calls (glide_fixtures.sample_terms,
guidance's gain included). The headroom is tolerances.HEADROOM = 4 over that sqrt(terms)
estimate (the tail over every output element, and the sampler's coefficients it leaves out);
the count itself over-counts (branches side by side counted in sequence). A real error stays
outside: a weight 1% off, or 1% less guidance, fails the same bounds (tested below).
"""
from __future__ import annotations

import copy
import json
import os
import types

import numpy as np
import pytest
import torch

from deps import require
from glide_fixtures import (base_capture, sample_terms, tiny_options, write_checkpoint,
                            write_glide_tokenizer)
from tolerances import fp32_bound, guidance_gain, reduction_terms

onnx = require("onnx")
ort = require("onnxruntime")
require("onnxscript")
import fastdiff  # noqa: E402
import fastdiff.export  # noqa: E402
from fastdiff.export.glide import text_output_names, unet_input_names  # noqa: E402
from fastdiff.export.graphs import graph_shapes, reference_ops  # noqa: E402
from fastdiff.loaders.glide_tokenizers import GlideTokenizer  # noqa: E402
from fastdiff.pipelines import GlidePipeline, Pipeline  # noqa: E402
from fastdiff.pipelines.onnx_glide import OnnxGlidePipeline  # noqa: E402
from onnx_fixtures import (BrokenFolder, assert_bfloat16_refused, assert_onnx_refuses,  # noqa: E402
                           edited_json, removed, renamed_input)

PROMPTS = ["a corgi in a field", "a red circle above a blue square"]


@pytest.fixture(scope="module")
def glide(tmp_path_factory):
    root = tmp_path_factory.mktemp("glide")
    n_vocab = write_glide_tokenizer(str(root / "tokenizer"))
    options = {"base": tiny_options(), "upsample": tiny_options(upsampler=True),
               "base_inpaint": tiny_options(inpaint=True),
               "upsample_inpaint": tiny_options(upsampler=True, inpaint=True)}
    for seed, (name, o) in enumerate(options.items()):
        write_checkpoint(str(root / f"{name}.pt"), o, n_vocab, seed=seed)

    def load(base, upsampler=None, **kw):
        return Pipeline.from_glide(str(root / f"{base}.pt"), upsampler and str(root / f"{upsampler}.pt"),
                                   tokenizer=str(root / "tokenizer"), inpaint="inpaint" in base,
                                   options=options[base], upsampler_options=upsampler and options[upsampler], **kw)
    return types.SimpleNamespace(root=root, load=load)


def _export(tmp_path_factory, pipe, name, **kw):
    out = str(tmp_path_factory.mktemp(name))
    return pipe, out, fastdiff.export.onnx(pipe, out, **kw)


@pytest.fixture(scope="module")
def exported(glide, tmp_path_factory):
    return _export(tmp_path_factory, glide.load("base", "upsample"), "glide_onnx")


@pytest.fixture(scope="module")
def inpaint_exported(glide, tmp_path_factory):
    return _export(tmp_path_factory, glide.load("base_inpaint", "upsample_inpaint"), "glide_inpaint_onnx")


@pytest.fixture(scope="module")
def half_static(glide, tmp_path_factory):
    """The base model alone (with a noised CLIP) in float16 with static shapes, one image a call."""
    from test_glide_clip import random_state, tiny_config, write_clip_files

    folder = tmp_path_factory.mktemp("clip")
    config = dict(tiny_config(write_clip_files(str(folder)), n_timesteps=1000), image_size=16, patch_size=4)
    for k, part in enumerate(("text", "image")):
        torch.save(random_state(config, part, seed=20 + k), folder / f"clip_{part}_enc.pt")
    (folder / "config.json").write_text(json.dumps(config))
    pipe = glide.load("base", clip=str(folder))
    return _export(tmp_path_factory, pipe, "glide_half", dtype="float16", static={"batch_size": 1})


def _stages(pipe):
    return [("", pipe.base)] + ([("upsampler_", pipe.upsampler)] if pipe.upsampler is not None else [])


# --------------------------------------------------------------------------- the folder

@pytest.mark.parametrize("which", ["exported", "inpaint_exported"])
def test_folder_layout_names_and_standard_operators(which, request):
    pipe, out, manifest = request.getfixturevalue(which)
    names = []
    for prefix, model in _stages(pipe):
        expected = {f"{prefix}text_encoder": (["tokens", "mask"], text_output_names(model)),
                    f"{prefix}unet": (unet_input_names(model), ["out_sample"])}
        for name, (inputs, outputs) in expected.items():
            graph = onnx.load(os.path.join(out, name, "model.onnx"))
            assert [i.name for i in graph.graph.input] == inputs, name
            assert [o.name for o in graph.graph.output] == outputs, name
            # Standard ONNX only, so every execution provider takes the graph.
            assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}, name
            # The batch really is dynamic (torch.onnx fixes an axis silently where tracing pins it).
            shapes, _ = graph_shapes(os.path.join(out, name, "model.onnx"))
            assert all(shape[0] == "batch_size" for shape in shapes.values()), (name, shapes)
            names.append(name)
        assert json.load(open(os.path.join(out, f"{prefix}unet", "config.json"))) == json.loads(
            json.dumps(model.options))
        assert len(text_output_names(model)) == 1 + 2 * len(model.attention_blocks())
    assert [g["name"] for g in manifest["graphs"]] == names
    assert all(g["max_abs_error"] <= g["bound"] for g in manifest["graphs"])
    assert manifest["family"] == "GlidePipeline" and manifest["upsampler"] and manifest["clip"] is None
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "OnnxGlidePipeline" and index["_fastdiff_family"] == "GlidePipeline"
    assert json.load(open(os.path.join(out, "fastdiff_onnx.json"))) == json.loads(json.dumps(manifest))
    tokenizer = GlideTokenizer.from_folder(os.path.join(out, "tokenizer"))
    assert tokenizer.encoder == pipe.tokenizer.encoder and tokenizer.ranks == pipe.tokenizer.ranks


# --------------------------------------------------------------------------- each graph against its model

def _graph_cases(pipe, g):
    """(graph, model, feeds, the model's outputs as a call) on batches 1 and 4 (traced on 2)."""
    for prefix, model in _stages(pipe):
        ctx, size = model.text_ctx, model.image_size
        for b in (1, 4):
            tokens = torch.randint(0, model.n_vocab, (b, ctx), generator=g)
            mask = torch.arange(ctx)[None] < torch.randint(0, ctx + 1, (b, 1), generator=g)
            yield f"{prefix}text_encoder", model, dict(tokens=tokens, mask=mask), \
                lambda m=model, t=tokens, k=mask: m.encode_text(t, k)
            with torch.no_grad():
                text = model.encode_text(tokens, mask)
            extra = {}
            if model.super_res:
                extra["low_res"] = torch.rand(b, 3, pipe.base.image_size, pipe.base.image_size, generator=g) * 2 - 1
            if model.inpaint:
                extra.update(inpaint_image=torch.rand(b, 3, size, size, generator=g) * 2 - 1,
                             inpaint_mask=(torch.rand(b, 1, size, size, generator=g) > 0.5).float())
            x = torch.randn(b, 3, size, size, generator=g)
            t = torch.rand(b, generator=g) * 999  # per sample, fractional as the sigma samplers' are
            feeds = dict(sample=x, timestep=t, **dict(zip(text_output_names(model),
                                                          [text.xf_proj] + [u for kv in text.kv for u in kv])), **extra)
            yield f"{prefix}unet", model, feeds, lambda m=model, x=x, t=t, c=text, e=extra: m(x, t, c, **e)


def _flat(out):
    return [out.xf_proj] + [u for kv in out.kv for u in kv] if hasattr(out, "kv") else [out]


def _run(out, name, feeds):
    session = ort.InferenceSession(os.path.join(out, name, "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.mark.parametrize("which", ["exported", "inpaint_exported"])
def test_every_graph_matches_its_model_on_other_batches(which, request):
    """Each graph against the model's own encode_text / forward (not the export's modules),
    every output within float32's rounding of the call's counted terms at its scale."""
    pipe, out, _ = request.getfixturevalue(which)
    for name, model, feeds, call in _graph_cases(pipe, torch.Generator().manual_seed(5)):
        with reference_ops(), torch.no_grad():
            want = _flat(call())
            terms = reduction_terms(model, call)
        for got, w in zip(_run(out, name, feeds), want, strict=True):
            assert got.shape == tuple(w.shape), name
            bound = fp32_bound(max(1.0, w.abs().max().item()), terms)
            assert np.abs(got - w.numpy()).max() <= bound, (name, {k: tuple(v.shape) for k, v in feeds.items()})


def test_a_weight_one_percent_off_fails_the_graph_check(exported):
    pipe, out, _ = exported
    name, model, feeds, call = next(c for c in _graph_cases(pipe, torch.Generator().manual_seed(6))
                                    if c[0] == "unet")
    got = _run(out, name, feeds)[0]
    conv = model.out[2]
    with reference_ops(), torch.no_grad():
        terms = reduction_terms(model, call)
        conv.weight.mul_(1.01)
        try:
            want = call()
        finally:
            conv.weight.div_(1.01)
    assert np.abs(got - want.numpy()).max() > fp32_bound(max(1.0, want.abs().max().item()), terms)


# --------------------------------------------------------------------------- from_onnx: whole pipelines

def _generate_counting_calls(pipe, *args, **kwargs):
    """pipe.generate(...) and how many times it called each PyTorch U-Net."""
    calls = {"base": [], "upsampler": []}
    hooks = [getattr(pipe, name).register_forward_pre_hook(lambda module, inputs, seen=seen: seen.append(1))
             for name, seen in calls.items() if getattr(pipe, name) is not None]
    try:
        return pipe.generate(*args, **kwargs), {name: len(seen) for name, seen in calls.items()}
    finally:
        for hook in hooks:
            hook.remove()


def _bound(model, calls, guidance=1.0):
    """Samples in [-1, 1] through `calls` U-Net calls (text encoder included), guidance's gain counted."""
    return fp32_bound(1.0, sample_terms(model, calls, guidance_gain(guidance)))


# (The sigma samplers (euler, dpmpp_2m, ...) drive these random tiny models to |x| ~ 1e4, all
# pixels clamped: nothing to compare. Their fractional timesteps are checked per graph above.)
@pytest.mark.parametrize("sampler, scale", [("ddpm", 3.0), ("ddim", 3.0), ("ddpm", 1.0)])
def test_from_onnx_base_images_match_pytorch(exported, sampler, scale):
    pipe, out, _ = exported
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    assert isinstance(onnx_pipe, OnnxGlidePipeline)
    kw = dict(guidance_scale=scale, sampler=sampler, num_inference_steps="10", seed=3, upsample=False,
              output_type="pt", progress=False)
    want, calls = _generate_counting_calls(pipe, PROMPTS, **kw)
    got = onnx_pipe.generate(PROMPTS, **kw)
    bound = _bound(pipe.base, calls["base"], scale)
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert (got - want).abs().max().item() <= bound
    if scale != 1.0:  # tight enough that 1% less guidance fails
        off = onnx_pipe.generate(PROMPTS, **dict(kw, guidance_scale=scale * 0.99))
        assert (off - want).abs().max().item() > bound


def _upsampler_hybrid(pipe, onnx_pipe):
    """The PyTorch pipeline with the ONNX upsampler: its base stage is the PyTorch one bit for
    bit, so both upsamplers see the same 8-bit low-res image (a 1e-7 difference in the base
    samples can flip one of those roundings, which no rounding bound covers)."""
    return GlidePipeline(pipe.base, pipe.tokenizer, onnx_pipe.upsampler)


@pytest.mark.parametrize("upsample_sampler", ["ddim", "ddpm"])
def test_from_onnx_base_and_upsampler(exported, upsample_sampler):
    pipe, out, _ = exported
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    kw = dict(guidance_scale=3.0, num_inference_steps="8", upsample_steps="fast27" if upsample_sampler == "ddim"
              else "6", upsample_sampler=upsample_sampler, seed=5, output_type="pt", progress=False)
    seen, callback = base_capture()
    want, calls = _generate_counting_calls(pipe, PROMPTS, callback=callback, **kw)
    seen_onnx, callback_onnx = base_capture()
    got = onnx_pipe.generate(PROMPTS, callback=callback_onnx, **kw)
    assert got.shape == want.shape == (2, 3, 32, 32) and 0 <= got.min() and got.max() <= 1
    assert (seen_onnx["x"] - seen["x"]).abs().max().item() <= _bound(pipe.base, calls["base"], 3.0)
    hybrid = _upsampler_hybrid(pipe, onnx_pipe).generate(PROMPTS, **kw)
    assert (hybrid - want).abs().max().item() <= _bound(pipe.upsampler, calls["upsampler"])
    pil = onnx_pipe.generate(PROMPTS[0], **dict(kw, output_type="pil"))
    assert pil[0].size == (32, 32)


def test_from_onnx_inpainting(glide, inpaint_exported):
    pipe, out, _ = inpaint_exported
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    g = torch.Generator().manual_seed(4)
    image, keep = torch.rand(1, 3, 32, 32, generator=g), torch.ones(16, 16)
    keep[:, 9:] = 0  # generate the right part
    kw = dict(image=image, mask=keep, guidance_scale=5.0, num_inference_steps="6", upsample_steps="5", seed=9,
              output_type="pt", progress=False)
    want, calls = _generate_counting_calls(pipe, "a corgi", upsample=False, **kw)
    got = onnx_pipe.generate("a corgi", upsample=False, **kw)
    kept = keep.bool().expand_as(got)
    assert torch.equal(got[kept], want[kept])  # the known pixels pasted, as the PyTorch pipeline does
    bound = _bound(pipe.base, calls["base"], 5.0)
    assert (got - want).abs().max().item() <= bound
    off = onnx_pipe.generate("a corgi", upsample=False, **dict(kw, guidance_scale=5.0 * 0.99))
    assert (off - want).abs().max().item() > bound
    want_up, calls = _generate_counting_calls(pipe, "a corgi", **kw)
    got_up = _upsampler_hybrid(pipe, onnx_pipe).generate("a corgi", **kw)
    assert (got_up - want_up).abs().max().item() <= _bound(pipe.upsampler, calls["upsampler"])
    assert onnx_pipe.generate("a corgi", **kw).shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------- float16, static

def test_float16_static_export(half_static):
    """float16 U-Net (the text encoder stays float32), each graph within the bound of the unit
    roundoff of float16 (graphs.verify); against the float32 model, the graph errs no more than
    about twice PyTorch's own float16 model (STYLE.md #6)."""
    pipe, out, manifest = half_static
    dtypes = {g["name"]: g["dtype"] for g in manifest["graphs"]}
    assert dtypes == {"text_encoder": "float32", "unet": "float16"}
    assert all(g["io_dtype"] == "float16" and g["max_abs_error"] <= g["bound"] for g in manifest["graphs"])
    assert manifest["static"] == {"batch_size": 1} and not manifest["upsampler"]
    assert "not exported" in manifest["clip"]
    shapes, _ = graph_shapes(os.path.join(out, "unet", "model.onnx"))
    assert shapes["sample"] == ["2", "3", "16", "16"]  # the guided batch of one image
    model = pipe.base
    g = torch.Generator().manual_seed(8)
    tokens, mask = pipe.tokenizer(["a corgi", ""], model.text_ctx)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([640.0, 640.0])
    with reference_ops(), torch.no_grad():
        text = model.encode_text(tokens, mask)
        want = model(x, t, text)
        half = copy.deepcopy(model).half()
        text_half = type(text)(text.xf_proj.half(), tuple((k.half(), v.half()) for k, v in text.kv))
        torch_half = half(x.half(), t, text_half).float()
    feeds = dict(sample=x, timestep=t, **dict(zip(text_output_names(model),
                                                  [text.xf_proj] + [u for kv in text.kv for u in kv])))
    got = _run(out, "unet", {k: v.half() for k, v in feeds.items()})[0].astype(np.float32)
    torch_error = (torch_half - want).abs().max().item()
    assert 0 < np.abs(got - want.numpy()).max() <= 2 * torch_error + 2 * torch.finfo(torch.float16).eps


def test_static_graphs_refuse_other_batches_before_work(half_static):
    _, out, _ = half_static
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    called = []
    for kw in (dict(prompt=PROMPTS), dict(prompt="a corgi", guidance_scale=1.0)):
        with pytest.raises(ValueError, match="exported with static shapes"):
            onnx_pipe.generate(**kw, progress=False, callback=lambda info: called.append(info))
    assert not called
    assert onnx_pipe.generate("a corgi", num_inference_steps="4", seed=1, output_type="pt",
                              progress=False).shape == (1, 3, 16, 16)


# --------------------------------------------------------------------------- bad input

def test_bad_export_requests_are_refused_before_anything_is_written(exported, tmp_path):
    pipe, _, _ = exported
    with pytest.raises(ValueError, match="step graphs are Stable Diffusion's"):
        fastdiff.export.onnx(pipe, tmp_path / "a", step={"ddim": [5]})
    with pytest.raises(ValueError, match=r"static\['height'\] is 16.*outputs 32 px"):
        fastdiff.export.onnx(pipe, tmp_path / "b", static={"batch_size": 1, "height": 16, "width": 32})
    with pytest.raises(ValueError, match="needs batch_size"):
        fastdiff.export.onnx(pipe, tmp_path / "c", static={"height": 32})
    assert_bfloat16_refused(pipe, tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_from_onnx_refuses_what_needs_pytorch(exported):
    _, out, _ = exported
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    assert_onnx_refuses(onnx_pipe, "a corgi", ((dict(cond_fn=lambda x, t: x), "cond_fn"),
                                               (dict(cuda_graph=True), "cuda_graph"),
                                               (dict(clip_guidance_scale=3.0), "clip_guidance_scale")))
    with pytest.raises(ValueError, match="already runs exported graphs"):
        fastdiff.export.onnx(onnx_pipe, os.path.join(out, "again"))


def test_from_onnx_names_what_is_wrong_with_a_folder(exported, tmp_path):
    _, out, _ = exported
    broken = BrokenFolder(out, tmp_path)
    broken.refuses("upsampler_unet/model.onnx", removed, FileNotFoundError, "upsampler_unet/model.onnx.*missing")
    broken.refuses("fastdiff_onnx.json", renamed_input("unet", "k_0", "k_zero"), ValueError,
                   r"unet/model.onnx: its inputs .* do not match the manifest")

    def drop_upsampler(manifest):
        manifest["graphs"] = [g for g in manifest["graphs"] if not g["name"].startswith("upsampler_")]

    broken.refuses("fastdiff_onnx.json", edited_json(drop_upsampler), ValueError,
                   "fastdiff_onnx.json: the manifest has no upsampler_text_encoder")
    broken.refuses("unet/config.json", removed, FileNotFoundError, "unet/config.json is missing")
