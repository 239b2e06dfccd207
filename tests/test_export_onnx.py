"""ONNX export of Stable Diffusion (fastdiff.export.onnx): optimum's folder layout and names,
standard operators only, and every graph in ONNX Runtime equal to the PyTorch module it came
from on shapes other than the traced ones, within float32's rounding of the reordered sums."""
import json
import os

import numpy as np
import pytest
import torch

from deps import require
from sd_fixtures import generate_counting_unet_calls, make_pipeline
from tolerances import fp32_bound, reduction_terms

diffusers = require("diffusers")
onnx = require("onnx")
ort = require("onnxruntime")
require("onnxscript")
import fastdiff  # noqa: E402
import fastdiff.export  # noqa: E402
from onnx_fixtures import (BrokenFolder, assert_bfloat16_refused, assert_onnx_refuses,  # noqa: E402
                           assert_outputs_match, onnx_bound, overwritten, reference_outputs,
                           removed)
from fastdiff.export.graphs import reference_ops  # noqa: E402
from fastdiff.export.stable_diffusion import _TextEncoder, _UNet, _VaeDecoder, _VaeEncoder  # noqa: E402

# optimum's names (ORTStableDiffusionPipeline reads the graphs by them).
NAMES = {
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_encoder": (["sample"], ["latent_parameters"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    make_pipeline(folder, request.param)
    pipe = fastdiff.Pipeline.from_pretrained(folder)
    out = str(tmp_path_factory.mktemp(request.param + "_onnx"))
    manifest = fastdiff.export.onnx(pipe, out, step={"dpmpp_2m": [6], "ddim": [5, 6]})
    return pipe, out, manifest


def session(out, name):
    return ort.InferenceSession(os.path.join(out, name, "model.onnx"), providers=["CPUExecutionProvider"])


def test_folder_has_optimums_layout_and_names(exported):
    _, out, manifest = exported
    for name, (inputs, outputs) in NAMES.items():
        model = onnx.load(os.path.join(out, name, "model.onnx"))
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
        # Standard ONNX only (no custom domain), so every execution provider takes the graph.
        assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, name
    for part in ("tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json", "model_index.json"):
        assert os.path.isfile(os.path.join(out, part)), part
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "ORTStableDiffusionPipeline"
    assert json.load(open(os.path.join(out, "fastdiff_onnx.json"))) == json.loads(json.dumps(manifest))
    assert [g["name"] for g in manifest["graphs"]] == list(NAMES)
    assert all(g["max_abs_error"] <= g["bound"] for g in manifest["graphs"])
    assert manifest["opset"] == fastdiff.export.DEFAULT_OPSET and manifest["dtype"] == "float32"


def _cases(pipe):
    g = torch.Generator().manual_seed(5)
    f, length = pipe.vae_scale_factor, pipe.tokenizer.model_max_length
    c, latent = pipe.unet.config["in_channels"], pipe.vae.config["latent_channels"]
    width, vocab = pipe.text_encoder.config.hidden_size, pipe.text_encoder.config.vocab_size
    yield "text_encoder", _TextEncoder(pipe.text_encoder), dict(
        input_ids=torch.randint(0, vocab, (1, length), generator=g))
    yield "text_encoder", _TextEncoder(pipe.text_encoder), dict(
        input_ids=torch.randint(0, vocab, (4, length), generator=g))
    for b, h, w, t in ((1, 8, 8, [999.0]), (2, 24, 16, [1.0]), (4, 8, 32, [250.0])):
        yield "unet", _UNet(pipe.unet), dict(sample=torch.randn(b, c, h, w, generator=g), timestep=torch.tensor(t),
                                             encoder_hidden_states=torch.randn(b, length, width, generator=g))
    for b, h, w in ((1, 8, 8), (2, 16, 24)):
        yield "vae_encoder", _VaeEncoder(pipe.vae), dict(sample=torch.rand(b, 3, h * f, w * f, generator=g) * 2 - 1)
        yield "vae_decoder", _VaeDecoder(pipe.vae), dict(latent_sample=torch.randn(b, latent, h, w, generator=g))


def test_every_graph_matches_pytorch_on_other_shapes(exported):
    """Batches, sizes and timesteps the graphs were not traced with (the dynamic axes), each
    output within float32's rounding of both sides' sums (tests/tolerances.py) at its scale."""
    pipe, out, _ = exported
    sessions = {}
    for name, module, inputs in _cases(pipe):
        sess = sessions.setdefault(name, session(out, name))
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert_outputs_match(got, *reference_outputs(module, inputs), (name, {k: v.shape for k, v in inputs.items()}))


def test_a_four_level_unet_exports_with_dynamic_sizes(tmp_path):
    """SD's UNet has four levels, so the traced latents reach 1 x 1 at its deepest level when
    they are 8 x 8, and torch.export specialises sizes of 1: the exporter traces on 16 x 16.
    The graph then runs at other sizes, within float32's rounding of the module."""
    folder = str(tmp_path / "four")
    make_pipeline(folder, "sd1", unet_channels=(16, 16, 32, 32))
    pipe = fastdiff.Pipeline.from_pretrained(folder)
    out = str(tmp_path / "onnx")
    fastdiff.export.onnx(pipe, out)
    sess, module = session(out, "unet"), _UNet(pipe.unet)
    g = torch.Generator().manual_seed(1)
    for b, h, w in ((1, 8, 8), (2, 24, 16)):
        inputs = dict(sample=torch.randn(b, 4, h, w, generator=g), timestep=torch.tensor([321.0]),
                      encoder_hidden_states=torch.randn(b, pipe.tokenizer.model_max_length, 32, generator=g))
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        assert_outputs_match(got, *reference_outputs(module, inputs), (b, h, w))


def test_a_wrong_graph_fails_the_check(exported, tmp_path):
    """The check can fail: the UNet's graph against a UNet with one weight 1% off."""
    pipe, out, _ = exported
    unet = _UNet(pipe.unet)
    inputs = next((i for n, _, i in _cases(pipe) if n == "unet"))
    got = session(out, "unet").run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    conv = pipe.unet.conv_out
    with torch.no_grad():
        conv.weight.mul_(1.01)
        try:
            with reference_ops():
                want = unet(*inputs.values())
        finally:
            conv.weight.div_(1.01)
    with reference_ops():
        terms = reduction_terms(unet, lambda: unet(*inputs.values()))
    assert np.abs(got - want.numpy()).max() > fp32_bound(max(1.0, want.abs().max().item()), terms)


def test_the_built_in_model_exports_and_runs(tmp_path):
    pipe = fastdiff.Pipeline()
    manifest = fastdiff.export.onnx(pipe, tmp_path / "out")
    assert {g["name"] for g in manifest["graphs"]} == set(NAMES)
    assert all(0 <= g["max_abs_error"] <= g["bound"] for g in manifest["graphs"])
    onnx_pipe = fastdiff.Pipeline.from_onnx(tmp_path / "out")
    assert onnx_pipe.defaults == pipe.defaults  # the folder's own defaults travel with it
    kw = dict(seed=0, output_type="pt", progress=False)
    want, calls = generate_counting_unet_calls(pipe, "a red circle above a blue square", **kw)
    got = onnx_pipe.generate("a red circle above a blue square", **kw)
    assert (got - want).abs().max().item() <= onnx_bound(pipe, calls, pipe.defaults["guidance_scale"])


# --------------------------------------------------------------------------- running: from_onnx

@pytest.mark.parametrize("sampler, guidance", [("dpmpp_2m", 7.5), ("euler_a", 7.5), ("ddim", 1.0), ("pndm", 5.0)])
def test_from_onnx_gives_the_pytorch_pipelines_images(exported, sampler, guidance):
    pipe, out, _ = exported
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    assert isinstance(onnx_pipe, fastdiff.pipelines.OnnxStableDiffusionPipeline)
    kw = dict(num_inference_steps=6, guidance_scale=guidance, sampler=sampler, seed=3, output_type="pt",
              progress=False, negative_prompt=["blurry", "dark"] if guidance > 1 else None)
    want, calls = generate_counting_unet_calls(pipe, ["a red circle", "a blue square"], **kw)
    got = onnx_pipe.generate(["a red circle", "a blue square"], **kw)
    bound = onnx_bound(pipe, calls, guidance)
    assert (got - want).abs().max().item() <= bound
    if guidance > 1:  # the bound is tight enough that 1% less guidance fails it
        off = onnx_pipe.generate(["a red circle", "a blue square"], **dict(kw, guidance_scale=guidance * 0.99))
        assert (off - want).abs().max().item() > bound


def test_from_onnx_img2img_and_outputs(exported):
    pipe, out, _ = exported
    onnx_pipe = fastdiff.Pipeline.from_pretrained(out)  # the registry finds the ONNX family too
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    kw = dict(image=image, strength=0.6, num_inference_steps=5, sampler="ddim", seed=4, progress=False)
    want, calls = generate_counting_unet_calls(pipe, "a red circle", output_type="pt", **kw)
    got = onnx_pipe.generate("a red circle", output_type="pt", **kw)
    assert (got - want).abs().max().item() <= onnx_bound(pipe, calls, 7.5, encode=True)
    pil = onnx_pipe.generate("a red circle", output_type="pil", **kw)
    assert pil[0].size == (64, 64)


def test_from_onnx_refuses_what_needs_pytorch(exported, tmp_path):
    _, out, _ = exported
    onnx_pipe = fastdiff.Pipeline.from_onnx(out)
    assert_onnx_refuses(onnx_pipe, "a red circle", ((dict(cond_fn=lambda x, t: x), "cond_fn"),
                                                    (dict(cuda_graph=True), "cuda_graph"),
                                                    (dict(clip_skip=1), "clip_skip")))


def test_from_onnx_names_what_is_wrong_with_a_folder(exported, tmp_path):
    _, out, _ = exported
    broken = BrokenFolder(out, tmp_path)
    broken.refuses("unet/model.onnx", removed, FileNotFoundError, "unet/model.onnx.*missing")
    broken.refuses("vae_decoder/model.onnx", overwritten(b"not a graph"), ValueError,
                   "vae_decoder/model.onnx: ONNX Runtime cannot load it")
    broken.refuses("fastdiff_onnx.json", overwritten(b"{"), ValueError,
                   "fastdiff_onnx.json: not a readable JSON manifest")
    broken.refuses("fastdiff_onnx.json", removed, FileNotFoundError, "no fastdiff_onnx.json")
    with pytest.raises(ValueError, match="not an exported ONNX folder"):
        fastdiff.Pipeline.from_onnx(os.path.join(os.path.dirname(fastdiff.__file__), "assets", "default_model"))
    with pytest.raises(ValueError, match="providers .* are not available"):
        fastdiff.Pipeline.from_onnx(out, providers=["NoSuchExecutionProvider"])


@pytest.fixture(scope="module")
def small_pipe(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1_bad"))
    make_pipeline(folder, "sd1")
    return fastdiff.Pipeline.from_pretrained(folder)


# --------------------------------------------------------------------------- the step graph

def numpy_onnx_sampler(folder, sampler, num_steps, prompts, x_T, guidance_scale):
    """A whole SD run from the exported folder with numpy and ONNX Runtime alone (no fastdiff):
    the text encoder, then the step graph over the coefficient table, then the VAE decoder."""
    import json as json_

    from transformers import CLIPTokenizer

    def graph(name):
        return ort.InferenceSession(os.path.join(folder, name, "model.onnx"), providers=["CPUExecutionProvider"])

    manifest = json_.load(open(os.path.join(folder, "fastdiff_onnx.json")))
    table = json_.load(open(os.path.join(folder, f"step_{sampler}", f"steps_{num_steps}.json")))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True)

    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="np").input_ids.astype(np.int64)
        return graph("text_encoder").run(["last_hidden_state"], {"input_ids": ids})[0]

    text = np.concatenate([embed([""] * len(prompts)), embed(prompts)])  # unconditional half first
    step = graph(f"step_{sampler}")
    x = x_T.astype(np.float32) * table["init_scale"]
    zeros, kept = np.zeros_like(x), {}
    for k, s in enumerate(table["steps"]):
        history = [kept[tuple(ref)] for ref in s["history"]]
        history += [zeros] * (table["num_history"] - len(history))
        x_next, den = step.run(None, {
            "sample": x, "timestep": np.array([s["t"]], np.float32), "coeffs": np.array([s["row"]], np.float32),
            "noise": zeros, "history": np.stack(history), "encoder_hidden_states": text,
            "guidance_scale": np.array([guidance_scale], np.float32)})
        kept[("x", k)], kept[("den", k)] = x, den
        x = x_next
    image = graph("vae_decoder").run(None, {"latent_sample": x / manifest["vae_scaling_factor"]})[0]
    return np.clip(image / 2 + 0.5, 0.0, 1.0)


