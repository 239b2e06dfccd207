"""The one Pipeline contract: keyword-only arguments with the same names in every family, one
argument check that runs before any work, one place for defaults (the family's, then the
model folder's `_fastdiff_defaults`), img2img inputs read by type, and a warning for an
argument that has no effect. Every bad-input case runs under a spy that fails the test if
a text encoder or denoiser is called before the error."""
import contextlib
import inspect
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from deps import require

import fastdiff
from fastdiff.pipelines import PIPELINES, GlidePipeline, StableDiffusionPipeline, VQDiffusionPipeline

COMMON = ["num_inference_steps", "guidance_scale", "negative_prompt", "sampler", "seed", "generator",
          "num_images_per_prompt", "height", "width", "output_type", "progress", "callback"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    require("diffusers")
    from sd_fixtures import make_pipeline

    folder = tmp_path_factory.mktemp("sd_args")
    make_pipeline(str(folder), "sd1")
    return folder


@pytest.fixture(scope="module")
def sd(sd_folder):
    return fastdiff.Pipeline.from_pretrained(sd_folder)


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    require("diffusers")
    from vq_pipeline_fixtures import make_vq_components

    return fastdiff.Pipeline.from_pretrained(make_vq_components(tmp_path_factory.mktemp("vq_args"), learned=True))


@pytest.fixture(scope="module")
def glide(tmp_path_factory):
    from glide_fixtures import tiny_options, write_checkpoint, write_glide_tokenizer

    root = tmp_path_factory.mktemp("glide_args")
    n_vocab = write_glide_tokenizer(str(root / "tokenizer"))
    write_checkpoint(str(root / "base.pt"), tiny_options(), n_vocab, seed=0)
    return fastdiff.Pipeline.from_glide(str(root / "base.pt"), tokenizer=str(root / "tokenizer"),
                                        options=tiny_options())


@contextlib.contextmanager
def no_work(pipe):
    """Fail if any component model runs, or any prompt is encoded, inside the block."""
    def boom(*args, **kwargs):
        raise AssertionError("work started before the argument check refused the input")

    modules = [getattr(pipe, name) for name in pipe.components]
    hooks = [m.register_forward_pre_hook(boom) for m in modules if isinstance(m, torch.nn.Module)]
    encoders = [name for name in ("encode_prompt", "_text") if hasattr(pipe, name)]
    for name in encoders:
        setattr(pipe, name, boom)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for name in encoders:
            delattr(pipe, name)


def refused(pipe, error, match, **kwargs):
    with no_work(pipe), pytest.raises(error, match=match):
        pipe.generate(kwargs.pop("prompt", "a red circle"), progress=False, **kwargs)


# --------------------------------------------------------------------------- the contract

def test_registry_and_no_import_of_families_in_base():
    assert PIPELINES["StableDiffusionPipeline"] is StableDiffusionPipeline
    assert PIPELINES["StableDiffusionImg2ImgPipeline"] is StableDiffusionPipeline
    assert PIPELINES["VQDiffusionPipeline"] is VQDiffusionPipeline
    import ast

    import fastdiff.pipelines.base as base

    tree = ast.parse(open(base.__file__).read())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[-1] in ("stable_diffusion", "vq_diffusion", "glide")], imported


