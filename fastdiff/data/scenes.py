"""Procedural scenes of coloured shapes with captions made from the same attributes.

"a red circle", or "a red circle above a blue square" (above / below / to the left of /
to the right of). Generated on the fly from a seed; nothing to download. A fixed tenth
of the two-object combinations is held out of training, so a model can be judged on
captions it never saw, made of attributes it did.

Two optional wordings name where each object stands instead of how the two stand to each
other: "a red circle at the top" (one object in one of the two-object scenes' places: at the
top / at the bottom / on the left / on the right), and "a red circle at the top and a blue
square at the bottom" (a two-object scene described place by place). They tie each place word
to a region of the image directly; a relation ("above") only says where one object is
relative to the other, which a model must otherwise work out from the pairs alone.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from .shapes import COLORS, SHAPES

RELATIONS = ("above", "below", "to the left of", "to the right of")
PLACES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}
# the places of the first- and second-mentioned object of each relation
RELATION_PLACES = {"above": ("top", "bottom"), "below": ("bottom", "top"),
                   "to the left of": ("left", "right"), "to the right of": ("right", "left")}
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
    places: Optional[Tuple[str, ...]] = None  # when set, the caption names each object's place (PLACES)

    @property
    def caption(self) -> str:
        named = [f"a {o.color} {o.shape}" for o in self.objects]
        if self.places is not None:
            return " and ".join(f"{name} {PLACES[place]}" for name, place in zip(named, self.places))
        if len(named) == 1:
            return named[0]
        return f"{named[0]} {self.relation} {named[1]}"


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


def random_scene(rng: random.Random, *, split: str = "train", two_object_prob: float = 0.75,
                 place_prob: float = 0.0, placed_pair_prob: float = 0.0) -> Scene:
    """A random scene; split "train" avoids held-out combinations, "heldout" uses only them.

    place_prob: the share of one-object scenes put in one of the four places and captioned
    with it ("a red circle on the left"); placed_pair_prob: the share of two-object scenes
    (train split only) captioned place by place ("... at the top and ... at the bottom").
    A pair's held-out status is its relation caption's, so the held-out split stays unseen in
    either wording. With both at 0 the stream is the one earlier versions drew.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; valid: train, heldout")
    for name, value in (("two_object_prob", two_object_prob), ("place_prob", place_prob),
                        ("placed_pair_prob", placed_pair_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    background = rng.choice(BACKGROUNDS)
    if split == "train" and rng.random() > two_object_prob:
        if place_prob > 0 and rng.random() < place_prob:
            place = rng.choice(list(PLACES))
            along, across = rng.uniform(0.24, 0.28), rng.uniform(0.38, 0.62)
            obj = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), *_centre(place, along, across),
                      rng.uniform(0.12, 0.17))
            return Scene((obj,), None, background, (place,))
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
    first_place, second_place = RELATION_PLACES[relation]
    oa = Obj(a[1], a[0], *_centre(first_place, along, across[0]), r1)
    ob = Obj(b[1], b[0], *_centre(second_place, along, across[1]), r2)
    places = None
    if split == "train" and placed_pair_prob > 0 and rng.random() < placed_pair_prob:
        places = RELATION_PLACES[relation]
    return Scene((oa, ob), relation, background, places)


def _centre(place: str, along: float, across: float) -> Tuple[float, float]:
    """(cx, cy) of an object in `place`: `along` from the image centre towards that side, at
    `across` on the other axis. Two-object scenes and placed single objects share it."""
    offset = 0.5 - along if place in ("top", "left") else 0.5 + along
    return (across, offset) if place in ("top", "bottom") else (offset, across)


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
    words = " ".join(caption.strip().lower().split())
    if words.endswith(tuple(f" {phrase}" for phrase in PLACES.values())):
        parts = words.split(" and ")
        if len(parts) > 2:
            raise ValueError(f"not a scene caption: {caption!r} (at most two objects)")
        placed = [_parse_placed(part) for part in parts]
        objects, places = tuple(o for o, _ in placed), tuple(p for _, p in placed)
        relation = None
        if len(places) == 2:
            relation = next((r for r, pair in RELATION_PLACES.items() if pair == places), None)
            if relation is None:
                raise ValueError(f"not a scene caption: {caption!r} (two objects need opposite places: "
                                 f"top and bottom, or left and right)")
        return Scene(objects, relation, places=places)
    for relation in RELATIONS:
        token = f" {relation} "
        if token in words:
            left, right = words.split(token)
            return Scene((_parse_object(left), _parse_object(right)), relation)
    return Scene((_parse_object(words),))


def _parse_placed(text: str) -> Tuple[Obj, str]:
    for place, phrase in PLACES.items():
        if text.endswith(f" {phrase}"):
            return _parse_object(text[:-len(phrase) - 1]), place
    raise ValueError(f"not a scene caption: {text!r} (each object needs a place: {', '.join(PLACES.values())})")


def _parse_object(text: str) -> Obj:
    parts = text.split()
    if len(parts) != 3 or parts[0] not in ("a", "an") or parts[1] not in COLORS or parts[2] not in SHAPES:
        raise ValueError(f"not a scene caption: {text!r} (expected 'a <colour> <shape>' with colour in "
                         f"{', '.join(COLORS)} and shape in {', '.join(SHAPES)})")
    return Obj(parts[2], parts[1])


class SceneDataset(torch.utils.data.IterableDataset):
    """An endless, seeded stream of (image [3, size, size] in [-1, 1], caption)."""

    def __init__(self, size: int = 64, seed: int = 0, split: str = "train", two_object_prob: float = 0.75,
                 place_prob: float = 0.0, placed_pair_prob: float = 0.0):
        self.size, self.seed, self.split, self.two_object_prob = size, seed, split, two_object_prob
        self.place_prob, self.placed_pair_prob = place_prob, placed_pair_prob

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, str]]:
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (worker.id if worker else 0))
        while True:
            scene = random_scene(rng, split=self.split, two_object_prob=self.two_object_prob,
                                 place_prob=self.place_prob, placed_pair_prob=self.placed_pair_prob)
            yield render(scene, self.size), scene.caption


def sample_scenes(n: int, seed: int = 0, split: str = "train", two_object_prob: float = 0.75,
                  place_prob: float = 0.0, placed_pair_prob: float = 0.0) -> List[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, split=split, two_object_prob=two_object_prob, place_prob=place_prob,
                         placed_pair_prob=placed_pair_prob) for _ in range(n)]


def vocabulary() -> List[str]:
    """Every word a scene caption can use, in any wording."""
    words = {"a", "and"} | set(COLORS) | set(SHAPES)
    for phrase in (*RELATIONS, *PLACES.values()):
        words |= set(phrase.split())
    return sorted(words)
