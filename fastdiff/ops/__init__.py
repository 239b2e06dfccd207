"""The kernel layer: each op is a torch.library op with a pure-PyTorch twin.

``fastdiff.ops.guided_step``  fused CFG + sampler update + noise (see coeffs.py)
``fastdiff.ops.reference``    the twins, the oracle for every kernel
"""
from . import _library, coeffs, reference
from ._library import get_backend, set_backend
from .guided_step import guided_step

__all__ = ["guided_step", "reference", "coeffs", "set_backend", "get_backend", "backend_info"]


def backend_info() -> dict:
    """Per op and device, the implementation that runs; plus how the extension loaded."""
    from .guided_step import implementation

    return {
        "backend": _library.get_backend(),
        "extension": {
            "loaded": _library.extension_loaded(),
            "cuda_kernels": _library.extension_has_cuda(),
            "error": _library.extension_error(),
        },
        "triton": _library.triton_available(),
        "ops": {
            "guided_step": {"cpu": implementation("cpu"), "cuda": implementation("cuda")},
        },
    }
