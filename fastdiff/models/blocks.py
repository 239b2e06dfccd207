"""Building blocks of the latent-diffusion UNet and the KL autoencoder.

Module and parameter names follow diffusers (``to_q``, ``to_out.0``, ``ff.net.0.proj``,
``conv_shortcut``, ...) so its state dicts load with ``strict=True``; the maths is the
same op for op, but every attention runs through ``fastdiff.ops.attention`` and every
GroupNorm through ``fastdiff.ops.group_norm`` (with the SiLU that follows it fused).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm's parameters (weight, bias) over ``ops.group_norm``; ``silu=True``
    applies the SiLU that follows the norm in the same pass. The parameters go to the op as
    they are: the kernels read them in their own dtype (fp32, or fp16/bf16 after
    ``model.half()``), with no cast per call."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


def timestep_embedding(timesteps: Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                       max_period: float = 10000.0) -> Tensor:
    """[N] timesteps -> [N, dim] float32 sinusoids, frequencies max_period^(-i / (dim/2 - shift)).

    Computed on the timesteps' device with the same op order as diffusers' Timesteps: a
    frequency table precomputed elsewhere can differ in the last ulp, which t ~ 1000 turns
    into ~1e-4 in the embedding.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Timesteps(nn.Module):
    """Parameter-free sinusoidal embedding of [N] timesteps (diffusers' ``time_proj``)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift = (
            num_channels, flip_sin_to_cos, downscale_freq_shift)

    def forward(self, timesteps: Tensor) -> Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, + projected time embedding, GN-SiLU-dropout-conv, plus a (1x1 conv) shortcut.

    ``temb`` is the time embedding *after* its SiLU: every resnet of diffusers applies
    SiLU to the same embedding, so the UNet does it once. ``temb_channels=None`` is the
    VAE variant without a time input.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int,
                 eps: float, dropout: float = 0.0, output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h, silu=True)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Halve H and W: 3x3 stride-2 conv, or 2x2 average pooling when ``use_conv`` is False.

    padding=0 is the VAE's layout: pad right and bottom by one, then an unpadded conv.
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=padding)
        elif out_channels != channels:
            raise ValueError("Downsample2D: average pooling cannot change the channel count")
        else:
            self.conv = nn.AvgPool2d(2, stride=2)
        self.use_conv = use_conv

    def forward(self, x: Tensor) -> Tensor:
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to ``output_size``, the skip's size when a side was odd), then 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample2D: without a conv the channel count cannot change")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, output_size: Optional[Sequence[int]] = None) -> Tensor:
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return x if self.conv is None else self.conv(x)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class Attention(nn.Module):
    """Multi-head attention with diffusers' ``Attention`` parameter names.

    Self-attention when ``context`` is None, else cross-attention to it (``cross_attention_dim``
    sizes to_k/to_v). ``norm_num_groups`` gives the VAE mid-block form: the input is
    [B, C, H, W], group-normed, attended over H*W, and added back to the input
    (``residual_connection``), then divided by ``rescale_output_factor``.
    """

    def __init__(self, query_dim: int, cross_attention_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0, bias: bool = False, upcast_attention: bool = False,
                 norm_num_groups: Optional[int] = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.upcast_attention = upcast_attention
        self.residual_connection, self.rescale_output_factor = residual_connection, rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps) if norm_num_groups is not None else None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(dropout)])
        self.is_cross = cross_attention_dim is not None
        self.fused: Optional[nn.Linear] = None  # see fuse_projections

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One GEMM instead of three (q, k, v of self-attention) or two (k, v of cross-attention).

        The weights are concatenated into ``fused`` and to_q/to_k/to_v are dropped (to_q
        stays for cross-attention), so this is for inference: the state dict changes. The
        heads are then strided views of the one output; the attention kernels read them
        without a copy.
        """
        if self.fused is not None:
            return
        parts = [self.to_k, self.to_v] if self.is_cross else [self.to_q, self.to_k, self.to_v]
        first = parts[0].weight
        fused = nn.Linear(first.shape[1], sum(p.weight.shape[0] for p in parts), bias=parts[0].bias is not None,
                          device=first.device, dtype=first.dtype)
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        self.fused = fused
        del self.to_k, self.to_v
        if not self.is_cross:
            del self.to_q

    def _project(self, x: Tensor, context: Optional[Tensor]):
        if self.fused is None:
            src = x if context is None else context
            return tuple(self._split_heads(proj(inp)) for proj, inp in
                         ((self.to_q, x), (self.to_k, src), (self.to_v, src)))
        if self.is_cross:
            if context is None:
                raise ValueError("this cross-attention layer needs a context")
            kv = self.fused(context).unflatten(-1, (2, self.heads, self.dim_head)).permute(0, 2, 3, 1, 4)
            return self._split_heads(self.to_q(x)), kv[:, 0], kv[:, 1]
        if context is not None:
            raise ValueError("this self-attention layer's projections are fused; it takes no context")
        qkv = self.fused(x).unflatten(-1, (3, self.heads, self.dim_head)).permute(0, 2, 3, 1, 4)  # [B, 3, H, L, D]
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]

    def forward(self, x: Tensor, context: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x [B, L, C] (or [B, C, H, W] for the VAE form); mask [B, Lk] bool, True = attend."""
        residual, spatial = x, x.dim() == 4
        if self.group_norm is not None:
            x = self.group_norm(x)
        if spatial:
            batch, channels, height, width = x.shape
            x = x.flatten(2).transpose(1, 2)
        q, k, v = self._project(x, context)
        dtype = q.dtype
        if self.upcast_attention:
            q, k, v = q.float(), k.float(), v.float()
        out = ops.attention(q, k, v, key_padding_mask, self.scale).to(dtype)
        out = self.to_out[1](self.to_out[0](out.transpose(1, 2).flatten(2)))
        if spatial:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if self.residual_connection:
            out = out + residual
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class GEGLU(nn.Module):
    """proj to 2*dim_out, then value * GELU(gate) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class GELU(nn.Module):
    """proj, then GELU (erf, or its tanh form): diffusers' "gelu" / "gelu-approximate"."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class SigmoidGELU(nn.Module):
    """proj, then x * sigmoid(1.702 x), the sigmoid approximation of GELU (Hendrycks & Gimpel
    2016, sec. 2): diffusers' "geglu-approximate" (ApproximateGELU), ungated despite the name."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


FEED_FORWARD_ACTIVATIONS = {
    "geglu": GEGLU, "geglu-approximate": SigmoidGELU,
    "gelu": GELU, "gelu-approximate": lambda dim_in, dim_out: GELU(dim_in, dim_out, approximate="tanh"),
}


class FeedForward(nn.Module):
    """net = [activation projection (dim -> mult dim), Dropout, Linear(mult dim -> dim)]."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, activation: str = "geglu"):
        super().__init__()
        if activation not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"feed-forward activation {activation!r} is not supported; valid: "
                             f"{', '.join(FEED_FORWARD_ACTIVATIONS)}")
        self.net = nn.ModuleList([FEED_FORWARD_ACTIVATIONS[activation](dim, dim * mult), nn.Dropout(dropout),
                                  nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: attn1 (self; or cross with ``only_cross_attention``), attn2 (cross), GEGLU FF."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, dropout: float = 0.0,
                 only_cross_attention: bool = False, upcast_attention: bool = False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, heads, dim_head,
                               dropout, upcast_attention=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head, dropout,
                               upcast_attention=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        # diffusers hands attn1 only the (absent) self-attention mask, so with
        # only_cross_attention the text padding mask applies to attn2 alone; kept for parity.
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        x = self.attn2(self.norm2(x), context, key_padding_mask) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer over [B, C, H, W]: GroupNorm, proj_in, transformer blocks on the
    H*W tokens, proj_out, plus the input. Projections are 1x1 convs, or Linear layers with
    ``use_linear_projection`` (SD 2.x)."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, cross_attention_dim: int, norm_num_groups: int,
                 num_layers: int = 1, dropout: float = 0.0, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, heads, dim_head, cross_attention_dim, dropout, only_cross_attention,
                                  upcast_attention)
            for _ in range(num_layers)])
        self.proj_out = proj(inner_dim, in_channels)

    def forward(self, x: Tensor, context: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        # contiguous [B, H*W, C] tokens, the layout diffusers feeds its LayerNorms and GEMMs (bitwise parity)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, key_padding_mask)
        if self.use_linear_projection:
            h = self.proj_out(h)
        # Back to x's layout: NCHW for an NCHW x (a channels-last view would change the conv's
        # algorithm, and with it the last bits against diffusers); for a channels-last x the view
        # already is channels-last, and stays so (no copy).
        layout = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        h = h.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x
