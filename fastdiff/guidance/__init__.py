"""Guidance as functions over a denoiser: classifier-free batching (cfg), GLIDE's CLIP guidance
(clip), contrastive and spherical-distance CLIP guidance (contrastive) and CLIP-guided
optimisation of x_T (optimize)."""
from ..sampling.denoiser import ModelOutput, as_model_output
from .cfg import ClassifierFreeGuidance
from .clip import NoisedClip
from .contrastive import ClipEncoders, ClipGuidance, ContrastiveClipGuidance, SphericalClipGuidance
from .optimize import LatentOptimization

__all__ = ["ClassifierFreeGuidance", "ClipEncoders", "ClipGuidance", "ContrastiveClipGuidance", "LatentOptimization",
           "ModelOutput", "NoisedClip", "SphericalClipGuidance", "as_model_output"]
