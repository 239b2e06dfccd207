"""An independent restatement of GLIDE (openai/glide-text2im), used as the tests' oracle.

glide-text2im is not a dependency, so this module restates, in plain functions over a
state dict and float64 numpy schedules, what its ``model_creation.py``, ``text2im_model.py``,
``unet.py``, ``xf.py``, ``nn.py``, ``gaussian_diffusion.py``, ``respace.py`` and notebooks
do. It was written from reading that source, not copied, and shares no code with fastdiff.

- ``glide_options`` / ``glide_param_shapes`` / ``random_glide_state_dict``: checkpoints in
  GLIDE's own key layout (what ``create_model(...).state_dict()`` holds), with every
  parameter random, the layers GLIDE zero-initialises included.
- ``reference_forward``: the text-conditioned ADM U-Net (all four variants), fp32.
- ``named_betas``, ``space_timesteps``, ``SpacedDiffusionRef``, ``reference_sample``: the
  respaced Gaussian diffusion and its DDPM / DDIM loops, with float32 step arithmetic on
  coefficients gathered from float64 arrays, as GLIDE's ``_extract_into_tensor`` does.
- ``cfg_model_fn``, ``inpaint_denoised_fn``, ``quantize_low_res``: how the notebooks drive it.

Timesteps: the network and ``model_fn`` / ``cond_fn`` take ORIGINAL timesteps (0..T-1 of the
un-respaced process); the diffusion methods take RESPACED indices (0..len(use_timesteps)-1).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

GLIDE_N_VOCAB = 50257  # len(encoder.json) of GLIDE's GPT-2 BPE tokenizer
OUT_CHANNELS = 6  # eps (3 channels) + learned-range variance values (3 channels)

_BASE_OPTIONS = dict(
    image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1,
    num_head_channels=64, num_heads_upsample=-1, attention_resolutions="32,16,8", dropout=0.1,
    text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True,
    diffusion_steps=1000, noise_schedule="squaredcos_cap_v2", timestep_respacing="",
    use_scale_shift_norm=True, resblock_updown=True, use_fp16=True, cache_text_emb=False,
    inpaint=False, super_res=False,
)
_UPSAMPLER_CHANGES = dict(image_size=256, num_res_blocks=2, noise_schedule="linear", super_res=True)


def glide_options(upsampler: bool = False, **overrides) -> dict:
    """GLIDE's model_and_diffusion_defaults() (or ..._upsampler() when upsampler=True), updated."""
    options = dict(_BASE_OPTIONS)
    if upsampler:
        options.update(_UPSAMPLER_CHANGES)
    unknown = set(overrides) - set(options)
    if unknown:
        raise KeyError(f"not GLIDE options: {sorted(unknown)}")
    options.update(overrides)
    return options


# ----------------------------------------------------------------------------------------
# Architecture: one plan, read by both the state-dict builder and the forward.
# A block is a list of layers: ("conv_in", c_in, c_out), ("res", c_in, c_out, updown),
# ("attn", ch, heads), ("down", ch) / ("up", ch) (the conv resamplers, resblock_updown=False).

def channel_mult_of(options: dict) -> Tuple[int, ...]:
    size, spec = options["image_size"], options["channel_mult"]
    if spec == "":
        defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if size not in defaults:
            raise ValueError(f"no default channel_mult for image_size {size}")
        return defaults[size]
    mult = tuple(int(m) for m in spec.split(","))
    if 2 ** (len(mult) + 2) != size:  # GLIDE's own constraint for explicit multipliers
        raise ValueError(f"channel_mult {spec!r} needs image_size {2 ** (len(mult) + 2)}")
    return mult


def in_channels_of(options: dict) -> int:
    inpaint, super_res = options["inpaint"], options["super_res"]
    # x, then [image * mask, mask] for inpainting, then the upsampled low-res image
    return 3 + (4 if inpaint else 0) + (3 if super_res else 0)


