"""Bad model files are refused when loading, in one line that names the file and what is wrong,
before any module is built from them; good ones load without a word on stdout or stderr.

Every kind is tried on small random models written in the real formats: diffusers folders
(SD and VQ-Diffusion, saved by diffusers itself), an SD single file in the original LDM
layout, and GLIDE's torch.save'd state dicts.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deps import require
from fastdiff.loaders import diffusers_folder as folder_io
from fastdiff.loaders import to_ldm_checkpoint
from fastdiff.loaders.files import CheckpointError
from fastdiff.loaders.glide import load_glide_model
from fastdiff.loaders.glide_clip_loader import load_strict
from fastdiff.loaders.stable_diffusion import load_folder, load_single_file
from fastdiff.loaders.vq_diffusion import load_folder as load_vq_folder

require("diffusers")
from glide_fixtures import tiny_options, write_checkpoint  # noqa: E402
from sd_fixtures import make_pipeline  # noqa: E402
from vq_pipeline_fixtures import make_vq_components  # noqa: E402

# What the single file cannot say about the tiny SD model (its GroupNorm counts, CLIP's heads).
SINGLE_FILE_CONFIGS = dict(unet_config={"norm_num_groups": 16}, vae_config={"norm_num_groups": 8},
                           text_encoder_config={"num_attention_heads": 4})


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    make_pipeline(str(folder), "sd1")
    return folder


@pytest.fixture(scope="module")
def sd_single_file(tmp_path_factory, sd_folder):
    parts = load_folder(sd_folder)
    state = to_ldm_checkpoint(parts["unet"].state_dict(), parts["vae"].state_dict(),
                              parts["text_encoder"].state_dict(), "sd1")
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory):
    return make_vq_components(tmp_path_factory.mktemp("vq"))


def copy_of(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


def rewrite(path, change):
    """Apply `change(state)` to the tensors of a .safetensors file, in place; returns a changed key."""
    state = load_file(str(path))
    key = change(state)
    save_file(state, str(path))
    return key


def first_key(state, suffix):
    return next(k for k in sorted(state) if k.endswith(suffix))


def poison(value):
    def change(state):
        key = first_key(state, ".weight")
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
        return key
    return change


def as_integers(state):
    key = first_key(state, ".weight")
    state[key] = state[key].mul(10).round().to(torch.int64)
    return key


def write_json(path, value):
    with open(path, "w") as fh:
        json.dump(value, fh)


def edit_config(path, **changes):
    with open(path) as fh:
        config = json.load(fh)
    config.update(changes)
    write_json(path, config)


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def no_weights_read(monkeypatch):
    """Fail the test if any weight file is opened: config errors must come first."""
    def refuse(path, *args, **kwargs):
        raise AssertionError(f"weights read before the config was checked: {path}")
    monkeypatch.setattr(folder_io, "load_state_dict_file", refuse)


# ---------------------------------------------------------------------------------------- weights

WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}


@pytest.mark.parametrize("component", sorted(WEIGHT_FILES))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_sd_folder_refuses_non_finite_weights(tmp_path, sd_folder, component, value):
    folder = copy_of(sd_folder, tmp_path)
    path = folder / component / WEIGHT_FILES[component]
    key = rewrite(path, poison(value))
    with pytest.raises(CheckpointError) as info:
        load_folder(folder)
    message = one_line(info)
    assert str(path) in message and key in message and "NaN or infinite" in message


@pytest.mark.parametrize("component", sorted(WEIGHT_FILES))
def test_sd_folder_refuses_integer_tensors_for_float_weights(tmp_path, sd_folder, component):
    folder = copy_of(sd_folder, tmp_path)
    path = folder / component / WEIGHT_FILES[component]
    key = rewrite(path, as_integers)
    with pytest.raises(CheckpointError) as info:
        load_folder(folder)
    message = one_line(info)
    assert str(path) in message and key in message and "int64" in message and "integer" in message


def test_text_encoder_missing_tensor_is_an_error(tmp_path, sd_folder):
    folder = copy_of(sd_folder, tmp_path)
    path = folder / "text_encoder" / "model.safetensors"

    def drop(state):
        key = first_key(state, "mlp.fc1.weight")
        del state[key]
        return key
    key = rewrite(path, drop)
    with pytest.raises(CheckpointError) as info:
        load_folder(folder)
    message = one_line(info)
    assert str(path) in message and "missing" in message and key.split("text_model.")[-1] in message


def test_text_encoder_unexpected_tensor_is_an_error(tmp_path, sd_folder):
    folder = copy_of(sd_folder, tmp_path)
    path = folder / "text_encoder" / "model.safetensors"

    def add(state):
        state["encoder.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
        return "encoder.layers.0.mlp.extra.weight"
    rewrite(path, add)
    with pytest.raises(CheckpointError, match=r"unexpected.*mlp\.extra\.weight"):
        load_folder(folder)


class _RunsCode:
    """A pickle that calls a function when loaded, as a hostile checkpoint would."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_unsafe_pickle_is_one_line_naming_the_file(tmp_path, sd_folder, component):
    folder = copy_of(sd_folder, tmp_path)
    os.remove(folder / component / WEIGHT_FILES[component])
    stem = "pytorch_model" if component == "text_encoder" else "diffusion_pytorch_model"
    path = folder / component / f"{stem}.bin"
    torch.save({"weight": _RunsCode()}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_folder(folder)
    message = one_line(info)
    assert str(path) in message and "weights_only=True" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message


def test_single_file_refuses_non_finite_and_integer_weights(tmp_path, sd_single_file, sd_folder):
    tokenizer = sd_folder / "tokenizer"
    for change, words in ((poison(float("nan")), "NaN or infinite"), (as_integers, "integer")):
        path = tmp_path / "bad.safetensors"
        shutil.copy(sd_single_file, path)
        key = rewrite(path, change)
        with pytest.raises(CheckpointError) as info:
            load_single_file(path, tokenizer=tokenizer, **SINGLE_FILE_CONFIGS)
        message = one_line(info)
        # named by the file and by the tensor's diffusers name (the LDM key's tail)
        assert str(path) in message and words in message
        assert key.split(".")[-2] in message


def test_vq_folder_refuses_bad_weights(tmp_path, vq_folder):
    for component, change, words in (("transformer", poison(float("nan")), "NaN or infinite"),
                                     ("vqvae", as_integers, "integer")):
        folder = tmp_path / component
        shutil.copytree(vq_folder, folder)
        path = folder / component / "diffusion_pytorch_model.safetensors"
        key = rewrite(path, change)
        with pytest.raises(CheckpointError) as info:
            load_vq_folder(folder)
        message = one_line(info)
        assert str(path) in message and key in message and words in message


def test_vq_null_embedding_must_be_float(tmp_path, vq_folder):
    folder = copy_of(vq_folder, tmp_path)
    path = folder / "learned_classifier_free_sampling_embeddings" / "diffusion_pytorch_model.safetensors"

    def change(state):
        state["embeddings"] = state["embeddings"].round().to(torch.int64)
        return "embeddings"
    rewrite(path, change)
    with pytest.raises(CheckpointError, match=r"embeddings \(torch\.int64\)") as info:
        load_vq_folder(folder)
    assert str(path) in one_line(info)


def test_glide_checkpoint_refuses_integer_weights(tmp_path):
    options = tiny_options()
    state = write_checkpoint(str(tmp_path / "base.pt"), options, n_vocab=64)
    state["out.2.weight"] = state["out.2.weight"].round().to(torch.int64)
    torch.save(state, tmp_path / "int.pt")
    with pytest.raises(CheckpointError, match=r"int\.pt.*out\.2\.weight \(torch\.int64\)"):
        load_glide_model(str(tmp_path / "int.pt"), options)


def test_glide_clip_weights_are_checked_the_same_way():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"clip_text_enc\.pt.*weight \(torch\.int64\)"):
        load_strict(layer, {"weight": torch.ones(2, 2, dtype=torch.int64), "bias": torch.zeros(2)},
                    "clip_text_enc.pt")
    with pytest.raises(CheckpointError, match=r"clip_text_enc\.pt.*NaN or infinite values in bias"):
        load_strict(layer, {"weight": torch.ones(2, 2), "bias": torch.tensor([0.0, float("inf")])},
                    "clip_text_enc.pt")


