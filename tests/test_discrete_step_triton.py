"""The Triton discrete_step kernel against its PyTorch twin (fastdiff.ops.reference).

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (numpy's exp/log
there, libdevice's on a GPU). The interpreter is slow, so the sweep uses odd small class
counts (7, 97) and only a few tokens with the real 4097 classes. Tokens must equal the
twin's exactly for the same noise; log-probs agree to float32 rounding.
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
from fastdiff.ops.triton import discrete_step as triton_module  # noqa: E402
from fastdiff.ops.triton.discrete_step import discrete_step_triton  # noqa: E402
from test_discrete_step import (  # noqa: E402  (the shared case builders)
    check_edges,
    check_long_tail,
    check_truncation_against_sort,
    logp_tolerance,
    make_case as _make_case,
)

# The module, not the function of the same name that fastdiff.ops exports.
dispatch = importlib.import_module("fastdiff.ops.discrete_step")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter evaluates -inf - -inf and log(0) in numpy, which warns; the kernel's
# results are checked against the twin, NaN pattern included.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)


def make_case(B, K, N, *, seed, **kw):
    return _make_case(B, K, N, gen=torch.Generator().manual_seed(seed), device=DEVICE, **kw)


def check(case):
    """Kernel vs twin on the same inputs: tokens exactly, log-probs to logp_tolerance."""
    tokens, logp = discrete_step_triton(*case.values())
    want_tokens, want_logp = R.discrete_step(*case.values())
    assert tokens.dtype == torch.int64 and tokens.shape == want_tokens.shape
    assert logp.dtype == torch.float32 and logp.shape == want_logp.shape
    torch.testing.assert_close(logp, want_logp, atol=logp_tolerance(logp.shape[1]), rtol=0)
    assert torch.equal(tokens, want_tokens)
    return tokens, logp


@pytest.mark.parametrize("K,N", [(7, 5), (97, 33), (4097, 3)])
@pytest.mark.parametrize("rate", [0.86, 1.0])
@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("guided", [True, False])
def test_flag_sweep(guided, noise, rate, K, N):
    for t in (50, 1, 0):
        case = make_case(2, K, N, seed=K + N + t, t=t, guided=guided, rate=rate, noise=noise)
        _, logp = check(case)
        if t == 0:  # the last step samples x0 itself: the mask class is impossible
            assert torch.isneginf(logp[:, -1]).all()


@pytest.mark.parametrize("sharp", [0.05, 0.7, 30.0])
@pytest.mark.parametrize("rate", [1e-6, 0.3, 0.86, 0.999])
def test_truncation_depths(rate, sharp):
    """Flat distributions keep most classes, sharp ones a few: the search runs long and short."""
    check(make_case(2, 97, 9, seed=int(sharp * 10), t=20, rate=rate, sharp=sharp))


@pytest.mark.parametrize("K", [97, 4097])
def test_truncation_equals_sorting(K):
    """At t = 0 without guidance the log-probs are clamp(truncate(cond)): the kept set must be
    the twin's sort-based one exactly, over flat, sharp and tied distributions."""
    N, rates = (3, (1e-7, 0.5, 0.99)) if K > 1000 else (17, (0.0, 1e-7, 0.5, 0.86, 0.99))
    check_truncation_against_sort(discrete_step_triton, K, N, rates, device=DEVICE)


def test_truncation_long_tail():
    check_long_tail(discrete_step_triton, device=DEVICE, N=2)


def test_edge_values_and_synthetic_rows():
    """Exact sums at the rate, -0.0 / +0.0, NaN of both signs, infinities, all -inf, all equal;
    mask-class ties and logaddexp of two infinities (see test_discrete_step.edge_tokens)."""
    check_edges(discrete_step_triton, device=DEVICE)


def test_nan_and_infinite_inputs():
    """A NaN ranks first in torch's sort and wins torch's argmax; -inf classes stay impossible."""
    case = make_case(2, 97, 7, seed=3, guided=False, t=20)
    cond = case["cond"].clone()
    cond[0, 5, 1] = float("nan")
    cond[0, 40, 1] = float("nan")
    cond[1, :, 2] = float("-inf")
    cond[1, 11, 3] = float("inf")
    case["cond"] = cond
    case["noise"][1, -1, 4] = float("nan")  # a NaN in the mask class's noise: the mask wins
    for rate in (0.86, 1.0):
        case["truncation_rate"] = rate
        tokens, logp = discrete_step_triton(*case.values())
        want_tokens, want_logp = R.discrete_step(*case.values())
        torch.testing.assert_close(logp, want_logp, atol=logp_tolerance(logp.shape[1]), rtol=0, equal_nan=True)
        assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("guided", [True, False])
