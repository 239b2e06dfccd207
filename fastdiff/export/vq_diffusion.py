"""VQ-Diffusion to ONNX: the CLIP text encoder, the discrete transformer, the VQ-VAE decoder.

::

    out/model_index.json                 OnnxVQDiffusionPipeline (family VQDiffusionPipeline)
    out/tokenizer/, out/scheduler/       the CLIP tokenizer, the VQDiffusionScheduler config
    out/text_encoder/model.onnx          input_ids -> last_hidden_state, pooler_output
    out/transformer/model.onnx           tokens (int64 [B, N]), timestep (int64 [1]), encoder_hidden_states
                                         -> log_probs [B, K - 1, N], log p(x0 | x_t)
    out/vqvae_decoder/model.onnx         tokens (int64 [B, N]) -> sample [B, 3, H, W]
    out/learned_classifier_free_sampling_embeddings/
                                         the learned null-text embedding, in diffusers' own layout
                                         (config.json + safetensors), so the loader reads it as it
                                         reads a diffusers folder's; learnable=false when the model
                                         embeds "" instead
    out/fastdiff_onnx.json               the manifest

The batch (the guided transformer takes 2N, unconditional half first) and the text length are
dynamic axes unless the export is static; the token grid, and so N and the image size, are
the model's. ``timestep`` is one value for the whole batch, as the sampler passes it.

The transformer's log-softmax is written as it runs in PyTorch: logits cast to float64,
LogSoftmax in float64 (ONNX Runtime's CPU kernel takes doubles), then float32, so the graph
and the module differ only by float32's rounding of the layers before it (graphs.verify's
bound; no extra term for the softmax). The VQ-VAE decoder stays float32 in a float16 export
(fp16 VAEs overflow); so does the text encoder, which runs once per call and whose attention
(transformers' CLIP) would take its softmax in float16, as Stable Diffusion's.
"""
from __future__ import annotations

import json
import os
from typing import List

import torch
from torch import nn

from .graphs import ExportOptions, GraphSpec, write_graphs, write_index_and_manifest
from .stable_diffusion import _TextEncoder

GRAPHS = ("text_encoder", "transformer", "vqvae_decoder")
NULL_EMBEDDINGS = "learned_classifier_free_sampling_embeddings"


class _Transformer(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, tokens, timestep, encoder_hidden_states):
        return self.transformer(tokens, encoder_hidden_states=encoder_hidden_states, timestep=timestep)


class _VQVAEDecoder(nn.Module):
    """VQModel.decode_tokens without its token range check, which reads the tokens' values
    (int(tokens.min())) and so cannot be traced; the ONNX loader makes it before the graph runs."""

    def __init__(self, vqvae, height: int, width: int):
        super().__init__()
        self.vqvae, self.height, self.width = vqvae, height, width

    def forward(self, tokens):
        v = self.vqvae
        return v.decoder(v.post_quant_conv(v.quantize.lookup(tokens, self.height, self.width)))


