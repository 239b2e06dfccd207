"""Every kind of bad input to every op, over every backend: the same error, type and message.

Each op's arguments are checked once (fastdiff/ops/_checks.py), by the public wrapper before
it picks a backend and by each implementation that can be called on its own: the twin
(reference.py), the Triton wrapper (here under TRITON_INTERPRET=1 on CPU tensors, as on a
GPU) and the fake function torch.compile traces with. A bad call must give one ValueError or
TypeError, the same from each of them, before any work. Float parameters on which a kernel
and its twin would disagree (a NaN scale, truncation rate, clip range or eps) are refused.
"""
import importlib
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read when a Triton kernel is decorated: set before fastdiff.ops.triton.* loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import ops  # noqa: E402
from fastdiff.ops import _dispatch, coeffs as C, reference as R  # noqa: E402
from fastdiff.sampling.discrete import discrete_step_rows  # noqa: E402
from deps import require, under_ci  # noqa: E402
from test_discrete_step import logp_tolerance  # noqa: E402
from test_guided_step import fp32_tolerance  # noqa: E402

NAN, INF = float("nan"), float("inf")
# The public functions take these many arguments positionally; the rest by keyword.
POSITIONAL = {"guided_step": 4, "discrete_step": 4, "attention": 5, "group_norm": 5}


def meta_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# --- valid calls, as ordered dicts in the twin's argument order -----------------------------

def guided_args():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    return dict(x=x, cond=torch.randn(2, 4, 8, 8, generator=gen), uncond=torch.randn(2, 4, 8, 8, generator=gen),
                guidance_scale=torch.full((2,), 7.5), coeffs=torch.rand(1, C.NUM_FIXED, generator=gen),
                noise=torch.randn(2, 4, 8, 8, generator=gen), history=[], clip_range=None,
                learned_variance=False, write_denoised=False)


def discrete_args():
    B, M, N = 2, 8, 5
    gen = torch.Generator().manual_seed(1)
    return dict(x_t=torch.randint(0, M + 1, (B, N), generator=gen),
                cond=torch.log_softmax(torch.randn(B, M, N, generator=gen), 1),
                uncond=torch.log_softmax(torch.randn(B, M, N, generator=gen), 1),
                guidance_scale=torch.tensor([5.0]),
                coeffs=discrete_step_rows(dict(num_vec_classes=M + 1, num_train_timesteps=100))[50],
                noise=torch.rand(B, M + 1, N, generator=gen), truncation_rate=0.86, write_log_probs=True)


def attention_args():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for n in (7, 9, 9))
    return dict(q=q, k=k, v=v, key_padding_mask=torch.ones(2, 9, dtype=torch.bool), scale=0.25)


def group_norm_args():
    gen = torch.Generator().manual_seed(3)
    return dict(x=torch.randn(2, 6, 3, generator=gen), num_groups=3, weight=torch.rand(6, generator=gen),
                bias=torch.rand(6, generator=gen), eps=1e-5, scale=torch.rand(2, 6, generator=gen),
                shift=torch.rand(2, 6, generator=gen), silu=True)


VALID = {"guided_step": guided_args, "discrete_step": discrete_args, "attention": attention_args,
         "group_norm": group_norm_args}


def put(**changes):
    """A mutation: the values in `changes` are functions of the valid arguments."""
    def mutate(args):
        for name, make in changes.items():
            args[name] = make(args)
    return mutate


V, T = ValueError, TypeError

