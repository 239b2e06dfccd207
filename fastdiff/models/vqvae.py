"""The VQ-VAE of VQ-Diffusion, state-dict compatible with diffusers' ``VQModel`` and built from
its config dict.

Encoder and decoder are the KL autoencoder's (diffusers uses the same classes; the VQ
encoder outputs ``latent_channels`` rather than a mean and a log-variance). Between them,
``quant_conv`` maps to the codebook's ``vq_embed_dim`` and ``post_quant_conv`` back.
Tokens index the codebook ``quantize.embedding`` row-major over the latent grid.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from .autoencoder_kl import Decoder, Encoder, parse_config
from .config_checks import check_sample_size, positive_int

DEFAULTS: Dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=3, sample_size=32,
    num_vq_embeddings=256, norm_num_groups=32, vq_embed_dim=None, scaling_factor=0.18215, norm_type="group",
    mid_block_add_attention=True, lookup_from_codebook=False, force_upcast=False,
)
# The keys that shape the encoder and decoder, which the KL autoencoder's parser checks.
_NETWORK_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                 "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "mid_block_add_attention")


def parse_vq_config(config: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(every key with defaults filled in, the encoder/decoder config); ValueError names a key it cannot build."""
    cfg = dict(DEFAULTS)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in DEFAULTS:
            raise ValueError(f"VQModel: config {key}={value!r} is not supported (unknown config key)")
        cfg[key] = value
    if cfg["norm_type"] != "group":
        raise ValueError(f"VQModel: config norm_type={cfg['norm_type']!r} is not supported (only 'group'; "
                         f"'spatial' is MoVQ's decoder, not VQ-Diffusion's)")
    if cfg["lookup_from_codebook"]:
        raise ValueError("VQModel: config lookup_from_codebook=True is not supported (VQ-Diffusion decodes "
                         "looked-up codebook vectors directly)")
    shared = parse_config({k: cfg[k] for k in _NETWORK_KEYS}, name="VQModel")
    check_sample_size("VQModel", cfg["sample_size"])
    positive_int("VQModel", "num_vq_embeddings", cfg["num_vq_embeddings"])
    return cfg, shared


class VectorQuantizer(nn.Module):
    """The codebook (``embedding``, diffusers' parameter name): nearest entry and lookup."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)

    def nearest(self, z: Tensor) -> Tensor:
        """z [B, D, h, w] -> int64 [B, h*w]: the index of the closest codebook entry (L2)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        distances = torch.cdist(flat, self.embedding.weight.to(flat.dtype))
        return distances.argmin(dim=1).reshape(z.shape[0], -1)

    def lookup(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """int64 [B, h*w] -> codebook vectors [B, D, h, w]."""
        z = self.embedding(tokens)                       # [B, h*w, D]
        return z.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """``encode_tokens(image) -> tokens``, ``decode_tokens(tokens, h, w) -> image`` (unclamped,
    about [-1, 1]), as diffusers' ``quantize`` + ``decode(..., force_not_quantize=True)``."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        cfg, shared = parse_vq_config(config)
        self.config = cfg
        latent = cfg["latent_channels"]
        embed_dim = cfg["vq_embed_dim"] if cfg["vq_embed_dim"] is not None else latent
        self.num_codes = cfg["num_vq_embeddings"]
        self.downsample_factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        self.encoder = Encoder(shared, double_z=False)
        self.quant_conv = nn.Conv2d(latent, embed_dim, 1)
        self.quantize = VectorQuantizer(self.num_codes, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent, 1)
        self.decoder = Decoder(shared)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "VQModel":
        return cls(config)

    @staticmethod
    def check_config(config: Dict[str, Any]) -> None:
        """ValueError naming the first key of `config` this model cannot be built from; builds nothing."""
        parse_vq_config(config)

    def encode_tokens(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> int64 tokens [B, (H/f)*(W/f)]."""
        return self.quantize.nearest(self.quant_conv(self.encoder(images)))

    def decode_tokens(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """int64 tokens [B, height*width] -> images [B, 3, height*f, width*f]."""
        if tokens.dim() != 2 or tokens.shape[1] != height * width:
            raise ValueError(f"decode_tokens: tokens of shape {tuple(tokens.shape)} do not form a "
                             f"{height} x {width} grid per image")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.num_codes):
            raise ValueError(f"decode_tokens: token indices must lie in [0, {self.num_codes - 1}] (the codebook); "
                             f"a mask token cannot be decoded")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(tokens, height, width)))
