"""fastdiff's command line: thin, parses and calls the API.

    fastdiff info                     which kernel runs each op on CPU and CUDA (--model: a model's defaults)
    fastdiff generate "a prompt" --model PATH   text-to-image with a Stable Diffusion model
    fastdiff train ...                train a small text-to-image model (built-in shapes data or your own)
    fastdiff eval ...                 attribute accuracy of a model, read by an independent judge
    fastdiff demo "a red circle"      sample an image with the engine (no weights needed)
    fastdiff export onnx [MODEL] OUT  export a Stable Diffusion model to ONNX (optimum's layout), checked

Every argument is checked before a model loads; a bad one ends the command with one
``error:`` line and exit status 2 (fastdiff/cli_args.py, which also holds the rule for -o).
"""
from __future__ import annotations

import json
import os
import sys
import time

from .cli_args import (CliError, Parser, add_glide_model_arguments, api_errors, check_device, check_writable, command,
                       finite_float, image_suffix, int_in, load_glide_pipeline, load_pipeline, one_line, plan_outputs,
                       positive_int, random_seed, save_image)


def _cmd_info(args) -> int:
    import fastdiff

    if args.model is not None:
        return _model_info(args)
    if args.json:
        print(json.dumps(fastdiff.backend_info(), indent=2))
    else:
        print(fastdiff.ops.describe_backends())
    return 0


def _model_info(args) -> int:
    """The model's family and the defaults generate() (and so `fastdiff generate`) uses."""
    import torch

    pipe = load_pipeline(args.model or None, torch.device("cpu"), torch.float32)
    where = args.model or "the built-in model"
    defaults = dict(pipe.defaults)
    if args.json:
        print(json.dumps({"model": where, "pipeline": type(pipe).__name__, "defaults": defaults}, indent=2,
                         default=str))
    else:
        print(f"{where}: {type(pipe).__name__}; the defaults of generate() and `fastdiff generate`:")
        for name, value in defaults.items():
            print(f"  {name}: {value}")
    return 0


def _cmd_demo(args) -> int:
    import numpy as np
    import torch

    from .data import shapes_dataset
    from .guidance import ClassifierFreeGuidance
    from .models import ExactDenoiser
    from .sampling import SchedulerConfig, sample

    if not args.prompt or not all(p.strip() for p in args.prompt):
        raise CliError("give at least one non-empty prompt")
    suffix = image_suffix(args.output, required=True)
    check_writable(args.output)
    images, captions = shapes_dataset(size=args.size)
    config = SchedulerConfig.from_dict(dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                                            clip_sample=False, timestep_spacing="trailing"))
    model = ExactDenoiser(images, config.noise_schedule(args.sampler).alphas_cumprod)
    try:
        cond = model.masks(captions, args.prompt)
    except ValueError as exc:
        raise CliError(f"{exc}. Words the demo data knows: {sorted({w for c in captions for w in c.split()})}")
    uncond = torch.ones_like(cond)
    denoiser = ClassifierFreeGuidance(model, cond, uncond, args.guidance)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(args.prompt), 3, args.size, args.size, generator=gen)
    start = time.perf_counter()
    with api_errors():
        x = sample(args.sampler, denoiser, noise, config, args.steps, generator=gen,
                   progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.concatenate(list(pixels), axis=1)
    grid = grid.repeat(args.upscale, axis=0).repeat(args.upscale, axis=1)
    if os.path.dirname(args.output):
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
    if suffix == ".png":
        _write_png(args.output, grid)
    else:
        from PIL import Image

        save_image(Image.fromarray(grid), args.output)
    print(f"wrote {args.output} ({len(args.prompt)} image(s), {args.steps} {args.sampler} steps, {elapsed:.2f} s)")
    return 0


def _read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            what = "is a folder" if os.path.isdir(args.prompts_file) else "not found"
            raise CliError(f"--prompts-file {args.prompts_file!r}: {what}; give a text file with one prompt per line")
        try:
            with open(args.prompts_file, encoding="utf-8") as fh:
                prompts += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--prompts-file {args.prompts_file!r}: {one_line(exc)}") from None
    if not prompts:
        raise CliError("give at least one prompt (arguments or --prompts-file)")
    return prompts


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:48] or "image"


