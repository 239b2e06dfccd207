"""What every fastdiff command checks in its arguments, before it loads a model or samples.

A bad argument ends a command with one line, ``error: <what was given and what is valid>``,
and exit status 2 -- the same as argparse's own errors (see ``Parser``) -- and it is found
before any work, so a run never ends after minutes of sampling with its images unsaved.

Output paths (``plan_outputs``): a name with an image suffix (``-o cat.jpg``) is one file,
written in the format its suffix names; for several images it names a folder by its stem
(``-o cats.png`` writes ``cats/000-<prompt>.png``, ...). A name without a suffix, or an
existing folder, is a folder of PNGs.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from typing import Iterable, List, Optional

# Formats an image can be saved in by its suffix: the common ones Pillow writes from RGB.
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Lossy formats at Pillow's default quality (75) show blocks on generated images.
LOSSY_QUALITY = 95


class CliError(Exception):
    """A bad argument: `command` prints ``error: <message>`` and the command exits with 2."""


def one_line(exc: BaseException) -> str:
    """The message of an exception on one line (some libraries' messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def command(func):
    """Makes a command function print a CliError as one ``error:`` line and return 2."""

    @functools.wraps(func)
    def run(args) -> int:
        try:
            return func(args)
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


@contextlib.contextmanager
def api_errors(what: Optional[str] = None):
    """The API's bad-input errors (ValueError, TypeError, missing or unreadable files) as a
    CliError: one line, no traceback. Other exceptions are bugs and keep their traceback."""
    try:
        yield
    except (ValueError, TypeError, OSError) as exc:
        raise CliError(f"{what}: {one_line(exc)}" if what else one_line(exc)) from exc


class Parser(argparse.ArgumentParser):
    """argparse with its errors in the house form: one ``error:`` line (and a pointer to
    --help instead of the usage block), exit status 2. Sub-command parsers inherit it."""

    def error(self, message):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


# ------------------------------------------------------------------ argument types (argparse type=)

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def int_in(low: int, high: int):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        return value

    parse.__name__ = f"int_in_{low}_{high}"
    return parse


def random_seed(text: str) -> int:
    """A seed torch.Generator.manual_seed takes without wrapping: an integer in [0, 2**64)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# ------------------------------------------------------------------ devices

def check_device(name: Optional[str], flag: str = "--device"):
    """The torch.device `name` names, refused unless this machine has it; None = cuda when
    available, else cpu."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "valid: cpu, cuda, cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CliError(f"{flag} {name!r} is not a device; {valid}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"{flag} {name!r}: CUDA is not available on this machine (no GPU, or a CPU-only torch); "
                           "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CliError(f"{flag} {name!r}: this machine has {count} CUDA device(s); valid: cpu, cuda, "
                           + ", ".join(f"cuda:{i}" for i in range(count)))
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CliError(f"{flag} {name!r}: MPS is not available on this machine; {valid}")
    elif device.type != "cpu":
        raise CliError(f"{flag} {name!r}: fastdiff runs on cpu and cuda, not {device.type}; {valid}")
    return device


# ------------------------------------------------------------------ output paths

def image_suffixes() -> List[str]:
    """The suffixes an output image may have, the ones this Pillow can write."""
    from PIL import Image

    registered = Image.registered_extensions()
    return [s for s in _IMAGE_SUFFIXES if registered.get(s) in Image.SAVE]


def image_suffix(path: str, flag: str = "-o/--output", *, required: bool = False) -> Optional[str]:
    """The image suffix of `path` (lower case), None for a name without one; an unknown suffix
    is a CliError, as is a missing one where `required`."""
    suffix = os.path.splitext(path)[1].lower()
    valid = image_suffixes()
    if suffix in valid:
        return suffix
    if suffix or required:
        what = f"unknown image suffix {suffix!r}" if suffix else "no image suffix"
        folder = "" if required else ", or a folder name without a suffix"
        raise CliError(f"{flag} {path!r}: {what}; valid: {', '.join(valid)}{folder}")
    return None


def check_writable(path: str, flag: str = "-o/--output") -> None:
    """Refuses a file path that cannot be written: under a regular file, in a folder without
    write permission, a folder itself, or a read-only file. Creates nothing."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise CliError(f"{flag}: {path} is a folder, not a file")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise CliError(f"{flag}: {path} exists and is read-only")
        return
    check_folder_writable(os.path.dirname(path), flag)


def check_folder_writable(folder: str, flag: str = "-o/--output") -> None:
    """Refuses a folder that cannot be made or written in: a regular file on its path, or a
    first existing folder on its path without write permission. Creates nothing."""
    folder = os.path.abspath(folder)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CliError(f"{flag}: cannot write in {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"{flag}: cannot write in {folder}: no permission to write in the folder {existing}")


def plan_outputs(output: str, names: Iterable[str], flag: str = "-o/--output") -> List[str]:
    """The path each image goes to (`names`: one file name without suffix per image), every
    one checked to be writable. The rule is in this module's docstring."""
    names = list(names)
    suffix = None if os.path.isdir(output) else image_suffix(output, flag)
    if suffix is not None and len(names) == 1:
        paths = [output]
    else:
        folder = output[: -len(suffix)] if suffix else output
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise CliError(f"{flag} {output!r}: the {len(names)} image(s) go in the folder {folder}, which is a file")
        paths = [os.path.join(folder, name + (suffix or ".png")) for name in names]
    for path in paths:
        check_writable(path, flag)
    return paths


def save_image(image, path: str) -> None:
    """A PIL image to `path`, in the format its suffix names; makes the folders on the way."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    lossy = os.path.splitext(path)[1].lower() in (".jpg", ".jpeg", ".webp")
    image.save(path, **({"quality": LOSSY_QUALITY} if lossy else {}))


def read_json(path: str, flag: str) -> dict:
    """The JSON object in `path` (a CliError naming `flag` otherwise)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CliError(f"{flag}: {path} is not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{flag}: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise CliError(f"{flag}: {path} must hold a JSON object of GLIDE options")
    return data


def load_pipeline(model, device, dtype, *, config=None, tokenizer=None, runtime="torch", progress=True):
    """The pipeline of `model` (a folder, a single file, None = the built-in model); runtime
    "onnxruntime": its cached ONNX export (Pipeline.from_pretrained's runtime=)."""
    from .pipelines import Pipeline

    single_file = model is not None and os.path.isfile(model)
    kw = {} if runtime == "torch" else dict(runtime=runtime, progress=progress)
    with api_errors():
        if kw and single_file and (config or tokenizer):
            raise CliError("--runtime onnxruntime loads a folder or a single file alone (no --config, "
                           "--tokenizer); export such a model with `fastdiff export onnx` and pass its folder")
        if model is None:
            return Pipeline(device=device, dtype=dtype, **kw)
        if single_file and not kw:
            from .pipelines import StableDiffusionPipeline

            return StableDiffusionPipeline.from_single_file(model, config=config, tokenizer=tokenizer,
                                                            device=device, dtype=dtype)
        return Pipeline.from_pretrained(model, device=device, dtype=dtype, **kw)


def add_glide_model_arguments(group) -> None:
    """--glide BASE_PT and the options that load a GLIDE pipeline with it (load_glide_pipeline)."""
    group.add_argument("--glide", metavar="BASE_PT", help="GLIDE base checkpoint (base.pt, or base_inpaint.pt "
                       "with --glide-inpaint); 64x64 images, 256x256 with --glide-upsampler")
    group.add_argument("--glide-upsampler", metavar="UPSAMPLE_PT", help="GLIDE upsampler checkpoint (upsample.pt)")
    group.add_argument("--glide-tokenizer", metavar="DIR", help="folder with GLIDE's encoder.json and vocab.bpe "
                       "(.gz accepted)")
    group.add_argument("--glide-options", metavar="JSON", help="GLIDE options of the base model as a JSON object "
                       "(glide-text2im's option names; missing keys take its defaults)")
    group.add_argument("--glide-upsampler-options", metavar="JSON", help="GLIDE options of the upsampler "
                       "(defaults: glide-text2im's upsampler defaults)")
    group.add_argument("--glide-inpaint", action="store_true", help="the checkpoints are the inpainting ones; "
                       "needs --image and --mask")
    group.add_argument("--glide-clip", metavar="DIR", help="folder with clip_image_enc.pt, clip_text_enc.pt and "
                       "bpe_simple_vocab_16e6.txt.gz, for --clip-guidance")


def load_glide_pipeline(args, device, dtype):
    """The GLIDE pipeline that add_glide_model_arguments' options name."""
    from .pipelines import Pipeline

    if not args.glide_tokenizer:
        raise CliError("GLIDE needs --glide-tokenizer, the folder with encoder.json and vocab.bpe")
    options = [read_json(path, flag) if path else None
               for path, flag in ((args.glide_options, "--glide-options"),
                                  (args.glide_upsampler_options, "--glide-upsampler-options"))]
    with api_errors():
        return Pipeline.from_glide(args.glide, args.glide_upsampler, tokenizer=args.glide_tokenizer,
                                   inpaint=args.glide_inpaint, clip=args.glide_clip, options=options[0],
                                   upsampler_options=options[1], device=device, dtype=dtype)
