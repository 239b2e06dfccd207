"""GLIDE to ONNX: the base model's (and the upsampler's) text transformer and U-Net.

::

    out/model_index.json                    OnnxGlidePipeline (family GlidePipeline)
    out/tokenizer/                          GLIDE's BPE: encoder.json + vocab.bpe
    out/text_encoder/model.onnx             tokens, mask -> xf_proj, k_0, v_0, ..., k_{n-1}, v_{n-1}
    out/unet/model.onnx                     sample, timestep, xf_proj, k_0, v_0, ... [, inpaint_image,
                                            inpaint_mask] -> out_sample (eps + learned variance, 6 channels)
    out/upsampler_text_encoder/model.onnx   as text_encoder, for the upsampler (when loaded)
    out/upsampler_unet/model.onnx           as unet, with low_res before the inpainting inputs
    out/fastdiff_onnx.json                  the manifest

The text transformer runs once per prompt batch and hands the U-Net its TextContext
flattened: ``xf_proj`` (added to the timestep embedding), then each attention block's text
keys and values, ``k_i``, ``v_i``, [B, heads, text_ctx, head_dim], in the model's
``attention_blocks()`` order (AttentionBlock.index). ``timestep`` is one value per sample
([B], float32: GLIDE's samplers pass per-sample timesteps, and the sigma samplers'
fall between the integers). Each unet/config.json holds the model's GLIDE options, each
text_encoder/config.json its vocabulary and the output order.

Only the batch is a dynamic axis (the U-Nets' sizes are their checkpoints'); the guided base
U-Net takes 2N, conditional half first. The noised CLIP is not exported: CLIP guidance
differentiates through it, which graphs without gradients cannot, so the ONNX pipeline
refuses clip_guidance_scale; the manifest records that.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from .graphs import ExportOptions, GraphSpec, _Cast, write_graphs, write_index_and_manifest

CLIP_NOT_EXPORTED = ("not exported: CLIP guidance differentiates through the noised CLIP, which ONNX graphs "
                     "cannot; the ONNX pipeline refuses clip_guidance_scale")


def text_output_names(model) -> List[str]:
    """The text encoder's outputs in order: xf_proj, then k_i, v_i per attention block."""
    return ["xf_proj"] + [f"{kv}_{i}" for i in range(len(model.attention_blocks())) for kv in ("k", "v")]


def unet_input_names(model) -> List[str]:
    """The U-Net's inputs in order: sample, timestep, the text outputs, [low_res], [inpaint_image, inpaint_mask]."""
    return (["sample", "timestep"] + text_output_names(model) + (["low_res"] if model.super_res else [])
            + (["inpaint_image", "inpaint_mask"] if model.inpaint else []))


# The two graph modules restate the bodies of Text2ImUNet.encode_text and forward from the
# model's own layers, without their argument checks, which torch.export cannot trace with a
# dynamic batch: encode_text checks the token ids' range with int(tokens.min()) (data-dependent),
# and forward compares len(text) with the batch, and len() turns the symbolic batch into a
# Python int, which fixes it. The ONNX loader makes those checks before running a graph, and
# tests/test_export_onnx_glide.py holds the graphs to the models' own encode_text and forward.

