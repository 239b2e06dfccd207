"""Calls every fastdiff op once on CUDA with odd shapes, for compute-sanitizer (scripts/gpu_check.sh).

Each call is checked against its twin as well, so a kernel that reads or writes out of
bounds, or computes garbage, fails here.
"""
import os
import sys

import torch

import fastdiff
from fastdiff.ops import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_discrete_step import make_case  # noqa: E402
from test_guided_step_triton import make_args  # noqa: E402

assert torch.cuda.is_available(), "needs a CUDA device"
dev, gen = "cuda", torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float16):
    return torch.randn(*shape, generator=gen).to(dev, dtype)


def attention_once():
    for d in (40, 80, 88, 160):
        q, k, v = randn(2, 3, 97, d), randn(2, 3, 77, d), randn(2, 3, 77, d)
        mask = torch.rand(2, 77, generator=gen).to(dev) > 0.5
        mask[1] = False
        out = fastdiff.ops.attention(q, k, v, mask)
        torch.testing.assert_close(out.float(), reference.attention(q, k, v, mask).float(), atol=2e-3, rtol=2e-3)


def group_norm_once():
    for layout in (torch.contiguous_format, torch.channels_last):
        for param_dtype in (torch.float16, torch.float32):
            x = randn(2, 96, 17, 9).contiguous(memory_format=layout)
            w, b = randn(96, dtype=param_dtype), randn(96, dtype=param_dtype)
            scale, shift = randn(2, 96, dtype=param_dtype), randn(2, 96, dtype=param_dtype)
            out = fastdiff.ops.group_norm(x, 32, w, b, 1e-5, scale=scale, shift=shift, silu=True)
            want = reference.group_norm(x, 32, w, b, 1e-5, scale, shift, True)
            torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    x = randn(3, 64, 5, 7)[:, :, 1:, 1:]  # a strided view: read through a copy
    out = fastdiff.ops.group_norm(x, 32, None, None, 1e-5, silu=False)
    torch.testing.assert_close(out.float(), reference.group_norm(x, 32, None, None, 1e-5, None, None, False).float(),
                               atol=2e-2, rtol=2e-2)


def guided_step_once():
    for n_hist in (0, 1, 3):
        args = make_args((2, 3, 17, 9), torch.float16, n_hist=n_hist)
        got = fastdiff.ops.guided_step(**args)  # through the wrapper, which honours the backend
        want = reference.guided_step(*args.values())
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def discrete_step_once():
    case = make_case(2, 97, 33, gen=torch.Generator().manual_seed(1), device=dev)
    tokens, logp = fastdiff.ops.discrete_step(**case)
    want_tokens, want_logp = reference.discrete_step(*case.values())
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)


# Each op on every GPU implementation: the CUDA C++ kernels (backend "auto" where the
# extension has them), then the Triton kernels (backend "triton").
for backend in ("auto", "triton"):
    fastdiff.set_backend(backend)
    print("backend", backend, fastdiff.backend_info()["ops"])
    attention_once()
    group_norm_once()
    guided_step_once()
    discrete_step_once()
    torch.cuda.synchronize()
fastdiff.set_backend("auto")
print("every op ran once on CUDA on each implementation and matched its twin")