BAD = {
    "guided_step": {
        "x_not_tensor": (put(x=lambda a: 1.0), T, "x must be a torch.Tensor, got float"),
        "x_one_dim": (put(x=lambda a: torch.randn(4)), V, r"x must be \[B, C, \.\.\.\], got shape \[4\]"),
        "x_int": (put(x=lambda a: a["x"].long()), T, "x must be float32, float16 or bfloat16, got torch.int64"),
        # float64 x is no longer refused: the public op serves it on the twin (gradcheck of its
        # backward, tests/test_guided_step_grad.py); the compiled kernels still refuse it.
        # the example: a cond of one sample for two, silently broadcast by the twin
        "cond_batch": (put(cond=lambda a: a["cond"][:1]), V, r"cond has shape \[1, 4, 8, 8\], expected \[2, 4, 8, 8\]"),
        "cond_spatial": (put(cond=lambda a: a["cond"][..., :7]), V, "cond has shape"),
        "cond_channels": (put(cond=lambda a: a["cond"][:, :3]), V, "cond has shape"),
        "cond_not_tensor": (put(cond=lambda a: [1.0]), T, "cond must be a torch.Tensor"),
        "cond_dtype": (put(cond=lambda a: a["cond"].half()), T, "cond has dtype torch.float16 but x has dtype"),
        "cond_device": (put(cond=lambda a: meta_like(a["cond"])), V, "cond is on meta but x is on cpu"),
        "uncond_shape": (put(uncond=lambda a: a["uncond"][..., :1]), V, "uncond has shape"),
        "uncond_dtype": (put(uncond=lambda a: a["uncond"].double()), T, "uncond has dtype"),
        "uncond_device": (put(uncond=lambda a: meta_like(a["uncond"])), V, "uncond is on meta"),
        # the example: noise [2, 4, 8, 1] for x [2, 4, 8, 8]
        "noise_shape": (put(noise=lambda a: a["noise"][..., :1]), V, r"noise has shape \[2, 4, 8, 1\]"),
        "noise_dtype": (put(noise=lambda a: a["noise"].bfloat16()), T, "noise has dtype"),
        "noise_device": (put(noise=lambda a: meta_like(a["noise"])), V, "noise is on meta"),
        "history_tensor": (put(history=lambda a: a["x"]), T, "history must be a list of tensors, got Tensor"),
        "history_count": (put(history=lambda a: [a["x"]] * 5, coeffs=lambda a: torch.zeros(1, C.NUM_FIXED + 5)),
                          V, "at most 4 history tensors, got 5"),
        "history_shape": (put(history=lambda a: [a["x"][:, :2]], coeffs=lambda a: torch.zeros(1, C.NUM_FIXED + 1)),
                          V, "history tensor has shape"),
        "history_dtype": (put(history=lambda a: [a["x"].half()], coeffs=lambda a: torch.zeros(1, C.NUM_FIXED + 1)),
                          T, "history tensor has dtype"),
        "coeffs_width": (put(history=lambda a: [a["x"]]), V, r"coeffs must have shape \[1 or 2, 12\] for 1 history"),
        "coeffs_rows": (put(coeffs=lambda a: torch.zeros(3, C.NUM_FIXED)), V, "coeffs must have shape"),
        "coeffs_one_dim": (put(coeffs=lambda a: torch.zeros(C.NUM_FIXED)), V, "coeffs must have shape"),
        "coeffs_dtype": (put(coeffs=lambda a: a["coeffs"].double()), T, "coeffs must be float32, got torch.float64"),
        "coeffs_device": (put(coeffs=lambda a: meta_like(a["coeffs"])), V, "coeffs is on meta"),
        # the example: an AttributeError from the twin
        "scale_missing": (put(guidance_scale=lambda a: None), V, "uncond given without guidance_scale"),
        "scale_count": (put(guidance_scale=lambda a: torch.ones(3)), V, "guidance_scale must have 1 or 2 elements"),
        "scale_two_dim": (put(guidance_scale=lambda a: torch.ones(2, 1)), V, "guidance_scale must have 1 or 2"),
        "scale_dtype": (put(guidance_scale=lambda a: torch.ones(2, dtype=torch.float64)), T,
                        "guidance_scale must be float32"),
        "scale_device": (put(guidance_scale=lambda a: meta_like(a["guidance_scale"])), V, "guidance_scale is on meta"),
        "learned_needs_2c": (put(learned_variance=lambda a: True), V, "learned_variance needs cond with 2 \\* C = 8"),
        "clip_zero": (put(clip_range=lambda a: 0.0), V, "clip_range must be positive, got 0.0"),
        "clip_negative": (put(clip_range=lambda a: -1.0), V, "clip_range must be positive, got -1.0"),
        "clip_nan": (put(clip_range=lambda a: NAN), V, "clip_range must be positive, got nan"),
        "clip_string": (put(clip_range=lambda a: "1"), T, "clip_range must be a number, got str"),
    },
    "discrete_step": {
        "x_t_float": (put(x_t=lambda a: a["x_t"].float()), T, r"x_t must be an int64 \[B, N\] tensor, got torch.float32"),
        "x_t_three_dim": (put(x_t=lambda a: a["x_t"][None]), V, r"x_t must be an int64 \[B, N\] tensor"),
        "x_t_not_tensor": (put(x_t=lambda a: a["x_t"].tolist()), T, "x_t must be a torch.Tensor, got list"),
        "cond_tokens": (put(cond=lambda a: a["cond"][..., :-1]), V, r"cond has shape \[2, 8, 4\], expected \[B, K-1, N\]"),
        "cond_batch": (put(cond=lambda a: a["cond"][:1]), V, "cond has shape"),
        "cond_dtype": (put(cond=lambda a: a["cond"].double()), T, "cond must be float32, float16 or bfloat16"),
        "cond_device": (put(cond=lambda a: meta_like(a["cond"])), V, "cond is on meta but x_t is on cpu"),
        "uncond_shape": (put(uncond=lambda a: a["uncond"][:, :-1]), V, "uncond has shape"),
        "uncond_dtype": (put(uncond=lambda a: a["uncond"].half()), T, "uncond dtype differs from cond's"),
        "uncond_device": (put(uncond=lambda a: meta_like(a["uncond"])), V, "uncond is on meta"),
        "scale_missing": (put(guidance_scale=lambda a: None), V, "uncond given without guidance_scale"),
        "scale_count": (put(guidance_scale=lambda a: torch.ones(3)), V, "guidance_scale must have 1 or B=2 float32"),
        "scale_dtype": (put(guidance_scale=lambda a: torch.ones(1, dtype=torch.float64)), T,
                        "guidance_scale must have 1 or B=2 float32 values, got torch.float64"),
        "scale_device": (put(guidance_scale=lambda a: meta_like(a["guidance_scale"])), V, "guidance_scale is on meta"),
        "coeffs_width": (put(coeffs=lambda a: a["coeffs"][:, :-1]), V, r"coeffs must have shape \[1 or B, 11\]"),
        "coeffs_rows": (put(coeffs=lambda a: torch.zeros(3, R.DS_NUM_COEFFS)), V, "coeffs must have shape"),
        "coeffs_dtype": (put(coeffs=lambda a: a["coeffs"].double()), T, "coeffs must be float32"),
        "coeffs_device": (put(coeffs=lambda a: meta_like(a["coeffs"])), V, "coeffs is on meta"),
        "noise_classes": (put(noise=lambda a: a["noise"][:, :-1]), V, r"noise has shape \[2, 8, 5\], expected \[B, K, N\]"),
        "noise_dtype": (put(noise=lambda a: a["noise"].half()), T, "noise must be float32"),
        "noise_device": (put(noise=lambda a: meta_like(a["noise"])), V, "noise is on meta"),
        # NaN: the kernels' selection and the twin's sort keep different classes
        "rate_nan": (put(truncation_rate=lambda a: NAN), V, "truncation_rate must be a number >= 0.*got nan"),
        "rate_negative": (put(truncation_rate=lambda a: -0.5), V, "truncation_rate must be a number >= 0"),
        "rate_string": (put(truncation_rate=lambda a: "0.9"), T, "truncation_rate must be a number, got str"),
        "rate_none": (put(truncation_rate=lambda a: None), T, "truncation_rate must be a number, got NoneType"),
    },
    "attention": {
        "q_three_dim": (put(q=lambda a: a["q"][0]), V, r"attention expects \[B, H, L, D\] tensors"),
        "q_not_tensor": (put(q=lambda a: 1), T, "q must be a torch.Tensor, got int"),
        "kv_lengths": (put(k=lambda a: a["k"][:, :, :5]), V, "attention shapes disagree"),
        "head_dims": (put(k=lambda a: a["k"][..., :8], v=lambda a: a["v"][..., :8]), V, "attention shapes disagree"),
        "heads": (put(k=lambda a: a["k"][:, :1], v=lambda a: a["v"][:, :1]), V, "attention shapes disagree"),
        "dtypes": (put(k=lambda a: a["k"].half(), v=lambda a: a["v"].half()), T, "q, k, v must share one floating dtype"),
        "integers": (put(**{n: (lambda a, n=n: a[n].long()) for n in "qkv"}), T, "one floating dtype"),
        "device": (put(k=lambda a: meta_like(a["k"]), v=lambda a: meta_like(a["v"])), V,
                   "q, k, v are on cpu, meta, meta"),
        "mask_shape": (put(key_padding_mask=lambda a: torch.ones(2, 3, dtype=torch.bool)), V,
                       r"key_padding_mask must be \[B, Lk\] = \[2, 9\], got \[2, 3\]"),
        "mask_device": (put(key_padding_mask=lambda a: meta_like(a["key_padding_mask"])), V, "key_padding_mask is on meta"),
        "mask_not_tensor": (put(key_padding_mask=lambda a: [True] * 9), T, "key_padding_mask must be a torch.Tensor"),
        # NaN / inf: the kernels give zeros, the twin NaN; <= 0 is no softmax scale
        "scale_nan": (put(scale=lambda a: NAN), V, "scale must be a positive finite number, got nan"),
        "scale_inf": (put(scale=lambda a: INF), V, "scale must be a positive finite number, got inf"),
        "scale_zero": (put(scale=lambda a: 0.0), V, "scale must be a positive finite number, got 0.0"),
        "scale_negative": (put(scale=lambda a: -0.25), V, "scale must be a positive finite number"),
        "scale_string": (put(scale=lambda a: "0.25"), T, "scale must be a number, got str"),
    },
    "group_norm": {
        "x_not_tensor": (put(x=lambda a: a["x"].numpy()), T, "x must be a torch.Tensor, got ndarray"),
        "x_one_dim": (put(x=lambda a: torch.ones(6)), V, r"x must have shape \[B, C, \*spatial\], got \[6\]"),
        "x_float64": (put(x=lambda a: a["x"].double()), T, "x must be float32, float16 or bfloat16, got torch.float64"),
        "groups_indivisible": (put(num_groups=lambda a: 4), V, r"6 channels are not divisible into 4 groups \(x of shape"),
        "groups_zero": (put(num_groups=lambda a: 0), V, "num_groups must be positive, got 0"),
        "groups_negative": (put(num_groups=lambda a: -3), V, "num_groups must be positive"),
        "groups_float": (put(num_groups=lambda a: 3.0), T, "num_groups must be an int, got float"),
        "eps_nan": (put(eps=lambda a: NAN), V, "eps must be a positive finite number, got nan"),
        "eps_zero": (put(eps=lambda a: 0.0), V, "eps must be a positive finite number, got 0.0"),
        "eps_negative": (put(eps=lambda a: -1e-5), V, "eps must be a positive finite number"),
        "eps_inf": (put(eps=lambda a: INF), V, "eps must be a positive finite number, got inf"),
        "eps_string": (put(eps=lambda a: "1e-5"), T, "eps must be a number, got str"),
        "weight_shape": (put(weight=lambda a: torch.ones(5)), V, r"weight has shape \[5\], expected \[C\] = \[6\]"),
        "bias_two_dim": (put(bias=lambda a: torch.ones(1, 6)), V, "bias has shape"),
        "weight_int": (put(weight=lambda a: torch.ones(6, dtype=torch.int32)), T, "weight must be a floating-point tensor"),
        "weight_device": (put(weight=lambda a: meta_like(a["weight"])), V, "weight is on meta but x is on cpu"),
        "scale_shape": (put(scale=lambda a: torch.ones(2, 7)), V, r"scale has shape \[2, 7\], expected \[B, C\] = \[2, 6\]"),
        "scale_one_dim": (put(scale=lambda a: torch.ones(6)), V, "scale has shape"),
        "shift_rows": (put(shift=lambda a: torch.ones(3, 6)), V, "shift has shape"),
        "shift_device": (put(shift=lambda a: meta_like(a["shift"])), V, "shift is on meta"),
    },
}


