"""A small CNN that reads a scene image back into its canonical attributes.

The judge is trained only on procedurally rendered scenes (fastdiff.data.scenes), from its
own seed stream, so it is independent of any generator it is used to grade. It reads the
layout (single / vertical / horizontal) and, for each of two object slots in canonical order
(top-to-bottom or left-to-right), the shape and the colour; slot 2 means nothing for a
single-object scene and its loss is masked there.

    judge = train_judge(steps=1500)                      # a few minutes on 2 CPU cores
    judge.save("judge_dir"); judge = Judge.load("judge_dir")
    judge.predict(images)   # [B, 3, 64, 64] in [-1, 1] -> [{"layout": ..., "objects": [...]}, ...]

`python -m fastdiff.eval.judge --steps 1500 --output DIR` trains one from the command line.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.scenes import COLORS, HELDOUT_FRACTION, SHAPES, canonical, random_scene, render
from .judge_files import CONFIG_FILE, DEFAULT_JUDGE_DIR, WEIGHTS_FILE

LAYOUTS = ("single", "vertical", "horizontal")
COLOR_NAMES = tuple(COLORS)
IMAGE_SIZE = 64
JUDGE_SEED = 12345  # a seed stream no generator training uses, so the judge never sees the generator's data


class Judge(nn.Module):
    """Strided convs down to a 4x4 grid, then a flatten: the flatten keeps *where* features are,
    which the slot order (top vs bottom, left vs right) depends on; global pooling would lose it.
    Stride-2 convs rather than conv + max-pool: a quarter of the work per layer, which is what
    lets it train in minutes on two CPU cores (objects are 15-35 px wide, far above the stride)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 64), hidden: int = 128):
        super().__init__()
        self.channels, self.hidden = tuple(channels), hidden
        layers, in_channels = [], 3
        for index, out_channels in enumerate(self.channels):  # each block halves the side: 64 -> 32 -> 16 -> 8 -> 4
            kernel = 4 if index == 0 else 3  # 4x4 at stride 2: each output's window centred on its 2x2 cell
            layers += [nn.Conv2d(in_channels, out_channels, kernel, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        side = IMAGE_SIZE >> len(self.channels)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, hidden), nn.ReLU(inplace=True))
        self.layout_head = nn.Linear(hidden, len(LAYOUTS))
        self.shape_heads = nn.ModuleList(nn.Linear(hidden, len(SHAPES)) for _ in range(2))
        self.color_heads = nn.ModuleList(nn.Linear(hidden, len(COLOR_NAMES)) for _ in range(2))
        self.training_record: Dict = {}  # how it was trained and how well it reads; saved in the json

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        return self._heads(self.trunk(self.features(images)))

    def _heads(self, h: Tensor) -> Dict[str, Tensor]:
        return {"layout": self.layout_head(h),
                "shape": torch.stack([head(h) for head in self.shape_heads], 1),    # [B, 2, 3]
                "color": torch.stack([head(h) for head in self.color_heads], 1)}    # [B, 2, 5]

    def predict(self, images: Tensor, batch_size: int = 256) -> List[dict]:
        """[B, 3, H, W] in [-1, 1] -> canonical dicts (see fastdiff.data.scenes.canonical)."""
        return self.read(images, batch_size)[1]

    def embed(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """The judge's penultimate layer (its `hidden` ReLU features, float32 [B, hidden]) of images
        [B, 3, H, W] in [-1, 1], resized as predict() resizes them: an Inception-free feature space for
        FID/KID in the shapes domain (fastdiff.eval.fidelity)."""
        return self.read(images, batch_size)[0]

    @torch.no_grad()
    def read(self, images: Tensor, batch_size: int = 256) -> Tuple[Tensor, List[dict]]:
        """embed() and predict() of the same images in one pass of the network."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        features, predictions = [], []
        for start in range(0, images.shape[0], batch_size):
            h = self.trunk(self.features(resize_to_judge(images[start:start + batch_size].to(device, torch.float32))))
            features.append(h.cpu())
            out = self._heads(h)
            layouts = out["layout"].argmax(-1).tolist()
            shapes, colors = out["shape"].argmax(-1).tolist(), out["color"].argmax(-1).tolist()
            for layout, shape, color in zip(layouts, shapes, colors):
                slots = 1 if LAYOUTS[layout] == "single" else 2
                objects = [(SHAPES[shape[i]], COLOR_NAMES[color[i]]) for i in range(slots)]
                predictions.append({"layout": LAYOUTS[layout], "objects": objects})
        self.train(was_training)
        return (torch.cat(features) if features else torch.zeros(0, self.hidden)), predictions

    def save(self, path: str) -> None:
        """Writes `path`/judge.safetensors (weights) and `path`/judge.json (architecture, class names, record)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS_FILE))
        config = {"channels": list(self.channels), "hidden": self.hidden, "image_size": IMAGE_SIZE,
                  "layouts": list(LAYOUTS), "shapes": list(SHAPES), "colors": list(COLOR_NAMES),
                  "training": self.training_record}
        with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str = DEFAULT_JUDGE_DIR, device="cpu") -> "Judge":
        from safetensors.torch import load_file

        config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
        for needed in (config_path, weights_path):
            if not os.path.isfile(needed):
                raise FileNotFoundError(f"{needed} not found; a saved judge is a folder with {CONFIG_FILE} and "
                                        f"{WEIGHTS_FILE} (train one with `python -m fastdiff.eval.judge --output DIR`)")
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
        # The heads' class order is baked into the weights; a renamed or reordered vocabulary would
        # silently mislabel every prediction, so refuse instead.
        for key, current in (("layouts", LAYOUTS), ("shapes", SHAPES), ("colors", COLOR_NAMES)):
            if tuple(config[key]) != tuple(current):
                raise ValueError(f"{path}: judge was trained for {key} {config[key]}, the scenes now use "
                                 f"{list(current)}; retrain it")
        judge = cls(config["channels"], config["hidden"])
        try:
            state = load_file(weights_path)
        except Exception as exc:  # safetensors' own error type for a damaged or truncated file
            raise ValueError(f"{weights_path} is not a readable safetensors file ({exc}); retrain or restore it") \
                from exc
        bad = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise ValueError(f"{weights_path}: {bad[0]} holds NaN or infinite values; retrain or restore it")
        judge.load_state_dict(state)
        judge.training_record = config.get("training", {})
        return judge.to(device).eval()


