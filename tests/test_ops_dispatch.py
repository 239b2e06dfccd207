"""The one dispatch table (fastdiff/ops/_dispatch.py): what serves each op per backend and
device, the fallbacks it takes (Triton absent, operands a kernel declines), and the
backend_info / describe_backends views of it. No GPU needed: the table is read for "cuda"
with CPU tensors standing in for the operands.
"""
import pytest
import torch

import fastdiff
from fastdiff.ops import _dispatch, _library, reference as R
from deps import require
from test_ops_bad_input import VALID

OPS = ("guided_step", "discrete_step", "attention", "group_norm")


@pytest.fixture
def backend():
    before = _library.get_backend()
    yield fastdiff.set_backend
    fastdiff.set_backend(before)


def test_every_op_is_in_the_table():
    assert set(_dispatch.ops()) == set(OPS)
    assert fastdiff.backend_info()["ops"] == _dispatch.table()


def test_reference_backend_is_the_twin_everywhere(backend):
    backend("reference")
    assert all(impl == "reference" for where in _dispatch.table().values() for impl in where.values())
    for op in OPS:
        assert _dispatch.select(op, "cuda").kernel is _dispatch._OPS[op].twin


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["auto", "triton"])
def test_without_triton_the_next_implementation_serves(op, name, backend, monkeypatch):
    """Every op checks that Triton imports, under the triton backend too (only group_norm did)."""
    backend(name)
    monkeypatch.setattr(_library, "triton_available", lambda: False)
    impl = _dispatch.select(op, "cuda", args=tuple(VALID[op]().values()))
    assert impl.family != _dispatch.TRITON
    want = "CUDA C++" if _dispatch.is_compiled(op, "cuda") else \
        {"attention": "PyTorch SDPA", "group_norm": "PyTorch (eager)"}.get(op, "reference")
    assert impl.name == want == _dispatch.implementation(op, "cuda")


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_puts_triton_first(op, backend):
    require("triton")
    backend("triton")
    assert _dispatch.select(op, "cuda").family == _dispatch.TRITON
    assert _dispatch.select(op, "cpu").family != _dispatch.TRITON  # CPU keeps its kernels


def test_attention_honours_check_supported_under_every_backend(backend):
    require("triton")
    wide = torch.randn(1, 1, 4, 300)  # a head dim past the kernel's MAX_HEAD_DIM
    fp32 = torch.randn(1, 1, 4, 64)
    half = fp32.half()
    for name in ("auto", "triton"):
        backend(name)
        assert _dispatch.select("attention", "cuda", args=(wide, wide, wide, None, None)).name == "PyTorch SDPA"
        assert _dispatch.select("attention", "cuda", args=(half, half, half, None, None)).name == "Triton (flash)"
        # fp32: SDPA by default (FP32_ON_CUDA), the kernel when the triton backend forces it
        got = _dispatch.select("attention", "cuda", args=(fp32, fp32, fp32, None, None)).name
        assert got == ("Triton (flash)" if name == "triton" else "PyTorch SDPA")


def test_discrete_step_past_max_classes_takes_the_next(backend, monkeypatch):
    require("triton")
    from fastdiff.ops.triton import discrete_step as triton_kernel
    args = tuple(VALID["discrete_step"]().values())
    backend("triton")
    assert _dispatch.select("discrete_step", "cuda", args=args).family == _dispatch.TRITON
    monkeypatch.setattr(triton_kernel, "MAX_CLASSES", args[1].shape[1] - 1)
    assert _dispatch.select("discrete_step", "cuda", args=args).family != _dispatch.TRITON


def test_registered_kernels_fill_only_the_empty_keys():
    """torch.ops.fastdiff.attention on CPU has no compiled kernel: the table's SDPA serves it."""
    assert not _dispatch.is_compiled("attention", "cpu")
    args = tuple(VALID["attention"]().values())
    assert torch.equal(torch.ops.fastdiff.attention(*args), _dispatch.select("attention", "cpu").kernel(*args))


def test_backend_info_keeps_its_shape():
    info = fastdiff.backend_info()
    assert {"backend", "extension", "triton", "ops", "gpu"} <= set(info)
    assert {"loaded", "cuda_kernels", "error"} <= set(info["extension"])
    assert all(set(where) == {"cpu", "cuda"} for where in info["ops"].values())


def test_describe_backends_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = fastdiff.describe_backends()
    assert "GPU          none" in text and "what would serve on one" in text
    assert fastdiff.backend_info()["gpu"] is None
    for op, where in _dispatch.table().items():
        line = next(line for line in text.splitlines() if line.startswith(op + " "))
        assert where["cpu"] in line and line.endswith(where["cuda"])


def test_describe_backends_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    text = fastdiff.describe_backends()
    assert "GPU          NVIDIA H100 80GB HBM3" in text and "no GPU" not in text


def test_twins_are_looked_up_when_called(monkeypatch, backend):
    """Monkeypatching reference.<op> (as tests do) reaches the dispatch."""
    calls = []
    monkeypatch.setattr(R, "guided_step", lambda *a: calls.append(a) or "twin")
    assert _dispatch.select("guided_step", "cuda", "reference").kernel() == "twin" and calls
