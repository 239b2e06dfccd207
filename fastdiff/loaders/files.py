"""Reading weight files safely: safetensors first, pickles only with weights_only=True.

Every failure names the file: missing, truncated, corrupt, or not a tensor mapping.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional

import torch
from torch import Tensor

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """A weight file that exists but cannot be used (corrupt, truncated, wrong contents)."""


def load_state_dict_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> Dict[str, Tensor]:
    """The tensors of one weight file, keyed by name."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.endswith(SAFE_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file ({exc})") from None
    if path.endswith(PICKLE_SUFFIXES):
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # unpickling errors come in many types; all mean the same here
            raise CheckpointError(
                f"cannot read {path}: corrupt, truncated, or holds objects other than tensors "
                f"(loaded with weights_only=True): {str(exc).splitlines()[0]}") from None
        # Lightning-style checkpoints keep the weights under "state_dict".
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a mapping of names to tensors")
        return obj
    raise CheckpointError(f"unknown weight file type: {path} (expected .safetensors, .bin, .pt, .pth or .ckpt)")


def find_weights(folder: str | os.PathLike, stems: Iterable[str] = ("diffusion_pytorch_model", "model"),
                 variant: Optional[str] = None) -> str:
    """The weight file of a diffusers component folder, preferring safetensors."""
    folder = os.fspath(folder)
    stems = list(stems)
    names = []
    for suffix in (".safetensors", ".bin"):
        for stem in stems:
            name = f"{stem}.{variant}{suffix}" if variant else f"{stem}{suffix}"
            names.append(name)
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(names)}")


def state_dict_problems(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], shown: int = 5) -> List[str]:
    """The ways `found` does not fit `expected`: the first few missing keys, unexpected keys and
    shape mismatches, each kind as one sentence; empty when it fits."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} (file {tuple(found[k].shape)}, model {tuple(expected[k].shape)})"
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:shown])}{more}")
    return problems
