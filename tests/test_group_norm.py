"""group_norm (GroupNorm + scale-shift + SiLU): the C++ CPU kernel against its twin.

Every kernel result is checked two ways (check_against_twin):
  float32  against an exact float64 computation on the same inputs, within a bound derived
           from float32 rounding (fp32_error_bound: the unit roundoff times a growth factor
           for the group's sum, scaled by the values), and against the twin
           (fastdiff.ops.reference, also float32) within twice that;
  fp16/bf16 at most twice the error of PyTorch's own path in the same dtype (F.group_norm +
           eager scale-shift/SiLU, STYLE.md item 6), and within one rounding of the output
           dtype of the twin (both compute in float32 and round once).
The sweep covers odd shapes, 1-D/2-D/3-D spatial sizes, 1/3/32 groups, every optional
operand, fp32/fp16/bf16, contiguous, channels-last and strided inputs, misaligned views;
parameters in float32, in x's dtype and in float64, contiguous or strided. The CUDA kernels
(C++ and Triton) run the same checks where a GPU is present (class TestCuda, marked cuda);
tests/test_group_norm_triton.py runs the Triton kernel under the interpreter on CPU.

The builders here (make_case, exact, check_against_twin) also serve that file.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.ops import _dispatch, _library, reference as R
from fastdiff.ops.group_norm import group_norm
from deps import require

# The module, not the function of the same name that fastdiff.ops exports.
dispatch = importlib.import_module("fastdiff.ops.group_norm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(
    not _library.extension_loaded() or not _library.has_kernel("group_norm", "CPU"),
    reason="fastdiff._C not built")

# (shape, groups): odd channel and spatial counts, no / 1-D / 2-D / 3-D spatial dims.
SHAPES = [
    ((1, 6, 7, 9), 3),
    ((1, 6, 7, 9), 1),
    ((3, 96, 17, 5), 32),
    ((2, 12, 33), 3),        # 1-D spatial
    ((2, 12, 3, 4, 5), 3),   # 3-D spatial
    ((2, 64), 32),           # no spatial dims
]
# Which optional operands a case has: weight/bias, scale/shift ([B, C]; "row" = [1, C]), SiLU.
OPTIONS = {
    "plain": dict(),
    "affine_silu": dict(affine=True, silu=True),
    "scale_shift_silu": dict(affine=True, scale="batch", shift="batch", silu=True),
    "scale_only": dict(scale="batch"),
    "shift_row_bias_only": dict(bias_only=True, shift="row"),
}


def _channels_last(t):
    order = [0, *range(2, t.dim()), 1]
    inverse = [order.index(d) for d in range(t.dim())]
    return t.permute(order).contiguous().permute(inverse)


def _strided(t):
    """The same values in a layout no kernel reads directly: a view with gaps."""
    if t.dim() == 2:
        return t.t().contiguous().t()  # column-major [B, C]
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _offset_by(t, elements):
    """The same values and strides, stored `elements` elements past the start of a buffer:
    a view whose data pointer is misaligned for vector loads (16 bytes)."""
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
    buf = torch.zeros(extent + elements, dtype=t.dtype, device=t.device)
    out = buf.as_strided(t.shape, t.stride(), elements)
    out.copy_(t)
    return out


def _param_view(t, how):
    """A parameter tensor with the same values, laid out `how`:
    "contiguous"; "strided": a view with gaps between channels (weight[::2]-like, or a
    column-major [B, C]); "chunk": the second half of a tensor twice as wide (ADM's
    emb_out.chunk(2, dim=1): rows 2C apart, starting C elements in); "misaligned": contiguous, one element past
    an aligned start; "expanded": its first value (or row) broadcast, stride 0."""
    if how == "contiguous":
        return t
    if how == "misaligned":
        return _offset_by(t, 1)
    if how == "expanded":  # one value (weight, bias) or one row (scale, shift) broadcast: stride 0
        return t[:1].expand(t.shape)
    if how == "chunk":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., t.shape[-1]:] = t
        return wide.chunk(2, dim=-1)[1]
    if t.dim() == 1 or t.shape[0] == 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    return _strided(t)


def make_case(shape, groups, *, options="affine_silu", dtype=torch.float32, layout="contiguous",
              seed=0, device="cpu", offset=0.0, param_dtype=torch.float32, param_layout="contiguous",
              x_offset=0):
    """A group_norm call's arguments. param_dtype: the parameters' dtype ("x": x's dtype);
    param_layout: see _param_view; x_offset: x stored that many elements past an aligned
    start (its layout otherwise as `layout`)."""
    gen = torch.Generator().manual_seed(seed)
    B, C = shape[0], shape[1]
    opts = OPTIONS[options] if isinstance(options, str) else options
    x = (torch.randn(shape, generator=gen) * 2 + 0.5 + offset).to(device, dtype)
    if layout == "channels_last":
        x = _channels_last(x)
    elif layout == "strided":
        x = _strided(x)
    if x_offset:
        x = _offset_by(x, x_offset)
    pdt = dtype if param_dtype == "x" else param_dtype

    def rand(*s):
        return torch.randn(*s, generator=gen).to(device)

    def param(t):
        return _param_view(t.to(pdt), param_layout)

    weight = param(1 + 0.5 * rand(C)) if opts.get("affine") else None
    bias = param(rand(C)) if opts.get("affine") or opts.get("bias_only") else None
    per = {"batch": (B, C), "row": (1, C)}
    scale = param(0.5 * rand(*per[opts["scale"]])) if opts.get("scale") else None
    shift = param(rand(*per[opts["shift"]])) if opts.get("shift") else None
    return dict(x=x, num_groups=groups, weight=weight, bias=bias, eps=1e-5, scale=scale,
                shift=shift, silu=bool(opts.get("silu")))


def args_of(case):
    return tuple(case.values())


def _per_channel_terms(case):
    """In float64, per element of x: the normalised value x^ = (x - mean) rstd, the group's
    |mean| rstd, and the channel's coefficients mul = w (1 + s) and add = bias (1 + s) + shift,
    so that y = x^ mul + add (before SiLU)."""
    c = case
    x = c["x"].double()
    B, C, G = x.shape[0], x.shape[1], c["num_groups"]
    groups = x.reshape(B, G, -1)
    mean = groups.mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(groups.var(-1, unbiased=False, keepdim=True) + c["eps"])
    xhat = ((groups - mean) * rstd).reshape(x.shape)
    mean_rstd = (mean.abs() * rstd).expand_as(groups).reshape(x.shape)
    ones = torch.ones(B, C, dtype=torch.float64, device=x.device)
    w = ones if c["weight"] is None else c["weight"].double().expand(B, C)
    bias = 0 * ones if c["bias"] is None else c["bias"].double().expand(B, C)
    s = ones if c["scale"] is None else 1 + c["scale"].double().expand(B, C)
    shift = 0 * ones if c["shift"] is None else c["shift"].double().expand(B, C)
    extra = (1,) * (x.dim() - 2)
    mul, add = (w * s).reshape(B, C, *extra), (bias * s + shift).reshape(B, C, *extra)
    return xhat, mean_rstd, mul, add


U32 = 2.0 ** -24   # unit roundoff of float32
OPS = 8            # roundings after the statistics: x - mean, the coefficient (3), the
                   # offset (2), the output, SiLU's exp and quotient; each at most U32 |term|
HEADROOM = 2       # the bound is first-order and probabilistic; a factor 2 for both
SILU_LIPSCHITZ = 1.1  # max |silu'(y)| = 1.0998


def fp32_error_bound(case):
    """Per element, how far a float32 implementation may be from the exact result.

    With statistics summed in float32 over a group of N values, the computed mean is off by
    at most U32 |mean| (its rounding) + g U32 sigma, and the variance by a relative g U32 (so
    rstd by g U32), where g = sqrt(N) is the growth factor of an N-term float32 sum (the
    probabilistic bound of Higham & Mary 2019; blocked or pairwise sums do better). Through
    y = x^ mul + add that is (|mean| rstd + g (1 + |x^|)) U32 |mul|, and the OPS roundings
    after it add OPS U32 (|x^ mul| + |add|); SiLU is 1.1-Lipschitz."""
    xhat, mean_rstd, mul, add = _per_channel_terms(case)
    x = case["x"]
    n = x[0, : x.shape[1] // case["num_groups"]].numel()  # values per group
    g = n ** 0.5
    bound = HEADROOM * U32 * ((mean_rstd + g * (1 + xhat.abs()) + OPS * xhat.abs()) * mul.abs()
                              + OPS * add.abs())
    return bound * SILU_LIPSCHITZ if case["silu"] else bound


def _ulp(t, dtype):
    """The spacing of `dtype` values at |t| (elementwise, float64)."""
    info = torch.finfo(dtype)
    a = t.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * info.eps


def exact(case):
    """The op in float64 (on the inputs as given): the yardstick for errors."""
    c = case
    dbl = [None if t is None else t.double() for t in (c["weight"], c["bias"], c["scale"], c["shift"])]
    y = F.group_norm(c["x"].double(), c["num_groups"], dbl[0], dbl[1], c["eps"])
    extra = (1,) * (c["x"].dim() - 2)
    if dbl[2] is not None:
        y = y * (1 + dbl[2].reshape(*dbl[2].shape, *extra))
    if dbl[3] is not None:
        y = y + dbl[3].reshape(*dbl[3].shape, *extra)
    return F.silu(y) if c["silu"] else y


def torch_path(case):
    """PyTorch's own ops in x's dtype (what a U-Net without fastdiff runs)."""
    c = case
    dt = c["x"].dtype
    cast = [None if t is None else t.to(dt) for t in (c["weight"], c["bias"], c["scale"], c["shift"])]
    return dispatch._eager(c["x"], c["num_groups"], cast[0], cast[1], c["eps"], cast[2], cast[3], c["silu"])


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_within(got, want, bound, what):
    err = (got.double() - want.double()).abs()
    over = err > bound
    assert not over.any(), (f"{what}: {int(over.sum())} of {err.numel()} values out of bounds, worst "
                            f"{(err - bound).max().item():.3g} over (error {err.max().item():.3g})")


def _poison_next_allocation(like):
    """On CUDA, leave a freed NaN block of the output's size in the caching allocator, so an
    output element a kernel does not write shows as NaN."""
    if like.is_cuda:
        torch.full((like.numel(),), float("nan"), dtype=like.dtype, device=like.device)


def check_against_twin(fn, case):
    """fn(*args) against the twin and the float64 yardstick; returns the output."""
    _poison_next_allocation(case["x"])
    return check_output(fn(*args_of(case)), case)


def check_output(out, case):
    """An output of the op on `case` against the twin and the float64 yardstick."""
    x = case["x"]
    twin = R.group_norm(*args_of(case))
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    # Layout: channels-last in, channels-last out; contiguous otherwise.
    assert out.stride() == dispatch._output_like(x).stride()
    assert torch.isfinite(out).all()
    if out.numel() == 0:
        return out
    want = exact(case)
    bound = fp32_error_bound(case)
    if x.dtype == torch.float32:
        _assert_within(out, want, bound, "error against float64")
        _assert_within(out, twin, 2 * bound, "difference from the twin")
    else:
        # Both round a float32 result once: at most one step of the output dtype apart.
        step = _ulp(torch.maximum(out.double().abs(), twin.double().abs()), x.dtype)
        _assert_within(out, twin, step + 2 * bound, "difference from the twin")
        assert _max_err(out, want) <= 2 * _max_err(torch_path(case), want)
    return out


def cpu_op(*args):
    return torch.ops.fastdiff.group_norm(*args)


# --- the C++ CPU kernel ----------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_cpu_kernel_sweep(shape, groups, options, dtype, layout):
    if layout == "channels_last" and len(shape) < 3:
        pytest.skip("no spatial dims: channels-last is the contiguous layout")
    check_against_twin(cpu_op, make_case(shape, groups, options=options, dtype=dtype, layout=layout,
                                         seed=len(shape) + groups))


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups", [
    ((1, 4, 128, 80), 1),    # one group of 40960 values: statistics split into pieces
    ((2, 64, 40, 40), 32),   # channels-last: several row blocks and chunks per sample
    ((2, 320, 16, 16), 32),  # U-Net-like
])
def test_cpu_kernel_larger_groups(shape, groups, layout):
    check_against_twin(cpu_op, make_case(shape, groups, options="scale_shift_silu", layout=layout, seed=3))


@needs_ext
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_kernel_thread_counts(threads):
    """The per-group path (groups >= threads) and the split path give the twin's result."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape, groups in [((1, 6, 7, 9), 3), ((2, 8, 30, 30), 1), ((1, 32, 200, 10), 32)]:
            for layout in ("contiguous", "channels_last"):
                check_against_twin(cpu_op, make_case(shape, groups, layout=layout, seed=threads))
    finally:
        torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((2, 64, 32, 32), 32), ((1, 2, 256, 256), 1)])
