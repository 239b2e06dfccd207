"""Stable Diffusion 1.x / 2.x single-file checkpoints: original LDM key layout <-> diffusers layout.

The original (CompVis / Stability latent-diffusion) checkpoint keeps the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoder under
``cond_stage_model.`` (a transformers CLIPTextModel for SD1, an OpenCLIP text tower for SD2).

The whole mapping is one list of `Rule`s per architecture, built by `_rules`; loading
(`convert_ldm_checkpoint`) and export (`to_ldm_checkpoint`) both read it, so they cannot drift.
Every checkpoint key is mapped by a rule, ignored for a reason given in `IGNORED`, or an error.
"""
from __future__ import annotations

import functools
import math
import os
import re
import warnings
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .files import CheckpointError, load_state_dict_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: transformers' CLIPTextModel (OpenAI CLIP ViT-L/14)
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP ViT-H/14 text tower
EMA_PREFIX = "model_ema."

# The schedule SD 1.x and 2.x were trained with (LDM calls it "linear": linspace of sqrt(beta), squared).
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear"}
# Buffers LDM's DDPM.register_schedule saves with the model, all derived from betas.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")

# Keys a checkpoint may hold that no diffusers weight comes from: (full-match regex, reason).
IGNORED: Tuple[Tuple[str, str], ...] = (
    (r"model_ema\..+", "EMA shadow copy of the UNet and its decay/num_updates counters; the live "
                       "model.diffusion_model weights are converted unless use_ema=True picks the copy"),
    ("|".join(SCHEDULE_BUFFERS), "DDPM schedule buffer, derived from the noise schedule that the sampler "
                                 "recomputes in float64; betas / alphas_cumprod are checked and reported as "
                                 "configs['scheduler']"),
    (r"logvar|lvlb_weights", "training-loss weighting per timestep, unused when sampling"),
    (r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids",
     "arange(max_positions) buffer that transformers rebuilds (not persistent in its state_dict)"),
    (r"cond_stage_model\.model\.text_projection", "OpenCLIP's projection of the pooled embedding for contrastive "
                                                  "training; SD2 conditions on hidden states and diffusers' "
                                                  "CLIPTextModel has no such weight"),
    (r"cond_stage_model\.model\.logit_scale", "CLIP's contrastive temperature, training only"),
    (r"cond_stage_model\.model\.attn_mask", "OpenCLIP's causal-mask buffer, rebuilt by the text model"),
)
PENULTIMATE_REASON = ("SD2 conditions on OpenCLIP's penultimate layer (FrozenOpenCLIPEmbedder layer='penultimate'), "
                      "so the last resblock never runs; diffusers drops it too (num_hidden_layers = blocks - 1)")


class Rule(NamedTuple):
    """One LDM tensor <-> one diffusers tensor."""
    ldm: str
    diffusers: str
    # "": same tensor; "conv1x1": LDM [o, i, 1, 1] <-> diffusers [o, i];
    # "q" / "k" / "v": that third (along dim 0) of OpenCLIP's fused attn.in_proj_{weight,bias}
    reshape: str = ""


class UNetArch(NamedTuple):
    block_out: Tuple[int, ...]
    layers: int  # resnets per down block (up blocks have one more)
    down_attn: Tuple[bool, ...]  # diffusers order
    up_attn: Tuple[bool, ...]
    depth: int  # transformer blocks per attention


class VAEArch(NamedTuple):
    block_out: Tuple[int, ...]
    layers: int


# ---------------------------------------------------------------------------------------- the table

def _pair(ldm: str, diffusers: str, weight_reshape: str = "") -> List[Rule]:
    return [Rule(f"{ldm}.weight", f"{diffusers}.weight", weight_reshape), Rule(f"{ldm}.bias", f"{diffusers}.bias")]


_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
# LDM's SpatialTransformer / BasicTransformerBlock already use diffusers' names.
_TRANSFORMER_BLOCK_LINEAR = ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj",
                             "ff.net.2")
_TRANSFORMER_BLOCK_NO_BIAS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")
_VAE_ATTENTION = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
               "layer_norm2", "mlp.fc1", "mlp.fc2")
_OPEN_CLIP_LAYER = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                    ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))


def _unet_resnet(ldm: str, diffusers: str, in_ch: int, out_ch: int) -> List[Rule]:
    rules = [r for a, b in _UNET_RESNET for r in _pair(f"{ldm}.{a}", f"{diffusers}.{b}")]
    if in_ch != out_ch:  # LDM's ResBlock uses an identity skip when the widths agree
        rules += _pair(f"{ldm}.skip_connection", f"{diffusers}.conv_shortcut")
    return rules


