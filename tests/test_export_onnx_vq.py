"""ONNX export of VQ-Diffusion (fastdiff.export.onnx on a VQDiffusionPipeline) and running it
back (fastdiff.Pipeline.from_onnx -> OnnxVQDiffusionPipeline), on tiny random diffusers folders
(tests/vq_pipeline_fixtures.py).

Each graph against its module: two float32 computations of the same math that order their sums
differently, so the bound is tests/tolerances.py's fp32_bound(scale, terms), with `terms`
counted on the very call compared (reduction_terms: fan-ins, normalisations, attention
lengths) and the headroom tolerances.HEADROOM = 4 over that sqrt(terms) estimate (the tail
over every output element, and the exponentials of the softmaxes it leaves out); the count
itself over-counts (q, k, v and side-by-side branches counted in sequence). The transformer's
log-softmax runs in float64 on both sides (ONNX Runtime takes the double LogSoftmax), so it
adds nothing.

Whole runs are discrete: the tokens are Gumbel argmaxes, and a rounding difference can flip
one only where the top two perturbed log-probabilities lie within it. The run's own
differences are measured (test_from_onnx_gives_the_pytorch_tokens_and_images), the chance
of any flip derived from them, and it is small enough that the tokens must be equal; the
images, decoded from equal tokens, are then held to the decoder's float32 bound. A real error
stays outside: a weight 1% off fails the graph bound, 1% less guidance changes the tokens.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from deps import require
from tolerances import fp32_bound, guidance_gain, reduction_terms

diffusers = require("diffusers")
onnx = require("onnx")
ort = require("onnxruntime")
require("onnxscript")
import fastdiff  # noqa: E402
import fastdiff.export  # noqa: E402
from fastdiff.export.graphs import graph_shapes  # noqa: E402
from fastdiff.export.stable_diffusion import _TextEncoder  # noqa: E402
from fastdiff.export.vq_diffusion import _Transformer, _VQVAEDecoder  # noqa: E402
from fastdiff.pipelines.onnx_vq_diffusion import OnnxVQDiffusionPipeline  # noqa: E402
from fastdiff.loaders.files import CheckpointError  # noqa: E402
from onnx_fixtures import (BrokenFolder, assert_bfloat16_refused, assert_outputs_match, edited_json,  # noqa: E402
                           layer_weight_dtypes, reference_outputs, removed, renamed_input, truncated)
from vq_pipeline_fixtures import make_vq_components  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]
F32, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
# graph -> ([(input, elem type)], [(output, elem type)]) of a float32 export
NAMES = {
    "text_encoder": ([("input_ids", I64)], [("last_hidden_state", F32), ("pooler_output", F32)]),
    "transformer": ([("tokens", I64), ("timestep", I64), ("encoder_hidden_states", F32)], [("log_probs", F32)]),
    "vqvae_decoder": ([("tokens", I64)], [("sample", F32)]),
}


def _export(tmp_path_factory, name, learned, **kw):
    folder = make_vq_components(tmp_path_factory.mktemp(name), learned=learned)
    pipe = fastdiff.Pipeline.from_pretrained(folder)
    out = str(tmp_path_factory.mktemp(name + "_onnx"))
    return pipe, out, fastdiff.export.onnx(pipe, out, **kw)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The learned null embedding, float32, dynamic axes."""
    return _export(tmp_path_factory, "vq", learned=True)


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    """The zero-shot variant (null = the embedding of ""), float32, two images per call."""
    return _export(tmp_path_factory, "vq_static", learned=False, static={"batch_size": 2})


def _graph(out, name):
    return onnx.load(os.path.join(out, name, "model.onnx"))


# --------------------------------------------------------------------------- the folder

