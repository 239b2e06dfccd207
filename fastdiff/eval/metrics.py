"""The reference studies' metrics over `fastdiff sample` runs: IS, FID, KID, CLIP score, PSNR, SSIM,
and, in the shapes domain, FID/KID in the judge's feature space and the judge's attribute accuracy.

    scorers = Scorers(inception=load_inception("pt_inception-2015-12-05-6726825d.pth"),
                      clip=ClipScorer.from_folder("clip-vit-large-patch14"))
    result = evaluate_run("runs/sd15", scorers, reference="val2014/")
    print(format_report([result]))

A run is read in fixed chunks of `batch_size` images (fastdiff.eval.distributed.chunks): each chunk is
loaded, scored and dropped, so 10,000 images at 512 px never sit in memory at once, and under
torchrun each rank scores every world_size-th chunk and the per-image results are gathered in index
order, so the numbers are the same for any number of processes.

The reference images (`reference=`):
- "scenes": the procedural scenes a `--prompts scenes:...` run was drawn from, rendered at the run's
  size (image i's own scene: paired, so PSNR/SSIM mean something).
- a folder: when the manifest names each image's reference (COCO's file_name), image i is paired with
  that file, prepared by image_metrics.prepare_reference (shorter side resized, centre crop) at the
  run's size; otherwise every image in the folder (sorted) is the reference set, unpaired (FID/KID
  only).
Reference features are cached (fastdiff's cache folder, features/), keyed by the feature network's
weights hash, its preprocessing, the reference set (its files' names, sizes and times, or the scenes'
seed, split and count) and the size.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .distributed import ProcessGroup, Ranks, chunks

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_PREPROCESSING = "torch-fidelity-inception-v3: uint8 -> TF1 bilinear 299x299 -> (x - 128) / 128"
JUDGE_PREPROCESSING = "fastdiff-judge: uint8 -> [-1, 1] -> bilinear antialiased 64x64"


@dataclass
class Scorers:
    """The networks a run is scored with; None leaves their metrics out."""
    inception: Optional[object] = None   # fastdiff.eval.inception.InceptionV3 (IS, FID, KID)
    inception_sha256: str = ""            # the weights file's hash, for the reference-feature cache key
    judge: Optional[object] = None       # fastdiff.eval.judge.Judge (judge FID/KID; accuracy on scenes)
    judge_sha256: str = ""
    clip: Optional[object] = None        # fastdiff.eval.image_metrics.ClipScorer (CLIP score)


@dataclass
class Settings:
    """What the metrics are computed with (torch-fidelity's defaults)."""
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_degree: int = 3
    kid_seed: int = 2020
    batch_size: int = 50


def _read_image(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _load_stack(paths: Sequence[str]) -> torch.Tensor:
    images = [_read_image(p) for p in paths]
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise ValueError(f"images of different sizes in one set ({sorted(sizes)[:2]}); a run's images share one")
    return torch.stack(images)


# ---------------------------------------------------------------- reference images

class _References:
    """Reference images, paired with a run's images (`paired`) or a separate set (`paths`)."""

    def __init__(self, source: Optional[str], manifest: List[dict], size):
        self.source, self.size, self.paired, self.paths, self.scenes = source, size, False, [], None
        if source is None:
            return
        if source == "scenes":
            missing = [line["index"] for line in manifest if "scene_seed" not in line]
            if missing:
                raise ValueError(f"reference 'scenes' needs a run of --prompts scenes:...; image {missing[0]} has "
                                 f"no scene")
            from ..data.scenes import sample_scenes

            seeds = {(line["scene_seed"], line["scene_split"]) for line in manifest}
            if len(seeds) != 1:
                raise ValueError("the run's scenes come from more than one seed/split")
            seed, split = seeds.pop()
            self.scenes, self.paired = sample_scenes(len(manifest), seed=seed, split=split), True
            self.identity = {"scenes": split, "seed": seed, "n": len(manifest)}
            return
        if not os.path.isdir(source):
            raise FileNotFoundError(f"reference folder {source} does not exist")
        named = [line.get("file_name") for line in manifest]
        if all(named):
            self.paths, self.paired = [os.path.join(source, name) for name in named], True
            absent = [p for p in self.paths if not os.path.isfile(p)]
            if absent:
                raise FileNotFoundError(f"{len(absent)} reference images named by the manifest are not in {source} "
                                        f"(first: {absent[0]})")
        else:
            self.paths = sorted(os.path.join(source, n) for n in os.listdir(source)
                                if n.lower().endswith(IMAGE_SUFFIXES))
            if not self.paths:
                raise ValueError(f"reference folder {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        stats = [(os.path.relpath(p, source), os.path.getsize(p), int(os.path.getmtime(p))) for p in self.paths]
        self.identity = {"folder": os.path.abspath(source), "files": hashlib.sha256(
            json.dumps(stats).encode()).hexdigest(), "paired": self.paired}

    def __len__(self) -> int:
        return len(self.scenes) if self.scenes is not None else len(self.paths)

    def load(self, indices) -> torch.Tensor:
        height, width = self.size
        if self.scenes is not None:
            from ..data.scenes import render

            if height != width:
                raise ValueError(f"scene renders are square; the run's images are {height}x{width}")
            pixels = torch.stack([render(self.scenes[i], height) for i in indices])
            return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        from .image_metrics import load_reference

        if height != width:
            raise ValueError(f"reference images are centre-cropped squares; the run's images are {height}x{width}")
        return torch.stack([load_reference(self.paths[i], height) for i in indices])


# ---------------------------------------------------------------- per-image scores

def _features(scorers: Scorers, images: torch.Tensor, judge: bool = True) -> Dict[str, np.ndarray]:
    out = {}
    if scorers.inception is not None:
        from .inception import inception_features

        found = inception_features(scorers.inception, images)
        # float32, as torch-fidelity keeps them (fastdiff.eval.fidelity follows the features' precision)
        out["inception_pool"] = np.asarray(found["2048"], dtype=np.float32)
        out["inception_logits"] = np.asarray(found["logits_unbiased"], dtype=np.float32)
    if judge and scorers.judge is not None:
        out["judge_pool"] = scorers.judge.embed(images.float() / 127.5 - 1).numpy()
    return out


def _judge_scores(scorers: Scorers, images: torch.Tensor, lines: List[dict]) -> Dict[str, np.ndarray]:
    """judge_pool, and on scene runs the attribute scores, from one pass of the judge."""
    if scorers.judge is None:
        return {}
    features, predictions = scorers.judge.read(images.float() / 127.5 - 1)
    out = {"judge_pool": features.numpy()}
    if all("scene_seed" in line for line in lines):
        from ..data.scenes import canonical
        from .attributes import METRICS, score_one

        scores = [score_one(p, canonical(line["caption"])) for p, line in zip(predictions, lines)]
        out.update({"judge_" + m: np.array([s[m] for s in scores]) for m in METRICS})
    return out


def _score_chunk(scorers: Scorers, images: torch.Tensor, lines: List[dict], refs: Optional[torch.Tensor]) -> dict:
    out = _features(scorers, images, judge=False)
    out.update(_judge_scores(scorers, images, lines))
    if scorers.clip is not None:
        out["clip"] = scorers.clip.score(images, [line["caption"] for line in lines]).double().numpy()
    if refs is not None:
        from .image_metrics import psnr, ssim

        out["psnr"], out["ssim"] = psnr(refs, images).numpy(), ssim(refs, images).numpy()
        out.update({"ref_" + k: v for k, v in _features(scorers, refs).items() if k != "inception_logits"})
    return out


def _sharded(n: int, batch_size: int, group: ProcessGroup, work) -> Dict[str, np.ndarray]:
    """work(indices) -> {name: per-item array} over every chunk, this rank's chunks first, then all
    ranks' gathered and joined in index order (the same arrays on every rank)."""
    ranks = group.ranks
    mine = {chunk.start: work(list(chunk)) for chunk in chunks(n, batch_size)[ranks.rank::ranks.world_size]}
    every: Dict[int, dict] = {}
    for part in group.gather(mine):
        every.update(part)
    ordered = [every[start] for start in sorted(every)]
    return {key: np.concatenate([part[key] for part in ordered]) for key in ordered[0]} if ordered else {}


# ---------------------------------------------------------------- the reference-feature cache

def _cache_path(cache_dir: Optional[str], key: dict) -> str:
    from ..export.cache import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_root(cache_dir), "features", f"{digest}.npz")


def _cached(path: str, compute) -> Dict[str, np.ndarray]:
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):  # damaged: recomputed and rewritten below
            pass
    import io

    from .batch import write_atomic

    found = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = io.BytesIO()
    np.savez(body, **found)
    write_atomic(path, body.getvalue())
    return found


# ---------------------------------------------------------------- one run

def _check_counts(n: int, n_ref: Optional[int], scorers: Scorers, settings: Settings, folder: str) -> None:
    """The metrics' minimum sizes, checked before any image is read."""
    wants_kid = scorers.inception is not None or scorers.judge is not None
    if wants_kid and n_ref is not None:
        smallest = min(n, n_ref)
        if smallest < settings.kid_subset_size:
            raise ValueError(f"{folder}: KID needs at least kid_subset_size={settings.kid_subset_size} images in each "
                             f"set, the run has {n} and the reference {n_ref}; generate more, or pass a smaller "
                             f"--kid-subset-size (torch-fidelity's default is 1000)")
    if scorers.inception is not None and n < settings.is_splits:
        raise ValueError(f"{folder}: IS over {settings.is_splits} splits needs at least {settings.is_splits} images, "
                         f"the run has {n}")


def evaluate_run(folder: str, scorers: Scorers, *, reference: Optional[str] = None,
                 settings: Optional[Settings] = None, cache_dir: Optional[str] = None,
                 ranks: Optional[Ranks] = None) -> dict:
    """Every metric `scorers` and `reference` allow, for the finished `fastdiff sample` run in `folder`.

    Returns {"folder", "config" (the run's run.json), "n", "reference", "metrics": {name: value}};
    metrics absent from the dict were not asked for (no network, or no paired reference)."""
    from .batch import read_run

    settings = settings or Settings()
    run = read_run(folder)
    manifest = run["manifest"]
    config = run["config"]
    paths = [os.path.join(folder, line["file"]) for line in manifest]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} of the manifest's images are missing (first: {missing[0]})")
    size = tuple(_read_image(paths[0]).shape[-2:])  # the images' own (GLIDE's upsampler makes 4x its base size)
    refs = _References(reference, manifest, size)
    _check_counts(len(manifest), len(refs) if reference else None, scorers, settings, folder)
    group = ProcessGroup(ranks or Ranks.from_env(), "cpu")
    try:
        def work(indices):
            images = _load_stack([paths[i] for i in indices])
            if tuple(images.shape[-2:]) != size:
                raise ValueError(f"{paths[indices[0]]} is {tuple(images.shape[-2:])}, the run says {size}")
            paired = refs.load(indices) if refs.paired else None
            return _score_chunk(scorers, images, [manifest[i] for i in indices], paired)

        per_image = _sharded(len(manifest), settings.batch_size, group, work)
        reference_features = _reference_features(refs, scorers, settings, group, cache_dir, per_image)
    finally:
        group.close()
    metrics = _summaries(per_image, reference_features, scorers, settings)
    return {"folder": os.path.abspath(folder), "config": config, "n": len(manifest), "reference": reference,
            "metrics": metrics}


