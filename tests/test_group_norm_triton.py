"""The Triton group_norm kernels against their PyTorch twin (fastdiff.ops.reference).

Without a GPU the kernels run under Triton's interpreter on CPU tensors. The interpreter
is slow, so the sweep is the small shapes of tests/test_group_norm.py; chunks of more than
one block and groups of more than one chunk are forced by lowering MAX_CHUNKS and by a
group of a few thousand values.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when a kernel is decorated, so it must be set before the module below loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import importlib  # noqa: E402

from fastdiff.ops import _library  # noqa: E402
from fastdiff.ops.triton import group_norm as triton_module  # noqa: E402
from fastdiff.ops.triton.group_norm import group_norm_triton  # noqa: E402
from test_group_norm import (  # noqa: E402  (the shared case builders)
    OPTIONS,
    SHAPES,
    args_of,
    check_against_twin,
    check_large_mean,
    make_case,
)

# The module, not the function of the same name that fastdiff.ops exports.
dispatch = importlib.import_module("fastdiff.ops.group_norm")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_sweep_fp32(shape, groups, options, layout):
    if layout == "channels_last" and len(shape) < 3:
        pytest.skip("no spatial dims: channels-last is the contiguous layout")
    check_against_twin(group_norm_triton, make_case(shape, groups, options=options, layout=layout,
                                                    device=DEVICE, seed=groups))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((3, 96, 17, 5), 32), ((2, 12, 3, 4, 5), 3)])
def test_reduced_precision(shape, groups, dtype, layout):
    check_against_twin(group_norm_triton, make_case(shape, groups, options="scale_shift_silu",
                                                    dtype=dtype, layout=layout, device=DEVICE))


@pytest.mark.parametrize("max_chunks", [2, 1024])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_several_blocks_and_chunks(monkeypatch, layout, max_chunks):
    """Groups of 3 * 1500 values: several chunks, and with MAX_CHUNKS = 2 chunks of more
    than one block, each with a short last block."""
    monkeypatch.setattr(triton_module, "MAX_CHUNKS", max_chunks)
    check_against_twin(group_norm_triton, make_case((2, 6, 50, 30), 2, options="scale_shift_silu",
                                                    layout=layout, device=DEVICE))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean(layout):
    case = make_case((2, 8, 40, 40), 2, options="plain", layout=layout, offset=1000.0, device=DEVICE)
    check_large_mean(group_norm_triton, case)


def test_nan_propagates():
    case = make_case((2, 6, 5, 7), 3, device=DEVICE)
    case["x"][1, 2, 3, 4] = float("nan")
    out = group_norm_triton(*args_of(case))
    nan = torch.isnan(out)
    assert nan[1, 2:4].all() and nan.sum() == 2 * 5 * 7


def test_empty_and_errors():
    case = make_case((0, 6, 3, 3), 3, device=DEVICE)
    assert group_norm_triton(*args_of(case)).shape == (0, 6, 3, 3)
    bad = dict(make_case((2, 6, 3), 3, device=DEVICE), num_groups=4)
    with pytest.raises(RuntimeError, match="not divisible into 4 groups"):
        group_norm_triton(*args_of(bad))


def test_cuda_fallback_uses_triton():
    """CUDA without the compiled kernel serves the op with Triton (called here on CPU tensors
    under the interpreter, as the CUDA key would)."""
    case = make_case((2, 12, 5, 6), 3, options="scale_shift_silu", layout="channels_last", device=DEVICE)
    assert _library.triton_available()
    check_against_twin(dispatch._cuda_fallback, case)
