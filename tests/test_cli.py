"""The command line and the offline demo it runs."""
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from fastdiff.cli import main
from deps import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_png(path):
    """Decode the 8-bit RGB, filter-0 PNGs the CLI writes."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat, pos = b"", 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    return raw[:, 1:].reshape(h, w, 3)


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "info" in out and "demo" in out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for option in ["--sampler", "--steps", "--guidance", "--seed", "--no-progress", "--output"]:
        assert option in out


def test_demo_draws_what_the_prompt_says(tmp_path):
    out = tmp_path / "demo.png"
    assert main(["demo", "a red circle", "a blue square", "-o", str(out), "--no-progress", "--upscale", "1"]) == 0
    img = read_png(out).astype(int)
    assert img.shape == (32, 64, 3)
    red, blue = img[:, :32], img[:, 32:]
    centre = (slice(12, 20), slice(12, 20))
    r, g, b = red[centre].mean(axis=(0, 1))
    assert r > 180 and g < 80 and b < 80, (r, g, b)
    r, g, b = blue[centre].mean(axis=(0, 1))
    assert b > 180 and r < 80, (r, g, b)
    # a circle fills about pi/4 of its bounding box, a square all of it
    def fill_ratio(tile, channel):
        mask = (tile[..., channel] > 150) & (tile.min(axis=-1) < 100)
        ys, xs = np.nonzero(mask)
        return mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))

    assert 0.7 < fill_ratio(red, 0) < 0.86
    assert fill_ratio(blue, 2) > 0.95


def test_demo_is_reproducible_and_seed_dependent(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, [5, 5, 6]):
        main(["demo", "a triangle", "-o", str(path), "--seed", str(seed), "--no-progress", "--sampler", "euler_a"])
    a, b, c = (read_png(p) for p in paths)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_demo_rejects_bad_prompts(tmp_path, capsys):
    assert main(["demo", "   ", "-o", str(tmp_path / "x.png")]) == 2
    assert "non-empty prompt" in capsys.readouterr().err
    assert main(["demo", "a pink hexagon", "-o", str(tmp_path / "x.png")]) == 2
    assert "no data matches" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "fastdiff", "info", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and '"guided_step"' in r.stdout


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    require("diffusers")
    from sd_fixtures import make_pipeline

    folder = str(tmp_path_factory.mktemp("sd_cli"))
    make_pipeline(folder, "sd1")
    return folder


def test_generate_writes_images(sd_folder, tmp_path):
    out = tmp_path / "one.png"
    assert main(["generate", "a red circle", "--model", sd_folder, "--steps", "2", "--sampler", "dpmpp_2m",
                 "--seed", "0", "-o", str(out), "--no-progress"]) == 0
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# a comment\n\na blue square\n")
    folder = tmp_path / "many"
    assert main(["generate", "--prompts-file", str(prompts), "--model", sd_folder, "--steps", "2",
                 "--images-per-prompt", "2", "-o", str(folder), "--no-progress"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "000-a-red-circle.png", "001-a-red-circle.png", "002-a-blue-square.png", "003-a-blue-square.png"]


def test_generate_same_seed_same_image(sd_folder, tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for p in paths:
        main(["generate", "a red circle", "--model", sd_folder, "--steps", "2", "--seed", "7", "-o", str(p),
              "--no-progress"])
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_generate_bad_input_is_a_clear_error(sd_folder, tmp_path, capsys):
    assert main(["generate", "a", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["generate", "a", "--model", sd_folder, "--height", "60", "-o", str(tmp_path / "x.png")]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main(["generate", "--model", sd_folder]) == 2
    assert "at least one prompt" in capsys.readouterr().err
    assert main(["generate", "a", "--model", sd_folder, "--truncation-rate", "0.9", "-o", str(tmp_path / "x.png")]) == 2
    assert "VQ-Diffusion option" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "a", "--model", sd_folder, "--cuda-graph", "--device", "cpu",
                     "-o", str(tmp_path / "x.png")]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_speed_flags_keep_the_image(sd_folder, tmp_path):
    """--channels-last and --fuse-qkv change the layout and the GEMMs, not the picture."""
    from PIL import Image

    base = ["generate", "a cat", "--model", sd_folder, "--steps", "3", "--no-progress", "--device", "cpu"]
    assert main(base + ["-o", str(tmp_path / "plain.png")]) == 0
    assert main(base + ["--channels-last", "--fuse-qkv", "-o", str(tmp_path / "fast.png")]) == 0
    plain, fast = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("plain", "fast"))
    assert np.abs(plain - fast).max() <= 1


def test_generate_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for option in ["--model", "--steps", "--guidance", "--sampler", "--seed", "--output", "--prompts-file",
                   "--negative", "--height", "--images-per-prompt", "--dtype", "--no-progress", "--truncation-rate",
                   "--cuda-graph", "--channels-last", "--fuse-qkv"]:
        assert option in out


# --------------------------------------------------------------------------- bad input: one line, before any work

def run_cli(argv):
    """main()'s exit status, whether returned or raised by the parser (argparse's errors)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Every way the CLI loads a model records the call and fails: the checks come first."""
    import fastdiff.train.trainer
    from fastdiff.pipelines import Pipeline, StableDiffusionPipeline

    calls = []

    def load(cls, *args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the arguments were checked")

    for owner, name in ((Pipeline, "from_pretrained"), (Pipeline, "from_glide"),
                        (StableDiffusionPipeline, "from_single_file")):
        monkeypatch.setattr(owner, name, classmethod(load))
    monkeypatch.setattr(fastdiff.train.trainer, "train", lambda *a, **k: load(None, "train"))
    return calls


def test_missing_prompts_file_is_one_line(tmp_path, capsys, no_loading):
    assert run_cli(["generate", "--prompts-file", str(tmp_path / "none.txt"), "-o", str(tmp_path / "x.png")]) == 2
    one_error_line(capsys, "--prompts-file", "none.txt", "not found")
    assert run_cli(["generate", "--prompts-file", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    one_error_line(capsys, "--prompts-file", "folder")
    assert not no_loading


def test_output_under_a_regular_file_is_refused_first(tmp_path, capsys, no_loading):
    (tmp_path / "file.txt").write_text("")
    for output in ("file.txt/x.png", "file.txt/sub/x.png", "file.txt/folder"):
        assert run_cli(["generate", "a red circle", "-o", str(tmp_path / output)]) == 2
        one_error_line(capsys, "-o", "is a file, not a folder")
    (tmp_path / "many").write_text("")  # several images go in the folder many/, which is a file
    assert run_cli(["generate", "a", "b", "-o", str(tmp_path / "many.png")]) == 2
    one_error_line(capsys, "is a file")
    assert run_cli(["demo", "a red circle", "-o", str(tmp_path / "file.txt" / "demo.png")]) == 2
    one_error_line(capsys, "is a file, not a folder")
    assert not no_loading


def test_output_in_an_unwritable_folder_is_refused_first(tmp_path, capsys, monkeypatch, no_loading):
    import fastdiff.cli_args

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere; answer as the folder's permissions do for anyone else
        real_access = os.access
        monkeypatch.setattr(fastdiff.cli_args.os, "access", lambda path, mode: (
            False if os.path.abspath(path) == str(locked) else real_access(path, mode)))
    try:
        for argv in (["generate", "a red circle", "-o", str(locked / "x.png")],
                     ["generate", "a red circle", "-o", str(locked / "new" / "folder")],
                     ["demo", "a red circle", "-o", str(locked / "demo.png")]):
            assert run_cli(argv) == 2
            one_error_line(capsys, "no permission to write", str(locked))
    finally:
        locked.chmod(0o700)
    assert not no_loading


def test_unavailable_or_unknown_device_is_refused_first(tmp_path, capsys, no_loading):
    out = str(tmp_path / "x.png")
    for device in ("gpu", "cuda0", "tpu", "meta"):
        assert run_cli(["generate", "a red circle", "--device", device, "-o", out]) == 2
        one_error_line(capsys, "--device", repr(device), "cpu, cuda")
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            assert run_cli(["generate", "a red circle", "--device", device, "-o", out]) == 2
            one_error_line(capsys, "--device", "CUDA is not available")
        assert run_cli(["generate", "a red circle", "--cuda-graph", "-o", out]) == 2
        one_error_line(capsys, "--cuda-graph", "needs a CUDA device")
    assert run_cli(["train", "-o", str(tmp_path / "model"), "--device", "gpu"]) == 2
    one_error_line(capsys, "--device", "'gpu'")
    assert not no_loading and not os.path.exists(out)


def test_cuda_device_index_past_the_last_gpu_is_refused_first(tmp_path, capsys, monkeypatch, no_loading):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU, as far as the check asks
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert run_cli(["generate", "a red circle", "--device", "cuda:1", "-o", str(tmp_path / "x.png")]) == 2
    one_error_line(capsys, "--device 'cuda:1'", "1 CUDA device(s); valid: cpu, cuda, cuda:0")
    assert not no_loading


def test_unknown_image_suffix_is_refused_first(tmp_path, capsys, no_loading):
    for output in ("pic.jpgg", "pic.txt", "pic.PNG2"):
        assert run_cli(["generate", "a red circle", "-o", str(tmp_path / output)]) == 2
        one_error_line(capsys, "unknown image suffix", ".png, .jpg")
        assert run_cli(["demo", "a red circle", "-o", str(tmp_path / output)]) == 2
        one_error_line(capsys, "unknown image suffix")
    assert run_cli(["demo", "a red circle", "-o", str(tmp_path / "folder")]) == 2
    one_error_line(capsys, "no image suffix")
    assert not no_loading and not list(tmp_path.iterdir())


BAD_NUMBERS = [
    ["demo", "a red circle", "--size", "0"], ["demo", "a red circle", "--size", "-4"],
    ["demo", "a red circle", "--size", "100000"], ["demo", "a red circle", "--steps", "0"],
    ["demo", "a red circle", "--upscale", "0"], ["demo", "a red circle", "--seed", "-1"],
    ["demo", "a red circle", "--guidance", "nan"],
    ["generate", "a", "--steps", "0"], ["generate", "a", "--steps", "-3"],
    ["generate", "a", "--images-per-prompt", "0"],
    ["generate", "a", "--height", "0"], ["generate", "a", "--width", "-8"], ["generate", "a", "--guidance", "inf"],
    ["generate", "a", "--eta", "nan"], ["generate", "a", "--seed", str(2 ** 70)], ["generate", "a", "--seed", "1.7"],
]


@pytest.mark.parametrize("argv", BAD_NUMBERS, ids=[f"{a[0]} {a[2]} {a[3]}" for a in BAD_NUMBERS])
def test_bad_numbers_are_one_line(argv, tmp_path, capsys, no_loading):
    assert run_cli(argv + ["-o", str(tmp_path / "x.png")]) == 2
    one_error_line(capsys, "argument --" + argv[2].lstrip("-"), repr(argv[3]))
    assert not no_loading and not (tmp_path / "x.png").exists()


def test_api_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    from fastdiff.pipelines import Pipeline

    out = str(tmp_path / "x.png")
    for error in (ValueError("a bad\nconfig:\n  norm_num_groups 0"), TypeError("wrong type"),
                  PermissionError(13, "Permission denied", "unet.safetensors"), FileNotFoundError("no unet")):
        def load(cls, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(load))
        assert run_cli(["generate", "a red circle", "--model", str(tmp_path), "-o", out]) == 2
        line = one_error_line(capsys)
        assert line == "error: " + " ".join(str(error).split())

    class Failing:
        defaults = {}

        def generate(self, prompts, **kwargs):
            raise ValueError("height must be a multiple of 8,\ngot 60")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: Failing()))
    assert run_cli(["generate", "a red circle", "--model", str(tmp_path), "-o", out]) == 2
    assert one_error_line(capsys) == "error: height must be a multiple of 8, got 60"


class Recording:
    """A stand-in pipeline: records what generate() was given, returns small images."""

    defaults = {"num_inference_steps": 30, "guidance_scale": 3.0, "sampler": "dpmpp_2m"}

    def __init__(self):
        self.calls = []

    def generate(self, prompts, **kwargs):
        from PIL import Image

        self.calls.append(kwargs)
        count = len(prompts) * kwargs.get("num_images_per_prompt", 1)
        return [Image.new("RGB", (8, 8), (200, 10 * i, 0)) for i in range(count)]


@pytest.fixture
def recording(monkeypatch):
    from fastdiff.pipelines import Pipeline

    pipe = Recording()
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pipe))
    return pipe


def test_generate_passes_only_what_was_typed(tmp_path, recording):
    """The pipeline's defaults (pipe.defaults, the model folder's own) decide the rest."""
    assert main(["generate", "a red circle", "-o", str(tmp_path / "a.png"), "--no-progress"]) == 0
    assert recording.calls[-1] == {"seed": 0, "num_images_per_prompt": 1, "progress": False}
    assert main(["generate", "a red circle", "-o", str(tmp_path / "b.png"), "--steps", "7", "--guidance", "1.5",
                 "--sampler", "ddim", "--eta", "0", "--height", "64", "--negative", "blue"]) == 0
    assert recording.calls[-1] == {"seed": 0, "num_images_per_prompt": 1, "progress": True,
                                   "num_inference_steps": 7, "guidance_scale": 1.5, "sampler": "ddim", "eta": 0.0,
                                   "height": 64, "negative_prompt": ["blue"]}


def test_generate_help_names_no_default_the_api_does_not_have(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: 30" not in out and "7.5" not in out
    assert out.count("default: the model's own; `fastdiff info --model [PATH]` lists them") >= 3


def test_output_suffix_names_the_format(tmp_path, recording):
    from PIL import Image

    for suffix, fmt in ((".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP"), (".png", "PNG")):
        out = tmp_path / f"pic{suffix}"
        assert main(["generate", "a red circle", "-o", str(out), "--no-progress"]) == 0
        assert out.is_file() and Image.open(out).format == fmt
    # several images: the folder named by the stem, each file in the format of the suffix
    assert main(["generate", "a red circle", "a blue square", "-o", str(tmp_path / "cats.jpg"), "--no-progress"]) == 0
    files = sorted((tmp_path / "cats").iterdir())
    assert [p.name for p in files] == ["000-a-red-circle.jpg", "001-a-blue-square.jpg"]
    assert {Image.open(p).format for p in files} == {"JPEG"}
    # a name without a suffix (or an existing folder) is a folder of PNGs, even for one image
    assert main(["generate", "a red circle", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["000-a-red-circle.png"]


@pytest.mark.parametrize("suffix,fmt", [(".jpg", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP")])
def test_demo_writes_the_format_its_suffix_names(tmp_path, suffix, fmt):
    from PIL import Image

    out = tmp_path / "sub" / f"demo{suffix}"
    assert main(["demo", "a red circle", "-o", str(out), "--no-progress", "--steps", "4"]) == 0
    image = Image.open(out)
    assert image.format == fmt and image.size == (128, 128)


def test_info_prints_the_backends_text_and_json(capsys, recording):
    import json

    import fastdiff

    assert main(["info"]) == 0
    assert capsys.readouterr().out.strip() == fastdiff.ops.describe_backends().strip()
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(fastdiff.backend_info()))
    assert main(["info", "--model", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["defaults"] == Recording.defaults and shown["model"] == "the built-in model"


def test_eval_and_train_check_their_outputs_first(tmp_path, capsys, no_loading):
    (tmp_path / "file").write_text("")
    assert run_cli(["eval", "--grid", str(tmp_path / "grid.gif2")]) == 2
    one_error_line(capsys, "--grid", "unknown image suffix")
    assert run_cli(["eval", "--output", str(tmp_path / "file" / "eval.md")]) == 2
    one_error_line(capsys, "--output", "is a file, not a folder")
    assert run_cli(["eval", "--judge", str(tmp_path / "file")]) == 2
    one_error_line(capsys, "--judge", "is a file")
    assert run_cli(["train", "-o", str(tmp_path / "file")]) == 2
    one_error_line(capsys, "--output", "is a file")
    assert run_cli(["train", "-o", str(tmp_path / "file" / "model")]) == 2
    one_error_line(capsys, "--output", "is a file, not a folder")
    assert not no_loading


def test_export_onnx_writes_a_checked_folder(sd_folder, tmp_path, capsys):
    require("onnx"), require("onnxscript"), require("onnxruntime")
    out = tmp_path / "onnx"
    assert main(["export", "onnx", sd_folder, str(out), "--step", "ddim:4,6"]) == 0
    printed = capsys.readouterr().out
    assert (out / "step_ddim" / "steps_4.json").is_file() and (out / "step_ddim" / "steps_6.json").is_file()
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder", "step_ddim"):
        assert (out / name / "model.onnx").is_file()
        assert f"{name}/model.onnx: float32, ONNX Runtime vs PyTorch max error" in printed
    assert (out / "fastdiff_onnx.json").is_file()


def test_export_onnx_bad_input_is_refused_first(sd_folder, tmp_path, capsys, no_loading):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "afile").write_text("x")
    for argv, words in (([str(tmp_path / "full")], ("not empty",)),
                        ([str(tmp_path / "afile")], ("is a file",)),
                        ([str(tmp_path / "afile" / "under")], ("is a file",)),
                        (["--opset", "12", str(tmp_path / "o")], ("--opset",)),
                        (["--step", "nope:4", str(tmp_path / "o")], ("--step", "unknown sampler")),
                        (["--step", "ddim:x", str(tmp_path / "o")], ("--step", "SAMPLER:N")),
                        (["--static", "1x64", str(tmp_path / "o")], ("--static", "BATCHxHEIGHTxWIDTH")),
                        (["--static", "0x64x64", str(tmp_path / "o")], ("--static", "positive")),
                        (["--dtype", "bfloat16", str(tmp_path / "o")], ("--dtype", "invalid choice")),
                        (["--optimize", "tensorrt", str(tmp_path / "o")], ("--optimize", "invalid choice")),
                        (["--glide-inpaint", str(tmp_path / "o")], ("--glide-inpaint", "need --glide")),
                        (["--glide", "base.pt", str(tmp_path / "o")], ("--glide-tokenizer",))):
        assert run_cli(["export", "onnx", *argv]) == 2
        one_error_line(capsys, *words)
    assert not no_loading and not (tmp_path / "o").exists()


# What building the parser must not import: `fastdiff --help` answers in a fraction of a second.
HEAVY = ("torch", "numpy", "PIL", "tqdm", "transformers", "triton", "onnx")
RUN_CLI_AND_LIST_HEAVY = f"""
import atexit, runpy, sys
atexit.register(lambda: print("heavy:", sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr))
sys.argv = ["fastdiff", *sys.argv[1:]]
runpy.run_module("fastdiff", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["generate", "--help"], ["demo", "--help"],
                                  ["train", "--help"], ["eval", "--help"], ["export", "--help"],
                                  ["export", "onnx", "--help"], ["generate", "a", "--sampler", "nope"]])
