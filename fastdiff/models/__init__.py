"""Models fastdiff runs. Denoisers take (x, t, cond) and know nothing of samplers."""
from .autoencoder_kl import AutoencoderKL
from .exact import ExactDenoiser
from .unet_2d_condition import UNet2DConditionModel

__all__ = ["ExactDenoiser", "UNet2DConditionModel", "AutoencoderKL"]