@pytest.mark.parametrize("sampler, steps", [("dpmpp_2m", 6), ("ddim", 5)])
def test_a_plain_onnx_runtime_loop_gives_fastdiffs_images(exported, sampler, steps):
    pipe, out, manifest = exported
    assert {g["name"] for g in manifest["step_graphs"]} == {"step_dpmpp_2m", "step_ddim"}
    assert all(g["max_abs_error"] <= g["bound"] for g in manifest["step_graphs"])
    prompts = ["a red circle", "a blue square"]
    x_T = torch.randn(2, pipe.unet.config["in_channels"], 8, 8, generator=torch.Generator().manual_seed(7))
    want, calls = generate_counting_unet_calls(pipe, prompts, sampler=sampler, num_inference_steps=steps,
                                               guidance_scale=7.5, latents=x_T.clone(), output_type="pt",
                                               progress=False)
    got = numpy_onnx_sampler(out, sampler, steps, prompts, x_T.numpy(), 7.5)
    assert np.abs(got - want.numpy()).max() <= onnx_bound(pipe, calls, 7.5)


def test_step_tables_are_checked_before_anything_is_written(small_pipe, tmp_path):
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        fastdiff.export.onnx(small_pipe, tmp_path / "s1", step={"nope": [4]})
    with pytest.raises(ValueError, match="positive step counts"):
        fastdiff.export.onnx(small_pipe, tmp_path / "s2", step={"ddim": [0]})
    with pytest.raises(ValueError, match="num_steps"):
        fastdiff.export.onnx(small_pipe, tmp_path / "s3", step={"ddim": [5000]})
    assert not any((tmp_path / name).exists() for name in ("s1", "s2", "s3"))


