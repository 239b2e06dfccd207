"""SD 1.x / 2.x single-file (LDM layout) checkpoints <-> diffusers layout.

Tiny random diffusers models are exported with `to_ldm_checkpoint`; diffusers' own converters
must read that file back to the same weights (so the layout is the real one, not merely
self-consistent), and so must `convert_ldm_checkpoint`, with configs that rebuild the models.
"""
import functools
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from deps import require
from fastdiff.loaders import CheckpointError, convert_ldm_checkpoint, load_single_file, to_ldm_checkpoint
from fastdiff.loaders.single_file import SCHEDULE_BUFFERS, _schedule_buffers, _text_model_prefix

require("diffusers")  # the oracle: its own converters must read fastdiff's exported files
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as dsf  # noqa: E402

TEXT_OVERRIDE = {"sd1": {"num_attention_heads": 4}, "sd2": None}  # SD1's tiny width 32 has no 64-wide heads


def _randomize(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def _tiny_models(version):
    if version == "sd1":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
        vae_layers = 1
        text = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                              num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                              projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    else:
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=[1, 2],
            use_linear_projection=True, upcast_attention=True)
        vae_layers = 2
        text = CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu",
                              projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=vae_layers, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16)
    seed = 0 if version == "sd1" else 10
    return _randomize(unet, seed), _randomize(vae, seed + 1), _randomize(CLIPTextModel(text), seed + 2)


@functools.lru_cache(maxsize=None)
def _make_kit(version):
    unet, vae, text = _tiny_models(version)
    sds = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text.state_dict()}
    ldm = to_ldm_checkpoint(sds["unet"], sds["vae"], sds["text_encoder"], version)
    return {"version": version, "models": {"unet": unet, "vae": vae, "text_encoder": text}, "sds": sds, "ldm": ldm}


@pytest.fixture(params=["sd1", "sd2"])
def kit(request):
    return _make_kit(request.param)


def _assert_same(got, want, what):
    assert got.keys() == want.keys(), f"{what}: key sets differ: {sorted(got.keys() ^ want.keys())[:8]}"
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape and torch.equal(got[key], tensor), f"{what}: {key} differs"


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _strip_text_model(sd):
    """What diffusers itself does before loading into a flattened (transformers >= 5.6) CLIPTextModel."""
    return {k[len("text_model."):] if k.startswith("text_model.") and not _text_model_prefix() else k: v
            for k, v in sd.items()}


# --------------------------------------------------------------------- (a) the layout is LDM's


def test_diffusers_converters_read_our_ldm_layout(kit):
    ldm, sds, models = kit["ldm"], kit["sds"], kit["models"]
    _assert_same(dsf.convert_ldm_unet_checkpoint(ldm, dict(models["unet"].config)), sds["unet"], "unet")
    _assert_same(dsf.convert_ldm_vae_checkpoint(ldm, dict(models["vae"].config)), sds["vae"], "vae")
    if kit["version"] == "sd1":
        _assert_same(_strip_text_model(dsf.convert_ldm_clip_checkpoint(ldm)), sds["text_encoder"], "text")
    else:
        got = _strip_text_model(dsf.convert_open_clip_checkpoint(models["text_encoder"], ldm))
        # diffusers drops OpenCLIP-H's resblocks.23 by name; for a tiny tower the last block (here 2)
        # and text_projection come through and its CLIPTextModel.load_state_dict(strict=False) drops them.
        last = models["text_encoder"].config.num_hidden_layers
        extra = {k for k in got if k not in sds["text_encoder"]}
        assert extra and all(k == "text_projection.weight" or k.startswith(f"encoder.layers.{last}.") for k in extra)
        _assert_same({k: v for k, v in got.items() if k not in extra}, sds["text_encoder"], "text")


def test_export_holds_what_a_real_checkpoint_holds(kit):
    ldm, version = kit["ldm"], kit["version"]
    assert all(name in ldm for name in SCHEDULE_BUFFERS)
    assert ldm["model.diffusion_model.input_blocks.0.0.weight"].ndim == 4
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM's 1x1 conv, not a Linear
    if version == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in ldm
    else:
        hidden = kit["models"]["text_encoder"].config.hidden_size
        assert ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
        # the block diffusers drops is written as an identity (zero) block
        last = kit["models"]["text_encoder"].config.num_hidden_layers
        padded = [k for k in ldm if k.startswith(f"cond_stage_model.model.transformer.resblocks.{last}.")]
        assert len(padded) == 12 and all(not ldm[k].any() for k in padded)
        assert torch.equal(ldm["cond_stage_model.model.text_projection"], torch.eye(hidden))
        assert math.isclose(ldm["cond_stage_model.model.logit_scale"].item(), math.log(1 / 0.07), rel_tol=1e-6)