# ---------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("content", [[], "StableDiffusionPipeline", 3, None])
def test_model_index_must_be_an_object(tmp_path, sd_folder, content):
    folder = copy_of(sd_folder, tmp_path)
    write_json(folder / "model_index.json", content)
    with pytest.raises(ValueError) as info:
        load_folder(folder)
    message = one_line(info)
    assert str(folder / "model_index.json") in message and "JSON object" in message
    with pytest.raises(ValueError, match="JSON object"):
        folder_io.read_model_index(str(folder))


@pytest.mark.parametrize("component, key, value", [
    ("unet", "norm_num_groups", 0), ("unet", "norm_num_groups", 5), ("unet", "norm_num_groups", -16),
    ("unet", "sample_size", 0), ("unet", "sample_size", -8), ("unet", "block_out_channels", [32, 0]),
    ("vae", "norm_num_groups", 0), ("vae", "norm_num_groups", 3), ("vae", "sample_size", 0),
])
def test_sd_config_values_refused_before_any_weights(tmp_path, monkeypatch, sd_folder, component, key, value):
    assert_config_value_refused(load_folder, sd_folder, tmp_path, monkeypatch, component, key, value)


def assert_config_value_refused(load, source, tmp_path, monkeypatch, component, key, value):
    """`load` on a copy of `source` whose component config sets key=value: one ValueError
    naming the file and the value, before any weights are read."""
    folder = copy_of(source, tmp_path)
    path = folder / component / "config.json"
    edit_config(path, **{key: value})
    no_weights_read(monkeypatch)
    with pytest.raises(ValueError) as info:
        load(folder)
    message = one_line(info)
    assert str(path) in message and f"{key}={value!r}" in message


