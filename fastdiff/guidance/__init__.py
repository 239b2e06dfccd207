"""Guidance as functions over a denoiser: classifier-free batching (cfg) and GLIDE's CLIP guidance (clip)."""
from ..sampling.denoiser import ModelOutput, as_model_output
from .cfg import ClassifierFreeGuidance
from .clip import NoisedClip

__all__ = ["ClassifierFreeGuidance", "ModelOutput", "as_model_output", "NoisedClip"]
