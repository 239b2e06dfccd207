"""Pipelines: ``fastdiff.Pipeline.from_pretrained(path)`` picks the family from the folder."""
from .base import Pipeline
from .stable_diffusion import StableDiffusionPipeline

__all__ = ["Pipeline", "StableDiffusionPipeline"]
