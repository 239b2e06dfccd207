"""``fastdiff train``: parses options into a TrainConfig and calls fastdiff.train.train.

fastdiff/cli.py wires it in with ``add_train_parser(subparsers)``.
"""
from __future__ import annotations

import argparse
import shlex

from ..cli_args import CliError, api_errors, check_device, check_folder_writable, command
from .config import (BETA_SCHEDULES, LR_SCHEDULES, PRECISIONS, PREDICTION_TYPES, PRESETS, ProceduralData, preset,
                     with_section)

DESCRIPTION = """\
Trains a small latent text-to-image model from scratch and saves it as a diffusers
Stable Diffusion folder that `fastdiff generate --model OUTPUT` runs.

Stage 1 trains a KL autoencoder (VAE) and saves OUTPUT/vae. Stage 2 trains the UNet
and a CLIP text encoder on the frozen VAE's latents and writes the whole pipeline
folder (unet, vae, text_encoder, tokenizer, scheduler, model_index.json) plus
TRAINING.md, which records this command, the config, losses and wall time.
Checkpoints in OUTPUT/checkpoints let --resume continue a run exactly.

Options left out keep the preset's value (see fastdiff/train/config.py)."""

EXAMPLES = """\
examples:
  fastdiff train --preset tiny --output /tmp/tiny --no-progress      # seconds, a smoke test
  fastdiff train --preset default --output shapes-64 --threads 2     # the shipped 64x64 model
  fastdiff train --output shapes-64 --resume --steps 4000            # continue it to 4000 steps
  fastdiff train --data my_images/ --output mine                     # name.png + name.txt pairs"""


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a small text-to-image model (VAE, UNet, text encoder) into a diffusers folder",
        description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="architecture and hyper-parameters to start from: 'tiny' trains in seconds (tests), "
                        "'default' is the 64x64 model with 4x8x8 latents (default: %(default)s)")
    p.add_argument("-o", "--output", required=True,
                   help="folder to write the pipeline, TRAINING.md and checkpoints into")
    p.add_argument("--data", default="procedural",
                   help="'procedural' (generated coloured-shape scenes with captions), a folder of name.png + "
                        "name.txt pairs, or a .jsonl of {\"image\": path, \"text\": caption} lines; images are "
                        "resized and centre-cropped to the model size (default: %(default)s)")
    p.add_argument("--place-prob", type=float, metavar="P",
                   help="procedural data: the share of one-object scenes put at the top/bottom/left/right and "
                        "captioned with the place, e.g. 'a red circle on the left'; these tie the place words to image "
                        "regions, which relation captions alone did not teach the default model "
                        f"(default {ProceduralData.place_prob:g})")
    p.add_argument("--placed-pair-prob", type=float, metavar="P",
                   help="procedural data: the share of two-object scenes captioned place by place, e.g. 'a red "
                        "circle at the top and a blue square at the bottom', instead of by relation "
                        f"(default {ProceduralData.placed_pair_prob:g})")
    p.add_argument("--stage", choices=["all", "vae", "text2img"], default="all",
                   help="'vae' = stage 1 only, 'text2img' = stage 2 only (needs OUTPUT/vae or --vae), "
                        "'all' = both (default)")
    p.add_argument("--vae", metavar="DIR", help="use this trained diffusers VAE folder and skip stage 1")
    p.add_argument("--init-from", metavar="DIR",
                   help="start stage 2 from the unet, text encoder and tokenizer of this pipeline folder (e.g. an "
                        "earlier run's output, which holds its EMA weights) instead of random init: fine-tuning "
                        "with new settings; give its VAE with --vae DIR/vae")
    # dest names the stage it sets; None keeps the preset's (TrainConfig refuses steps < 1)
    p.add_argument("--steps", dest="text2img_steps", metavar="STEPS", type=int, help="stage 2 (text-to-image) optimiser steps")
    p.add_argument("--vae-steps", type=int, help="stage 1 (autoencoder) optimiser steps")
    p.add_argument("--batch-size", type=int, help="stage 2 batch size")
    p.add_argument("--vae-batch-size", type=int, help="stage 1 batch size")
    p.add_argument("--lr", type=float, help="stage 2 peak AdamW learning rate (after linear warm-up)")
    p.add_argument("--vae-lr", type=float, help="stage 1 peak AdamW learning rate")
    p.add_argument("--lr-schedule", choices=list(LR_SCHEDULES),
                   help="stage 2 learning rate after warm-up: constant, or cosine decay to 0 (default constant)")
    p.add_argument("--text-lr-scale", type=float,
                   help="the text encoder's learning rate as a multiple of --lr (default 1)")
    p.add_argument("--prediction-type", choices=list(PREDICTION_TYPES),
                   help="what the UNet predicts: the noise (epsilon) or v = alpha*noise - sigma*x0 "
                        "(v_prediction, the default: well-conditioned at every noise level)")
    p.add_argument("--beta-schedule", choices=list(BETA_SCHEDULES),
                   help="training noise schedule, written into the scheduler config so sampling uses it too; "
                        "'auto' = squaredcos_cap_v2 with v_prediction, scaled_linear with epsilon")
    p.add_argument("--p2-gamma", type=float,
                   help="P2 loss weighting exponent (Choi et al. 2022): each timestep's loss is weighted by "
                        "1 / (k + SNR(t))^gamma; 0 = plain loss (preset default 0; the paper uses 0.5 or 1)")
    p.add_argument("--p2-k", type=float, help="P2 weighting offset k (default 1)")
    p.add_argument("--cond-dropout", type=float,
                   help="probability of replacing a caption by \"\" in training, so classifier-free guidance "
                        "has an unconditional model (default 0.1)")
    p.add_argument("--ema-decay", type=float,
                   help="EMA decay of the UNet/text-encoder weights; the EMA is what gets exported (default 0.999)")
    p.add_argument("--seed", type=int, help="random seed: the same seed and settings give the same weights "
                                            "(default 0)")
    p.add_argument("--device", help="'cpu', 'cuda' or 'cuda:N' (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="'auto' = bf16 autocast on CUDA and fp32 on CPU; 'bf16' forces bf16 autocast, "
                        "'fp32' turns it off (default auto)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch; on a machine shared with other jobs, fewer threads than cores "
                        "avoid oversubscription, which slows small models many times over (default: torch's)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute UNet block activations in the backward pass: less memory, more compute")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/checkpoints with the same settings (--steps/--vae-steps may grow); "
                        "a resumed run equals an uninterrupted one")
    p.add_argument("--checkpoint-every", type=int,
                   help="steps between checkpoints; 0 = only at the end of each stage (default 500)")
    p.add_argument("--no-progress", action="store_true", help="turn the progress bars off")
    p.set_defaults(func=run_train, _train_parser=p)
    return p


