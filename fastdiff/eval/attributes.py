"""Attribute accuracy of a text-to-image pipeline on held-out scene captions.

The captions come from the held-out split of fastdiff.data.scenes: two-object combinations
(colour shape, relation, colour shape) a generator trained on the train split never saw, made
of attributes it did. Each caption is generated once per guidance scale; the judge reads each
image back and the reading is compared with the caption's canonical form. The same judge's
score on the real renders of the same scenes is reported alongside, as its ceiling.
"""
from __future__ import annotations

import inspect
import textwrap
import time
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from ..data.scenes import canonical, render, sample_scenes
from .judge import IMAGE_SIZE, resize_to_judge

METRICS = ("shape", "colour", "layout", "position", "all", "bound")
METRIC_TITLES = {"shape": "shape", "colour": "colour", "layout": "layout", "position": "position",
                 "all": "all correct", "bound": "objects, any order"}
METRIC_NOTES = """\
- **shape** / **colour**: the judge's shape / colour in each canonical slot (top-to-bottom or
  left-to-right) equals the caption's, averaged over the two slots.
- **layout**: the objects are stacked on the caption's axis (vertical for above/below,
  horizontal for left/right of).
- **position**: layout right *and* the objects in the caption's order: matching the judge's two
  objects to the caption's slot by slot agrees on more attributes (shape and colour) than
  matching them swapped. A tie (e.g. colours in place but the shapes exchanged between them)
  counts as wrong.
- **all correct**: layout and every shape and colour right, in order (the whole caption).
- **objects, any order**: the caption's objects, each with its own shape and colour, are the ones
  drawn, in either order (attribute binding without position): it tells binding errors (a red
  square for a red circle) from placement errors (the right objects the wrong way round).
- **real images**: the judge on the held-out scenes' own renders, its ceiling on these captions.
"""


def _attribute_matches(a, b) -> int:
    return int(a[0] == b[0]) + int(a[1] == b[1])


def score_one(prediction: dict, target: dict) -> Dict[str, float]:
    """The metrics of one image (see METRIC_NOTES), each in [0, 1]."""
    predicted, wanted = prediction["objects"], target["objects"]
    slots = [(predicted[i] if i < len(predicted) else (None, None), wanted[i]) for i in range(len(wanted))]
    layout_right = prediction["layout"] == target["layout"]
    if len(wanted) == 2 and len(predicted) == 2:
        in_order = sum(_attribute_matches(p, w) for p, w in slots)
        swapped = _attribute_matches(predicted[0], wanted[1]) + _attribute_matches(predicted[1], wanted[0])
        order_right = in_order > swapped
    else:  # one object has no order; a count mismatch is already a layout error
        order_right = len(wanted) == len(predicted)
    return {"shape": sum(p[0] == w[0] for p, w in slots) / len(slots),
            "colour": sum(p[1] == w[1] for p, w in slots) / len(slots),
            "layout": float(layout_right),
            "position": float(layout_right and order_right),
            "all": float(layout_right and list(map(tuple, predicted)) == list(map(tuple, wanted))),
            "bound": float(sorted(map(tuple, predicted)) == sorted(map(tuple, wanted)))}


