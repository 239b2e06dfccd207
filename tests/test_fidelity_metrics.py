"""IS / FID / KID (fastdiff.eval.inception, fastdiff.eval.fidelity) against torch-fidelity 0.4.0, closed forms,
and the refusals of bad weights, bad images and bad features.

The oracle: torch-fidelity 0.4.0, installed with `pip install --no-deps torch-fidelity==0.4.0` (it requires
torchvision, whose PyPI wheel would replace the installed torch). Its Inception network and metric functions do
not use torchvision, but its package __init__ imports it (for its other feature extractors and datasets), so where
torchvision is absent a stand-in module tree is put in sys.modules just for that import: only the names those
imports bind, each a stub that raises if called. Nothing here reaches them.

No real weights: a seeded random InceptionV3 (random BatchNorm weights, biases and running statistics too, so a
wrong eps, a swapped parameter or a wrong block variant shows) saved in the real file's layout, which torch-fidelity
loads strictly. Nothing may download: every test here runs with the network cut (fixture `no_downloads`).
"""
from __future__ import annotations

import ctypes
import importlib.util
import socket
import sys
import types
import urllib.request

import numpy as np
import pytest
import torch
from deps import require

from fastdiff.eval.fidelity import fid, fid_from_statistics, fid_statistics, inception_score, kid
from fastdiff.eval.inception import (INCEPTION_FILE, INCEPTION_SHA256, TORCH_FIDELITY_FILE, InceptionV3,
                                     inception_features, load_inception, sha256_of, tf1_resize_bilinear)

# The network's features from the same float32 ops in the same order are bit-identical (seen: max difference 0).
# The bound leaves room for a legitimate reordering (another conv algorithm, another batch split): float32 sums of
# K ~ 10^3 terms carry ~sqrt(K) * 6e-8 ~ 2e-6 relative rounding, compounding as a random walk over the network's
# ~20 layers deep to ~1e-5 of the features' scale; a wrong eps (0.001 vs 1e-5) moves them ~2% here, a wrong
# layer far more.
FEATURE_RTOL = 1e-5
# The metrics from identical features run the same numpy / torch ops as torch-fidelity: equal to the last bits.
METRIC_RTOL = 1e-6


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted (fastdiff and these tests must never download)")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _openblas_thread_controls():
    """(get, set) of numpy's OpenBLAS thread count through its C API (what threadpoolctl does), or None."""
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            get, put = f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}"
            if hasattr(lib, get) and hasattr(lib, put):
                return getattr(lib, get), getattr(lib, put)
    return None


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread for torch and numpy's OpenBLAS in this module: on a shared 2-core machine two threads run the
    network ~15x and FID's 2048x2048 eigvals ~8x slower while another process holds a core (seen: 46 s against
    2.7 s, 33 s against 4 s); on an idle machine one costs less than 2x. Restored afterwards."""
    threads, blas = torch.get_num_threads(), _openblas_thread_controls() if sys.platform == "linux" else None
    blas_threads = blas[0]() if blas else None
    torch.set_num_threads(1)
    if blas:
        blas[1](1)
    yield
    torch.set_num_threads(threads)
    if blas:
        blas[1](blas_threads)


def _stub(name: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {name} is not available in fastdiff's tests")
    return type(name, (), {"__init__": refuse}) if name[0].isupper() else refuse


def _stand_in_torchvision() -> dict:
    """Stand-in modules for the torchvision names torch-fidelity 0.4.0 binds at import; returns what it added."""
    names = {"torchvision": [], "torchvision.datasets": ["CIFAR10", "CIFAR100", "STL10"],
             "torchvision.transforms": ["Compose", "Resize", "CenterCrop"],
             "torchvision.transforms.functional": ["pil_to_tensor", "normalize"], "torchvision.models": ["vgg16"]}
    added = {}
    for name, attributes in names.items():
        module = types.ModuleType(name, "stand-in for tests/test_fidelity_metrics.py; see its docstring")
        for attribute in attributes:
            setattr(module, attribute, _stub(attribute))
        added[name] = module
    for name, module in added.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(added[parent], child, module)
    return added


def _import_torch_fidelity():
    if importlib.util.find_spec("torchvision") is not None:
        return require("torch_fidelity")
    added = _stand_in_torchvision()
    sys.modules.update(added)
    try:
        return require("torch_fidelity")
    finally:  # torch_fidelity keeps its references; nothing else should see the stand-in
        for name in added:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def tf():
    return _import_torch_fidelity()


def write_random_inception(path) -> str:
    """A seeded random InceptionV3 in the real layout. He-initialised convs and BatchNorm weights / variances
    in [0.5, 1.5] keep activations O(1) through its 94 layers, and the features vary from image to image."""
    torch.manual_seed(0)
    model = InceptionV3()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            if key.endswith("running_var") or key.endswith("bn.weight"):
                value.uniform_(0.5, 1.5)
            elif key.endswith("conv.weight"):
                value.normal_(0.0, (2.0 / value[0].numel()) ** 0.5)
            else:  # running means, BatchNorm biases, the fc layer
                value.normal_(0.0, 0.1)
        # A random network's features share a large common part that would put every image in the same class
        # (IS ~ 1): take it out of the classifier and scale it so the logits differ by ~3 from image to image.
        probe = model.eval()(images(4, 64, 64, seed=99))["2048"].double()
        mean, weight = probe.mean(0), model.fc.weight.double()
        weight -= torch.outer(weight @ mean, mean) / (mean @ mean)
        weight *= 3.0 / (probe - mean).matmul(weight.T).std()
        model.fc.weight.copy_(weight)
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inception") / "random_inception.pth")


@pytest.fixture(scope="module")
def ours(weights):
    return load_inception(weights, sha256=sha256_of(weights))


def images(n, height, width, seed):
    """Smooth colour fields plus noise: features that differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(height, width),
                                             mode="bilinear", align_corners=False)
    noisy = smooth * 220 + torch.rand(n, 3, height, width, generator=g) * 35
    return noisy.round().clamp(0, 255).to(torch.uint8)


