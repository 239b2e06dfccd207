"""Pipelines: ``fastdiff.Pipeline.from_pretrained(path)`` picks the family from the folder;
``fastdiff.Pipeline.from_glide(base.pt, ...)`` reads glide-text2im checkpoints.

``PIPELINES`` maps a model_index.json ``_class_name`` to the pipeline class that reads
such folders; each family module registers itself there when imported (below).
"""
from .base import PIPELINES, Pipeline
from .glide import GlidePipeline
from .onnx import OnnxStableDiffusionPipeline
from .onnx_glide import OnnxGlidePipeline  # noqa: F401  (registers OnnxGlidePipeline)
from .onnx_vq_diffusion import OnnxVQDiffusionPipeline  # noqa: F401  (registers OnnxVQDiffusionPipeline)
from .stable_diffusion import StableDiffusionPipeline
from .vq_diffusion import VQDiffusionPipeline

__all__ = ["PIPELINES", "Pipeline", "GlidePipeline", "OnnxStableDiffusionPipeline", "StableDiffusionPipeline", "VQDiffusionPipeline"]