def attribute_scores(predictions: Sequence[dict], targets: Sequence[dict]) -> Dict[str, float]:
    """Mean of score_one over images."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"need as many predictions as targets (got {len(predictions)} and {len(targets)}), "
                         f"at least one")
    per_image = [score_one(p, t) for p, t in zip(predictions, targets)]
    return {metric: sum(s[metric] for s in per_image) / len(per_image) for metric in METRICS}


def _generate_options(pipe, sampler: Optional[str]) -> dict:
    """Extra keywords for generate(): the sampler when one is asked for, and progress=False when
    generate takes it (our own bar counts batches; a per-step bar inside would interleave with it)."""
    options = {} if sampler is None else {"sampler": sampler}
    try:
        parameters = inspect.signature(pipe.generate).parameters
    except (TypeError, ValueError):
        return options
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "progress" in parameters or takes_any:
        options["progress"] = False
    return options


def _to_judge_input(images, expected: int) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"pipe.generate(..., output_type='pt') must return a tensor [B, 3, H, W] in [0, 1], "
                        f"got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] != expected or images.shape[1] != 3:
        raise ValueError(f"pipe.generate returned shape {tuple(images.shape)} for {expected} captions; "
                         f"expected [{expected}, 3, H, W]")
    return resize_to_judge(images.detach().float().cpu() * 2 - 1)


def evaluate(pipe, judge, n: int = 200, guidance_scales: Sequence[float] = (1, 3, 5, 8), steps: int = 30,
             seed: int = 0, sampler: Optional[str] = None, batch_size: int = 50, progress: bool = True,
             keep_images: int = 0) -> dict:
    """Attribute accuracy of `pipe` on n held-out two-object captions at each guidance scale.

    pipe.generate(captions, guidance_scale=s, num_inference_steps=steps, seed=..., output_type="pt")
    must return [B, 3, H, W] in [0, 1] (resized to 64 for the judge). Batch b (captions from index
    start) gets seed `seed + start` at every scale, so the scales are compared on the same noise;
    results therefore depend on batch_size as well as seed. keep_images > 0 keeps the first
    keep_images images of each scale (and their real renders) in results["samples"] for a grid.

    Returns {"n", "steps", "seed", "sampler", "batch_size", "captions", "real": metrics,
    "scales": {scale: metrics}, "seconds": {scale: generation time}, "samples": {...}}.
    """
    if n < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n, steps and batch_size must be positive, got {n}, {steps}, {batch_size}")
    if not guidance_scales:
        raise ValueError("give at least one guidance scale")
    scenes = sample_scenes(n, seed=seed, split="heldout")
    captions = [scene.caption for scene in scenes]
    targets = [canonical(scene) for scene in scenes]
    real = torch.stack([render(scene, IMAGE_SIZE) for scene in scenes])
    results = {"n": n, "steps": steps, "seed": seed, "sampler": sampler, "batch_size": batch_size,
               "captions": captions, "real": attribute_scores(judge.predict(real), targets),
               "scales": {}, "seconds": {}, "samples": {}}
    if keep_images:
        results["samples"]["real"] = (real[:keep_images] + 1) / 2
    options = _generate_options(pipe, sampler)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(guidance_scales) * n, desc="generating", unit="img")
    for scale in guidance_scales:
        scale = float(scale)
        start_time, generated = time.perf_counter(), []
        for start in range(0, n, batch_size):
            batch = captions[start:start + batch_size]
            images = pipe.generate(batch, guidance_scale=scale, num_inference_steps=steps, seed=seed + start,
                                   output_type="pt", **options)
            generated.append(_to_judge_input(images, len(batch)))
            if bar is not None:
                bar.set_postfix(scale=f"{scale:g}")
                bar.update(len(batch))
        results["seconds"][scale] = round(time.perf_counter() - start_time, 2)
        generated = torch.cat(generated)
        results["scales"][scale] = attribute_scores(judge.predict(generated), targets)
        if keep_images:
            results["samples"][scale] = (generated[:keep_images] + 1) / 2
    if bar is not None:
        bar.close()
    return results


def format_table(results: dict) -> str:
    """Markdown: the judge on real images, then one row per guidance scale; metrics in percent."""
    header = "| guidance scale | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)

    def row(label: str, metrics: dict) -> str:
        return f"| {label} | " + " | ".join(f"{100 * metrics[m]:.1f}" for m in METRICS) + " |"

    rows = [row("real images (judge)", results["real"])]
    rows += [row(f"{scale:g}", metrics) for scale, metrics in results["scales"].items()]
    return "\n".join([header, rule, *rows])


def image_grid(images, captions: Sequence[str], columns: Optional[int] = None, scale: int = 2):
    """A PIL image of tiles (a tensor [B, 3, H, W] in [0, 1], or PIL images), each caption wrapped below."""
    from PIL import Image, ImageDraw, ImageFont

    if isinstance(images, Tensor):
        pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        tiles = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    else:
        tiles = [image.convert("RGB") for image in images]
    if len(tiles) != len(captions) or not tiles:
        raise ValueError(f"need one caption per image (got {len(tiles)} images, {len(captions)} captions)")
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    columns = columns or min(len(tiles), 8)
    rows = -(-len(tiles) // columns)
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 3
    chars_per_line = max(8, int(tile_w / max(1.0, font.getlength("abcdefghij") / 10)))
    wrapped = [textwrap.wrap(c, chars_per_line) or [""] for c in captions]
    text_h = max(len(lines) for lines in wrapped) * line_h + 4
    pad = 4
    grid = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * (tile_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for index, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x = pad + (index % columns) * (tile_w + pad)
        y = pad + (index // columns) * (tile_h + text_h + pad)
        grid.paste(tile, (x, y))
        for number, line in enumerate(lines):
            draw.text((x, y + tile_h + 2 + number * line_h), line, fill="black", font=font)
    return grid
