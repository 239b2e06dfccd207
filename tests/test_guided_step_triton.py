"""The Triton guided_step kernel against its PyTorch twin (fastdiff.ops.reference).

Without a GPU the kernel runs under Triton's interpreter on CPU tensors. The
interpreter is slow, so most combinations use a small odd shape and only a few
use the larger ones.
"""
import os

import pytest
import torch

from deps import require

if not torch.cuda.is_available():
    # Read when a kernel is decorated, so it must be set before the module below loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
require("triton")

from fastdiff.ops import coeffs as cols  # noqa: E402
from fastdiff.ops.reference import guided_step  # noqa: E402
from fastdiff.ops.triton import guided_step as triton_module  # noqa: E402
from fastdiff.ops.triton.guided_step import guided_step_triton  # noqa: E402
from test_guided_step import fp32_tolerance  # noqa: E402  (the same formula's float32 bound)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = (2, 3, 17, 9)


def make_args(shape=SMALL, dtype=torch.float32, *, uncond="per_sample", noise=True,
              learned=False, clip=0.8, n_hist=1, coeff_rows="B", write_den=True, seed=0):
    """Random guided_step arguments; uncond is None, "single" or "per_sample" (the scale)."""
    gen = torch.Generator().manual_seed(seed)
    batch, channels, rest = shape[0], shape[1], tuple(shape[2:])

    def randn(*size):
        return torch.randn(*size, generator=gen).to(dtype=dtype, device=DEVICE)

    pred_channels = 2 * channels if learned else channels
    rows = batch if coeff_rows == "B" else 1
    coeffs = torch.randn(rows, cols.NUM_FIXED + n_hist, generator=gen) * 0.5
    # Log-variances as a model would predict them: negative, max above min.
    coeffs[:, cols.LOGVAR_MAX] = -3.0 + 0.1 * torch.randn(rows, generator=gen)
    coeffs[:, cols.LOGVAR_MIN] = -5.0 + 0.1 * torch.randn(rows, generator=gen)
    if uncond is None:
        scale = None
    elif uncond == "single":
        scale = torch.tensor([7.5])
    else:
        scale = 1.0 + 7.0 * torch.rand(batch, generator=gen)
    return dict(
        x=randn(*shape),
        cond=randn(batch, pred_channels, *rest),
        uncond=None if uncond is None else randn(batch, pred_channels, *rest),
        guidance_scale=None if scale is None else scale.to(DEVICE),
        coeffs=coeffs.to(DEVICE),
        noise=randn(*shape) if noise else None,
        history=[randn(*shape) for _ in range(n_hist)],
        clip_range=clip,
        learned_variance=learned,
        write_denoised=write_den,
    )


def upcast(args):
    """The same (already rounded) inputs in float32, for an exact-as-possible reference."""
    up = dict(args)
    for name in ("x", "cond", "uncond", "noise"):
        if up[name] is not None:
            up[name] = up[name].float()
    up["history"] = [h.float() for h in args["history"]]
    return up


def check_close(got, exact, twin, fp32_atol):
    """got: kernel output; exact: fp32 reference; twin: reference run in the storage dtype;
    fp32_atol: what the float32 arithmetic of kernel and twin may differ by (fp32_tolerance)."""
    assert torch.equal(got.isnan(), exact.isnan()), "NaN pattern differs from the reference"
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, exact, atol=fp32_atol, rtol=0, equal_nan=True)
        return
    finite = ~exact.isnan()
    err = (got.float() - exact).abs()[finite]
    twin_err = (twin.float() - exact).abs()[finite]
    # One unit in the last place: round-to-nearest (GPU) stays within half of it;
    # the interpreter truncates fp32 -> bf16, which stays within a whole one. Near zero,
    # the float32 difference can move the stored value by itself.
    ulp_bound = torch.finfo(got.dtype).eps * exact.abs()[finite] + fp32_atol
    assert (err <= ulp_bound).all(), f"max error {err.max().item():.3g} beyond one ulp"
    slack = fp32_atol + _interpreter_slack(got.dtype, exact)
    assert err.max() <= 2 * twin_err.max() + slack


def _interpreter_slack(dtype, exact):
    # Truncation doubles the worst-case rounding error of round-to-nearest.
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return torch.finfo(dtype).eps * exact.nan_to_num().abs().max()
    return 0.0


