"""VQ-Diffusion with its networks in ONNX Runtime: ``fastdiff.Pipeline.from_onnx(folder)`` on a
folder written by ``fastdiff.export.onnx`` from a VQDiffusionPipeline.

The same generate() (arguments, seeds, tokens, outputs) as VQDiffusionPipeline: its discrete
sampler, log-space guidance, truncation and fused discrete_step stay in charge, only the CLIP
text encoder, the transformer and the VQ-VAE decoder run as graphs
(fastdiff/loaders/onnx_vq_diffusion.py). A static export's batch is checked before any work.
"""
from __future__ import annotations

import types

from .base import register_pipeline
from .onnx import OnnxPipelineMixin
from .vq_diffusion import VQDiffusionPipeline


@register_pipeline("OnnxVQDiffusionPipeline")
class OnnxVQDiffusionPipeline(OnnxPipelineMixin, VQDiffusionPipeline):
    """VQDiffusionPipeline over ONNX Runtime sessions (on the CPU or an ORT provider)."""

    onnx_loader = ("onnx_vq_diffusion", "load_vq_diffusion")

    def check_family(self, a: types.SimpleNamespace) -> None:
        super().check_family(a)
        self.transformer.check_call(2 * a.batch if a.guided else a.batch)
        self.vqvae.check_call(a.batch, self.num_tokens)
