"""A VQ-Diffusion folder written by ``fastdiff.export.onnx`` (fastdiff/export/vq_diffusion.py)
as the components of VQDiffusionPipeline, its networks in ONNX Runtime.

``OnnxVQTransformer`` and ``OnnxVQModel`` stand in for the discrete transformer and the VQ-VAE
inside VQDiffusionPipeline.generate: the attributes it reads (height, width,
num_vector_embeds; num_codes, downsample_factor), ``transformer(tokens,
encoder_hidden_states=, timestep=)`` and ``vqvae.decode_tokens(tokens, h, w)``, so the
pipeline's discrete sampler, guidance and fused discrete_step run unchanged. The text encoder
is Stable Diffusion's ONNX one, which pads a call to a static graph's batch. The checks the
graphs leave out (token range, one timestep per call) are made here, before a graph runs;
sizes come from the configs beside the graphs, checked by the models' own config parsers.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from . import diffusers_folder as folder_io
from .onnx_folder import _config, _Graph, check_providers, graph_files, OnnxTextEncoder, read_manifest
from .vq_diffusion import NULL_EMBEDDINGS, load_scheduler_config

FAMILY = "VQDiffusionPipeline"
GRAPHS = ("text_encoder", "transformer", "vqvae_decoder")


def _checked_config(graph: _Graph, model_class) -> Dict[str, Any]:
    """The graph's config.json as `model_class` parses it; ValueError naming the file."""
    try:
        model_class.check_config(graph.config)
    except (TypeError, ValueError) as exc:
        file = os.path.join(os.path.dirname(graph.file), "config.json")
        raise ValueError(f"{file}: {exc}") from None
    return graph.config


class OnnxVQTransformer:
    """``transformer(tokens, encoder_hidden_states=, timestep=)`` -> log p(x0 | x_t) [B, K - 1, N]."""

    def __init__(self, graph: _Graph):
        from ..models.discrete_transformer import VQDiffusionTransformer, parse_config

        self.graph = graph
        cfg = parse_config(_checked_config(graph, VQDiffusionTransformer))
        self.height = self.width = int(cfg["sample_size"])
        self.num_vector_embeds = int(cfg["num_vector_embeds"])
        self.num_timesteps = int(cfg["num_embeds_ada_norm"])
        self.config = cfg

    @property
    def device(self) -> torch.device:
        return self.graph.device

    def __call__(self, tokens: Tensor, encoder_hidden_states: Tensor, timestep) -> Tensor:
        n = self.height * self.width
        if tokens.dim() != 2 or tokens.shape[1] != n:
            raise ValueError(f"tokens must be [B, {n}] ({self.height} x {self.width} latent pixels), "
                             f"got {tuple(tokens.shape)}")
        t = torch.as_tensor(timestep, dtype=torch.int64).reshape(-1)
        if t.numel() > 1 and not bool((t == t[0]).all()):
            raise ValueError("the exported transformer takes one timestep for the whole batch")
        log_p, = self.graph.run(tokens=tokens, timestep=t[:1], encoder_hidden_states=encoder_hidden_states)
        return log_p.to(tokens.device)

    def check_call(self, batch: int) -> None:
        self.graph.check_shape("tokens", (batch, self.height * self.width),
                               f"{batch} token rows per transformer call, the guided batch twice the images")


class OnnxVQModel:
    """``decode_tokens(tokens, h, w)`` -> images [B, 3, h * f, w * f] on the decoder graph."""

    def __init__(self, graph: _Graph):
        from ..models.vqvae import VQModel, parse_vq_config

        self.graph = graph
        cfg, _ = parse_vq_config(_checked_config(graph, VQModel))
        self.num_codes = int(cfg["num_vq_embeddings"])
        self.downsample_factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        self.config = cfg

    def decode_tokens(self, tokens: Tensor, height: int, width: int) -> Tensor:
        shape = self.graph.inputs["tokens"].shape
        if tokens.dim() != 2 or tokens.shape[1] != height * width or shape[1] != height * width:
            raise ValueError(f"decode_tokens: tokens of shape {tuple(tokens.shape)} do not form the {height} x "
                             f"{width} grid per image that {self.graph.file} decodes")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.num_codes):
            raise ValueError(f"decode_tokens: token indices must lie in [0, {self.num_codes - 1}] (the codebook); "
                             f"a mask token cannot be decoded")
        image, = self.graph.run(tokens=tokens)
        return image.to(tokens.device)

    def check_call(self, images: int, tokens: int) -> None:
        self.graph.check_shape("tokens", (images, tokens), f"{images} images per decoder call")


class OnnxVQTextEncoder(OnnxTextEncoder):
    """OnnxTextEncoder that runs a static graph of fixed batch F on any number of prompts:
    in chunks of F, the last padded with copies of its first row (each row's output depends on
    that row alone). VQ-Diffusion calls it on the prompts and, without a learned null
    embedding, on "" alone, so no one batch fits every call."""

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        fixed = self.fixed_shape("input_ids")
        if fixed is None or input_ids.shape[0] == fixed[0]:
            return super().__call__(input_ids, attention_mask, **kwargs)
        self.check_shape("input_ids", (fixed[0],) + tuple(input_ids.shape[1:]), "prompt tokens per call")
        hidden, pooled = [], []
        for chunk in input_ids.split(fixed[0]):
            rows = len(chunk)
            padded = torch.cat([chunk, chunk[:1].expand(fixed[0] - rows, -1)]) if rows < fixed[0] else chunk
            h, p = super().__call__(padded, attention_mask, **kwargs)
            hidden.append(h[:rows])
            pooled.append(p[:rows])
        return torch.cat(hidden), torch.cat(pooled)


def load_vq_diffusion(path: str, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Dict[str, Any]:
    """The keyword arguments of the ONNX VQ-Diffusion pipeline, read from `path`. Errors name the file."""
    path = os.fspath(path)
    manifest = read_manifest(path, FAMILY, GRAPHS)
    check_providers(path, manifest, providers)
    files = graph_files(path, manifest)

    def graph(kind, name):
        file, record = files[name]
        return kind(file, providers, _config(path, name), record)

    null = folder_io.load_learned_null_embeddings(path, NULL_EMBEDDINGS)
    return dict(
        transformer=OnnxVQTransformer(graph(_Graph, "transformer")),
        vqvae=OnnxVQModel(graph(_Graph, "vqvae_decoder")),
        text_encoder=graph(OnnxVQTextEncoder, "text_encoder"),
        tokenizer=folder_io.load_tokenizer(path),
        scheduler_config=load_scheduler_config(path),
        null_embeddings=None if null is None else null.float())
