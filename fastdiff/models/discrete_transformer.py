"""VQ-Diffusion's denoising transformer over discrete tokens, state-dict compatible with
diffusers' ``Transformer2DModel`` built with ``num_vector_embeds`` (the vectorised-input path).

tokens [B, N] (N = height x width latent pixels, class K - 1 is the mask)
  -> token embedding + learned row and column embeddings   (``latent_image_embedding``)
  -> blocks: AdaLN(t) -> self-attention, AdaLN(t) -> cross-attention to the text,
     LayerNorm -> feed-forward, each added back               (Gu et al. 2022, fig. 2)
  -> LayerNorm -> Linear to the K - 1 codebook classes -> log-softmax over classes
     (in float64, as diffusers, then float32): log p(x0 | x_t), [B, K - 1, N].
Every attention runs through ``fastdiff.ops.attention``.
"""
from __future__ import annotations

from typing import Any, Dict, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Attention, FeedForward
from .config_checks import positive_int

DEFAULTS: Dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=88, in_channels=None, out_channels=None, num_layers=1, dropout=0.0,
    norm_num_groups=32, cross_attention_dim=None, attention_bias=False, sample_size=None, num_vector_embeds=None,
    patch_size=None, activation_fn="geglu", num_embeds_ada_norm=None, use_linear_projection=False,
    only_cross_attention=False, double_self_attention=False, upcast_attention=False, norm_type="layer_norm",
    norm_elementwise_affine=True, norm_eps=1e-5, attention_type="default", caption_channels=None,
    interpolation_scale=None, use_additional_conditions=None,
)


def _unsupported(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"VQ-Diffusion transformer: config {key}={value!r} is not supported ({why})")


def parse_config(config: Dict[str, Any]) -> Dict[str, Any]:
    cfg = dict(DEFAULTS)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in DEFAULTS:
            raise _unsupported(key, value, "unknown config key")
        cfg[key] = value
    if cfg["num_vector_embeds"] is None or cfg["in_channels"] is not None or cfg["patch_size"] is not None:
        raise _unsupported("num_vector_embeds", cfg["num_vector_embeds"],
                           "this is the discrete-input transformer: give num_vector_embeds, not in_channels or "
                           "patch_size")
    if cfg["sample_size"] is None:
        raise _unsupported("sample_size", None, "the token grid is sample_size x sample_size")
    if cfg["num_embeds_ada_norm"] is None:
        raise _unsupported("num_embeds_ada_norm", None, "the blocks condition on the timestep by AdaLayerNorm")
    # diffusers reads an unset (or "layer_norm") norm_type with num_embeds_ada_norm as "ada_norm"
    if cfg["norm_type"] not in ("ada_norm", "layer_norm"):
        raise _unsupported("norm_type", cfg["norm_type"], "VQ-Diffusion's blocks use 'ada_norm'")
    if cfg["cross_attention_dim"] is None:
        raise _unsupported("cross_attention_dim", None, "the transformer attends to the text embedding")
    for key in ("only_cross_attention", "double_self_attention"):
        if cfg[key]:
            raise _unsupported(key, cfg[key], "VQ-Diffusion's blocks have self- then cross-attention")
    if cfg["attention_type"] != "default":
        raise _unsupported("attention_type", cfg["attention_type"], "only 'default'")
    name = "VQ-Diffusion transformer"
    positive_int(name, "sample_size", cfg["sample_size"])
    positive_int(name, "num_vector_embeds", cfg["num_vector_embeds"], minimum=2)  # codes + the mask class
    for key in ("num_attention_heads", "attention_head_dim", "num_embeds_ada_norm"):
        positive_int(name, key, cfg[key])
    positive_int(name, "num_layers", cfg["num_layers"], minimum=0)
    return cfg


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, then x * (1 + scale) + shift from a learned timestep embedding."""

    def __init__(self, dim: int, num_timesteps: int):
        super().__init__()
        self.emb = nn.Embedding(num_timesteps, dim)
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def modulation(self, timestep: Tensor) -> Tensor:
        """[T] int64 -> [T, 1, 2 * dim], T = 1 or the batch: computed once per block and step."""
        return self.linear(F.silu(self.emb(timestep))).unsqueeze(1)

    def forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        scale, shift = modulation.chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class DiscreteTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock with norm_type "ada_norm"."""

    def __init__(self, dim: int, cfg: Dict[str, Any]):
        super().__init__()
        heads, dim_head, steps = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_embeds_ada_norm"]
        common = dict(heads=heads, dim_head=dim_head, dropout=cfg["dropout"], bias=cfg["attention_bias"],
                      upcast_attention=cfg["upcast_attention"])
        self.norm1 = AdaLayerNorm(dim, steps)
        self.attn1 = Attention(dim, None, **common)
        self.norm2 = AdaLayerNorm(dim, steps)
        self.attn2 = Attention(dim, cfg["cross_attention_dim"], **common)
        self.norm3 = nn.LayerNorm(dim, eps=cfg["norm_eps"], elementwise_affine=cfg["norm_elementwise_affine"])
        self.ff = FeedForward(dim, dropout=cfg["dropout"], activation=cfg["activation_fn"])

    def forward(self, x: Tensor, context: Tensor, timestep: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x, self.norm1.modulation(timestep))) + x
        x = self.attn2(self.norm2(x, self.norm2.modulation(timestep)), context) + x
        return self.ff(self.norm3(x)) + x


