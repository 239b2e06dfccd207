"""The KL autoencoder (VAE) of Stable Diffusion 1.x / 2.x, state-dict compatible with
diffusers' ``AutoencoderKL`` and built from its config dict.

``encode`` returns the posterior's (mean, logvar) rather than a distribution object: the
pipeline decides whether to take the mean or to sample with its own noise source.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import Tensor, nn

from .blocks import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from .config_checks import check_channels, check_groups, check_sample_size

EPS = 1e-6  # diffusers' Encoder/Decoder fix every GroupNorm's eps to 1e-6, whatever the config

DEFAULTS: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True,
    # Stored for the pipeline; they do not change the network.
    shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
)


def _unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"AutoencoderKL: config {key}={value!r} is not supported ({why})")


def parse_config(config: Dict[str, Any], name: str = "AutoencoderKL") -> Dict[str, Any]:
    cfg = dict(DEFAULTS)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in DEFAULTS:
            raise _unsupported(key, value, "unknown config key")
        cfg[key] = value
    check_channels(name, "block_out_channels", cfg["block_out_channels"])
    check_groups(name, cfg["norm_num_groups"], cfg["block_out_channels"])
    check_sample_size(name, cfg["sample_size"])
    levels = len(cfg["block_out_channels"])
    for key, name in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if len(cfg[key]) != levels or any(t != name for t in cfg[key]):
            raise _unsupported(key, cfg[key], f"need {levels} x {name!r}, one per entry of block_out_channels")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise _unsupported("act_fn", cfg["act_fn"], "only 'silu' is implemented")
    if not isinstance(cfg["layers_per_block"], int):
        raise _unsupported("layers_per_block", cfg["layers_per_block"], "diffusers' VAE takes one int")
    return cfg


class EncoderDownBlock(nn.Module):
    """DownEncoderBlock2D: resnets without time input, then the VAE's asymmetric-pad downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None,
                                                    groups, EPS) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderUpBlock(nn.Module):
    """UpDecoderBlock2D: resnets without time input, then nearest 2x + conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None,
                                                    groups, EPS) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D as the VAE uses it: resnet, single-head spatial self-attention with
    its own GroupNorm and residual, resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2)])
        # diffusers: heads = channels // attention_head_dim with attention_head_dim = channels
        self.attentions = nn.ModuleList([Attention(channels, heads=1, dim_head=channels, bias=True,
                                                   norm_num_groups=groups, eps=EPS, residual_connection=True)
                                         ]) if add_attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """diffusers' Encoder: 2 x latent_channels out (mean and log-variance) with ``double_z``, as
    the KL autoencoder uses it, else latent_channels (the VQ-VAE)."""

    def __init__(self, cfg: Dict[str, Any], double_z: bool = True):
        super().__init__()
        channels, groups = cfg["block_out_channels"], cfg["norm_num_groups"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderDownBlock(channels[max(i - 1, 0)], channels[i], cfg["layers_per_block"], groups,
                             add_downsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.mid_block = VAEMidBlock(channels[-1], groups, cfg["mid_block_add_attention"])
        self.conv_norm_out = GroupNorm(groups, channels[-1], EPS)
        self.conv_out = nn.Conv2d(channels[-1], (2 if double_z else 1) * cfg["latent_channels"], 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x), silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: Dict[str, Any]):
        super().__init__()
        channels, groups = cfg["block_out_channels"], cfg["norm_num_groups"]
        self.conv_in = nn.Conv2d(cfg["latent_channels"], channels[-1], 3, padding=1)
        self.mid_block = VAEMidBlock(channels[-1], groups, cfg["mid_block_add_attention"])
        levels = len(channels)
        self.up_blocks = nn.ModuleList([
            DecoderUpBlock(channels[min(level + 1, levels - 1)], channels[level], cfg["layers_per_block"] + 1,
                           groups, add_upsample=level > 0)
            for level in reversed(range(levels))])
        self.conv_norm_out = GroupNorm(groups, channels[0], EPS)
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class AutoencoderKL(nn.Module):
    """``encode(image) -> (mean, logvar)``, ``decode(latents) -> image``; latents are unscaled
    (multiply by ``scaling_factor`` before the UNet, divide after)."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        cfg = parse_config(config)
        self.config = {**DEFAULTS, **config}  # diffusers' view: every key, defaults filled in
        self.scaling_factor: float = cfg["scaling_factor"]
        self.shift_factor: Optional[float] = cfg["shift_factor"]
        self.latents_mean, self.latents_std = cfg["latents_mean"], cfg["latents_std"]
        self.force_upcast: bool = cfg["force_upcast"]
        latent = cfg["latent_channels"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg["use_post_quant_conv"] else None

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "AutoencoderKL":
        return cls(config)

    @staticmethod
    def check_config(config: Dict[str, Any]) -> None:
        """ValueError naming the first key of `config` this model cannot be built from; builds nothing."""
        parse_config(config)

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """image [B, C, H, W] in [-1, 1] -> posterior mean and log-variance, each [B, latent, h, w]."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        # the clamp of diffusers' DiagonalGaussianDistribution keeps exp(logvar) finite
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