@pytest.mark.parametrize("model, config, key", [
    ("UNet2DConditionModel", dict(block_out_channels=[32, 64], norm_num_groups=0), "norm_num_groups"),
    ("UNet2DConditionModel", dict(block_out_channels=[32, 64], norm_num_groups=True), "norm_num_groups"),
    ("UNet2DConditionModel", dict(sample_size=[8, 0]), "sample_size"),
    ("AutoencoderKL", dict(norm_num_groups=0), "norm_num_groups"),
    ("AutoencoderKL", dict(block_out_channels=[]), "block_out_channels"),
    ("VQModel", dict(num_vq_embeddings=0), "num_vq_embeddings"),
])
def test_models_refuse_configs_without_building(model, config, key):
    # The model classes check their own configs (the loaders add the file's name): a ValueError
    # naming the key, never a ZeroDivisionError from inside a block.
    import fastdiff.models as models
    from fastdiff.models.vqvae import VQModel

    cls = VQModel if model == "VQModel" else getattr(models, model)
    for make in (cls.check_config, cls.from_config):
        with pytest.raises(ValueError, match=f"{model}: config {key}="):
            make(config)


def test_component_config_must_be_an_object(tmp_path, sd_folder):
    folder = copy_of(sd_folder, tmp_path)
    write_json(folder / "vae" / "config.json", [1, 2])
    with pytest.raises(ValueError, match=r"vae/config\.json must hold a JSON object"):
        load_folder(folder)


@pytest.mark.parametrize("component, key, value", [
    ("vqvae", "norm_num_groups", 0), ("vqvae", "sample_size", 0), ("transformer", "sample_size", 0),
    ("transformer", "num_attention_heads", 0), ("transformer", "attention_head_dim", -8),
])
def test_vq_config_values_refused_before_any_weights(tmp_path, monkeypatch, vq_folder, component, key, value):
    assert_config_value_refused(load_vq_folder, vq_folder, tmp_path, monkeypatch, component, key, value)


@pytest.mark.parametrize("key, value", [
    ("num_channels", -32), ("num_channels", 0), ("num_channels", 48), ("num_heads", 0),
    ("num_head_channels", 0), ("num_heads_upsample", -2), ("num_res_blocks", 0), ("xf_width", -32),
    ("xf_heads", 0), ("xf_layers", -1), ("text_ctx", 0), ("channel_mult", "1,-2"),
])
def test_glide_options_refused_naming_file_and_option(tmp_path, key, value):
    options = tiny_options()
    write_checkpoint(str(tmp_path / "base.pt"), options, n_vocab=64)
    with pytest.raises(ValueError) as info:
        load_glide_model(str(tmp_path / "base.pt"), dict(options, **{key: value}))
    message = one_line(info)
    assert "base.pt" in message and f"{key}={value!r}" in message


def test_single_file_group_count_that_cannot_be_inferred_names_the_argument(sd_single_file, sd_folder):
    # The tiny VAE's 8-wide level is not divisible by SD's 32 groups; the file cannot say its count.
    configs = dict(SINGLE_FILE_CONFIGS)
    del configs["vae_config"]
    with pytest.raises(CheckpointError) as info:
        load_single_file(sd_single_file, tokenizer=sd_folder / "tokenizer", **configs)
    message = one_line(info)
    assert str(sd_single_file) in message and "norm_num_groups" in message and "vae_config=" in message


@pytest.mark.parametrize("argument, key, value", [
    ("unet_config", "norm_num_groups", 0), ("vae_config", "sample_size", 0), ("unet_config", "sample_size", 0),
])
def test_single_file_config_values_refused_naming_the_file(sd_single_file, sd_folder, argument, key, value):
    configs = dict(SINGLE_FILE_CONFIGS)
    configs[argument] = {**configs[argument], key: value}
    with pytest.raises(ValueError) as info:
        load_single_file(sd_single_file, tokenizer=sd_folder / "tokenizer", **configs)
    message = one_line(info)
    assert str(sd_single_file) in message and f"{key}={value!r}" in message


# ---------------------------------------------------------------------------------------- quiet

def test_loading_prints_nothing_and_restores_the_users_settings(capfd, sd_folder, vq_folder, sd_single_file):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()  # a user who asked for transformers' messages elsewhere
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        load_folder(sd_folder)
        load_vq_folder(vq_folder)
        load_single_file(sd_single_file, tokenizer=sd_folder / "tokenizer", **SINGLE_FILE_CONFIGS)
        out, err = capfd.readouterr()
        assert out == "" and err == ""
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_settings_restored_after_a_failed_load(tmp_path, sd_folder):
    from transformers.utils import logging as hf_logging

    folder = copy_of(sd_folder, tmp_path)
    rewrite(folder / "text_encoder" / "model.safetensors", poison(float("nan")))
    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with pytest.raises(CheckpointError):
        load_folder(folder)
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
