"""What every fastdiff pipeline shares: loading by folder, devices, output conversion."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

OUTPUT_TYPES = ("pil", "np", "pt")


def make_generator(seed: Optional[int], generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        return torch.Generator().manual_seed(int(seed))
    return generator


def check_prompts(prompt: Union[str, Sequence[str]], name: str = "prompt") -> List[str]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    for p in prompt:
        if not isinstance(p, str):
            raise TypeError(f"{name} must contain strings, got {type(p).__name__}")
        if name == "prompt" and not p.strip():
            raise ValueError("prompt is empty; give a description of the image "
                             "(for an unconditional sample, use guidance_scale=1 with any prompt)")
    return list(prompt)


def to_output(images: Tensor, output_type: str):
    """images [B, 3, H, W] in [0, 1] -> PIL list, numpy [B, H, W, 3] float32, or the tensor."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
    if output_type == "pt":
        return images
    array = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "default_model")


class _PipelineFactory(type):
    """``fastdiff.Pipeline()`` with no arguments loads the model shipped inside the package."""

    def __call__(cls, *args, **kwargs):
        if cls is Pipeline:
            if args:
                raise TypeError("fastdiff.Pipeline() takes no positional arguments; use "
                                "fastdiff.Pipeline.from_pretrained(path) for a model on disk")
            if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")):
                raise FileNotFoundError(
                    f"the built-in default model is missing from this install ({DEFAULT_MODEL}); "
                    "use fastdiff.Pipeline.from_pretrained(path) with a model folder")
            return cls.from_pretrained(DEFAULT_MODEL, **kwargs)
        return super().__call__(*args, **kwargs)


class Pipeline(metaclass=_PipelineFactory):
    """Entry point: ``fastdiff.Pipeline.from_pretrained(path)`` returns the right pipeline;
    ``fastdiff.Pipeline()`` the built-in default model (device=, dtype= accepted)."""

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device=None, dtype=None) -> "Pipeline":
        from ..loaders.diffusers_folder import read_model_index

        path = os.fspath(path)
        if os.path.isfile(path):
            from .stable_diffusion import StableDiffusionPipeline

            return StableDiffusionPipeline.from_single_file(path, device=device, dtype=dtype)
        index = read_model_index(path)
        name = index.get("_class_name")
        from .stable_diffusion import StableDiffusionPipeline

        from .vq_diffusion import VQDiffusionPipeline

        for pipeline in (StableDiffusionPipeline, VQDiffusionPipeline):
            if name in pipeline.CLASS_NAMES:
                return pipeline.from_pretrained(path, device=device, dtype=dtype)
        known = StableDiffusionPipeline.CLASS_NAMES + VQDiffusionPipeline.CLASS_NAMES
        raise ValueError(f"{path}: pipeline class {name!r} is not supported; fastdiff reads "
                         f"{', '.join(known)} folders")

    @classmethod
    def from_glide(cls, base, upsampler=None, *, tokenizer, inpaint: bool = False, clip=None, options=None,
                   upsampler_options=None, device=None, dtype=None) -> "Pipeline":
        """GLIDE from glide-text2im checkpoints (see GlidePipeline.from_glide)."""
        from .glide import GlidePipeline

        return GlidePipeline.from_glide(base, upsampler, tokenizer=tokenizer, inpaint=inpaint, clip=clip,
                                        options=options, upsampler_options=upsampler_options, device=device,
                                        dtype=dtype)