def assert_matches_reference(args):
    out, den = guided_step_triton(**args)
    twin_out, twin_den = guided_step(**args)
    exact_out, exact_den = guided_step(**upcast(args))
    x = args["x"]
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.stride() == twin_out.stride(), "output layout differs from the twin's"
    fp32_atol = fp32_tolerance(*args.values())
    check_close(out, exact_out, twin_out, fp32_atol)
    if args["write_denoised"]:
        assert den.dtype == x.dtype and den.stride() == twin_den.stride()
        check_close(den, exact_den, twin_den, fp32_atol)
    else:
        assert den.numel() == 0 and den.dtype == x.dtype and den.device == x.device
    return out, den


@pytest.mark.parametrize("write_den", [False, True])
@pytest.mark.parametrize("clip", [None, 0.8])
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("uncond", [None, "single", "per_sample"])
def test_flag_combinations_fp32(uncond, noise, learned, clip, write_den):
    assert_matches_reference(make_args(uncond=uncond, noise=noise, learned=learned, clip=clip,
                                       write_den=write_den))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("coeff_rows", [1, "B"])
@pytest.mark.parametrize("n_hist", range(cols.MAX_HISTORY + 1))
def test_history_and_coefficient_rows(n_hist, coeff_rows, dtype):
    assert_matches_reference(make_args(dtype=dtype, n_hist=n_hist, coeff_rows=coeff_rows,
                                       learned=True, seed=n_hist))


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("uncond", [None, "single", "per_sample"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_flags(dtype, uncond, learned):
    assert_matches_reference(make_args(dtype=dtype, uncond=uncond, learned=learned, n_hist=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 97, 31), (3, 4, 64, 64)])
def test_larger_shapes(shape, dtype):
    assert_matches_reference(make_args(shape, dtype, learned=True, n_hist=2))


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 40), (2, 3, 1, 9), (2, 2, 3, 4, 5)])
def test_other_ranks_and_unit_dims(shape):
    assert_matches_reference(make_args(shape, n_hist=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("learned", [False, True])
def test_cfg_halves_of_one_batch(learned, dtype):
    args = make_args(dtype=dtype, learned=learned)
    both = torch.randn(2 * SMALL[0], *args["cond"].shape[1:]).to(dtype=dtype, device=DEVICE)
    args["uncond"], args["cond"] = both[: SMALL[0]], both[SMALL[0]:]
    assert_matches_reference(args)


def test_cond_sliced_from_wider_channels():
    args = make_args(learned=True)
    wide = torch.randn(SMALL[0], 2 * SMALL[1] + 1, *SMALL[2:], device=DEVICE)
    args["cond"] = wide[:, 1:]
    assert_matches_reference(args)


def test_transposed_x():
    args = make_args()
    b, c, h, w = SMALL
    args["x"] = torch.randn(b, c, w, h, device=DEVICE).transpose(2, 3)
    assert not args["x"].is_contiguous()
    out, _ = assert_matches_reference(args)
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("which", ["all", "x_only", "all_but_x"])
def test_channels_last(which, dtype):
    args = make_args(dtype=dtype, learned=True, n_hist=2)
    to_cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    if which in ("all", "x_only"):
        args["x"] = to_cl(args["x"])
    if which in ("all", "all_but_x"):
        for name in ("cond", "uncond", "noise"):
            args[name] = to_cl(args[name])
        args["history"] = [to_cl(h) for h in args["history"]]
    out, den = assert_matches_reference(args)
    x_is_cl = which != "all_but_x"
    assert out.is_contiguous(memory_format=torch.channels_last) == x_is_cl
    assert den.is_contiguous(memory_format=torch.channels_last) == x_is_cl


def test_noise_broadcast_over_batch():
    args = make_args()
    args["noise"] = torch.randn(1, *SMALL[1:], device=DEVICE).expand(SMALL)
    assert_matches_reference(args)


def test_zero_dim_guidance_scale():
    args = make_args(uncond="single")
    args["guidance_scale"] = torch.tensor(3.0, device=DEVICE)
    assert_matches_reference(args)


def test_guidance_scale_without_uncond_is_ignored():
    args = make_args(uncond=None)
    args["guidance_scale"] = torch.full((SMALL[0],), 5.0, device=DEVICE)
    assert_matches_reference(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_propagates_through_clip(dtype):
    args = make_args(dtype=dtype, learned=True, clip=0.5)
    args["x"].view(-1)[[0, 7, 100]] = float("nan")
    args["cond"][1, 0, 3, 4] = float("nan")
    args["uncond"][0, 1, 2, 2] = float("nan")
    # A NaN in the variance channels reaches `out` only through the noise's std.
    args["cond"][1, SMALL[1], 5, 5] = float("nan")
    out, den = assert_matches_reference(args)
    assert out.isnan().any() and den.isnan().any()


def test_empty_batch():
    args = make_args((0, 3, 4, 4), coeff_rows=1, uncond="single")
    out, den = guided_step_triton(**args)
    assert out.shape == (0, 3, 4, 4) and den.shape == (0, 3, 4, 4)


def _replace(name, make):
    def mutate(args):
        args[name] = make(args)
    return mutate


ERROR_CASES = {
    "x_one_dim": (_replace("x", lambda a: a["x"].flatten()), ValueError, "x must be"),
    "x_float64": (_replace("x", lambda a: a["x"].double()), TypeError, "float32, float16"),
    "x_int": (_replace("x", lambda a: a["x"].int()), TypeError, "float32, float16"),
    "cond_not_tensor": (_replace("cond", lambda a: 1.0), TypeError, "cond must be"),
    "cond_dtype": (_replace("cond", lambda a: a["cond"].half()), TypeError, "cond has dtype"),
    "cond_device": (_replace("cond", lambda a: a["cond"].to("meta")), ValueError, "cond is on"),
    "cond_channels": (_replace("cond", lambda a: a["cond"][:, :2]), ValueError, "cond has shape"),
    "cond_spatial": (_replace("cond", lambda a: a["cond"][..., :3]), ValueError, "cond has shape"),
    "learned_needs_2c": (_replace("learned_variance", lambda a: True), ValueError,
                         "learned_variance needs cond with 2"),
    "uncond_channels": (_replace("uncond", lambda a: a["uncond"][:, :2]), ValueError, "uncond"),
    "uncond_without_scale": (_replace("guidance_scale", lambda a: None), ValueError,
                             "without guidance_scale"),
    "scale_float64": (_replace("guidance_scale", lambda a: a["guidance_scale"].double()),
                      TypeError, "guidance_scale must be float32"),
    "scale_count": (_replace("guidance_scale", lambda a: torch.ones(3)), ValueError,
                    "1 or 2 elements"),
    "scale_two_dim": (_replace("guidance_scale", lambda a: torch.ones(2, 1)), ValueError,
                      "1 or 2 elements"),
    "noise_dtype": (_replace("noise", lambda a: a["noise"].bfloat16()), TypeError, "noise"),
    "noise_shape": (_replace("noise", lambda a: a["noise"][:1]), ValueError, "noise has shape"),
    "coeffs_float64": (_replace("coeffs", lambda a: a["coeffs"].double()), TypeError,
                       "coeffs must be float32"),
    "coeffs_device": (_replace("coeffs", lambda a: a["coeffs"].to("meta")), ValueError,
                      "coeffs is on"),
    "coeffs_width": (_replace("coeffs", lambda a: a["coeffs"][:, :-1]), ValueError,
                     "coeffs must have shape"),
    "coeffs_rows": (_replace("coeffs", lambda a: torch.zeros(3, 12)), ValueError,
                    "coeffs must have shape"),
    "coeffs_one_dim": (_replace("coeffs", lambda a: torch.zeros(12)), ValueError,
                       "coeffs must have shape"),
    "too_much_history": (_replace("history", lambda a: [a["x"]] * 5), ValueError, "at most 4"),
    "history_shape": (_replace("history", lambda a: [a["x"][:, :2]]), ValueError,
                      "history tensor has shape"),
    "clip_zero": (_replace("clip_range", lambda a: 0.0), ValueError,
                  "clip_range must be positive"),
    "clip_negative": (_replace("clip_range", lambda a: -1.0), ValueError, "clip_range"),
    "clip_nan": (_replace("clip_range", lambda a: float("nan")), ValueError, "clip_range"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_invalid_arguments_raise(case):
    mutate, error, message = ERROR_CASES[case]
    args = make_args(shape=(2, 3, 5, 4))
    mutate(args)
    with pytest.raises(error, match=message):
        guided_step_triton(**args)


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_module, "AVAILABLE", False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        guided_step_triton(**make_args())
