"""Training data as resumable batch streams of (images [B, 3, S, S] in [-1, 1], captions).

Two sources: the procedural scenes of fastdiff.data.scenes (endless, seeded, nothing to
download) and a user's images with captions (a folder of ``name.png`` + ``name.txt``,
or a JSONL of ``{"image": path, "text": caption}``). Both produce their batches in the
main process from their own seeded state, and ``state_dict()`` captures the position,
so a resumed run reads exactly the batches an uninterrupted run would have read.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from ..data.scenes import random_scene, render, sample_scenes, vocabulary

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ProceduralScenes:
    """The same stream as ``SceneDataset(size, seed, split)`` read in the main process, with its position."""

    def __init__(self, size: int, seed: int, split: str = "train", two_object_prob: float = 0.75,
                 place_prob: float = 0.0, placed_pair_prob: float = 0.0):
        self.size, self.split = size, split
        self.mix = dict(two_object_prob=two_object_prob, place_prob=place_prob, placed_pair_prob=placed_pair_prob)
        self.seed = seed
        self._rng = random.Random(seed * 1000)  # SceneDataset's seeding for worker 0 / the main process

    def next_batch(self, batch_size: int) -> Tuple[Tensor, List[str]]:
        scenes = [random_scene(self._rng, split=self.split, **self.mix) for _ in range(batch_size)]
        return torch.stack([render(s, self.size) for s in scenes]), [s.caption for s in scenes]

    def tokenizer_texts(self) -> List[str]:
        """Captions to learn the BPE merges from: a fixed sample plus every word on its own, so no
        word of the scene grammar is left unmerged however rare."""
        return [s.caption for s in sample_scenes(2000, seed=12345, **self.mix)] + vocabulary()

    def state_dict(self) -> Dict:
        return {"rng": self._rng.getstate()}

    def load_state_dict(self, state: Dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))


def load_image(path: str, size: int) -> np.ndarray:
    """[size, size, 3] uint8: shorter side resized to `size` (bicubic), then centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def _folder_pairs(folder: str) -> List[Tuple[str, str]]:
    names = sorted(os.listdir(folder))
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise ValueError(f"no images in {folder}: expected pairs of name.png (or .jpg/.jpeg/.webp/.bmp) "
                         f"and name.txt holding its caption")
    pairs = []
    for name in images:
        caption_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        if not os.path.isfile(caption_path):
            raise FileNotFoundError(f"caption file missing for {os.path.join(folder, name)}: "
                                    f"expected {caption_path}")
        with open(caption_path, encoding="utf-8") as fh:
            caption = " ".join(fh.read().split())
        if not caption:
            raise ValueError(f"empty caption in {caption_path}")
        pairs.append((os.path.join(folder, name), caption))
    return pairs


def _jsonl_pairs(path: str) -> List[Tuple[str, str]]:
    base, pairs = os.path.dirname(os.path.abspath(path)), []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image, text = record["image"], record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}, line {number}: expected a JSON object with 'image' and 'text'") from None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}, line {number}: empty or non-string 'text'")
            pairs.append((image if os.path.isabs(image) else os.path.join(base, image), " ".join(text.split())))
    if not pairs:
        raise ValueError(f"{path} lists no images")
    return pairs


class ImageCaptionFiles:
    """A user's images with captions, decoded once into memory (uint8), shuffled per epoch from the seed."""

    def __init__(self, path: str, size: int, seed: int):
        if not os.path.exists(path):
            raise FileNotFoundError(f"training data not found: {path} (give a folder of name.png + name.txt "
                                    f"pairs, a .jsonl file, or 'procedural')")
        pairs = _folder_pairs(path) if os.path.isdir(path) else _jsonl_pairs(path)
        self.paths = [p for p, _ in pairs]
        self.captions = [c for _, c in pairs]
        self.images = torch.from_numpy(np.stack([load_image(p, size) for p in self.paths]))  # [N, S, S, 3]
        self.seed, self.epoch, self.position = seed, 0, 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.captions)

    def _permutation(self, epoch: int) -> Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def next_batch(self, batch_size: int) -> Tuple[Tensor, List[str]]:
        index = []
        while len(index) < batch_size:
            if self.position == len(self):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(batch_size - len(index), len(self) - self.position)
            index += self._order[self.position:self.position + take].tolist()
            self.position += take
        pixels = self.images[index].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return pixels, [self.captions[i] for i in index]

    def tokenizer_texts(self) -> List[str]:
        return list(self.captions)

    def state_dict(self) -> Dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def make_dataset(data: str, size: int, seed: int, **mix):
    """'procedural' or a path (folder or .jsonl) -> a batch stream with state_dict()/load_state_dict().
    `mix` (two_object_prob, place_prob, placed_pair_prob) sets the procedural scenes' mix."""
    if data == "procedural":
        return ProceduralScenes(size, seed, **mix)
    return ImageCaptionFiles(data, size, seed)
