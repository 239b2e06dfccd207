"""A CLIP-like pair of encoders for the built-in model's scenes, for CLIP guidance on it.

fastdiff's contrastive CLIP guidance (fastdiff.guidance.ContrastiveClipGuidance) needs image and
caption embeddings in one space. OpenAI's CLIP knows nothing of these procedural scenes and is
not on this machine, so the scenes get a small pair of their own, in attribute space:

- image side: an attribute reader -- the judge's network (eval/judge.py), trained apart from the
  judge on its own seed stream (24680; the judge's is 12345) with every head trained on every
  image (slot 2 of a one-object scene repeats slot 1) -- whose five heads (layout, shape and
  colour of slots 1 and 2) give probabilities, at a temperature of 16 (TEMPERATURE says why);
  each head's block is their square root (a unit vector: the Hellinger embedding), the five
  concatenated.
- text side: the caption's canonical attributes (fastdiff.data.scenes.canonical: any wording of
  the same scene reads the same) as the same five blocks, one-hot; a one-object caption repeats
  its object in slot 2, as the reader was trained to.

So cos(image, caption) is the mean over the five heads of sqrt(p(the caption's class)): 1 when
the reader is sure of every attribute the caption names, less for each it doubts. The reader
shares the judge's architecture and task, so its opinion is close to the judge's: a rise in the
judge's accuracy under this guidance is partly the guide agreeing with the judge, and KID
against real renders is the independent measure (README, "Steering").

    clip = SceneClip.load()                      # the packaged scene_clip_weights/
    guidance = ContrastiveClipGuidance(clip, captions, [scene_distractors(c, 3) for c in captions], 100.0)
    pipe.generate(captions, sampler="ddpm", guidance_scale=1.0, clip_guidance=guidance)

`python -m fastdiff.eval.scene_clip --output DIR` trains and saves a reader.
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.scenes import COLORS, SHAPES, Obj, Scene, canonical
from .judge import (COLOR_NAMES, LAYOUTS, Judge, head_accuracy, measure_judge, resize_to_judge, slot_labels,
                    train_judge)

DEFAULT_SCENE_CLIP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scene_clip_weights")
READER_SEED = 24680  # not the judge's 12345 nor a generator's stream: the guide never trains on their scenes
# Cosines lie in [0, 1]; a caption one attribute of five off scores 0.2 lower with a sure reader,
# so at 10 a sure image gives the target e^2 ~ 7 times a one-off distractor's probability.
LOGIT_SCALE = 10.0
# The reader is trained to certainty, so its probabilities jump from 0 to 1 across a thin band of
# images and their gradient spikes there (per-image gradient norms to 40 against a median ~0.1 at
# gamma 10, 20 DDPM steps on the built-in model). Its logits divided by 16 widen that band (the same
# argmax, so the same readings); in a pilot (100 held-out captions, prompt seed 7, CFG 1) the judge's
# all-correct rate under contrastive guidance went 0.84 unguided -> 0.74 at temperature 1, gamma 100;
# -> 0.94 at 4, gamma 10; -> 0.97 at 16, gamma 30 and 100.
TEMPERATURE = 16.0


class SceneClip(nn.Module):
    """encode_image(images in [-1, 1]) -> [B, 19]; encode_text(captions) -> [P, 19]; logit_scale.
    Differentiable in the images, and batch-independent (the reader runs in eval mode)."""

    def __init__(self, reader: Judge, logit_scale: float = LOGIT_SCALE, temperature: float = TEMPERATURE):
        super().__init__()
        self.temperature = float(temperature)
        self.reader = reader.eval()
        for p in self.reader.parameters():
            p.requires_grad_(False)
        self.logit_scale = float(logit_scale)

    def train(self, mode: bool = True) -> "SceneClip":
        super().train(mode)
        self.reader.eval()  # BatchNorm's running statistics, always: an image's embedding is its own
        return self

    def encode_image(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        device = next(self.reader.parameters()).device
        out = self.reader(resize_to_judge(images.to(device, torch.float32)))
        heads = [out["layout"], out["shape"][:, 0], out["color"][:, 0], out["shape"][:, 1], out["color"][:, 1]]
        # sqrt(softmax) as exp(log_softmax / 2): no infinite slope where a probability is ~0.
        return torch.cat([torch.exp(0.5 * torch.log_softmax(h / self.temperature, dim=-1)) for h in heads], dim=-1)

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        if isinstance(captions, str):
            captions = [captions]
        rows = []
        for caption in captions:
            # canonical(): a ValueError naming the caption when it is not a scene caption
            layout, shapes, colors = slot_labels(canonical(caption))
            labels = [(layout, len(LAYOUTS)), (shapes[0], len(SHAPES)), (colors[0], len(COLOR_NAMES)),
                      (shapes[1], len(SHAPES)), (colors[1], len(COLOR_NAMES))]
            rows.append(torch.cat([F.one_hot(torch.tensor(i), n).float() for i, n in labels]))
        return torch.stack(rows).to(next(self.reader.parameters()).device)

    def save(self, path: str) -> None:
        self.reader.save(path)
        with open(os.path.join(path, "scene_clip.json"), "w", encoding="utf-8") as fh:
            json.dump({"logit_scale": self.logit_scale, "temperature": self.temperature,
                       "reader": "judge.json + judge.safetensors (eval/judge.py)"}, fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str = DEFAULT_SCENE_CLIP_DIR, device="cpu") -> "SceneClip":
        config_path = os.path.join(path, "scene_clip.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found; a saved scene CLIP is a folder with scene_clip.json "
                                    f"and a reader (train one with `python -m fastdiff.eval.scene_clip --output DIR`)")
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
        for key in ("logit_scale", "temperature"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{config_path}: {key} must be a positive number, got {value!r}")
        return cls(Judge.load(path, device), float(config["logit_scale"]), float(config["temperature"]))


def scene_distractors(caption: str, n: int) -> List[str]:
    """Up to n captions a guided image should not match: the caption's objects swapped, their
    colours or shapes exchanged, then one object recoloured or reshaped; never a wording of the
    caption's own scene (canonical() tells), never the same scene twice."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of distractors must be a positive integer, got {n!r}")
    target = canonical(caption)
    objects = target["objects"]

    def recoloured(obj, colour):
        return (obj[0], colour)

    def reshaped(obj, shape):
        return (shape, obj[1])

    if len(objects) == 1:
        (shape, colour), = objects
        colours = [recoloured(objects[0], c) for c in COLORS if c != colour]
        shapes = [reshaped(objects[0], s) for s in SHAPES if s != shape]
        variants = [[v] for i in range(len(colours)) for v in colours[i:i + 1] + shapes[i:i + 1]]
    else:
        (s1, c1), (s2, c2) = objects
        variants = [[objects[1], objects[0]], [(s1, c2), (s2, c1)], [(s2, c1), (s1, c2)]]
        for slot in (0, 1):
            for c in COLORS:
                variants.append([recoloured(o, c) if i == slot else o for i, o in enumerate(objects)])
            for s in SHAPES:
                variants.append([reshaped(o, s) if i == slot else o for i, o in enumerate(objects)])
    seen, out = {_key(target)}, []
    for objs in variants:
        scene = {"layout": target["layout"], "objects": [tuple(o) for o in objs]}
        if _key(scene) not in seen:
            seen.add(_key(scene))
            out.append(_caption(scene))
    return out[:n]