def _heads(ch: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        return num_heads
    if ch % num_head_channels:
        raise ValueError(f"{ch} channels are not divisible by num_head_channels {num_head_channels}")
    return ch // num_head_channels


def unet_plan(options: dict) -> dict:
    mult = channel_mult_of(options)
    size, base, n_res = options["image_size"], options["num_channels"], options["num_res_blocks"]
    attn_rates = {size // int(r) for r in options["attention_resolutions"].split(",")}
    heads, head_ch = options["num_heads"], options["num_head_channels"]
    heads_up = heads if options["num_heads_upsample"] == -1 else options["num_heads_upsample"]
    updown = options["resblock_updown"]

    ch = first_ch = mult[0] * base
    inputs: List[list] = [[("conv_in", in_channels_of(options), ch)]]
    skip_chans = [ch]
    rate = 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            block = [("res", ch, m * base, None)]
            ch = m * base
            if rate in attn_rates:
                block.append(("attn", ch, _heads(ch, heads, head_ch)))
            inputs.append(block)
            skip_chans.append(ch)
        if level != len(mult) - 1:
            inputs.append([("res", ch, ch, "down")] if updown else [("down", ch)])
            skip_chans.append(ch)
            rate *= 2
    middle = [("res", ch, ch, None), ("attn", ch, _heads(ch, heads, head_ch)), ("res", ch, ch, None)]
    outputs: List[list] = []
    for level, m in reversed(list(enumerate(mult))):
        for i in range(n_res + 1):
            block = [("res", ch + skip_chans.pop(), m * base, None)]
            ch = m * base
            if rate in attn_rates:
                block.append(("attn", ch, _heads(ch, heads_up, head_ch)))
            if level and i == n_res:
                block.append(("res", ch, ch, "up") if updown else ("up", ch))
                rate //= 2
            outputs.append(block)
    return dict(inputs=inputs, middle=middle, outputs=outputs, out_in=ch, first_ch=first_ch)


# ----------------------------------------------------------------------------------------
# Checkpoint layout. kind: "w" (conv/linear weight), "w0" (zero-initialised in GLIDE),
# "b" (bias), "nw"/"nb" (GroupNorm/LayerNorm gain/bias), "e" (embedding tables).

def _layer_entries(prefix: str, layer: tuple, options: dict, emb_ch: int) -> list:
    kind = layer[0]
    if kind == "conv_in":
        return [(prefix + "weight", (layer[2], layer[1], 3, 3), "w"), (prefix + "bias", (layer[2],), "b")]
    if kind in ("down", "up"):
        name = "op." if kind == "down" else "conv."
        ch = layer[1]
        return [(prefix + name + "weight", (ch, ch, 3, 3), "w"), (prefix + name + "bias", (ch,), "b")]
    if kind == "res":
        _, c_in, c_out, _ = layer
        emb_out = 2 * c_out if options["use_scale_shift_norm"] else c_out
        entries = [
            (prefix + "in_layers.0.weight", (c_in,), "nw"), (prefix + "in_layers.0.bias", (c_in,), "nb"),
            (prefix + "in_layers.2.weight", (c_out, c_in, 3, 3), "w"), (prefix + "in_layers.2.bias", (c_out,), "b"),
            (prefix + "emb_layers.1.weight", (emb_out, emb_ch), "w"), (prefix + "emb_layers.1.bias", (emb_out,), "b"),
            (prefix + "out_layers.0.weight", (c_out,), "nw"), (prefix + "out_layers.0.bias", (c_out,), "nb"),
            (prefix + "out_layers.3.weight", (c_out, c_out, 3, 3), "w0"), (prefix + "out_layers.3.bias", (c_out,), "b"),
        ]
        if c_out != c_in:
            entries += [(prefix + "skip_connection.weight", (c_out, c_in, 1, 1), "w"),
                        (prefix + "skip_connection.bias", (c_out,), "b")]
        return entries
    if kind == "attn":
        ch = layer[1]
        entries = [(prefix + "norm.weight", (ch,), "nw"), (prefix + "norm.bias", (ch,), "nb"),
                   (prefix + "qkv.weight", (3 * ch, ch, 1), "w"), (prefix + "qkv.bias", (3 * ch,), "b")]
        if options["xf_width"]:
            entries += [(prefix + "encoder_kv.weight", (2 * ch, options["xf_width"], 1), "w"),
                        (prefix + "encoder_kv.bias", (2 * ch,), "b")]
        return entries + [(prefix + "proj_out.weight", (ch, ch, 1), "w0"), (prefix + "proj_out.bias", (ch,), "b")]
    raise ValueError(kind)


def _checkpoint_entries(options: dict, n_vocab: int) -> list:
    """(key, shape, kind) in GLIDE's state_dict order: the model's own Parameters, then its children."""
    plan = unet_plan(options)
    base, width, ctx = options["num_channels"], options["xf_width"], options["text_ctx"]
    emb_ch = 4 * base
    entries = []
    if width:
        entries.append(("positional_embedding", (ctx, width), "e"))
        if options["xf_padding"]:
            entries.append(("padding_embedding", (ctx, width), "e"))
    entries += [("time_embed.0.weight", (emb_ch, base), "w"), ("time_embed.0.bias", (emb_ch,), "b"),
                ("time_embed.2.weight", (emb_ch, emb_ch), "w"), ("time_embed.2.bias", (emb_ch,), "b")]
    for group, blocks in (("input_blocks", plan["inputs"]), ("output_blocks", plan["outputs"])):
        if group == "output_blocks":
            for j, layer in enumerate(plan["middle"]):
                entries += _layer_entries(f"middle_block.{j}.", layer, options, emb_ch)
        for i, block in enumerate(blocks):
            for j, layer in enumerate(block):
                entries += _layer_entries(f"{group}.{i}.{j}.", layer, options, emb_ch)
    out_in = plan["out_in"]
    entries += [("out.0.weight", (out_in,), "nw"), ("out.0.bias", (out_in,), "nb"),
                ("out.2.weight", (OUT_CHANNELS, plan["first_ch"], 3, 3), "w0"), ("out.2.bias", (OUT_CHANNELS,), "b")]
    if width:
        for i in range(options["xf_layers"]):
            p = f"transformer.resblocks.{i}."
            entries += [
                (p + "attn.c_qkv.weight", (3 * width, width), "w"), (p + "attn.c_qkv.bias", (3 * width,), "b"),
                (p + "attn.c_proj.weight", (width, width), "w"), (p + "attn.c_proj.bias", (width,), "b"),
                (p + "ln_1.weight", (width,), "nw"), (p + "ln_1.bias", (width,), "nb"),
                (p + "mlp.c_fc.weight", (4 * width, width), "w"), (p + "mlp.c_fc.bias", (4 * width,), "b"),
                (p + "mlp.c_proj.weight", (width, 4 * width), "w"), (p + "mlp.c_proj.bias", (width,), "b"),
                (p + "ln_2.weight", (width,), "nw"), (p + "ln_2.bias", (width,), "nb"),
            ]
        if options["xf_final_ln"]:
            entries += [("final_ln.weight", (width,), "nw"), ("final_ln.bias", (width,), "nb")]
        entries += [("token_embedding.weight", (n_vocab, width), "e"),
                    ("transformer_proj.weight", (emb_ch, width), "w"), ("transformer_proj.bias", (emb_ch,), "b")]
    return entries


def glide_param_shapes(options: dict, n_vocab: int = GLIDE_N_VOCAB) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the state dict GLIDE's create_model(**options) builds, in its order."""
    return {key: shape for key, shape, _ in _checkpoint_entries(options, n_vocab)}


def random_glide_state_dict(options: dict, seed: int = 0, n_vocab: int = GLIDE_N_VOCAB) -> Dict[str, Tensor]:
    """A random float32 CPU checkpoint in GLIDE's key layout; nothing is zero, so every layer counts.

    Weights are N(0, 1/fan_in) (half that std for the layers GLIDE zero-initialises), so
    activations stay O(1) through the net; norm gains ~1 +- 0.1; biases N(0, 0.05^2).
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, kind in _checkpoint_entries(options, n_vocab):
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        if kind in ("w", "w0"):
            std = (0.5 if kind == "w0" else 1.0) / math.sqrt(math.prod(shape[1:]))
            x = x * std
        elif kind == "nw":
            x = 1.0 + 0.1 * x
        elif kind == "nb":
            x = 0.1 * x
        elif kind == "b":
            x = 0.05 * x
        else:  # embedding tables
            x = 0.1 * x
        state[key] = x
    return state


# ----------------------------------------------------------------------------------------
# Forward

def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, cos half first then sin half (ADM's layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _group_norm(x: Tensor, sd: dict, prefix: str, silu: bool) -> Tensor:
    # GroupNorm32: 32 groups, eps 1e-5, evaluated in float32
    y = F.group_norm(x.float(), 32, sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-5).to(x.dtype)
    return F.silu(y) if silu else y


def _conv(x: Tensor, sd: dict, prefix: str, **kw) -> Tensor:
    w = sd[prefix + "weight"]
    conv = F.conv1d if w.dim() == 3 else F.conv2d
    return conv(x, w, sd[prefix + "bias"], **kw)


def _linear(x: Tensor, sd: dict, prefix: str) -> Tensor:
    return F.linear(x, sd[prefix + "weight"], sd[prefix + "bias"])


def _qk_scale(ch: int) -> float:
    # q and k are each scaled by ch^-1/4 before the product (GLIDE's fp16-friendly form)
    return 1 / math.sqrt(math.sqrt(ch))


def _text_encoder(sd: dict, options: dict, tokens: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """-> (projection of the last token [B, 4C], token features [B, xf_width, text_ctx])."""
    width, heads = options["xf_width"], options["xf_heads"]
    h = F.embedding(tokens.long(), sd["token_embedding.weight"]) + sd["positional_embedding"][None]
    if options["xf_padding"]:
        if mask is None:
            raise ValueError("xf_padding needs the token mask")
        h = torch.where(mask.bool()[..., None], h, sd["padding_embedding"][None])
    B, L, _ = h.shape
    head_ch = width // heads
    for i in range(options["xf_layers"]):
        p = f"transformer.resblocks.{i}."
        # no attention mask: every token (padding included) attends to every token
        a = F.layer_norm(h, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
        qkv = _linear(a, sd, p + "attn.c_qkv.").view(B, L, heads, 3 * head_ch)  # per head [q | k | v]
        q, k, v = qkv.split(head_ch, dim=-1)
        s = _qk_scale(head_ch)
        w = torch.einsum("bthc,bshc->bhts", q * s, k * s)
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)
        a = torch.einsum("bhts,bshc->bthc", w, v).reshape(B, L, width)
        h = h + _linear(a, sd, p + "attn.c_proj.")
        m = F.layer_norm(h, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
        h = h + _linear(F.gelu(_linear(m, sd, p + "mlp.c_fc.")), sd, p + "mlp.c_proj.")
    if options["xf_final_ln"]:
        h = F.layer_norm(h, (width,), sd["final_ln.weight"], sd["final_ln.bias"], eps=1e-5)
    return _linear(h[:, -1], sd, "transformer_proj."), h.permute(0, 2, 1)


def _resblock(sd: dict, p: str, x: Tensor, emb: Tensor, layer: tuple, scale_shift: bool) -> Tensor:
    _, c_in, c_out, updown = layer
    h = _group_norm(x, sd, p + "in_layers.0.", silu=True)
    if updown == "up":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    elif updown == "down":
        h, x = F.avg_pool2d(h, 2, 2), F.avg_pool2d(x, 2, 2)
    h = _conv(h, sd, p + "in_layers.2.", padding=1)
    e = _linear(F.silu(emb), sd, p + "emb_layers.1.")[..., None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = F.silu(_group_norm(h, sd, p + "out_layers.0.", silu=False) * (1 + scale) + shift)
    else:
        h = _group_norm(h + e, sd, p + "out_layers.0.", silu=True)
    h = _conv(h, sd, p + "out_layers.3.", padding=1)  # dropout is the identity at inference
    skip = _conv(x, sd, p + "skip_connection.") if c_out != c_in else x
    return skip + h


def _attention(sd: dict, p: str, x: Tensor, heads: int, text: Optional[Tensor]) -> Tensor:
    B, C, H, W = x.shape
    qkv = _conv(_group_norm(x, sd, p + "norm.", silu=False).reshape(B, C, H * W), sd, p + "qkv.")
    ch = C // heads
    # channels are grouped per head as [q | k | v] (and [k | v] for the text projection)
    q, k, v = qkv.reshape(B * heads, 3 * ch, H * W).split(ch, dim=1)
    if text is not None:
        ek, ev = _conv(text, sd, p + "encoder_kv.").reshape(B * heads, 2 * ch, -1).split(ch, dim=1)
        k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)  # text keys come first
    s = _qk_scale(ch)
    w = torch.einsum("bct,bcs->bts", q * s, k * s)
    w = torch.softmax(w.float(), dim=-1).to(w.dtype)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(B, C, H * W)
    return x + _conv(a, sd, p + "proj_out.").reshape(B, C, H, W)


def _run_block(sd, prefix, block, h, emb, text, options):
    for j, layer in enumerate(block):
        p, kind = f"{prefix}{j}.", layer[0]
        if kind == "conv_in":
            h = _conv(h, sd, p, padding=1)
        elif kind == "res":
            h = _resblock(sd, p, h, emb, layer, options["use_scale_shift_norm"])
        elif kind == "attn":
            h = _attention(sd, p, h, layer[2], text)
        elif kind == "down":
            h = _conv(h, sd, p + "op.", stride=2, padding=1)
        else:  # "up"
            h = _conv(F.interpolate(h, scale_factor=2, mode="nearest"), sd, p + "conv.", padding=1)
    return h


def reference_forward(state_dict: dict, options: dict, x: Tensor, timesteps: Tensor, tokens: Optional[Tensor],
                      mask: Optional[Tensor], low_res: Optional[Tensor] = None, inpaint_image: Optional[Tensor] = None,
                      inpaint_mask: Optional[Tensor] = None) -> Tensor:
    """GLIDE's Text2ImUNet family, fp32: x [B,3,H,W], ORIGINAL timesteps [B] -> [B, 6, H, W].

    tokens [B, text_ctx] int, mask [B, text_ctx] bool (True = real token); low_res
    [B,3,h,w] for super_res; inpaint_image [B,3,H,W] and inpaint_mask [B,1,H,W] for
    inpaint (zeros when left out, as GLIDE does).
    """
    sd = state_dict
    parts = [x]
    if options["inpaint"]:
        image = torch.zeros_like(x) if inpaint_image is None else inpaint_image
        imask = torch.zeros_like(x[:, :1]) if inpaint_mask is None else inpaint_mask
        parts += [image * imask, imask]
    if options["super_res"]:
        parts.append(F.interpolate(low_res, x.shape[2:], mode="bilinear", align_corners=False))
    h = torch.cat(parts, dim=1) if len(parts) > 1 else x

    emb = _linear(timestep_embedding(timesteps, options["num_channels"]), sd, "time_embed.0.")
    emb = _linear(F.silu(emb), sd, "time_embed.2.")
    text = None
    if options["xf_width"]:
        proj, text = _text_encoder(sd, options, tokens, mask)
        emb = emb + proj

    plan = unet_plan(options)
    skips = []
    for i, block in enumerate(plan["inputs"]):
        h = _run_block(sd, f"input_blocks.{i}.", block, h, emb, text, options)
        skips.append(h)
    h = _run_block(sd, "middle_block.", plan["middle"], h, emb, text, options)
    for i, block in enumerate(plan["outputs"]):
        h = _run_block(sd, f"output_blocks.{i}.", block, torch.cat([h, skips.pop()], dim=1), emb, text, options)
    return _conv(_group_norm(h, sd, "out.0.", silu=True), sd, "out.2.", padding=1)


# ----------------------------------------------------------------------------------------
# Diffusion (float64 schedules, float32 step arithmetic)

def named_betas(name: str, T: int) -> np.ndarray:
    if name == "linear":
        scale = 1000 / T  # Ho et al.'s 1e-4..0.02 at T=1000, stretched to other lengths
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)])
    raise ValueError(f"unknown beta schedule {name!r}")


def space_timesteps(T: int, section_counts: Union[str, int, Sequence[int]]) -> set:
    """The original timesteps kept: "ddimN" (an even integer stride), "fast27", or per-section counts."""
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, T):
                if len(range(0, T, stride)) == want:
                    return set(range(0, T, stride))
            raise ValueError(f"no integer stride gives {want} of {T} steps")
        if section_counts == "fast27":
            steps = space_timesteps(T, "10,10,3,2,2")
            steps.remove(T - 1)  # the very noisiest step is swapped for T-3 against DDIM artifacts
            steps.add(T - 3)
            return steps
        section_counts = [int(c) for c in section_counts.split(",")]
    n = len(section_counts)
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = T // n + (1 if i < T % n else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride  # accumulated (not j * stride): the float sums decide the rounding
        start += size
    return set(kept)


def _gather(arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """arr[t] as float32, shaped [B, 1, ...] to broadcast against `like`."""
    vals = torch.from_numpy(arr)[t.cpu().long()].float().to(like.device)
    return vals.view(-1, *([1] * (like.dim() - 1)))


class SpacedDiffusionRef:
    """GLIDE's SpacedDiffusion: the kept steps' betas recomputed from alphas_cumprod, and derived arrays."""

    def __init__(self, betas: np.ndarray, use_timesteps: Iterable[int]):
        base_betas = np.asarray(betas, dtype=np.float64)
        self.original_num_steps = len(base_betas)
        self.base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        keep = {int(t) for t in use_timesteps}
        self.timestep_map = [i for i in range(self.original_num_steps) if i in keep]
        kept = self.base_alphas_cumprod[self.timestep_map]
        self.betas = 1.0 - kept / np.append(1.0, kept[:-1])
        self.num_timesteps = len(self.betas)

        b = self.betas
        alphas = 1.0 - b
        ac = self.alphas_cumprod = np.cumprod(alphas)
        acp = self.alphas_cumprod_prev = np.append(1.0, ac[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.posterior_variance = b * (1.0 - acp) / (1.0 - ac)
        # the posterior variance is 0 at index 0; its log borrows index 1's value there
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.log_betas = np.log(b)
        self.posterior_mean_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)

    def original_timesteps(self, t_index: Tensor) -> Tensor:
        return torch.tensor(self.timestep_map, dtype=torch.long, device=t_index.device)[t_index.long()]

    def _x0_from_eps(self, x, t, eps):
        return _gather(self.sqrt_recip_alphas_cumprod, t, x) * x - _gather(self.sqrt_recipm1_alphas_cumprod, t, x) * eps

    def _eps_from_x0(self, x, t, x0):
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x) * x - x0) / _gather(self.sqrt_recipm1_alphas_cumprod, t, x)

    def _posterior_mean(self, x0, x, t):
        return _gather(self.posterior_mean_coef1, t, x) * x0 + _gather(self.posterior_mean_coef2, t, x) * x

    def p_mean_variance(self, model_output: Tensor, x: Tensor, t_index: Tensor, clip_denoised: bool = True,
                        denoised_fn: Optional[Callable[[Tensor], Tensor]] = None) -> dict:
        """model_output [B, 2C, ...] = (eps, v in [-1, 1]); the log variance interpolates
        posterior_log_variance_clipped (v = -1) to log(beta) (v = +1)."""
        C = x.shape[1]
        eps, v = torch.split(model_output, C, dim=1)
        min_log = _gather(self.posterior_log_variance_clipped, t_index, x)
        max_log = _gather(self.log_betas, t_index, x)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = self._x0_from_eps(x, t_index, eps)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        return dict(mean=self._posterior_mean(x0, x, t_index), variance=torch.exp(log_variance),
                    log_variance=log_variance, pred_xstart=x0)

    def p_sample(self, model_output: Tensor, x: Tensor, t_index: Tensor, noise: Optional[Tensor],
                 cond_grad: Optional[Tensor] = None, clip_denoised: bool = True,
                 denoised_fn: Optional[Callable] = None) -> dict:
        """Ancestral DDPM step; cond_grad shifts the mean by variance * grad (Sohl-Dickstein et al.)."""
        out = self.p_mean_variance(model_output, x, t_index, clip_denoised, denoised_fn)
        mean = out["mean"]
        if cond_grad is not None:
            mean = mean.float() + out["variance"] * cond_grad.float()
        noise = torch.zeros_like(x) if noise is None else noise
        nonzero = (t_index != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return dict(sample=mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise, pred_xstart=out["pred_xstart"])

    def ddim_sample(self, model_output: Tensor, x: Tensor, t_index: Tensor, noise: Optional[Tensor], eta: float = 0.0,
                    clip_denoised: bool = True, denoised_fn: Optional[Callable] = None,
                    cond_grad: Optional[Tensor] = None) -> dict:
        """DDIM (Song et al. eq. 12); cond_grad shifts the score: eps - sqrt(1 - alpha_bar) * grad."""
        out = self.p_mean_variance(model_output, x, t_index, clip_denoised, denoised_fn)
        x0 = out["pred_xstart"]
        alpha_bar = _gather(self.alphas_cumprod, t_index, x)
        if cond_grad is not None:
            eps = self._eps_from_x0(x, t_index, x0) - (1 - alpha_bar).sqrt() * cond_grad
            x0 = self._x0_from_eps(x, t_index, eps)  # not clipped again, as in GLIDE
        eps = self._eps_from_x0(x, t_index, x0)
        alpha_bar_prev = _gather(self.alphas_cumprod_prev, t_index, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        noise = torch.zeros_like(x) if noise is None else noise
        nonzero = (t_index != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return dict(sample=mean + nonzero * sigma * noise, pred_xstart=x0)


def diffusion_from_options(options: dict) -> SpacedDiffusionRef:
    """create_gaussian_diffusion: the named schedule, respaced by timestep_respacing ("" keeps all)."""
    T = options["diffusion_steps"]
    respacing = options["timestep_respacing"] or [T]
    return SpacedDiffusionRef(named_betas(options["noise_schedule"], T), space_timesteps(T, respacing))


def reference_sample(model_fn: Callable[[Tensor, Tensor], Tensor], shape: Sequence[int], diffusion: SpacedDiffusionRef,
                     noises: Sequence[Optional[Tensor]], sampler: str = "ddpm", clip_denoised: bool = True,
                     denoised_fn: Optional[Callable] = None, cond_fn: Optional[Callable] = None, eta: float = 0.0,
                     x_T: Optional[Tensor] = None) -> Tensor:
    """p_sample_loop ("ddpm") or ddim_sample_loop ("ddim") with injected noise.

    noises[k] is the draw of the k-th step (k = 0 is the noisiest, respaced index
    num_timesteps-1); when x_T is None, noises[0] is x_T and the step draws follow, so
    len(noises) is num_timesteps (+1). model_fn(x, t) and cond_fn(x, t) get ORIGINAL
    timesteps (int64 [B]); model_fn returns [B, 2C, ...], cond_fn a gradient like x.
    Runs under no_grad like GLIDE's loops (a cond_fn must enable grad itself).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}")
    noises = list(noises)
    if x_T is None:
        x_T, noises = noises[0], noises[1:]
    if len(noises) != diffusion.num_timesteps:
        raise ValueError(f"need {diffusion.num_timesteps} step noises, got {len(noises)}")
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    x = x_T
    with torch.no_grad():
        for k, i in enumerate(reversed(range(diffusion.num_timesteps))):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            t_orig = diffusion.original_timesteps(t)
            out = model_fn(x, t_orig)
            grad = cond_fn(x, t_orig) if cond_fn is not None else None
            if sampler == "ddpm":
                step = diffusion.p_sample(out, x, t, noises[k], grad, clip_denoised, denoised_fn)
            else:
                step = diffusion.ddim_sample(out, x, t, noises[k], eta, clip_denoised, denoised_fn, grad)
            x = step["sample"]
    return x


# ----------------------------------------------------------------------------------------
# How the notebooks drive it

def cfg_model_fn(model: Callable[[Tensor, Tensor], Tensor], guidance_scale: float) -> Callable:
    """Classifier-free guidance over a batch [cond half; uncond half] (model sees both halves
    of the FIRST half's x). Only the eps channels are combined; each half keeps its own
    variance channels. The first half of the result is what counts."""
    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half], dim=0), t)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)
    return model_fn


def inpaint_denoised_fn(inpaint_image: Tensor, inpaint_mask: Tensor) -> Callable[[Tensor], Tensor]:
    """Paste the known pixels into pred_xstart (applied before clipping)."""
    return lambda x0: x0 * (1 - inpaint_mask) + inpaint_image * inpaint_mask


def quantize_low_res(samples: Tensor) -> Tensor:
    """The base samples as the upsampler sees them: rounded to 8-bit levels in [-1, 1]."""
    return ((samples + 1) * 127.5).round() / 127.5 - 1
