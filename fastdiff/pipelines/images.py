"""Input images (img2img, inpainting) read one way for every pipeline.

Accepted: a path to an image file; a PIL image of any mode (greyscale, RGBA, palette:
converted to RGB, as diffusers' load_image does, so an alpha channel is dropped); a numpy
array [H, W], [H, W, C] or [B, H, W, C]; a tensor [C, H, W] or [B, C, H, W]; or a list of
these, one per image. C is 3 (RGB) or 1 (grey, repeated to RGB). uint8 values are 0-255,
by their dtype (a dark uint8 image whose values happen to stay below 2 is still 0-255);
float values must lie in [0, 1], the documented range, so a float image in 0-255 is an
error rather than a white image. Other integer dtypes are refused (convert to uint8 or
to floats in [0, 1]), and so are NaN or infinite values.
"""
from __future__ import annotations

import os
from typing import List

import numpy as np
import torch
from torch import Tensor


def open_image(path):
    """A path string -> the PIL image it names (FileNotFoundError naming it if there is none)."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not an image file PIL can read ({exc})") from None


def _pil_to_array(image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _channels_first(array: np.ndarray, name: str) -> np.ndarray:
    """numpy [H, W], [H, W, C] or [B, H, W, C] -> [B, C, H, W]."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"{name} array must be [H, W], [H, W, C] or [B, H, W, C], got shape {array.shape}")
    return array.transpose(0, 3, 1, 2)


def _as_unit_floats(t: Tensor, name: str) -> Tensor:
    """uint8 -> /255; floats as they are (checked to lie in [0, 1]); anything else refused."""
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must hold uint8 values (0-255) or floats in [0, 1], got {t.dtype}")
    t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    low, high = t.min().item(), t.max().item()
    if low < 0.0 or high > 1.0:
        hint = " (values in 0-255: divide by 255, or pass uint8)" if high > 1.0 else ""
        raise ValueError(f"{name} floats must lie in [0, 1], got values in [{low:g}, {high:g}]{hint}")
    return t


def image_tensor(image, name: str = "image") -> Tensor:
    """Any accepted image input (module docstring) -> float32 [B, 3, H, W] in [0, 1] on the CPU
    (a tensor input stays on its device)."""
    from PIL import Image

    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{name} is an empty list")
        parts: List[Tensor] = [image_tensor(im, name) for im in image]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"the images of {name} have different sizes {sorted(sizes)}; give one size")
        return torch.cat([p.to(parts[0].device) for p in parts])
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        t = torch.from_numpy(_channels_first(_pil_to_array(image), name).copy())
    elif isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(_channels_first(image, name)))
    elif isinstance(image, Tensor):
        t = image[None] if image.dim() == 3 else image
        if t.dim() != 4:
            raise ValueError(f"{name} tensor must be [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"{name} must be a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if t.shape[1] not in (1, 3):
        layout = "[B, H, W, 3] array" if isinstance(image, np.ndarray) else "[B, 3, H, W] tensor"
        raise ValueError(f"{name} must have 3 channels (RGB) or 1 (grey), as a {layout}; got shape "
                         f"{tuple(image.shape) if hasattr(image, 'shape') else tuple(t.shape)}")
    t = _as_unit_floats(t, name)
    return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