def test_cpu_kernel_large_mean(shape, groups, layout):
    """x = 1000 + randn: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    case = make_case(shape, groups, options="plain", layout=layout, offset=1000.0, seed=5)
    check_large_mean(cpu_op, case)


def check_large_mean(fn, case):
    """Not against the twin here: torch's channels-last CPU group_norm itself loses about 1.0
    on these inputs (it sums x and x^2), so only the float64 yardstick is a fair judge, within
    fp32_error_bound: for x = 1000 + randn that is mostly the rounding of the float32 mean
    (U32 |mean| rstd, ulps of 2^-14 near 1000), which the naive formula exceeds by far."""
    out = fn(*args_of(case))
    assert out.stride() == dispatch._output_like(case["x"]).stride()
    _assert_within(out, exact(case), fp32_error_bound(case), "error against float64")
    # The naive formula, for scale: its variance is off by far more than that.
    x = case["x"].float().cpu()
    naive_var = (x * x).mean() - x.mean() ** 2
    assert abs(naive_var.item() - x.double().var(unbiased=False).item()) > 1e-3


@needs_ext
def test_cpu_kernel_silu_extremes():
    """Outputs far out on both sides of SiLU (its exp saturates), and near 0."""
    bias = torch.tensor([-1e4, -100.0, -90.0, -20.0, 0.0, 1e-8, 20.0, 90.0, 1e4])
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    case = dict(x=x, num_groups=9, weight=None, bias=bias, eps=1e-5, scale=None, shift=None, silu=True)
    out = cpu_op(*args_of(case))
    _assert_within(out, exact(case), fp32_error_bound(case), "error against float64")
    _assert_within(out, R.group_norm(*args_of(case)), 2 * fp32_error_bound(case), "difference from the twin")
    assert torch.isfinite(out).all()


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_kernel_nan_propagates(layout):
    """A NaN poisons its own group, as in torch, and nothing else."""
    case = make_case((2, 6, 5, 7), 3, options="scale_shift_silu", layout=layout)
    x = case["x"].clone()
    x[1, 2, 3, 4] = float("nan")  # sample 1, group 1 (channels 2 and 3)
    case["x"] = x
    out = cpu_op(*args_of(case))
    twin = R.group_norm(*args_of(case))
    nan = torch.isnan(out)
    assert torch.equal(nan, torch.isnan(twin))
    assert nan[1, 2:4].all() and nan.sum() == 2 * 5 * 7
    _assert_within(out[~nan], twin[~nan], 2 * fp32_error_bound(case)[~nan], "difference from the twin")


@needs_ext
def test_cpu_kernel_empty_and_zero_variance():
    empty = make_case((0, 6, 3, 3), 3)
    assert cpu_op(*args_of(empty)).shape == (0, 6, 3, 3)
    const = make_case((2, 6, 4, 4), 3)
    const["x"] = torch.full((2, 6, 4, 4), 3.0)
    check_zero_variance(cpu_op, const)


def check_zero_variance(fn, case):
    """rstd = 1/sqrt(eps) ~ 316 magnifies any cancellation: the kernel's x - mean is exactly 0
    here, so y = SiLU(bias) and only the OPS roundings of the output remain (torch's own CPU
    kernel is off by 4e-5 on this case, so the yardstick is float64)."""
    want = exact(case)
    _assert_within(fn(*args_of(case)), want, HEADROOM * OPS * U32 * want.abs(), "error against float64")


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_kernel_other_isas(isa):
    """The kernel's loops are compiled for AVX-512, AVX2 and baseline x86-64; this machine runs
    its best one, so the others run here in a subprocess (FASTDIFF_CPU_ISA lowers the choice)."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        import test_group_norm as t
        for layout in ("contiguous", "channels_last", "strided"):
            for dtype in (t.torch.float32, t.torch.float16, t.torch.bfloat16):
                for shape, groups in [((3, 96, 17, 5), 32), ((1, 6, 7, 9), 1), ((2, 70, 9, 3), 7)]:
                    case = t.make_case(shape, groups, options="scale_shift_silu", dtype=dtype,
                                       layout=layout)
                    t.check_against_twin(t.cpu_op, case)
        t.check_large_mean(t.cpu_op, t.make_case((2, 64, 32, 32), 32, options="plain",
                                                 layout="channels_last", offset=1000.0))
        for dtype in (t.torch.float32, t.torch.float16, t.torch.bfloat16):
            for layout in ("contiguous", "channels_last"):
                for shape, groups in t.ODD_SHAPES:
                    t.check_against_twin(t.cpu_op, t.make_case(shape, groups, options="scale_shift_silu",
                                                               dtype=dtype, layout=layout, param_dtype="x"))
                for param_layout in t.PARAM_LAYOUTS:
                    t.check_against_twin(t.cpu_op, t.make_case(
                        (2, 24, 5, 7), 3, options="scale_shift_silu", dtype=dtype, layout=layout,
                        param_dtype=t.torch.float32, param_layout=param_layout, x_offset=1))
        print("ok")
    """)
    env = dict(os.environ, FASTDIFF_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# Channels-last groups whose D values per row are no multiple of 16 bytes, odd spatial sizes
# (the CUDA kernel's narrower vectors and scalar path): D = 3 over 97 and 63 positions,
# D = 10 over 25 and 9, D = 4 over 6.
ODD_SHAPES = [((2, 9, 97), 3), ((3, 6, 7, 9), 2), ((2, 20, 5, 5), 2), ((2, 40, 3, 3), 4),
              ((1, 12, 2, 3), 3)]
PARAM_DTYPES = {"x_dtype": "x", "fp32": torch.float32, "fp64": torch.float64}
PARAM_LAYOUTS = ["strided", "chunk", "misaligned", "expanded"]


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("param_dtype", list(PARAM_DTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_kernel_parameter_dtypes(dtype, param_dtype, layout):
    """weight, bias, scale, shift in x's dtype, in float32 and in float64, read as given."""
    for shape, groups in [((3, 96, 17, 5), 32), ((2, 12, 3, 4, 5), 3)]:
        for options in ("scale_shift_silu", "shift_row_bias_only"):
            check_against_twin(cpu_op, make_case(shape, groups, options=options, dtype=dtype, layout=layout,
                                                 param_dtype=PARAM_DTYPES[param_dtype]))


