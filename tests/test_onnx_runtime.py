"""Pipeline.from_pretrained(path, runtime="onnxruntime"): the model exported once into the
cache (fastdiff/export/cache.py), then run by ONNX Runtime under fastdiff's sampling loop,
giving the PyTorch pipeline's images within float32's rounding (onnx_fixtures.onnx_bound)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deps import require
from sd_fixtures import generate_counting_unet_calls, make_pipeline

require("onnx")
require("onnxruntime")
require("onnxscript")
import fastdiff  # noqa: E402
import fastdiff.export  # noqa: E402
from fastdiff.export import cache  # noqa: E402
from onnx_fixtures import onnx_bound  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd1"))
    make_pipeline(folder, "sd1")
    return folder


@pytest.fixture(scope="module")
def cached(model, tmp_path_factory):
    """(the model folder, its cache root, the ONNX pipeline of the first load)."""
    root = str(tmp_path_factory.mktemp("cache"))
    return model, root, fastdiff.Pipeline.from_pretrained(model, runtime="onnxruntime", cache_dir=root,
                                                          progress=False)


def exports(root):
    onnx_dir = os.path.join(root, "onnx")
    return sorted(os.listdir(onnx_dir)) if os.path.isdir(onnx_dir) else []


def test_the_onnx_runtime_gives_the_pytorch_pipelines_images(cached):
    model, root, onnx_pipe = cached
    assert isinstance(onnx_pipe, fastdiff.pipelines.OnnxStableDiffusionPipeline)
    pipe = fastdiff.Pipeline.from_pretrained(model)
    kw = dict(num_inference_steps=5, guidance_scale=7.5, sampler="dpmpp_2m", seed=1, output_type="pt",
              progress=False, negative_prompt=["blurry", "dark"])
    want, calls = generate_counting_unet_calls(pipe, PROMPTS, **kw)
    got = onnx_pipe.generate(PROMPTS, **kw)
    bound = onnx_bound(pipe, calls, 7.5)
    assert (got - want).abs().max().item() <= bound
    off = onnx_pipe.generate(PROMPTS, **dict(kw, guidance_scale=7.5 * 0.99))  # the bound sees 1% of guidance
    assert (off - want).abs().max().item() > bound


def test_a_second_load_opens_the_cached_export(cached, monkeypatch):
    model, root, _ = cached
    before = exports(root)
    assert len(before) == 1
    record = json.load(open(os.path.join(root, "onnx", before[0], cache.RECORD)))
    assert record["model"] == os.path.abspath(model) and record["dtype"] == "float32"

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")
    monkeypatch.setattr(fastdiff.export, "onnx", no_export)
    again = fastdiff.Pipeline.from_pretrained(model, runtime="onnxruntime", cache_dir=root, progress=False)
    assert again.is_onnx and exports(root) == before


def test_a_changed_model_file_is_exported_anew(model, tmp_path):
    root = str(tmp_path / "cache")
    lines = []
    fastdiff.Pipeline.from_pretrained(model, runtime="onnxruntime", cache_dir=root, progress=lines.append)
    assert any("exporting unet" in line for line in lines)
    config = os.path.join(model, "scheduler", "scheduler_config.json")
    stat = os.stat(config)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        fastdiff.Pipeline.from_pretrained(model, runtime="onnxruntime", cache_dir=root, progress=False)
        assert len(exports(root)) == 2
    finally:
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_interrupted_export_leaves_nothing_a_later_load_takes(model, tmp_path, monkeypatch):
    root = str(tmp_path / "cache")
    real = fastdiff.export.onnx

    def dies_half_way(pipe, out, **kwargs):
        os.makedirs(os.path.join(out, "unet"))
        open(os.path.join(out, "unet", "model.onnx"), "wb").close()
        raise KeyboardInterrupt
    monkeypatch.setattr(fastdiff.export, "onnx", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        fastdiff.Pipeline.from_pretrained(model, runtime="onnxruntime", cache_dir=root, progress=False)
    assert exports(root) == []
    # A temporary folder of a process that died before it could clean up goes at the next export.
    key = cache.cache_key(cache.source_record(model, "float32"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.makedirs(os.path.join(root, "onnx", f"{key}.tmp-{int(dead.stdout)}", "unet"))
    monkeypatch.setattr(fastdiff.export, "onnx", real)
    pipe = fastdiff.Pipeline.from_pretrained(model, runtime="onnxruntime", cache_dir=root, progress=False)
    assert pipe.is_onnx and exports(root) == [key]


def test_a_damaged_cached_export_is_named_with_what_to_do(cached, tmp_path):
    model, root, _ = cached
    import shutil

    copy = str(tmp_path / "cache")
    shutil.copytree(root, copy)
    (key,) = exports(copy)
    os.remove(os.path.join(copy, "onnx", key, "unet", "model.onnx"))
    with pytest.raises((OSError, ValueError), match="delete that folder"):
        fastdiff.Pipeline.from_pretrained(model, runtime="onnxruntime", cache_dir=copy, progress=False)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "a"))
    assert cache.cache_root() == str(tmp_path / "a")
    monkeypatch.delenv("FASTDIFF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == str(tmp_path / "xdg" / "fastdiff")
    assert cache.cache_root(tmp_path / "b") == str(tmp_path / "b")


@pytest.mark.parametrize("kwargs, match", [
    (dict(runtime="tensorrt"), "runtime must be one of 'torch', 'onnxruntime'"),
    (dict(runtime=None), "runtime must be one of"),
    (dict(cache_dir="CACHE"), "cache_dir is for runtime='onnxruntime'"),
    (dict(runtime="onnxruntime", cache_dir="CACHE", dtype=torch.bfloat16), "float32 or float16"),
    (dict(runtime="onnxruntime", cache_dir="CACHE", dtype=torch.float16), "pass device='cuda' for float16"),
    (dict(runtime="onnxruntime", cache_dir="CACHE", device="meta"), "the CPU or a CUDA GPU"),
])
def test_bad_runtime_arguments_are_refused_before_any_work(model, tmp_path, monkeypatch, kwargs, match):
    def no_export(*args, **kw):
        raise AssertionError("exported")
    monkeypatch.setattr(fastdiff.export, "onnx", no_export)
    if "cache_dir" in kwargs:
        kwargs = dict(kwargs, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=match):
        fastdiff.Pipeline.from_pretrained(model, **kwargs)
    assert not (tmp_path / "onnx").exists()


def test_a_missing_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        fastdiff.Pipeline.from_pretrained(tmp_path / "nothing", runtime="onnxruntime", cache_dir=tmp_path)


def test_the_cli_generates_on_the_onnx_runtime(cached, tmp_path, monkeypatch, capsys):
    from fastdiff.cli import main

    model, root, onnx_pipe = cached
    monkeypatch.setenv("FASTDIFF_CACHE", root)
    out = tmp_path / "fox.png"
    argv = ["generate", "a red circle", "--model", model, "-o", str(out), "--steps", "3", "--seed", "2",
            "--no-progress"]
    assert main(argv + ["--runtime", "onnxruntime"]) == 0
    assert len(exports(root)) == 1  # the cached export, not a new one
    from PIL import Image

    got = np.asarray(Image.open(out)).astype(float)
    want = onnx_pipe.generate("a red circle", num_inference_steps=3, seed=2, output_type="np", progress=False)
    assert np.abs(got - np.round(want[0] * 255)).max() <= 1  # one uint8 step of rounding


@pytest.mark.parametrize("extra, words", [
    (["--channels-last"], "PyTorch modules"), (["--clip-skip", "1"], "PyTorch modules"),
    (["--glide", "base.pt"], "export GLIDE"),
])
def test_the_cli_refuses_what_the_onnx_runtime_cannot_do(model, tmp_path, capsys, monkeypatch, extra, words):
    from fastdiff.cli import main

    monkeypatch.setattr(fastdiff.export, "onnx", lambda *a, **k: pytest.fail("exported"))
    code = main(["generate", "a red circle", "--model", model, "-o", str(tmp_path / "x.png"), "--runtime",
                 "onnxruntime", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
