"""discrete_step (VQ-Diffusion's token step): twin vs diffusers, kernels vs twin.

The oracle is diffusers' VQDiffusionPipeline (guidance combine, truncate, clamp) +
VQDiffusionScheduler.step with the same generator; the C++ kernel is checked against
the twin over odd class counts, token counts, truncation rates, dtypes and strides.
"""
import pytest
import torch

from fastdiff.ops import _library, reference as R
from fastdiff.ops.discrete_step import discrete_step
from fastdiff.sampling.discrete import (
    DiscreteSchedule,
    DiscreteScheduleConfig,
    discrete_step_rows,
    gumbel_uniform,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import VQDiffusionPipeline, VQDiffusionScheduler  # noqa: E402

needs_ext = pytest.mark.skipif(not _library.has_kernel("discrete_step", "CPU")
                               or not _library.extension_loaded(), reason="fastdiff._C not built")
T = 100
LOGP_TOL = 1e-4


def make_case(B, K, N, *, gen, t=50, guided=True, rate=0.86, dtype=torch.float32, sharp=3.0,
              noise=True, cfg_halves=False, per_sample=False):
    rows = discrete_step_rows(dict(num_vec_classes=K, num_train_timesteps=T))
    coeffs = rows[T - 1 - t]
    if per_sample:  # a different timestep per sample
        coeffs = torch.cat([rows[T - 1 - max(t - i, 0)] for i in range(B)])
    if cfg_halves:  # the two halves of one batched model call, as views
        both = torch.log_softmax(torch.randn(2 * B, K - 1, N, generator=gen) * sharp, 1)
        u, c = both.to(dtype).chunk(2)
    else:
        c = torch.log_softmax(torch.randn(B, K - 1, N, generator=gen) * sharp, 1).to(dtype)
        u = torch.log_softmax(torch.randn(B, K - 1, N, generator=gen) * sharp, 1).to(dtype)
    x = torch.randint(0, K, (B, N), generator=gen)
    x[:, ::3] = K - 1  # a third of the tokens masked
    scale = (torch.rand(B, generator=gen) * 4 + 1) if per_sample else torch.tensor([5.0])
    return dict(x_t=x, cond=c, uncond=u if guided else None, guidance_scale=scale if guided else None,
                coeffs=coeffs, noise=gumbel_uniform(B, K, N, t == 0, gen) if noise else None,
                truncation_rate=rate, write_log_probs=True)


def run_op(case):
    c = dict(case)
    return discrete_step(c.pop("x_t"), c.pop("cond"), c.pop("uncond"), c.pop("guidance_scale"), **c)


def check_kernel(case):
    tokens, logp = run_op(case)
    ref_tokens, ref_logp = R.discrete_step(*case.values())
    assert tokens.dtype == torch.int64 and logp.dtype == torch.float32
    assert logp.shape == ref_logp.shape
    torch.testing.assert_close(logp, ref_logp, atol=LOGP_TOL, rtol=0)
    assert torch.equal(tokens, ref_tokens)


# --- the twin (and the op) against diffusers ------------------------------------------------

def diffusers_step(sched, case, t, gen_seed):
    cond, uncond = case["cond"].float(), case["uncond"]
    if uncond is not None:
        out = uncond.float() + case["guidance_scale"] * (cond - uncond.float())
        out = out - torch.logsumexp(out, dim=1, keepdim=True)
    else:
        out = cond
    if case["truncation_rate"] < 1.0:  # 1.0 is "no truncation" (see truncate_log_probs)
        out = VQDiffusionPipeline.truncate(None, out, case["truncation_rate"])
    out = out.clamp(-70)
    logp = out if t == 0 else sched.q_posterior(out, case["x_t"], t)
    gen = torch.Generator().manual_seed(gen_seed)
    tokens = sched.step(out, t, case["x_t"], generator=gen).prev_sample
    return tokens, logp


@pytest.mark.parametrize("impl", ["twin", "op"])
@pytest.mark.parametrize("K,N", [(97, 33), (4097, 7)])
def test_matches_diffusers(impl, K, N):
    sched = VQDiffusionScheduler(num_vec_classes=K, num_train_timesteps=T)
    gen = torch.Generator().manual_seed(K)
    small = K < 1000  # the full sweep on 97 classes, a corner of it on 4097 (diffusers is slow there)
    for t in (99, 60, 1, 0) if small else (60, 0):
        for rate in (1.0, 0.86):
            for guided in (False, True) if small else (t == 0,):
                for sharp in (3.0, 30.0) if small else (3.0,):
                    case = make_case(2, K, N, gen=gen, t=t, guided=guided, rate=rate, sharp=sharp,
                                     noise=False)
                    case["noise"] = gumbel_uniform(2, K, N, t == 0, torch.Generator().manual_seed(t))
                    want_tokens, want_logp = diffusers_step(sched, case, t, t)
                    fn = R.discrete_step if impl == "twin" else (lambda *a: run_op(dict(zip(case, a))))
                    tokens, logp = fn(*case.values())
                    torch.testing.assert_close(logp[:, :want_logp.shape[1]], want_logp,
                                               atol=LOGP_TOL, rtol=0)
                    assert torch.equal(tokens, want_tokens), (t, rate, guided, sharp)
                    if t == 0:
                        assert torch.isneginf(logp[:, -1]).all()


def test_rate_one_samples_as_diffusers_own_truncate():
    """At rate 1.0 diffusers' truncate drops a rounding tail (classes below ~1e-7); the
    sampled tokens are still diffusers' own, and the kept classes' log-probs agree."""
    K, N = 97, 64
    sched = VQDiffusionScheduler(num_vec_classes=K, num_train_timesteps=T)
    gen = torch.Generator().manual_seed(11)
    for t in (60, 1, 0):
        case = make_case(2, K, N, gen=gen, t=t, rate=1.0, sharp=30.0, noise=False)
        case["noise"] = gumbel_uniform(2, K, N, t == 0, torch.Generator().manual_seed(t))
        out = case["uncond"] + case["guidance_scale"] * (case["cond"] - case["uncond"])
        out = out - torch.logsumexp(out, dim=1, keepdim=True)
        truncated = VQDiffusionPipeline.truncate(None, out, 1.0)
        dropped = torch.isneginf(truncated).any(dim=1)              # tokens that lost a tail
        want = sched.step(truncated.clamp(-70), t, case["x_t"],
                          generator=torch.Generator().manual_seed(t)).prev_sample
        want_logp = truncated.clamp(-70) if t == 0 else sched.q_posterior(
            truncated.clamp(-70), case["x_t"], t)[:, :K - 1]
        kept = ~dropped.unsqueeze(1).expand(-1, K - 1, -1)
        for fn in (R.discrete_step, lambda *a: run_op(dict(zip(case, a)))):
            tokens, logp = fn(*case.values())
            assert torch.equal(tokens, want)
            torch.testing.assert_close(logp[:, :K - 1][kept], want_logp[kept], atol=LOGP_TOL, rtol=0)
        assert dropped.any(), "the case should exercise diffusers' rounding tail"


def test_schedule_rows_match_diffusers_tables():
    sched = VQDiffusionScheduler(num_vec_classes=97, num_train_timesteps=T)
    s = DiscreteSchedule.from_config(DiscreteScheduleConfig(num_vec_classes=97))
    for ours, theirs in [(s.a, sched.log_at), (s.b, sched.log_bt), (s.c, sched.log_ct),
                         (s.a_cum, sched.log_cumprod_at), (s.b_cum, sched.log_cumprod_bt),
                         (s.c_cum, sched.log_cumprod_ct)]:
        torch.testing.assert_close(torch.log(torch.from_numpy(ours)).float(), theirs[:T])
    rows = discrete_step_rows(DiscreteScheduleConfig(num_vec_classes=97), timesteps=[5, 0])
    assert rows.shape == (2, 1, R.DS_NUM_COEFFS) and rows.dtype == torch.float32
    assert rows[0, 0, R.DS_POSTERIOR] == 1 and (rows[1] == 0).all()


# --- the C++ kernel against the twin -------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("K,N", [(97, 1), (97, 33), (97, 130), (4097, 19), (2, 5)])
@pytest.mark.parametrize("rate", [1.0, 0.86, 1e-6, 2.0])
def test_kernel_shapes_and_rates(B, K, N, rate):
    gen = torch.Generator().manual_seed(K + N + B)
    for guided, t in [(True, 50), (False, 1), (True, 0)]:
        check_kernel(make_case(B, K, N, gen=gen, t=t, guided=guided, rate=rate))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_reduced_precision_inputs(dtype):
    # The inputs are rounded once; both sides then compute in float32 from the same values.
    gen = torch.Generator().manual_seed(1)
    check_kernel(make_case(2, 97, 33, gen=gen, dtype=dtype, rate=0.86))


@needs_ext
def test_kernel_strided_per_sample_and_greedy():
    gen = torch.Generator().manual_seed(2)
    check_kernel(make_case(2, 97, 45, gen=gen, cfg_halves=True))
    check_kernel(make_case(3, 97, 21, gen=gen, per_sample=True, t=1))
    check_kernel(make_case(2, 97, 21, gen=gen, noise=False))
    case = make_case(2, 97, 40, gen=gen)
    case["cond"] = case["cond"].transpose(1, 2).contiguous().transpose(1, 2)  # classes innermost
    check_kernel(case)


@needs_ext
def test_kernel_peaked_outputs_at_rate_one():
    """Sharp distributions sum to 1 +- a few ulp, so rate 1.0 truncates a rounding tail
    (as diffusers does); the kernel must drop exactly the same classes."""
    gen = torch.Generator().manual_seed(3)
    for sharp in (10.0, 40.0):
        for guided in (True, False):
            check_kernel(make_case(2, 97, 64, gen=gen, sharp=sharp, rate=1.0, guided=guided, t=2))


@needs_ext
def test_every_output_written():
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        poison = torch.full((1 << 20,), float("nan"))
        del poison
        tokens, logp = run_op(make_case(2, 97, 37, gen=gen))
        assert torch.isfinite(logp).all()
        assert ((tokens >= 0) & (tokens < 97)).all()
    tokens, logp = run_op({**make_case(2, 97, 37, gen=gen), "write_log_probs": False})
    assert logp.numel() == 0 and tokens.shape == (2, 37)


@needs_ext
def test_empty_inputs():
    gen = torch.Generator().manual_seed(5)
    case = make_case(2, 97, 3, gen=gen)
    case.update(x_t=case["x_t"][:, :0], cond=case["cond"][..., :0], uncond=case["uncond"][..., :0],
                noise=case["noise"][..., :0])
    tokens, logp = run_op(case)
    assert tokens.shape == (2, 0) and logp.shape == (2, 97, 0)


BAD = {
    "x_float": (lambda a: a.update(x_t=a["x_t"].float()), "int64"),
    "cond_shape": (lambda a: a.update(cond=a["cond"][:, :, :-1]), "cond has shape"),
    "uncond_dtype": (lambda a: a.update(uncond=a["uncond"].double()), "dtype"),
    "scale_missing": (lambda a: a.update(guidance_scale=None), "without guidance_scale"),
    "coeffs_width": (lambda a: a.update(coeffs=a["coeffs"][:, :-1]), "coeffs must have shape"),
    "coeffs_dtype": (lambda a: a.update(coeffs=a["coeffs"].double()), "coeffs must be float32"),
    "noise_rows": (lambda a: a.update(noise=a["noise"][:, :-1]), "noise has shape"),
}


@needs_ext
@pytest.mark.parametrize("impl", ["twin", "op"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clear_error(impl, case):
    args = make_case(2, 97, 5, gen=torch.Generator().manual_seed(6))
    mutate, message = BAD[case]
    mutate(args)
    fn = R.discrete_step if impl == "twin" else torch.ops.fastdiff.discrete_step
    with pytest.raises(RuntimeError, match=message):
        fn(*args.values())


@needs_ext
def test_out_of_range_token_raises():
    args = make_case(1, 97, 5, gen=torch.Generator().manual_seed(7))
    args["x_t"][0, 1] = 97
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fastdiff.discrete_step(*args.values())


def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    for kw in [dict(), dict(guided=False, noise=False, t=0), dict(cfg_halves=True, per_sample=True)]:
        case = make_case(2, 97, 9, gen=gen, **kw)
        torch.library.opcheck(torch.ops.fastdiff.discrete_step.default, tuple(case.values()))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(9)
    case = make_case(2, 97, 16, gen=gen)

    def step(x, cond, uncond, scale, coeffs, noise):
        tokens, logp = discrete_step(x, cond, uncond, scale, coeffs=coeffs, noise=noise,
                                     truncation_rate=0.86, write_log_probs=True)
        return tokens + 0, logp * 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (case["x_t"], case["cond"], case["uncond"], case["guidance_scale"], case["coeffs"],
            case["noise"])
    got, want = compiled(*args), step(*args)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