def test_folder_layout_names_dtypes_and_standard_operators(exported):
    pipe, out, manifest = exported
    for name, (inputs, outputs) in NAMES.items():
        graph = _graph(out, name).graph
        assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == inputs, name
        assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == outputs, name
        # Standard ONNX only, so every execution provider takes the graph.
        assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, name
        shapes, _ = graph_shapes(os.path.join(out, name, "model.onnx"))
        assert all(s[0] == "batch_size" for n, s in shapes.items() if n != "timestep"), (name, shapes)
    K, N = pipe.transformer.num_vector_embeds, pipe.num_tokens
    h, w = pipe.image_size
    record = {g["name"]: g for g in manifest["graphs"]}
    assert record["transformer"]["inputs"]["timestep"] == ["1"]  # one timestep per call, as the sampler passes
    assert record["transformer"]["outputs"]["log_probs"] == ["batch_size", str(K - 1), str(N)]
    assert record["vqvae_decoder"]["outputs"]["sample"] == ["batch_size", "3", str(h), str(w)]
    # the log-softmax in float64 between two casts, as the module computes it
    nodes = _graph(out, "transformer").graph.node
    log_softmax = next(n for n in nodes if n.op_type == "LogSoftmax")
    cast = next(n for n in nodes if log_softmax.input[0] in n.output)
    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.DOUBLE
    assert [g["name"] for g in manifest["graphs"]] == list(NAMES)
    assert all(g["max_abs_error"] <= g["bound"] for g in manifest["graphs"])
    assert manifest["family"] == "VQDiffusionPipeline" and manifest["learned_null_embeddings"]
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "OnnxVQDiffusionPipeline" and index["_fastdiff_family"] == "VQDiffusionPipeline"
    assert json.load(open(os.path.join(out, "fastdiff_onnx.json"))) == json.loads(json.dumps(manifest))
    assert json.load(open(os.path.join(out, "transformer", "config.json"))) == json.loads(
        json.dumps(pipe.transformer.config))
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    assert isinstance(onnx_pipe, OnnxVQDiffusionPipeline)
    assert torch.equal(onnx_pipe.null_embeddings, pipe.null_embeddings)
    assert onnx_pipe.scheduler_config == pipe.scheduler_config and onnx_pipe.defaults == pipe.defaults
    assert onnx_pipe.tokenizer(PROMPTS).input_ids == pipe.tokenizer(PROMPTS).input_ids


# --------------------------------------------------------------------------- each graph against its module

