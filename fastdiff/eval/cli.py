"""`fastdiff eval`: attribute accuracy of a text-to-image model on held-out scene captions.

Registered by fastdiff/cli.py through add_eval_parser(subparsers); func(args) returns the exit code.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

from ..cli_args import (CliError, api_errors, check_folder_writable, check_writable, command, finite_float,
                        image_suffix, save_image)
from .judge_files import CONFIG_FILE, DEFAULT_JUDGE_DIR

DEFAULT_SCALES = (1.0, 3.0, 5.0, 8.0)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    from ..sampling.names import SAMPLER_NAMES

    parser = subparsers.add_parser(
        "eval", help="attribute accuracy (shape, colour, position) of a model on held-out scene captions",
        description="Generates one image per held-out two-object scene caption (combinations the model never saw "
                    "in training) at each guidance scale, reads each image back with an independent CNN judge "
                    "trained only on procedural renders, and reports shape, colour, layout, position and "
                    "all-correct accuracy per scale, with the judge's own accuracy on the real renders as its "
                    "ceiling. Nothing is downloaded.",
        epilog="example: fastdiff eval --model path/to/model --n 200 --scales 1 3 5 8 --output eval.md "
               "--grid eval.png")
    parser.add_argument("--model", default=None, help="model folder for fastdiff.Pipeline.from_pretrained "
                        "(default: the package's built-in default model)")
    parser.add_argument("--judge", default=DEFAULT_JUDGE_DIR, metavar="PATH",
                        help="folder of a saved judge (judge.json + judge.safetensors); if it holds none, a judge "
                             "is trained and saved there (default: the packaged judge)")
    parser.add_argument("--judge-steps", type=int, default=1500, help="training steps when a judge has to be "
                        "trained (default: %(default)s, a few minutes on two CPU cores)")
    parser.add_argument("--n", type=int, default=200, help="held-out captions, one image each per scale "
                        "(default: %(default)s)")
    parser.add_argument("--scales", type=finite_float, nargs="+", default=list(DEFAULT_SCALES), metavar="SCALE",
                        help="classifier-free guidance scales (default: 1 3 5 8)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps per image (default: %(default)s)")
    parser.add_argument("--sampler", choices=list(SAMPLER_NAMES), help="sampler (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=50, help="captions per generate() call; with --seed it "
                        "fixes the noise (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="picks the captions and the noise (default: %(default)s)")
    parser.add_argument("--output", metavar="MD", help="also write the results as a markdown file")
    parser.add_argument("--grid", metavar="PNG", help="write a grid of samples: real renders, then each scale "
                        "(.png, .jpg, .webp, ...: written in that format)")
    parser.add_argument("--grid-count", type=int, default=8, help="captions in the grid (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="turn the progress bars off")
    parser.set_defaults(func=run_eval)
    return parser


def _load_pipeline(model):
    """The pipeline, or None after printing why not."""
    import fastdiff

    try:
        pipe = fastdiff.Pipeline() if model is None else fastdiff.Pipeline.from_pretrained(model)
    except Exception as exc:  # a loader can fail in many ways; all of them end the command the same way
        where = "the built-in default model" if model is None else model
        print(f"error: could not load {where}: {exc}", file=sys.stderr)
        return None
    if not callable(getattr(pipe, "generate", None)):
        print("error: fastdiff has no built-in default model yet; pass --model FOLDER", file=sys.stderr)
        return None
    return pipe


def _load_or_train_judge(path: str, steps: int, progress: bool):
    from .judge import Judge, train_judge

    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return Judge.load(path)
    print(f"no judge in {path}; training one ({steps} steps) and saving it there", file=sys.stderr)
    judge = train_judge(steps=steps, progress=progress)
    judge.save(path)
    return judge


def _report(args, results: dict, elapsed: float) -> str:
    from .attributes import METRIC_NOTES, format_table

    model = args.model or "built-in default model"
    date = datetime.date.today().isoformat()
    return (f"# Attribute accuracy\n\n"
            f"Model `{model}`; {results['n']} held-out two-object captions (seed {args.seed}), "
            f"{args.steps} steps, sampler {args.sampler or 'pipeline default'}, batch {args.batch_size}; "
            f"judge `{args.judge}`; {elapsed:.0f} s in all; {date}.\n\n"
            f"{format_table(results)}\n\nPercent of images. Metrics:\n\n{METRIC_NOTES}")


def _write_grid(path: str, results: dict) -> None:
    from .attributes import image_grid

    import torch

    samples = results["samples"]
    count = samples["real"].shape[0]
    images = torch.cat([samples[key] for key in samples])
    labels = ["real: " + c for c in results["captions"][:count]]
    for scale in results["scales"]:
        labels += [f"cfg {scale:g}: " + c for c in results["captions"][:count]]
    save_image(image_grid(images, labels, columns=count), path)


def _check_outputs(args) -> None:
    """Every file the run writes at its end, checked before the run (it takes minutes)."""
    if args.output:
        check_writable(args.output, "--output")
    if args.grid:
        image_suffix(args.grid, "--grid", required=True)
        check_writable(args.grid, "--grid")
    if not os.path.isfile(os.path.join(args.judge, CONFIG_FILE)):  # a judge will be trained and saved there
        if os.path.exists(args.judge) and not os.path.isdir(args.judge):
            raise CliError(f"--judge: {args.judge} is a file, not a folder of a saved judge")
        check_folder_writable(args.judge, "--judge")


@command
def run_eval(args) -> int:
    problems = [f"--{name.replace('_', '-')} must be positive" for name in ("n", "steps", "batch_size", "judge_steps",
                                                                            "grid_count") if getattr(args, name) < 1]
    if problems:
        raise CliError("; ".join(problems))
    _check_outputs(args)
    pipe = _load_pipeline(args.model)  # before the judge: a bad --model should not cost a judge training
    if pipe is None:
        return 2
    from .attributes import evaluate, format_table

    start = time.perf_counter()
    with api_errors():
        judge = _load_or_train_judge(args.judge, args.judge_steps, not args.no_progress)
        results = evaluate(pipe, judge, n=args.n, guidance_scales=args.scales, steps=args.steps, seed=args.seed,
                           sampler=args.sampler, batch_size=args.batch_size, progress=not args.no_progress,
                           keep_images=min(args.grid_count, args.n) if args.grid else 0)
    elapsed = time.perf_counter() - start
    print(format_table(results))
    if args.output:
        if os.path.dirname(args.output):
            os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(_report(args, results, elapsed))
        print(f"wrote {args.output}")
    if args.grid:
        _write_grid(args.grid, results)
        print(f"wrote {args.grid}")
    return 0
