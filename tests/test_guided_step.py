"""guided_step's compiled kernels against the pure-PyTorch twin.

Sweeps odd shapes, dtypes, strided / channels-last / CFG-half inputs, history
counts, per-sample coefficients, and every sampler's real coefficient rows.
"""
import pytest
import torch

from fastdiff.ops import _library, coeffs as C, reference
from fastdiff.ops.guided_step import guided_step
from fastdiff.sampling import SchedulerConfig, steps as S
from tolerances import dtype_rounding_bound, fp32_bound

needs_ext = pytest.mark.skipif(not _library.extension_loaded(), reason="fastdiff._C not built")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SD = SchedulerConfig.from_dict(dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
                                    clip_sample=False))


def random_row(n_hist, gen, learned=False):
    r = torch.randn(C.NUM_FIXED + n_hist, generator=gen, dtype=torch.float64) * 0.5
    r[C.LOGVAR_MAX], r[C.LOGVAR_MIN] = -3.0, -5.0
    return r


def make_case(shape, dtype, *, gen, uncond=True, per_sample_scale=True, noise=True, learned=False,
              n_hist=1, per_sample_coeffs=False, layout="contiguous", device="cpu"):
    B, Ch = shape[0], shape[1]
    out_ch = 2 * Ch if learned else Ch

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    if layout == "cfg_halves":  # the two halves of one batched model call: views, no copies
        both = rnd(2 * B, out_ch, *shape[2:])
        u, c = both[:B], both[B:]
    else:
        c, u = rnd(B, out_ch, *shape[2:]), rnd(B, out_ch, *shape[2:])
    x = rnd(*shape)
    if layout == "transposed" and x.dim() == 4:
        x = rnd(shape[0], shape[1], shape[3], shape[2]).transpose(2, 3)
    if layout == "channels_last" and x.dim() == 4:
        x, c, u = (t.contiguous(memory_format=torch.channels_last) for t in (x, c, u))
    rows = torch.stack([random_row(n_hist, gen) for _ in range(B if per_sample_coeffs else 1)])
    scale = (torch.rand(B if per_sample_scale else 1, generator=gen) * 8 + 1).to(device)
    return dict(
        x=x, cond=c, uncond=u if uncond else None, guidance_scale=scale if uncond else None,
        coeffs=rows.float().to(device), noise=rnd(*shape) if noise else None,
        history=[rnd(*shape) for _ in range(n_hist)], clip_range=None, learned_variance=learned,
        write_denoised=True)


def fp32_tolerance(x, cond, uncond, guidance_scale, coeffs, noise, history, *rest):
    """atol for guided_step's outputs against the twin's float32 arithmetic: the same formula
    per element (CFG combine, x0, clip, ~10 products and sums, one more per history term, the
    noise's std) evaluated in another order or fused (FMA), over terms up to max|coefficient|
    x the largest of |x|, |prediction|, |noise|, |history| (tests/tolerances.py)."""
    def largest(t):
        return 0.0 if t is None else t.double().nan_to_num(0.0, 0.0, 0.0).abs().max().item()
    channels = x.shape[1]
    values = [largest(x), largest(cond[:, :channels]), largest(noise)] + [largest(h) for h in history]
    if uncond is not None:
        u, c = uncond[:, :channels].double(), cond[:, :channels].double()
        s = guidance_scale.double().reshape(-1, *[1] * (x.dim() - 1))
        values += [largest(u), largest(u + s * (c - u))]
    row = coeffs.double().clone()
    row[:, [C.LOGVAR_MAX, C.LOGVAR_MIN]] = 0.0  # log-variances, exponentiated, not multiplied in
    return fp32_bound(max(1.0, largest(row)) * max(1.0, *values), terms=12 + len(history))


