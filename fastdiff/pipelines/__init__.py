"""Pipelines: ``fastdiff.Pipeline.from_pretrained(path)`` picks the family from the folder;
``fastdiff.Pipeline.from_glide(base.pt, ...)`` reads glide-text2im checkpoints."""
from .base import Pipeline
from .glide import GlidePipeline
from .stable_diffusion import StableDiffusionPipeline
from .vq_diffusion import VQDiffusionPipeline

__all__ = ["Pipeline", "GlidePipeline", "StableDiffusionPipeline", "VQDiffusionPipeline"]