def _graphs(pipe, options: ExportOptions) -> List[GraphSpec]:
    """The three graphs: traced on one batch, checked on another (the same when static)."""
    transformer, text = pipe.transformer, pipe.text_encoder
    h, w, K = transformer.height, transformer.width, transformer.num_vector_embeds
    length, width = pipe.tokenizer.model_max_length, text.config.hidden_size
    g = torch.Generator().manual_seed(0)
    n = options.static["batch_size"] if options.static else None
    # (images, text length) traced, then checked; a shorter text exercises the length axis.
    shapes = [(n, length)] * 2 if n else [(2, length), (3, max(1, length // 2))]

    def inputs(b, L, t):
        tokens = torch.randint(0, K, (2 * b, h * w), generator=g)  # mask class K - 1 included
        return dict(
            text_encoder=dict(input_ids=torch.randint(0, text.config.vocab_size, (b, L), generator=g)),
            transformer=dict(tokens=tokens, timestep=torch.tensor([t]),
                             encoder_hidden_states=torch.randn(2 * b, L, width, generator=g)),
            vqvae_decoder=dict(tokens=torch.randint(0, K - 1, (b, h * w), generator=g)))

    last = transformer.num_timesteps - 1
    trace, check = inputs(*shapes[0], last), inputs(*shapes[1], last // 3)
    batch = {0: "batch_size"}
    text_axes = {0: "batch_size", 1: "sequence_length"}
    axes = dict(
        text_encoder=({"input_ids": text_axes}, {"last_hidden_state": text_axes, "pooler_output": batch}),
        transformer=({"tokens": batch, "timestep": {}, "encoder_hidden_states": text_axes}, {"log_probs": batch}),
        vqvae_decoder=({"tokens": batch}, {"sample": batch}))
    modules = dict(text_encoder=_TextEncoder(text), transformer=_Transformer(transformer),
                   vqvae_decoder=_VQVAEDecoder(pipe.vqvae, h, w))
    configs = dict(text_encoder=text.config.to_dict(), transformer=dict(transformer.config),
                   vqvae_decoder=dict(pipe.vqvae.config))
    return [GraphSpec(name, modules[name], trace[name], check[name], axes[name][0], axes[name][1],
                      keep_fp32=name != "transformer", config=configs[name]) for name in GRAPHS]


def check_exportable(pipe, options: ExportOptions, step) -> None:
    """ValueError, before anything is written, for a pipeline or options this exporter cannot take."""
    if step:
        raise ValueError("step graphs are Stable Diffusion's; VQ-Diffusion exports its text encoder, transformer "
                         "and VQ-VAE decoder only: drop step")
    if pipe.dtype != torch.float32:
        raise ValueError(f"ONNX export traces a float32 pipeline (this one is {pipe.dtype}; ask for float16 "
                         f"graphs with dtype='float16'); call pipe.to(dtype=torch.float32) first")
    if pipe.device.type != "cpu":
        raise ValueError(f"ONNX export traces on the CPU (the pipeline is on {pipe.device}); call pipe.to('cpu') first")
    text, transformer = pipe.text_encoder, pipe.transformer
    if not hasattr(getattr(text, "config", None), "to_dict"):
        raise ValueError(f"the VQ-Diffusion text encoder must be a CLIP text transformer (its config is "
                         f"written beside the graph), got {type(text).__name__}")
    hidden, cross = text.config.hidden_size, transformer.config["cross_attention_dim"]
    if hidden != cross:
        raise ValueError(f"the text encoder's hidden_size {hidden} is not the transformer's cross_attention_dim "
                         f"{cross}; the exported graphs could not run together")
    if pipe.null_embeddings is not None and tuple(pipe.null_embeddings.shape) != (pipe.tokenizer.model_max_length,
                                                                                   hidden):
        raise ValueError(f"the learned null embedding has shape {tuple(pipe.null_embeddings.shape)}, but the "
                         f"prompts embed to {(pipe.tokenizer.model_max_length, hidden)}")
    if options.static:
        _check_static(pipe, options.static)


def _check_static(pipe, static) -> None:
    if "batch_size" not in static:
        raise ValueError("a static VQ-Diffusion export needs batch_size (the images per call)")
    for name, size in zip(("height", "width"), pipe.image_size):
        if name in static and static[name] != size:
            raise ValueError(f"static[{name!r}] is {static[name]}, but VQ-Diffusion's image size is fixed by its "
                             f"token grid: this model makes {pipe.image_size[0]}x{pipe.image_size[1]} px; give "
                             f"{size} or leave it out")


def write_null_embeddings(pipe, folder: str) -> None:
    """The learned null-text embedding as diffusers saves it (config.json, then one safetensors
    tensor named 'embeddings'), or learnable=false when the pipeline embeds "" instead."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    null = pipe.null_embeddings
    config = {"learnable": null is not None}
    if null is not None:
        config.update(length=int(null.shape[0]), hidden_size=int(null.shape[1]))
        save_file({"embeddings": null.detach().float().cpu().contiguous()},
                  os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


def export(pipe, out_dir: str, options: ExportOptions, *, progress=None, step=None) -> dict:
    """Write the folder (see the module docstring); returns the manifest."""
    from dataclasses import asdict

    records = write_graphs(_graphs(pipe, options), out_dir, options, progress)
    pipe.tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    scheduler = os.path.join(out_dir, "scheduler")
    os.makedirs(scheduler, exist_ok=True)
    with open(os.path.join(scheduler, "scheduler_config.json"), "w") as fh:
        json.dump({"_class_name": "VQDiffusionScheduler", **asdict(pipe.scheduler_config)}, fh, indent=2)
    write_null_embeddings(pipe, os.path.join(out_dir, NULL_EMBEDDINGS))
    index = {"_class_name": "OnnxVQDiffusionPipeline", "_fastdiff_family": "VQDiffusionPipeline",
             **{name: ["fastdiff", "OnnxRuntimeModel"] for name in GRAPHS},
             "scheduler": ["diffusers", "VQDiffusionScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
             NULL_EMBEDDINGS: ["fastdiff", "LearnedClassifierFreeSamplingEmbeddings"]}
    return write_index_and_manifest(out_dir, pipe, index, "VQDiffusionPipeline", options, records,
                                    learned_null_embeddings=pipe.null_embeddings is not None)