# --- the implementations, each called as its users call it ---------------------------------

def public(op, backend):
    def run(**args):
        names = list(args)
        n = POSITIONAL[op]
        fastdiff.set_backend(backend)
        try:
            return getattr(ops, op)(*[args[k] for k in names[:n]], **{k: args[k] for k in names[n:]})
        finally:
            fastdiff.set_backend("auto")
    return run


def twin(op):
    return lambda **args: getattr(R, op)(*args.values())


def fake(op):
    module = importlib.import_module(f"fastdiff.ops.{op}")
    return lambda **args: getattr(module, f"_{op}_fake")(*args.values())


def triton_wrapper(op):
    import importlib
    module = importlib.import_module(f"fastdiff.ops.triton.{op}")
    return lambda **args: getattr(module, f"{op}_triton")(*args.values())


IMPLEMENTATIONS = {
    "reference": lambda op: public(op, "reference"),
    "auto": lambda op: public(op, "auto"),
    "twin": twin,
    "fake": fake,
    "triton": triton_wrapper,
}
if importlib.util.find_spec("triton") is None:
    if under_ci():
        require("triton")  # a failure under CI=true
    del IMPLEMENTATIONS["triton"]  # elsewhere the other implementations are still checked
CASES = [(op, case) for op, cases in BAD.items() for case in cases]