def _reference_features(refs, scorers, settings, group, cache_dir, per_image) -> Dict[str, np.ndarray]:
    if refs.source is None or (scorers.inception is None and scorers.judge is None):
        return {}
    if refs.paired:  # scored beside the run's images, chunk by chunk
        return {k[4:]: v for k, v in per_image.items() if k.startswith("ref_")}
    key = {"reference": refs.identity, "size": refs.size, "inception": scorers.inception_sha256
           if scorers.inception is not None else None, "judge": scorers.judge_sha256 if scorers.judge else None,
           "preprocessing": [INCEPTION_PREPROCESSING, JUDGE_PREPROCESSING]}
    no_clip = Scorers(inception=scorers.inception, judge=scorers.judge)
    compute = lambda: _sharded(len(refs), settings.batch_size, group,  # noqa: E731
                               lambda idx: _features(no_clip, refs.load(idx)))
    return _cached(_cache_path(cache_dir, key), compute)


def _summaries(per_image, reference, scorers: Scorers, s: Settings) -> Dict[str, float]:
    from .fidelity import fid_from_statistics, fid_statistics, inception_score, kid

    metrics: Dict[str, float] = {}
    if "inception_logits" in per_image:
        metrics["is"], metrics["is_std"] = map(float, inception_score(per_image["inception_logits"],
                                                                      splits=s.is_splits))
    for space, prefix in (("inception_pool", ""), ("judge_pool", "judge_")):
        if space in per_image and space in reference:
            ours, theirs = per_image[space], reference[space]
            metrics[prefix + "fid"] = float(fid_from_statistics(fid_statistics(ours), fid_statistics(theirs)))
            mean, std = kid(ours, theirs, subsets=s.kid_subsets, subset_size=s.kid_subset_size, degree=s.kid_degree,
                            seed=s.kid_seed)
            metrics[prefix + "kid"], metrics[prefix + "kid_std"] = float(mean), float(std)
    for name in ("clip", "psnr", "ssim"):
        if name in per_image:
            metrics[{"clip": "clip_score"}.get(name, name)] = float(np.mean(per_image[name]))
    for key, values in per_image.items():
        if key.startswith("judge_") and key != "judge_pool":
            metrics["accuracy_" + key[6:]] = float(np.mean(values))
    return metrics
