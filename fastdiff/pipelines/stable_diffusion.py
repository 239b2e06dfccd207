"""Latent diffusion / Stable Diffusion 1.x and 2.x, equal to diffusers' StableDiffusionPipeline.

Same folder, prompt, negative prompt, sampler and starting latents give the same
images: the CLIP text encoder, tokenizer, UNet and VAE are fastdiff's own modules
(models/clip_text.py, loaders/clip_tokenizer.py, ...) loading the same files (a single
file's text encoder is transformers' CLIPTextModel), and the loop is fastdiff's fused
sampler (classifier-free guidance as one UNet call on the batch of 2N).
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..guidance import ClassifierFreeGuidance
from ..guidance.contrastive import predicted_x0
from ..loaders import stable_diffusion as sd_loader
from ..sampling import SchedulerConfig, sample
from ..sampling.graphs import GraphCache
from ..sampling.noise import Generators, randn, randn_like
from ..sampling.registry import check_thresholding
from . import arguments as A
from .base import FOLDER_DEFAULTS_KEY, Pipeline, register_pipeline, to_output
from .guided import Chain, check_clip_guidance
from .images import image_tensor

# The largest side generate() takes, as a multiple of the model's native size: beyond it
# attention's memory (quadratic in the latent pixels) and the run time are out of
# proportion to anything an SD model was trained for (SD 1.5: 4096 px).
MAX_SIZE_FACTOR = 8


@register_pipeline("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
class StableDiffusionPipeline(Pipeline):
    """Text-to-image (and image-to-image) in the latent space of a KL autoencoder."""

    components = ("unet", "vae", "text_encoder")

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: SchedulerConfig):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = scheduler_config
        self.vae_scale_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        # Step graphs of generate(cuda_graph=True), replayed by later calls with the same shapes.
        self.graph_cache = GraphCache()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load_components(cls, path, *, device=None, dtype=None) -> dict:
        return sd_loader.load_folder(path, device=device, dtype=dtype)

    @classmethod
    def from_single_file(cls, path, *, config: Optional[str] = None, tokenizer: Optional[str] = None,
                         scheduler_config: Optional[Union[str, dict]] = None, prediction_type: Optional[str] = None,
                         unet_config: Optional[dict] = None, vae_config: Optional[dict] = None,
                         text_encoder_config: Optional[dict] = None, device=None, dtype=None) -> "StableDiffusionPipeline":
        """An original-layout checkpoint (.safetensors / .ckpt) of SD 1.x or 2.x.

        The file holds no tokenizer: name a tokenizer folder, or a diffusers folder of
        the same model via `config`, whose tokenizer, scheduler and model configs (and
        its model_index.json's ``_fastdiff_defaults``) are then used. Without `config`, the
        architecture is inferred from the weights (`unet_config` / `vae_config` /
        `text_encoder_config` override what cannot be inferred, e.g. GroupNorm group
        counts, which SD fixes at 32).
        """
        parts = sd_loader.load_single_file(
            path, config=config, tokenizer=tokenizer, scheduler_config=scheduler_config,
            prediction_type=prediction_type, unet_config=unet_config, vae_config=vae_config,
            text_encoder_config=text_encoder_config, device=device, dtype=dtype)
        pipe = cls(**parts)
        if config is not None:
            from ..loaders.diffusers_folder import read_model_index

            config = os.fspath(config)
            index = read_model_index(config)
            pipe.set_folder_defaults(index.get(FOLDER_DEFAULTS_KEY), os.path.join(config, "model_index.json"))
        return pipe

    memory_format = torch.contiguous_format  # of the UNet and VAE, and so of the latents

    def to(self, device=None, dtype=None, memory_format=None) -> "StableDiffusionPipeline":
        """Move and cast the models; ``memory_format=torch.channels_last`` runs the UNet and
        VAE in NHWC (the faster layout for fp16 convolutions on tensor cores)."""
        if memory_format is not None and memory_format not in (torch.channels_last, torch.contiguous_format):
            raise ValueError(f"memory_format must be torch.channels_last or torch.contiguous_format, "
                             f"got {memory_format}")
        super().to(device=device, dtype=dtype)
        if memory_format is not None:
            self.unet.to(memory_format=memory_format)
            self.vae.to(memory_format=memory_format)
            self.memory_format = memory_format
        return self

    def fuse_qkv_projections(self) -> "StableDiffusionPipeline":
        """One GEMM for each self-attention's q, k, v and each cross-attention's k, v (for
        inference: the UNet's state dict changes). Same images up to GEMM rounding."""
        from ..models.blocks import Attention

        for module in self.unet.modules():
            if isinstance(module, Attention):
                module.fuse_projections()
        return self

    # ------------------------------------------------------------------ text

    def _embed(self, texts: List[str], clip_skip: Optional[int], max_length: int) -> Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = ids.attention_mask.to(self.device)
        if clip_skip is None:
            out = self.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[0]
        else:
            hidden = self.text_encoder(ids.input_ids.to(self.device), attention_mask=mask,
                                       output_hidden_states=True).hidden_states
            # transformers >= 5.6 flattened CLIPTextModel (no .text_model level).
            final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
            out = final_norm(hidden[-(clip_skip + 1)])
        return out.to(self.dtype)

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str], negative: Optional[List[str]], num_images_per_prompt: int,
                      guided: bool, clip_skip: Optional[int] = None):
        """(prompt embeddings, negative embeddings or None), repeated per image."""
        if clip_skip is not None and not 0 <= clip_skip < self.text_encoder.config.num_hidden_layers:
            raise ValueError(f"clip_skip must be in [0, {self.text_encoder.config.num_hidden_layers - 1}], "
                             f"got {clip_skip}")
        embeds = self._embed(prompts, clip_skip, self.tokenizer.model_max_length)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if not guided:
            return embeds, None
        negative = negative if negative is not None else [""] * len(prompts)
        # As diffusers: the negative prompt's embedding ignores clip_skip.
        neg = self._embed(negative, None, embeds.shape[1]).repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, neg

    # ------------------------------------------------------------------ arguments

    def family_defaults(self) -> dict:
        """diffusers' StableDiffusionPipeline defaults; the sampler is the folder's scheduler's."""
        size = self.unet.config["sample_size"] * self.vae_scale_factor
        return dict(num_inference_steps=50, guidance_scale=7.5, sampler=self.scheduler_config.default_sampler,
                    height=size, width=size, eta=0.0, guidance_rescale=0.0, strength=0.8)

    def check_family(self, a: types.SimpleNamespace) -> None:
        a.spec = spec = A.check_sampler("sampler", a.sampler)
        a.config = self._thresholded_config(a, spec)
        a.num_inference_steps = A.check_steps(a.sampler, a.config, a.num_inference_steps)
        native, f = self.unet.config["sample_size"] * self.vae_scale_factor, self.vae_scale_factor
        a.height, a.width = (A.check_image_size(name, value, multiple=f, largest=MAX_SIZE_FACTOR * native,
                                                native=native)
                             for name, value in (("height", a.height), ("width", a.width)))
        a.eta = A.check_real("eta", a.eta, low=0.0)
        a.guidance_rescale = A.check_real("guidance_rescale", a.guidance_rescale, low=0.0, high=1.0)
        a.strength = A.check_real("strength", a.strength, low=0.0, high=1.0, low_open=True)
        if a.clip_skip is not None:
            layers = self.text_encoder.config.num_hidden_layers
            a.clip_skip = A.check_int("clip_skip", a.clip_skip, low=0, high=layers - 1,
                                      what=f" (the text encoder has {layers} layers)")
        A.check_callback("cond_fn", a.cond_fn)
        if a.cond_fn is not None and not spec.classifier_guidance:
            raise ValueError(f"cond_fn (classifier guidance) has no rule for sampler {a.sampler!r}; use one whose "
                             f"registry entry has classifier_guidance (e.g. ddpm, ddim)")
        # As diffusers: guidance only for scales above 1.
        a.guided = a.guidance_scale > 1.0
        a.batch = len(a.prompts) * a.num_images_per_prompt
        a.shape = (a.batch, self.unet.config["in_channels"], a.height // f, a.width // f)
        check_clip_guidance(a.clip_guidance, spec, a.batch, torch.zeros(1, 3, a.height, a.width, device=self.device),
                            noised_ok=False)
        if a.latents is not None:
            A.check_latents(a.latents, a.shape)
        a.pixels = None
        if a.image is not None:
            if not spec.img2img:
                raise ValueError(f"sampler {a.sampler!r} cannot start part-way, so it cannot run img2img")
            if int(a.num_inference_steps * a.strength) < 1:
                raise ValueError(f"strength {a.strength:g} with {a.num_inference_steps} steps leaves no step to "
                                 f"run; raise strength or num_inference_steps")
            a.pixels = self._image_pixels(a.image, a.batch, (a.height, a.width))
        self._warn_without_effect(a, spec)

    def _thresholded_config(self, a, spec) -> SchedulerConfig:
        """The scheduler config with generate()'s thresholding arguments over the folder's (values
        checked by SchedulerConfig), refused before any work for a sampler without thresholding."""
        given = {k: getattr(a, k) for k in ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
                 if getattr(a, k) is not None}
        config = dataclasses.replace(self.scheduler_config, **given) if given else self.scheduler_config
        if not config.thresholding and set(given) - {"thresholding"}:
            A.warn_no_effect(sorted(set(given) - {"thresholding"})[0], "thresholding is off (thresholding=True "
                             "turns it on)")
        check_thresholding(spec.name, config)
        return config

    @staticmethod
    def _warn_without_effect(a, spec) -> None:
        unguided = f"guidance is off at guidance_scale {a.guidance_scale:g} (it needs a scale above 1)"
        if not a.guided and "negative_prompt" in a.given:
            A.warn_no_effect("negative_prompt", unguided)
        if not a.guided and a.guidance_rescale:
            A.warn_no_effect("guidance_rescale", unguided)
        if "eta" in a.given and a.eta and "eta" not in spec.options:
            A.warn_no_effect("eta", f"sampler {a.sampler!r} takes no eta")
        if "strength" in a.given and a.image is None:
            A.warn_no_effect("strength", "it is img2img's, and no image was given")

    def _image_pixels(self, image, batch: int, size) -> Tensor:
        """img2img's input (see fastdiff/pipelines/images.py) -> [batch, 3, H, W] in [-1, 1]."""
        t = image_tensor(image)
        if tuple(t.shape[-2:]) != tuple(size):
            raise ValueError(f"image is {tuple(t.shape[-2:])}, but height/width ask for {tuple(size)}")
        if t.shape[0] == 1 and batch > 1:
            t = t.expand(batch, -1, -1, -1)
        if t.shape[0] != batch:
            raise ValueError(f"{t.shape[0]} images for a batch of {batch}")
        return t.to(self.device, self.dtype) * 2 - 1

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        *,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Optional[Union[str, Sequence[str]]] = None,
        sampler: Optional[str] = None,
        seed: Optional[int] = None,
        generator: Optional[Generators] = None,
        num_images_per_prompt: int = 1,
        height: Optional[int] = None,
        width: Optional[int] = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Optional[Callable] = None,
        eta: Optional[float] = None,
        guidance_rescale: Optional[float] = None,
        latents: Optional[Tensor] = None,
        clip_skip: Optional[int] = None,
        image=None,
        strength: Optional[float] = None,
        cond_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        clip_guidance=None,
        thresholding: Optional[bool] = None,
        dynamic_thresholding_ratio: Optional[float] = None,
        sample_max_value: Optional[float] = None,
        cuda_graph: bool = False,
    ):
        """Images for `prompt` (a string or a list); see the README for every argument.

        Every argument after `prompt` is a keyword; None means ``self.defaults`` (diffusers'
        defaults, 50 steps at guidance 7.5 on the folder's scheduler, overridden by the
        folder's ``_fastdiff_defaults``). All of them are checked before any work.

        guidance_scale: as diffusers, classifier-free guidance runs only for scales above 1
            (at 1 or below, one UNet call per step on the prompt alone, and a negative
            prompt has no effect: a warning says so).
        height / width: multiples of the VAE's factor (8), up to MAX_SIZE_FACTOR times the
            model's native size.
        eta: DDIM's noise (>= 0); a sampler that takes none warns.
        generator: a torch.Generator, or a list of one per image (diffusers' convention): image i's
            noise, initial and at every stochastic step, then comes from generator i alone, so it
            does not depend on the batch (fastdiff.sampling.noise).
        image / strength: img2img (see fastdiff/pipelines/images.py for what an image may
            be: floats in [0, 1], uint8 in 0-255, a path...), strength in (0, 1].
        cond_fn(x, t) -> gradient: classifier guidance, for samplers whose registry entry
            has classifier_guidance (others refuse it).
        clip_guidance: a fastdiff.guidance ContrastiveClipGuidance (target + distractor captions,
            reference 003) or SphericalClipGuidance; its CLIP reads the VAE's decoding of each
            step's predicted x0, differentiated through the UNet, the decoder and CLIP.
        thresholding / dynamic_thresholding_ratio / sample_max_value: Imagen's dynamic thresholding
            (diffusers' scheduler keys, which a folder's scheduler_config.json may also set): per
            image, s = clamp(the ratio-quantile of |x0|, 1, sample_max_value), x0 clipped to
            [-s, s] and divided by s before the update (ddpm, ddim, dpmpp_2m samplers).
        cuda_graph=True captures each step (UNet on the CFG batch + guided_step) as a CUDA
            graph and replays it (needs the pipeline on a CUDA device; same images). The
            graphs stay in ``self.graph_cache``: a later call with the same batch, size,
            sampler and weights replays them without capturing again.
        """
        a = self.check_arguments(locals())
        embeds, neg = self.encode_prompt(a.prompts, a.negative_prompts, a.num_images_per_prompt, a.guided,
                                         a.clip_skip)

        def unet(x, t, cond):
            return self.unet(x, t, encoder_hidden_states=cond)

        denoiser = ClassifierFreeGuidance(unet, embeds, neg if a.guided else None, a.guidance_scale,
                                          uncond_first=True, rescale=a.guidance_rescale if a.guided else 0.0)
        graphs = self.graph_cache.scope("unet", self.unet) if cuda_graph else False
        kw = dict(generator=a.generator, progress=progress, callback=callback, cuda_graph=graphs)
        if "eta" in a.spec.options:
            kw["eta"] = a.eta
        guidance_fn = self._guidance_fn(denoiser, a, cond_fn)
        if guidance_fn is not None:
            kw["cond_fn"] = guidance_fn
        if a.pixels is not None:
            x = self._img2img_start(a, kw)
        else:
            x = self._initial_noise(a.shape, a.generator, latents)
        x = sample(a.sampler, denoiser, x.contiguous(memory_format=self.memory_format), a.config,
                   a.num_inference_steps, **kw)
        images = (self._decode(x) / 2 + 0.5).clamp(0, 1)
        return to_output(images, output_type)

    def _decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents.to(self.dtype) / self.vae.scaling_factor)

    def _guidance_fn(self, denoiser, a, cond_fn):
        """cond_fn, clip_guidance's gradient, or their sum."""
        if a.clip_guidance is None:
            return cond_fn
        prediction_type = a.config.resolved(a.sampler).prediction_type
        x0 = predicted_x0(denoiser, prediction_type, self.unet.config["in_channels"], self.dtype)
        clip_fn = a.clip_guidance.cond_fn(lambda x, t, alpha_bar: self._decode(x0(x, t, alpha_bar)))
        if cond_fn is None:
            return clip_fn

        def both(x, t, alpha_bar=None, **kwargs):
            return clip_fn(x, t, alpha_bar=alpha_bar) + cond_fn(x, t)
        both.needs_alpha_bar = True
        return both

    def optimization_chain(self, a) -> Chain:
        """optimize_latents' chain: the UNet under CFG on the prompt, the sampler's plan, the VAE decoder."""
        from ..sampling.samplers import build_plan

        embeds, neg = self.encode_prompt(a.prompts, a.negative_prompts, a.num_images_per_prompt, a.guided,
                                         a.clip_skip)

        def unet(x, t, cond):
            return self.unet(x.to(self.dtype), t, encoder_hidden_states=cond)

        denoiser = ClassifierFreeGuidance(unet, embeds, neg if a.guided else None, a.guidance_scale,
                                          uncond_first=True, rescale=a.guidance_rescale if a.guided else 0.0)
        options = {"eta": a.eta} if "eta" in a.spec.options else {}
        plan = build_plan(a.sampler, a.config, a.num_inference_steps, **options)
        x = self._initial_noise(a.shape, a.generator, a.latents).float()
        return Chain(denoiser, x, plan, lambda z: self._decode(z).float(), (3, a.height, a.width))

    def _initial_noise(self, shape, generator, latents):
        if latents is not None:
            return latents.to(self.device, self.dtype)
        return randn(shape, generator=generator, device=self.device, dtype=self.dtype)

    def _img2img_start(self, a, kw):
        from ..sampling.img2img import noised_start

        mean, logvar = self.vae.encode(a.pixels)
        # As diffusers: sample the posterior with the generator, then draw the noise.
        z = mean + torch.exp(0.5 * logvar) * randn_like(mean, a.generator)
        z = z * self.vae.scaling_factor
        noise = self._initial_noise(a.shape, a.generator, a.latents)
        return noised_start(z, noise, a.sampler, a.config, a.num_inference_steps, a.strength, kw)
