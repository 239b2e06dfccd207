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


def _pickle_problem(exc: Exception) -> str:
    """One line on why torch.load(weights_only=True) refused a file. torch's own message starts by
    suggesting weights_only=False, i.e. running whatever code the file holds: never the advice here."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = next((line for line in lines[1:] if "GLOBAL" in line or "Unsupported" in line), "")
        return ("it holds objects other than tensors, which a weight file never needs and which fastdiff does "
                "not run (it loads pickles with weights_only=True)" + (f": {detail}" if detail else ""))
    return f"corrupt, truncated, or not a weight file ({lines[0] if lines else type(exc).__name__})"


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
            raise CheckpointError(f"cannot read {path}: {_pickle_problem(exc)}") from None
        # Lightning-style checkpoints keep the weights under "state_dict".
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a mapping of names to tensors")
        return obj
    raise CheckpointError(f"unknown weight file type: {path} (expected .safetensors, .bin, .pt, .pth or .ckpt)")


def check_weights(state: Mapping[str, Tensor], source: str,
                  expected: Optional[Mapping[str, Tensor]] = None, shown: int = 5) -> None:
    """Refuse weights that would load into a broken model: NaN or infinite values in any float
    tensor, and (given the model's own `expected` tensors) an integer or bool tensor where the
    model holds a float one, which load_state_dict would otherwise cast silently.

    CheckpointError naming `source` (the file) and the first few tensors.
    """
    if expected is not None:
        cast = [f"{k} ({v.dtype})" for k, v in state.items()
                if k in expected and expected[k].is_floating_point() and not v.is_floating_point()]
        if cast:
            more = f" and {len(cast) - shown} more" if len(cast) > shown else ""
            raise CheckpointError(f"{source} holds integer tensors for float parameters: "
                                  f"{', '.join(cast[:shown])}{more}; the file is corrupt or not these weights")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        raise CheckpointError(f"{source} holds NaN or infinite values in {', '.join(bad[:shown])}{more}; "
                              "the file is corrupt")


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
