"""fastdiff: a fused, low-level sampler engine for text-to-image diffusion.

    import fastdiff
    fastdiff.backend_info()          # which kernel serves each op on CPU and CUDA (a dict)
    print(fastdiff.describe_backends())  # the same as text, as `fastdiff info` prints it
    fastdiff.sampling.sample(...)    # drive any eps / v / x0 denoiser with a named sampler
    fastdiff.Pipeline.from_pretrained("path/to/sd")  .generate("a prompt")

Names are resolved on first use (PEP 562): `import fastdiff` imports no torch, so the command
line starts (and `fastdiff --help` answers) without it; the kernel layer (fastdiff.ops, which
loads fastdiff._C and registers torch.ops.fastdiff) loads with the first name that needs it.
"""
from ._lazy import lazy_names

__version__ = "0.1.0"

_EXPORTS = {"Pipeline": "pipelines", "GlidePipeline": "pipelines", "StableDiffusionPipeline": "pipelines",
            "VQDiffusionPipeline": "pipelines", "backend_info": "ops", "describe_backends": "ops",
            "set_backend": "ops", "get_backend": "ops"}
# The subpackages `import fastdiff` used to load, reachable as attributes the same way.
_SUBMODULES = ("ops", "sampling", "guidance", "pipelines", "loaders", "models")

__all__ = ["Pipeline", "GlidePipeline", "StableDiffusionPipeline", "VQDiffusionPipeline", "backend_info",
           "describe_backends", "set_backend", "get_backend", "ops", "sampling", "guidance", "__version__"]

__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, _SUBMODULES)
