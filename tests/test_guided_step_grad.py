"""The backward of guided_step (registered with torch.library): gradcheck in float64, and
the compiled kernels' gradients against the twin's plain autograd in float32.

The float64 gradchecks check the explicit formulas (reference.guided_step_backward)
against finite differences; the float32 comparisons check that the same formulas are
attached to whatever kernel runs the forward (C++ on CPU, CUDA C++ / Triton on a GPU).
"""
import contextlib
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # As tests/test_guided_step_triton.py: Triton kernels run on CPU tensors under its interpreter
    # (read when a kernel is decorated, so before fastdiff.ops.triton loads).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdiff  # noqa: E402
from fastdiff.ops import coeffs as C  # noqa: E402
from fastdiff.ops import guided_step  # noqa: E402
from fastdiff.ops._checks import OpValueError  # noqa: E402
from fastdiff.ops.guided_step import implementation  # noqa: E402
from fastdiff.sampling import steps as S  # noqa: E402
from fastdiff.sampling.schedules import SchedulerConfig  # noqa: E402
from tolerances import fp32_bound  # noqa: E402

SD = SchedulerConfig.from_dict(dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000))
GLIDE = SchedulerConfig.from_dict(dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range"))


def _rows():
    """One real step row per prediction / sampler shape (a middle step of each plan)."""
    plans = {"ddim_eta": S.ddim_plan(SD, 10, eta=0.5), "ddpm": S.ddpm_plan(SD, 10),
             "euler_a": S.euler_plan(SD, 10, ancestral=True), "dpmpp_2m": S.dpmpp_2m_plan(SD, 10),
             "ddpm_learned": S.ddpm_plan(GLIDE, 10)}
    rows = {name: plan.steps[len(plan.steps) // 2].row for name, plan in plans.items()}
    rows["v_prediction"] = S.row(x0=(0.9, -0.4), out=(0.7, 0.2, 0.3), noise=0.3, den=(0.1, 0.5, 0.6),
                                 logvar=(-1.0, -3.0))
    return rows


ROWS = _rows()


@contextlib.contextmanager
def backend(name):
    old = fastdiff.get_backend()
    fastdiff.set_backend(name)
    try:
        yield
    finally:
        fastdiff.set_backend(old)


def make(shape, dtype, *, row, scale="per_sample", noise=True, learned=False, n_hist=1, seed=0,
         channels_last=False, device="cpu"):
    """Operands with |values| ~ 1; cond's variance half in (-1, 1) as a learned-range model's."""
    gen = torch.Generator().manual_seed(seed)
    b, ch = shape[0], shape[1]
    wide = (b, 2 * ch, *shape[2:]) if learned else shape

    def rand(s):
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        if channels_last and len(s) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.to(device=device, dtype=dtype)

    cond = rand(wide)
    if learned:
        cond[:, ch:] = cond[:, ch:].tanh()
    hist = list(row[C.NUM_FIXED:]) + [0.0] * (n_hist - len(row[C.NUM_FIXED:]))
    full = np.concatenate([row[:C.NUM_FIXED], np.asarray(hist[:n_hist]) + 0.25])
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = dict(x=rand(shape), cond=cond, uncond=None, guidance_scale=None,
                coeffs=torch.tensor(full, dtype=cdtype, device=device)[None].expand(b, -1).contiguous(),
                noise=rand(shape) if noise else None, history=[rand(shape) for _ in range(n_hist)])
    if scale is not None:
        args["uncond"] = rand(wide)
        n = b if scale == "per_sample" else 1
        args["guidance_scale"] = (1.5 + torch.rand(n, generator=gen, dtype=torch.float64)).to(device, cdtype)
    args["learned"] = learned
    return args


def diff_inputs(a):
    return [t for t in (a["x"], a["cond"], a["uncond"], a["guidance_scale"], a["noise"], *a["history"])
            if t is not None]


def call(a, inputs, clip=None, write_den=True):
    """guided_step with `inputs` (the differentiable operands, in diff_inputs order) substituted."""
    it = iter(inputs)
    x, cond = next(it), next(it)
    uncond = next(it) if a["uncond"] is not None else None
    scale = next(it) if a["guidance_scale"] is not None else None
    noise = next(it) if a["noise"] is not None else None
    hist = list(it)
    out, den = guided_step(x, cond, uncond, scale, coeffs=a["coeffs"], noise=noise, history=hist,
                           clip_range=clip, learned_variance=a["learned"], write_denoised=write_den)
    return (out, den) if write_den else out


def gradcheck(a, **kw):
    inputs = [t.detach().requires_grad_() for t in diff_inputs(a)]
    assert torch.autograd.gradcheck(lambda *ts: call(a, ts, **kw), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("scale", ["per_sample", "shared", None])
def test_gradcheck_rows(name, scale):
    learned = name == "ddpm_learned"
    gradcheck(make((2, 3, 4, 5), torch.float64, row=ROWS[name], scale=scale, learned=learned))


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 4, 9)])
@pytest.mark.parametrize("n_hist,noise,write_den", [(0, False, False), (1, True, True), (2, True, False)])
def test_gradcheck_shapes_history_noise(shape, n_hist, noise, write_den):
    a = make(shape, torch.float64, row=ROWS["dpmpp_2m"], n_hist=n_hist, noise=noise, seed=1)
    gradcheck(a, write_den=write_den)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_learned_variance_clip_channels_last(channels_last):
    """clip_range far above |x0| (finite differences stay on one side of the clamp)."""
    a = make((2, 3, 4, 5), torch.float64, row=ROWS["v_prediction"], learned=True, channels_last=channels_last)
    gradcheck(a, clip=50.0)
    inputs = [t.detach().requires_grad_() for t in diff_inputs(a)]
    out, _ = call(a, inputs, clip=50.0)
    grads = torch.autograd.grad(out.sum(), inputs)
    if channels_last:
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads if g.dim() == 4)


