"""Stable Diffusion with its networks in ONNX Runtime: ``fastdiff.Pipeline.from_onnx(folder)``
on a folder written by ``fastdiff.export.onnx``.

The same generate() (arguments, samplers, seeds, outputs) as the PyTorch pipeline: fastdiff's
sampling loop and fused guided_step stay in charge, only the text encoder, UNet and VAE run
as graphs. What needs the PyTorch modules is refused: cond_fn (a gradient through the
sample), cuda_graph, clip_skip (the graph returns the last hidden state only), to().
"""
from __future__ import annotations

import os
import types
from typing import Sequence

import torch

from .base import FOLDER_DEFAULTS_KEY, register_pipeline
from .stable_diffusion import StableDiffusionPipeline


@register_pipeline("ORTStableDiffusionPipeline")
class OnnxStableDiffusionPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline over ONNX Runtime sessions (float32, on the CPU or an ORT provider)."""

    providers: Sequence[str] = ("CPUExecutionProvider",)

    @classmethod
    def load_components(cls, path, *, device=None, dtype=None, providers=None) -> dict:
        from ..loaders.onnx_folder import load_stable_diffusion

        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("an ONNX pipeline's tensors live on the CPU; choose the GPU with "
                             "providers=['CUDAExecutionProvider']")
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"the exported graphs are float32, not {dtype}")
        return load_stable_diffusion(path, providers or cls.providers)

    @classmethod
    def from_onnx(cls, path, providers=None) -> "OnnxStableDiffusionPipeline":
        from ..loaders.diffusers_folder import read_model_index

        path = os.fspath(path)
        index = read_model_index(path)
        if index.get("_class_name") != "ORTStableDiffusionPipeline":
            raise ValueError(f"{path}: not an exported ONNX folder (model_index.json names "
                             f"{index.get('_class_name')!r}); write one with fastdiff.export.onnx")
        pipe = cls(**cls.load_components(path, providers=providers))
        pipe.set_folder_defaults(index.get(FOLDER_DEFAULTS_KEY), os.path.join(path, "model_index.json"))
        return pipe

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def to(self, device=None, dtype=None, memory_format=None):
        raise ValueError("an ONNX pipeline cannot be moved or cast: export again, or choose ONNX Runtime "
                         "providers with Pipeline.from_onnx(folder, providers=[...])")

    def fuse_qkv_projections(self):
        raise ValueError("fuse_qkv_projections changes PyTorch modules; an ONNX pipeline has none")

    def check_family(self, a: types.SimpleNamespace) -> None:
        for name, why in (("cond_fn", "it differentiates through the sample"),
                          ("cuda_graph", "the graphs run in ONNX Runtime"),
                          ("clip_skip", "the exported text encoder returns its last hidden state only")):
            if getattr(a, name, None):
                raise ValueError(f"{name} is not available on an ONNX pipeline: {why}")
        super().check_family(a)
