"""group_norm (GroupNorm + scale-shift + SiLU): the C++ CPU kernel against its twin.

Every kernel result is checked two ways: close to the twin (fastdiff.ops.reference, float32
inside), and, against an exact float64 computation, at most about twice the error of
PyTorch's own path in the same dtype (F.group_norm + eager scale-shift/SiLU). The sweep
covers odd shapes, 1-D/2-D/3-D spatial sizes, 1/3/32 groups, every optional operand,
fp32/fp16/bf16, contiguous, channels-last and strided inputs. The CUDA kernels (C++ and
Triton) run the same sweep where a GPU is present; tests/test_group_norm_triton.py runs
the Triton kernel under the interpreter on CPU.

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
from fastdiff.ops import _library, reference as R
from fastdiff.ops.group_norm import group_norm

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


def make_case(shape, groups, *, options="affine_silu", dtype=torch.float32, layout="contiguous",
              seed=0, device="cpu", offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    B, C = shape[0], shape[1]
    opts = OPTIONS[options] if isinstance(options, str) else options
    x = (torch.randn(shape, generator=gen) * 2 + 0.5 + offset).to(device, dtype)
    if layout == "channels_last":
        x = _channels_last(x)
    elif layout == "strided":
        x = _strided(x)

    def rand(*s):
        return torch.randn(*s, generator=gen).to(device)

    weight = 1 + 0.5 * rand(C) if opts.get("affine") else None
    bias = rand(C) if opts.get("affine") or opts.get("bias_only") else None
    per = {"batch": (B, C), "row": (1, C)}
    scale = 0.5 * rand(*per[opts["scale"]]) if opts.get("scale") else None
    shift = rand(*per[opts["shift"]]) if opts.get("shift") else None
    return dict(x=x, num_groups=groups, weight=weight, bias=bias, eps=1e-5, scale=scale,
                shift=shift, silu=bool(opts.get("silu")))


def args_of(case):
    return tuple(case.values())


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


def check_against_twin(fn, case):
    """fn(*args) against the twin and the float64 yardstick; returns the output."""
    out = fn(*args_of(case))
    twin = R.group_norm(*args_of(case))
    x = case["x"]
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    # Layout: channels-last in, channels-last out; contiguous otherwise.
    assert out.stride() == dispatch._output_like(x).stride()
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, twin, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, twin)  # within a rounding of the output dtype
    want = exact(case)
    floor = 2e-6 if x.dtype == torch.float32 else 0.0
    assert _max_err(out, want) <= 2 * _max_err(torch_path(case), want) + floor
    assert torch.isfinite(out).all()
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
    on these inputs (it sums x and x^2), so only the float64 yardstick is a fair judge.
    Against it, on the same float32 inputs, only the rounding of the output and of the
    float32 mean (ulps of 2^-14 near 1000) remains."""
    out = fn(*args_of(case))
    assert out.stride() == dispatch._output_like(case["x"]).stride()
    want = exact(case)
    assert _max_err(out, want) < 1.5e-4
    assert _max_err(out, want) <= _max_err(R.group_norm(*args_of(case)), want) + 1e-5
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
    torch.testing.assert_close(out, R.group_norm(*args_of(case)), rtol=1e-5, atol=1e-6)
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
    torch.testing.assert_close(out[~nan], twin[~nan], rtol=1e-5, atol=1e-5)


@needs_ext
def test_cpu_kernel_empty_and_zero_variance():
    empty = make_case((0, 6, 3, 3), 3)
    assert cpu_op(*args_of(empty)).shape == (0, 6, 3, 3)
    const = make_case((2, 6, 4, 4), 3)
    const["x"] = torch.full((2, 6, 4, 4), 3.0)
    # rstd = 1/sqrt(eps) ~ 316 magnifies any cancellation: the kernel's x - mean is exactly 0
    # here (torch's own CPU kernel is off by 4e-5 on this case, so the yardstick is float64).
    torch.testing.assert_close(cpu_op(*args_of(const)), exact(const).float(), rtol=1e-6, atol=1e-6)


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
        print("ok")
    """)
    env = dict(os.environ, FASTDIFF_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


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
    want_cpu = "C++ (OpenMP)" if "CPU" in dispatch._compiled_keys else "PyTorch (eager)"
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
    from fastdiff.models.blocks import GroupNorm
    norm = GroupNorm(4, 8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    norm(x, silu=True).square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and norm.bias.grad is not None
    assert torch.isfinite(x.grad).all() and norm.weight.grad.abs().sum() > 0


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
        if "CUDA" not in dispatch._compiled_keys:
            pytest.fail("CUDA is present but fastdiff._C was built without CUDA kernels; "
                        "rebuild with FASTDIFF_CUDA=1 pip install --no-build-isolation -e .")
        return torch.ops.fastdiff.group_norm
    pytest.importorskip("triton")
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
        torch.testing.assert_close(out, R.group_norm(*args_of(case)))
        assert not torch.equal(out, want)
