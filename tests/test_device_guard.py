"""Triton launches go to the operands' GPU, not the current one (checked with a mocked
torch.cuda.device), and every Triton wrapper hands launch() its operands' device.

Triton launches on the current device and stream; with tensors on cuda:1 while cuda:0 is
current, a launch without the guard runs on the wrong GPU (or faults). The CUDA C++ kernels
take a c10::cuda::CUDAGuard; the graph capture's guard is in tests/test_graph_cache.py.
"""
import os

import pytest
import torch

from deps import require

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
require("triton")

from cuda_fakes import FakeCurrentDevice  # noqa: E402
from fastdiff.ops import coeffs as C  # noqa: E402
from fastdiff.ops.triton import _launch  # noqa: E402


class Kernel:
    """A stand-in @triton.jit function: kernel[grid](...) records the current device."""

    def __init__(self, devices):
        self.devices, self.calls = devices, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append((self.devices.current, grid, args, meta))
        return run


def test_launch_enters_the_operands_device(monkeypatch):
    devices = FakeCurrentDevice()
    monkeypatch.setattr(torch.cuda, "device", devices.device)
    kernel = Kernel(devices)
    _launch.launch(kernel, (3, 2), torch.device("cuda", 1), "x", num_warps=4, num_stages=3)
    _launch.launch(kernel, (1,), torch.device("cuda", 0), "y", num_stages=2)
    assert [(c[0], c[1]) for c in kernel.calls] == [(1, (3, 2)), (0, (1,))]
    assert kernel.calls[0][3] == {"num_warps": 4, "num_stages": 3}  # GPU launches keep their stages
    assert devices.current == 0


def test_interpreter_launches_run_one_stage():
    kernel = Kernel(FakeCurrentDevice())
    _launch.launch(kernel, (1,), torch.device("cpu"), num_stages=3, num_warps=8)
    assert kernel.calls[0][3] == {"num_stages": 1, "num_warps": 8}


def test_recording_runs_nothing():
    kernel = Kernel(FakeCurrentDevice())
    with _launch.recording() as launches:
        _launch.launch(kernel, (2.0, 1), torch.device("meta"), "a", BLOCK=16)
    assert not kernel.calls
    assert launches[0].grid == (2, 1) and launches[0].device == torch.device("meta")
    assert launches[0].meta == {"BLOCK": 16} and launches[0].args == ("a",)


def meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def wrapper_calls():
    from fastdiff.ops.reference import DS_NUM_COEFFS
    from fastdiff.ops.triton.attention import attention_triton
    from fastdiff.ops.triton.discrete_step import discrete_step_triton
    from fastdiff.ops.triton.group_norm import group_norm_triton
    from fastdiff.ops.triton.guided_step import guided_step_triton

    x = meta(2, 4, 8, 8)
    yield "attention", lambda: attention_triton(meta(2, 2, 33, 40), meta(2, 2, 77, 40), meta(2, 2, 77, 40))
    yield "group_norm", lambda: group_norm_triton(meta(2, 64, 5, 7), 32, meta(64), meta(64), 1e-5, None, None, True)
    yield "guided_step", lambda: guided_step_triton(x, x, x, meta(1, dtype=torch.float32),
                                                    meta(1, C.NUM_FIXED, dtype=torch.float32), x, [], None, False,
                                                    False)
    yield "discrete_step", lambda: discrete_step_triton(
        meta(2, 16, dtype=torch.int64), meta(2, 9, 16, dtype=torch.float32), None, None,
        meta(1, DS_NUM_COEFFS, dtype=torch.float32), meta(2, 10, 16, dtype=torch.float32), 1.0, False)


@pytest.mark.parametrize("name, call", list(wrapper_calls()), ids=[n for n, _ in wrapper_calls()])
def test_every_wrapper_launches_on_its_operands_device(name, call):
    with _launch.recording() as launches:
        call()
    assert launches, f"{name} launched nothing through fastdiff.ops.triton._launch"
    assert all(launch.device == torch.device("meta") for launch in launches)