def _image_names(prompts, per_prompt: int) -> list:
    return [f"{i:03d}-{_slug(prompts[i // per_prompt])}" for i in range(len(prompts) * per_prompt)]


def _typed(**options) -> dict:
    """The options the user gave (argparse leaves the others None): the pipeline's own
    defaults (``pipe.defaults``) decide the rest, so the API and the CLI share them."""
    return {name: value for name, value in options.items() if value is not None and value is not False}


def _cmd_generate(args) -> int:
    import torch

    prompts = _read_prompts(args)
    device = check_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.cuda_graph and device.type != "cuda":
        raise CliError(f"--cuda-graph needs a CUDA device (--device cuda); this run is on {device}")
    if args.glide is not None:
        if args.runtime != "torch":
            raise CliError("--runtime onnxruntime reads model folders; export GLIDE with `fastdiff export onnx --glide "
                           "BASE_PT OUT` and pass --model OUT")
        if args.channels_last or args.fuse_qkv:
            raise CliError("--channels-last/--fuse-qkv apply to latent diffusion models, not GLIDE")
        if args.clip is not None or args.clip_loss is not None or args.distractors is not None:
            raise CliError("with --glide, --clip-guidance is GLIDE's own CLIP guidance with its noised CLIP "
                           "(--glide-clip); --clip/--clip-loss/--distractors are for latent models")
    elif args.image or args.mask or args.glide_upsampler:
        raise CliError("--image/--mask/--glide-upsampler are GLIDE options; give --glide BASE.pt")
    if args.glide is not None and (args.thresholding or args.dynamic_thresholding_ratio is not None
                                   or args.sample_max_value is not None):
        raise CliError("--thresholding/--dynamic-thresholding-ratio/--sample-max-value are latent diffusion "
                       "options (diffusers' schedulers); GLIDE clips x0 to [-1, 1]")
    paths = plan_outputs(args.output, _image_names(prompts, args.images_per_prompt))
    if args.glide is not None:
        return _generate_glide(args, prompts, device, dtype, paths)
    needs_modules = args.channels_last or args.fuse_qkv or args.cuda_graph or args.clip_skip is not None
    if args.runtime != "torch" and needs_modules:
        raise CliError("--channels-last/--fuse-qkv/--cuda-graph/--clip-skip change or read the PyTorch modules; "
                       "--runtime onnxruntime runs exported graphs")
    pipe = load_pipeline(args.model, device, dtype, config=args.config, tokenizer=args.tokenizer,
                         runtime=args.runtime, progress=not args.no_progress)
    from .pipelines import VQDiffusionPipeline

    if isinstance(pipe, VQDiffusionPipeline):
        return _generate_vq(args, pipe, prompts, paths)
    if args.truncation_rate is not None:
        raise CliError("--truncation-rate is a VQ-Diffusion option; this model is not one")
    steering = _clip_guidance(args, pipe, prompts)
    with api_errors():
        if args.channels_last:
            pipe.to(memory_format=torch.channels_last)
        if args.fuse_qkv:
            pipe.fuse_qkv_projections()
        start = time.perf_counter()
        images = pipe.generate(
            prompts, seed=args.seed, num_images_per_prompt=args.images_per_prompt, progress=not args.no_progress,
            **_typed(negative_prompt=[args.negative] * len(prompts) if args.negative else None,
                     num_inference_steps=args.steps, guidance_scale=args.guidance,
                     guidance_rescale=args.guidance_rescale, sampler=args.sampler, eta=args.eta,
                     height=args.height, width=args.width, clip_skip=args.clip_skip, cuda_graph=args.cuda_graph,
                     thresholding=args.thresholding, dynamic_thresholding_ratio=args.dynamic_thresholding_ratio,
                     sample_max_value=args.sample_max_value), **steering)
    _save_images(images, paths, time.perf_counter() - start)
    return 0


def _clip_guidance(args, pipe, prompts) -> dict:
    """generate()'s clip_guidance from --clip-guidance on a latent model: the scene CLIP's
    (fastdiff sample's options), one target per image."""
    from .eval.sample_cli import clip_guidance_options

    options_for, _ = clip_guidance_options(args, pipe, prompts)
    if options_for is None:
        return {}
    return options_for([p for p in prompts for _ in range(args.images_per_prompt)])


