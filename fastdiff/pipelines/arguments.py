"""The checks every pipeline's generate() runs on its arguments, before any work.

Each one refuses a bad value with one line naming the argument, the value given and
what is valid (ValueError, or TypeError for a value of the wrong kind), so a run never
ends in a stray error half-way or, worse, in a silently different image. The family
files call these from their ``check_family`` hook; base.Pipeline.check_arguments runs
the ones every family shares.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import List, Optional, Sequence, Union

import torch

OUTPUT_TYPES = ("pil", "np", "pt")
SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes an unsigned 64-bit seed


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


def check_negative_prompts(negative_prompt, prompts: List[str]) -> Optional[List[str]]:
    if negative_prompt is None:
        return None
    negative = check_prompts(negative_prompt, "negative_prompt")
    if len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one per prompt")
    return negative


def check_real(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False) -> float:
    """A finite real number (not a bool or a string) in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    inside = (low is None or value > low or (value == low and not low_open)) and (high is None or value <= high)
    if not (math.isfinite(value) and inside):
        raise ValueError(f"{name} must be {_range_text(low, high, low_open)}, got {value}")
    return value


def _range_text(low, high, low_open) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"


def check_int(name: str, value, *, low: int = 1, high: Optional[int] = None, what: str = "") -> int:
    """An integer (not a bool, not a float such as 1.7) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}{what}, got {value}")
    return value


def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
    return output_type


def check_callback(name: str, fn):
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable (or None), got {type(fn).__name__}")
    return fn


def make_generator(seed, generator, count: Optional[int] = None):
    """The generator to draw with: a CPU generator seeded with `seed`, or `generator` as given.

    `generator` may be a list of `count` generators, one per image (diffusers' convention): image
    i's noise then comes from generator i alone, whatever the batch (fastdiff.sampling.noise)."""
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer in [0, 2**64), got {seed!r} ({type(seed).__name__})")
        if not 0 <= int(seed) < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
        return torch.Generator().manual_seed(int(seed))
    if isinstance(generator, (list, tuple)):
        if count is not None and len(generator) != count:
            raise ValueError(f"a list of generators needs one per image: {count} images, "
                             f"got {len(generator)} generators")
        bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if bad or not generator:
            raise TypeError(f"generator must be a torch.Generator or a non-empty list of them, got a list "
                            f"holding {bad[0] if bad else 'nothing'}")
        if len({g.device for g in generator}) > 1:
            raise ValueError("the per-image generators must all be on one device")
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__} "
                        f"(for a number, pass seed=)")
    return generator


def check_latents(latents, shape) -> None:
    """Starting latents (or pixels) given by the caller: a finite float tensor of `shape`."""
    from torch import Tensor

    if not isinstance(latents, Tensor):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
    if not latents.dtype.is_floating_point:
        raise TypeError(f"latents must be floats, got {latents.dtype}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values")


def check_image_size(name: str, value, *, multiple: int, largest: int, native: int) -> int:
    """A side in pixels: a positive multiple of `multiple`, at most `largest`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer number of pixels, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value <= 0 or value % multiple or value > largest:
        raise ValueError(f"{name} must be a positive multiple of {multiple} up to {largest} (the model's native "
                         f"size is {native}), got {value}")
    return value


def check_fixed_size(name: str, value, size: int, family: str) -> int:
    """For families that draw at one size only: None or that size."""
    if value is not None and (isinstance(value, bool) or value != size):
        raise ValueError(f"{name} must be {size} (or None): {family} draws {size} px images, got {value!r}")
    return size


def warn_no_effect(name: str, why: str) -> None:
    """One warning for an argument that changes nothing, pointing at the caller's line: the first
    frame outside fastdiff.pipelines (and torch's no_grad wrapper), however deep the checks sit."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("fastdiff.pipelines", "torch.")):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{name} has no effect here: {why}", UserWarning, stacklevel=level)


# --------------------------------------------------------------------------- samplers
# The sampler registry (fastdiff.sampling.registry) says what each sampler takes; these
# two put its checks in a pipeline's words.

def check_sampler(name: str, value):
    """The registry's SamplerSpec of sampler `value` (a TypeError or ValueError naming `name` otherwise)."""
    from ..sampling.registry import get_sampler

    if not isinstance(value, str):
        raise TypeError(f"{name} must be a sampler name (a string), got {type(value).__name__}")
    try:
        return get_sampler(value)
    except ValueError as exc:
        raise ValueError(str(exc).replace("unknown sampler", f"unknown {name}", 1)) from None


def check_steps(sampler: str, config, num_steps) -> int:
    """num_inference_steps for `sampler` on `config`: a positive integer it can take."""
    from ..sampling.registry import check_num_steps

    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"num_inference_steps must be an integer, got {num_steps!r} ({type(num_steps).__name__})")
    try:
        return check_num_steps(sampler, config, num_steps)
    except ValueError as exc:
        raise ValueError(str(exc).replace("num_steps", "num_inference_steps")) from None
