"""`fastdiff metrics` over `fastdiff sample` runs (fastdiff.eval.metrics): every metric from the
per-image scores it is defined by, the same numbers under torchrun, the report, the refusals.

Each metric here is recomputed from its definition on the same images (the metric functions
themselves are proven against torch-fidelity and scikit-image in test_fidelity_metrics.py and
test_image_metrics.py), so what this file checks is the plumbing: which images meet which
reference, in which order, through which network."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff.data.scenes import render, sample_scenes
from fastdiff.eval import Judge
from fastdiff.eval.batch import read_run
from fastdiff.eval.fidelity import fid_from_statistics, fid_statistics, kid
from fastdiff.eval.image_metrics import psnr, ssim
from fastdiff.eval.inception import sha256_of
from fastdiff.eval.metrics import Scorers, Settings, evaluate_run

sys.path.insert(0, os.path.dirname(__file__))
from test_fidelity_metrics import _import_torch_fidelity, write_random_inception  # noqa: E402

N = 12
SMALL = Settings(kid_subsets=5, kid_subset_size=6, batch_size=5)  # chunks of 5: 5 + 5 + 2


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics") / "run"
    done = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--prompts", "scenes:heldout", "--num-images",
                           str(N), "--steps", "4", "--batch-size", "6", "--output", str(out), "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def _images(folder):
    from PIL import Image

    return torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(folder, line["file"])).convert("RGB"))
                                         .copy()).permute(2, 0, 1) for line in read_run(folder)["manifest"]])


def _renders(n, size=64):
    pixels = torch.stack([render(s, size) for s in sample_scenes(n, seed=0, split="heldout")])
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def test_judge_metrics_equal_their_definitions_on_the_runs_images(run):
    judge = Judge.load()
    result = evaluate_run(str(run), Scorers(judge=judge), reference="scenes", settings=SMALL)
    images, refs = _images(run), _renders(N)
    # The same chunks of 5 as the run's scoring: a batch's float32 conv sums depend on its size, and FID of
    # 12 images in 128 dimensions (a singular covariance) magnifies that; chunked alike, the bits are equal.
    ours, theirs = (np.concatenate([judge.embed(x[i:i + 5].float() / 127.5 - 1).numpy()
                                    for i in range(0, N, 5)]) for x in (images, refs))
    m = result["metrics"]
    assert m["judge_fid"] == pytest.approx(fid_from_statistics(fid_statistics(ours), fid_statistics(theirs)),
                                           rel=1e-9)
    assert m["judge_kid"] == pytest.approx(kid(ours, theirs, subsets=5, subset_size=6)[0], rel=1e-9)
    assert m["psnr"] == pytest.approx(psnr(refs, images).mean().item(), rel=1e-12)
    assert m["ssim"] == pytest.approx(ssim(refs, images).mean().item(), rel=1e-12)
    assert 0 <= m["accuracy_all"] <= 1 and m["accuracy_layout"] > 0.5  # guided samples of a trained model
    assert result["n"] == N and result["config"]["steps"] == 4


def test_renders_against_themselves_score_perfectly(tmp_path, run):
    """The real renders written as a run: FID ~0 and accuracy of the judge on real images (its ceiling)."""
    from PIL import Image

    fake = tmp_path / "renders"
    fake.mkdir()
    for name in ("run.json", "manifest.jsonl"):
        (fake / name).write_bytes((run / name).read_bytes())
    for i, pixels in enumerate(_renders(N)):
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(fake / f"{i:06d}.png")
    judge = Judge.load()
    m = evaluate_run(str(fake), Scorers(judge=judge), reference="scenes", settings=SMALL)["metrics"]
    # FID of a set against itself is 0 but for the square roots of S S's eigenvalues, which for a singular
    # S (12 images, 128 features) sit at rounding level eps * lmax^2: each root is off by up to
    # sqrt(eps) * lmax, d of them, twice (torch-fidelity's eigvals method has the same floor).
    features = judge.embed(_renders(N).float() / 127.5 - 1).numpy()
    lmax = np.linalg.eigvalsh(np.cov(features, rowvar=False)).max()
    assert abs(m["judge_fid"]) < 2 * features.shape[1] * np.sqrt(np.finfo(float).eps) * lmax
    assert m["psnr"] == float("inf") and m["ssim"] == pytest.approx(1.0)
    assert m["accuracy_all"] == 1.0


def test_an_unpaired_reference_folder_is_cached(tmp_path, run):
    from PIL import Image

    refs = tmp_path / "real"
    refs.mkdir()
    for i, pixels in enumerate(_renders(8)):
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(refs / f"real{i}.png")
    settings = Settings(kid_subsets=3, kid_subset_size=6, batch_size=4)
    cache = tmp_path / "cache"
    first = evaluate_run(str(run), Scorers(judge=Judge.load(), judge_sha256="x"), reference=str(refs),
                         settings=settings, cache_dir=str(cache))
    assert "psnr" not in first["metrics"] and len(os.listdir(cache / "features")) == 1
    again = evaluate_run(str(run), Scorers(judge=Judge.load(), judge_sha256="x"), reference=str(refs),
                         settings=settings, cache_dir=str(cache))
    assert again["metrics"] == first["metrics"]
    os.utime(refs / "real0.png", (1, 1))  # a changed reference set is a new key, not a stale hit
    evaluate_run(str(run), Scorers(judge=Judge.load(), judge_sha256="x"), reference=str(refs), settings=settings,
                 cache_dir=str(cache))
    assert len(os.listdir(cache / "features")) == 2


def _metrics_cli(*args, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run(launcher + ["-m", "fastdiff", "metrics", *args], env=_env(), capture_output=True,
                          text=True, timeout=300)


def test_cli_report_and_torchrun_give_the_same_numbers(run, tmp_path):
    common = [str(run), "--reference", "scenes", "--judge", "--kid-subsets", "5", "--kid-subset-size", "6",
              "--batch-size", "5"]
    one = _metrics_cli(*common, "--output-json", str(tmp_path / "one.json"), "--output-md", str(tmp_path / "one.md"))
    assert one.returncode == 0, one.stderr
    two = _metrics_cli(*common, "--output-json", str(tmp_path / "two.json"), torchrun=True)
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = (json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two"))
    assert first["runs"][0]["metrics"] == second["runs"][0]["metrics"]
    assert first["settings"]["kid_subset_size"] == 6 and first["networks"]["judge"]
    table = open(tmp_path / "one.md").read()
    assert "| model (run) | guidance | images |" in table and "FID (judge) ↓" in table and "SSIM ↑" in table


@pytest.mark.parametrize("args,match", [
    (["--judge"], "needs at least kid_subset_size=1000 images in each set, the run has 12"),
    (["--inception-weights", "/nowhere/pt_inception-2015-12-05-6726825d.pth"], "pt_inception-2015-12-05"),
    ([], "nothing to compute"),
    (["--reference", "/nowhere/val2014"], "does not exist"),
])
def test_bad_metrics_arguments_are_one_line_errors(run, args, match):
    refs = [] if any(a == "--reference" for a in args) else ["--reference", "scenes"]
    done = _metrics_cli(str(run), *refs, *args) if args else _metrics_cli(str(run))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and match in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    done = _metrics_cli(str(tmp_path / "half"), "--judge", "--reference", "scenes")
    assert done.returncode == 2 and "not a finished `fastdiff sample` run" in done.stderr


def test_inception_metrics_of_a_run_equal_torch_fidelitys(run, tmp_path):
    """IS / FID / KID of `fastdiff metrics` on a run against torch-fidelity on the same images, through a
    random-initialised Inception saved in the real layout."""
    fidelity = _import_torch_fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    weights = write_random_inception(tmp_path / "random_inception.pth")
    report = tmp_path / "report.json"
    done = _metrics_cli(str(run), "--reference", "scenes", "--inception-weights", weights, "--inception-sha256",
                        sha256_of(weights)[:12], "--is-splits", "3", "--kid-subsets", "5", "--kid-subset-size", "6",
                        "--batch-size", "5", "--output-json", str(report))
    assert done.returncode == 0, done.stderr
    assert json.dumps(json.load(open(report))).count(sha256_of(weights)) >= 1  # the report names the file's hash
    ours = json.load(open(report))["runs"][0]["metrics"]
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=weights)
    def features(images):  # torch-fidelity's network in the run's chunks of 5, on the CLI's one thread:
        threads = torch.get_num_threads()  # the same float32 sums in the same order, so the same bits
        torch.set_num_threads(1)
        try:
            parts = [extractor(images[i:i + 5]) for i in range(0, len(images), 5)]
        finally:
            torch.set_num_threads(threads)
        return [torch.cat([p[k] for p in parts]) for k in range(2)]
    (pool, logits), (ref_pool, _) = features(_images(run)), features(_renders(N))
    kid_options = dict(kid_subsets=5, kid_subset_size=6, kid_kernel="poly", kid_kernel_poly_degree=3,
                       kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    expected = dict(isc_features_to_metric(logits, splits=3),
                    **fid_statistics_to_metric(fid_features_to_statistics(pool), fid_features_to_statistics(ref_pool),
                                               False),
                    **kid_features_to_metric(pool, ref_pool, **kid_options))
    assert ours["is"] == pytest.approx(expected["inception_score_mean"], rel=1e-6)
    assert ours["is_std"] == pytest.approx(expected["inception_score_std"], rel=1e-6, abs=1e-12)
    assert ours["fid"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    assert ours["kid"] == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["kid_std"] == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-6)
    assert fidelity.__version__ == "0.4.0"


def test_cli_clip_score_equals_the_scorer_on_the_runs_images(run, tmp_path):
    from fastdiff.eval.image_metrics import ClipScorer
    from test_image_metrics import _write_clip

    folder = tmp_path / "clip"
    _write_clip(str(folder))
    report = tmp_path / "clip.json"
    done = _metrics_cli(str(run), "--clip", str(folder), "--batch-size", "5", "--output-json", str(report))
    assert done.returncode == 0, done.stderr
    got = json.load(open(report))["runs"][0]["metrics"]
    captions = [line["caption"] for line in read_run(str(run))["manifest"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CLI's thread count (OMP_NUM_THREADS=1), for the same float32 sums
    try:
        expected = ClipScorer.from_folder(str(folder)).score(_images(run), captions).mean().item()
    finally:
        torch.set_num_threads(threads)
    assert got["clip_score"] == pytest.approx(expected, rel=1e-6) and set(got) == {"clip_score"}
