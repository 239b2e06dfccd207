"""What a resumable run keeps: the EMA of the weights, and checkpoints holding everything that
decides the next step (weights, EMA, optimiser, LR schedule, RNG states, data position,
loss history), written atomically and read back with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
import random
from typing import Dict, Iterable, List

import torch
from torch import Tensor, nn


class EMA:
    """Exponential moving average of parameters, decay warmed up as min(decay, (1 + n) / (10 + n))
    so the average is not dominated by the random initialisation in short runs."""

    def __init__(self, modules: Dict[str, nn.Module], decay: float):
        self.decay = decay
        self.modules = modules
        self.shadow: Dict[str, Tensor] = {
            f"{name}.{key}": p.detach().clone().float()
            for name, module in modules.items() for key, p in module.named_parameters()}

    def _pairs(self) -> Iterable:
        for name, module in self.modules.items():
            for key, p in module.named_parameters():
                yield self.shadow[f"{name}.{key}"], p

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        shadows, params = zip(*self._pairs())
        torch._foreach_lerp_(list(shadows), [p.detach().float() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, modules: Dict[str, nn.Module]) -> None:
        """Write the averaged weights into `modules` (same structure as the tracked ones)."""
        for name, module in modules.items():
            for key, p in module.named_parameters():
                p.copy_(self.shadow[f"{name}.{key}"].to(p.dtype))

    def state_dict(self) -> Dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model (e.g. {sorted(missing)[:3]})")
        for key, value in state.items():
            self.shadow[key].copy_(value)


def rng_state(generator: torch.Generator) -> Dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: Dict) -> None:
    """Write to a temporary file, then rename: a run killed mid-write keeps its previous checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None


# Settings a resumed run may change without becoming a different run.
RESUMABLE_CHANGES = {"diffusion.steps", "vae_training.steps", "progress", "checkpoint_every", "resume",
                     "num_threads", "command", "output", "device", "vae_path"}


def config_differences(saved: Dict, current: Dict, prefix: str = "") -> List[str]:
    """Dotted names of settings that differ between a checkpoint's config and the current one."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif name not in RESUMABLE_CHANGES and _plain(a) != _plain(b):
            out.append(f"{name}: checkpoint {a!r}, now {b!r}")
    return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
