"""GLIDE's text-conditioned ADM U-Net (Nichol et al. 2022; Dhariwal & Nichol 2021).

Module and parameter names follow openai/glide-text2im (``input_blocks.1.0.in_layers.0``,
``transformer.resblocks.0.attn.c_qkv``, ``encoder_kv``, ...) so the released checkpoints
(``base.pt``, ``upsample.pt``, ``base_inpaint.pt``, ``upsample_inpaint.pt``) load with
``strict=True``. The options are GLIDE's own (``glide_options`` holds its defaults), so an
options dict written for glide-text2im works unchanged.

What differs from the original is where the work goes, not the maths:
- every GroupNorm (GLIDE's GroupNorm32: 32 groups, computed in float32) and the
  scale-shift + SiLU after it run as one ``fastdiff.ops.group_norm``;
- every attention runs through ``fastdiff.ops.attention`` (GLIDE scales q and k by
  d^-1/4 each before the product, which is the same softmax(q k^T / sqrt(d)));
- the text transformer, its projection and every block's text K/V projection run once
  per prompt batch (``encode_text``), not once per denoising step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .config_checks import is_int

OUT_CHANNELS = 6  # eps (3) + the learned-range variance interpolation (3)

# glide_text2im.model_creation.model_and_diffusion_defaults()
GLIDE_DEFAULTS: Dict[str, Any] = dict(
    image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1, num_head_channels=64,
    num_heads_upsample=-1, attention_resolutions="32,16,8", dropout=0.1, text_ctx=128, xf_width=512,
    xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True, diffusion_steps=1000,
    noise_schedule="squaredcos_cap_v2", timestep_respacing="", use_scale_shift_norm=True,
    resblock_updown=True, use_fp16=True, cache_text_emb=False, inpaint=False, super_res=False,
)
# ...and model_and_diffusion_defaults_upsampler(): the defaults above with these changes
GLIDE_UPSAMPLER_CHANGES: Dict[str, Any] = dict(image_size=256, num_res_blocks=2, noise_schedule="linear",
                                               super_res=True)
DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def glide_options(upsampler: bool = False, **overrides) -> Dict[str, Any]:
    """GLIDE's option defaults (base model, or the upsampler's) with `overrides` applied.

    Unknown keys raise, as glide-text2im's ``create_model_and_diffusion(**options)`` would.
    """
    options = dict(GLIDE_DEFAULTS, **(GLIDE_UPSAMPLER_CHANGES if upsampler else {}))
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise ValueError(f"unknown GLIDE option(s): {', '.join(unknown)}; valid options: {', '.join(options)}")
    options.update(overrides)
    return options


# Widths and counts that must be integers >= the bound (-1 is ADM's "not set" for the head options).
_OPTION_MINIMUM = dict(image_size=1, num_channels=32, num_res_blocks=1, num_heads=1, text_ctx=1, xf_width=0,
                       xf_layers=0, diffusion_steps=1)
_OPTION_UNSET_OR_POSITIVE = ("num_head_channels", "num_heads_upsample")


def check_glide_options(options: Dict[str, Any]) -> None:
    """ValueError naming the first width or count GLIDE cannot build from (negative, zero, not an int)."""
    def refuse(key: str, valid: str) -> ValueError:
        return ValueError(f"GLIDE option {key}={options[key]!r} is not valid (needs {valid})")

    for key, minimum in _OPTION_MINIMUM.items():
        if not is_int(options[key]) or options[key] < minimum:
            raise refuse(key, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
    if options["num_channels"] % 32:
        raise refuse("num_channels", "a multiple of 32: GLIDE's GroupNorm has 32 groups")
    for key in _OPTION_UNSET_OR_POSITIVE:
        if not is_int(options[key]) or not (options[key] == -1 or options[key] > 0):
            raise refuse(key, "a positive integer, or -1 for unset")
    if options["xf_width"] and (not is_int(options["xf_heads"]) or options["xf_heads"] < 1):
        raise refuse("xf_heads", "a positive integer when xf_width > 0")


def parse_channel_mult(options: Dict[str, Any]) -> Tuple[int, ...]:
    size, mult = int(options["image_size"]), options["channel_mult"]
    if mult in ("", None):
        if size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"GLIDE has no default channel_mult for image_size {size} (64, 128 and 256 do); "
                             "give channel_mult, e.g. '1,2,3,4'")
        return DEFAULT_CHANNEL_MULT[size]
    parsed = tuple(int(m) for m in mult.split(",")) if isinstance(mult, str) else tuple(int(m) for m in mult)
    if not parsed or min(parsed) < 1:
        raise ValueError(f"GLIDE option channel_mult={mult!r} is not valid (needs positive integers, e.g. '1,2,3,4')")
    if 2 ** (len(parsed) + 2) != size:  # glide-text2im asserts this relation too
        raise ValueError(f"channel_mult {mult!r} has {len(parsed)} levels; GLIDE requires "
                         f"2 ** (levels + 2) == image_size, i.e. {max(int(math.log2(size)) - 2, 1)} levels "
                         f"for image_size {size}")
    return parsed


def attention_downsample_rates(options: Dict[str, Any]) -> Tuple[int, ...]:
    """attention_resolutions "32,16,8" at image_size 64 -> attention at downsample rates 2, 4, 8."""
    res = options["attention_resolutions"]
    values = [int(r) for r in res.split(",")] if isinstance(res, str) else [int(r) for r in res]
    return tuple(int(options["image_size"]) // r for r in values)


def model_in_channels(options: Dict[str, Any]) -> int:
    """3 image channels, x2 with a low-res image (super_res), + 3 + 1 for inpainting."""
    return 3 + (3 if options["super_res"] else 0) + (4 if options["inpaint"] else 0)


def adm_timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[N] -> [N, dim] float32: cos then sin of t * max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps[:, None].float() * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))


# --------------------------------------------------------------------------- U-Net parts

class GroupNorm32(nn.GroupNorm):
    """32-group GroupNorm in float32 (GLIDE's ``normalization``); scale/shift/SiLU fused."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                silu: bool = False) -> Tensor:
        y = ops.group_norm(x.float(), 32, self.weight.float(), self.bias.float(), self.eps,
                           scale=None if scale is None else scale.float(),
                           shift=None if shift is None else shift.float(), silu=silu)
        return y.to(x.dtype)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.channels = channels
        if use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x) if hasattr(self, "op") else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.channels = channels
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class ResBlock(nn.Module):
    """norm-SiLU-(resample)-conv, + timestep embedding (scale-shift or add), norm-SiLU-conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = "up" if up else "down" if down else None
        # Index layout of GLIDE's Sequentials (norm, Identity, conv) kept for the state dict.
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.Identity(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1)
                                                             * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb_out: Tensor) -> Tensor:
        """emb_out: this block's emb_layers(emb), [B, C or 2C]."""
        h = self.in_layers[0](x, silu=True)
        h = self.in_layers[2](self._resample(h))
        x = self._resample(x)
        emb_out = emb_out.to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h, scale=scale, shift=shift, silu=True)
        else:
            h = self.out_layers[0](h + emb_out[:, :, None, None], silu=True)
        return self.skip_connection(x) + self.out_layers[3](h)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels, with the text tokens' K/V joined in front of the pixels' own."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, encoder_channels: Optional[int]):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"attention: {channels} channels are not divisible by num_head_channels "
                                 f"{num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels are not divisible into {num_heads} heads")
        self.channels, self.num_heads = channels, num_heads
        self.index = 0  # position among the model's attention blocks, set by the model
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        if encoder_channels is not None:
            self.encoder_kv = nn.Conv1d(encoder_channels, 2 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def text_kv(self, xf_out: Tensor) -> Tuple[Tensor, Tensor]:
        """[B, width, L] text features -> this block's (k, v), each [B, heads, L, head_dim]."""
        b, _, length = xf_out.shape
        kv = self.encoder_kv(xf_out).reshape(b, self.num_heads, 2, self.channels // self.num_heads, length)
        return kv[:, :, 0].transpose(-1, -2), kv[:, :, 1].transpose(-1, -2)

    def forward(self, x: Tensor, text_kv: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        b, c, height, width = x.shape
        d = c // self.num_heads
        # GLIDE's channel layout: per head, [q | k | v] of d channels each.
        qkv = self.qkv(self.norm(x).reshape(b, c, height * width)).reshape(b, self.num_heads, 3, d, height * width)
        q, k, v = (qkv[:, :, i].transpose(-1, -2) for i in range(3))  # [B, H, T, d]
        if text_kv is not None:
            k = torch.cat([text_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([text_kv[1].to(v.dtype), v], dim=2)
        h = ops.attention(q, k, v)  # [B, H, T, d]
        h = h.transpose(-1, -2).reshape(b, c, height * width)
        return x + self.proj_out(h).reshape(b, c, height, width)


class TimestepEmbedSequential(nn.Sequential):
    """GLIDE's container: ResBlocks get the embedding, attention blocks the text K/V."""

    def forward(self, x: Tensor, emb: Tensor, text: Optional["TextContext"] = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, layer.emb_layers(emb))
            elif isinstance(layer, AttentionBlock):
                x = layer(x, None if text is None else text.kv[layer.index])
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------- text transformer

class LayerNorm(nn.LayerNorm):
    """LayerNorm in float32 whatever the input dtype (GLIDE's xf.LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class MultiheadAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text transformer: xf_width {width} is not divisible by xf_heads {heads}")
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, width = x.shape
        d = width // self.heads
        # Per head [q | k | v], as GLIDE's QKVMultiheadAttention splits it; no mask (padding
        # tokens carry the learned padding embedding instead).
        qkv = self.c_qkv(x).reshape(b, n, self.heads, 3, d)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [B, H, n, d]
        h = ops.attention(q, k, v)
        return self.c_proj(h.transpose(1, 2).reshape(b, n, width))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


@dataclass
class TextContext:
    """A prompt batch's text conditioning, computed once per run.

    xf_proj: [B, 4 * model_channels], added to the timestep embedding;
    kv: per attention block (in ``AttentionBlock.index`` order), its text (k, v), each
    [B, heads, text_ctx, head_dim]. A dataclass of tensors, so classifier-free guidance
    batches two of them like any other conditioning.
    """

    xf_proj: Tensor
    kv: Tuple[Tuple[Tensor, Tensor], ...] = ()

    def __len__(self) -> int:
        return self.xf_proj.shape[0]


# --------------------------------------------------------------------------- the model

class Text2ImUNet(nn.Module):
    """GLIDE's Text2ImUNet and its super-resolution / inpainting variants in one class
    (``options["super_res"]``, ``options["inpaint"]``), with GLIDE's state-dict layout.

    forward(x, t, text, low_res=None, inpaint_image=None, inpaint_mask=None) -> [B, 6, H, W]
    with ``text = model.encode_text(tokens, mask)``; ``model(x, t, tokens=..., mask=...)``
    also works (encoding the text on every call, as GLIDE does).
    """

    def __init__(self, options: Dict[str, Any], n_vocab: int):
        super().__init__()
        options = glide_options(**options)  # fills GLIDE's defaults, rejects unknown keys
        check_glide_options(options)
        self.options = options
        mc = int(options["num_channels"])
        self.model_channels = mc
        self.super_res, self.inpaint = bool(options["super_res"]), bool(options["inpaint"])
        self.image_size = int(options["image_size"])
        self.text_ctx, self.xf_width = int(options["text_ctx"]), int(options["xf_width"])
        self.xf_padding = bool(options["xf_padding"])
        self.n_vocab = int(n_vocab)
        channel_mult = parse_channel_mult(options)
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        attention_ds = attention_downsample_rates(options)
        num_res_blocks = int(options["num_res_blocks"])
        heads, head_channels = int(options["num_heads"]), int(options["num_head_channels"])
        heads_up = heads if int(options["num_heads_upsample"]) == -1 else int(options["num_heads_upsample"])
        scale_shift, updown = bool(options["use_scale_shift_norm"]), bool(options["resblock_updown"])
        encoder_channels = self.xf_width or None
        emb = 4 * mc

        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = int(channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(model_in_channels(options), ch, 3,
                                                                             padding=1))])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: List[nn.Module] = [ResBlock(ch, emb, int(mult * mc), scale_shift)]
                ch = int(mult * mc)
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads, head_channels, encoder_channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    ResBlock(ch, emb, ch, scale_shift, down=True) if updown else Downsample(ch, True)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb, ch, scale_shift), AttentionBlock(ch, heads, head_channels, encoder_channels),
            ResBlock(ch, emb, ch, scale_shift))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb, int(mc * mult), scale_shift)]
                ch = int(mc * mult)
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads_up, head_channels, encoder_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, scale_shift, up=True) if updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.Identity(), nn.Conv2d(int(channel_mult[0] * mc),
                                                                           OUT_CHANNELS, 3, padding=1))
        if self.xf_width:
            width = self.xf_width
            self.transformer = Transformer(width, int(options["xf_layers"]), int(options["xf_heads"]))
            self.final_ln = LayerNorm(width) if options["xf_final_ln"] else None
            self.token_embedding = nn.Embedding(self.n_vocab, width)
            self.positional_embedding = nn.Parameter(torch.zeros(self.text_ctx, width))
            self.transformer_proj = nn.Linear(width, emb)
            if self.xf_padding:
                self.padding_embedding = nn.Parameter(torch.zeros(self.text_ctx, width))
        for index, block in enumerate(self.attention_blocks()):
            block.index = index

    # ------------------------------------------------------------------ text
    @property
    def dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    def attention_blocks(self) -> List[AttentionBlock]:
        return [m for m in self.modules() if isinstance(m, AttentionBlock)]

    def encode_text(self, tokens: Tensor, mask: Optional[Tensor] = None) -> TextContext:
        """tokens [B, text_ctx] (and mask [B, text_ctx], True for real tokens) -> TextContext."""
        if not self.xf_width:
            raise ValueError("this model has no text transformer (xf_width=0)")
        if tokens.dim() != 2 or tokens.shape[1] != self.text_ctx:
            raise ValueError(f"tokens must be [B, text_ctx={self.text_ctx}], got {tuple(tokens.shape)}")
        # (Meta tensors, as fastdiff.tools.triton_resources runs the model on, carry no values.)
        if not tokens.is_meta and (int(tokens.min()) < 0 or int(tokens.max()) >= self.n_vocab):
            raise ValueError(f"token ids must lie in [0, {self.n_vocab}) for this model's vocabulary")
        xf_in = self.token_embedding(tokens.long()) + self.positional_embedding[None]
        if self.xf_padding:
            if mask is None:
                raise ValueError("this model was trained with xf_padding: pass the token mask")
            if mask.shape != tokens.shape:
                raise ValueError(f"mask must be {tuple(tokens.shape)} like tokens, got {tuple(mask.shape)}")
            xf_in = torch.where(mask.to(torch.bool)[..., None], xf_in, self.padding_embedding[None])
        xf_out = self.transformer(xf_in.to(self.dtype))
        if self.final_ln is not None:
            xf_out = self.final_ln(xf_out)
        xf_proj = self.transformer_proj(xf_out[:, -1])
        xf_out = xf_out.transpose(1, 2)  # [B, width, L] for the 1x1 encoder_kv convolutions
        return TextContext(xf_proj, tuple(block.text_kv(xf_out) for block in self.attention_blocks()))

    # ------------------------------------------------------------------ forward
    def _inputs(self, x: Tensor, low_res: Optional[Tensor], inpaint_image: Optional[Tensor],
                inpaint_mask: Optional[Tensor]) -> Tensor:
        parts = [x]
        if self.inpaint:
            image = torch.zeros_like(x) if inpaint_image is None else inpaint_image.to(x.dtype)
            mask = torch.zeros_like(x[:, :1]) if inpaint_mask is None else inpaint_mask.to(x.dtype)
            parts += [image * mask, mask]
        if self.super_res:
            if low_res is None:
                raise ValueError("the super-resolution model needs low_res, the image to upsample")
            parts.append(F.interpolate(low_res.to(x.dtype), x.shape[2:], mode="bilinear", align_corners=False))
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    def forward(self, x: Tensor, timesteps: Tensor, text: Optional[TextContext] = None, *,
                tokens: Optional[Tensor] = None, mask: Optional[Tensor] = None, low_res: Optional[Tensor] = None,
                inpaint_image: Optional[Tensor] = None, inpaint_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be [B, 3, H, W], got {tuple(x.shape)}")
        factor = self.downsample_factor
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"image sides must be multiples of {factor} for this model, got {tuple(x.shape[2:])}")
        if text is None and self.xf_width:
            if tokens is None:
                raise ValueError("pass text=model.encode_text(tokens, mask) or tokens=/mask=")
            text = self.encode_text(tokens, mask)
        timesteps = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps
        if text is not None and len(text) != x.shape[0]:
            raise ValueError(f"text conditioning for {len(text)} samples, x has {x.shape[0]}")
        return self.denoise(x, timesteps, text, low_res, inpaint_image, inpaint_mask)

    def denoise(self, x: Tensor, timesteps: Tensor, text: Optional[TextContext], low_res: Optional[Tensor] = None,
                inpaint_image: Optional[Tensor] = None, inpaint_mask: Optional[Tensor] = None) -> Tensor:
        """forward's network on inputs it has checked (timesteps one per sample, or one that
        broadcasts); what the ONNX exporter traces (fastdiff/export/glide.py)."""
        emb = self.time_embed(adm_timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if text is not None:
            emb = emb + text.xf_proj.to(emb.dtype)
        h = self._inputs(x, low_res, inpaint_image, inpaint_mask).to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, text)
            skips.append(h)
        h = self.middle_block(h, emb, text)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, text)
        h = self.out[0](h.to(x.dtype), silu=True)
        return self.out[2](h.to(self.out[2].weight.dtype)).to(x.dtype)
