"""`fastdiff sample`: N images for evaluation, one process or many (torchrun), resumable.

Registered by fastdiff/cli.py through add_sample_parser(subparsers); the work is
fastdiff.eval.batch.sample_images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli_args import (CliError, add_glide_model_arguments, api_errors, check_device, command, finite_float,
                        load_glide_pipeline, load_pipeline, positive_int, random_seed)

PROMPTS_HELP = ("captions: a text file (one per line), a JSONL file ({\"index\", \"caption\", ...} per line), "
                "MS-COCO's captions_val2014.json (one caption drawn per image with --prompt-seed, as the "
                "reference study did; image and caption ids recorded), or scenes:heldout / scenes:train (the "
                "built-in model's procedural scenes, which `fastdiff metrics` can render as the real images)")


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    from ..sampling.names import SAMPLER_NAMES

    parser = subparsers.add_parser(
        "sample", help="generate N images for evaluation (per-image seeds, torchrun, resumable)",
        description="Generates image i of a caption list as OUT/{i:06d}.png for every i not made yet. Image i's "
                    "noise depends only on --seed and i (its own generator), and it is always made in the same "
                    "batch of --batch-size, so any number of processes gives the same bytes. Run under torchrun "
                    "(or anything that sets RANK, WORLD_SIZE, LOCAL_RANK) to split the work: one GPU per process "
                    "(cuda:LOCAL_RANK), or CPU processes (gloo). Each image is written atomically with a line in "
                    "its rank's manifest; run the same command again to resume a stopped run (a different run's "
                    "folder is refused). Ends with OUT/manifest.jsonl (index, caption, seed, model, sampler, steps, "
                    "guidance per image) and OUT/run.json (every setting, hashed).",
        epilog="examples:\n  fastdiff sample --prompts scenes:heldout --num-images 500 --output runs/builtin-g3 "
               "--guidance 3\n"
               "  torchrun --standalone --nproc_per_node=2 -m fastdiff sample --model sd15/ "
               "--prompts annotations/captions_val2014.json --num-images 10000 --output runs/sd15",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, metavar="SOURCE", help=PROMPTS_HELP)
    parser.add_argument("--output", required=True, metavar="DIR", help="the run's folder (created; reused to resume)")
    parser.add_argument("--num-images", type=positive_int, metavar="N", help="number of images (default: every "
                        "caption of a text/JSONL file, every captioned COCO image; required for scenes)")
    parser.add_argument("--prompt-seed", type=random_seed, default=0, help="draws COCO captions / scenes "
                        "(default: %(default)s)")
    parser.add_argument("--model", default=None, help="model folder (diffusers layout: SD, VQ-Diffusion, an ONNX "
                        "export) or SD single file (default: the built-in model)")
    add_glide_model_arguments(parser.add_argument_group("GLIDE (instead of --model)"))
    parser.add_argument("--seed", type=random_seed, default=0, help="run seed: image i's generator is seeded with a "
                        "hash of (seed, i), recorded in the manifest (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--sampler", choices=list(SAMPLER_NAMES), help="sampler (default: the model's)")
    parser.add_argument("--negative-prompt", help="negative prompt for every image (latent diffusion)")
    parser.add_argument("--height", type=positive_int, help="image height (default: the model's)")
    parser.add_argument("--width", type=positive_int, help="image width (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (one CFG call "
                        "of 2x); part of the run's settings (default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when available, else cpu)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights' dtype "
                        "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    add_clip_guidance_arguments(parser.add_argument_group(
        "CLIP guidance (reference 003: contrastive sampling, or the spherical-distance baseline)"))
    parser.set_defaults(func=run_sample)
    return parser


CLIP_GUIDANCE_HELP = ("steer every image by gamma times the gradient of a CLIP's log p(caption | image) (off by "
                      "default; the README's table uses 100 on the built-in model, with --sampler ddpm --guidance 1)")


def add_clip_guidance_arguments(group, with_scale: bool = True) -> None:
    """--clip-guidance GAMMA (unless the command has its own), --clip-loss, --clip, --distractors."""
    if with_scale:
        group.add_argument("--clip-guidance", type=finite_float, metavar="GAMMA", help=CLIP_GUIDANCE_HELP)
    group.add_argument("--clip-loss", choices=["contrastive", "spherical"],
                       help="contrastive: softmax of the caption against --distractors others (003); spherical: "
                       "the spherical distance to the caption alone (default: contrastive)")
    group.add_argument("--clip", metavar="DIR", help="a scene CLIP folder (python -m fastdiff.eval.scene_clip; "
                       "default: the packaged one, made for the built-in model's scenes); GLIDE's guidance reads its "
                       "noised CLIP (--glide-clip) instead")
    group.add_argument("--distractors", type=positive_int, metavar="N", help="distractors per caption "
                       "for --clip-loss contrastive: the caption's scene with its objects swapped, recoloured or "
                       "reshaped, so scene captions only (default: 3)")


def clip_guidance_options(args, pipe, captions):
    """(options_for(batch captions) -> generate() keywords, what they are as a dict) from
    --clip-guidance etc., or (None, None); every caption's distractors are made here, so a caption
    that is not a scene's fails before any work."""
    if args.clip_guidance is None:
        given = [flag for flag, value in (("--clip", args.clip), ("--clip-loss", args.clip_loss),
                                          ("--distractors", args.distractors)) if value is not None]
        if given:
            raise CliError(f"{'/'.join(given)} shape CLIP guidance; give --clip-guidance GAMMA too")
        return None, None
    loss = args.clip_loss or "contrastive"
    if loss == "spherical" and args.distractors is not None:
        raise CliError("--distractors are for --clip-loss contrastive; the spherical distance reads one caption")
    n_distractors = 3 if args.distractors is None else args.distractors
    from ..guidance import ContrastiveClipGuidance, SphericalClipGuidance

    if args.glide:
        if args.clip is not None:
            raise CliError("with --glide, CLIP guidance uses GLIDE's noised CLIP (--glide-clip DIR), not --clip")
        if getattr(pipe, "clip", None) is None:
            raise CliError("CLIP guidance with --glide needs its noised CLIP: --glide-clip DIR")
        clip, clip_name = pipe.clip, "glide:" + os.path.abspath(args.glide_clip)
    else:
        from .scene_clip import DEFAULT_SCENE_CLIP_DIR, SceneClip

        folder = args.clip or DEFAULT_SCENE_CLIP_DIR
        with api_errors("--clip"):
            clip = SceneClip.load(folder, device=pipe.device)
        clip_name = "built-in" if args.clip is None else os.path.abspath(args.clip)
    gamma = args.clip_guidance
    if loss == "spherical":
        def options_for(captions):
            return {"clip_guidance": SphericalClipGuidance(clip, captions, gamma)}
    else:
        from .scene_clip import scene_distractors

        with api_errors("--clip-loss contrastive makes each caption's distractors from its scene"):
            distractors = {c: scene_distractors(c, n_distractors) for c in captions}

        def options_for(captions):
            return {"clip_guidance": ContrastiveClipGuidance(clip, captions, [distractors[c] for c in captions],
                                                             gamma)}
    extra = {"clip_guidance": {"scale": gamma, "loss": loss, "clip": clip_name,
                               "distractors": n_distractors if loss == "contrastive" else None}}
    return options_for, extra