# ------------------------------------------------------------------ (b) our conversion inverts it


def test_convert_gives_back_the_diffusers_weights(kit):
    out = convert_ldm_checkpoint(kit["ldm"], text_encoder_config=TEXT_OVERRIDE[kit["version"]])
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(out[name], kit["sds"][name], name)
    assert out["configs"]["version"] == kit["version"]
    assert out["configs"]["scheduler"]["beta_schedule"] == "scaled_linear"
    # every input key is accounted for: mapped, or ignored with a reason
    ignored = set(out["ignored"])
    assert set(SCHEDULE_BUFFERS) <= ignored and all(out["ignored"].values())
    extra = ignored - set(SCHEDULE_BUFFERS)
    if kit["version"] == "sd1":
        assert not extra
    else:
        last = kit["models"]["text_encoder"].config.num_hidden_layers
        assert {k for k in extra if ".resblocks." not in k} == {"cond_stage_model.model.text_projection",
                                                                  "cond_stage_model.model.logit_scale"}
        assert all(f".resblocks.{last}." in k for k in extra if ".resblocks." in k)


def test_inferred_configs_rebuild_the_same_models(kit):
    version, models = kit["version"], kit["models"]
    out = convert_ldm_checkpoint(kit["ldm"], text_encoder_config=TEXT_OVERRIDE[version])
    configs = out["configs"]

    unet = UNet2DConditionModel.from_config(configs["unet"])
    unet.load_state_dict(out["unet"], strict=True)
    for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                "upcast_attention", "transformer_layers_per_block", "norm_num_groups", "mid_block_type"):
        assert _plain(unet.config[key]) == _plain(models["unet"].config[key]), key
    vae = AutoencoderKL.from_config(configs["vae"])
    vae.load_state_dict(out["vae"], strict=True)
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels"):
        assert _plain(vae.config[key]) == _plain(models["vae"].config[key]), key
    text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    text.load_state_dict(out["text_encoder"], strict=True)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "hidden_act"):
        assert getattr(text.config, key) == getattr(models["text_encoder"].config, key), key

    # same architecture means same outputs (head counts included, which shapes alone cannot show)
    generator = torch.Generator().manual_seed(3)
    sample, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 5, 32, generator=generator)
    image, ids = torch.randn(1, 3, 16, 16, generator=generator), torch.randint(3, 1000, (1, 7), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(unet.eval()(sample, 10, context).sample,
                                   models["unet"](sample, 10, context).sample, rtol=0, atol=0)
        torch.testing.assert_close(vae.eval()(image).sample, models["vae"](image).sample, rtol=0, atol=0)
        torch.testing.assert_close(text.eval()(ids).last_hidden_state,
                                   models["text_encoder"](ids).last_hidden_state, rtol=0, atol=0)


def test_config_inference_rules():
    unet, vae, text = _tiny_models("sd1")
    sd1 = to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), text.state_dict(), "sd1")
    with pytest.raises(CheckpointError, match="num_attention_heads"):  # width 32: no 64-wide heads to infer
        convert_ldm_checkpoint(sd1)
    configs = convert_ldm_checkpoint(sd1, text_encoder_config={"num_attention_heads": 4})["configs"]
    assert configs["unet"]["attention_head_dim"] == 8 and not configs["unet"]["use_linear_projection"]
    assert configs["unet"]["upcast_attention"] is False
    assert configs["text_encoder"]["hidden_act"] == "quick_gelu" and configs["text_encoder"]["num_hidden_layers"] == 3

    unet, vae, text = _tiny_models("sd2")
    sd2 = to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), text.state_dict(), "sd2")
    configs = convert_ldm_checkpoint(sd2)["configs"]
    assert configs["unet"]["attention_head_dim"] == [1, 2] and configs["unet"]["use_linear_projection"]
    assert configs["unet"]["upcast_attention"] is True  # SD 2.x 768-v's value ...
    assert convert_ldm_checkpoint(sd2, upcast_attention=False)["configs"]["unet"]["upcast_attention"] is False
    text_cfg = configs["text_encoder"]
    assert text_cfg["hidden_act"] == "gelu" and text_cfg["num_hidden_layers"] == 2  # 3 OpenCLIP blocks - 1
    assert text_cfg["num_attention_heads"] == 1 and text_cfg["max_position_embeddings"] == 77


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_full_size_layout_and_configs(version):
    """SD 1.5 / 2.1 shapes on the meta device: diffusers recognises the export and the configs come back."""
    with torch.device("meta"):
        if version == "sd1":
            unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
            text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                  vocab_size=49408, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)
        else:
            unet = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], sample_size=96,
                                        use_linear_projection=True, upcast_attention=True)
            text = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                  num_attention_heads=16, vocab_size=49408, hidden_act="gelu", bos_token_id=0,
                                  eos_token_id=2)
        text = CLIPTextModel(text)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    ldm = to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), text.state_dict(), version)
    assert dsf.infer_diffusers_model_type(ldm) == {"sd1": "v1", "sd2": "v2"}[version]
    text_keys = {"sd1": 196, "sd2": 24 * 12 + 6}[version]  # OpenCLIP-H: 24 blocks, embeddings, ln_final, proj, scale
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == 686
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248
    assert sum(k.startswith("cond_stage_model.") for k in ldm) == text_keys
    if version == "sd2":  # the names diffusers lists as OpenCLIP-H's dropped block
        assert set(dsf.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) <= ldm.keys()
    configs = convert_ldm_checkpoint(ldm)["configs"]
    for key in ("block_out_channels", "attention_head_dim", "layers_per_block", "down_block_types",
                "up_block_types", "cross_attention_dim", "use_linear_projection", "upcast_attention", "sample_size"):
        assert _plain(configs["unet"][key]) == _plain(unet.config[key]), key
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "hidden_act"):
        assert configs["text_encoder"][key] == getattr(text.config, key), key
    assert configs["vae"]["block_out_channels"] == [128, 256, 512, 512] and configs["vae"]["layers_per_block"] == 2


