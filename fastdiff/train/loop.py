"""The optimisation loop both stages share: AdamW with warm-up, gradient clipping, EMA, a
progress bar, periodic checkpoints and bitwise resumption."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .objectives import lr_lambda
from .state import EMA, config_differences, load_checkpoint, restore_rng_state, rng_state, save_checkpoint


@dataclass
class StageResult:
    stage: str
    steps: int
    losses: List[float] = field(repr=False)
    wall_time_s: float  # over every session of the run, resumptions included
    summary: Dict = field(default_factory=dict, repr=False)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-min(len(self.losses), 100):]
        return sum(tail) / max(1, len(tail))


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for, but CUDA is not available")
    return device


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast where it pays (CUDA) or where asked for; fp32 on CPU by default, where
    bf16 matmuls are slower than fp32 on most CPUs without AMX."""
    if cfg.precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return cfg.precision == "bf16"


@contextlib.contextmanager
def run_environment(cfg: TrainConfig, device: torch.device):
    """CPU thread count and deterministic CUDA kernels for the run; both restored afterwards."""
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' deterministic mode
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


class TrainingLoop:
    """One stage's optimiser, schedule, EMA and position; ``run(step_loss)`` trains to `total_steps`."""

    def __init__(self, name: str, cfg: TrainConfig, total_steps: int, trainable: Dict[str, nn.Module], *,
                 lr: float, weight_decay: float, warmup_steps: int, lr_schedule: str, grad_clip: float,
                 ema_decay: Optional[float], data, generator: torch.Generator,
                 lr_scales: Optional[Dict[str, float]] = None):
        self.name, self.cfg, self.total_steps = name, cfg, total_steps
        self.trainable, self.data, self.generator, self.grad_clip = trainable, data, generator, grad_clip
        groups = [{"params": [p for p in m.parameters() if p.requires_grad],
                   "lr": lr * (lr_scales or {}).get(key, 1.0)} for key, m in trainable.items()]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay,
                                           foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup_steps, total_steps, lr_schedule))
        self.ema = EMA(trainable, ema_decay) if ema_decay else None
        self.step, self.losses, self.earlier_wall_s = 0, [], 0.0
        self.path = os.path.join(cfg.output, "checkpoints", f"{name}.pt")

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, wall_s: float) -> Dict:
        return {
            "stage": self.name, "step": self.step, "config": self.cfg.to_dict(),
            "models": {k: m.state_dict() for k, m in self.trainable.items()},
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.generator), "data": self.data.state_dict(),
            "losses": torch.tensor(self.losses, dtype=torch.float64), "wall_time_s": wall_s,
        }

    def resume(self) -> bool:
        """Load this stage's checkpoint when cfg.resume and one exists; True if loaded."""
        if not (self.cfg.resume and os.path.isfile(self.path)):
            return False
        state = load_checkpoint(self.path)
        if state.get("stage") != self.name:
            raise ValueError(f"{self.path} is a checkpoint of stage {state.get('stage')!r}, not {self.name!r}")
        changed = config_differences(state["config"], self.cfg.to_dict())
        if changed:
            raise ValueError(f"cannot resume from {self.path}: the run's settings changed ("
                             + "; ".join(changed[:5]) + "). Use the same settings, or a new --output.")
        for key, module in self.trainable.items():
            module.load_state_dict(state["models"][key])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        restore_rng_state(state["rng"], self.generator)
        self.data.load_state_dict(state["data"])
        self.step, self.losses = int(state["step"]), state["losses"].tolist()
        self.earlier_wall_s = float(state["wall_time_s"])
        return True

    # ------------------------------------------------------------------ loop

    def run(self, step_loss: Callable[[], Tensor]) -> StageResult:
        """`step_loss()` draws a batch and returns the scalar loss to minimise."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        every = self.cfg.checkpoint_every
        for module in self.trainable.values():
            module.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, disable=not self.cfg.progress,
                   dynamic_ncols=True)
        shown = None
        while self.step < self.total_steps:
            loss = step_loss()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.step)
            self.step += 1
            value = float(loss.detach())
            self.losses.append(value)
            shown = value if shown is None else 0.95 * shown + 0.05 * value  # smoothed for reading only
            bar.update(1)
            bar.set_postfix(loss=f"{shown:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if every and self.step % every == 0 and self.step < self.total_steps:
                save_checkpoint(self.path, self.state_dict(self.earlier_wall_s + time.perf_counter() - start))
        bar.close()
        wall = self.earlier_wall_s + time.perf_counter() - start
        save_checkpoint(self.path, self.state_dict(wall))
        return StageResult(self.name, self.step, list(self.losses), wall)
