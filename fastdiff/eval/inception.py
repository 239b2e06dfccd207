"""The InceptionV3 feature network of FID/IS/KID as torch-fidelity 0.4.0 runs it ("inception-v3-compat").

    model = load_inception("pt_inception-2015-12-05-6726825d.pth")
    feats = inception_features(model, images_uint8)          # {"2048": [N, 2048], "logits_unbiased": [N, 1008]}

The network is the TensorFlow graph `pt_inception-2015-12-05` ported to PyTorch (Heusel et al. 2017's FID
network): torchvision's InceptionV3 with the FID variants of its blocks (average pools that do not count the
padding, a max pool in the last block), BatchNorm eps 0.001 and the 1008-way classifier. The state-dict layout
is the one of torch-fidelity's and pytorch-fid's weights file, so that file loads with strict=True; fastdiff
never downloads it.

Input: uint8 [B, 3, H, W] RGB. It is resized to 299x299 with TensorFlow 1.x's bilinear resize
(align_corners=False, no half-pixel centres), then mapped to [-1, 1) by (x - 128) / 128, all in float32.
Outputs, float32 as torch-fidelity returns them: "2048", the average-pooled last block, and
"logits_unbiased", those features times the classifier weight without its bias (what torch-fidelity's IS uses).
"""
from __future__ import annotations

import hashlib
import os
import pickle
from typing import Dict, Iterable, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"             # pytorch-fid's release name
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"   # torch-fidelity's release name, same hash
INCEPTION_SHA256 = "6726825d"  # torch hub convention: the hex digits in the file name begin the file's sha256
INPUT_SIZE = 299
FEATURES = ("2048", "logits_unbiased")


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, TensorFlow's) -> ReLU; keys conv.weight and bn.*."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TensorFlow's SAME average pool divides by the number of real pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool_3x3(x))], 1)


class ReductionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, *double),
                          self.branch_pool(_avg_pool_3x3(x))], 1)


class ReductionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 outputs. The TF graph pools Mixed_7b with an
    average (padding not counted) and Mixed_7c with a max: `pool="avg"` or `"max"`."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch3x3_1(x)
        double = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x),
                          torch.cat([self.branch3x3_2a(single), self.branch3x3_2b(single)], 1),
                          torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1),
                          self.branch_pool(pooled)], 1)


def tf1_resize_bilinear(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """TensorFlow 1.x `resize_bilinear` (align_corners=False, half_pixel_centers=False) on float [B,C,H,W]:
    source coordinate = destination index * (in / out) in float32, neighbours floor and floor+1 (clamped),
    interpolated along x first, then along y, as a + (b - a) * t."""
    def taps(n_in: int):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        where = torch.arange(size, dtype=images.dtype, device=images.device) * scale.to(images.device)
        low = where.long()
        return low, (low + 1).clamp_max(n_in - 1), where - low.to(where.dtype)

    y_lo, y_hi, dy = taps(images.shape[2])
    x_lo, x_hi, dx = taps(images.shape[3])
    left, right = images.index_select(3, x_lo), images.index_select(3, x_hi)
    rows = left + (right - left) * dx.view(1, 1, 1, size)
    top, bottom = rows.index_select(2, y_lo), rows.index_select(2, y_hi)
    return top + (bottom - top) * dy.view(1, 1, size, 1)


def check_images(images) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"Inception input must be a torch.Tensor of uint8 [B, 3, H, W], got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"Inception input must be uint8 RGB in 0..255 (as torch-fidelity takes it), got {images.dtype};"
                        f" convert with (x.clamp(0, 1) * 255).round().to(torch.uint8)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"Inception input must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"Inception input is empty: shape {tuple(images.shape)}")
    return images


class InceptionV3(nn.Module):
    """The FID InceptionV3 (TF 2015-12-05 graph); forward(uint8 [B,3,H,W]) -> {"2048", "logits_unbiased"}."""

    file_sha256: Optional[str] = None  # the weights file's, set by load_inception when it checked it

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, pool="avg")
        self.Mixed_7c = MixedE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def pool_features(self, images: Tensor) -> Tensor:
        x = tf1_resize_bilinear(check_images(images).to(torch.float32))
        x = (x - 128) / 128  # the graph's (x - 128) * 0.0078125; dividing by a power of two is the same bits
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                   self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        pooled = self.pool_features(check_images(images).to(self.fc.weight.device))
        # IS uses the classifier without its bias, as torch-fidelity's "logits_unbiased".
        return {"2048": pooled, "logits_unbiased": pooled.mm(self.fc.weight.T)}


