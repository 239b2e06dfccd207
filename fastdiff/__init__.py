"""fastdiff: a fused, low-level sampler engine for text-to-image diffusion.

    import fastdiff
    fastdiff.backend_info()          # which kernel serves each op on CPU and CUDA (a dict)
    print(fastdiff.describe_backends())  # the same as text, as `fastdiff info` prints it
    fastdiff.sampling.sample(...)    # drive any eps / v / x0 denoiser with a named sampler
    fastdiff.Pipeline.from_pretrained("path/to/sd")  .generate("a prompt")
"""
from .ops import backend_info, describe_backends, get_backend, set_backend
from . import ops, sampling, guidance
from .pipelines import GlidePipeline, Pipeline, StableDiffusionPipeline, VQDiffusionPipeline

__version__ = "0.1.0"
__all__ = ["Pipeline", "GlidePipeline", "StableDiffusionPipeline", "VQDiffusionPipeline", "backend_info", "describe_backends", "set_backend", "get_backend", "ops", "sampling", "guidance", "__version__"]
