"""Models fastdiff runs. Denoisers take (x, t, cond) and know nothing of samplers."""
from .exact import ExactDenoiser

__all__ = ["ExactDenoiser"]