def config_from_args(args):
    """The TrainConfig an argparse namespace of `fastdiff train` describes."""
    top = dict(output=args.output, data=args.data, vae_path=args.vae, init_from=args.init_from, resume=args.resume,
               progress=not args.no_progress, gradient_checkpointing=args.grad_checkpointing)
    for name, value in (("seed", args.seed), ("device", args.device), ("precision", args.precision),
                        ("num_threads", args.threads), ("checkpoint_every", args.checkpoint_every)):
        if value is not None:
            top[name] = value
    cfg = preset(args.preset, **top)
    vae = {k: v for k, v in (("steps", args.vae_steps), ("batch_size", args.vae_batch_size), ("lr", args.vae_lr))
           if v is not None}
    diffusion = {k: v for k, v in (("steps", args.text2img_steps), ("batch_size", args.batch_size), ("lr", args.lr),
                                   ("prediction_type", args.prediction_type), ("beta_schedule", args.beta_schedule),
                                   ("p2_gamma", args.p2_gamma), ("p2_k", args.p2_k),
                                   ("cond_dropout", args.cond_dropout), ("ema_decay", args.ema_decay),
                                   ("lr_schedule", args.lr_schedule), ("text_encoder_lr_scale", args.text_lr_scale))
                 if v is not None}
    mix = {k: v for k, v in (("place_prob", args.place_prob), ("placed_pair_prob", args.placed_pair_prob))
           if v is not None}
    if mix:
        cfg = with_section(cfg, "procedural", **mix)
    if vae:
        cfg = with_section(cfg, "vae_training", **vae)
    if diffusion:
        cfg = with_section(cfg, "diffusion", **diffusion)
    return cfg


def command_line(args, parser: argparse.ArgumentParser) -> str:
    """`fastdiff train ...` with every option that differs from its default: the run, re-runnable."""
    words = ["fastdiff", "train"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False or (value == action.default and action.dest != "preset"):
            continue
        flag = max(action.option_strings, key=len)
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _check_output(output: str) -> None:
    """The output folder, checked before training: stage 1 writes it only after minutes."""
    import os

    if os.path.exists(output) and not os.path.isdir(output):
        raise CliError(f"-o/--output: {output} is a file; give a folder for the trained pipeline")
    check_folder_writable(output)


@command
def run_train(args) -> int:
    from .trainer import train

    if args.device not in (None, "auto"):
        check_device(args.device)
    _check_output(args.output)
    with api_errors():
        cfg = config_from_args(args)
    parser = getattr(args, "_train_parser", None)
    if parser is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, command=command_line(args, parser))
    with api_errors():
        results = train(cfg, stage=args.stage)
    for name, result in results.items():
        print(f"{name}: {result.steps} steps, final loss {result.final_loss:.4f}, {result.wall_time_s:.0f} s "
              f"({result.steps / max(result.wall_time_s, 1e-9):.2f} steps/s)")
    if "text2img" in results:
        print(f"wrote {cfg.output} (see {cfg.output}/TRAINING.md); try: fastdiff generate \"a red circle\" "
              f"--model {cfg.output}")
    return 0