def assert_close_to_scale(got, expected, rtol, what):
    scale = expected.abs().max().item()
    error = (got - expected).abs().max().item()
    assert error <= rtol * scale, f"{what}: max |difference| {error:.3g} > {rtol} x scale {scale:.3g}"


def test_features_equal_torch_fidelitys_network(tf, weights, ours):
    theirs = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=weights)  # load_state_dict strict
    for n, height, width in ((3, 64, 64), (2, 37, 53), (1, 299, 299), (1, 320, 300)):
        batch = images(n, height, width, seed=height * width)
        expected = dict(zip(["2048", "logits_unbiased"], theirs(batch)))
        got = inception_features(ours, batch, batch_size=2)  # a batch split theirs does not make
        for name, value in expected.items():
            assert got[name].dtype == torch.float32 and got[name].shape == value.shape
            assert_close_to_scale(got[name], value, FEATURE_RTOL, f"{name} at {height}x{width}")
        if n > 1:  # the images are told apart
            assert got["2048"].std(0).mean() > 1e-2 * got["2048"].abs().mean()


def test_tf1_resize_equals_torch_fidelitys(tf):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as theirs

    for height, width in ((37, 53), (1, 5), (299, 299), (400, 310)):
        x = torch.rand(2, 3, height, width) * 255
        expected = theirs(x, size=(299, 299), align_corners=False)
        assert torch.equal(tf1_resize_bilinear(x), expected), (height, width)


def test_metrics_equal_torch_fidelitys_calculate_metrics(tf, weights, ours):
    first, second = images(10, 64, 64, seed=1), images(8, 37, 53, seed=2)

    class Images(torch.utils.data.Dataset):
        def __init__(self, stack):
            self.stack = stack

        def __len__(self):
            return len(self.stack)

        def __getitem__(self, i):
            return self.stack[i]

    settings = dict(isc_splits=4, kid_subsets=50, kid_subset_size=6)
    expected = tf.calculate_metrics(input1=Images(first), input2=Images(second), isc=True, fid=True, kid=True,
                                    cuda=False, feature_extractor_weights_path=weights, batch_size=64, cache=False,
                                    save_cpu_ram=True, verbose=False, **settings)
    f1, f2 = inception_features(ours, first), inception_features(ours, second)
    got = {}
    got["inception_score_mean"], got["inception_score_std"] = inception_score(f1["logits_unbiased"], splits=4)
    got["frechet_inception_distance"] = fid_from_statistics(fid_statistics(f1["2048"]), fid_statistics(f2["2048"]))
    got["kernel_inception_distance_mean"], got["kernel_inception_distance_std"] = kid(
        f1["2048"], f2["2048"], subsets=50, subset_size=6)
    assert got["inception_score_mean"] > 1.5 and got["frechet_inception_distance"] > 0  # not a degenerate case
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=METRIC_RTOL, abs=1e-12), key


