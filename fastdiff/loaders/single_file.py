"""Stable Diffusion 1.x / 2.x single-file checkpoints: conversion from the original LDM layout to
diffusers' (loading) and back (export).

The key table lives in `ldm_layout`, the architecture and schedule inference in `ldm_configs`;
this file applies them: every key of a checkpoint is mapped, ignored for a stated reason, or an
error that names it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .files import CheckpointError, load_state_dict_file
from .ldm_configs import (_indices, _infer_text_config, _infer_unet_config, _infer_vae_config, _need,
                          _schedule_buffers, _scheduler_from_checkpoint, _unet_arch_from_config)
from .ldm_layout import (CLIP_PREFIX, EMA_PREFIX, OPEN_CLIP_PREFIX, SCHEDULE_BUFFERS, SD_SCHEDULER, UNET_PREFIX,
                         UNetArch, VAEArch, _open_clip_rules, _rules, _text_model_prefix, ignored_reason)

# SCHEDULE_BUFFERS, _schedule_buffers and _text_model_prefix are imported from here by tests and callers.
__all__ = ["convert_ldm_checkpoint", "load_single_file", "to_ldm_checkpoint", "ignored_reason", "SCHEDULE_BUFFERS",
           "_schedule_buffers", "_text_model_prefix"]

# ---------------------------------------------------------------------------------------- conversion

def _name_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _to_diffusers(tensor: Tensor, reshape: str) -> Tensor:
    if reshape == "conv1x1" and tensor.ndim > 2:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    if reshape in ("q", "k", "v"):
        if tensor.shape[0] % 3:
            raise CheckpointError(f"fused in_proj of length {tensor.shape[0]} does not split into q, k, v")
        return tensor.chunk(3)["qkv".index(reshape)].clone()  # own storage, so the result can be saved
    return tensor

def _merged(name: str, inferred: Dict[str, Any], given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Given config entries win over inferred ones; diffusers' private entries ('_class_name', ...) are dropped."""
    merged = dict(inferred)
    merged.update({k: v for k, v in (given or {}).items() if not k.startswith("_")})
    # The one head key each component needs (a diffusers UNet config carries num_attention_heads: null).
    needed = {"unet": "attention_head_dim", "text_encoder": "num_attention_heads"}.get(name)
    unresolved = [needed] if needed in merged and merged[needed] is None else []
    if unresolved:
        raise CheckpointError(f"{name} {unresolved[0]} cannot be inferred: its widths are not multiples of the "
                              f"64-wide heads of SD; pass {name}_config={{'{unresolved[0]}': ...}}")
    # A file does not record GroupNorm's group count (no tensor has its shape); SD's 32 is assumed.
    groups, channels = merged.get("norm_num_groups"), merged.get("block_out_channels") or ()
    if "norm_num_groups" not in (given or {}) and isinstance(groups, int) and any(c % groups for c in channels):
        raise CheckpointError(f"{name} norm_num_groups cannot be inferred: SD's {groups} groups do not divide "
                              f"block_out_channels {list(channels)}; pass {name}_config={{'norm_num_groups': ...}} "
                              f"with the model's group count")
    return merged