def check_against_reference(case, impl=guided_step):
    out, den = impl(case["x"], case["cond"], case["uncond"], case["guidance_scale"],
                    coeffs=case["coeffs"], noise=case["noise"], history=case["history"],
                    clip_range=case["clip_range"], learned_variance=case["learned_variance"],
                    write_denoised=case["write_denoised"])
    ref_out, ref_den = reference.guided_step(*case.values())
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert out.stride() == ref_out.stride(), "output layout differs from the twin's"
    # Reduced precision: both compute in float32 from the same inputs and round once to the
    # storage dtype, an ulp or two apart; near zero, the float32 difference itself.
    atol = fp32_tolerance(*case.values())
    rtol = 0.0 if case["x"].dtype == torch.float32 else dtype_rounding_bound(case["x"].dtype)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    if case["write_denoised"]:
        torch.testing.assert_close(den.float(), ref_den.float(), atol=atol, rtol=rtol)
    else:
        assert den.numel() == 0
    return out, den


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 97, 31), (3, 4, 64, 64), (2, 4, 7), (5, 1, 3, 3, 2)])
def test_shapes_and_dtypes(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    check_against_reference(make_case(shape, dtype, gen=gen))


@needs_ext
@pytest.mark.parametrize("n_hist", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("uncond", [False, True])
@pytest.mark.parametrize("noise", [False, True])
def test_flag_combinations(n_hist, learned, uncond, noise):
    gen = torch.Generator().manual_seed(n_hist)
    case = make_case((2, 3, 17, 9), torch.float32, gen=gen, n_hist=n_hist, learned=learned,
                     uncond=uncond, noise=noise, per_sample_coeffs=n_hist % 2 == 1)
    case["clip_range"] = 1.0 if n_hist % 2 else None
    case["write_denoised"] = noise
    check_against_reference(case)


@needs_ext
@pytest.mark.parametrize("layout", ["cfg_halves", "transposed", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(layout, dtype):
    gen = torch.Generator().manual_seed(1)
    case = make_case((2, 4, 13, 11), dtype, gen=gen, layout=layout, learned=layout == "cfg_halves")
    out, _ = check_against_reference(case)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_ext
def test_wide_cond_without_learned_variance_reads_first_channels():
    gen = torch.Generator().manual_seed(2)
    case = make_case((2, 3, 8, 8), torch.float32, gen=gen, learned=True)
    case["learned_variance"] = False
    check_against_reference(case)


def _sampler_plans():
    plans = {
        "ddim": S.ddim_plan(SD, 20, eta=0.5), "ddpm": S.ddpm_plan(SD, 20), "pndm": S.pndm_plan(SD, 20),
        "euler": S.euler_plan(SD, 20), "euler_a": S.euler_plan(SD, 20, ancestral=True),
        "heun": S.heun_plan(SD, 10), "dpmpp_2m": S.dpmpp_2m_plan(SD, 20),
        "dpmpp_2m_karras": S.dpmpp_2m_plan(SD, 20, karras=True),
        "ddpm_learned": S.ddpm_plan(SchedulerConfig.from_dict(
            dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")), 20),
    }
    return plans


@needs_ext
@pytest.mark.parametrize("name", list(_sampler_plans()))
def test_every_sampler_coefficient_set(name):
    """The op on the rows a real run uses: every step of every sampler."""
    plan = _sampler_plans()[name]
    gen = torch.Generator().manual_seed(3)
    for step in plan.steps:
        n_hist = len(step.history)
        case = make_case((2, 4, 16, 16), torch.float32, gen=gen, n_hist=n_hist,
                         learned=plan.learned_variance, noise=step.noise)
        case["coeffs"] = torch.from_numpy(step.row).float()[None]
        case["clip_range"] = plan.clip_range
        check_against_reference(case)


@needs_ext
def test_nan_propagates_through_clip():
    gen = torch.Generator().manual_seed(4)
    case = make_case((1, 2, 4, 4), torch.float32, gen=gen, n_hist=0)
    case["clip_range"] = 1.0
    case["x"][0, 0, 1, 1] = float("nan")
    out, den = guided_step(case["x"], case["cond"], case["uncond"], case["guidance_scale"], coeffs=case["coeffs"],
                           noise=case["noise"], history=case["history"], clip_range=1.0, write_denoised=True)
    ref_out, ref_den = reference.guided_step(*case.values())
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)) and torch.isnan(out).any()
    assert torch.equal(torch.isnan(den), torch.isnan(ref_den))


@needs_ext
def test_every_output_element_written():
    """Outputs come from torch.empty; poison the allocator's memory first so a skipped
    element would show as a NaN rather than a plausible leftover value."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        poison = torch.full((1 << 20,), float("nan"))
        del poison
        case = make_case((3, 5, 33, 17), torch.float32, gen=gen)
        out, den = check_against_reference(case)  # every value the twin's...
        assert torch.isfinite(out).all() and torch.isfinite(den).all()  # ...and none a NaN left over


@needs_ext
def test_empty_batch():
    x = torch.empty(0, 4, 8, 8)
    out, den = guided_step(x, x, coeffs=torch.zeros(1, C.NUM_FIXED))
    assert out.shape == x.shape and den.numel() == 0


def _base():
    x = torch.randn(2, 4, 8, 8)
    return dict(x=x, cond=torch.randn(2, 4, 8, 8), uncond=torch.randn(2, 4, 8, 8),
                guidance_scale=torch.ones(2), coeffs=torch.zeros(1, C.NUM_FIXED), noise=None,
                history=[], clip_range=None, learned_variance=False, write_denoised=False)


BAD = {
    "cond_shape": (lambda a: a.update(cond=torch.randn(2, 4, 8, 7)), "cond has shape"),
    "cond_batch": (lambda a: a.update(cond=torch.randn(3, 4, 8, 8)), "cond has shape"),
    "uncond_dtype": (lambda a: a.update(uncond=a["uncond"].double()), "dtype"),
    "noise_shape": (lambda a: a.update(noise=torch.randn(2, 4, 8)), "noise has shape"),
    "history_dtype": (lambda a: a.update(history=[a["x"].half()], coeffs=torch.zeros(1, C.NUM_FIXED + 1)), "dtype"),
    "coeffs_width": (lambda a: a.update(history=[a["x"]]), "coeffs must have shape"),
    "coeffs_dtype": (lambda a: a.update(coeffs=a["coeffs"].double()), "coeffs must be float32"),
    "coeffs_rows": (lambda a: a.update(coeffs=torch.zeros(3, C.NUM_FIXED)), "coeffs must have shape"),
    "scale_missing": (lambda a: a.update(guidance_scale=None), "without guidance_scale"),
    "scale_count": (lambda a: a.update(guidance_scale=torch.ones(3)), "guidance_scale must have"),
    "too_much_history": (lambda a: a.update(history=[a["x"]] * 5, coeffs=torch.zeros(1, C.NUM_FIXED + 5)), "at most 4"),
    "learned_needs_2c": (lambda a: a.update(learned_variance=True), "learned_variance needs"),
    "x_int": (lambda a: a.update(x=a["x"].long()), "float32, float16 or bfloat16"),
    "x_1d": (lambda a: a.update(x=torch.randn(4)), r"\[B, C, ...\]"),
    "clip_nonpositive": (lambda a: a.update(clip_range=0.0), "clip_range must be positive"),
}


@needs_ext
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clear_error(case):
    args = _base()
    mutate, message = BAD[case]
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastdiff.guided_step(*args.values())


@needs_ext
def test_device_mismatch_is_rejected():
    if not torch.cuda.is_available():
        args = _base()
        args["cond"] = torch.randn(2, 4, 8, 8, device="meta")
        with pytest.raises(RuntimeError, match="is on"):
            torch.ops.fastdiff.guided_step(*args.values())
    else:
        args = _base()
        args["cond"] = args["cond"].cuda()
        with pytest.raises(RuntimeError, match="is on"):
            torch.ops.fastdiff.guided_step(*args.values())


def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    for kw in [dict(n_hist=2, learned=True), dict(n_hist=0, uncond=False, noise=False),
               dict(n_hist=1, layout="channels_last")]:
        case = make_case((2, 3, 6, 5), torch.float32, gen=gen, **kw)
        torch.library.opcheck(torch.ops.fastdiff.guided_step.default, tuple(case.values()))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(7)
    case = make_case((2, 4, 8, 8), torch.float32, gen=gen, n_hist=1)

    def step(x, cond, uncond, scale, coeffs, noise, h):
        out, den = guided_step(x, cond, uncond, scale, coeffs=coeffs, noise=noise, history=[h],
                               write_denoised=True)
        return out * 2, den

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (case["x"], case["cond"], case["uncond"], case["guidance_scale"], case["coeffs"],
            case["noise"], case["history"][0])
    got, want = compiled(*args), step(*args)
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda_cpp", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "cfg_halves", "channels_last"])
def test_cuda_kernels(impl, dtype, layout):
    if impl == "cuda_cpp" and not _library.extension_has_cuda():
        pytest.fail("CUDA is present but fastdiff._C was built without CUDA kernels; "
                    "rebuild with FASTDIFF_CUDA=1 pip install --no-build-isolation -e .")
    gen = torch.Generator().manual_seed(8)
    for shape in [(1, 3, 97, 31), (3, 4, 64, 64), (2, 4, 7, 5)]:
        for n_hist in (0, 1, 4):
            case = make_case(shape, dtype, gen=gen, device="cuda", n_hist=n_hist, layout=layout,
                             learned=n_hist == 1)
            if impl == "triton":
                from fastdiff.ops.triton.guided_step import guided_step_triton
                impl_fn = lambda x, c, u, s, **kw: guided_step_triton(  # noqa: E731
                    x, c, u, s, kw["coeffs"], kw["noise"], kw["history"], kw["clip_range"],
                    kw["learned_variance"], kw["write_denoised"])
            else:
                impl_fn = lambda x, c, u, s, **kw: torch.ops.fastdiff.guided_step(  # noqa: E731
                    x, c, u, s, kw["coeffs"], kw["noise"], kw["history"], kw["clip_range"],
                    kw["learned_variance"], kw["write_denoised"])
            check_against_reference(case, impl_fn)
