"""GLIDE checkpoints (``base.pt``, ``upsample.pt``, ``base_inpaint.pt``, ``upsample_inpaint.pt``).

The released files are plain state dicts in glide-text2im's key layout, which
``fastdiff.models.adm_unet.Text2ImUNet`` keeps, so loading is a strict ``load_state_dict``
after two checks that turn a mismatch into a message a user can act on: the options
must describe the checkpoint (the first mismatching keys and shapes are named), and
the vocabulary size is read from the weights themselves.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from ..models.adm_unet import Text2ImUNet, glide_options, model_in_channels
from .files import check_weights, load_state_dict_file, state_dict_problems

SHOWN = 5  # mismatches named in an error


def _variant_hint(state: Mapping[str, Tensor], options: Dict) -> str:
    """A guess at the options the checkpoint was made with, from its input convolution."""
    weight = state.get("input_blocks.0.0.weight")
    if weight is None or weight.dim() != 4:
        return ""
    kinds = {3: "a base model (super_res=False, inpaint=False)", 6: "an upsampler (super_res=True)",
             7: "an inpainting base model (inpaint=True)", 10: "an inpainting upsampler (super_res=True, inpaint=True)"}
    found, wanted = weight.shape[1], model_in_channels(options)
    if found != wanted and found in kinds:
        return f" The checkpoint's first convolution takes {found} channels: it looks like {kinds[found]}."
    return ""


def load_glide_model(path: str | os.PathLike, options: Optional[Dict] = None, *, upsampler: bool = False,
                     device=None, dtype: Optional[torch.dtype] = None) -> Text2ImUNet:
    """A GLIDE U-Net from a checkpoint file and GLIDE options (defaults: glide_options(upsampler))."""
    path = os.fspath(path)
    state = load_state_dict_file(path)
    options = glide_options(upsampler=upsampler, **(options or {}))
    embedding = state.get("token_embedding.weight")
    if embedding is None and int(options["xf_width"]):
        raise ValueError(f"{path} has no token_embedding.weight: not a GLIDE text-conditioned checkpoint "
                         f"(or xf_width should be 0)")
    n_vocab = int(embedding.shape[0]) if embedding is not None else 1
    try:
        model = Text2ImUNet(options, n_vocab=n_vocab)
    except ValueError as exc:
        raise ValueError(f"GLIDE options for {path} are invalid: {exc}") from None
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise ValueError(f"{path} does not fit the GLIDE options given "
                         f"(image_size={options['image_size']}, num_channels={options['num_channels']}, "
                         f"super_res={options['super_res']}, inpaint={options['inpaint']}): "
                         + "; ".join(problems) + "." + _variant_hint(state, options))
    check_weights(state, path, model.state_dict(), shown=SHOWN)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)
