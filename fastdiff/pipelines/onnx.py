"""Stable Diffusion with its networks in ONNX Runtime: ``fastdiff.Pipeline.from_onnx(folder)``
on a folder written by ``fastdiff.export.onnx``.

The same generate() (arguments, samplers, seeds, outputs) as the PyTorch pipeline: fastdiff's
sampling loop and fused guided_step stay in charge, only the text encoder, UNet and VAE run
as graphs. What needs the PyTorch modules is refused: cond_fn (a gradient through the
sample), cuda_graph, clip_skip (the graph returns the last hidden state only), to().
OnnxPipelineMixin holds what the families' ONNX pipelines share (pipelines/onnx_glide.py,
pipelines/onnx_vq_diffusion.py).
"""
from __future__ import annotations

import types
from typing import Sequence, Tuple

import torch

from .base import register_pipeline
from .stable_diffusion import StableDiffusionPipeline


class OnnxPipelineMixin:
    """What every ONNX pipeline shares (first in the bases, before the family's class): its
    tensors live where its providers run (the CPU, or the GPU of CUDAExecutionProvider), it
    cannot be moved or cast, and arguments that need the PyTorch
    modules are refused by name before any work."""

    is_onnx = True
    providers: Sequence[str] = ("CPUExecutionProvider",)
    # (argument, why ONNX cannot take it), refused when given and truthy.
    onnx_refusals: Tuple[Tuple[str, str], ...] = (
        ("cond_fn", "it differentiates through the sample, and the graphs have no gradients"),
        ("clip_guidance", "it differentiates CLIP through the model's prediction, and the graphs have no gradients"),
        ("cuda_graph", "the graphs run in ONNX Runtime, not in captured CUDA graphs"),
    )

    # (module under fastdiff.loaders, function): the family's folder reader, imported on first load
    onnx_loader: Tuple[str, str]

    @classmethod
    def load_components(cls, path, *, device=None, dtype=None, providers=None) -> dict:
        """The family's components from an exported folder, its graphs in ONNX Runtime sessions."""
        import importlib

        from ..loaders.onnx_folder import onnx_device

        providers = providers or cls.providers
        if device is not None and torch.device(device).type != onnx_device(providers).type:
            raise ValueError(f"an ONNX pipeline's device follows its providers ({onnx_device(providers)} for "
                             f"{list(providers)}): choose the GPU with providers=['CUDAExecutionProvider']")
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"an ONNX pipeline takes and returns float32 tensors, not {dtype} (export "
                             f"with dtype='float16' for float16 graphs)")
        module, function = cls.onnx_loader
        load = getattr(importlib.import_module(f"..loaders.{module}", __package__), function)
        return load(path, providers)

    @property
    def device(self) -> torch.device:
        """Where the pipeline's tensors live: the CPU, or torch's GPU when the CUDA provider
        comes first (the graphs then read and write its memory: fastdiff/loaders/onnx_folder.py)."""
        return getattr(self._main, "device", torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def to(self, device=None, dtype=None, memory_format=None):
        raise ValueError("an ONNX pipeline cannot be moved or cast: export again, or choose ONNX Runtime "
                         "providers with Pipeline.from_onnx(folder, providers=[...])")

    def fuse_qkv_projections(self):
        raise ValueError("fuse_qkv_projections changes PyTorch modules; an ONNX pipeline has none")

    def optimization_chain(self, a: types.SimpleNamespace):
        raise ValueError("optimize_latents is not available on an ONNX pipeline: it back-propagates through every "
                         "step, and the graphs have no gradients; load the model with runtime='torch'")

    def check_family(self, a: types.SimpleNamespace) -> None:
        for name, why in self.onnx_refusals:
            if getattr(a, name, None):
                raise ValueError(f"{name} is not available on an ONNX pipeline: {why}")
        super().check_family(a)


@register_pipeline("ORTStableDiffusionPipeline")
class OnnxStableDiffusionPipeline(OnnxPipelineMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline over ONNX Runtime sessions (on the CPU or an ORT provider)."""

    onnx_loader = ("onnx_folder", "load_stable_diffusion")
    onnx_refusals = OnnxPipelineMixin.onnx_refusals + (
        ("clip_skip", "the exported text encoder returns its last hidden state only"),)

    def check_family(self, a: types.SimpleNamespace) -> None:
        super().check_family(a)
        self.unet.check_call(a.batch * (2 if a.guided else 1), a.shape[2], a.shape[3])