def test_sd1_text_encoder_variants_are_accepted():
    kit = _make_kit("sd1")
    ldm = dict(kit["ldm"])
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out = convert_ldm_checkpoint(ldm, text_encoder_config=TEXT_OVERRIDE["sd1"])
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in out["ignored"]
    # written by transformers >= 5.6, whose CLIPTextModel has no text_model level
    flat = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
            for k, v in kit["ldm"].items()}
    _assert_same(convert_ldm_checkpoint(flat, text_encoder_config=TEXT_OVERRIDE["sd1"])["text_encoder"],
                 kit["sds"]["text_encoder"], "text")


def test_ema_weights(kit):
    ldm = dict(kit["ldm"])
    unet_keys = [k for k in ldm if k.startswith("model.diffusion_model.")]
    for key in unet_keys:  # LitEma's flattened names
        ldm["model_ema." + key[len("model."):].replace(".", "")] = ldm[key] + 1
    ldm["model_ema.decay"], ldm["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10, dtype=torch.int)
    override = TEXT_OVERRIDE[kit["version"]]
    live = convert_ldm_checkpoint(ldm, text_encoder_config=override)
    _assert_same(live["unet"], kit["sds"]["unet"], "unet")
    assert "model_ema.decay" in live["ignored"]
    ema = convert_ldm_checkpoint(ldm, text_encoder_config=override, use_ema=True)
    _assert_same(ema["unet"], {k: v + 1 for k, v in kit["sds"]["unet"].items()}, "ema unet")
    del ldm["model_ema." + unet_keys[5][len("model."):].replace(".", "")]
    with pytest.raises(CheckpointError, match="lacks EMA weights"):
        convert_ldm_checkpoint(ldm, text_encoder_config=override, use_ema=True)


def test_schedule_buffers_are_checked(kit):
    override = TEXT_OVERRIDE[kit["version"]]
    ldm = {k: v for k, v in kit["ldm"].items() if k not in SCHEDULE_BUFFERS}
    assert convert_ldm_checkpoint(ldm, text_encoder_config=override)["configs"]["scheduler"]["beta_schedule"] \
        == "scaled_linear"  # no buffers: SD's schedule

    other = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
    ldm.update(_schedule_buffers(other))
    with pytest.warns(UserWarning, match="noise schedule"):
        scheduler = convert_ldm_checkpoint(ldm, text_encoder_config=override)["configs"]["scheduler"]
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(scheduler["trained_betas"], dtype=torch.float64), betas,
                               rtol=1e-6, atol=1e-9)

    sd_half = dict(ldm, **{k: v.half() for k, v in _schedule_buffers(dsf.SCHEDULER_DEFAULT_CONFIG).items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp16 buffers of SD's own schedule are recognised as such
        assert convert_ldm_checkpoint(sd_half, text_encoder_config=override)["configs"]["scheduler"] \
            == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

    ldm["alphas_cumprod"] = ldm["alphas_cumprod"].flip(0)
    with pytest.raises(CheckpointError, match="disagree"):
        convert_ldm_checkpoint(ldm, text_encoder_config=override)


# --------------------------------------------------------------------------------- (c) files


def test_load_single_file_safetensors_and_ckpt(kit, tmp_path):
    override = TEXT_OVERRIDE[kit["version"]]
    st = tmp_path / "model.safetensors"
    save_file(kit["ldm"], str(st))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"global_step": 470000, "state_dict": kit["ldm"]}, ckpt)  # Lightning's layout
    for path in (st, ckpt):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # SD's own schedule: nothing to warn about
            out = load_single_file(path, text_encoder_config=override)
        for name in ("unet", "vae", "text_encoder"):
            _assert_same(out[name], kit["sds"][name], f"{path.name} {name}")
        assert out["configs"]["version"] == kit["version"]


