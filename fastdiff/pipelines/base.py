"""What every fastdiff pipeline shares: the components, devices, loading by folder, the
argument check, the defaults and output conversion.

A family file (stable_diffusion.py, vq_diffusion.py, glide.py) holds only what is its own:
its components' names, its defaults, the checks of its own arguments and its sampling
loop. Families register under the ``_class_name`` their diffusers folders carry in
model_index.json (``PIPELINES``), which is how ``Pipeline.from_pretrained`` picks one;
this module imports none of them.
"""
from __future__ import annotations

import importlib
import inspect
import os
import types
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import arguments as A

# model_index.json `_class_name` -> the pipeline class that reads such folders (filled by
# @register_pipeline in the family modules, which fastdiff/pipelines/__init__.py imports).
PIPELINES: Dict[str, type] = {}
# The key of model_index.json under which a model folder gives its own best defaults.
FOLDER_DEFAULTS_KEY = "_fastdiff_defaults"

# runtime= of from_pretrained -> (module, function) that builds such a pipeline, imported by
# name on first use (the exporter sits above this layer: it imports the pipelines it exports).
RUNTIMES: Dict[str, Optional[Tuple[str, str]]] = {"torch": None,
                                                  "onnxruntime": ("fastdiff.export.cache", "onnx_pipeline")}

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "default_model")


def register_pipeline(*class_names: str):
    """Class decorator: the family reads folders whose model_index.json names one of `class_names`."""
    def register(cls):
        for name in class_names:
            PIPELINES[name] = cls
        cls.model_index_names = tuple(class_names)
        return cls
    return register


def to_output(images: Tensor, output_type: str):
    """images [B, 3, H, W] in [0, 1] -> PIL list, numpy [B, H, W, 3] float32, or the tensor."""
    A.check_output_type(output_type)
    if output_type == "pt":
        return images
    array = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


class _PipelineFactory(type):
    """``fastdiff.Pipeline()`` with no arguments loads the model shipped inside the package."""

    def __call__(cls, *args, **kwargs):
        if cls is Pipeline:
            if args:
                raise TypeError("fastdiff.Pipeline() takes no positional arguments; use "
                                "fastdiff.Pipeline.from_pretrained(path) for a model on disk")
            if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")):
                raise FileNotFoundError(
                    f"the built-in default model is missing from this install ({DEFAULT_MODEL}); "
                    "use fastdiff.Pipeline.from_pretrained(path) with a model folder")
            return cls.from_pretrained(DEFAULT_MODEL, **kwargs)
        return super().__call__(*args, **kwargs)