class _TextEncoder(torch.nn.Module):
    """tokens, mask -> xf_proj, k_0, v_0, ... (Text2ImUNet.encode_text, flattened)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask):
        m = self.model
        xf_in = m.token_embedding(tokens) + m.positional_embedding[None]
        if m.xf_padding:
            xf_in = torch.where(mask.to(torch.bool)[..., None], xf_in, m.padding_embedding[None])
        xf_out = m.transformer(xf_in.to(m.dtype))
        if m.final_ln is not None:
            xf_out = m.final_ln(xf_out)
        xf_proj = m.transformer_proj(xf_out[:, -1])
        xf_out = xf_out.transpose(1, 2)
        return (xf_proj,) + tuple(t for block in m.attention_blocks() for t in block.text_kv(xf_out))


class _UNet(_Cast):
    """The inputs of unet_input_names -> out_sample (Text2ImUNet.denoise on a TextContext).
    Its forward takes them as *args, since their number follows the model's attention
    blocks; graphs.export_graph gives a variadic forward its dynamic axes for _Cast modules
    only, hence the base class (whose casts are unused: write_graph wraps this module in a
    _Cast of its own for float16)."""

    def __init__(self, model):
        super().__init__(model, torch.float32, torch.float32)
        self.blocks = len(model.attention_blocks())

    def forward(self, *inputs):
        from ..models.adm_unet import TextContext

        m = self.module
        x, timesteps, xf_proj = inputs[:3]
        kv = inputs[3:3 + 2 * self.blocks]
        rest = list(inputs[3 + 2 * self.blocks:])
        low_res = rest.pop(0) if m.super_res else None
        image, mask = rest if m.inpaint else (None, None)
        text = TextContext(xf_proj, tuple((kv[2 * i], kv[2 * i + 1]) for i in range(self.blocks)))
        return m.denoise(x, timesteps, text, low_res, image, mask)


def _stages(pipe) -> List[Tuple[str, object]]:
    """(graph name prefix, model): the base, then the upsampler when one is loaded."""
    return [("", pipe.base)] + ([("upsampler_", pipe.upsampler)] if pipe.upsampler is not None else [])


def _graphs(pipe, options: ExportOptions) -> List[GraphSpec]:
    """Per stage, the text encoder and the U-Net: traced on one batch, checked on another
    (on the fixed batch when static)."""
    g = torch.Generator().manual_seed(0)
    n = options.static["batch_size"] if options.static else None
    specs = []
    for prefix, model in _stages(pipe):
        size, ctx = model.image_size, model.text_ctx
        # (text encoder batch, U-Net batch): the guided base U-Net takes [cond; uncond].
        guided = 2 if prefix == "" else 1
        batches = [(n, guided * n)] * 2 if n else [(2, 2), (3, 3)]

        def text_inputs(b):
            lengths = torch.randint(0, ctx + 1, (b, 1), generator=g)
            return dict(tokens=torch.randint(0, model.n_vocab, (b, ctx), generator=g),
                        mask=torch.arange(ctx)[None] < lengths)

        def unet_inputs(b):
            with torch.no_grad():
                text = model.encode_text(**text_inputs(b))
            inputs = dict(sample=torch.randn(b, 3, size, size, generator=g),
                          timestep=torch.rand(b, generator=g) * (int(model.options["diffusion_steps"]) - 1),
                          # clones: the K/V are views, whose bases torch.export would trace too
                          **dict(zip(text_output_names(model),
                                     [t.clone() for t in (text.xf_proj, *(t for kv in text.kv for t in kv))])))
            if model.super_res:
                low = pipe.base.image_size
                inputs["low_res"] = torch.rand(b, 3, low, low, generator=g) * 2 - 1
            if model.inpaint:
                inputs["inpaint_image"] = torch.rand(b, 3, size, size, generator=g) * 2 - 1
                inputs["inpaint_mask"] = (torch.rand(b, 1, size, size, generator=g) > 0.5).float()
            return inputs

        text_trace, text_check = (text_inputs(b) for b, _ in batches)
        unet_trace, unet_check = (unet_inputs(b) for _, b in batches)
        batch = {0: "batch_size"}
        text_config = dict(n_vocab=model.n_vocab, text_ctx=ctx, xf_width=model.xf_width,
                           outputs=text_output_names(model))
        # The text encoder runs once per call: float32 even in a float16 export, as SD's.
        specs.append(GraphSpec(f"{prefix}text_encoder", _TextEncoder(model), text_trace, text_check,
                               {name: batch for name in text_trace}, {name: batch for name in text_config["outputs"]},
                               keep_fp32=True, config=text_config))
        specs.append(GraphSpec(f"{prefix}unet", _UNet(model), unet_trace, unet_check,
                               {name: batch for name in unet_trace}, {"out_sample": batch},
                               config=dict(model.options)))
    return specs


def check_exportable(pipe, options: ExportOptions, step) -> None:
    """ValueError, before anything is written, for a pipeline or options this exporter cannot take."""
    if step:
        raise ValueError("step graphs are Stable Diffusion's; GLIDE exports its text transformers and U-Nets "
                         "only: drop step")
    if options.optimize:
        raise ValueError(f"optimize={options.optimize!r}: ONNX Runtime's transformer optimiser has no fusions for "
                         f"GLIDE's graphs; export without optimize")
    for stage, model in (("base", pipe.base), ("upsampler", pipe.upsampler)):
        if model is None:
            continue
        dtype, device = model.dtype, next(model.parameters()).device
        if dtype != torch.float32:
            raise ValueError(f"ONNX export traces a float32 pipeline (the {stage} is {dtype}; ask for float16 "
                             f"graphs with dtype='float16'); call pipe.to(dtype=torch.float32) first")
        if device.type != "cpu":
            raise ValueError(f"ONNX export traces on the CPU (the {stage} is on {device}); call pipe.to('cpu') first")
        if not model.xf_width:
            raise ValueError(f"the GLIDE {stage} has no text transformer (xf_width=0), which the pipeline and "
                             f"its export need")
    if options.static:
        _check_static(pipe, options.static)


def _check_static(pipe, static: Dict[str, int]) -> None:
    if "batch_size" not in static:
        raise ValueError("a static GLIDE export needs batch_size (the images per call)")
    size = (pipe.upsampler or pipe.base).image_size
    for name in ("height", "width"):
        if name in static and static[name] != size:
            made = (f"the base makes {pipe.base.image_size} px, the upsampler {size} px" if pipe.upsampler
                    else "the base model's size")
            raise ValueError(f"static[{name!r}] is {static[name]}, but GLIDE's sizes are fixed: this pipeline "
                             f"outputs {size} px ({made}); give {size} or leave it out")


def write_tokenizer(tokenizer, folder: str) -> None:
    """GLIDE's BPE files as glide-text2im ships them (GlideTokenizer.from_folder reads them):
    encoder.json (token -> id) and vocab.bpe (a version header, then the merges by rank)."""
    import json

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "encoder.json"), "w", encoding="utf-8") as fh:
        json.dump(tokenizer.encoder, fh, ensure_ascii=False)
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    with open(os.path.join(folder, "vocab.bpe"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def export(pipe, out_dir: str, options: ExportOptions, *, progress=None, step=None) -> dict:
    """Write the folder (see the module docstring); returns the manifest."""
    records = write_graphs(_graphs(pipe, options), out_dir, options, progress)
    write_tokenizer(pipe.tokenizer, os.path.join(out_dir, "tokenizer"))
    index = {"_class_name": "OnnxGlidePipeline", "_fastdiff_family": "GlidePipeline",
             **{r.name: ["fastdiff", "OnnxRuntimeModel"] for r in records},
             "tokenizer": ["fastdiff", "GlideTokenizer"]}
    clip: Optional[str] = CLIP_NOT_EXPORTED if pipe.clip is not None else None
    return write_index_and_manifest(out_dir, pipe, index, "GlidePipeline", options, records,
                                    upsampler=pipe.upsampler is not None, inpaint=bool(pipe.inpaint), clip=clip)