def test_clamped_elements_get_no_gradient_through_x0():
    """Where |x0| > r the clamp stops the gradient: with only OUT_X0 and DEN_X0 nonzero, the
    grad of x is X0_X * mask(|x0| <= r), exactly zero at clamped elements."""
    row = S.row(x0=(0.8, 0.6), out=(0.0, 0.0, 1.0), den=(0.0, 0.0, 1.0))
    a = make((2, 3, 6, 5), torch.float64, row=row, scale=None, noise=False, n_hist=0)
    x = a["x"].detach().requires_grad_()
    out, den = guided_step(x, a["cond"], coeffs=a["coeffs"], clip_range=1.0, write_denoised=True)
    (g,) = torch.autograd.grad(out.sum() + 2 * den.sum(), [x])
    x0 = 0.8 * a["x"] + 0.6 * a["cond"]
    inside = x0.abs() <= 1.0
    assert inside.any() and (~inside).any()
    want = torch.where(inside, torch.full_like(g, 3 * 0.8), torch.zeros_like(g))
    torch.testing.assert_close(g, want, rtol=0, atol=1e-15)
    # away from the edges, finite differences agree too
    far = (x0.abs() - 1.0).abs().min().item()
    assert far > 1e-4
    a2 = dict(a, x=x.detach())
    gradcheck(a2, clip=1.0)


def _grads(a, clip, seed=5):
    inputs = [t.detach().requires_grad_() for t in diff_inputs(a)]
    out, den = call(a, inputs, clip=clip)
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=gen).to(out)
    w_den = torch.randn(den.shape, generator=gen).to(den)
    return torch.autograd.grad((out * w_out).sum() + (den * w_den).sum(), inputs)


# Each gradient element is a short elementwise formula of the operands (at most ~12 rounded
# operations: two or three coefficient products per output, the CFG combine, the learned std's
# exp) plus, for guidance_scale, a sum over one sample's elements (n terms). Both sides compute
# in float32, in different orders (the compiled forward and the registered backward against
# autograd through the twin), so fp32_bound(scale, terms) bounds their difference, with scale
# the largest |gradient| (at least 1) and terms = 12 + n. A coefficient 1% off moves the grads
# by ~1e-2 * scale, far outside the bound (~1e-5 * scale).
def _assert_close_fp32(got, want, n):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        bound = fp32_bound(max(w.abs().max().item(), 1.0), 12 + n)
        assert (g - w).abs().max().item() <= bound, (g - w).abs().max().item()