def _key(scene: dict) -> tuple:
    return scene["layout"], tuple(scene["objects"])


def _caption(scene: dict) -> str:
    """A canonical scene's caption (objects top-to-bottom or left-to-right, as canonical() orders them)."""
    relation = {"single": None, "vertical": "above", "horizontal": "to the left of"}[scene["layout"]]
    return Scene(tuple(Obj(shape, colour) for shape, colour in scene["objects"]), relation).caption


def measure_reader(clip: SceneClip, n: int = 2000) -> dict:
    """The reader's head accuracy on fresh renders (seeds 1 and 2, as the judge's record) and
    how often the target caption wins the softmax against 3 distractors on them."""
    import random

    from ..data.scenes import random_scene, render

    rng = random.Random(3)
    scenes = [random_scene(rng, split="train") for _ in range(n)]
    images = torch.stack([render(scene) for scene in scenes])
    captions = [scene.caption for scene in scenes]
    with torch.no_grad():
        z_image = F.normalize(clip.encode_image(images), dim=-1)
        wins = 0
        for i, caption in enumerate(captions):
            z_text = F.normalize(clip.encode_text([caption, *scene_distractors(caption, 3)]), dim=-1)
            wins += int((z_text @ z_image[i]).argmax().item() == 0)
    heads = head_accuracy(clip.reader.predict(images), [canonical(scene) for scene in scenes])
    return {"heads": heads, "target_wins_vs_3_distractors": wins / n,
            "heldout_split": measure_judge(clip.reader, n, seed=2, split="heldout")}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastdiff.eval.scene_clip",
                                     description="Train the scene CLIP's attribute reader and save the pair.")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=READER_SEED, help="seed of the reader's scene stream "
                        "(default: %(default)s)")
    parser.add_argument("--output", default=DEFAULT_SCENE_CLIP_DIR, help="folder to save into (default: the "
                        "packaged scene_clip_weights/)")
    parser.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    args = parser.parse_args(argv)
    reader = train_judge(args.steps, seed=args.seed, progress=not args.no_progress, every_slot=True)
    clip = SceneClip(reader)
    reader.training_record["accuracy_on_fresh_scenes"] = measure_reader(clip)
    clip.save(args.output)
    print(json.dumps(reader.training_record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
