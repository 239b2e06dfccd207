"""GLIDE's noised CLIP: a text encoder and an image encoder that also sees the diffusion timestep.

Module and parameter names follow glide-text2im's ``clip/encoders.py``, so the released
``clip_text_enc.pt`` / ``clip_image_enc.pt`` state dicts load with ``strict=True``. The
computation matches it too:

- LayerNorm (eps 1e-5) in float32 (in float64 for float64 inputs, which glide never sees but
  gradient checks want);
- attention runs over the context rounded up to a multiple of 32: keys and values are padded
  with zeros there and an additive -1e10 bias masks the padding (and the future, for text);
  q k^T is scaled by 1/sqrt(head_dim) (glide splits it as sqrt of that on q and on k);
- GELU is exact; images arrive in [0, 255] and are normalised with CLIP's channel statistics;
- the text feature is read at position length - 1; the image feature at the first position,
  which holds the learned timestep embedding ``w_t[t]`` (or ``pred_state`` without timesteps).

Glide pads the queries too and drops their rows afterwards; rows of a softmax are independent,
so attending with the real queries only gives the same numbers.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# glide_text2im/clip/config.yaml
CLIP_DEFAULTS: Dict[str, Any] = {
    "logit_scale": 100.0,
    "beta_schedule": "squaredcos_cap_v2",
    "n_timesteps": 1000,
    "image_size": 64,
    "patch_size": 4,
    "n_vocab": 65536,
    "max_text_len": 77,
    "n_embd": 512,
    "n_head_state_text": 64,
    "n_head_text": 8,
    "n_xf_blocks_text": 12,
    "n_head_state_image": 64,
    "n_head_image": 12,
    "n_xf_blocks_image": 12,
}

# The statistics of OpenAI CLIP's training images, on the [0, 255] scale.
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)
ATTENTION_BLOCK = 32  # glide's block-sparse layout: contexts are rounded up to whole blocks
MASKED = -1e10  # glide's additive mask value (finite, so fully masked padding rows stay finite)


def rounded_context(n_context: int) -> int:
    return ATTENTION_BLOCK * math.ceil(n_context / ATTENTION_BLOCK)


def attention_bias(n_context: int, causal: bool) -> Tensor:
    """glide's dense (or causal) block layout as an additive bias over the rounded context:
    0 where a query may see a key, -1e10 elsewhere (padding, and the future when causal)."""
    size = rounded_context(n_context)
    pos = torch.arange(size)
    visible = (pos[:, None] < n_context) & (pos[None, :] < n_context)
    if causal:
        visible &= pos[None, :] <= pos[:, None]
    return torch.zeros(size, size).masked_fill(~visible, MASKED)


class LayerNorm(nn.Module):
    def __init__(self, n_state: int, eps: float = 1e-5):
        super().__init__()
        self.n_state, self.eps = n_state, eps
        self.g = nn.Parameter(torch.ones(n_state))
        self.b = nn.Parameter(torch.zeros(n_state))

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # glide normalises in float32
        return F.layer_norm(x.to(dtype), (self.n_state,), self.g.to(dtype), self.b.to(dtype), self.eps)


class Affine(nn.Module):
    """glide's linear layer: weight ``w`` [out, in], optional bias ``b``, cast to the input's dtype."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in).normal_(std=n_in ** -0.5))
        self.b: Optional[nn.Parameter] = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w.to(x.dtype), None if self.b is None else self.b.to(x.dtype))


class AttentionResblock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln = LayerNorm(n_state)
        self.f_q = Affine(n_state, n_state)
        self.f_k = Affine(n_state, n_state, bias=False)
        self.f_v = Affine(n_state, n_state)
        self.f_c = Affine(n_state, n_state)

    def forward(self, m: Tensor, bias: Tensor) -> Tensor:
        n_context, size = m.shape[1], bias.shape[-1]
        r = self.ln(m)
        q, k, v = self.f_q(r), self.f_k(r), self.f_v(r)
        # Keys and values over glide's rounded context; the -1e10 bias gives the zero padding no weight.
        k = F.pad(k, (0, 0, 0, size - n_context))
        v = F.pad(v, (0, 0, 0, size - n_context))
        q, k, v = (x.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:n_context].to(q.dtype),
                                             scale=q.shape[-1] ** -0.5)
        return m + self.f_c(out.transpose(1, 2).flatten(2))


