"""The Triton group_norm kernels against their PyTorch twin (fastdiff.ops.reference).

Without a GPU the kernels run under Triton's interpreter on CPU tensors. The interpreter
is slow, so the sweep is the small shapes of tests/test_group_norm.py; chunks of more than
one tile and groups of more than one chunk are forced by lowering MAX_CHUNKS and by a
group of a few thousand values. Tolerances are those of tests/test_group_norm.py
(check_against_twin: derived from float32 rounding; fp16/bf16 relative to torch's error).
"""
import os

import pytest
import torch

from deps import require

if not torch.cuda.is_available():
    # Read when a kernel is decorated, so it must be set before the module below loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
require("triton")

import importlib  # noqa: E402

from fastdiff.ops import _dispatch, _library, reference as R  # noqa: E402
from fastdiff.ops.triton import _launch  # noqa: E402
from fastdiff.ops.triton import group_norm as triton_module  # noqa: E402
from fastdiff.ops.triton.group_norm import group_norm_triton  # noqa: E402
from test_group_norm import (  # noqa: E402  (the shared case builders)
    COPY_OPS,
    ODD_SHAPES,
    OPTIONS,
    PARAM_DTYPES,
    PARAM_LAYOUTS,
    SHAPES,
    args_of,
    check_against_twin,
    check_large_mean,
    check_zero_variance,
    dispatched_ops,
    fp32_error_bound,
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


def test_zero_variance():
    case = make_case((2, 6, 4, 4), 3, device=DEVICE)
    case["x"] = torch.full((2, 6, 4, 4), 3.0, device=DEVICE)
    check_zero_variance(group_norm_triton, case)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("param_dtype", list(PARAM_DTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_parameter_dtypes(dtype, param_dtype, layout):
    """weight, bias, scale, shift in x's dtype, float32 or float64, read in their own dtype."""
    for options in ("scale_shift_silu", "shift_row_bias_only"):
        check_against_twin(group_norm_triton, make_case((2, 24, 5, 7), 3, options=options, dtype=dtype,
                                                        layout=layout, device=DEVICE,
                                                        param_dtype=PARAM_DTYPES[param_dtype]))


@pytest.mark.parametrize("param_layout", PARAM_LAYOUTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parameter_layouts(layout, param_layout):
    """Strided, chunked (ADM), misaligned and broadcast parameters, read through their strides."""
    for dtype in (torch.float32, torch.float16):
        check_against_twin(group_norm_triton, make_case((2, 24, 5, 7), 3, options="scale_shift_silu",
                                                        dtype=dtype, layout=layout, device=DEVICE,
                                                        param_dtype="x", param_layout=param_layout))


def test_mixed_parameter_dtypes():
    case = make_case((2, 24, 5, 7), 3, options="scale_shift_silu", dtype=torch.float16, layout="channels_last",
                     device=DEVICE)
    case.update(weight=case["weight"].half(), bias=case["bias"].bfloat16(), shift=case["shift"].double())
    check_against_twin(group_norm_triton, case)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,groups", ODD_SHAPES)
def test_odd_groups(shape, groups, dtype, layout):
    """Channels-last rows of D = 3, 10, 4 values (tile columns partly masked), odd S."""
    check_against_twin(group_norm_triton, make_case(shape, groups, options="scale_shift_silu", dtype=dtype,
                                                    layout=layout, device=DEVICE, param_dtype="x"))


@pytest.mark.parametrize("x_offset", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_misaligned_x(layout, x_offset):
    for dtype in (torch.float32, torch.float16):
        case = make_case((2, 40, 6, 6), 4, options="scale_shift_silu", dtype=dtype, layout=layout,
                         device=DEVICE, x_offset=x_offset)
        check_against_twin(group_norm_triton, case)


@pytest.mark.parametrize("device", [DEVICE, "meta"])
def test_launches_read_parameters_in_place(device):
    """The wrapper launches through _launch.launch on x's device and hands the kernel the
    parameters themselves (no cast, no copy: the same tensor objects), with their strides.
    Recorded, not run, so it also works on meta tensors (what ahead-of-time compilation uses)."""
    for param_dtype in ("x", torch.float32):
        for param_layout in ("contiguous", "chunk", "strided"):
            case = make_case((2, 24, 5, 7), 3, options="scale_shift_silu", dtype=torch.float16,
                             layout="channels_last", device=device, param_dtype=param_dtype,
                             param_layout=param_layout)
            with _launch.recording() as launches:
                ops = dispatched_ops(group_norm_triton, *args_of(case))
            assert not ops & COPY_OPS, ops & COPY_OPS
            assert [r.name for r in launches] == ["_stats_kernel", "_write_kernel"]
            assert all(r.device == case["x"].device for r in launches)
            assert launches[0].args[0] is case["x"] and launches[1].args[0] is case["x"]
            write = launches[1].args
            for name in ("weight", "bias", "scale", "shift"):
                t = case[name]
                at = next(i for i, a in enumerate(write) if a is t)  # the tensor itself...
                strides = write[at + 1:at + 1 + t.dim()]          # ...then its strides
                want = (t.stride(0),) if t.dim() == 1 else (0 if t.shape[0] == 1 else t.stride(0), t.stride(1))
                assert tuple(strides) == want, (name, strides, want)


def test_nan_propagates():
    case = make_case((2, 6, 5, 7), 3, device=DEVICE)
    case["x"][1, 2, 3, 4] = float("nan")
    out = group_norm_triton(*args_of(case))
    nan = torch.isnan(out)
    assert nan[1, 2:4].all() and nan.sum() == 2 * 5 * 7
    twin = R.group_norm(*args_of(case))  # the NaN stays in its group; the rest is the twin's
    assert torch.equal(nan, torch.isnan(twin))
    bound = 2 * fp32_error_bound(case).expand(out.shape)  # elementwise, as check_output's
    assert ((out.double() - twin.double()).abs() <= bound)[~nan].all()


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
    check_against_twin(_dispatch.python_kernel("group_norm", "cuda"), case)