class ImagePositionalEmbeddings(nn.Module):
    """Token embedding plus the embedding of its row and of its column on the latent grid."""

    def __init__(self, num_embed: int, height: int, width: int, dim: int):
        super().__init__()
        self.height, self.width = height, width
        self.emb = nn.Embedding(num_embed, dim)
        self.height_emb = nn.Embedding(height, dim)
        self.width_emb = nn.Embedding(width, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        position = self.height_emb.weight[:, None, :] + self.width_emb.weight[None, :, :]   # [h, w, dim]
        return self.emb(tokens) + position.reshape(1, self.height * self.width, -1)[:, : tokens.shape[1]]


class VQDiffusionTransformer(nn.Module):
    """``forward(tokens, encoder_hidden_states, timestep) -> log p(x0 | x_t)`` [B, K - 1, N], float32."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        cfg = parse_config(config)
        self.config = cfg
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.height = self.width = cfg["sample_size"]
        self.num_vector_embeds = cfg["num_vector_embeds"]
        self.num_timesteps = cfg["num_embeds_ada_norm"]
        self.latent_image_embedding = ImagePositionalEmbeddings(self.num_vector_embeds, self.height, self.width, dim)
        self.transformer_blocks = nn.ModuleList([DiscreteTransformerBlock(dim, cfg) for _ in range(cfg["num_layers"])])
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, self.num_vector_embeds - 1)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "VQDiffusionTransformer":
        return cls(config)

    @staticmethod
    def check_config(config: Dict[str, Any]) -> None:
        """ValueError naming the first key of `config` this model cannot be built from; builds nothing."""
        parse_config(config)

    @property
    def num_latent_pixels(self) -> int:
        return self.height * self.width

    def forward(self, tokens: Tensor, encoder_hidden_states: Tensor,
                timestep: Union[int, Tensor]) -> Tensor:
        """tokens int64 [B, N]; encoder_hidden_states [B, L, D]; timestep an int, or int64 [1] or [B]."""
        if tokens.dim() != 2 or tokens.shape[1] != self.num_latent_pixels:
            raise ValueError(f"tokens must be [B, {self.num_latent_pixels}] ({self.height} x {self.width} latent "
                             f"pixels), got {tuple(tokens.shape)}")
        timestep = torch.as_tensor(timestep, device=tokens.device).reshape(-1)
        if timestep.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(f"timestep must be one value or one per sample, got {timestep.shape[0]} for a batch "
                             f"of {tokens.shape[0]}")
        x = self.latent_image_embedding(tokens)
        context = encoder_hidden_states.to(x.dtype)
        for block in self.transformer_blocks:
            x = block(x, context, timestep)
        logits = self.out(self.norm_out(x))                          # [B, N, K - 1]
        # Normalised over the contiguous class axis, then returned as the [B, K - 1, N] view
        # diffusers' layout names: each token's classes stay adjacent in memory, which is how
        # discrete_step reads them, and no transposed copy is made.
        return F.log_softmax(logits.double(), dim=-1).float().transpose(1, 2)
