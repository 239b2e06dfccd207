"""The metrics report: one JSON with every setting and a markdown table in the layout of the
reference study's Table 2 (model x IS, FID, KID, CLIP score, PSNR, SSIM), with the judge's
columns for runs in the shapes domain."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from typing import List, Sequence

# (metric key, column title, format); a column shows only when some run has its metric.
COLUMNS = (("is", "IS ↑", "{:.2f}"), ("fid", "FID ↓", "{:.2f}"), ("kid", "KID ↓", "{:.4f}"),
           ("clip_score", "CLIP score ↑", "{:.2f}"), ("psnr", "PSNR ↑", "{:.2f}"), ("ssim", "SSIM ↑", "{:.4f}"),
           ("judge_fid", "FID (judge) ↓", "{:.3f}"), ("judge_kid", "KID (judge) ↓", "{:.4f}"),
           ("accuracy_all", "judge: all correct ↑", "{:.1%}"), ("accuracy_position", "judge: position ↑", "{:.1%}"))


def run_label(result: dict) -> str:
    config = result.get("config", {})
    model = config.get("model") or result["folder"]
    model = model if model == "built-in" else os.path.basename(model.rstrip("/")) or model
    return f"{model} ({os.path.basename(result['folder'].rstrip('/'))})"


def _cell(value, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return fmt.format(value)


def format_table(results: Sequence[dict]) -> str:
    shown = [c for c in COLUMNS if any(c[0] in r["metrics"] for r in results)]
    header = "| model (run) | guidance | images | " + " | ".join(title for _, title, _ in shown) + " |"
    rule = "|---|---:|---:|" + "---:|" * len(shown)
    rows = []
    for r in results:
        guidance = r.get("config", {}).get("guidance_scale")
        cells = [_cell(r["metrics"].get(key), fmt) for key, _, fmt in shown]
        rows.append(f"| {run_label(r)} | {_cell(guidance, '{:g}')} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def report(results: Sequence[dict], settings, networks: dict) -> dict:
    """The JSON report: every setting, the networks (with hashes) and each run's metrics."""
    return {"date": datetime.date.today().isoformat(), "settings": dataclasses.asdict(settings),
            "networks": networks, "runs": list(results)}


def markdown(results: Sequence[dict], settings, networks: dict) -> str:
    lines: List[str] = [
        "# Evaluation", "", format_table(results), "",
        f"IS over {settings.is_splits} splits of the unbiased logits; FID from the pool features; KID "
        f"over {settings.kid_subsets} subsets of {settings.kid_subset_size} with the polynomial kernel of degree "
        f"{settings.kid_degree} (torch-fidelity's defaults). PSNR / SSIM per image against its own reference "
        f"(uint8, data range 255; SSIM with Wang et al.'s Gaussian window, sigma 1.5), then averaged; CLIP "
        f"score 100 * max(cos, 0) per image, averaged.", "",
        "Networks: " + (", ".join(f"{k} `{v}`" for k, v in networks.items()) or "none") + ".",
        f"{datetime.date.today().isoformat()}.", ""]
    return "\n".join(lines)


def write(path: str, text: str) -> None:
    """`text` into `path` (its folder made), atomically: a reader never sees half a report."""
    from .batch import write_atomic

    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, text.encode("utf-8"))


def write_json(path: str, body: dict) -> None:
    write(path, json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
