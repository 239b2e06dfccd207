"""The latent UNet of Stable Diffusion 1.x / 2.x, state-dict compatible with diffusers'
``UNet2DConditionModel`` and built from its config dict.

Only the configuration surface SD 1.x/2.x use is accepted; any other key or value
raises a ValueError that names it, rather than building a model that silently differs.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (Downsample2D, GroupNorm, ResnetBlock2D, TimestepEmbedding, Timesteps, Transformer2DModel,
                     Upsample2D)
from .config_checks import check_channels, check_groups, check_sample_size

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

DEFAULTS: Dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1.0, dropout=0.0, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8,
    use_linear_projection=False, upcast_attention=False, conv_in_kernel=3, conv_out_kernel=3,
    # Accepted but without effect, exactly as in diffusers for these block types: the
    # resnet_* pair only reaches ResnetDownsampleBlock2D/SimpleCrossAttn blocks,
    # mid_block_only_cross_attention only UNetMidBlock2DSimpleCrossAttn, and
    # addition_embed_type_num_heads only an addition embedding (rejected below).
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, mid_block_only_cross_attention=None,
    addition_embed_type_num_heads=64,
)
# Features SD 1.x/2.x never use: each must keep the value that switches it off.
MUST_BE: Dict[str, Any] = dict(
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    num_attention_heads=None, dual_cross_attention=False, class_embed_type=None, addition_embed_type=None,
    addition_time_embed_dim=None, num_class_embeds=None, resnet_time_scale_shift="default",
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
    timestep_post_act=None, time_cond_proj_dim=None, projection_class_embeddings_input_dim=None,
    attention_type="default", class_embeddings_concat=False, cross_attention_norm=None,
)


NAME = "UNet2DConditionModel"


def _unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{NAME}: config {key}={value!r} is not supported ({why})")


def _per_level(cfg: Dict[str, Any], key: str, levels: int, kind: type) -> List:
    value = cfg[key]
    values = [value] * levels if isinstance(value, kind) else list(value)
    if len(values) != levels or not all(isinstance(v, kind) for v in values):
        raise _unsupported(key, value, f"expected one {kind.__name__} or one per level ({levels} levels)")
    return values


def parse_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults filled in, per-level values expanded to lists; ValueError names any key or value
    this implementation does not reproduce."""
    cfg = dict(DEFAULTS)
    for key, value in config.items():
        if key.startswith("_"):  # diffusers' bookkeeping (_class_name, _diffusers_version, ...)
            continue
        if key in MUST_BE:
            if value != MUST_BE[key]:
                raise _unsupported(key, value, f"only {MUST_BE[key]!r} is implemented")
        elif key in DEFAULTS:
            cfg[key] = value
        else:
            raise _unsupported(key, value, "unknown config key")
    check_channels(NAME, "block_out_channels", cfg["block_out_channels"])
    check_groups(NAME, cfg["norm_num_groups"], cfg["block_out_channels"])
    check_sample_size(NAME, cfg["sample_size"], optional=True)
    levels = len(cfg["block_out_channels"])
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        if len(cfg[key]) != levels:
            raise _unsupported(key, cfg[key], f"need one block type per entry of block_out_channels ({levels})")
        for name in cfg[key]:
            if name not in allowed:
                raise _unsupported(key, cfg[key], f"block type {name!r}; supported: {', '.join(allowed)}")
    if cfg["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise _unsupported("mid_block_type", cfg["mid_block_type"], "only 'UNetMidBlock2DCrossAttn' is implemented")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise _unsupported("act_fn", cfg["act_fn"], "only 'silu' is implemented")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if not isinstance(cfg[key], int) or cfg[key] % 2 == 0:
            raise _unsupported(key, cfg[key], "needs an odd int for a 'same' convolution")
    layers = _per_level(cfg, "transformer_layers_per_block", levels, int)
    if any(n != 1 for n in layers):
        raise _unsupported("transformer_layers_per_block", cfg["transformer_layers_per_block"], "only 1 is implemented")
    cfg["block_out_channels"] = list(cfg["block_out_channels"])
    cfg["layers_per_block"] = _per_level(cfg, "layers_per_block", levels, int)
    cfg["cross_attention_dim"] = _per_level(cfg, "cross_attention_dim", levels, int)
    cfg["only_cross_attention"] = _per_level(cfg, "only_cross_attention", levels, bool)
    # diffusers' naming quirk: for these models `attention_head_dim` is the number of
    # heads per level (num_attention_heads = num_attention_heads or attention_head_dim);
    # the head size is channels // heads.
    cfg["num_heads"] = _per_level(cfg, "attention_head_dim", levels, int)
    return cfg


class DownLevel(nn.Module):
    """CrossAttnDownBlock2D (with ``attentions``) or DownBlock2D: resnets [-> transformer] x N,
    then a stride-2 conv; every intermediate output is kept as a skip."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, temb_channels: int, groups: int,
                 eps: float, dropout: float, add_downsample: bool, downsample_padding: int,
                 attention: Optional[Dict[str, Any]]):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps, dropout)
            for i in range(num_layers)])
        self.attentions = None if attention is None else nn.ModuleList([
            Transformer2DModel(in_channels=out_channels, norm_num_groups=groups, **attention)
            for _ in range(num_layers)])
        self.downsamplers = nn.ModuleList([
            Downsample2D(out_channels, padding=downsample_padding)]) if add_downsample else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpLevel(nn.Module):
    """CrossAttnUpBlock2D (with ``attentions``) or UpBlock2D: [concat skip -> resnet -> transformer] x N,
    then nearest 2x + conv to the next skip's size."""

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, num_layers: int,
                 temb_channels: int, groups: int, eps: float, dropout: float, add_upsample: bool,
                 attention: Optional[Dict[str, Any]]):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_output_channels if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels, temb_channels, groups, eps, dropout)
            for i in range(num_layers)])
        self.attentions = None if attention is None else nn.ModuleList([
            Transformer2DModel(in_channels=out_channels, norm_num_groups=groups, **attention)
            for _ in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor, skips: List[Tensor], temb: Tensor, context: Tensor, mask: Optional[Tensor],
                upsample_size: Optional[Sequence[int]]) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet at the lowest resolution."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, dropout: float,
                 output_scale_factor: float, attention: Dict[str, Any]):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, dropout, output_scale_factor)
            for _ in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(in_channels=channels, norm_num_groups=groups, **attention)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, mask: Optional[Tensor]) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, mask)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    """eps/v-prediction UNet of latent diffusion: ``model(sample, timestep, encoder_hidden_states)``."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        cfg = parse_config(config)
        self.config = {**DEFAULTS, **MUST_BE, **config}  # diffusers' view: every key, defaults filled in
        self.center_input_sample = cfg["center_input_sample"]
        channels, levels = cfg["block_out_channels"], len(cfg["block_out_channels"])
        groups, eps, dropout = cfg["norm_num_groups"], cfg["norm_eps"], cfg["dropout"]
        temb_channels = channels[0] * 4

        # Transformer2DModel kwargs of a level; no dropout, as diffusers' SD blocks give it only to the resnets
        def attention(level: int, cross_attn: bool, only_cross: bool) -> Optional[Dict[str, Any]]:
            if not cross_attn:
                return None
            heads = cfg["num_heads"][level]
            return dict(heads=heads, dim_head=channels[level] // heads,
                        cross_attention_dim=cfg["cross_attention_dim"][level],
                        use_linear_projection=cfg["use_linear_projection"], only_cross_attention=only_cross,
                        upcast_attention=cfg["upcast_attention"])

        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], cfg["conv_in_kernel"],
                                 padding=cfg["conv_in_kernel"] // 2)
        self.time_proj = Timesteps(channels[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg["down_block_types"]):
            self.down_blocks.append(DownLevel(
                channels[max(i - 1, 0)], channels[i], cfg["layers_per_block"][i], temb_channels, groups, eps, dropout,
                add_downsample=i < levels - 1, downsample_padding=cfg["downsample_padding"],
                attention=attention(i, kind == "CrossAttnDownBlock2D", cfg["only_cross_attention"][i])))

        # diffusers builds this mid block without only_cross_attention: it always has self-attention.
        self.mid_block = MidBlock(channels[-1], temb_channels, groups, eps, dropout, cfg["mid_block_scale_factor"],
                                  attention(levels - 1, True, False))

        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg["up_block_types"]):
            level = levels - 1 - i
            self.up_blocks.append(UpLevel(
                channels[max(level - 1, 0)], channels[min(level + 1, levels - 1)], channels[level],
                cfg["layers_per_block"][level] + 1, temb_channels, groups, eps, dropout, add_upsample=level > 0,
                attention=attention(level, kind == "CrossAttnUpBlock2D", cfg["only_cross_attention"][level])))

        self.conv_norm_out = GroupNorm(groups, channels[0], eps)
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], cfg["conv_out_kernel"],
                                  padding=cfg["conv_out_kernel"] // 2)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "UNet2DConditionModel":
        return cls(config)

    @staticmethod
    def check_config(config: Dict[str, Any]) -> None:
        """ValueError naming the first key of `config` this model cannot be built from; builds nothing."""
        parse_config(config)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                encoder_attention_mask: Optional[Tensor] = None) -> Tensor:
        """sample [B, C, H, W]; timestep 0-d or [B] (int or float); encoder_hidden_states [B, L, D];
        encoder_attention_mask [B, L] bool or 0/1, True/1 = attend to that token.

        No host synchronisation: the timestep is broadcast with tensor ops, so a step can be
        captured in a CUDA graph.
        """
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        timesteps = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        temb = F.silu(emb)  # each resnet's time projection starts with this SiLU; done once here
        # diffusers turns the mask into a -10000 bias; a hard mask gives the same softmax
        # (exp(-10000) is 0 in fp32/fp16) except on rows with every key masked.
        mask = None if encoder_attention_mask is None else encoder_attention_mask.to(torch.bool)
        context = encoder_hidden_states

        if self.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, level_skips = block(x, temb, context, mask)
            skips.extend(level_skips)
        x = self.mid_block(x, temb, context, mask)
        for block in self.up_blocks:
            level_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # upsample to the next skip's size, which is not 2x when a side was odd
            x = block(x, level_skips, temb, context, mask, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(self.conv_norm_out(x, silu=True))
