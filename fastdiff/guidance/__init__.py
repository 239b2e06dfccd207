"""Guidance as functions over a denoiser (classifier-free batching for now)."""
from .cfg import ClassifierFreeGuidance, ModelOutput, as_model_output

__all__ = ["ClassifierFreeGuidance", "ModelOutput", "as_model_output"]