def test_bad_export_requests_are_refused_before_any_work(small_pipe, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        fastdiff.export.onnx(small_pipe, tmp_path / "full")
    with pytest.raises(ValueError, match="is a file"):
        fastdiff.export.onnx(small_pipe, tmp_path / "afile")
    with pytest.raises(ValueError, match="opset must be an integer >= 18"):
        fastdiff.export.onnx(small_pipe, tmp_path / "o1", opset=13)
    with pytest.raises(TypeError, match="fastdiff pipeline"):
        fastdiff.export.onnx(object(), tmp_path / "o2")
    assert_bfloat16_refused(small_pipe, tmp_path / "o3")
    assert not any((tmp_path / name).exists() for name in ("o1", "o2"))


def test_pipelines_without_an_exporter_are_named(exported, tmp_path):
    from fastdiff.pipelines.base import Pipeline

    class Custom(Pipeline):
        pass

    with pytest.raises(ValueError, match="ONNX export of Custom is not supported"):
        fastdiff.export.onnx(Custom.__new__(Custom), tmp_path / "c")
    _, out, _ = exported
    with pytest.raises(ValueError, match="already runs exported graphs"):
        fastdiff.export.onnx(fastdiff.Pipeline.from_onnx(out), tmp_path / "o")
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_the_tokenizer_folder_also_holds_the_slow_tokenizer_files(exported):
    """vocab.json and merges.txt beside tokenizer.json, for transformers 4's slow CLIPTokenizer
    (optimum's pin; scripts/check_optimum_onnx.py runs ORTStableDiffusionPipeline on such a folder)."""
    pipe, out, _ = exported
    folder = os.path.join(out, "tokenizer")
    assert json.load(open(os.path.join(folder, "vocab.json"), encoding="utf-8")) == pipe.tokenizer.get_vocab()
    lines = open(os.path.join(folder, "merges.txt"), encoding="utf-8").read().splitlines()
    merges = json.load(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8"))["model"]["merges"]
    assert lines[0].startswith("#version") and lines[1:] == [m if isinstance(m, str) else " ".join(m)
                                                             for m in merges]