def _unet_attention(ldm: str, diffusers: str, depth: int) -> List[Rule]:
    rules = [r for name in ("norm", "proj_in", "proj_out") for r in _pair(f"{ldm}.{name}", f"{diffusers}.{name}")]
    for t in range(depth):
        block_l, block_d = f"{ldm}.transformer_blocks.{t}", f"{diffusers}.transformer_blocks.{t}"
        rules += [r for name in _TRANSFORMER_BLOCK_LINEAR for r in _pair(f"{block_l}.{name}", f"{block_d}.{name}")]
        rules += [Rule(f"{block_l}.{name}.weight", f"{block_d}.{name}.weight") for name in _TRANSFORMER_BLOCK_NO_BIAS]
    return rules


def _unet_rules(a: UNetArch) -> List[Rule]:
    """LDM's UNetModel numbers its blocks flat (input_blocks.k / output_blocks.k); diffusers nests them."""
    ch, n, per = a.block_out, len(a.block_out), a.layers + 1
    rules = _pair("time_embed.0", "time_embedding.linear_1") + _pair("time_embed.2", "time_embedding.linear_2")
    rules += _pair("input_blocks.0.0", "conv_in")
    for b in range(n):
        for j in range(a.layers):
            k = 1 + b * per + j
            in_ch = (ch[b - 1] if b else ch[0]) if j == 0 else ch[b]
            rules += _unet_resnet(f"input_blocks.{k}.0", f"down_blocks.{b}.resnets.{j}", in_ch, ch[b])
            if a.down_attn[b]:
                rules += _unet_attention(f"input_blocks.{k}.1", f"down_blocks.{b}.attentions.{j}", a.depth)
        if b < n - 1:
            rules += _pair(f"input_blocks.{1 + b * per + a.layers}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
    rules += _unet_resnet("middle_block.0", "mid_block.resnets.0", ch[-1], ch[-1])
    rules += _unet_attention("middle_block.1", "mid_block.attentions.0", a.depth)
    rules += _unet_resnet("middle_block.2", "mid_block.resnets.1", ch[-1], ch[-1])
    rev = ch[::-1]
    for b in range(n):
        skip_last = rev[min(b + 1, n - 1)]
        for j in range(per):
            k = b * per + j
            in_ch = (rev[b - 1] if b else rev[0]) if j == 0 else rev[b]
            in_ch += skip_last if j == per - 1 else rev[b]  # the skip concatenated from the down path
            rules += _unet_resnet(f"output_blocks.{k}.0", f"up_blocks.{b}.resnets.{j}", in_ch, rev[b])
            if a.up_attn[b]:
                rules += _unet_attention(f"output_blocks.{k}.1", f"up_blocks.{b}.attentions.{j}", a.depth)
        if b < n - 1:  # the upsampler follows the attention in the last output block of a level, if there is one
            rules += _pair(f"output_blocks.{b * per + a.layers}.{2 if a.up_attn[b] else 1}.conv",
                           f"up_blocks.{b}.upsamplers.0.conv")
    rules += _pair("out.0", "conv_norm_out") + _pair("out.2", "conv_out")
    return rules


def _vae_resnet(ldm: str, diffusers: str, in_ch: int, out_ch: int) -> List[Rule]:
    rules = [r for name in ("norm1", "conv1", "norm2", "conv2") for r in _pair(f"{ldm}.{name}", f"{diffusers}.{name}")]
    if in_ch != out_ch:
        rules += _pair(f"{ldm}.nin_shortcut", f"{diffusers}.conv_shortcut")
    return rules


def _vae_mid(side: str, ch: int) -> List[Rule]:
    rules = _vae_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", ch, ch)
    rules += _pair(f"{side}.mid.attn_1.norm", f"{side}.mid_block.attentions.0.group_norm")
    for a, b in _VAE_ATTENTION:  # LDM's AttnBlock uses 1x1 convolutions where diffusers' Attention has Linear
        rules += _pair(f"{side}.mid.attn_1.{a}", f"{side}.mid_block.attentions.0.{b}", "conv1x1")
    return rules + _vae_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", ch, ch)


def _vae_rules(a: VAEArch) -> List[Rule]:
    """LDM's Decoder stores its levels in encoder order (up.0 is the last to run); diffusers in run order."""
    ch, n = a.block_out, len(a.block_out)
    rules = _pair("encoder.conv_in", "encoder.conv_in")
    for b in range(n):
        for j in range(a.layers):
            in_ch = (ch[b - 1] if b else ch[0]) if j == 0 else ch[b]
            rules += _vae_resnet(f"encoder.down.{b}.block.{j}", f"encoder.down_blocks.{b}.resnets.{j}", in_ch, ch[b])
        if b < n - 1:
            rules += _pair(f"encoder.down.{b}.downsample.conv", f"encoder.down_blocks.{b}.downsamplers.0.conv")
    rules += _vae_mid("encoder", ch[-1])
    rules += _pair("encoder.norm_out", "encoder.conv_norm_out") + _pair("encoder.conv_out", "encoder.conv_out")
    rules += _pair("decoder.conv_in", "decoder.conv_in") + _vae_mid("decoder", ch[-1])
    rev = ch[::-1]
    for b in range(n):
        level = n - 1 - b
        for j in range(a.layers + 1):
            in_ch = (rev[b - 1] if b else rev[0]) if j == 0 else rev[b]
            rules += _vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}", in_ch, rev[b])
        if level:
            rules += _pair(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv")
    rules += _pair("decoder.norm_out", "decoder.conv_norm_out") + _pair("decoder.conv_out", "decoder.conv_out")
    return rules + _pair("quant_conv", "quant_conv") + _pair("post_quant_conv", "post_quant_conv")


def _clip_rules(layers: int) -> List[Rule]:
    """SD1's text encoder is a transformers CLIPTextModel already: the names carry over."""
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    names += [f"encoder.layers.{i}.{m}.{p}" for i in range(layers) for m in _CLIP_LAYER for p in ("weight", "bias")]
    names += ["final_layer_norm.weight", "final_layer_norm.bias"]
    return [Rule(name, name) for name in names]


def _open_clip_rules(layers: int) -> List[Rule]:
    rules = [Rule("token_embedding.weight", "embeddings.token_embedding.weight"),
             Rule("positional_embedding", "embeddings.position_embedding.weight")]
    for i in range(layers):
        block, layer = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        for part in ("q", "k", "v"):
            rules += [Rule(f"{block}.attn.in_proj_weight", f"{layer}.self_attn.{part}_proj.weight", part),
                      Rule(f"{block}.attn.in_proj_bias", f"{layer}.self_attn.{part}_proj.bias", part)]
        rules += [r for a, b in _OPEN_CLIP_LAYER for r in _pair(f"{block}.{a}", f"{layer}.{b}")]
    return rules + _pair("ln_final", "final_layer_norm")


@functools.lru_cache(maxsize=None)
def _text_model_prefix() -> str:
    """Where the installed transformers keeps CLIPTextModel's weights: under 'text_model.' before 5.6, flat since."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        return ""
    config = CLIPTextConfig(vocab_size=4, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                            num_attention_heads=1, max_position_embeddings=4, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
    with torch.device("meta"):
        keys = CLIPTextModel(config).state_dict().keys()
    return "text_model." if any(k.startswith("text_model.") for k in keys) else ""


def _rules(version: str, unet: UNetArch, vae: VAEArch, text_layers: int,
           clip_inner: str = "text_model.") -> Dict[str, List[Rule]]:
    """Every mapped key, full LDM name -> name in the component's diffusers state dict."""
    def prefixed(rules: List[Rule], ldm_prefix: str, diffusers_prefix: str = "") -> List[Rule]:
        return [Rule(ldm_prefix + r.ldm, diffusers_prefix + r.diffusers, r.reshape) for r in rules]

    if version == "sd1":
        text = prefixed(_clip_rules(text_layers), CLIP_PREFIX + clip_inner, _text_model_prefix())
    else:
        text = prefixed(_open_clip_rules(text_layers), OPEN_CLIP_PREFIX, _text_model_prefix())
    return {"unet": prefixed(_unet_rules(unet), UNET_PREFIX), "vae": prefixed(_vae_rules(vae), VAE_PREFIX),
            "text_encoder": text}


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


def ignored_reason(key: str, version: str, text_layers: int) -> Optional[str]:
    """Why a key is deliberately left out of the conversion, or None when it is not."""
    if version == "sd2" and key.startswith(f"{OPEN_CLIP_PREFIX}transformer.resblocks.{text_layers}."):
        return PENULTIMATE_REASON
    for pattern, reason in IGNORED:
        if re.fullmatch(pattern, key):
            return reason
    return None


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