@pytest.mark.parametrize("family", [StableDiffusionPipeline, VQDiffusionPipeline, GlidePipeline])
def test_every_argument_after_prompt_is_a_keyword_with_the_common_names(family):
    params = list(inspect.signature(family.generate).parameters.values())
    assert [p.name for p in params[:2]] == ["self", "prompt"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    assert [p.name for p in params[2:2 + len(COMMON)]] == COMMON


@pytest.mark.parametrize("name", ["sd", "vq", "glide"])
def test_a_positional_step_count_is_refused(request, name):
    pipe = request.getfixturevalue(name)
    with no_work(pipe), pytest.raises(TypeError):
        pipe.generate("a red circle", 50)


def test_glide_has_dtype_and_to_casts_the_models(glide):
    assert glide.dtype == torch.float32 and glide.device == torch.device("cpu")
    glide.to(dtype=torch.float64)
    try:
        assert glide.dtype == torch.float64 and next(glide.base.parameters()).dtype == torch.float64
    finally:
        glide.to(dtype=torch.float32)


def test_the_wrong_family_class_is_named(sd_folder):
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline, not a VQDiffusionPipeline"):
        VQDiffusionPipeline.from_pretrained(sd_folder)
    assert isinstance(StableDiffusionPipeline.from_pretrained(sd_folder), StableDiffusionPipeline)


# --------------------------------------------------------------------------- defaults

def test_family_defaults(sd, vq, glide):
    assert sd.defaults == dict(num_inference_steps=50, guidance_scale=7.5, sampler="pndm", height=64, width=64,
                               eta=0.0, guidance_rescale=0.0, strength=0.8)
    # diffusers' 100 steps, capped at the tiny model's 10 training timesteps
    assert vq.defaults["num_inference_steps"] == 10 and vq.defaults["guidance_scale"] == 5.0
    assert glide.defaults["num_inference_steps"] == "100" and glide.defaults["sampler"] == "ddpm"


def _with_defaults(src, dst, defaults):
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["_fastdiff_defaults"] = defaults
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def test_folder_defaults_are_used_for_what_the_caller_leaves_out(sd, sd_folder, tmp_path):
    folder = _with_defaults(sd_folder, tmp_path / "m", {"guidance_scale": 3.0, "num_inference_steps": 3,
                                                          "sampler": "euler"})
    pipe = fastdiff.Pipeline.from_pretrained(folder)
    assert pipe.defaults["guidance_scale"] == 3.0 and pipe.defaults["sampler"] == "euler"
    got = pipe.generate("a red circle", seed=0, output_type="pt", progress=False)
    want = sd.generate("a red circle", guidance_scale=3.0, num_inference_steps=3, sampler="euler", seed=0,
                       output_type="pt", progress=False)
    assert torch.equal(got, want)
    # what the caller gives wins over the folder's
    assert torch.equal(pipe.generate("a red circle", guidance_scale=7.5, seed=0, output_type="pt", progress=False),
                       sd.generate("a red circle", guidance_scale=7.5, num_inference_steps=3, sampler="euler",
                                   seed=0, output_type="pt", progress=False))


@pytest.mark.parametrize("defaults,match", [
    ({"guidance": 3.0}, "unknown keys"),
    ({"guidance_scale": "3"}, "guidance_scale must be a number"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"sampler": "plms"}, "unknown sampler"),
    ([3.0], "must be a JSON object"),
])
def test_bad_folder_defaults_fail_at_load_naming_the_file(sd_folder, tmp_path, defaults, match):
    folder = _with_defaults(sd_folder, tmp_path / "m", defaults)
    with pytest.raises(ValueError, match=f"model_index.json: _fastdiff_defaults.*{match}"):
        fastdiff.Pipeline.from_pretrained(folder)


def test_single_file_takes_the_config_folders_defaults(sd_folder, tmp_path):
    from safetensors.torch import save_file

    from fastdiff.loaders import to_ldm_checkpoint

    folder = _with_defaults(sd_folder, tmp_path / "m", {"guidance_scale": 2.0})
    ref = fastdiff.Pipeline.from_pretrained(folder)
    ldm = to_ldm_checkpoint(ref.unet.state_dict(), ref.vae.state_dict(), ref.text_encoder.state_dict(), "sd1")
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "m.safetensors")
    assert StableDiffusionPipeline.from_single_file(tmp_path / "m.safetensors", config=folder).defaults[
        "guidance_scale"] == 2.0


# --------------------------------------------------------------------------- numbers, before any work