@pytest.mark.parametrize("width", [128, 301])  # 2048 costs ~5 s per eigvals: the end-to-end test has it
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metric_functions_equal_torch_fidelitys(tf, width, dtype):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(width)
    x = np.abs(rng.standard_normal((60, width))).astype(dtype)   # post-ReLU-like features
    y = (np.abs(rng.standard_normal((45, width))) * 1.2 + 0.1).astype(dtype)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    theirs = fid_statistics_to_metric(fid_features_to_statistics(tx), fid_features_to_statistics(ty), False)
    assert fid(x, y) == pytest.approx(theirs["frechet_inception_distance"], rel=METRIC_RTOL)
    assert fid(tx, ty) == pytest.approx(theirs["frechet_inception_distance"], rel=METRIC_RTOL)

    for options in (dict(), dict(kid_kernel_poly_degree=2, kid_kernel_poly_gamma=0.5, kid_kernel_poly_coef0=0.3,
                                 rng_seed=7)):
        theirs = kid_features_to_metric(tx, ty, kid_subsets=30, kid_subset_size=40, verbose=False, **options)
        got = kid(x, y, subsets=30, subset_size=40, degree=options.get("kid_kernel_poly_degree", 3),
                  gamma=options.get("kid_kernel_poly_gamma"), coef0=options.get("kid_kernel_poly_coef0", 1),
                  seed=options.get("rng_seed", 2020))
        assert got == pytest.approx((theirs["kernel_inception_distance_mean"],
                                     theirs["kernel_inception_distance_std"]), rel=METRIC_RTOL)

    logits = (rng.standard_normal((57, 1008)) * 5).astype(dtype)
    theirs = isc_features_to_metric(torch.from_numpy(logits))
    assert inception_score(logits) == pytest.approx((theirs["inception_score_mean"], theirs["inception_score_std"]),
                                                    rel=METRIC_RTOL)


def test_a_class_nobody_predicts_adds_nothing_to_is(tf):
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(3).standard_normal((20, 6)) * 2
    unseen = np.concatenate([logits, np.full((20, 1), -1e4)], axis=1)  # softmax gives it exactly 0.0
    assert np.isnan(isc_features_to_metric(torch.from_numpy(unseen), splits=2)["inception_score_mean"])  # 0 * inf
    assert inception_score(unseen, splits=2) == pytest.approx(inception_score(logits, splits=2), rel=1e-12)


def test_fid_closed_form():
    d, delta = 4, np.array([0.5, -1.0, 0.0, 2.0])
    exact = delta @ delta
    assert fid_from_statistics((np.zeros(d), np.eye(d)), (delta, np.eye(d))) == pytest.approx(exact, rel=1e-12)
    assert fid_from_statistics({"mu": np.zeros(d), "sigma": np.eye(d)},
                               {"mu": np.zeros(d), "sigma": 4 * np.eye(d)}) == pytest.approx(d, rel=1e-12)
    # From n samples of each: FID - |delta|^2 ~ 2 delta.e with e ~ N(0, 2I/n) (the mean's error), plus O(d^2 / n)
    # from the covariances; its standard deviation is 2 |delta| sqrt(2 / n) (0.0145 here); allow 5 of them.
    n = 200_000
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, d)) + 3.0, rng.standard_normal((n, d)) + 3.0 + delta
    assert fid(x, y) == pytest.approx(exact, abs=5 * 2 * np.sqrt(exact) * np.sqrt(2 / n))


def test_inception_score_closed_form():
    for classes, splits in ((1, 1), (4, 1), (10, 1), (10, 10)):
        rows = 10 * classes * 3
        logits = np.full((rows, classes), -1e4)  # softmax is exactly one-hot
        logits[np.arange(rows), np.arange(rows) % classes] = 0.0
        # unshuffled, each split holds every class equally: IS = exp(KL(onehot || uniform)) = classes
        mean, std = inception_score(logits, splits=splits, seed=None)
        assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    assert inception_score(np.zeros((30, 7)), splits=3)[0] == pytest.approx(1.0, rel=1e-12)


