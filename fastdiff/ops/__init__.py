"""The kernel layer: each op is a torch.library op with a pure-PyTorch twin.

``fastdiff.ops.guided_step``  fused CFG + sampler update + noise (see coeffs.py)
``fastdiff.ops.discrete_step`` VQ-Diffusion's token step: log-space CFG, truncation, q-posterior, Gumbel
``fastdiff.ops.attention``    flash-style attention (Triton on CUDA, SDPA on CPU)
``fastdiff.ops.group_norm``   GroupNorm + scale-shift + SiLU, fused (C++ on CPU, CUDA C++ / Triton on CUDA)
``fastdiff.ops.reference``    the twins, the oracle for every kernel
"""
from . import _library, coeffs, reference
from ._library import get_backend, set_backend
from .guided_step import guided_step
from .discrete_step import discrete_step
from .attention import attention
from .group_norm import group_norm

__all__ = ["guided_step", "discrete_step", "attention", "group_norm", "reference", "coeffs", "set_backend", "get_backend", "backend_info"]


def backend_info() -> dict:
    """Per op and device, the implementation that runs; plus how the extension loaded."""
    from .attention import implementation as attention_impl
    from .group_norm import implementation as group_norm_impl
    from .discrete_step import implementation as discrete_step_impl
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
            "discrete_step": {"cpu": discrete_step_impl("cpu"), "cuda": discrete_step_impl("cuda")},
            "attention": {"cpu": attention_impl("cpu"), "cuda": attention_impl("cuda")},
            "group_norm": {"cpu": group_norm_impl("cpu"), "cuda": group_norm_impl("cuda")},
        },
    }
