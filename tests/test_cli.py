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
    r = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, cwd=ROOT)
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