class MlpResblock(nn.Module):
    def __init__(self, n_state: int):
        super().__init__()
        self.ln = LayerNorm(n_state)
        self.f_1 = Affine(n_state, 4 * n_state)
        self.f_2 = Affine(4 * n_state, n_state)

    def forward(self, m: Tensor) -> Tensor:
        return m + self.f_2(F.gelu(self.f_1(self.ln(m))))


class TransformerBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.f_attn = AttentionResblock(n_state, n_head)
        self.f_mlp = MlpResblock(n_state)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.f_mlp(self.f_attn(x, bias))


class TextEmbedding(nn.Module):
    def __init__(self, n_vocab: int, n_context: int, n_state: int):
        super().__init__()
        self.w_voc = nn.Parameter(torch.empty(n_vocab, n_state).normal_(std=0.02))
        self.w_pos = nn.Parameter(torch.empty(n_context, n_state).normal_(std=0.01))

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.w_voc) + self.w_pos[None]


class ImageEmbedding(nn.Module):
    def __init__(self, image_size: int, patch_size: int, n_state: int, n_timestep: int):
        super().__init__()
        self.patch_size, self.n_timestep = patch_size, n_timestep
        n_patches = (image_size // patch_size) ** 2
        self.patch_proj = nn.Parameter(torch.empty(n_state, 3, patch_size, patch_size).normal_(
            std=(2 / (n_state * patch_size ** 2)) ** 0.5))
        self.w_pos = nn.Parameter(torch.empty(1 + n_patches, n_state).normal_(std=n_state ** -0.5))
        if n_timestep == 0:
            self.pred_state = nn.Parameter(torch.empty(n_state).normal_(std=n_state ** -0.5))
        else:
            self.w_t = nn.Parameter(torch.empty(n_timestep, n_state).normal_(std=n_state ** -0.5))
        self.ln = LayerNorm(n_state)
        # Constants, not weights: glide keeps them out of its state dict, so they are not persistent here.
        self.register_buffer("channel_means", torch.tensor(IMAGE_CHANNEL_MEANS).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("channel_stds", torch.tensor(IMAGE_CHANNEL_STDS).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor, t: Optional[Tensor]) -> Tensor:
        x = ((image - self.channel_means) / self.channel_stds).to(self.patch_proj.dtype)
        x = F.conv2d(x, self.patch_proj, stride=self.patch_size).flatten(2).transpose(1, 2)
        if t is None:
            first = self.pred_state[None, None].expand(x.shape[0], 1, -1)
        else:
            first = F.embedding(t, self.w_t)[:, None]
        return self.ln(torch.cat((first.to(x.dtype), x), dim=1) + self.w_pos[None])


class FeatureReadout(nn.Module):
    """LayerNorm and a bias-free projection of one position's features to the embedding."""

    def __init__(self, n_state: int, n_embd: int):
        super().__init__()
        self.ln = LayerNorm(n_state)
        self.f = Affine(n_state, n_embd, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.f(self.ln(h))


def _integer_tensor(x: Tensor, what: str) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {x.dtype}")


def _check_range(x: Tensor, low: int, high: int, what: str) -> None:
    # Only on the CPU: on an accelerator the check would sync the host every call.
    if x.device.type == "cpu" and x.numel() and (int(x.min()) < low or int(x.max()) >= high):
        raise ValueError(f"{what} must lie in [{low}, {high}), got values in [{int(x.min())}, {int(x.max())}]")


class ClipTextEncoder(nn.Module):
    """glide's ``TextEncoder``: (tokens [B, max_text_len], lengths [B]) -> [B, n_embd]."""

    def __init__(self, n_vocab: int, max_text_len: int, n_embd: int, n_head: int, n_xf_blocks: int,
                 n_head_state: int = 64):
        super().__init__()
        self.n_vocab, self.max_text_len, self.n_embd = n_vocab, max_text_len, n_embd
        self.n_state, self.n_xf_blocks = n_head * n_head_state, n_xf_blocks
        blocks: Dict[str, nn.Module] = {"input": TextEmbedding(n_vocab, max_text_len, self.n_state)}
        blocks.update({f"block_{i}": TransformerBlock(self.n_state, n_head) for i in range(n_xf_blocks)})
        blocks["output"] = FeatureReadout(self.n_state, n_embd)
        self.blocks = nn.ModuleDict(blocks)
        self.register_buffer("attn_bias", attention_bias(max_text_len, causal=True), persistent=False)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.max_text_len:
            raise ValueError(f"tokens must be [B, {self.max_text_len}] (the text context), got {tuple(tokens.shape)}")
        if lengths.dim() != 1 or lengths.shape[0] != tokens.shape[0]:
            raise ValueError(f"lengths must be [B] = [{tokens.shape[0]}], got {tuple(lengths.shape)}")
        _integer_tensor(tokens, "tokens")
        _integer_tensor(lengths, "lengths")
        _check_range(tokens, 0, self.n_vocab, "token ids")
        _check_range(lengths, 1, self.max_text_len + 1, "lengths (start and end tokens included)")
        h = self.blocks["input"](tokens)
        for i in range(self.n_xf_blocks):
            h = self.blocks[f"block_{i}"](h, self.attn_bias)
        # Causal attention: the last real token (the end token) has seen the whole prompt.
        index = (lengths.to(h.device, torch.long) - 1)[:, None, None].expand(-1, 1, h.shape[2])
        return self.blocks["output"](torch.gather(h, 1, index)[:, 0])


class NoisedClipImageEncoder(nn.Module):
    """glide's ``ImageEncoder``: (image [B, 3, S, S] on the [0, 255] scale, t [B]) -> [B, n_embd]."""

    def __init__(self, image_size: int, patch_size: int, n_embd: int, n_head: int, n_xf_blocks: int,
                 n_head_state: int = 64, n_timestep: int = 0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.n_embd = image_size, patch_size, n_embd
        self.n_timestep, self.n_xf_blocks = n_timestep, n_xf_blocks
        self.n_state = n_head * n_head_state
        self.n_context = 1 + (image_size // patch_size) ** 2
        blocks: Dict[str, nn.Module] = {"input": ImageEmbedding(image_size, patch_size, self.n_state, n_timestep)}
        blocks.update({f"block_{i}": TransformerBlock(self.n_state, n_head) for i in range(n_xf_blocks)})
        blocks["output"] = FeatureReadout(self.n_state, n_embd)
        self.blocks = nn.ModuleDict(blocks)
        self.register_buffer("attn_bias", attention_bias(self.n_context, causal=False), persistent=False)

    def _timesteps(self, t: Union[Tensor, int, None], batch: int, device: torch.device) -> Optional[Tensor]:
        if self.n_timestep == 0:
            if t is not None:
                raise ValueError("this image encoder has no timestep embedding (n_timestep=0): pass t=None")
            return None
        if t is None:
            raise ValueError(f"this noised image encoder needs the timesteps t (integers in [0, {self.n_timestep}))")
        t = torch.as_tensor(t, device=device)
        _integer_tensor(t, "t (original, un-respaced timesteps)")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or [B] = [{batch}], got {tuple(t.shape)}")
        _check_range(t, 0, self.n_timestep, "t")
        return t.long()

    def forward(self, image: Tensor, t: Union[Tensor, int, None] = None) -> Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        if image.shape[2] != self.image_size or image.shape[3] != self.image_size:
            raise ValueError(f"image must be {self.image_size}x{self.image_size}, got "
                             f"{image.shape[2]}x{image.shape[3]}")
        h = self.blocks["input"](image, self._timesteps(t, image.shape[0], image.device))
        for i in range(self.n_xf_blocks):
            h = self.blocks[f"block_{i}"](h, self.attn_bias)
        return self.blocks["output"](h[:, 0])