def convert_ldm_checkpoint(state_dict: Mapping[str, Tensor], unet_config: Optional[Mapping[str, Any]] = None,
                           vae_config: Optional[Mapping[str, Any]] = None,
                           text_encoder_config: Optional[Mapping[str, Any]] = None, *,
                           upcast_attention: Optional[bool] = None, use_ema: bool = False) -> Dict[str, Any]:
    """An SD 1.x/2.x LDM-layout state dict -> diffusers-layout state dicts and configs.

    Configs are inferred from tensor shapes; entries of the given configs override them.
    Returns {"unet", "vae", "text_encoder": state dicts, "configs": {"unet", "vae", "text_encoder",
    "version", "scheduler"}, "ignored": {key: reason}}.
    """
    sd = dict(state_dict)
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in sd):
        version, clip_inner = "sd2", ""
    elif any(k.startswith(CLIP_PREFIX) for k in sd):
        version = "sd1"
        clip_inner = "text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in sd) else ""
    else:
        raise CheckpointError(f"no text encoder in the checkpoint: expected {CLIP_PREFIX}* (SD1) or "
                              f"{OPEN_CLIP_PREFIX}* (SD2) keys; is this an SD 1.x/2.x LDM checkpoint?")
    if use_ema:
        unet_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
        # LitEma flattens names: model.diffusion_model.a.b -> model_ema.diffusion_modelab
        ema_keys = {k: EMA_PREFIX + k[len("model."):].replace(".", "") for k in unet_keys}
        absent = [e for e in ema_keys.values() if e not in sd]
        if absent:
            raise CheckpointError(f"use_ema=True but the checkpoint lacks EMA weights: {_name_keys(absent)}")
        sd.update({k: sd[e] for k, e in ema_keys.items()})

    configs = {
        "unet": _merged("unet", _infer_unet_config(sd, version, upcast_attention), unet_config),
        "vae": _merged("vae", _infer_vae_config(sd, version), vae_config),
        "text_encoder": _merged("text_encoder", _infer_text_config(sd, version, clip_inner), text_encoder_config),
        "version": version,
    }
    text_layers = configs["text_encoder"]["num_hidden_layers"]
    vae_cfg = configs["vae"]
    rules = _rules(version, _unet_arch_from_config(configs["unet"]),
                   VAEArch(tuple(vae_cfg["block_out_channels"]), vae_cfg["layers_per_block"]), text_layers, clip_inner)

    mapped = {r.ldm for component in rules.values() for r in component}
    ignored = {k: reason for k in sd if k not in mapped
               for reason in [ignored_reason(k, version, text_layers)] if reason is not None}
    unknown = [k for k in sd if k not in mapped and k not in ignored]
    if unknown:
        raise CheckpointError(f"unknown keys in the {version} checkpoint (neither mapped nor known to be "
                              f"ignorable): {_name_keys(unknown)}")
    missing = [k for k in mapped if k not in sd]
    if missing:
        raise CheckpointError(f"keys missing from the {version} checkpoint for its inferred architecture: "
                              f"{_name_keys(missing)}")
    configs["scheduler"] = _scheduler_from_checkpoint(sd)
    result: Dict[str, Any] = {name: {r.diffusers: _to_diffusers(sd[r.ldm], r.reshape) for r in component}
                              for name, component in rules.items()}
    result["configs"] = configs
    result["ignored"] = ignored
    return result


def load_single_file(path: str | os.PathLike, **kwargs: Any) -> Dict[str, Any]:
    """Read an SD 1.x/2.x single-file checkpoint (.safetensors, or .ckpt via weights_only) and convert it.

    Keyword arguments go to `convert_ldm_checkpoint`.
    """
    state_dict = load_state_dict_file(path)
    try:
        return convert_ldm_checkpoint(state_dict, **kwargs)
    except CheckpointError as exc:
        raise CheckpointError(f"{os.fspath(path)}: {exc}") from None


# ---------------------------------------------------------------------------------------- export

