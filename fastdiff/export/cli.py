"""`fastdiff export onnx`: a model's networks to ONNX, each graph checked in ONNX Runtime.

Registered by fastdiff/cli.py through add_export_parser(subparsers); func(args) returns the
exit code. Every option is checked (fastdiff.export.check_options, the output folder, the
packages) before the model is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..cli_args import (CliError, add_glide_model_arguments, api_errors, check_folder_writable, command, int_in,
                        load_glide_pipeline, load_pipeline)


def step_counts(text: str) -> dict:
    """--step "dpmpp_2m:20,50;ddim:50" -> {"dpmpp_2m": [20, 50], "ddim": [50]}."""
    from ..sampling.names import SAMPLER_NAMES

    step = {}
    for part in filter(None, text.split(";")):
        sampler, _, counts = part.partition(":")
        if sampler not in SAMPLER_NAMES:
            raise argparse.ArgumentTypeError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLER_NAMES)}")
        try:
            step[sampler] = [int(n) for n in counts.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: give SAMPLER:N[,N...] with step counts N") from None
        if any(n < 1 for n in step[sampler]):
            raise argparse.ArgumentTypeError(f"{part!r}: step counts must be positive")
    if not step:
        raise argparse.ArgumentTypeError(f"no sampler given in {text!r}")
    return step


def static_shape(text: str) -> dict:
    """--static 1x512x512 -> {"batch_size": 1, "height": 512, "width": 512}."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give BATCHxHEIGHTxWIDTH with positive integers, e.g. 1x512x512")
    return dict(zip(("batch_size", "height", "width"), map(int, parts)))


def _cmd_export_onnx(args) -> int:
    import torch

    import fastdiff.export

    with api_errors("OUT_DIR"):
        out = os.path.abspath(fastdiff.export.check_out_dir(args.out_dir))
    check_folder_writable(out, "OUT_DIR")
    options = dict(opset=args.opset, verify=not args.no_verify, dtype=args.dtype, io_dtype=args.io_dtype,
                   static=args.static, optimize=args.optimize)
    with api_errors():
        fastdiff.export.check_options(**options)
    try:
        fastdiff.export.require_packages(verify=not args.no_verify or args.optimize is not None)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    if args.glide is not None:
        if args.model is not None:
            raise CliError("give MODEL or --glide BASE_PT, not both")
        pipe = load_glide_pipeline(args, torch.device("cpu"), torch.float32)
    else:
        glide_only = [flag for flag, value in (("--glide-upsampler", args.glide_upsampler),
                                               ("--glide-inpaint", args.glide_inpaint),
                                               ("--glide-clip", args.glide_clip)) if value]
        if glide_only:
            raise CliError(f"{', '.join(glide_only)} need --glide BASE_PT")
        pipe = load_pipeline(args.model, torch.device("cpu"), torch.float32, tokenizer=args.tokenizer)
    start = time.perf_counter()
    with api_errors():
        manifest = fastdiff.export.onnx(pipe, out, step=args.step, progress=lambda what: print(what, file=sys.stderr),
                                        **options)
    for g in manifest["graphs"] + manifest.get("step_graphs", []):
        checked = (f"ONNX Runtime vs PyTorch max error {g['max_abs_error']:.2g} (bound {g['bound']:.2g})"
                   if manifest["verified"] else "not verified")
        print(f"{g['file']}: {g['dtype']}, {checked}")
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s (manifest: fastdiff_onnx.json)")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    export = subparsers.add_parser("export", help="export a model's networks (onnx)",
                                   description="Export a model's networks to another runtime's format.")
    formats = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser(
        "onnx", help="a model's networks to ONNX (Stable Diffusion in optimum's layout, VQ-Diffusion, GLIDE)",
        description="Exports a model's networks to ONNX: Stable Diffusion's text encoder, UNet, VAE encoder and "
                    "decoder in optimum's folder layout and input/output names (a diffusers folder, a single file "
                    "with --tokenizer, or the built-in model); VQ-Diffusion's text encoder, transformer and VQ-VAE "
                    "decoder (a diffusers folder); GLIDE's text transformers and U-Nets (--glide BASE_PT ...). "
                    "Standard operators only (every ONNX Runtime execution provider takes them), batch/height/width "
                    "dynamic unless --static. Each graph is run in ONNX Runtime on other shapes and held to the "
                    "PyTorch module; the errors are printed and kept in OUT_DIR/fastdiff_onnx.json. "
                    "fastdiff.Pipeline.from_onnx(OUT_DIR) runs the folder.",
        epilog="examples: fastdiff export onnx path/to/sd15 sd15-onnx --dtype float16 | fastdiff export onnx "
               "sd-onnx --step dpmpp_2m:20 | fastdiff export onnx --glide base.pt --glide-upsampler upsample.pt "
               "--glide-tokenizer bpe/ glide-onnx")
    onnx.add_argument("model", nargs="?", default=None, help="model folder or single file (default: the built-in "
                      "model)")
    onnx.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    onnx.add_argument("--opset", type=int_in(18, 21), default=18, help="ONNX opset, 18 to 21; from 21 GroupNorm is "
                      "written as the standard GroupNormalization operator (default: %(default)s)")
    onnx.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                      help="the networks' precision; in float16 the VAEs and the softmax/normalisation statistics "
                           "stay float32 (default: %(default)s)")
    onnx.add_argument("--io-dtype", choices=("float32", "float16"), default=None,
                      help="the graphs' floating inputs and outputs (default: --dtype)")
    onnx.add_argument("--static", type=static_shape, default=None, metavar="BATCHxHEIGHTxWIDTH",
                      help="fix every axis: images per call and their size in pixels (e.g. 1x512x512; the guided "
                           "networks take twice the batch); default: dynamic")
    onnx.add_argument("--optimize", choices=("cuda",), default=None,
                      help="after the check, fuse GroupNorm/LayerNorm/convolutions into ONNX Runtime contrib ops "
                           "that only its CUDA execution provider runs")
    onnx.add_argument("--tokenizer", default=None, help="tokenizer folder, for a single-file model")
    onnx.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check of each graph")
    onnx.add_argument("--step", type=step_counts, default=None, metavar="SAMPLER:N[,N...][;...]",
                      help="Stable Diffusion: also export the whole guided step of each sampler as one graph, with "
                           "the coefficient table of each step count N (e.g. dpmpp_2m:20,50;ddim:50)")
    add_glide_model_arguments(onnx.add_argument_group("GLIDE (openai/glide-text2im checkpoints)"))
    onnx.set_defaults(func=command(_cmd_export_onnx))
    return onnx