def raised(fn, args):
    with pytest.raises((ValueError, TypeError)) as info:
        fn(**args)
    return info


@pytest.mark.parametrize("op, case", CASES, ids=[f"{op}-{case}" for op, case in CASES])
def test_every_backend_refuses_with_the_same_error(op, case):
    mutate, error, message = BAD[op][case]
    seen = {}
    for name, make in IMPLEMENTATIONS.items():
        args = VALID[op]()
        mutate(args)
        info = raised(make(op), args)
        assert issubclass(info.type, error), (name, info.type)
        assert str(info.value).startswith(f"{op}") and info.match(message), (name, str(info.value))
        assert "\n" not in str(info.value)
        seen[name] = (info.type, str(info.value))
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize("op", list(VALID))
def test_the_valid_calls_run_everywhere(op):
    """The base of every bad case is a call each implementation accepts (the fake included)."""
    for name, make in IMPLEMENTATIONS.items():
        if name == "fake":
            with FakeTensorMode() as mode:
                args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                        for k, v in VALID[op]().items()}
                make(op)(**args)
        else:
            make(op)(**VALID[op]())


def test_errors_are_also_runtime_errors():
    """Callers that caught the kernels' RuntimeError (TORCH_CHECK) still catch these."""
    args = guided_args()
    args["noise"] = args["noise"][..., :1]
    with pytest.raises(RuntimeError, match="noise has shape"):
        R.guided_step(*args.values())