BAD_COMMON = [
    (dict(guidance_scale="7.5"), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale=True), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    (dict(seed="abc"), TypeError, r"seed must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=1.7), TypeError, "seed must be an integer"),
    (dict(seed=True), TypeError, "seed must be an integer"),
    (dict(seed=2 ** 70), ValueError, "seed must be an integer"),
    (dict(seed=-1), ValueError, "seed must be an integer"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    (dict(generator=7), TypeError, "generator must be a torch.Generator"),
    (dict(callback=3), TypeError, "callback must be callable"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    (dict(num_images_per_prompt=1.5), TypeError, "num_images_per_prompt"),
    (dict(output_type="jpeg"), ValueError, "unknown output_type 'jpeg'"),
    (dict(prompt="  "), ValueError, "prompt is empty"),
    (dict(prompt=5), TypeError, "prompt must be a string"),
    (dict(height=0), ValueError, "height must be"),
    (dict(width=0), ValueError, "width must be"),
    (dict(height=100000), ValueError, "height must be"),
]


@pytest.mark.parametrize("name", ["sd", "vq", "glide"])
@pytest.mark.parametrize("kwargs,error,match", BAD_COMMON)
def test_bad_common_arguments_are_refused_before_any_work(request, name, kwargs, error, match):
    refused(request.getfixturevalue(name), error, match, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(height=60), ValueError, "positive multiple of 8 up to 512"),
    (dict(height=64.0), TypeError, "height must be an integer"),
    (dict(sampler=""), ValueError, "unknown sampler ''"),
    (dict(sampler=3), TypeError, "sampler must be"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=2.5), TypeError, "num_inference_steps must be an integer"),
    (dict(num_inference_steps="10"), TypeError, "num_inference_steps must be an integer"),
    (dict(num_inference_steps=1001, sampler="ddim"), ValueError, "num_inference_steps=1001 is more"),
    (dict(num_inference_steps=2000, sampler="dpmpp_2m"), ValueError, "num_inference_steps=2000 is more"),
    (dict(num_inference_steps=10 ** 9, sampler="dpmpp_2m"), ValueError, "is more than"),
    (dict(eta=float("nan")), ValueError, "eta must be a finite number >= 0"),
    (dict(eta=-0.1), ValueError, "eta must be"),
    (dict(eta="0"), TypeError, "eta must be a number"),
    (dict(guidance_rescale=float("nan")), ValueError, "guidance_rescale"),
    (dict(guidance_rescale=2.0), ValueError, r"guidance_rescale must be a number in \[0, 1\]"),
    (dict(strength=0.0, image=torch.rand(1, 3, 64, 64)), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=float("nan")), ValueError, "strength"),
    (dict(strength=0.05, num_inference_steps=10, image=torch.rand(1, 3, 64, 64)), ValueError, "leaves no step"),
    (dict(clip_skip=9), ValueError, "clip_skip must be an integer"),
    (dict(clip_skip="1"), TypeError, "clip_skip must be an integer"),
    (dict(negative_prompt=["x", "y"]), ValueError, "2 negative prompts for 1 prompts"),
    (dict(latents=torch.randn(1, 4, 7, 8)), ValueError, "latents have shape"),
    (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), ValueError, "NaN"),
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), TypeError, "latents must be floats"),
    (dict(cond_fn="grad"), TypeError, "cond_fn must be callable"),
])
def test_bad_sd_arguments_are_refused_before_any_work(sd, kwargs, error, match):
    refused(sd, error, match, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(negative_prompt="blurry"), ValueError, "takes no negative_prompt"),
    (dict(sampler="ddim"), ValueError, "one sampler"),
    (dict(num_inference_steps=11), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=3.0), TypeError, "num_inference_steps"),
    (dict(truncation_rate=float("nan")), ValueError, "truncation_rate"),
    (dict(truncation_rate="0.9"), TypeError, "truncation_rate"),
])
def test_bad_vq_arguments_are_refused_before_any_work(vq, kwargs, error, match):
    refused(vq, error, match, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(negative_prompt="blurry"), ValueError, "takes no negative_prompt"),
    (dict(sampler=""), ValueError, "unknown sampler ''"),
    (dict(num_inference_steps="fast"), ValueError, "invalid respacing"),
    (dict(num_inference_steps="fast27", sampler="euler"), ValueError, "takes a step count"),
    (dict(num_inference_steps=5000, sampler="euler"), ValueError, "is more than"),
    (dict(cond_fn=3, sampler="euler"), TypeError, "cond_fn must be callable"),
    (dict(clip_guidance_scale=3.0), ValueError, "noised CLIP"),
    (dict(eta=float("nan")), ValueError, "eta"),
    (dict(upsample_temp=float("nan")), ValueError, "upsample_temp"),
    (dict(latents=torch.zeros(1, 3, 8, 8)), ValueError, "latents have shape"),
])
def test_bad_glide_arguments_are_refused_before_any_work(glide, kwargs, error, match):
    refused(glide, error, match, **kwargs)


def test_fixed_size_families_take_their_own_size(vq, glide):
    size = vq.image_size[0]
    assert vq.generate("a red circle", height=size, width=size, num_inference_steps=2, seed=0, output_type="pt",
                       progress=False).shape[-1] == size
    refused(vq, ValueError, f"height must be {size}", height=size * 2)
    assert glide.generate("a corgi", height=16, num_inference_steps="2", seed=0, output_type="pt",
                          progress=False).shape[-1] == 16
    refused(glide, ValueError, "height must be 16", height=64)


# --------------------------------------------------------------------------- warnings