def _unet_arch_from_diffusers(sd: Mapping[str, Tensor]) -> UNetArch:
    levels = _indices(sd, r"down_blocks\.(\d+)\.")
    if not levels:
        raise CheckpointError("UNet state dict has no down_blocks.*")
    block_out = tuple(int(_need(sd, f"down_blocks.{b}.resnets.0.conv1.weight", "UNet").shape[0]) for b in levels)
    return UNetArch(block_out, len(_indices(sd, r"down_blocks\.0\.resnets\.(\d+)\.")),
                    tuple(any(k.startswith(f"down_blocks.{b}.attentions.") for k in sd) for b in levels),
                    tuple(any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd) for b in levels),
                    len(_indices(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")))


def _export_extras(version: str, text_sd: Mapping[str, Tensor], text_layers: int,
                   scheduler_config: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Keys a real LDM checkpoint holds that the diffusers weights lack (the loader ignores them again)."""
    extras = _schedule_buffers(scheduler_config)
    if version == "sd2":
        # OpenCLIP runs one block more than diffusers keeps. A zero block is the identity
        # (x + 0 attention + 0 MLP), so even a consumer reading the last layer sees the penultimate one.
        block = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{text_layers}."
        template = [r for r in _open_clip_rules(1) if r.ldm.startswith("transformer.resblocks.0.")]
        for rule in template:
            if rule.reshape in ("", "q"):  # one fused in_proj per weight/bias
                like = text_sd[rule.diffusers.replace("encoder.layers.0.", f"encoder.layers.{text_layers - 1}.")]
                shape = (3 * like.shape[0], *like.shape[1:]) if rule.reshape else like.shape
                extras[block + rule.ldm[len("transformer.resblocks.0."):]] = like.new_zeros(shape)
        width = text_sd["final_layer_norm.weight"]
        # Unused by SD2 (see IGNORED); OpenCLIP's own initial values, so the file loads where they are expected.
        extras[f"{OPEN_CLIP_PREFIX}text_projection"] = torch.eye(width.shape[0], dtype=width.dtype)
        extras[f"{OPEN_CLIP_PREFIX}logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=width.dtype)
    return extras


def to_ldm_checkpoint(unet_sd: Mapping[str, Tensor], vae_sd: Mapping[str, Tensor], text_sd: Mapping[str, Tensor],
                      version: str, *, scheduler_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Tensor]:
    """diffusers-layout UNet / VAE / CLIPTextModel weights -> one LDM-layout state dict (SD1 or SD2 layout).

    SD2 adds the OpenCLIP block diffusers drops as an identity (zero) block, plus OpenCLIP's
    text_projection and logit_scale; both versions get LDM's schedule buffers (SD's schedule unless
    `scheduler_config` names another).
    """
    if version not in ("sd1", "sd2"):
        raise ValueError(f"version must be 'sd1' or 'sd2', got {version!r}")
    text = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in text_sd.items()}
    text = {k: v for k, v in text.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    text_layers = len(_indices(text, r"encoder\.layers\.(\d+)\."))
    levels = _indices(vae_sd, r"encoder\.down_blocks\.(\d+)\.")
    if not text_layers or not levels:
        raise CheckpointError("text encoder or VAE state dict has no blocks (encoder.layers.N / encoder.down_blocks.N)")
    vae = VAEArch(tuple(int(_need(vae_sd, f"encoder.down_blocks.{b}.resnets.0.conv1.weight", "VAE").shape[0])
                        for b in levels), len(_indices(vae_sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")))
    rules = _rules(version, _unet_arch_from_diffusers(unet_sd), vae, text_layers)
    inner = _text_model_prefix()
    sources = {"unet": dict(unet_sd), "vae": dict(vae_sd), "text_encoder": {inner + k: v for k, v in text.items()}}

    out: Dict[str, Tensor] = {}
    fused: Dict[str, Dict[str, Tensor]] = {}
    for name, component in rules.items():
        source = sources[name]
        expected = {r.diffusers for r in component}
        missing, unknown = expected - source.keys(), source.keys() - expected
        if missing or unknown:
            raise CheckpointError(f"{name} state dict does not fit the SD layout: missing {_name_keys(missing)}; "
                                  f"unexpected {_name_keys(unknown)}")
        for r in component:
            tensor = source[r.diffusers]
            if r.reshape == "conv1x1" and tensor.ndim == 2:
                out[r.ldm] = tensor.reshape(*tensor.shape, 1, 1)
            elif r.reshape in ("q", "k", "v"):
                fused.setdefault(r.ldm, {})[r.reshape] = tensor
            else:
                out[r.ldm] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    out.update(_export_extras(version, text, text_layers, scheduler_config or SD_SCHEDULER))
    return out
