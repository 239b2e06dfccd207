"""How the Triton attention kernel is launched: configs by dtype, tuning candidates, and what
happens when a GPU refuses a launch for resources (forced here, on the interpreter).

Whether the configs actually fit sm_90 is tests/test_gpu_resources.py's job (it compiles
them); here: the rules that keep them inside the measured budget, and that every
candidate computes the right thing.
"""
import os
import warnings

import pytest
import torch

from deps import require

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
require("triton")

import importlib  # noqa: E402

op_module = importlib.import_module("fastdiff.ops.attention")  # the module; fastdiff.ops.attention is the op
from fastdiff.ops.triton import _launch  # noqa: E402
from fastdiff.ops.triton import attention as kernel  # noqa: E402
from test_attention import assert_attention_close  # noqa: E402  (fp32: fp32_bound; 16-bit: 2x PyTorch's error)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(4096, 4096, 40), (4096, 77, 40), (1024, 77, 80), (1024, 1024, 80), (1024, 1024, 88), (1024, 77, 88),
          (256, 77, 160), (64, 64, 160), (1024, 1152, 64), (64, 77, 64), (4096, 77, 256), (9216, 77, 40)]


@pytest.fixture(autouse=True)
def fresh_state():
    kernel._tuned.clear()
    kernel._warned.clear()
    op_module._fallback_warned.clear()
    yield
    kernel._tuned.clear()


def qkv(lq, lk, d, dtype=torch.float32, batch=2, heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, d, generator=gen).to(DEVICE, dtype) for n in (lq, lk, lk))


@pytest.mark.parametrize("lq, lk, d", SHAPES)
def test_configs_keep_to_the_measured_budget(lq, lk, d):
    d0, d1 = kernel.split_head_dim(d)
    width = d0 + d1
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        base = kernel.launch_config(lq, lk, d0, d1, dtype, d)
        candidates = kernel.tune_candidates(lq, lk, d0, d1, dtype, d)
        assert candidates[0] == base and len(set(candidates)) == len(candidates)
        for block_m, block_n, warps, stages in candidates:
            assert block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0 and block_n >= 16
            assert stages == (1 if lk <= block_n else stages) and stages >= 1
            if dtype == torch.float32:  # CUDA-core products: small tiles only
                assert block_m <= 32 and block_n <= 32 and warps == 4
                continue
            assert block_m >= min(64, kernel._pow2_at_least(lq)), "32-row 16-bit tiles spill at wide heads"
            footprint = block_m * (width + block_n)
            assert footprint <= kernel._EIGHT_WARPS_MAX
            if footprint >= kernel._FOUR_WARPS_MAX:
                assert warps == 8
            if width > 128:
                assert block_n <= 64


def test_one_key_tile_is_not_pipelined():
    assert kernel.launch_config(4096, 77, 32, 16, torch.float16, 40)[3] == 1
    assert kernel.launch_config(4096, 4096, 32, 16, torch.float16, 40)[3] == 3


@pytest.mark.parametrize("lq, lk, d", [(97, 77, 80), (70, 130, 88), (33, 77, 160)])
def test_every_tuning_candidate_is_correct(lq, lk, d):
    q, k, v = qkv(lq, lk, d, torch.float16, batch=1, heads=1, seed=d)
    mask = torch.rand(1, lk, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.2
    for config in kernel.tune_candidates(lq, lk, *kernel.split_head_dim(d), torch.float16, d):
        got = kernel.attention_triton(q, k, v, mask, config=config)
        try:
            assert_attention_close(got, q, k, v, mask)
        except AssertionError as exc:
            raise AssertionError(f"config {config}: {exc}") from None


class Refuse:
    """Stands in for _launch.launch: refuses (as a GPU refuses a too large config) every launch
    whose tile is larger than `max_tile` values, runs the others."""

    def __init__(self, max_tile):
        self.max_tile, self.tried = max_tile, []

    def __call__(self, fn, grid, device, *args, **meta):
        self.tried.append((meta["BLOCK_M"], meta["BLOCK_N"]))
        if meta["BLOCK_M"] * meta["BLOCK_N"] > self.max_tile:
            raise type("OutOfResources", (RuntimeError,), {})(
                "out of resource: shared memory, Required: 300000, Hardware limit: 232448")
        _launch.launch(fn, grid, device, *args, **meta)


def test_a_refused_launch_retries_smaller_tiles_once_per_shape(monkeypatch):
    refuse = Refuse(max_tile=32 * 32)
    monkeypatch.setattr(kernel, "launch", refuse)
    q, k, v = qkv(200, 150, 64, torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = kernel.attention_triton(q, k, v)
        again = kernel.attention_triton(q, k, v)
    assert_attention_close(out, q, k, v)
    assert torch.equal(out, again)
    messages = [str(w.message) for w in caught if "does not fit" in str(w.message)]
    assert len(messages) == 1, messages
    first = refuse.tried[0]
    assert first[0] * first[1] > 32 * 32  # the heuristic's own config was tried first
    remembered = kernel.tuned_configs()[(200, 150, 64, torch.float16, False)]
    assert remembered[0] * remembered[1] <= 32 * 32
    assert refuse.tried[-1] == remembered[:2]  # the second call went straight to it


def test_tuning_does_not_fall_back(monkeypatch):
    monkeypatch.setattr(kernel, "launch", Refuse(max_tile=0))
    q, k, v = qkv(64, 64, 64, torch.float16)
    with pytest.raises(RuntimeError, match="out of resource"):
        kernel.attention_triton(q, k, v, config=(64, 64, 4, 1), fallback=False)


def test_op_runs_sdpa_when_no_tiling_fits(monkeypatch):
    monkeypatch.setattr(kernel, "launch", Refuse(max_tile=0))
    q, k, v = qkv(100, 77, 80, torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = op_module._cuda_kernel(q, k, v, None, None)
        op_module._cuda_kernel(q, k, v, None, None)
    assert_attention_close(out, q, k, v)
    assert sum("using PyTorch's SDPA" in str(w.message) for w in caught) == 1


def test_other_launch_errors_are_not_swallowed(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a real bug")
    monkeypatch.setattr(kernel, "launch", broken)
    q, k, v = qkv(16, 16, 16, torch.float16)
    with pytest.raises(ValueError, match="a real bug"):
        op_module._cuda_kernel(q, k, v, None, None)


def test_fp32_on_cuda_runs_sdpa_by_default(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the Triton kernel ran for fp32")
    monkeypatch.setattr(kernel, "attention_triton", must_not_run)
    q, k, v = qkv(50, 77, 40, torch.float32)
    out = op_module._cuda_kernel(q, k, v, None, None)
    assert_attention_close(out, q, k, v)
    assert op_module.FP32_ON_CUDA == "sdpa"


def test_fp32_small_tiles_are_exact(monkeypatch):
    """The "triton" backend runs fp32 on the kernel with its 32 x 32 IEEE tiles."""
    q, k, v = qkv(70, 77, 80, torch.float32, seed=3)
    config = kernel.launch_config(70, 77, 64, 16, torch.float32, 80)
    assert config[:2] == (32, 32)
    assert_attention_close(kernel.attention_triton(q, k, v), q, k, v)


class FakeCUDA:
    is_cuda = True
    shape = (1, 1, 8, 16)


def test_no_autotuning_inside_a_graph_capture(monkeypatch):
    monkeypatch.setattr(kernel, "_AUTOTUNE", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not kernel._should_tune(FakeCUDA())
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        kernel.tune(FakeCUDA(), FakeCUDA(), FakeCUDA())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert kernel._should_tune(FakeCUDA())
