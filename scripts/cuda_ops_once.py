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


print(fastdiff.backend_info()["ops"])
for d in (40, 80, 88, 160):
    q, k, v = randn(2, 3, 97, d), randn(2, 3, 77, d), randn(2, 3, 77, d)
    mask = torch.rand(2, 77, generator=gen).to(dev) > 0.5
    mask[1] = False
    out = fastdiff.ops.attention(q, k, v, mask)
    torch.testing.assert_close(out.float(), reference.attention(q, k, v, mask).float(), atol=2e-3, rtol=2e-3)

for layout in (torch.contiguous_format, torch.channels_last):
    x = randn(2, 96, 17, 9).contiguous(memory_format=layout)
    w, b, scale, shift = randn(96), randn(96), randn(2, 96), randn(2, 96)
    out = fastdiff.ops.group_norm(x, 32, w, b, 1e-5, scale=scale, shift=shift, silu=True)
    want = reference.group_norm(x, 32, w, b, 1e-5, scale, shift, True)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)

args = make_args((2, 3, 17, 9), torch.float16, n_hist=1)
got = torch.ops.fastdiff.guided_step(*args.values())
want = reference.guided_step(*args.values())
for g, w in zip(got, want):
    torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)

case = make_case(2, 97, 33, gen=torch.Generator().manual_seed(1), device=dev)
tokens, logp = torch.ops.fastdiff.discrete_step(*case.values())
want_tokens, want_logp = reference.discrete_step(*case.values())
assert torch.equal(tokens, want_tokens)
torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)

torch.cuda.synchronize()
print("every op ran once on CUDA and matched its twin")