def sha256_of(path: Union[str, os.PathLike], chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a plain weights file: torch.load(weights_only=True) refused it ({first})"
                         ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of InceptionV3 weights, found a {type(state).__name__}")
    return state


def _few(keys: List[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _check_layout(state: dict, expected: Dict[str, Tensor], path: str) -> None:
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # unused in eval; old files lack it
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    not_tensors = [k for k in state if k in expected and not isinstance(state[k], Tensor)]
    wrong = [f"{k} {tuple(state[k].shape)} (wants {tuple(expected[k].shape)})" for k in state
             if k in expected and isinstance(state[k], Tensor) and state[k].shape != expected[k].shape]
    found = (("missing", missing), ("unexpected", unexpected), ("not tensors", not_tensors), ("wrong shapes", wrong))
    problems = [f"{len(keys)} {label}: {_few(keys)}" for label, keys in found if keys]
    if problems:
        raise ValueError(f"{path} is not the torch-fidelity InceptionV3 layout ({TORCH_FIDELITY_FILE}): "
                         + "; ".join(problems))
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    if floats and torch.isfinite(torch.cat([v.reshape(-1).float() for v in floats.values()])).all():
        return  # one check over all weights: ~600 small ops cost seconds on a busy machine
    bad = [k for k, v in floats.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: non-finite (NaN/inf) weights in {_few(bad)}; the file is corrupt")


def load_inception(path: Union[str, os.PathLike], sha256: str | None = INCEPTION_SHA256,
                   device="cpu") -> InceptionV3:
    """The FID InceptionV3 from torch-fidelity's weights file, checked (sha256 prefix, layout, finite), in eval
    mode. `sha256` is a hex prefix of the file's sha256 (default: the release file's); None skips the check.
    The file's whole sha256 is kept as ``model.file_sha256`` (None when unchecked) for reports."""
    path = os.fspath(path)
    actual = None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"InceptionV3 weights not found at {path!r}: fastdiff never downloads them; get "
                                f"torch-fidelity's release file {TORCH_FIDELITY_FILE} (or pytorch-fid's "
                                f"{INCEPTION_FILE}, same hash) and pass --inception-weights PATH")
    if sha256 is not None:
        wanted = str(sha256).strip().lower()
        if len(wanted) < 8 or any(c not in "0123456789abcdef" for c in wanted):
            raise ValueError(f"sha256={sha256!r} must be at least 8 hex digits of the weights file's sha256")
        actual = sha256_of(path)
        if not actual.startswith(wanted):
            raise ValueError(f"{path}: sha256 {actual} does not start with the expected {wanted} (torch-fidelity's "
                             f"{TORCH_FIDELITY_FILE}); for another file pass its hash as sha256= / --inception-sha256")
    model = InceptionV3()
    expected = model.state_dict()
    state = _read_state(path)
    _check_layout(state, expected, path)
    full = {k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}
    full.update(state)
    model.load_state_dict(full, strict=True)
    model.file_sha256 = actual
    return model.requires_grad_(False).eval().to(device)


def _batches(images, batch_size: int) -> Iterable[Tensor]:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, Tensor):
        images = [images]
    for batch in images:
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        check_images(batch)
        yield from batch.split(batch_size)


@torch.inference_mode()
def inception_features(model: InceptionV3, images, batch_size: int = 64) -> Dict[str, Tensor]:
    """{"2048": float32 [N, 2048], "logits_unbiased": float32 [N, 1008]} on the CPU, for uint8 images [N,3,H,W]
    (or an iterable of such batches, each split into `batch_size` chunks)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    parts: Dict[str, List[Tensor]] = {name: [] for name in FEATURES}
    for batch in _batches(images, batch_size):
        for name, value in model(batch).items():
            parts[name].append(value.float().cpu())
    if not parts["2048"]:
        raise ValueError("inception_features got no images")
    return {name: torch.cat(values) for name, values in parts.items()}

