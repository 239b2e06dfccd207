"""GLIDE with its networks in ONNX Runtime: ``fastdiff.Pipeline.from_onnx(folder)`` on a folder
written by ``fastdiff.export.onnx`` from a GlidePipeline.

The same generate() (arguments, samplers, seeds, outputs, inpainting, the upsampler) as
GlidePipeline: its loop, classifier-free batching and fused guided_step stay in charge, only
the text transformers and U-Nets run as graphs (fastdiff/loaders/onnx_glide.py). Refused,
as needing the PyTorch modules: cond_fn and clip_guidance_scale (gradients through the
sample), cuda_graph, to().
"""
from __future__ import annotations

import types

from .base import register_pipeline
from .glide import GlidePipeline
from .onnx import OnnxPipelineMixin


@register_pipeline("OnnxGlidePipeline")
class OnnxGlidePipeline(OnnxPipelineMixin, GlidePipeline):
    """GlidePipeline over ONNX Runtime sessions (on the CPU or an ORT provider)."""

    onnx_loader = ("onnx_glide", "load_glide")
    reads_folders = True
    onnx_refusals = OnnxPipelineMixin.onnx_refusals + (
        ("clip_guidance_scale", "CLIP guidance differentiates the noised CLIP through the sample, and the "
                                "graphs have no gradients (nor is the noised CLIP exported)"),)

    def check_family(self, a: types.SimpleNamespace) -> None:
        super().check_family(a)
        self.base.check_call(a.n, 2 * a.n if a.guided else a.n)
        if a.upsampling:
            self.upsampler.check_call(a.n, a.n)