class Pipeline(metaclass=_PipelineFactory):
    """Entry point: ``fastdiff.Pipeline.from_pretrained(path)`` returns the right pipeline;
    ``fastdiff.Pipeline()`` the built-in default model (device=, dtype= accepted).

    A family names its parts in ``components`` (nn.Modules, or tensors such as a learned
    embedding; the first is the one whose parameters say the device and dtype) and its
    defaults in ``family_defaults``; generate() starts with ``check_arguments``.
    """

    components: Tuple[str, ...] = ()
    # Components kept in float32 whatever dtype the rest is cast to (GLIDE's noised CLIP,
    # whose gradient is taken in float32).
    float32_components: Tuple[str, ...] = ()
    model_index_names: Tuple[str, ...] = ()
    reads_folders = True  # False for a family registered only to be found (GLIDE: checkpoints, no folder)
    # The folder's own defaults (model_index.json `_fastdiff_defaults`), over family_defaults().
    folder_defaults: Mapping[str, Any] = types.MappingProxyType({})

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device=None, dtype=None, *, runtime: str = "torch",
                        cache_dir: Optional[Union[str, os.PathLike]] = None, progress=True) -> "Pipeline":
        """A diffusers folder (the family from its model_index.json), or an SD single file.

        runtime="torch" (the default) runs fastdiff's PyTorch modules. runtime="onnxruntime"
        runs the text encoder, denoiser and decoder in ONNX Runtime under the same sampling
        loop (the same images within float32's rounding): the model is exported once
        (fastdiff.export.onnx, each graph checked) into a cache keyed by its files and the
        library versions (fastdiff/export/cache.py; `cache_dir`, else $FASTDIFF_CACHE), and
        later loads open that export directly. On a CPU it is the faster route at SD 1.5's
        size (benchmarks/RESULTS.md). progress: the export's lines on stderr (True), to a
        callable, or none (False)."""
        from ..loaders.diffusers_folder import read_model_index

        if not isinstance(runtime, str) or runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(map(repr, RUNTIMES))}, got {runtime!r}")
        if runtime != "torch":
            module, function = RUNTIMES[runtime]
            build = getattr(importlib.import_module(module), function)
            return build(cls, path, device=device, dtype=dtype, cache_dir=cache_dir, progress=progress)
        if cache_dir is not None:
            raise ValueError("cache_dir is for runtime='onnxruntime' (where its exports are kept)")
        path = os.fspath(path)
        if os.path.isfile(path):
            family = cls._family("StableDiffusionPipeline", path)
            return family.from_single_file(path, device=device, dtype=dtype)
        index = read_model_index(path)
        family = cls._family(index.get("_class_name"), path)
        pipe = family(**family.load_components(path, device=device, dtype=dtype))
        pipe.set_folder_defaults(index.get(FOLDER_DEFAULTS_KEY), os.path.join(path, "model_index.json"))
        return pipe

    @classmethod
    def _family(cls, name, path: str) -> type:
        family = PIPELINES.get(name)
        if family is None:
            known = ", ".join(n for n, c in PIPELINES.items() if c.reads_folders)
            raise ValueError(f"{path}: pipeline class {name!r} is not supported; fastdiff reads {known} folders")
        if not issubclass(family, cls):
            raise ValueError(f"{path} holds a {name}, not a {cls.__name__} (use fastdiff.Pipeline.from_pretrained)")
        return family

    @classmethod
    def load_components(cls, path: str, *, device=None, dtype=None) -> Dict[str, Any]:
        """The keyword arguments of cls(...) read from a folder (the family's loader)."""
        raise ValueError(f"{path}: {cls.__name__} does not load from a diffusers folder")

    @classmethod
    def from_onnx(cls, path: Union[str, os.PathLike], providers=None) -> "Pipeline":
        """A folder written by fastdiff.export.onnx (any family), its networks in ONNX Runtime
        (`providers`: ONNX Runtime execution providers, default the CPU's); see pipelines/onnx.py."""
        from ..loaders.diffusers_folder import read_model_index

        path = os.fspath(path)
        index = read_model_index(path)
        family = PIPELINES.get(index.get("_class_name"))
        if family is None or not getattr(family, "is_onnx", False):
            onnx_names = ", ".join(n for n, c in PIPELINES.items() if getattr(c, "is_onnx", False))
            raise ValueError(f"{path}: not an exported ONNX folder (model_index.json names "
                             f"{index.get('_class_name')!r}, not one of {onnx_names}); write one with "
                             f"fastdiff.export.onnx")
        if not issubclass(family, cls):
            raise ValueError(f"{path} holds a {family.__name__}, not a {cls.__name__} (use fastdiff.Pipeline.from_onnx)")
        pipe = family(**family.load_components(path, providers=providers))
        pipe.set_folder_defaults(index.get(FOLDER_DEFAULTS_KEY), os.path.join(path, "model_index.json"))
        return pipe

    @classmethod
    def from_glide(cls, base, upsampler=None, *, tokenizer, inpaint: bool = False, clip=None, options=None,
                   upsampler_options=None, device=None, dtype=None) -> "Pipeline":
        """GLIDE from glide-text2im checkpoints (see GlidePipeline.from_glide)."""
        family = PIPELINES["GlidePipeline"]
        return family.from_glide(base, upsampler, tokenizer=tokenizer, inpaint=inpaint, clip=clip,
                                 options=options, upsampler_options=upsampler_options, device=device, dtype=dtype)

    # ------------------------------------------------------------------ devices

    def to(self, device=None, dtype=None) -> "Pipeline":
        """Move every component to `device` and cast it to `dtype` (float32_components keep float32)."""
        for name in self.components:
            part = getattr(self, name)
            cast = None if name in self.float32_components else dtype
            if isinstance(part, Tensor):
                setattr(self, name, part.to(device=device, dtype=cast))
            elif part is not None:
                part.to(device=device, dtype=cast)
        return self

    @property
    def _main(self) -> torch.nn.Module:
        return getattr(self, self.components[0])

    @property
    def device(self) -> torch.device:
        return next(self._main.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._main.parameters()).dtype

    # ------------------------------------------------------------------ defaults and arguments

    def family_defaults(self) -> Dict[str, Any]:
        """The family's own defaults (its reference implementation's), before the folder's."""
        return {}

    @property
    def defaults(self) -> Dict[str, Any]:
        """What generate() uses for every argument left None: the family's defaults, overridden
        by the model folder's ``"_fastdiff_defaults"`` in model_index.json. The CLI passes
        only what the user typed, so the API and the CLI share these."""
        return {**self.family_defaults(), **self.folder_defaults}

    def set_folder_defaults(self, given: Optional[Mapping[str, Any]], source: str) -> None:
        """Take a folder's `_fastdiff_defaults` (checked now, so a bad one fails at load naming `source`)."""
        if given is None:
            return
        if not isinstance(given, Mapping):
            raise ValueError(f"{source}: {FOLDER_DEFAULTS_KEY} must be a JSON object, got {type(given).__name__}")
        unknown = sorted(set(given) - set(self.family_defaults()))
        if unknown:
            raise ValueError(f"{source}: {FOLDER_DEFAULTS_KEY} has unknown keys {unknown}; valid: "
                             f"{', '.join(self.family_defaults())}")
        previous, self.folder_defaults = self.folder_defaults, types.MappingProxyType(dict(given))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.check_arguments(self._signature_defaults())
        except (TypeError, ValueError) as exc:
            self.folder_defaults = previous
            raise ValueError(f"{source}: {FOLDER_DEFAULTS_KEY}: {exc}") from None

    def check_arguments(self, given: Mapping[str, Any]) -> types.SimpleNamespace:
        """generate()'s arguments, checked before any work: None -> ``self.defaults``, then the
        checks every family shares, then ``check_family``. Returns them resolved, with
        ``prompts`` (a list), ``negative_prompts`` and ``generator`` added, and ``given``,
        the names the caller did not leave None (for the warnings about arguments without effect)."""
        given = {k: v for k, v in given.items() if k not in ("self", "__class__")}
        a = types.SimpleNamespace(**given)
        a.given = frozenset(k for k, v in given.items() if v is not None)
        for key, value in self.defaults.items():
            if getattr(a, key, None) is None and key in given:
                setattr(a, key, value)
        A.check_output_type(a.output_type)
        a.prompts = A.check_prompts(a.prompt)
        a.negative_prompts = A.check_negative_prompts(a.negative_prompt, a.prompts)
        a.num_images_per_prompt = A.check_int("num_images_per_prompt", a.num_images_per_prompt)
        a.guidance_scale = A.check_real("guidance_scale", a.guidance_scale)
        a.generator = A.make_generator(a.seed, a.generator, len(a.prompts) * a.num_images_per_prompt)
        A.check_callback("callback", a.callback)
        self.check_family(a)
        return a

    def _signature_defaults(self) -> Dict[str, Any]:
        """generate()'s arguments as a call with a prompt and nothing else would pass them."""
        params = inspect.signature(self.generate).parameters
        given = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
        return dict(given, prompt="a check of the defaults")

    def check_family(self, a: types.SimpleNamespace) -> None:
        """The family's own checks (sampler, steps, size, its keywords); may resolve values on `a`."""

    # ------------------------------------------------------------------ generation

    def generate(self, prompt, **kwargs):
        raise NotImplementedError

    def optimize_latents(self, prompt, *, clip, steps=None, iterations: int = 10, lr: float = 0.05,
                         sampler: str = "ddim", model_prompt=None, guidance_scale: Optional[float] = None,
                         seed=None, generator=None, latents: Optional[Tensor] = None,
                         num_images_per_prompt: int = 1, output_type: str = "pil", progress: bool = True,
                         callback=None, checkpoint: bool = True):
        """CLIP-guided optimisation of the starting noise x_T (reference 003, after DiffusionCLIP).

        Runs the deterministic chain of `sampler` (DDIM at eta 0 by default; a sampler that
        draws noise is refused) over `steps` steps from x_T, and takes `iterations` Adam steps
        (learning rate `lr`) on x_T that lower the CLIP cosine distance between the final image
        and `prompt` (a caption, one per image, or a CLIP text embedding [D] / [B, D]). Every step
        is checkpointed, so memory does not grow with `steps`. `clip`: a CLIP-like pair
        (fastdiff.guidance.ClipEncoders.of: a module with encode_image / encode_text, GLIDE's
        noised CLIP, or two callables). The model is conditioned on `model_prompt` (default:
        the caption) at `guidance_scale` (default: generate()'s); seed / generator / latents
        give x_T as in generate(). callback(iteration, distances) after each update.

        Returns a ``LatentOptimization``: the optimised ``latents`` (generate(latents=...)
        reproduces its images), the ``images``, and the ``distances`` [iterations + 1, B]."""
        from .guided import optimize_latents

        return optimize_latents(self, prompt, clip=clip, steps=steps, iterations=iterations, lr=lr, sampler=sampler,
                                model_prompt=model_prompt, guidance_scale=guidance_scale, seed=seed,
                                generator=generator, latents=latents, num_images_per_prompt=num_images_per_prompt,
                                output_type=output_type, progress=progress, callback=callback, checkpoint=checkpoint,
                                to_output=to_output)

    def optimization_chain(self, a: types.SimpleNamespace):
        """The family's deterministic chain for optimize_latents (a guided.Chain), from checked arguments."""
        raise ValueError(f"{type(self).__name__} has no continuous starting noise to optimise: x_T optimisation is "
                         f"for the pixel (GLIDE) and latent (Stable Diffusion) families")

    def __call__(self, *args, **kwargs):
        return self.generate(*args, **kwargs)
