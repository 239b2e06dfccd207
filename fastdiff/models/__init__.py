"""Models fastdiff runs. Denoisers take (x, t, cond) and know nothing of samplers."""
from .adm_unet import Text2ImUNet, glide_options
from .autoencoder_kl import AutoencoderKL
from .exact import ExactDenoiser
from .unet_2d_condition import UNet2DConditionModel

__all__ = ["ExactDenoiser", "UNet2DConditionModel", "AutoencoderKL", "Text2ImUNet", "glide_options"]
