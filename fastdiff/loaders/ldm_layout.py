"""The key layout of Stable Diffusion 1.x / 2.x single files: original LDM names <-> diffusers names.

The original (CompVis / Stability latent-diffusion) checkpoint keeps the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoder under
``cond_stage_model.`` (a transformers CLIPTextModel for SD1, an OpenCLIP text tower for SD2).

The whole mapping is one list of `Rule`s per architecture, built by `_rules`; loading
(``single_file.convert_ldm_checkpoint``) and export (``single_file.to_ldm_checkpoint``) both read
it, so they cannot drift. Every checkpoint key is mapped by a rule, ignored for a reason given
in `IGNORED` (`ignored_reason`), or an error.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

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



def ignored_reason(key: str, version: str, text_layers: int) -> Optional[str]:
    """Why a key is deliberately left out of the conversion, or None when it is not."""
    if version == "sd2" and key.startswith(f"{OPEN_CLIP_PREFIX}transformer.resblocks.{text_layers}."):
        return PENULTIMATE_REASON
    for pattern, reason in IGNORED:
        if re.fullmatch(pattern, key):
            return reason
    return None
