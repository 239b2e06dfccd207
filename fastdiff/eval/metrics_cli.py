"""`fastdiff metrics`: IS, FID, KID, CLIP score, PSNR, SSIM (and the judge's FID/KID and accuracy) of
`fastdiff sample` runs, as a JSON report and a markdown table.

Registered by fastdiff/cli.py through add_metrics_parser(subparsers); the work is
fastdiff.eval.metrics.evaluate_run.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..cli_args import CliError, api_errors, check_device, check_writable, command, positive_int
from .judge_files import DEFAULT_JUDGE_DIR, WEIGHTS_FILE


def add_metrics_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "metrics", help="IS, FID, KID, CLIP score, PSNR, SSIM of `fastdiff sample` runs",
        description="Scores finished `fastdiff sample` runs. IS/FID/KID use torch-fidelity's InceptionV3 "
                    "(pt_inception-2015-12-05, the network behind the field's reference numbers) from a file you "
                    "name, checked by its hash; nothing is downloaded. --judge scores in the built-in judge's "
                    "feature space instead (the shapes domain: no Inception needed) and adds its attribute "
                    "accuracy for scene runs. CLIP score needs a local transformers CLIP folder; PSNR/SSIM need a "
                    "reference paired with each image (COCO's file_name in the manifest, or the scenes). Runs "
                    "under torchrun too: the same numbers for any number of processes.",
        epilog="examples:\n  fastdiff metrics runs/g1 runs/g3 --reference scenes --judge --output-md table.md\n"
               "  fastdiff metrics runs/sd15 --reference val2014/ --inception-weights "
               "pt_inception-2015-12-05-6726825d.pth --clip clip-vit-large-patch14/ --output-json sd15.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="folders written by `fastdiff sample`")
    parser.add_argument("--reference", metavar="SOURCE", help="the real images: a folder (paired by the manifest's "
                        "file_name when it has one, else the whole folder as the reference set), or 'scenes' (the "
                        "procedural scenes a --prompts scenes:... run was drawn from, rendered)")
    parser.add_argument("--inception-weights", metavar="PATH", help="the FID InceptionV3 weights: torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth (pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                        "is the same file); fetch it yourself, fastdiff never downloads")
    parser.add_argument("--inception-sha256", metavar="HEX", help="the hash (or its leading hex digits) the "
                        "weights file must have (default: torch-fidelity's file's, 6726825d)")
    parser.add_argument("--judge", nargs="?", const=DEFAULT_JUDGE_DIR, metavar="DIR", help="also score in the judge's "
                        "feature space (FID/KID) and its attribute accuracy on scene runs (default DIR: the packaged "
                        "judge)")
    parser.add_argument("--clip", metavar="DIR", help="a local transformers CLIPModel folder, for CLIP score")
    parser.add_argument("--is-splits", type=positive_int, default=10, help="IS splits (default: %(default)s)")
    parser.add_argument("--kid-subsets", type=positive_int, default=100, help="KID subsets (default: %(default)s)")
    parser.add_argument("--kid-subset-size", type=positive_int, default=1000, help="images per KID subset; each set "
                        "needs at least this many (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images scored at once (default: "
                        "%(default)s)")
    parser.add_argument("--cache-dir", metavar="DIR", help="where reference features are cached (default: "
                        "$FASTDIFF_CACHE, else ~/.cache/fastdiff)")
    parser.add_argument("--output-json", metavar="PATH", help="write the report (every setting, every metric) as JSON")
    parser.add_argument("--output-md", metavar="PATH", help="write the markdown table")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.set_defaults(func=run_metrics)
    return parser


def _scorers(args, device):
    from .metrics import Scorers

    scorers = Scorers()
    with api_errors():
        if args.inception_weights:
            from .inception import INCEPTION_SHA256, load_inception, sha256_of

            expected = args.inception_sha256 or INCEPTION_SHA256
            scorers.inception = load_inception(args.inception_weights, sha256=expected, device=device)
            scorers.inception_sha256 = scorers.inception.file_sha256 or sha256_of(args.inception_weights)
        if args.judge:
            from .inception import sha256_of
            from .judge import Judge

            scorers.judge = Judge.load(args.judge, device=device)
            scorers.judge_sha256 = sha256_of(os.path.join(args.judge, WEIGHTS_FILE))
        if args.clip:
            from .image_metrics import ClipScorer

            scorers.clip = ClipScorer.from_folder(args.clip, device=device)
    return scorers


@command
def run_metrics(args) -> int:
    from . import report
    from .batch import read_run
    from .distributed import Ranks
    from .metrics import Settings, evaluate_run

    if not (args.inception_weights or args.judge or args.clip or args.reference):
        raise CliError("nothing to compute: pass --inception-weights (IS/FID/KID), --judge, --clip or --reference "
                       "(PSNR/SSIM)")
    if args.inception_sha256 and not args.inception_weights:
        raise CliError("--inception-sha256 checks --inception-weights; pass the weights file too")
    for path, flag in ((args.output_json, "--output-json"), (args.output_md, "--output-md")):
        if path:
            check_writable(path, flag)
    with api_errors():
        for run in args.runs:
            read_run(run)  # every run finished, before any network is loaded
        ranks = Ranks.from_env()
    device = check_device(args.device)
    scorers = _scorers(args, device)
    settings = Settings(is_splits=args.is_splits, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                        batch_size=args.batch_size)
    results = []
    with api_errors():
        for run in args.runs:
            results.append(evaluate_run(run, scorers, reference=args.reference, settings=settings,
                                        cache_dir=args.cache_dir, ranks=ranks))
    if ranks.rank != 0:
        return 0
    networks = {k: v for k, v in (("inception", args.inception_weights and os.path.abspath(args.inception_weights)),
                                  ("inception_sha256", scorers.inception_sha256 or None),
                                  ("judge", args.judge and os.path.abspath(args.judge)),
                                  ("clip", args.clip and os.path.abspath(args.clip))) if v}
    print(report.format_table(results))
    if args.output_json:
        report.write_json(args.output_json, report.report(results, settings, networks))
        print(f"wrote {args.output_json}", file=sys.stderr)
    if args.output_md:
        report.write(args.output_md, report.markdown(results, settings, networks))
        print(f"wrote {args.output_md}", file=sys.stderr)
    return 0