def _warnings(pipe, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe.generate("a red circle", seed=0, progress=False, output_type="pt", **kwargs)
    return [str(w.message) for w in seen if issubclass(w.category, UserWarning) and "no effect" in str(w.message)]


def test_an_argument_without_effect_warns_once(sd, glide):
    kw = dict(num_inference_steps=2)
    assert _warnings(sd, negative_prompt="blurry", guidance_scale=1.0, **kw) == [
        "negative_prompt has no effect here: guidance is off at guidance_scale 1 (it needs a scale above 1)"]
    assert _warnings(sd, eta=0.5, sampler="euler", **kw) == ["eta has no effect here: sampler 'euler' takes no eta"]
    assert _warnings(sd, strength=0.5, **kw) == ["strength has no effect here: it is img2img's, and no image was given"]
    assert _warnings(sd, eta=0.5, sampler="ddim", negative_prompt="blurry", **kw) == []
    assert len(_warnings(glide, eta=0.5, num_inference_steps="2")) == 1  # ddpm, no upsampler: no ddim stage
    assert _warnings(glide, eta=0.5, sampler="ddim", num_inference_steps="2") == []


def test_the_warning_points_at_the_callers_line(sd):
    with pytest.warns(UserWarning, match="negative_prompt has no effect") as seen:
        sd.generate("a", negative_prompt="b", guidance_scale=1.0, num_inference_steps=2, progress=False)
    assert seen[0].filename == __file__


# --------------------------------------------------------------------------- img2img input (SD)

def _img2img(sd, image, **kwargs):
    return sd.generate("a red circle", image=image, strength=0.5, num_inference_steps=4, sampler="ddim", seed=1,
                       output_type="pt", progress=False, **kwargs)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_image_inputs_read_by_type(sd, pixels, tmp_path):
    from PIL import Image

    want = _img2img(sd, torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    assert torch.equal(_img2img(sd, pixels), want)                          # uint8 array: 0-255
    assert torch.equal(_img2img(sd, Image.fromarray(pixels)), want)         # PIL RGB
    Image.fromarray(pixels).save(tmp_path / "in.png")
    assert torch.equal(_img2img(sd, str(tmp_path / "in.png")), want)        # a path string
    rgba = Image.fromarray(np.concatenate([pixels, np.full((64, 64, 1), 128, np.uint8)], axis=-1))
    assert torch.equal(_img2img(sd, rgba), want)                            # RGBA: alpha dropped, as diffusers


def test_dark_uint8_images_are_not_read_by_their_maximum(sd):
    dark = np.ones((64, 64, 3), dtype=np.uint8)  # max 1: still 1/255, not white
    assert torch.equal(_img2img(sd, dark), _img2img(sd, torch.full((1, 3, 64, 64), 1.0) / 255))


def test_greyscale_images_become_rgb(sd, pixels):
    from PIL import Image

    grey = Image.fromarray(pixels[..., 0])  # mode L
    rgb = np.repeat(pixels[..., :1], 3, axis=-1)
    assert torch.equal(_img2img(sd, grey), _img2img(sd, rgb))
    assert torch.equal(_img2img(sd, pixels[..., 0]), _img2img(sd, rgb))  # a [H, W] array


@pytest.mark.parametrize("image,error,match", [
    (torch.full((1, 3, 64, 64), float("nan")), ValueError, "NaN"),
    (torch.rand(1, 3, 64, 64) * 255, ValueError, r"floats must lie in \[0, 1\].*divide by 255"),
    (-torch.rand(1, 3, 64, 64), ValueError, r"floats must lie in \[0, 1\]"),
    (np.full((64, 64, 3), 200, dtype=np.int64), TypeError, "uint8"),
    (np.zeros((64, 64, 2), dtype=np.uint8), ValueError, "3 channels"),
    (torch.rand(1, 3, 32, 32), ValueError, "image is"),
    ("no/such/image.png", FileNotFoundError, "no/such/image.png"),
    (3.0, TypeError, "image must be a path"),
])
def test_bad_images_are_refused_before_any_work(sd, image, error, match):
    refused(sd, error, match, image=image, num_inference_steps=4)


def test_a_file_that_is_not_an_image(sd, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    refused(sd, ValueError, "not an image file", image=str(tmp_path / "x.png"), num_inference_steps=4)


# --------------------------------------------------------------------------- classifier guidance on SD

@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_cond_fn_on_the_sd_pipeline(sd, sampler):
    """A zero gradient changes nothing, bit for bit; a real one moves the image."""
    kw = dict(num_inference_steps=3, sampler=sampler, seed=0, output_type="pt", progress=False)
    plain = sd.generate("a red circle", **kw)
    assert torch.equal(sd.generate("a red circle", cond_fn=lambda x, t: torch.zeros_like(x), **kw), plain)
    assert not torch.allclose(sd.generate("a red circle", cond_fn=lambda x, t: -0.5 * x, **kw), plain)


def test_cond_fn_refused_where_the_sampler_has_no_rule(sd, monkeypatch):
    import dataclasses

    from fastdiff.sampling import registry

    spec = dataclasses.replace(registry.SAMPLERS["euler"], classifier_guidance=False)
    monkeypatch.setattr(registry, "get_sampler", lambda name: spec if name == "euler" else registry.SAMPLERS[name])
    refused(sd, ValueError, "cond_fn .* has no rule for sampler 'euler'", sampler="euler",
            cond_fn=lambda x, t: x)
