"""Stable Diffusion 1.x / 2.x components from a diffusers folder or an original single file.

Both return the keyword arguments of ``StableDiffusionPipeline``: fastdiff's UNet, VAE and CLIP
tokenizer, a CLIP text encoder (fastdiff's from a folder, transformers' from a single file), and
the scheduler config. Every module is built from its config, its weights checked (names,
dtypes, finite values) and loaded strictly, so a pipeline gets working modules or one error
that names the file.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Union

from torch import nn

from ..sampling import SchedulerConfig
from . import diffusers_folder as folder_io
from .files import check_weights
from .quiet import quiet_loading

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# diffusers' SD sampling defaults (PNDM, "leading" spacing), used over a single file's training schedule.
SD_SCHEDULER_DEFAULTS = dict(
    _class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", set_alpha_to_one=False,
    skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", clip_sample=False,
)

PathLike = Union[str, "os.PathLike[str]"]


def load_folder(path: PathLike, *, device=None, dtype=None) -> Dict[str, Any]:
    """A diffusers StableDiffusionPipeline folder -> dict(unet, vae, text_encoder, tokenizer, scheduler_config)."""
    from ..models import AutoencoderKL, UNet2DConditionModel

    path = os.fspath(path)
    index = folder_io.read_model_index(path)
    folder_io.check_components(path, index, REQUIRED, "Stable Diffusion")
    # Every config first (cheap), so a bad one is reported before any weights are read.
    folder_io.check_component_configs(path, {"unet": UNet2DConditionModel, "vae": AutoencoderKL})
    scheduler = SchedulerConfig.from_json(os.path.join(folder_io.component_dir(path, "scheduler"),
                                                       "scheduler_config.json"))
    with quiet_loading():
        unet = folder_io.load_module(UNet2DConditionModel, path, "unet", device, dtype)
        vae = folder_io.load_module(AutoencoderKL, path, "vae", device, dtype)
        text_encoder = folder_io.load_text_encoder(path, device=device, dtype=dtype)
        tokenizer = folder_io.load_tokenizer(path)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler)


def _load_checked(model: nn.Module, state: Mapping, path: str, name: str, device, dtype,
                  ignore_missing=lambda key: False) -> nn.Module:
    """`state` into `model` after the weight checks; missing or unexpected names are a ValueError naming them."""
    check_weights(state, f"{path} ({name} weights)", model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not ignore_missing(k)]
    if missing or unexpected:
        raise ValueError(f"{path}: the {name} weights do not fit its config "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.to(device=device, dtype=dtype).eval()


def _build(module_cls, config: Mapping[str, Any], state: Mapping, path: str, name: str, device, dtype) -> nn.Module:
    model = folder_io.build_module(module_cls, config, f"{path} ({name} config)")
    return _load_checked(model, state, path, name, device, dtype)


def _scheduler(scheduler_config, inferred: Mapping[str, Any], prediction_type: Optional[str]) -> SchedulerConfig:
    if scheduler_config is None:
        # SD's sampling defaults, over the training schedule the checkpoint's buffers give.
        sched = dict(SD_SCHEDULER_DEFAULTS, **inferred)
        if "trained_betas" in inferred:
            sched.pop("beta_schedule", None)
        if prediction_type is not None:
            sched["prediction_type"] = prediction_type
        return SchedulerConfig.from_dict(sched)
    if isinstance(scheduler_config, dict):
        return SchedulerConfig.from_dict(scheduler_config)
    return SchedulerConfig.from_json(scheduler_config)


def load_single_file(path: PathLike, *, config: Optional[PathLike] = None, tokenizer: Optional[PathLike] = None,
                     scheduler_config: Optional[Union[PathLike, dict]] = None, prediction_type: Optional[str] = None,
                     unet_config: Optional[dict] = None, vae_config: Optional[dict] = None,
                     text_encoder_config: Optional[dict] = None, device=None, dtype=None) -> Dict[str, Any]:
    """An original-layout checkpoint (.safetensors / .ckpt) of SD 1.x or 2.x -> the same dict as load_folder.

    The file holds no tokenizer: name a tokenizer folder, or a diffusers folder of the
    same model via `config`, whose tokenizer, scheduler and model configs are then used.
    Without `config`, the architecture is inferred from the weights (`unet_config` /
    `vae_config` / `text_encoder_config` override what cannot be inferred, e.g. GroupNorm
    group counts, which SD fixes at 32).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models import AutoencoderKL, UNet2DConditionModel
    from .single_file import load_single_file as convert_single_file

    path = os.fspath(path)
    given = {"unet_config": unet_config, "vae_config": vae_config, "text_encoder_config": text_encoder_config}
    if config is not None:
        config = os.fspath(config)
        for name in ("unet", "vae", "text_encoder"):
            cfg_path = os.path.join(folder_io.component_dir(config, name), "config.json")
            given[f"{name}_config"] = {**folder_io.read_json(cfg_path), **(given.get(f"{name}_config") or {})}
        tokenizer = tokenizer or os.path.join(config, "tokenizer")
        if scheduler_config is None:
            scheduler_config = os.path.join(config, "scheduler", "scheduler_config.json")
    if tokenizer is None:
        raise ValueError(f"{path} holds no tokenizer: pass tokenizer=<a CLIP tokenizer folder> "
                         "or config=<a diffusers folder of the same model>")
    tokenizer = os.fspath(tokenizer)
    converted = convert_single_file(path, **{k: v for k, v in given.items() if v is not None})
    configs = dict(converted["configs"])
    for name, module_cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        folder_io.check_config(module_cls, configs[name], f"{path} ({name} config)")
    scheduler = _scheduler(scheduler_config, configs.get("scheduler", {}), prediction_type)

    with quiet_loading():
        tok = folder_io.load_tokenizer(os.path.dirname(tokenizer), os.path.basename(tokenizer))
        unet = _build(UNet2DConditionModel, configs["unet"], converted["unet"], path, "unet", device, dtype)
        vae = _build(AutoencoderKL, configs["vae"], converted["vae"], path, "vae", device, dtype)
        text_cfg = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
        text_encoder = _load_checked(CLIPTextModel(CLIPTextConfig(**text_cfg)), converted["text_encoder"], path,
                                     "text encoder", device, dtype,
                                     ignore_missing=lambda key: key.endswith("position_ids"))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, scheduler_config=scheduler)
