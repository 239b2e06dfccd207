import os

import pytest
import torch
from deps import require

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



@pytest.fixture(scope="session")
def sd_pipe(tmp_path_factory):
    """A tiny SD 1.x pipeline (random weights in diffusers' format), shared by the graph tests;
    a test that moves or changes it puts it back."""
    require("diffusers")
    import fastdiff
    from sd_fixtures import make_pipeline

    folder = tmp_path_factory.mktemp("sd_graph")
    make_pipeline(str(folder), "sd1")
    return fastdiff.Pipeline.from_pretrained(folder)