@needs_ext
@pytest.mark.parametrize("param_layout", PARAM_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_kernel_parameter_layouts(dtype, param_layout):
    """Parameters that are views: gaps between channels, ADM's chunked scale/shift, an
    unaligned start, broadcast rows."""
    for layout in ("contiguous", "channels_last"):
        for options in ("scale_shift_silu", "shift_row_bias_only"):
            case = make_case((2, 24, 5, 7), 3, options=options, dtype=dtype, layout=layout,
                             param_dtype="x", param_layout=param_layout)
            check_against_twin(cpu_op, case)


@needs_ext
def test_cpu_kernel_mixed_parameter_dtypes():
    case = make_case((2, 24, 5, 7), 3, options="scale_shift_silu", dtype=torch.float16, layout="channels_last")
    case.update(weight=case["weight"].half(), bias=case["bias"].bfloat16(), shift=case["shift"].double())
    check_against_twin(cpu_op, case)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", ODD_SHAPES)
def test_cpu_kernel_odd_groups(shape, groups, dtype, layout):
    check_against_twin(cpu_op, make_case(shape, groups, options="scale_shift_silu", dtype=dtype,
                                         layout=layout, param_dtype="x"))


@needs_ext
@pytest.mark.parametrize("x_offset", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_kernel_misaligned_x(dtype, layout, x_offset):
    """x one or two elements past an aligned start (where vector loads would fault)."""
    for shape, groups in [((2, 64, 8, 8), 8), ((2, 40, 6, 6), 4)]:
        case = make_case(shape, groups, options="scale_shift_silu", dtype=dtype, layout=layout,
                         x_offset=x_offset)
        assert case["x"].storage_offset() == x_offset
        check_against_twin(cpu_op, case)


# aten ops whose appearance inside a call means the call copied or converted a tensor.
COPY_OPS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}


def dispatched_ops(fn, *args):
    """The names of the aten ops fn(*args) dispatches (kernels called from C++ included)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    return {e.name for e in prof.events()}


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_kernel_reads_parameters_in_place(dtype):
    """No cast or copy of the parameters per call: whatever their float dtype and strides,
    the C++ kernel reads them where they lie."""
    # The probe sees a cast made inside an op: the eager fallback casts float64 parameters.
    control = make_case((2, 24, 5, 7), 3, options="scale_shift_silu", dtype=dtype, param_dtype=torch.float64)
    assert "aten::_to_copy" in dispatched_ops(dispatch._eager_kernel, *args_of(control))
    for param_dtype in PARAM_DTYPES.values():
        for param_layout in ["contiguous", *PARAM_LAYOUTS]:
            for layout in ("contiguous", "channels_last"):
                case = make_case((2, 24, 5, 7), 3, options="scale_shift_silu", dtype=dtype, layout=layout,
                                 param_dtype=param_dtype, param_layout=param_layout)
                ops = dispatched_ops(cpu_op, *args_of(case))
                assert "fastdiff::group_norm" in ops
                assert not ops & COPY_OPS, (param_dtype, param_layout, layout, ops & COPY_OPS)


# --- errors --------------------------------------------------------------------------------

BAD = [
    (dict(num_groups=4), "not divisible into 4 groups"),
    (dict(num_groups=0), "num_groups must be positive"),
    (dict(weight=torch.ones(5)), r"weight has shape \[5\]"),
    (dict(bias=torch.ones(1, 6)), "bias has shape"),
    (dict(scale=torch.ones(2, 7)), r"scale has shape \[2, 7\], expected \[B, C\] = \[2, 6\]"),
    (dict(shift=torch.ones(3, 6)), "shift has shape"),
    (dict(scale=torch.ones(6)), "scale has shape"),
    (dict(weight=torch.ones(6, dtype=torch.int32)), "weight must be a floating-point tensor"),
    (dict(weight=torch.ones(6, device="meta")), "weight is on meta but x is on cpu"),
    (dict(x=torch.ones(2, 6, 3, dtype=torch.float64)), "x must be float32, float16 or bfloat16"),
    (dict(x=torch.ones(6)), "x must have shape"),
]


@pytest.mark.parametrize("bad,message", BAD)
@pytest.mark.parametrize("impl", ["cpu", "fake", "eager_fallback"])
def test_bad_arguments_raise(impl, bad, message):
    case = dict(make_case((2, 6, 3), 3), **bad)
    if impl == "cpu":
        if not (_library.extension_loaded() and _library.has_kernel("group_norm", "CPU")):
            pytest.skip("fastdiff._C not built")
        fn = cpu_op
    elif impl == "fake":
        fn = dispatch._group_norm_fake
    else:
        fn = dispatch._eager_kernel
    with pytest.raises(RuntimeError, match=message):
        fn(*args_of(case))


def test_public_function_raises_value_error_for_indivisible_channels():
    with pytest.raises(ValueError, match="not divisible into 4 groups"):
        group_norm(torch.randn(2, 6, 3), 4)


# --- dispatch, autograd, registration -------------------------------------------------------

def test_implementation_names():
    info = fastdiff.backend_info()["ops"]["group_norm"]
    want_cpu = "C++ (OpenMP)" if _dispatch.is_compiled("group_norm", "cpu") else "PyTorch (eager)"
    assert info["cpu"] == want_cpu
    assert info["cuda"] in ("CUDA C++", "Triton", "PyTorch (eager)")
    old = _library.get_backend()
    try:
        fastdiff.set_backend("reference")
        assert dispatch.implementation("cpu") == dispatch.implementation("cuda") == "reference"
        case = make_case((2, 6, 5), 3, options="scale_shift_silu")
        out = group_norm(case["x"], 3, case["weight"], case["bias"], scale=case["scale"],
                         shift=case["shift"], silu=True)
        assert torch.equal(out, R.group_norm(*args_of(case)))
    finally:
        fastdiff.set_backend(old)


def test_public_function_uses_the_op_without_grad():
    case = make_case((2, 12, 6, 6), 3, options="scale_shift_silu", layout="channels_last")
    w = torch.nn.Parameter(case["weight"])  # a module's parameter requires grad
    with torch.no_grad():
        out = group_norm(case["x"], 3, w, case["bias"], scale=case["scale"], shift=case["shift"], silu=True)
    want = torch.ops.fastdiff.group_norm(case["x"], 3, case["weight"], case["bias"], 1e-5, case["scale"],
                                         case["shift"], True)
    assert torch.equal(out, want) and out.stride() == want.stride()


def _grads(fn, case):
    leaves = {k: case[k].clone().requires_grad_(True) for k in ("x", "weight", "bias", "scale", "shift")}
    out = fn(leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradients_flow(layout):
    """With grad enabled and an input that requires grad, the public function takes the eager,
    differentiable path: outputs and gradients as the twin's."""
    case = make_case((2, 12, 5, 6), 3, options="scale_shift_silu", layout=layout)

    def twin(t):
        return R.group_norm(t["x"], 3, t["weight"], t["bias"], 1e-5, t["scale"], t["shift"], True)

    def public(t):
        return group_norm(t["x"], 3, t["weight"], t["bias"], 1e-5, scale=t["scale"], shift=t["shift"],
                          silu=True)

    want_out, want = _grads(twin, case)
    out, got = _grads(public, case)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_module_trains():
    """The block's gradients are torch's own GroupNorm + SiLU's (the eager path it takes)."""
    from fastdiff.models.blocks import GroupNorm
    norm = GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(3), requires_grad=True)
    norm(x, silu=True).square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and norm.bias.grad is not None
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, norm.weight, norm.bias))
    F.silu(F.group_norm(x2, 4, w2, b2, norm.eps)).square().sum().backward()
    for got, want in ((x.grad, x2.grad), (norm.weight.grad, w2.grad), (norm.bias.grad, b2.grad)):
        assert torch.equal(got, want)  # the same torch ops in the same order
    assert norm.weight.grad.abs().sum() > 0