def test_reduced_precision_inputs(guided, dtype):
    # The inputs are rounded once; both sides then compute in float32 from the same values
    # (bfloat16 inputs also make many exact ties for the truncation).
    for t, rate in ((50, 0.86), (0, 0.5), (10, 1.0)):
        check(make_case(2, 97, 21, seed=t, t=t, guided=guided, rate=rate, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_halves_per_sample_rows_and_scales(dtype):
    """cond / uncond as the two halves (views) of one 2B batch; a timestep (t = 0 among them)
    and a guidance scale per sample."""
    case = make_case(3, 97, 19, seed=5, t=1, dtype=dtype, cfg_halves=True, per_sample=True)
    assert case["cond"]._base is case["uncond"]._base is not None
    check(case)


def test_other_strides():
    case = make_case(2, 97, 23, seed=6)
    # classes innermost, tokens strided; x_t and noise non-contiguous too
    case["cond"] = case["cond"].transpose(1, 2).contiguous().transpose(1, 2)
    case["uncond"] = case["uncond"].transpose(1, 2).contiguous().transpose(1, 2)
    case["x_t"] = case["x_t"].t().contiguous().t()
    case["noise"] = case["noise"].transpose(1, 2).contiguous().transpose(1, 2)
    # a class slice of a wider model output
    wide = torch.log_softmax(torch.randn(2, 97, 23, generator=torch.Generator().manual_seed(7)), 1)
    case["cond"] = wide.to(DEVICE)[:, 1:]
    assert not case["cond"].is_contiguous()
    check(case)


def test_single_token_and_two_classes():
    check(make_case(1, 97, 1, seed=8))
    check(make_case(2, 2, 5, seed=9, rate=0.5))


def test_write_log_probs_off_and_empty():
    case = make_case(2, 97, 9, seed=10)
    case["write_log_probs"] = False
    tokens, logp = discrete_step_triton(*case.values())
    assert logp.numel() == 0 and torch.equal(tokens, R.discrete_step(*case.values())[0])
    case = make_case(2, 97, 3, seed=11)
    case.update(x_t=case["x_t"][:, :0], cond=case["cond"][..., :0], uncond=case["uncond"][..., :0],
                noise=case["noise"][..., :0], write_log_probs=True)
    tokens, logp = discrete_step_triton(*case.values())
    assert tokens.shape == (2, 0) and logp.shape == (2, 97, 0)


BAD = {
    "x_float": (lambda a: a.update(x_t=a["x_t"].float()), "int64"),
    "cond_shape": (lambda a: a.update(cond=a["cond"][:, :, :-1]), "cond has shape"),
    "uncond_dtype": (lambda a: a.update(uncond=a["uncond"].double()), "dtype"),
    "scale_missing": (lambda a: a.update(guidance_scale=None), "without guidance_scale"),
    "coeffs_width": (lambda a: a.update(coeffs=a["coeffs"][:, :-1]), "coeffs must have shape"),
    "noise_rows": (lambda a: a.update(noise=a["noise"][:, :-1]), "noise has shape"),
    "noise_device": (lambda a: a.update(noise=a["noise"].to("meta")), "noise is on"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clear_error(case):
    args = make_case(2, 97, 5, seed=12)
    mutate, message = BAD[case]
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        discrete_step_triton(*args.values())


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_module, "AVAILABLE", False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        discrete_step_triton(*make_case(1, 7, 3, seed=13).values())


def test_cuda_fallback_routes_by_class_count(monkeypatch):
    """CUDA without the compiled kernel: Triton, or the twin past what one program holds."""
    case = make_case(2, 97, 5, seed=14)
    twin, kernel, calls = R.discrete_step, triton_module.discrete_step_triton, []
    cuda_kernel = _dispatch.python_kernel("discrete_step", "cuda")
    with monkeypatch.context() as patch:
        patch.setattr(triton_module, "discrete_step_triton",
                      lambda *a: calls.append("triton") or kernel(*a))
        patch.setattr(R, "discrete_step", lambda *a: calls.append("reference") or twin(*a))
        got = cuda_kernel(*case.values())
        patch.setattr(triton_module, "MAX_CLASSES", 64)
        cuda_kernel(*case.values())
    assert calls == ["triton", "reference"]
    assert torch.equal(got[0], twin(*case.values())[0])
    monkeypatch.setattr(triton_module, "MAX_CLASSES", 64)
    with pytest.raises(RuntimeError, match="too large for the Triton kernel"):
        discrete_step_triton(*case.values())


def test_implementation_reports_triton_on_cuda():
    before = _library.get_backend()
    try:
        _library.set_backend("triton")
        assert dispatch.implementation("cuda") == "Triton"
        _library.set_backend("reference")
        assert dispatch.implementation("cuda") == "reference"
        _library.set_backend("auto")
        want = "CUDA C++" if _dispatch.is_compiled("discrete_step", "cuda") else "Triton"
        assert dispatch.implementation("cuda") == want
    finally:
        _library.set_backend(before)
