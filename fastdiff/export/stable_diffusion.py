"""Stable Diffusion to ONNX in optimum's folder layout and names.

::

    out/model_index.json            the diffusers index (ORTStableDiffusionPipeline's class name)
    out/scheduler/, out/tokenizer/  copied from the pipeline
    out/text_encoder/model.onnx     input_ids -> last_hidden_state, pooler_output
    out/unet/model.onnx             sample, timestep, encoder_hidden_states -> out_sample
    out/vae_encoder/model.onnx      sample -> latent_parameters (the posterior's mean and log-variance)
    out/vae_decoder/model.onnx      latent_sample -> sample
    out/fastdiff_onnx.json          the manifest: opset, dtype, shapes, the error each graph was verified to

Batch, height, width and the text length are dynamic axes.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import List

import torch
from torch import nn

from .graphs import DEFAULT_OPSET, GraphRecord, export_graph, verify

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


def _graphs(pipe):
    """(name, module, trace inputs, check inputs (another shape), input axes, output names and axes)."""
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    f = pipe.vae_scale_factor
    channels, latent = unet.config["in_channels"], vae.config["latent_channels"]
    width = text.config.hidden_size
    length = pipe.tokenizer.model_max_length
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    ids = lambda b, n: torch.randint(0, text.config.vocab_size, (b, n), generator=g)  # noqa: E731
    image_axes = {0: "batch_size", 2: "height", 3: "width"}
    return [
        ("text_encoder", _TextEncoder(text), dict(input_ids=ids(2, length)), dict(input_ids=ids(3, length)),
         {"input_ids": {0: "batch_size", 1: "sequence_length"}},
         {"last_hidden_state": {0: "batch_size", 1: "sequence_length"}, "pooler_output": {0: "batch_size"}}),
        ("unet", _UNet(unet),
         dict(sample=rand(2, channels, 8, 8), timestep=torch.tensor([500.0]), encoder_hidden_states=rand(2, length, width)),
         dict(sample=rand(3, channels, 16, 8), timestep=torch.tensor([37.0]), encoder_hidden_states=rand(3, length, width)),
         {"sample": image_axes, "timestep": {},  # one timestep for the batch, [1], as optimum feeds it
          "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"}},
         {"out_sample": image_axes}),
        ("vae_encoder", _VaeEncoder(vae), dict(sample=rand(2, 3, 8 * f, 8 * f)), dict(sample=rand(3, 3, 4 * f, 8 * f)),
         {"sample": image_axes}, {"latent_parameters": {0: "batch_size", 2: "height_latent", 3: "width_latent"}}),
        ("vae_decoder", _VaeDecoder(vae), dict(latent_sample=rand(2, latent, 8, 8)),
         dict(latent_sample=rand(3, latent, 4, 8)),
         {"latent_sample": {0: "batch_size", 2: "height_latent", 3: "width_latent"}}, {"sample": image_axes}),
    ]


def _shape(t: torch.Tensor, axes) -> List[str]:
    return [axes.get(i, str(n)) for i, n in enumerate(t.shape)]


def check_exportable(pipe) -> None:
    """ValueError, before anything is written, for a pipeline this exporter cannot trace."""
    if pipe.dtype != torch.float32:
        raise ValueError(f"ONNX export runs on a float32 pipeline (this one is {pipe.dtype}); call "
                         f"pipe.to(dtype=torch.float32) first")
    if pipe.device.type != "cpu":
        raise ValueError(f"ONNX export traces on the CPU (the pipeline is on {pipe.device}); call pipe.to('cpu') first")


def export(pipe, out_dir: str, *, opset: int = DEFAULT_OPSET, verify_graphs: bool = True,
           progress=None, step=None) -> dict:
    """Write the folder (see the module docstring); returns the manifest. step: {sampler:
    [step counts]} also writes each sampler's step graph and tables (fastdiff/export/step.py)."""
    check_exportable(pipe)
    records = []
    for name, module, trace, check, in_axes, outputs in _graphs(pipe):
        if progress:
            progress(f"exporting {name}")
        path = os.path.join(out_dir, name, "model.onnx")
        export_graph(module, list(trace.values()), path, input_names=list(trace), output_names=list(outputs),
                     dynamic_axes={**in_axes}, opset=opset)
        record = GraphRecord(name, f"{name}/model.onnx",
                             inputs={k: _shape(v, in_axes.get(k, {})) for k, v in trace.items()},
                             outputs={k: [axes.get(i, "?") for i in range(max(axes, default=-1) + 1)]
                                      for k, axes in outputs.items()})
        if verify_graphs:
            verify(path, module, check, list(outputs), record)
        records.append(record)
    # Each graph's folder holds its network's config, as optimum's do; fastdiff's ONNX
    # pipeline reads its sizes from them.
    configs = dict(unet=dict(pipe.unet.config), vae_encoder=dict(pipe.vae.config), vae_decoder=dict(pipe.vae.config),
                   text_encoder=pipe.text_encoder.config.to_dict())
    for name, config in configs.items():
        with open(os.path.join(out_dir, name, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2, default=str)
    pipe.tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    scheduler = os.path.join(out_dir, "scheduler")
    os.makedirs(scheduler, exist_ok=True)
    with open(os.path.join(scheduler, "scheduler_config.json"), "w") as fh:
        json.dump(pipe.scheduler_config.to_dict(), fh, indent=2)
    index = {"_class_name": "ORTStableDiffusionPipeline", "_fastdiff_family": "StableDiffusionPipeline",
             **{name: ["diffusers", "OnnxRuntimeModel"] for name in GRAPHS},
             "scheduler": ["diffusers", pipe.scheduler_config.class_name or "PNDMScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if pipe.folder_defaults:
        index["_fastdiff_defaults"] = dict(pipe.folder_defaults)
    with open(os.path.join(out_dir, "model_index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
    step_graphs = []
    for sampler, counts in (step or {}).items():
        if progress:
            progress(f"exporting the {sampler} step")
        from .step import export_step

        step_graphs.append(export_step(pipe, out_dir, sampler, counts, opset=opset, verify_graph=verify_graphs))
    manifest = dict(format="fastdiff-onnx", version=1, family="StableDiffusionPipeline", opset=opset,
                    dtype="float32", verified=verify_graphs, graphs=[r.as_dict() for r in records],
                    step_graphs=step_graphs, vae_scaling_factor=pipe.vae.scaling_factor)
    with open(os.path.join(out_dir, "fastdiff_onnx.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return manifest

