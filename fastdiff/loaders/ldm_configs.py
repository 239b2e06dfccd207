"""What a Stable Diffusion single file does not say outright: its architecture, inferred from
tensor shapes into diffusers configs, and its training schedule, read from LDM's buffers."""
from __future__ import annotations

import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .files import CheckpointError
from .ldm_layout import (CLIP_PREFIX, OPEN_CLIP_PREFIX, SCHEDULE_BUFFERS, SD_SCHEDULER, UNET_PREFIX, VAE_PREFIX,
                         UNetArch, VAEArch)

# ------------------------------------------------------------------------------- shape inference

def _need(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"checkpoint lacks {key}, needed to infer the {what} architecture")
    return sd[key]


def _indices(sd: Mapping[str, Any], pattern: str) -> List[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys."""
    found = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    return sorted(found)


def _unet_arch_from_ldm(sd: Mapping[str, Tensor]) -> Tuple[UNetArch, Dict[str, Any]]:
    p = UNET_PREFIX
    ops = _indices(sd, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight$")
    outputs = _indices(sd, re.escape(p) + r"output_blocks\.(\d+)\.")
    layers = ops[0] - 1 if ops else len(_indices(sd, re.escape(p) + r"input_blocks\.(\d+)\.")) - 1
    per, levels = layers + 1, len(ops) + 1
    if layers < 1 or len(outputs) != levels * per:
        raise CheckpointError(f"UNet blocks do not form an SD UNet: {len(ops)} downsamplers, {layers} resnets per "
                              f"level, {len(outputs)} output blocks (expected {levels * per})")
    block_out = tuple(int(_need(sd, f"{p}input_blocks.{1 + b * per}.0.in_layers.2.weight", "UNet").shape[0])
                      for b in range(levels))
    down_attn = tuple(f"{p}input_blocks.{1 + b * per}.1.norm.weight" in sd for b in range(levels))
    up_attn = tuple(f"{p}output_blocks.{b * per}.1.norm.weight" in sd for b in range(levels))
    attn = f"{p}middle_block.1"
    depth = len(_indices(sd, re.escape(attn) + r"\.transformer_blocks\.(\d+)\."))
    facts = {
        "in_channels": int(_need(sd, f"{p}input_blocks.0.0.weight", "UNet").shape[1]),
        "out_channels": int(_need(sd, f"{p}out.2.weight", "UNet").shape[0]),
        "cross_attention_dim": int(_need(sd, f"{attn}.transformer_blocks.0.attn2.to_k.weight", "UNet").shape[1]),
        "use_linear_projection": _need(sd, f"{attn}.proj_in.weight", "UNet").ndim == 2,
        "time_embedding_dim": int(_need(sd, f"{p}time_embed.0.weight", "UNet").shape[0]),
    }
    return UNetArch(block_out, layers, down_attn, up_attn, depth), facts


def _unet_arch_from_config(cfg: Mapping[str, Any]) -> UNetArch:
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int) or not isinstance(cfg["layers_per_block"], int):
        raise CheckpointError("SD 1.x/2.x UNets have one int layers_per_block and transformer_layers_per_block")
    return UNetArch(tuple(cfg["block_out_channels"]), cfg["layers_per_block"],
                    tuple(t.startswith("CrossAttn") for t in cfg["down_block_types"]),
                    tuple(t.startswith("CrossAttn") for t in cfg["up_block_types"]), depth)


def _infer_unet_config(sd: Mapping[str, Tensor], version: str, upcast_attention: Optional[bool]) -> Dict[str, Any]:
    arch, facts = _unet_arch_from_ldm(sd)
    # Heads follow the family, not proj_in's shape: SD1 has num_heads=8, SD2 num_head_channels=64; diffusers
    # keeps the head *count* under the name attention_head_dim. (An SD1 file re-exported from diffusers may
    # hold 2-D proj_in weights; a Linear and a 1x1 conv compute the same thing, so that only flips the flag.)
    if version == "sd2":
        # None (widths not multiples of 64) is resolved by the caller's unet_config or reported.
        heads: Any = None if any(c % 64 for c in arch.block_out) else [c // 64 for c in arch.block_out]
    else:
        heads = 8
    config = {
        "sample_size": 96 if version == "sd2" else 64,  # 768 px (SD 2.x v-models) / 512 px, over the VAE's 8x
        "in_channels": facts["in_channels"], "out_channels": facts["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.down_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in arch.up_attn],
        "block_out_channels": list(arch.block_out), "layers_per_block": arch.layers,
        "transformer_layers_per_block": arch.depth, "cross_attention_dim": facts["cross_attention_dim"],
        "attention_head_dim": heads, "use_linear_projection": facts["use_linear_projection"],
        # SD 2.1 768-v needs attention in float32 (diffusers' config for it, its default for any v2 file).
        "upcast_attention": (version == "sd2") if upcast_attention is None else bool(upcast_attention),
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
        "dual_cross_attention": False, "only_cross_attention": False,
    }
    if facts["time_embedding_dim"] != 4 * arch.block_out[0]:
        config["time_embedding_dim"] = facts["time_embedding_dim"]
    return config


def _vae_arch_from_ldm(sd: Mapping[str, Tensor]) -> VAEArch:
    p = re.escape(VAE_PREFIX)
    levels = _indices(sd, p + r"encoder\.down\.(\d+)\.")
    layers = len(_indices(sd, p + r"encoder\.down\.0\.block\.(\d+)\."))
    if not levels or not layers:
        raise CheckpointError(f"checkpoint has no VAE encoder blocks ({VAE_PREFIX}encoder.down.N.block.M.*)")
    return VAEArch(tuple(int(_need(sd, f"{VAE_PREFIX}encoder.down.{b}.block.0.conv1.weight", "VAE").shape[0])
                         for b in levels), layers)


def _infer_vae_config(sd: Mapping[str, Tensor], version: str) -> Dict[str, Any]:
    arch = _vae_arch_from_ldm(sd)
    n = len(arch.block_out)
    return {
        "in_channels": int(_need(sd, f"{VAE_PREFIX}encoder.conv_in.weight", "VAE").shape[1]),
        "out_channels": int(_need(sd, f"{VAE_PREFIX}decoder.conv_out.weight", "VAE").shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(arch.block_out), "layers_per_block": arch.layers,
        "latent_channels": int(_need(sd, f"{VAE_PREFIX}decoder.conv_in.weight", "VAE").shape[1]),
        "act_fn": "silu", "norm_num_groups": 32, "sample_size": 768 if version == "sd2" else 512,
        "scaling_factor": 0.18215,  # the scale_factor of every SD 1.x/2.x LDM config
    }


def _infer_text_config(sd: Mapping[str, Tensor], version: str, clip_inner: str) -> Dict[str, Any]:
    if version == "sd1":
        p = CLIP_PREFIX + clip_inner
        blocks = len(_indices(sd, re.escape(p) + r"encoder\.layers\.(\d+)\."))
        layers, token = blocks, _need(sd, f"{p}embeddings.token_embedding.weight", "text encoder")
        positions = _need(sd, f"{p}embeddings.position_embedding.weight", "text encoder")
        mlp = _need(sd, f"{p}encoder.layers.0.mlp.fc1.weight", "text encoder")
    else:
        p = OPEN_CLIP_PREFIX
        blocks = len(_indices(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\."))
        layers, token = blocks - 1, _need(sd, f"{p}token_embedding.weight", "text encoder")  # penultimate layer
        positions = _need(sd, f"{p}positional_embedding", "text encoder")
        mlp = _need(sd, f"{p}transformer.resblocks.0.mlp.c_fc.weight", "text encoder")
    width = int(token.shape[1])
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": int(token.shape[0]), "hidden_size": width, "intermediate_size": int(mlp.shape[0]),
        "num_hidden_layers": layers,
        # CLIP-L and OpenCLIP-H both use 64-wide heads; another width needs the caller's config.
        "num_attention_heads": None if width % 64 else width // 64,
        "max_position_embeddings": int(positions.shape[0]),
        # OpenAI's CLIP ViT-L/14 (SD1) was trained with QuickGELU, OpenCLIP ViT-H/14 (SD2) with exact GELU.
        "hidden_act": "quick_gelu" if version == "sd1" else "gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 768 if version == "sd1" else 512,
        # token ids as in the diffusers SD 1.x/2.x text_encoder configs
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    }


# ---------------------------------------------------------------------------------------- schedule

def _scheduler_betas(config: Mapping[str, Any]) -> Tensor:
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config.get("beta_schedule", "linear") == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    if config.get("beta_schedule", "linear") == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    raise ValueError(f"beta_schedule {config['beta_schedule']!r}: only linear, scaled_linear or trained_betas")


def _scheduler_from_checkpoint(sd: Mapping[str, Tensor]) -> Dict[str, Any]:
    """The training schedule the checkpoint's buffers describe, as a diffusers scheduler config."""
    betas, alphas_cumprod = sd.get("betas"), sd.get("alphas_cumprod")
    present = [t for t in (betas, alphas_cumprod) if t is not None]
    if not present:
        return dict(SD_SCHEDULER)
    # fp16 checkpoints round the buffers too; allow a few units in their last place
    rtol = max(1e-5, 20 * max(torch.finfo(t.dtype).eps for t in present if t.is_floating_point()))
    if betas is not None:
        cumprod = torch.cumprod(1 - betas.double(), 0)
        if alphas_cumprod is not None and not torch.allclose(cumprod, alphas_cumprod.double(), rtol=rtol, atol=1e-7):
            raise CheckpointError("checkpoint's schedule buffers disagree: alphas_cumprod != cumprod(1 - betas)")
    else:
        cumprod = alphas_cumprod.double()
    reference = torch.cumprod(1 - _scheduler_betas(SD_SCHEDULER), 0)
    if cumprod.shape == reference.shape and torch.allclose(cumprod, reference, rtol=rtol, atol=1e-7):
        return dict(SD_SCHEDULER)
    warnings.warn("checkpoint was trained with a noise schedule other than SD's scaled_linear(0.00085, 0.012); "
                  "configs['scheduler'] carries its betas as trained_betas", stacklevel=3)
    if betas is None:
        betas = 1 - cumprod / torch.cat([cumprod.new_ones(1), cumprod[:-1]])
    return {"num_train_timesteps": len(cumprod), "trained_betas": betas.double().tolist()}


def _schedule_buffers(config: Mapping[str, Any]) -> Dict[str, Tensor]:
    """The buffers LDM's DDPM.register_schedule saves (v_posterior = 0), float64 math stored as float32."""
    betas = _scheduler_betas(config)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    previous = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
    values = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * previous.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {name: values[name].float() for name in SCHEDULE_BUFFERS}

