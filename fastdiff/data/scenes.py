"""Procedural scenes of coloured shapes with captions made from the same attributes.

"a red circle", or "a red circle above a blue square" (above / below / to the left of /
to the right of). Generated on the fly from a seed; nothing to download. A fixed tenth
of the two-object combinations is held out of training, so a model can be judged on
captions it never saw, made of attributes it did.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch

from .shapes import COLORS, SHAPES

RELATIONS = ("above", "below", "to the left of", "to the right of")
BACKGROUNDS = ((0.96, 0.96, 0.96), (0.90, 0.92, 0.95), (0.95, 0.93, 0.88), (0.88, 0.88, 0.88))
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.2


@dataclass(frozen=True)
class Scene:
    objects: Tuple[Obj, ...]
    relation: Optional[str] = None  # how objects[0] stands to objects[1]
    background: Tuple[float, float, float] = BACKGROUNDS[0]

    @property
    def caption(self) -> str:
        a = self.objects[0]
        if len(self.objects) == 1:
            return f"a {a.color} {a.shape}"
        b = self.objects[1]
        return f"a {a.color} {a.shape} {self.relation} a {b.color} {b.shape}"


def is_heldout(first: Tuple[str, str], relation: str, second: Tuple[str, str]) -> bool:
    """Deterministic ~10% of (colour shape, relation, colour shape) combinations."""
    key = f"{first[0]} {first[1]}|{relation}|{second[0]} {second[1]}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) / 2**32 < HELDOUT_FRACTION


def _mask(obj: Obj, size: int) -> torch.Tensor:
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy, r = xx - obj.cx, yy - obj.cy, obj.radius
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        return (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    return (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)  # triangle, apex up


def render(scene: Scene, size: int = 64) -> torch.Tensor:
    """[3, size, size] in [-1, 1]."""
    img = torch.tensor(scene.background, dtype=torch.float32).view(3, 1, 1).repeat(1, size, size)
    for obj in scene.objects:
        rgb = torch.tensor(COLORS[obj.color], dtype=torch.float32).view(3, 1, 1)
        img = torch.where(_mask(obj, size), rgb.expand_as(img), img)
    return img * 2 - 1


def random_scene(rng: random.Random, *, split: str = "train", two_object_prob: float = 0.75) -> Scene:
    """A random scene; split "train" avoids held-out combinations, "heldout" uses only them."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; valid: train, heldout")
    background = rng.choice(BACKGROUNDS)
    if split == "train" and rng.random() > two_object_prob:
        r = rng.uniform(0.16, 0.26)
        obj = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), r)
        return Scene((obj,), None, background)
    while True:
        a = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        b = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        relation = rng.choice(RELATIONS)
        if a != b and is_heldout(a, relation, b) == (split == "heldout"):
            break
    r1, r2 = rng.uniform(0.12, 0.17), rng.uniform(0.12, 0.17)
    along = rng.uniform(0.24, 0.28)       # offset from the centre along the relation's axis
    across = rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.62)
    sign = -1 if relation in ("above", "to the left of") else 1
    first_pos, second_pos = 0.5 + sign * along, 0.5 - sign * along
    if relation in ("above", "below"):
        oa = Obj(a[1], a[0], across[0], first_pos, r1)
        ob = Obj(b[1], b[0], across[1], second_pos, r2)
    else:
        oa = Obj(a[1], a[0], first_pos, across[0], r1)
        ob = Obj(b[1], b[0], second_pos, across[1], r2)
    return Scene((oa, ob), relation, background)


def canonical(scene_or_caption) -> dict:
    """What a judge should read off the image, independent of how the caption words it:
    layout ("single", "vertical" or "horizontal") and the objects top-to-bottom or left-to-right."""
    scene = parse_caption(scene_or_caption) if isinstance(scene_or_caption, str) else scene_or_caption
    objs = [(o.shape, o.color) for o in scene.objects]
    if len(objs) == 1:
        return {"layout": "single", "objects": objs}
    layout = "vertical" if scene.relation in ("above", "below") else "horizontal"
    if scene.relation in ("below", "to the right of"):
        objs = objs[::-1]
    return {"layout": layout, "objects": objs}


def parse_caption(caption: str) -> Scene:
    """The inverse of Scene.caption (positions left at defaults)."""
    words = caption.strip().lower()
    for relation in RELATIONS:
        token = f" {relation} "
        if token in words:
            left, right = words.split(token)
            return Scene((_parse_object(left), _parse_object(right)), relation)
    return Scene((_parse_object(words),))


def _parse_object(text: str) -> Obj:
    parts = text.split()
    if len(parts) != 3 or parts[0] not in ("a", "an") or parts[1] not in COLORS or parts[2] not in SHAPES:
        raise ValueError(f"not a scene caption: {text!r} (expected 'a <colour> <shape>' with colour in "
                         f"{', '.join(COLORS)} and shape in {', '.join(SHAPES)})")
    return Obj(parts[2], parts[1])


class SceneDataset(torch.utils.data.IterableDataset):
    """An endless, seeded stream of (image [3, size, size] in [-1, 1], caption)."""

    def __init__(self, size: int = 64, seed: int = 0, split: str = "train", two_object_prob: float = 0.75):
        self.size, self.seed, self.split, self.two_object_prob = size, seed, split, two_object_prob

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, str]]:
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (worker.id if worker else 0))
        while True:
            scene = random_scene(rng, split=self.split, two_object_prob=self.two_object_prob)
            yield render(scene, self.size), scene.caption


def sample_scenes(n: int, seed: int = 0, split: str = "train", two_object_prob: float = 0.75) -> List[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, split=split, two_object_prob=two_object_prob) for _ in range(n)]


def vocabulary() -> List[str]:
    """Every word a scene caption can use."""
    words = {"a"} | set(COLORS) | set(SHAPES)
    for relation in RELATIONS:
        words |= set(relation.split())
    return sorted(words)
