"""Stable Diffusion to ONNX in optimum's folder layout and names.

::

    out/model_index.json            the diffusers index (ORTStableDiffusionPipeline's class name)
    out/scheduler/, out/tokenizer/  copied from the pipeline
    out/text_encoder/model.onnx     input_ids -> last_hidden_state, pooler_output
    out/unet/model.onnx             sample, timestep, encoder_hidden_states -> out_sample
    out/vae_encoder/model.onnx      sample -> latent_parameters (the posterior's mean and log-variance)
    out/vae_decoder/model.onnx      latent_sample -> sample
    out/fastdiff_onnx.json          the manifest: opset, dtype, shapes, the error each graph was verified to

Batch, height, width and the text length are dynamic axes, unless the export is static.
"""
from __future__ import annotations

import json
import os
from typing import List

import torch
from torch import nn

from .graphs import ExportOptions, GraphSpec, traced_latent_side, write_graphs, write_index_and_manifest

GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


class _TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _UNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)


class _VaeEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        mean, logvar = self.vae.encode(sample)
        return torch.cat([mean, logvar], dim=1)


class _VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample)


def _graphs(pipe, options: ExportOptions) -> List[GraphSpec]:
    """The four graphs: traced on one shape, checked on another (on the fixed shape when static)."""
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    f = pipe.vae_scale_factor
    channels, latent = unet.config["in_channels"], vae.config["latent_channels"]
    width = text.config.hidden_size
    length = pipe.tokenizer.model_max_length
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    def ids(b, n):
        return torch.randint(0, text.config.vocab_size, (b, n), generator=g)

    # (batch, latent height, latent width) traced, then checked.
    if options.static:
        n, h, w = options.static["batch_size"], options.static["height"] // f, options.static["width"] // f
        shapes = [(n, h, w), (n, h, w)]
    else:
        side = traced_latent_side(unet)
        shapes = [(2, side, side), (3, side // 2, side)]

    def inputs(n, h, w, t):
        return dict(
            text_encoder=dict(input_ids=ids(n, length)),
            unet=dict(sample=rand(2 * n, channels, h, w), timestep=torch.tensor([t]),
                      encoder_hidden_states=rand(2 * n, length, width)),
            vae_encoder=dict(sample=rand(n, 3, h * f, w * f)),
            vae_decoder=dict(latent_sample=rand(n, latent, h, w)))

    trace, check = inputs(*shapes[0], 500.0), inputs(*shapes[1], 37.0)
    image_axes = {0: "batch_size", 2: "height", 3: "width"}
    latent_axes = {0: "batch_size", 2: "height_latent", 3: "width_latent"}
    axes = dict(
        text_encoder=({"input_ids": {0: "batch_size", 1: "sequence_length"}},
                      {"last_hidden_state": {0: "batch_size", 1: "sequence_length"}, "pooler_output": {0: "batch_size"}}),
        # one timestep for the batch, [1], as optimum feeds it
        unet=({"sample": image_axes, "timestep": {}, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"}},
              {"out_sample": image_axes}),
        vae_encoder=({"sample": image_axes}, {"latent_parameters": latent_axes}),
        vae_decoder=({"latent_sample": latent_axes}, {"sample": image_axes}))
    modules = dict(text_encoder=_TextEncoder(text), unet=_UNet(unet), vae_encoder=_VaeEncoder(vae),
                   vae_decoder=_VaeDecoder(vae))
    # Each graph's folder holds its network's config, as optimum's do; fastdiff's ONNX
    # pipeline reads its sizes from them.
    configs = dict(text_encoder=text.config.to_dict(), unet=dict(unet.config), vae_encoder=dict(vae.config),
                   vae_decoder=dict(vae.config))
    optimizer = dict(text_encoder="clip", unet="unet", vae_encoder="vae", vae_decoder="vae")
    # In float16 only the UNet, which runs every step, is float16: the VAE stays float32
    # (float16 VAEs overflow into NaNs and black images), and so does the text encoder, which
    # runs once per call and whose attention (transformers' CLIP) would take its softmax in
    # float16.
    return [GraphSpec(name, modules[name], trace[name], check[name], axes[name][0], axes[name][1],
                      keep_fp32=name != "unet", config=configs[name], optimizer_type=optimizer[name])
            for name in GRAPHS]


def check_exportable(pipe, options: ExportOptions, step) -> None:
    """ValueError, before anything is written, for a pipeline or options this exporter cannot take."""
    if pipe.dtype != torch.float32:
        raise ValueError(f"ONNX export traces a float32 pipeline (this one is {pipe.dtype}; ask for float16 "
                         f"graphs with dtype='float16'); call pipe.to(dtype=torch.float32) first")
    if pipe.device.type != "cpu":
        raise ValueError(f"ONNX export traces on the CPU (the pipeline is on {pipe.device}); call pipe.to('cpu') first")
    if options.static:
        missing = [k for k in ("batch_size", "height", "width") if k not in options.static]
        if missing:
            raise ValueError(f"a static Stable Diffusion export needs batch_size, height and width; "
                             f"missing {', '.join(missing)}")
        from ..pipelines import arguments as A

        f = pipe.vae_scale_factor
        native = pipe.unet.config["sample_size"] * f
        for name in ("height", "width"):
            A.check_image_size(f"static[{name!r}]", options.static[name], multiple=f, largest=8 * native,
                               native=native)
        if step:
            raise ValueError("step graphs are exported with dynamic shapes only; drop static or step")
    if step and options.dtype != "float32":
        raise ValueError("step graphs are exported in float32 only; drop dtype='float16' or step")
    from .step import plan_table

    for sampler, counts in (step or {}).items():
        for n in counts:  # every table's plan built (and so checked) before anything is written
            plan_table(pipe, sampler, n)


def write_tokenizer(tokenizer, folder: str) -> None:
    """save_pretrained, plus the vocab.json and merges.txt that the slow CLIPTokenizer of
    transformers 4 (which optimum's ORT pipelines pin) reads: transformers 5 writes only
    tokenizer.json, whose BPE model holds both."""
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as fh:
        model = json.load(fh)["model"]
    if not os.path.exists(os.path.join(folder, "vocab.json")):
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
            json.dump(model["vocab"], fh, ensure_ascii=False)
    if not os.path.exists(os.path.join(folder, "merges.txt")):
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
            fh.write("#version: 0.2\n")
            fh.writelines((m if isinstance(m, str) else " ".join(m)) + "\n" for m in model["merges"])


def export(pipe, out_dir: str, options: ExportOptions, *, progress=None, step=None) -> dict:
    """Write the folder (see the module docstring); returns the manifest. step: {sampler:
    [step counts]} also writes each sampler's step graph and tables (fastdiff/export/step.py)."""
    records = write_graphs(_graphs(pipe, options), out_dir, options, progress)
    write_tokenizer(pipe.tokenizer, os.path.join(out_dir, "tokenizer"))
    scheduler = os.path.join(out_dir, "scheduler")
    os.makedirs(scheduler, exist_ok=True)
    with open(os.path.join(scheduler, "scheduler_config.json"), "w") as fh:
        json.dump(pipe.scheduler_config.to_dict(), fh, indent=2)
    index = {"_class_name": "ORTStableDiffusionPipeline", "_fastdiff_family": "StableDiffusionPipeline",
             **{name: ["diffusers", "OnnxRuntimeModel"] for name in GRAPHS},
             "scheduler": ["diffusers", pipe.scheduler_config.class_name or "PNDMScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    step_graphs = []
    for sampler, counts in (step or {}).items():
        if progress:
            progress(f"exporting the {sampler} step")
        from .step import export_step

        step_graphs.append(export_step(pipe, out_dir, sampler, counts, opset=options.opset,
                                       verify_graph=options.verify))
    return write_index_and_manifest(out_dir, pipe, index, "StableDiffusionPipeline", options, records,
                                    step_graphs=step_graphs, vae_scaling_factor=pipe.vae.scaling_factor)