def _cases(pipe, g):
    """(graph, module, inputs): batches 1 and 5, shorter texts, timesteps other than traced."""
    text, tr = pipe.text_encoder, pipe.transformer
    K, N, length = tr.num_vector_embeds, pipe.num_tokens, pipe.tokenizer.model_max_length
    dim = text.config.hidden_size
    for b, L, t in ((1, length, 0), (5, 5, tr.num_timesteps // 2)):
        yield "text_encoder", _TextEncoder(text), dict(input_ids=torch.randint(0, text.config.vocab_size, (b, L),
                                                                                generator=g))
        tokens = torch.randint(0, K, (b, N), generator=g)
        tokens[:, ::3] = K - 1
        yield "transformer", _Transformer(tr), dict(tokens=tokens, timestep=torch.tensor([t]),
                                                    encoder_hidden_states=torch.randn(b, L, dim, generator=g))
        yield "vqvae_decoder", _VQVAEDecoder(pipe.vqvae, tr.height, tr.width), dict(
            tokens=torch.randint(0, K - 1, (b, N), generator=g))


def _run(out, name, inputs):
    sess = ort.InferenceSession(os.path.join(out, name, "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})


def test_every_graph_matches_pytorch_on_other_shapes(exported):
    pipe, out, _ = exported
    for name, module, inputs in _cases(pipe, torch.Generator().manual_seed(3)):
        assert_outputs_match(_run(out, name, inputs), *reference_outputs(module, inputs),
                             (name, {k: tuple(v.shape) for k, v in inputs.items()}))


def test_a_wrong_graph_fails_the_check(exported):
    """The bound can fail: the transformer's graph against a transformer with its output layer 1% off."""
    pipe, out, _ = exported
    name, module, inputs = next(c for c in _cases(pipe, torch.Generator().manual_seed(3)) if c[0] == "transformer")
    got = _run(out, name, inputs)[0]
    weight = pipe.transformer.out.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.01)
        try:
            (want,), terms = reference_outputs(module, inputs)
        finally:
            weight.copy_(kept)
    assert np.abs(got - want.numpy()).max() > fp32_bound(max(1.0, want.abs().max().item()), terms)


# --------------------------------------------------------------------------- whole runs: from_onnx

class _Recorder:
    """Stands in for the ONNX transformer and records delta, the largest difference of the
    guided log-probabilities u + s (c - u) between the graph and the PyTorch module on the
    states the run visits."""

    def __init__(self, graph, module, scale, guided):
        self.graph, self.module, self.scale, self.guided = graph, module, scale, guided
        self.delta, self.terms = 0.0, 0
        self.flip_chance = 0.0  # sum over the Gumbel draws of e^(8 delta_j) - 1 (see the test)

    def __getattr__(self, name):
        return getattr(self.graph, name)

    def __call__(self, tokens, encoder_hidden_states, timestep):
        got = self.graph(tokens, encoder_hidden_states=encoder_hidden_states, timestep=timestep)
        call = lambda: self.module(tokens, encoder_hidden_states=encoder_hidden_states, timestep=timestep)  # noqa
        want = call()
        self.terms = max(self.terms, reduction_terms(self.module, call))
        seen, ref = got, want
        if self.guided:  # the difference as the sampler sees it: after the log-space guidance
            seen, ref = (u + self.scale * (c - u) for u, c in (x.chunk(2) for x in (got, want)))
        error = (seen - ref).abs().amax(dim=1)  # [B, N]: delta_j, per token over its classes
        self.delta = max(self.delta, error.max().item())
        self.flip_chance += torch.expm1(8 * error.double()).sum().item()
        self.scale_seen = max(getattr(self, "scale_seen", 1.0), ref.abs().max().item())
        return got


def _tokens(pipe, prompts, **kw):
    seen = []
    images = pipe.generate(prompts, output_type="pt", progress=False, callback=lambda i: seen.append(i.x.clone()),
                           **kw)
    return images, seen


@pytest.mark.parametrize("which, kw", [
    ("exported", dict(num_inference_steps=10, guidance_scale=5.0)),             # every training step, guided
    ("exported", dict(num_inference_steps=10, guidance_scale=3.0, truncation_rate=0.86, num_images_per_prompt=2)),
    ("exported", dict(num_inference_steps=6, guidance_scale=1.0)),              # one plain call per step
    ("static", dict(num_inference_steps=8, guidance_scale=3.0, truncation_rate=0.9)),  # zero-shot: null = ""
])
def test_from_onnx_gives_the_pytorch_tokens_and_images(which, kw, request):
    """A flip needs the top two of (log-posterior + Gumbel noise) closer than 2 delta_post.
    For a Gumbel argmax that has probability at most e^(2 delta_post) - 1 per draw (given the
    winner, the runner-up's gap has density at most E[e^-G] = 1), so, by the union bound over
    the draws j (tokens x steps, and as many truncation thresholds where truncation is on),
    P(any flip) <= sum_j (e^(2 delta_post,j) - 1). A token's posterior reads that token's
    log-probabilities alone, and delta_post,j <= 4 delta_j, delta_j the largest difference
    over its classes: the posterior's two log-normalisations at most double a max-norm
    difference each, and its logaddexp with fixed coefficients does not grow it. delta_j is
    measured on the run (_Recorder), its maximum held to the derived float32 bound; with it,
    P(any flip) < 5%, so the tokens must be equal."""
    pipe, out, _ = request.getfixturevalue(which)
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    scale = kw["guidance_scale"]
    guided = scale > 1
    recorder = onnx_pipe.transformer = _Recorder(onnx_pipe.transformer, pipe.transformer, scale, guided)
    want, want_tokens = _tokens(pipe, PROMPTS, seed=1, **kw)
    got, got_tokens = _tokens(onnx_pipe, PROMPTS, seed=1, **kw)
    gain = guidance_gain(scale) if guided else 1.0
    assert 0 < recorder.delta <= gain * fp32_bound(recorder.scale_seen, recorder.terms)
    thresholds = 2 if kw.get("truncation_rate", 1.0) < 1 else 1
    assert thresholds * recorder.flip_chance < 0.05, recorder.flip_chance
    assert len(got_tokens) == len(want_tokens) == kw["num_inference_steps"]
    for i, (a, b) in enumerate(zip(got_tokens, want_tokens)):
        assert torch.equal(a, b), f"tokens differ after step {i}"
    tokens, h, w = want_tokens[-1], pipe.transformer.height, pipe.transformer.width
    terms = reduction_terms(pipe.vqvae, lambda: pipe.vqvae.decode_tokens(tokens, h, w))
    assert got.shape == want.shape and (got - want).abs().max().item() <= fp32_bound(1.0, terms)


class _LessGuidance:
    """The ONNX transformer as a 1% guidance error would look to the sampler: the conditional
    half moved 1% towards the unconditional one, u + 0.99 (c - u)."""

    def __init__(self, graph):
        self.graph = graph

    def __getattr__(self, name):
        return getattr(self.graph, name)

    def __call__(self, tokens, encoder_hidden_states, timestep):
        u, c = self.graph(tokens, encoder_hidden_states=encoder_hidden_states, timestep=timestep).chunk(2)
        return torch.cat([u, u + 0.99 * (c - u)])


def test_a_guidance_error_fails_the_run_bound(exported):
    """The comparison above can fail: on the tiny random model the tokens alone need not tell
    1% less guidance apart (its text moves a log-probability by ~0.01, so the error is ~5e-4,
    and most draws early in the chain pick the mask class whatever it is), but the guided
    log-probabilities the run visits are held to float32's rounding, which it exceeds."""
    pipe, out, _ = exported
    scale = 5.0
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    recorder = onnx_pipe.transformer = _Recorder(_LessGuidance(onnx_pipe.transformer), pipe.transformer, scale, True)
    _tokens(onnx_pipe, PROMPTS, num_inference_steps=10, guidance_scale=scale, seed=1)
    assert recorder.delta > guidance_gain(scale) * fp32_bound(recorder.scale_seen, recorder.terms)


def test_outputs_seeds_and_refusals(exported):
    pipe, out, _ = exported
    onnx_pipe = fastdiff.Pipeline.from_pretrained(out)  # the registry finds the ONNX family too
    assert isinstance(onnx_pipe, OnnxVQDiffusionPipeline)
    kw = dict(num_inference_steps=3, seed=7, progress=False)
    pil = onnx_pipe.generate("a red circle", output_type="pil", **kw)
    assert pil[0].size == tuple(reversed(pipe.image_size))
    assert np.array_equal(np.asarray(pil[0]), np.asarray(pipe.generate("a red circle", output_type="pil", **kw)[0]))
    with pytest.raises(ValueError, match="negative_prompt"):
        onnx_pipe.generate("a red circle", progress=False, negative_prompt="blue")
    with pytest.raises(ValueError, match="cannot be moved"):
        onnx_pipe.to("cpu", torch.float16)
    with pytest.raises(ValueError, match="a mask token cannot be decoded"):
        onnx_pipe.vqvae.decode_tokens(torch.full((1, pipe.num_tokens), pipe.mask_class), pipe.transformer.height,
                                      pipe.transformer.width)
    with pytest.raises(ValueError, match="one timestep for the whole batch"):
        onnx_pipe.transformer(torch.zeros(2, pipe.num_tokens, dtype=torch.long), torch.zeros(2, 16, 32),
                              timestep=torch.tensor([1, 2]))


# --------------------------------------------------------------------------- static shapes, float16

def test_a_static_export_fixes_every_axis_and_checks_each_call_first(static):
    pipe, out, manifest = static
    assert manifest["static"] == {"batch_size": 2} and not manifest["learned_null_embeddings"]
    for name in NAMES:
        for value in _graph(out, name).graph.input:
            assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), (name, value.name)
    record = {g["name"]: g for g in manifest["graphs"]}
    assert record["transformer"]["inputs"]["tokens"] == ["4", str(pipe.num_tokens)]  # the guided batch: 2N
    assert record["text_encoder"]["inputs"]["input_ids"][0] == "2"  # "" alone is padded to it
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    assert onnx_pipe.null_embeddings is None
    for prompts, kwargs, words in ((PROMPTS[:1], {}, r"\[2, 16\]"), (PROMPTS, dict(guidance_scale=1.0), r"\[2, 16\]"),
                                   (PROMPTS, dict(num_images_per_prompt=2), r"\[8, 16\]")):
        with pytest.raises(ValueError, match=r"transformer/model.onnx was exported with static shapes: .*" + words):
            onnx_pipe.generate(prompts, progress=False, callback=pytest.fail, **kwargs)


def test_float16_keeps_the_decoder_and_text_encoder_float32(exported, tmp_path):
    pipe, _, _ = exported
    out = tmp_path / "half"
    manifest = fastdiff.export.onnx(pipe, out, dtype="float16", io_dtype="float32")
    record = {g["name"]: g for g in manifest["graphs"]}
    assert {n: r["dtype"] for n, r in record.items()} == dict(text_encoder="float32", transformer="float16",
                                                             vqvae_decoder="float32")
    assert all(r["max_abs_error"] <= r["bound"] for r in record.values())  # against the module in float16
    for name, weights in (("transformer", {np.dtype("float16")}), ("vqvae_decoder", {np.dtype("float32")}),
                          ("text_encoder", {np.dtype("float32")})):
        assert layer_weight_dtypes(os.path.join(out, name, "model.onnx"))[1] == weights, name
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    images = onnx_pipe.generate(PROMPTS, num_inference_steps=4, seed=0, output_type="pt", progress=False)
    assert images.shape == (2, 3, *pipe.image_size) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, words", [
    (dict(step={"ddim": [4]}), "step graphs are Stable Diffusion's; VQ-Diffusion .* drop step"),
    (dict(static={"batch_size": 1, "height": 16}), r"static\['height'\] is 16, but VQ-Diffusion's image size is "
                                                   r"fixed .* makes 8x8 px"),
    (dict(static={"height": 8}), "a static VQ-Diffusion export needs batch_size"),
])
def test_bad_export_requests_are_refused_before_anything_is_written(exported, tmp_path, kwargs, words):
    pipe, _, _ = exported
    with pytest.raises(ValueError, match=words):
        fastdiff.export.onnx(pipe, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_bfloat16_pipeline_is_refused(exported, tmp_path):
    assert_bfloat16_refused(exported[0], tmp_path / "out")


def test_a_broken_folder_names_the_file(exported, tmp_path):
    _, out, _ = exported
    broken = BrokenFolder(out, tmp_path)
    broken.refuses("transformer/model.onnx", removed, FileNotFoundError, "transformer/model.onnx.*missing")
    broken.refuses("fastdiff_onnx.json", renamed_input("transformer", "tokens", "x_t"), ValueError,
                   r"transformer/model.onnx: its inputs .* do not match the manifest")
    broken.refuses("transformer/config.json", edited_json(lambda c: dict(c, norm_type="ada_norm_zero")), ValueError,
                   "transformer/config.json: .*norm_type")
    broken.refuses("learned_classifier_free_sampling_embeddings/diffusion_pytorch_model.safetensors",
                   truncated(20), CheckpointError,
                   "cannot read .*learned_classifier_free_sampling_embeddings.*corrupt or truncated")


def test_the_cli_exports_a_vq_folder_and_generate_runs_it(tmp_path, capsys):
    from PIL import Image

    from fastdiff.cli import main

    folder = make_vq_components(tmp_path / "vq", learned=True)
    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(folder), str(out), "--static", "1x8x8"]) == 0
    printed = capsys.readouterr().out
    for name in NAMES:
        assert f"{name}/model.onnx: float32, ONNX Runtime vs PyTorch max error" in printed
    png = tmp_path / "one.png"
    assert main(["generate", "a red circle", "--model", str(out), "-o", str(png), "--steps", "3",
                 "--no-progress"]) == 0
    image = np.asarray(Image.open(png), dtype=np.int16)
    want = fastdiff.Pipeline.from_pretrained(folder).generate("a red circle", num_inference_steps=3, seed=0,
                                                             progress=False)[0]
    # equal tokens (as above), decoded within float32's rounding: a pixel can round to the next
    # of the 255 levels where its value lies that close to a half level, no further
    assert np.abs(image - np.asarray(want, dtype=np.int16)).max() <= 1