@pytest.mark.parametrize("name", ["ddim_eta", "ddpm_learned", "dpmpp_2m"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_default_backend_grads_equal_reference_autograd(name, channels_last):
    a = make((2, 3, 6, 7), torch.float32, row=ROWS[name], learned=name == "ddpm_learned", n_hist=2,
             channels_last=channels_last, seed=2)
    got = _grads(a, clip=20.0)
    with backend("reference"):
        want = _grads(a, clip=20.0)
    _assert_close_fp32(got, want, 6 * 7 * 3)


def test_a_wrong_coefficient_fails_the_bound():
    a = make((2, 3, 6, 7), torch.float32, row=ROWS["ddim_eta"], n_hist=1, seed=2)
    got = _grads(a, clip=None)
    with backend("reference"):
        bad = dict(a, coeffs=a["coeffs"] * torch.tensor([1.0, 1.01] + [1.0] * (C.NUM_FIXED - 1)))
        want = _grads(bad, clip=None)
    with pytest.raises(AssertionError):
        _assert_close_fp32(got, want, 6 * 7 * 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads_have_input_dtypes(dtype):
    a = make((2, 3, 5, 4), dtype, row=ROWS["ddpm_learned"], learned=True, seed=3)
    grads = _grads(a, clip=20.0)
    for g, t in zip(grads, diff_inputs(a)):
        assert g.dtype == t.dtype and g.shape == t.shape and torch.isfinite(g.float()).all()


def test_coeffs_requiring_grad_is_refused():
    a = make((2, 3, 4, 5), torch.float32, row=ROWS["ddim_eta"])
    coeffs = a["coeffs"].clone().requires_grad_()
    with pytest.raises(OpValueError, match="coeffs must not require grad"):
        guided_step(a["x"], a["cond"], a["uncond"], a["guidance_scale"], coeffs=coeffs, noise=a["noise"],
                    history=a["history"])


def test_float64_runs_on_the_twin():
    assert implementation("cpu") in ("C++ (OpenMP)", "reference")
    a = make((2, 3, 4, 5), torch.float64, row=ROWS["ddim_eta"])
    out, _ = call(a, diff_inputs(a))
    with backend("reference"):
        ref, _ = call(a, diff_inputs(a))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_opcheck():
    a = make((2, 3, 4, 5), torch.float32, row=ROWS["ddpm_learned"], learned=True)
    args = (a["x"].requires_grad_(), a["cond"].requires_grad_(), a["uncond"], a["guidance_scale"],
            a["coeffs"], a["noise"], a["history"], 20.0, True, True)
    torch.library.opcheck(torch.ops.fastdiff.guided_step.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_run_plan_gradient_to_starting_noise():
    """A loss on run_plan's final sample (4 DDIM steps, a tiny Conv2d denoiser) is
    differentiated back to the starting noise: default backend == reference twin."""
    from fastdiff.sampling.samplers import run_plan

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    plan = S.ddim_plan(SD, 4, eta=0.0)

    def denoise(x, t):
        return net(x)

    def grad_of_start(x_start):
        x = x_start.clone().requires_grad_()
        final = run_plan(denoise, x, plan, progress=False)
        (g,) = torch.autograd.grad((final ** 2).mean(), [x])
        return final.detach(), g

    x_start = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    final, g = grad_of_start(x_start)
    with backend("reference"):
        final_ref, g_ref = grad_of_start(x_start)
    # 4 steps, each a 27-term convolution plus the step's ~12 operations, forward and back:
    # terms = 2 * 4 * (27 + 12) (tolerances.py's count for a k-step sampler).
    assert g.abs().max() > 0
    for got, want in ((final, final_ref), (g, g_ref)):
        bound = fp32_bound(max(want.abs().max().item(), 1.0), 2 * 4 * (27 + 12))
        assert (got - want).abs().max().item() <= bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["auto", "triton"])
def test_cuda_backward_flows_through_cuda_forwards(name):
    a = make((2, 3, 6, 7), torch.float32, row=ROWS["ddpm_learned"], learned=True, n_hist=1, device="cuda")
    if name == "triton":
        pytest.importorskip("triton")
    with backend(name):
        got = _grads(a, clip=20.0)
    with backend("reference"):
        want = _grads(a, clip=20.0)
    _assert_close_fp32(got, want, 6 * 7 * 3)


def test_backward_flows_through_the_triton_forward():
    """The Triton kernel as the dispatch table calls it directly (the triton backend): on a GPU,
    or on CPU tensors under TRITON_INTERPRET=1 as the Triton tests run it."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    import importlib
    module = importlib.import_module("fastdiff.ops.guided_step")   # the package exports the function
    from fastdiff.ops.triton.guided_step import guided_step_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = make((2, 3, 6, 7), torch.float32, row=ROWS["ddpm_learned"], learned=True, n_hist=1, device=device)
    triton_step = module._differentiable(guided_step_triton)
    inputs = [t.detach().requires_grad_() for t in diff_inputs(a)]
    x, cond, uncond, scale, noise, hist = inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5:]
    out, den = triton_step(x, cond, uncond, scale, a["coeffs"], noise, hist, 20.0, True, True)
    assert out.grad_fn is not None
    gen = torch.Generator().manual_seed(5)
    w_out, w_den = (torch.randn(out.shape, generator=gen).to(out) for _ in range(2))
    got = torch.autograd.grad((out * w_out).sum() + (den * w_den).sum(), inputs)
    with backend("reference"):
        want = _grads(a, clip=20.0)
    _assert_close_fp32(got, want, 6 * 7 * 3)