def _device(args, ranks):
    import torch

    if args.device is None and torch.cuda.is_available():
        return check_device(f"cuda:{ranks.local_rank % torch.cuda.device_count()}")
    return check_device(args.device)


def _model_name(args) -> str:
    if args.glide:
        return "glide:" + os.path.abspath(args.glide)
    return "built-in" if args.model is None else os.path.abspath(args.model)


@command
def run_sample(args) -> int:
    import torch

    from .batch import Ranks, sample_images
    from .prompts import load_prompts

    if args.glide and args.model:
        raise CliError("give --model or --glide, not both")
    with api_errors():
        ranks = Ranks.from_env()
        prompts = load_prompts(args.prompts, n=args.num_images, seed=args.prompt_seed)
    device = _device(args, ranks)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.glide:
        pipe = load_glide_pipeline(args, device, dtype)
    else:
        pipe = load_pipeline(args.model, device, dtype)
    options_for, extra_config = clip_guidance_options(args, pipe, [p["caption"] for p in prompts])
    with api_errors():
        summary = sample_images(pipe, prompts, args.output, model=_model_name(args), seed=args.seed,
                                num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                                batch_size=args.batch_size, height=args.height, width=args.width,
                                negative_prompt=args.negative_prompt, progress=not args.no_progress, ranks=ranks,
                                options_for=options_for, extra_config=extra_config)
    if ranks.rank == 0:
        print(json.dumps(summary), file=sys.stdout)
    return 0