def test_help_and_argument_errors_import_no_heavy_library(argv):
    r = subprocess.run([sys.executable, "-c", RUN_CLI_AND_LIST_HEAVY, *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    *messages, heavy = r.stderr.strip().splitlines()
    assert heavy == "heavy: []", f"`fastdiff {' '.join(argv)}` imported {heavy}: an eager import is back"
    if argv[-1] == "--help":
        assert r.returncode == 0 and r.stdout.startswith("usage: fastdiff"), r.stderr
    else:  # a wrong sampler: the parser's one error line, the valid names listed without the registry
        assert r.returncode == 2 and messages == [
            "error: argument --sampler: invalid choice: 'nope' (choose from 'ddpm', 'ddim', 'pndm', 'euler', "
            "'euler_a', 'heun', 'dpmpp_2m', 'dpmpp_2m_karras') (see: fastdiff generate --help)"], r.stderr


def test_help_lists_the_registry_samplers_from_the_torch_free_names(capsys):
    from fastdiff.sampling import SAMPLERS
    from fastdiff.sampling.names import SAMPLER_CLASS, SAMPLER_NAMES

    assert SAMPLER_NAMES == tuple(SAMPLERS) and SAMPLER_CLASS == {n: s.diffusers_class for n, s in SAMPLERS.items()}
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "{" + ",".join(SAMPLERS) + "}" in capsys.readouterr().out


def test_lazy_packages_keep_every_public_name():
    code = "import sys, fastdiff; print(fastdiff.__version__, 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["0.1.0", "False"], r.stderr
    import importlib

    import fastdiff

    assert callable(fastdiff.Pipeline.from_pretrained) and "ops" in fastdiff.backend_info()
    assert fastdiff.sampling.sample is importlib.import_module("fastdiff.sampling.samplers").sample
    for name in ("fastdiff", "fastdiff.sampling", "fastdiff.train", "fastdiff.export", "fastdiff.eval"):
        package = importlib.import_module(name)
        assert set(package.__all__) <= set(dir(package)), name
        for public in package.__all__:
            getattr(package, public)
        with pytest.raises(AttributeError, match="has no attribute 'nope'"):
            package.nope
    from fastdiff.export import onnx
    from fastdiff.ops import guided_step

    assert callable(onnx) and fastdiff.ops.guided_step is guided_step