def _generate_vq(args, pipe, prompts, paths) -> int:
    unused = [flag for flag, value in (("--negative", args.negative), ("--sampler", args.sampler),
                                       ("--height", args.height), ("--width", args.width),
                                       ("--clip-skip", args.clip_skip), ("--guidance-rescale", args.guidance_rescale),
                                       ("--eta", args.eta), ("--cuda-graph", args.cuda_graph),
                                       ("--channels-last", args.channels_last), ("--fuse-qkv", args.fuse_qkv),
                                       ("--thresholding", args.thresholding),
                                       ("--dynamic-thresholding-ratio", args.dynamic_thresholding_ratio),
                                       ("--sample-max-value", args.sample_max_value),
                                       ("--clip-guidance", args.clip_guidance), ("--clip", args.clip),
                                       ("--clip-loss", args.clip_loss), ("--distractors", args.distractors))
              if value is not None and value is not False]
    if unused:
        raise CliError(f"{', '.join(unused)} do not apply to VQ-Diffusion (it samples tokens of a fixed grid "
                       "with its own discrete scheduler)")
    start = time.perf_counter()
    with api_errors():
        images = pipe.generate(prompts, seed=args.seed, num_images_per_prompt=args.images_per_prompt,
                               progress=not args.no_progress,
                               **_typed(num_inference_steps=args.steps, guidance_scale=args.guidance,
                                        truncation_rate=args.truncation_rate))
    _save_images(images, paths, time.perf_counter() - start)
    return 0


def _generate_glide(args, prompts, device, dtype, paths) -> int:
    # The inpainting inputs are read before the checkpoints, so a wrong path costs no loading.
    image, mask = (_open_image(path, flag) for path, flag in ((args.image, "--image"), (args.mask, "--mask")))
    pipe = load_glide_pipeline(args, device, dtype)
    with api_errors():
        start = time.perf_counter()
        images = pipe.generate(
            prompts, seed=args.seed, num_images_per_prompt=args.images_per_prompt, progress=not args.no_progress,
            **_typed(guidance_scale=args.guidance, num_inference_steps=args.respacing or args.steps,
                     upsample_steps=args.upsample_respacing, sampler=args.sampler, eta=args.eta, image=image,
                     mask=mask, clip_guidance_scale=args.clip_guidance, cuda_graph=args.cuda_graph))
    _save_images(images, paths, time.perf_counter() - start)
    return 0


def _open_image(path, flag):
    if path is None:
        return None
    from PIL import Image

    with api_errors(f"{flag} {path!r}"):
        image = Image.open(path)
        image.load()
    return image


def _save_images(images, paths, elapsed: float) -> None:
    if len(images) != len(paths):  # planned from the prompts; a pipeline that returns other counts is a bug
        raise RuntimeError(f"the pipeline returned {len(images)} images for {len(paths)} planned")
    for image, path in zip(images, paths):
        save_image(image, path)
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


# Options left out take the pipeline's defaults (pipe.defaults: the family's, or the model
# folder's own), so the help names where to read them rather than numbers that could disagree.
MODEL_DEFAULT = "default: the model's own; `fastdiff info --model [PATH]` lists them"


