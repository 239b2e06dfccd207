"""fastdiff's command line: thin, parses and calls the API.

    fastdiff info                     which kernel runs each op on CPU and CUDA
    fastdiff generate "a prompt" --model PATH   text-to-image with a Stable Diffusion model
    fastdiff train ...                train a small text-to-image model (built-in shapes data or your own)
    fastdiff eval ...                 attribute accuracy of a model, read by an independent judge
    fastdiff demo "a red circle"      sample an image with the engine (no weights needed)
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_info(args) -> int:
    import fastdiff

    print(json.dumps(fastdiff.backend_info(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    import numpy as np
    import torch

    from .data import shapes_dataset
    from .guidance import ClassifierFreeGuidance
    from .models import ExactDenoiser
    from .sampling import SchedulerConfig, sample

    if not args.prompt or not all(p.strip() for p in args.prompt):
        print("error: give at least one non-empty prompt", file=sys.stderr)
        return 2
    images, captions = shapes_dataset(size=args.size)
    config = SchedulerConfig.from_dict(dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                                            clip_sample=False, timestep_spacing="trailing"))
    model = ExactDenoiser(images, config.noise_schedule(args.sampler).alphas_cumprod)
    try:
        cond = model.masks(captions, args.prompt)
    except ValueError as exc:
        print(f"error: {exc}. Words the demo data knows: {sorted({w for c in captions for w in c.split()})}",
              file=sys.stderr)
        return 2
    uncond = torch.ones_like(cond)
    denoiser = ClassifierFreeGuidance(model, cond, uncond, args.guidance)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(args.prompt), 3, args.size, args.size, generator=gen)
    start = time.perf_counter()
    x = sample(args.sampler, denoiser, noise, config, args.steps, generator=gen, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.concatenate(list(pixels), axis=1)
    grid = grid.repeat(args.upscale, axis=0).repeat(args.upscale, axis=1)
    _write_png(args.output, grid)
    print(f"wrote {args.output} ({len(args.prompt)} image(s), {args.steps} {args.sampler} steps, {elapsed:.2f} s)")
    return 0


def _read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as fh:
            prompts += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    return prompts


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:48] or "image"


def _cmd_generate(args) -> int:
    import os

    import torch

    from .pipelines import Pipeline

    prompts = _read_prompts(args)
    if not prompts:
        print("error: give at least one prompt (arguments or --prompts-file)", file=sys.stderr)
        return 2
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.glide is not None:
        if args.channels_last or args.fuse_qkv:
            print("error: --channels-last/--fuse-qkv apply to latent diffusion models, not GLIDE", file=sys.stderr)
            return 2
        return _generate_glide(args, prompts, device, dtype)
    if args.image or args.mask or args.glide_upsampler or args.clip_guidance is not None:
        print("error: --image/--mask/--glide-upsampler/--clip-guidance are GLIDE options; give --glide BASE.pt",
              file=sys.stderr)
        return 2
    try:
        if args.model is None:
            pipe = Pipeline(device=device, dtype=dtype)
        elif os.path.isfile(args.model):
            from .pipelines import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_single_file(args.model, config=args.config, tokenizer=args.tokenizer,
                                                            device=device, dtype=dtype)
        else:
            pipe = Pipeline.from_pretrained(args.model, device=device, dtype=dtype)
        from .pipelines import VQDiffusionPipeline

        if isinstance(pipe, VQDiffusionPipeline):
            return _generate_vq(args, pipe, prompts)
        if args.truncation_rate is not None:
            raise ValueError("--truncation-rate is a VQ-Diffusion option; this model is not one")
        guidance = 7.5 if args.guidance is None else args.guidance
        if args.channels_last:
            pipe.to(memory_format=torch.channels_last)
        if args.fuse_qkv:
            pipe.fuse_qkv_projections()
        start = time.perf_counter()
        images = pipe.generate(prompts, negative_prompt=[args.negative] * len(prompts) if args.negative else None,
                               num_inference_steps=args.steps or 30, guidance_scale=guidance,
                               guidance_rescale=args.guidance_rescale, sampler=args.sampler, eta=args.eta,
                               num_images_per_prompt=args.images_per_prompt, height=args.height, width=args.width,
                               seed=args.seed, clip_skip=args.clip_skip, progress=not args.no_progress,
                               cuda_graph=args.cuda_graph)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _save_images(args, prompts, images, time.perf_counter() - start)
    return 0


def _generate_vq(args, pipe, prompts) -> int:
    unused = [flag for flag, value in (("--negative", args.negative), ("--sampler", args.sampler),
                                       ("--height", args.height), ("--width", args.width),
                                       ("--clip-skip", args.clip_skip), ("--guidance-rescale", args.guidance_rescale),
                                       ("--eta", args.eta), ("--cuda-graph", args.cuda_graph),
                                       ("--channels-last", args.channels_last), ("--fuse-qkv", args.fuse_qkv))
              if value]
    if unused:
        raise ValueError(f"{', '.join(unused)} do not apply to VQ-Diffusion (it samples tokens of a fixed grid "
                         "with its own discrete scheduler)")
    start = time.perf_counter()
    images = pipe.generate(prompts, num_inference_steps=args.steps or 100,
                           guidance_scale=5.0 if args.guidance is None else args.guidance,
                           truncation_rate=1.0 if args.truncation_rate is None else args.truncation_rate,
                           num_images_per_prompt=args.images_per_prompt, seed=args.seed,
                           progress=not args.no_progress)
    _save_images(args, prompts, images, time.perf_counter() - start)
    return 0


def _generate_glide(args, prompts, device, dtype) -> int:
    from PIL import Image

    from .pipelines import Pipeline

    if not args.glide_tokenizer:
        print("error: GLIDE needs --glide-tokenizer, the folder with encoder.json and vocab.bpe", file=sys.stderr)
        return 2
    try:
        options = [_read_json(path) if path else None for path in (args.glide_options, args.glide_upsampler_options)]
        pipe = Pipeline.from_glide(args.glide, args.glide_upsampler, tokenizer=args.glide_tokenizer,
                                   inpaint=args.glide_inpaint, clip=args.glide_clip, options=options[0],
                                   upsampler_options=options[1], device=device, dtype=dtype)
        image = Image.open(args.image) if args.image else None
        mask = Image.open(args.mask) if args.mask else None
        start = time.perf_counter()
        images = pipe.generate(prompts, guidance_scale=3.0 if args.guidance is None else args.guidance,
                               num_inference_steps=args.respacing or (str(args.steps) if args.steps else "100"),
                               upsample_steps=args.upsample_respacing, sampler=args.sampler or "ddpm", eta=args.eta,
                               num_images_per_prompt=args.images_per_prompt, seed=args.seed, image=image, mask=mask,
                               clip_guidance_scale=args.clip_guidance, progress=not args.no_progress,
                               cuda_graph=args.cuda_graph)
    except (FileNotFoundError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _save_images(args, prompts, images, time.perf_counter() - start)
    return 0


def _read_json(path: str) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of GLIDE options")
    return data


def _save_images(args, prompts, images, elapsed: float) -> None:
    import os

    names = [f"{i:03d}-{_slug(prompts[i // args.images_per_prompt])}.png" for i in range(len(images))]
    if len(images) == 1 and args.output.lower().endswith(".png"):
        paths = [args.output]
    else:
        folder = args.output[:-4] if args.output.lower().endswith(".png") else args.output
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, n) for n in names]
    for image, path in zip(images, paths):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        image.save(path)
    print(f"wrote {len(paths)} image(s) in {elapsed:.1f} s: {', '.join(paths)}")


def _write_png(path: str, rgb) -> None:
    """A minimal PNG writer (zlib + the three chunks), so the demo needs no imaging library."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def build_parser() -> argparse.ArgumentParser:
    from .sampling import SAMPLERS

    parser = argparse.ArgumentParser(
        prog="fastdiff", description="fastdiff: a fused sampler engine for text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show which implementation (C++, CUDA C++, Triton, reference) runs each op")
    info.set_defaults(func=_cmd_info)
    gen = sub.add_parser(
        "generate", help="generate images from text (built-in model, Stable Diffusion, VQ-Diffusion, or GLIDE)",
        description="Generates images with the small model built into fastdiff (no --model), a Stable Diffusion "
                    "1.x/2.x model (a diffusers folder, or an original single-file .safetensors/.ckpt), a "
                    "VQ-Diffusion model (a diffusers VQDiffusionPipeline folder, e.g. microsoft/vq-diffusion-ithq), or "
                    "OpenAI's GLIDE checkpoints (--glide base.pt --glide-tokenizer DIR [--glide-upsampler "
                    "upsample.pt]). Nothing is downloaded.")
    gen.add_argument("prompt", nargs="*", help="one or more prompts")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line (# starts a comment)")
    gen.add_argument("--model", help="diffusers model folder, or a single-file checkpoint "
                     "(default: the small model built into fastdiff)")
    gen.add_argument("--config", help="for a single file: a diffusers folder of the same model (configs, tokenizer)")
    gen.add_argument("--tokenizer", help="for a single file: a CLIP tokenizer folder (vocab.json, merges.txt)")
    gen.add_argument("-o", "--output", default="out.png",
                     help="PNG path for one image, else a folder for several (default: %(default)s)")
    gen.add_argument("--negative", help="negative prompt, used for every prompt")
    gen.add_argument("--steps", type=int, help="sampling steps (default: 30; GLIDE and VQ-Diffusion: 100)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1 turns it off "
                     "(default: 7.5; GLIDE: 3; VQ-Diffusion: 5)")
    gen.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1] "
                     "(default: %(default)s)")
    gen.add_argument("--sampler", choices=list(SAMPLERS), help="sampler (default: the model's scheduler config)")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images "
                     "(default: %(default)s)")
    gen.add_argument("--truncation-rate", type=float, help="VQ-Diffusion: keep each token's most likely classes up "
                     "to this cumulative probability, in (0, 1] (default 1: keep all)")
    gen.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's)")
    gen.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's)")
    gen.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default: %(default)s)")
    gen.add_argument("--clip-skip", type=int, help="use the text encoder's layer this many from the last")
    gen.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights' dtype "
                     "(default: %(default)s; fp16 needs CUDA)")
    gen.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    speed = gen.add_argument_group("GPU speed (same images)")
    speed.add_argument("--cuda-graph", action="store_true", help="capture each sampling step (U-Net on the CFG "
                       "batch + fused update) as a CUDA graph and replay it; needs --device cuda (latent diffusion "
                       "and GLIDE)")
    speed.add_argument("--channels-last", action="store_true", help="run the UNet and VAE in NHWC memory layout "
                       "(latent diffusion)")
    speed.add_argument("--fuse-qkv", action="store_true", help="one GEMM for each attention's q/k/v (k/v for "
                       "cross-attention) projections (latent diffusion)")
    glide = gen.add_argument_group("GLIDE (openai/glide-text2im checkpoints)")
    glide.add_argument("--glide", metavar="BASE_PT", help="GLIDE base checkpoint (base.pt, or base_inpaint.pt "
                       "with --glide-inpaint); 64x64 images, 256x256 with --glide-upsampler")
    glide.add_argument("--glide-upsampler", metavar="UPSAMPLE_PT", help="GLIDE upsampler checkpoint (upsample.pt)")
    glide.add_argument("--glide-tokenizer", metavar="DIR", help="folder with GLIDE's encoder.json and vocab.bpe "
                       "(.gz accepted)")
    glide.add_argument("--glide-options", metavar="JSON", help="GLIDE options of the base model as a JSON object "
                       "(glide-text2im's option names; missing keys take its defaults)")
    glide.add_argument("--glide-upsampler-options", metavar="JSON", help="GLIDE options of the upsampler "
                       "(defaults: glide-text2im's upsampler defaults)")
    glide.add_argument("--glide-inpaint", action="store_true", help="the checkpoints are the inpainting ones; "
                       "needs --image and --mask")
    glide.add_argument("--glide-clip", metavar="DIR", help="folder with clip_image_enc.pt, clip_text_enc.pt and "
                       "bpe_simple_vocab_16e6.txt.gz, for --clip-guidance")
    glide.add_argument("--clip-guidance", type=float, help="CLIP guidance scale (GLIDE's notebook uses 3 "
                       "with --guidance 1)")
    glide.add_argument("--respacing", help="GLIDE timestep respacing for the base model: '100', 'ddim50', "
                       "'fast27' or sections like '10,10,3,2,2' (default: 100)")
    glide.add_argument("--upsample-respacing", default="fast27", help="respacing of the upsampler "
                       "(default: %(default)s)")
    glide.add_argument("--image", help="inpainting: the image to complete (PNG/JPEG)")
    glide.add_argument("--mask", help="inpainting: a greyscale mask, white = keep the image, black = generate")
    gen.set_defaults(func=_cmd_generate)
    from .eval.cli import add_eval_parser
    from .train.cli import add_train_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    demo = sub.add_parser(
        "demo", help="sample images of coloured shapes through the engine (no weights, offline)",
        description="Samples images with classifier-free guidance through fastdiff's fused sampler, using the "
                    "closed-form optimal denoiser of a small procedural dataset of coloured shapes as the model. "
                    "Prompts name a colour and/or a shape, e.g. 'a red circle', 'a blue triangle'.")
    demo.add_argument("prompt", nargs="+", help="one or more prompts, e.g. 'a red circle' 'a green square'")
    demo.add_argument("-o", "--output", default="fastdiff-demo.png", help="PNG to write (default: %(default)s)")
    demo.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLERS), help="sampler (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    demo.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same image (default: %(default)s)")
    demo.add_argument("--size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    demo.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscale of the saved PNG (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    steps = getattr(args, "steps", None)
    if steps is not None and steps < 1:
        parser.error("--steps must be positive")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