# --------------------------------------------------------------------------------- (d) bad input


class Opaque:
    pass


def test_unknown_and_missing_keys_are_named(kit, tmp_path):
    override = TEXT_OVERRIDE[kit["version"]]
    extra = dict(kit["ldm"], **{"model.diffusion_model.extra_head.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unknown keys.*model\.diffusion_model\.extra_head\.weight"):
        convert_ldm_checkpoint(extra, text_encoder_config=override)
    path = tmp_path / "extra.safetensors"
    save_file(extra, str(path))
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*extra_head\.weight"):
        load_single_file(path, text_encoder_config=override)

    for key in ("model.diffusion_model.output_blocks.2.0.skip_connection.weight",
                "first_stage_model.decoder.up.0.block.1.conv2.bias",
                "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight" if kit["version"] == "sd1"
                else "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"):
        missing = {k: v for k, v in kit["ldm"].items() if k != key}
        with pytest.raises(CheckpointError, match="missing.*" + key.replace(".", r"\.")):
            convert_ldm_checkpoint(missing, text_encoder_config=override)

    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    with pytest.raises(CheckpointError, match=f"lacks {conv_in}"):
        convert_ldm_checkpoint({k: v for k, v in kit["ldm"].items() if k != conv_in}, text_encoder_config=override)
    with pytest.raises(CheckpointError, match="no text encoder"):
        convert_ldm_checkpoint({k: v for k, v in kit["ldm"].items() if not k.startswith("cond_stage_model.")})


def test_broken_files_are_named(kit, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(1000)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-1500])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a torch checkpoint" * 20)
    pickled_object = tmp_path / "object.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": Opaque()}}, pickled_object)
    not_tensors = tmp_path / "numbers.ckpt"
    torch.save({"model.diffusion_model.out.2.bias": 1.5}, not_tensors)
    for path in (truncated, corrupt, pickled_object, not_tensors):
        with pytest.raises(CheckpointError, match=path.name):
            load_single_file(path)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_single_file(tmp_path / "absent.safetensors")


def test_export_rejects_weights_outside_the_layout(kit):
    sds = kit["sds"]
    with pytest.raises(CheckpointError, match="unexpected.*add_embedding"):
        to_ldm_checkpoint(dict(sds["unet"], **{"add_embedding.linear_1.weight": torch.zeros(1)}), sds["vae"],
                          sds["text_encoder"], kit["version"])
    vae = {k: v for k, v in sds["vae"].items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointError, match="missing.*decoder.conv_out.bias"):
        to_ldm_checkpoint(sds["unet"], vae, sds["text_encoder"], kit["version"])
    with pytest.raises(ValueError, match="sd1"):
        to_ldm_checkpoint(sds["unet"], sds["vae"], sds["text_encoder"], "sdxl")