def test_eager_fallback_kernel_matches_twin():
    """The op's CPU kernel when the extension lacks one (not registered on this build)."""
    for layout in ("contiguous", "channels_last", "strided"):
        case = make_case((2, 12, 5, 6), 3, options="scale_shift_silu", layout=layout)
        check_against_twin(dispatch._eager_kernel, case)


def test_opcheck():
    cases = [make_case((2, 6, 5, 7), 3, options="scale_shift_silu"),
             make_case((2, 6, 5, 7), 3, options="plain", layout="channels_last"),
             make_case((3, 8, 9), 2, options="shift_row_bias_only", dtype=torch.bfloat16)]
    for case in cases:
        torch.library.opcheck(torch.ops.fastdiff.group_norm.default, args_of(case))


def test_torch_compile_fullgraph():
    case = make_case((2, 12, 6, 6), 3, options="scale_shift_silu")

    def block(x, w, b, s, sh):
        return group_norm(x, 3, w, b, scale=s, shift=sh, silu=True) * 2

    args = (case["x"], case["weight"], case["bias"], case["scale"], case["shift"])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), block(*args))


# --- CUDA: the C++ kernel and the Triton kernel against the twin on the GPU -----------------

def _cuda_impl(impl):
    if impl == "cuda_cpp":
        if not _dispatch.is_compiled("group_norm", "cuda"):
            pytest.fail("CUDA is present but fastdiff._C was built without CUDA kernels; "
                        "rebuild with FASTDIFF_CUDA=1 pip install --no-build-isolation -e .")
        return torch.ops.fastdiff.group_norm
    require("triton")
    from fastdiff.ops.triton.group_norm import group_norm_triton
    return group_norm_triton