def resize_to_judge(images: Tensor) -> Tensor:
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)


def judge_scene(rng: random.Random):
    """Scenes from both splits in their natural proportion, so every combination is seen."""
    split = "heldout" if rng.random() < HELDOUT_FRACTION else "train"
    return random_scene(rng, split=split)


def slot_labels(target: dict) -> tuple:
    """A canonical scene's class indices: layout, [shape slot 1, slot 2], [colour slot 1, slot 2];
    a one-object scene's slot 2 repeats slot 1 (masked in the judge's loss, trained with every_slot)."""
    objects = target["objects"] + target["objects"][:1] * (2 - len(target["objects"]))
    return (LAYOUTS.index(target["layout"]), [SHAPES.index(shape) for shape, _ in objects],
            [COLOR_NAMES.index(color) for _, color in objects])


def scene_batch(scenes) -> tuple:
    """Rendered images [B, 3, 64, 64] and label tensors: layout [B], shape/colour [B, 2], slot-2 mask [B]."""
    images = torch.stack([render(scene, IMAGE_SIZE) for scene in scenes])
    layouts, shapes, colors, two = [], [], [], []
    for scene in scenes:
        target = canonical(scene)
        layout, shape, color = slot_labels(target)
        layouts.append(layout)
        shapes.append(shape)
        colors.append(color)
        two.append(len(target["objects"]) == 2)
    return images, {"layout": torch.tensor(layouts), "shape": torch.tensor(shapes),
                    "color": torch.tensor(colors), "two_objects": torch.tensor(two)}


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Mild corruptions of the kinds a small diffusion model's samples show, so the judge grades
    them on content rather than on pixel-perfect rendering: +-2 px shifts, soft edges, colour
    drift, grain. Kept mild so a wrong colour or shape still reads as wrong."""
    b = images.shape[0]
    # Shift with edge padding: the background continues, so no black border becomes a cue.
    pad = 2
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    window = torch.arange(IMAGE_SIZE)
    rows = (offsets[:, 0, None] + window)[:, None, :, None]                     # [B, 1, 64, 1]
    cols = (offsets[:, 1, None] + window)[:, None, None, :]                     # [B, 1, 1, 64]
    images = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    # Gaussian blur on half the batch, sigma 0.3-1.2 px: 5 taps, the tails past +-2 px renormalised away.
    sigma = torch.empty(b).uniform_(0.3, 1.2, generator=gen) * (torch.rand(b, generator=gen) < 0.5)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-taps**2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(-1, keepdim=True)                               # [B, 5]; sigma~0 -> identity
    kernel2d = (kernel[:, :, None] * kernel[:, None, :]).repeat_interleave(3, 0)[:, None]  # [3B, 1, 5, 5]
    blurred = F.conv2d(F.pad(images.reshape(1, 3 * b, IMAGE_SIZE, IMAGE_SIZE), (2, 2, 2, 2), mode="replicate"),
                       kernel2d, groups=3 * b)
    images = blurred.reshape(b, 3, IMAGE_SIZE, IMAGE_SIZE)
    # Colour jitter in [-1, 1] units: contrast 0.85-1.15, brightness +-0.08, per-channel +-0.05. At most
    # 0.28 in all; the closest palette pair (blue, purple) differs by 0.9 in red, so labels stay true.
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.85, 1.15, generator=gen)
    brightness = torch.empty(b, 1, 1, 1).uniform_(-0.08, 0.08, generator=gen)
    channel = torch.empty(b, 3, 1, 1).uniform_(-0.05, 0.05, generator=gen)
    images = images * contrast + brightness + channel
    noise_sigma = torch.empty(b, 1, 1, 1).uniform_(0.0, 0.08, generator=gen)
    images = images + noise_sigma * torch.randn(images.shape, generator=gen)
    return images.clamp(-1, 1)


def judge_loss(out: Dict[str, Tensor], labels: Dict[str, Tensor], every_slot: bool = False) -> Tensor:
    """Cross-entropy of every head; slot 2 of a single-object scene is masked out, or with
    every_slot trained to repeat slot 1 (scene_batch's padding), so that every head means something
    on every image (the scene CLIP reads them all)."""
    mask = torch.ones_like(labels["two_objects"], dtype=torch.float32) if every_slot else labels["two_objects"].float()
    loss = F.cross_entropy(out["layout"], labels["layout"])
    for name in ("shape", "color"):
        loss = loss + F.cross_entropy(out[name][:, 0], labels[name][:, 0])
        per_image = F.cross_entropy(out[name][:, 1], labels[name][:, 1], reduction="none")
        loss = loss + (per_image * mask).sum() / mask.sum().clamp_min(1)
    return loss


def train_judge(steps: int = 1500, batch_size: int = 64, seed: int = JUDGE_SEED, device="cpu",
                progress: bool = True, lr: float = 3e-3, every_slot: bool = False) -> Judge:
    """A judge trained on freshly rendered, augmented scenes (both splits); every batch is new.
    every_slot: see judge_loss (the scene CLIP's reader; the judge itself masks slot 2)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    judge = Judge().to(device).train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero: a short run still ends converged
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training judge", unit="step")
    start = time.perf_counter()
    for step in range(steps):
        images, labels = scene_batch([judge_scene(rng) for _ in range(batch_size)])
        images = augment(images, gen).to(device)
        labels = {k: v.to(device) for k, v in labels.items()}
        loss = judge_loss(judge(images), labels, every_slot)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    judge.training_record = {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr,
                             "every_slot": every_slot,
                             "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    return judge.eval()


def head_accuracy(predictions: Sequence[dict], targets: Sequence[dict]) -> Dict[str, float]:
    """Per-attribute accuracy of each thing the judge reads: layout, and shape and colour of
    slot 1 (every scene) and slot 2 (two-object scenes only)."""
    hits = {"layout": [], "shape_1": [], "color_1": [], "shape_2": [], "color_2": []}
    for pred, target in zip(predictions, targets):
        hits["layout"].append(pred["layout"] == target["layout"])
        for slot, (shape, color) in enumerate(target["objects"], 1):
            got = pred["objects"][slot - 1] if slot <= len(pred["objects"]) else (None, None)
            hits[f"shape_{slot}"].append(got[0] == shape)
            hits[f"color_{slot}"].append(got[1] == color)
    return {name: sum(v) / len(v) for name, v in hits.items() if v}


def measure_judge(judge: Judge, n: int = 2000, seed: int = 2024, split: Optional[str] = None,
                  corrupt: bool = False) -> Dict[str, float]:
    """head_accuracy on n fresh rendered scenes (split None: both, as in training); corrupt=True
    applies the training augmentation, a proxy for imperfect generated images."""
    rng = random.Random(seed)
    scenes = [judge_scene(rng) if split is None else random_scene(rng, split=split) for _ in range(n)]
    images, _ = scene_batch(scenes)
    if corrupt:
        images = augment(images, torch.Generator().manual_seed(seed))
    return head_accuracy(judge.predict(images), [canonical(scene) for scene in scenes])


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastdiff.eval.judge",
                                     description="Train the scene judge on procedural images and save it.")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="scenes per step (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=JUDGE_SEED, help="seed of the judge's own scene stream "
                        "(default: %(default)s)")
    parser.add_argument("--output", default=DEFAULT_JUDGE_DIR, help="folder to save into (default: the packaged "
                        "judge_weights/)")
    parser.add_argument("--n-check", type=int, default=2000, help="fresh scenes per split to measure accuracy on "
                        "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    args = parser.parse_args(argv)
    judge = train_judge(args.steps, args.batch_size, args.seed, progress=not args.no_progress)
    # Seeds 1 and 2 are not the judge's stream (12345) and draw other scenes than training did.
    accuracy = {"train_split": measure_judge(judge, args.n_check, seed=1, split="train"),
                "heldout_split": measure_judge(judge, args.n_check, seed=2, split="heldout"),
                "train_split_corrupted": measure_judge(judge, args.n_check, seed=1, split="train", corrupt=True)}
    judge.training_record["accuracy_on_fresh_scenes"] = {
        k: {h: round(a, 4) for h, a in v.items()} for k, v in accuracy.items()}
    judge.training_record["n_check"] = args.n_check
    judge.save(args.output)
    print(json.dumps(judge.training_record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
