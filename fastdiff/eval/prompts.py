"""Prompt lists for batch generation: a text file, a JSONL file, or MS-COCO's captions file.

    prompts = load_prompts("captions_val2014.json", n=10000, seed=0)
    prompts[i] -> {"index": i, "caption": "...", "image_id": ..., "caption_id": ...}

- text (.txt, any other suffix): one caption per non-blank line, stripped; image i takes line i.
- JSONL (.jsonl): one object per line with an integer "index" and a string "caption"; other keys
  (an "image_id", a "file_name") are kept and written to the manifest. Indices must be unique; the
  list is ordered by index.
- MS-COCO (.json with "images" and "annotations"): the protocol of the reference study (000:
  10,000 images of val2014, one of each image's ~5 captions drawn at random). With
  `random.Random(seed)`: n image ids drawn without replacement from the sorted ids that have a
  caption, then for each (in drawn order) one of its captions, ordered by annotation id. Each
  prompt records image_id, caption_id and file_name, so PSNR/SSIM can find its reference image.

n: the first n prompts (of a text or JSONL file; a text file with fewer lines than n is an
error, not a silent repetition), or the number of COCO images to draw.

- `scenes:heldout` / `scenes:train` (no file): the built-in model's domain, n procedural two-object
  scenes of fastdiff.data.scenes drawn with `seed`; each prompt records scene_split and scene_seed,
  from which `fastdiff metrics` renders the scene itself as the real image. The list's content is
hashed into the run's config, so a restart with a different list is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Dict, List, Optional


class PromptError(ValueError):
    """A prompt file that cannot be read as the format its name says."""


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _from_text(path: str) -> List[Dict]:
    lines = [line.strip() for line in _read_text(path).splitlines()]
    return [{"index": i, "caption": c} for i, c in enumerate(c for c in lines if c)]


def _from_jsonl(path: str) -> List[Dict]:
    prompts, seen = [], set()
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PromptError(f"{path}:{number}: expected an object with 'index' and 'caption'")
        index, caption = record.get("index"), record.get("caption")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise PromptError(f"{path}:{number}: 'index' must be a non-negative integer, got {index!r}")
        if not isinstance(caption, str) or not caption.strip():
            raise PromptError(f"{path}:{number}: 'caption' must be a non-empty string, got {caption!r}")
        if index in seen:
            raise PromptError(f"{path}:{number}: index {index} appears twice")
        seen.add(index)
        prompts.append(dict(record, caption=caption.strip()))
    prompts.sort(key=lambda p: p["index"])
    if prompts and [p["index"] for p in prompts] != list(range(len(prompts))):
        missing = sorted(set(range(prompts[-1]["index"] + 1)) - seen)[:5]
        raise PromptError(f"{path}: indices must run 0..{len(prompts) - 1} without gaps; missing {missing}")
    return prompts


def _coco_captions(path: str, data) -> Dict[int, List[Dict]]:
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) \
            or not isinstance(data.get("images"), list):
        raise PromptError(f"{path}: not an MS-COCO captions file (expected keys 'images' and 'annotations', "
                          f"as captions_val2014.json has)")
    by_image: Dict[int, List[Dict]] = {}
    for number, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise PromptError(f"{path}: annotation {number} has no 'image_id' and 'caption' (an instances or "
                              f"keypoints file? use captions_*.json)")
        if ann["caption"].strip():
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    if not by_image:
        raise PromptError(f"{path}: the COCO file holds no captions")
    return by_image


def _from_coco(path: str, data, n: Optional[int], seed: int) -> List[Dict]:
    by_image = _coco_captions(path, data)
    files = {int(im["id"]): im.get("file_name") for im in data["images"] if isinstance(im, dict) and "id" in im}
    ids = sorted(by_image)
    n = len(ids) if n is None else n
    if n > len(ids):
        raise PromptError(f"{path}: {n} images asked for, but only {len(ids)} images have captions")
    rng = random.Random(seed)
    chosen = rng.sample(ids, n)
    prompts = []
    for index, image_id in enumerate(chosen):
        anns = sorted(by_image[image_id], key=lambda a: a.get("id", 0))
        ann = anns[rng.randrange(len(anns))]
        prompts.append({"index": index, "caption": " ".join(ann["caption"].split()), "image_id": image_id,
                        "caption_id": ann.get("id"), "file_name": files.get(image_id)})
    return prompts


SCENE_SOURCES = ("scenes:heldout", "scenes:train")


def scene_prompts(n: int, seed: int = 0, split: str = "heldout") -> List[Dict]:
    """n scene captions of fastdiff.data.scenes (sample_scenes(n, seed, split)), in its order."""
    from ..data.scenes import sample_scenes

    return [{"index": i, "caption": scene.caption, "scene_split": split, "scene_seed": seed}
            for i, scene in enumerate(sample_scenes(n, seed=seed, split=split))]


def load_prompts(path: str, n: Optional[int] = None, seed: int = 0) -> List[Dict]:
    """The prompts of `path` (see the module's docstring), the first `n` of them (COCO: n drawn)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if path.startswith("scenes:") and not os.path.exists(path):
        if path not in SCENE_SOURCES:
            raise PromptError(f"{path!r}: the scene sources are {', '.join(SCENE_SOURCES)}")
        if n is None:
            raise ValueError(f"{path} is generated: give the number of images (n)")
        return scene_prompts(n, seed, path.split(":")[1])
    if path.endswith(".jsonl"):
        prompts = _from_jsonl(path)
    elif path.endswith(".json"):
        text = _read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        return _from_coco(path, data, n, seed)
    else:
        prompts = _from_text(path)
    if not prompts:
        raise PromptError(f"{path}: holds no captions")
    if n is not None:
        if n > len(prompts):
            raise PromptError(f"{path}: {n} images asked for, but the file holds {len(prompts)} captions")
        prompts = prompts[:n]
    return prompts


def prompts_digest(prompts: List[Dict]) -> str:
    """sha256 of the prompt list's canonical JSON (what a run's config records)."""
    text = json.dumps(prompts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