def test_refused_before_any_work(monkeypatch):
    """The public wrapper checks before it reaches any implementation."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("an implementation ran")
    for op in VALID:
        monkeypatch.setattr(_dispatch, "call", must_not_run)
        monkeypatch.setattr(R, op, must_not_run)
        mutate, error, message = next(iter(BAD[op].values()))
        for backend in ("auto", "reference"):
            args = VALID[op]()
            mutate(args)
            with pytest.raises(error, match=message):
                public(op, backend)(**args)


# --- the boundaries that stay valid agree between the op and its twin ----------------------

def test_truncation_rate_edges_agree():
    """0 keeps the most likely class only, and a rate of 1 or more (inf too) keeps every class,
    the same in the op and the twin; only NaN and negative rates are refused."""
    for rate in (0.0, 1.0, 2.0, INF):
        args = discrete_args()
        args["truncation_rate"] = rate
        tokens, logp = ops.discrete_step(*list(args.values())[:4], coeffs=args["coeffs"], noise=args["noise"],
                                         truncation_rate=rate, write_log_probs=True)
        want_tokens, want = R.discrete_step(*args.values())
        assert torch.equal(tokens, want_tokens), rate
        tol = logp_tolerance(args["cond"].shape[1] + 1)
        torch.testing.assert_close(logp, want, atol=tol, rtol=0, equal_nan=True)


def test_infinite_clip_range_is_no_clip():
    args = guided_args()
    want = R.guided_step(*args.values())
    args["clip_range"] = INF
    assert torch.equal(R.guided_step(*args.values())[0], want[0])
    got = ops.guided_step(*list(args.values())[:4], coeffs=args["coeffs"], noise=args["noise"], clip_range=INF)
    torch.testing.assert_close(got[0], want[0], atol=fp32_tolerance(*args.values()), rtol=0)