def build_parser() -> Parser:
    from .eval.sample_cli import add_clip_guidance_arguments  # torch-free, as the parser must be
    from .sampling.names import SAMPLER_NAMES  # the names only: building the parser imports no torch

    parser = Parser(prog="fastdiff", description="fastdiff: a fused sampler engine for text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show which implementation (C++, CUDA C++, Triton, reference) runs each op, "
                                       "or a model's defaults",
                          description="Without --model: which implementation runs each op on this machine's CPU "
                                      "and (where present) GPU. With --model: the model's family and the defaults "
                                      "that generate() and `fastdiff generate` use for it.")
    info.add_argument("--model", nargs="?", const="", metavar="PATH", help="show this model's defaults instead "
                      "(a folder or single file; no PATH: the built-in model)")
    info.add_argument("--json", action="store_true", help="print JSON (fastdiff.backend_info(), or the defaults)")
    info.set_defaults(func=command(_cmd_info))
    gen = sub.add_parser(
        "generate", help="generate images from text (built-in model, Stable Diffusion, VQ-Diffusion, or GLIDE)",
        description="Generates images with the small model built into fastdiff (no --model), a Stable Diffusion "
                    "1.x/2.x model (a diffusers folder, or an original single-file .safetensors/.ckpt), a "
                    "VQ-Diffusion model (a diffusers VQDiffusionPipeline folder, e.g. microsoft/vq-diffusion-ithq), or "
                    "OpenAI's GLIDE checkpoints (--glide base.pt --glide-tokenizer DIR [--glide-upsampler "
                    "upsample.pt]). Options left out take the model's defaults (`fastdiff info --model [PATH]`). "
                    "Every argument is checked before the model loads. Nothing is downloaded.")
    gen.add_argument("prompt", nargs="*", help="one or more prompts")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line (# starts a comment)")
    gen.add_argument("--model", help="diffusers model folder, or a single-file checkpoint "
                     "(default: the small model built into fastdiff)")
    gen.add_argument("--config", help="for a single file: a diffusers folder of the same model (configs, tokenizer)")
    gen.add_argument("--tokenizer", help="for a single file: a CLIP tokenizer folder (vocab.json, merges.txt)")
    gen.add_argument("-o", "--output", default="out.png",
                     help="an image file (.png, .jpg, .webp, ...: written in that format) for one image; for several, "
                          "the folder of that name without its suffix (cats.png -> cats/000-<prompt>.png, ...); a "
                          "name without a suffix is a folder (default: %(default)s)")
    gen.add_argument("--negative", help="negative prompt, used for every prompt")
    gen.add_argument("--steps", type=positive_int, help=f"sampling steps ({MODEL_DEFAULT})")
    gen.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale; 1 turns it off "
                     f"({MODEL_DEFAULT})")
    gen.add_argument("--guidance-rescale", type=finite_float, help="guidance rescale phi in [0, 1]; 0 is "
                     f"off ({MODEL_DEFAULT})")
    gen.add_argument("--sampler", choices=list(SAMPLER_NAMES), help=f"sampler ({MODEL_DEFAULT})")
    gen.add_argument("--eta", type=finite_float, help=f"DDIM eta ({MODEL_DEFAULT})")
    gen.add_argument("--thresholding", action="store_true", default=None, help="Imagen's dynamic thresholding of "
                     "each step's x0 (latent diffusion; ddpm, ddim, dpmpp_2m samplers)")
    gen.add_argument("--dynamic-thresholding-ratio", type=finite_float, metavar="P", help="the quantile of |x0| "
                     "that sets each image's threshold, in (0, 1] (default: the scheduler config's, else 0.995)")
    gen.add_argument("--sample-max-value", type=finite_float, metavar="S", help="the largest threshold (default: "
                     "the scheduler config's, else 1.0)")
    gen.add_argument("--seed", type=random_seed, default=0, help="random seed; the same seed gives the same "
                     "images (default: %(default)s)")
    gen.add_argument("--truncation-rate", type=finite_float, help="VQ-Diffusion: keep each token's most likely "
                     f"classes up to this cumulative probability, in (0, 1]; 1 keeps all ({MODEL_DEFAULT})")
    gen.add_argument("--height", type=positive_int, help="image height, a multiple of 8 (default: the model's)")
    gen.add_argument("--width", type=positive_int, help="image width, a multiple of 8 (default: the model's)")
    gen.add_argument("--images-per-prompt", type=positive_int, default=1, help="images per prompt "
                     "(default: %(default)s)")
    gen.add_argument("--clip-skip", type=int, help="use the text encoder's layer this many from the last")
    gen.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    gen.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights' dtype "
                     "(default: %(default)s; fp16 and bf16 are for GPUs: on a CPU they run slower than fp32)")
    gen.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    gen.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch", help="what runs the networks: "
                     "fastdiff's PyTorch modules, or ONNX Runtime on the model's ONNX export (made once on first use "
                     "and kept in $FASTDIFF_CACHE, default ~/.cache/fastdiff; the same images within float32's "
                     "rounding, faster on a CPU) (default: %(default)s)")
    speed = gen.add_argument_group("GPU speed (same images)")
    speed.add_argument("--cuda-graph", action="store_true", help="capture each sampling step (U-Net on the CFG "
                       "batch + fused update) as a CUDA graph and replay it; needs --device cuda (latent diffusion "
                       "and GLIDE)")
    speed.add_argument("--channels-last", action="store_true", help="run the UNet and VAE in NHWC memory layout "
                       "(latent diffusion)")
    speed.add_argument("--fuse-qkv", action="store_true", help="one GEMM for each attention's q/k/v (k/v for "
                       "cross-attention) projections (latent diffusion)")
    add_clip_guidance_arguments(gen.add_argument_group(
        "CLIP guidance of a latent model (reference 003: contrastive, or the spherical-distance baseline)"),
        with_scale=False)
    glide = gen.add_argument_group("GLIDE (openai/glide-text2im checkpoints)")
    add_glide_model_arguments(glide)
    glide.add_argument("--clip-guidance", type=finite_float, metavar="GAMMA", help="CLIP guidance scale. GLIDE: "
                       "its noised CLIP's guidance (the notebook uses 3 with --guidance 1); a latent model: "
                       "contrastive guidance by a scene CLIP (see --clip-loss; the README's table uses 100 on the "
                       "built-in model with --sampler ddpm --guidance 1)")
    glide.add_argument("--respacing", help="GLIDE timestep respacing for the base model: '100', 'ddim50', "
                       "'fast27' or sections like '10,10,3,2,2' (default: the GLIDE pipeline's, glide-text2im's)")
    glide.add_argument("--upsample-respacing", help="respacing of the upsampler (default: the GLIDE pipeline's, "
                       "glide-text2im's)")
    glide.add_argument("--image", help="inpainting: the image to complete (PNG/JPEG)")
    glide.add_argument("--mask", help="inpainting: a greyscale mask, white = keep the image, black = generate")
    gen.set_defaults(func=command(_cmd_generate))
    from .eval.cli import add_eval_parser
    from .eval.metrics_cli import add_metrics_parser
    from .eval.sample_cli import add_sample_parser
    from .export.cli import add_export_parser
    from .train.cli import add_train_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    add_sample_parser(sub)
    add_metrics_parser(sub)
    demo = sub.add_parser(
        "demo", help="sample images of coloured shapes through the engine (no weights, offline)",
        description="Samples images with classifier-free guidance through fastdiff's fused sampler, using the "
                    "closed-form optimal denoiser of a small procedural dataset of coloured shapes as the model. "
                    "Prompts name a colour and/or a shape, e.g. 'a red circle', 'a blue triangle'.")
    demo.add_argument("prompt", nargs="+", help="one or more prompts, e.g. 'a red circle' 'a green square'")
    demo.add_argument("-o", "--output", default="fastdiff-demo.png", help="the image to write, the prompts side by "
                      "side (.png, .jpg, .webp, ...: written in that format; default: %(default)s)")
    demo.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLER_NAMES),
                      help="sampler (default: %(default)s)")
    demo.add_argument("--steps", type=positive_int, default=20, help="sampling steps (default: %(default)s)")
    demo.add_argument("--guidance", type=finite_float, default=3.0, help="classifier-free guidance scale "
                      "(default: %(default)s)")
    demo.add_argument("--seed", type=random_seed, default=0, help="random seed; the same seed gives the same image "
                      "(default: %(default)s)")
    # The closed-form denoiser holds every image of its dataset: the 45 of them take 140 MB in float32 at 512 px.
    demo.add_argument("--size", type=int_in(1, 512), default=32, help="image side in pixels, at most 512 "
                      "(default: %(default)s)")
    demo.add_argument("--upscale", type=int_in(1, 64), default=4, help="nearest-neighbour upscale of the saved "
                      "image, at most 64 (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    demo.set_defaults(func=command(_cmd_demo))
    add_export_parser(sub)
    return parser


def main(argv=None) -> int:
    """Runs one command; a bad argument prints one ``error:`` line and gives exit status 2
    (returned, or raised as SystemExit(2) by the parser)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