CUDA_IMPLS = ["cuda_cpp", "triton"]


@pytest.mark.cuda
class TestCuda:
    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("options", list(OPTIONS))
    @pytest.mark.parametrize("shape,groups", SHAPES)
    def test_sweep(self, impl, shape, groups, options, dtype, layout):
        if layout == "channels_last" and len(shape) < 3:
            pytest.skip("no spatial dims")
        fn = _cuda_impl(impl)
        check_against_twin(fn, make_case(shape, groups, options=options, dtype=dtype, layout=layout,
                                         device="cuda"))

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    # U-Net shapes; a VAE-sized group (2M values: several values per thread and chunk); one
    # group of 4.4M values (chunks of more than the minimum).
    @pytest.mark.parametrize("shape,groups", [((2, 320, 64, 64), 32), ((1, 128, 256, 256), 32),
                                              ((1, 4, 1100, 1000), 1)])
    def test_large_shapes(self, impl, shape, groups, dtype, layout):
        check_against_twin(_cuda_impl(impl), make_case(shape, groups, options="scale_shift_silu",
                                                       dtype=dtype, layout=layout, device="cuda"))

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_large_mean(self, impl, layout):
        case = make_case((2, 64, 32, 32), 32, options="plain", layout=layout, offset=1000.0, device="cuda")
        check_large_mean(_cuda_impl(impl), case)

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    def test_nan_propagates(self, impl):
        case = make_case((2, 6, 5, 7), 3, device="cuda")
        case["x"][1, 2, 3, 4] = float("nan")
        out = _cuda_impl(impl)(*args_of(case))
        assert torch.equal(torch.isnan(out), torch.isnan(R.group_norm(*args_of(case))))

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    def test_zero_variance(self, impl):
        case = make_case((2, 6, 4, 4), 3, device="cuda")
        case["x"] = torch.full((2, 6, 4, 4), 3.0, device="cuda")
        check_zero_variance(_cuda_impl(impl), case)

    # The CUDA C++ kernel's vector widths, for fp32 / fp16: channels-last D = 8 (16 / 16
    # bytes), D = 10 (8 / 4 bytes: 2 values), D = 20 (16 / 8 bytes), D = 4 (16 / 8), D = 3
    # (scalar); channels-first S = 64 (16 bytes), 36 (16 / 8), 25 and 97 (scalar), 6 (8 / 4).
    VECTOR_SHAPES = [((2, 32, 8, 8), 4), ((2, 40, 6, 6), 4), ((2, 80, 5, 5), 4), ((1, 12, 2, 3), 3),
                     ((2, 9, 97), 3), ((3, 6, 7, 9), 2)]

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    @pytest.mark.parametrize("x_offset", [0, 1, 2])
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("shape,groups", VECTOR_SHAPES)
    def test_vector_widths(self, impl, shape, groups, dtype, layout, x_offset):
        """Every vector width, and x misaligned by one or two elements (narrower vectors or
        the scalar path)."""
        for options in ("scale_shift_silu", "shift_row_bias_only", "plain"):
            case = make_case(shape, groups, options=options, dtype=dtype, layout=layout, device="cuda",
                             param_dtype="x", x_offset=x_offset)
            check_against_twin(_cuda_impl(impl), case)

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    @pytest.mark.parametrize("param_layout", ["contiguous", *PARAM_LAYOUTS])
    @pytest.mark.parametrize("param_dtype", list(PARAM_DTYPES))
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_parameters(self, impl, dtype, param_dtype, param_layout):
        """Parameters in x's dtype, float32, float64 (converted by the C++ kernel), as views
        (strided: converted; chunked, expanded: read in place; misaligned: scalar loads)."""
        for layout in ("contiguous", "channels_last"):
            for shape, groups in [((2, 64, 6, 6), 8), ((2, 40, 5, 5), 4)]:
                case = make_case(shape, groups, options="scale_shift_silu", dtype=dtype, layout=layout,
                                 device="cuda", param_dtype=PARAM_DTYPES[param_dtype], param_layout=param_layout)
                check_against_twin(_cuda_impl(impl), case)

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    def test_mixed_parameter_dtypes(self, impl):
        for layout in ("contiguous", "channels_last"):
            case = make_case((2, 64, 6, 6), 8, options="scale_shift_silu", dtype=torch.float16, layout=layout,
                             device="cuda")
            case.update(weight=case["weight"].half(), bias=case["bias"].bfloat16(), shift=case["shift"].double())
            check_against_twin(_cuda_impl(impl), case)

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("shape,groups", [((1, 8192, 4, 4), 1), ((2, 4096, 3, 5), 2)])
    def test_long_channels_last_rows(self, impl, shape, groups, dtype):
        """Channels-last groups of D >= 2048 channels: rows longer than a block's threads (a
        thread takes several vector columns) and, for D = 8192, cut into column chunks."""
        case = make_case(shape, groups, options="scale_shift_silu", dtype=dtype, layout="channels_last",
                         device="cuda", param_dtype="x")
        check_against_twin(_cuda_impl(impl), case)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_cpp_reads_parameters_in_place(self, dtype):
        """No cast kernel per call for parameters in float32 or x's dtype, including ADM's
        chunked scale/shift, broadcast rows and misaligned views; float64 ones (and gaps
        between channels) are converted once."""
        fn = _cuda_impl("cuda_cpp")
        for param_dtype in ("x", torch.float32, torch.float64):
            for param_layout in ("contiguous", "chunk", "misaligned", "strided"):
                case = make_case((2, 64, 6, 6), 8, options="scale_shift_silu", dtype=dtype, device="cuda",
                                 layout="channels_last", param_dtype=param_dtype, param_layout=param_layout)
                ops = dispatched_ops(fn, *args_of(case))
                assert "fastdiff::group_norm" in ops
                converts = param_dtype is torch.float64 or param_layout == "strided"
                assert bool(ops & COPY_OPS) == converts, (param_dtype, param_layout, ops & COPY_OPS)

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    @pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
    def test_runs_on_the_tensors_device(self, impl):
        """x on cuda:1 while cuda:0 is current: the kernels launch on cuda:1."""
        case = make_case((2, 64, 6, 6), 8, options="scale_shift_silu", device="cuda:1", layout="channels_last")
        with torch.cuda.device(0):
            out = _cuda_impl(impl)(*args_of(case))
        torch.cuda.synchronize(1)
        check_output(out, case)

    @pytest.mark.parametrize("impl", CUDA_IMPLS)
    def test_cuda_graph_capture(self, impl):
        fn = _cuda_impl(impl)
        case = make_case((2, 64, 16, 16), 32, options="scale_shift_silu", device="cuda", dtype=torch.float16)
        args = args_of(case)
        want = fn(*args)  # also compiles the Triton kernels before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*args)
        case["x"].mul_(2)
        graph.replay()
        torch.cuda.synchronize()
        check_output(out, case)
        assert not torch.equal(out, want)
