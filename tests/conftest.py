import os

import pytest
import torch

# Triton decides between compiling and interpreting when a kernel is defined, so the
# interpreter must be chosen before any test imports fastdiff's Triton kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def eager_capture(monkeypatch):
    """run_plan(cuda_graph=...) captures through graphs.EagerCapture (the CPU stand-in for a
    CUDA graph: same static buffers, the body run again as the replay); yields the captures made."""
    from fastdiff.sampling import samplers
    from fastdiff.sampling.graphs import EagerCapture

    made = []

    def factory(device):
        made.append(EagerCapture())
        return made[-1]
    monkeypatch.setattr(samplers, "_capture_factory", factory)
    return made