def test_kid_of_a_set_against_itself_is_about_zero_and_shifts_are_positive():
    rng = np.random.default_rng(1)
    x, other = rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    same, same_spread = kid(x, x.copy(), subsets=20, subset_size=100)
    independent, spread = kid(x, other, subsets=20, subset_size=100)
    shifted, _ = kid(x, other + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 4 * same_spread + 1e-6 and abs(independent) < 4 * spread + 1e-6
    assert shifted > 50 * max(abs(same), abs(independent), spread)


def test_bad_weight_files_are_refused(tmp_path, weights):
    missing = tmp_path / INCEPTION_FILE
    with pytest.raises(FileNotFoundError, match=f"{missing}.*never downloads.*{TORCH_FIDELITY_FILE}.*"
                                                f"--inception-weights PATH"):
        load_inception(missing)
    with pytest.raises(ValueError, match=f"does not start with the expected {INCEPTION_SHA256}.*--inception-sha256"):
        load_inception(weights)  # the default expects torch-fidelity's own file
    with pytest.raises(ValueError, match="hex digits"):
        load_inception(weights, sha256="xyz")
    state = torch.load(weights, weights_only=True)
    broken = {"missing": ({k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}, "missing: Mixed_7c"),
              "extra": (dict(state, extra_head=torch.zeros(1)), "1 unexpected: extra_head"),
              "shape": (dict(state, **{"fc.weight": torch.zeros(1000, 2048)}), r"fc.weight \(1000, 2048\)"),
              "nan": (dict(state, **{"fc.bias": torch.full((1008,), float("nan"))}), "NaN.*fc.bias"),
              "list": ([1, 2], "state dict"),
              "pickled_class": ({"model": InceptionV3}, "weights_only=True")}
    for name, (content, match) in broken.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        with pytest.raises(ValueError, match=match):
            load_inception(path, sha256=None)
        with pytest.raises(ValueError, match="does not start with"):
            load_inception(path)  # the hash is checked before anything is unpickled


def test_old_files_without_num_batches_tracked_and_safetensors_load(tmp_path, weights, ours):
    from safetensors.torch import save_file

    state = torch.load(weights, weights_only=True)
    lean = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(lean, tmp_path / "lean.pth")
    save_file(lean, str(tmp_path / "lean.safetensors"))
    batch = images(1, 40, 40, seed=9)
    expected = ours(batch)["2048"]
    for path in (tmp_path / "lean.pth", tmp_path / "lean.safetensors"):
        model = load_inception(path, sha256=sha256_of(path))
        assert not model.training and torch.equal(model(batch)["2048"], expected)


def test_bad_images_are_refused(ours):
    with pytest.raises(TypeError, match="uint8"):
        ours(torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(1, 1, 8, 8\)"):
        inception_features(ours, torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(3, 8, 8\)"):
        inception_features(ours, torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no images"):
        inception_features(ours, [])
    with pytest.raises(ValueError, match="batch_size"):
        inception_features(ours, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), batch_size=0)


def test_feature_batches_and_numpy_input_agree(ours):
    batch = images(2, 30, 30, seed=5)
    whole = inception_features(ours, batch)
    pieces = inception_features(ours, [batch[:1].numpy(), batch[1:]], batch_size=1)
    for name in whole:
        assert_close_to_scale(pieces[name], whole[name], FEATURE_RTOL, name)


def test_bad_features_are_refused():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="subset_size=10 need at least.*got 5 and 5.*--kid-subset-size"):
        kid(x, x, subset_size=10)
    with pytest.raises(ValueError, match="different widths: 3 and 4"):
        kid(x, np.zeros((5, 4)), subset_size=2)
    with pytest.raises(ValueError, match="different widths: 3 and 4"):
        fid(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="different feature widths"):
        fid_from_statistics(fid_statistics(x), fid_statistics(np.zeros((5, 4))))
    with pytest.raises(ValueError, match="NaN"):
        fid(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        kid(np.zeros((3, 2)), np.full((3, 2), np.inf), subset_size=2)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(np.full((20, 2), np.nan))
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="splits=10 needs at least 10 images, got 4"):
        inception_score(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="2-D"):
        fid_statistics(np.zeros(4))
    with pytest.raises(ValueError, match="sigma"):
        fid_from_statistics((np.zeros(3), np.eye(2)), (np.zeros(3), np.eye(3)))
