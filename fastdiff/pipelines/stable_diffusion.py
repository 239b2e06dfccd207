"""Latent diffusion / Stable Diffusion 1.x and 2.x, equal to diffusers' StableDiffusionPipeline.

Same folder, prompt, negative prompt, sampler and starting latents give the same
images: the text encoder and tokenizer are transformers' own, the UNet and VAE are
fastdiff's modules loading the same weights, and the loop is fastdiff's fused
sampler (classifier-free guidance as one UNet call on the batch of 2N).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..guidance import ClassifierFreeGuidance
from ..loaders import diffusers_folder as folder_io
from ..sampling import SAMPLERS, SchedulerConfig, sample
from ..sampling.graphs import GraphCache
from .base import Pipeline, check_prompts, make_generator, to_output

SD_SCHEDULER_DEFAULTS = dict(
    _class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", set_alpha_to_one=False,
    skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", clip_sample=False,
)


class StableDiffusionPipeline(Pipeline):
    """Text-to-image (and image-to-image) in the latent space of a KL autoencoder."""

    CLASS_NAMES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: SchedulerConfig):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = scheduler_config
        self.vae_scale_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        # Step graphs of generate(cuda_graph=True), replayed by later calls with the same shapes.
        self.graph_cache = GraphCache()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "StableDiffusionPipeline":
        from ..models import AutoencoderKL, UNet2DConditionModel

        path = os.fspath(path)
        index = folder_io.read_model_index(path)
        folder_io.check_components(path, index, cls.REQUIRED, "Stable Diffusion")
        unet = folder_io.load_module(UNet2DConditionModel, path, "unet", device, dtype)
        vae = folder_io.load_module(AutoencoderKL, path, "vae", device, dtype)
        text_encoder = folder_io.load_text_encoder(path, device=device, dtype=dtype)
        tokenizer = folder_io.load_tokenizer(path)
        scheduler = SchedulerConfig.from_json(os.path.join(folder_io.component_dir(path, "scheduler"),
                                                           "scheduler_config.json"))
        return cls(unet, vae, text_encoder, tokenizer, scheduler)

    @classmethod
    def from_single_file(cls, path, *, config: Optional[str] = None, tokenizer: Optional[str] = None,
                         scheduler_config: Optional[Union[str, dict]] = None, prediction_type: Optional[str] = None,
                         unet_config: Optional[dict] = None, vae_config: Optional[dict] = None,
                         text_encoder_config: Optional[dict] = None, device=None, dtype=None) -> "StableDiffusionPipeline":
        """An original-layout checkpoint (.safetensors / .ckpt) of SD 1.x or 2.x.

        The file holds no tokenizer: name a tokenizer folder, or a diffusers folder of
        the same model via `config`, whose tokenizer, scheduler and model configs are
        then used. Without `config`, the architecture is inferred from the weights
        (`unet_config` / `vae_config` / `text_encoder_config` override what cannot be
        inferred, e.g. GroupNorm group counts, which SD fixes at 32).
        """
        from transformers import CLIPTextConfig, CLIPTextModel

        from ..loaders.single_file import load_single_file
        from ..models import AutoencoderKL, UNet2DConditionModel

        given = {"unet_config": unet_config, "vae_config": vae_config, "text_encoder_config": text_encoder_config}
        if config is not None:
            for name in ("unet", "vae", "text_encoder"):
                cfg_path = os.path.join(folder_io.component_dir(config, name), "config.json")
                given[f"{name}_config"] = {**folder_io.read_json(cfg_path), **(given.get(f"{name}_config") or {})}
            tokenizer = tokenizer or os.path.join(config, "tokenizer")
            if scheduler_config is None:
                scheduler_config = os.path.join(config, "scheduler", "scheduler_config.json")
        if tokenizer is None:
            raise ValueError(f"{path} holds no tokenizer: pass tokenizer=<a CLIP tokenizer folder> "
                             "or config=<a diffusers folder of the same model>")
        converted = load_single_file(path, **{k: v for k, v in given.items() if v is not None})
        configs = dict(converted["configs"])

        def build(module, cfg, state, name):
            model = module.from_config(cfg)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{path}: the {name} weights do not fit its config "
                                 f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
            return model.to(device=device, dtype=dtype).eval()

        unet = build(UNet2DConditionModel, configs["unet"], converted["unet"], "unet")
        vae = build(AutoencoderKL, configs["vae"], converted["vae"], "vae")
        text_cfg = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        missing, unexpected = text_encoder.load_state_dict(converted["text_encoder"], strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{path}: the text encoder weights do not fit its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        text_encoder = text_encoder.to(device=device, dtype=dtype).eval()
        tok = folder_io.load_tokenizer(os.path.dirname(tokenizer), os.path.basename(tokenizer))
        if scheduler_config is None:
            # SD's sampling defaults, over the training schedule the checkpoint's buffers give.
            sched = dict(SD_SCHEDULER_DEFAULTS, **configs.get("scheduler", {}))
            if "trained_betas" in configs.get("scheduler", {}):
                sched.pop("beta_schedule", None)
            if prediction_type is not None:
                sched["prediction_type"] = prediction_type
            scheduler = SchedulerConfig.from_dict(sched)
        elif isinstance(scheduler_config, dict):
            scheduler = SchedulerConfig.from_dict(scheduler_config)
        else:
            scheduler = SchedulerConfig.from_json(scheduler_config)
        return cls(unet, vae, text_encoder, tok, scheduler)

    memory_format = torch.contiguous_format  # of the UNet and VAE, and so of the latents

    def to(self, device=None, dtype=None, memory_format=None) -> "StableDiffusionPipeline":
        """Move and cast the models; ``memory_format=torch.channels_last`` runs the UNet and
        VAE in NHWC (the faster layout for fp16 convolutions on tensor cores)."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        if memory_format is not None:
            if memory_format not in (torch.channels_last, torch.contiguous_format):
                raise ValueError(f"memory_format must be torch.channels_last or torch.contiguous_format, "
                                 f"got {memory_format}")
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

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

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

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Optional[Union[str, Sequence[str]]] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        sampler: Optional[str] = None,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        latents: Optional[Tensor] = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Optional[Callable] = None,
        clip_skip: Optional[int] = None,
        image=None,
        strength: float = 0.8,
        cuda_graph: bool = False,
    ):
        """Images for `prompt` (a string or a list); see the README for every argument.

        cuda_graph=True captures each step (UNet on the CFG batch + guided_step) as a CUDA
        graph and replays it (needs the pipeline on a CUDA device; same images). The graphs
        stay in ``self.graph_cache``: a later call with the same batch, size, sampler and
        weights replays them without capturing again.
        """
        prompts = check_prompts(prompt)
        negative = None
        if negative_prompt is not None:
            negative = check_prompts(negative_prompt, "negative_prompt")
            if len(negative) != len(prompts):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one per prompt")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        sampler = sampler or self.scheduler_config.default_sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if not torch.isfinite(torch.tensor(float(guidance_scale))):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        generator = make_generator(seed, generator)
        height, width = self._check_size(height, width)

        # As diffusers: guidance only for scales above 1.
        guided = guidance_scale > 1.0
        embeds, neg = self.encode_prompt(prompts, negative, num_images_per_prompt, guided, clip_skip)
        batch = embeds.shape[0]
        shape = (batch, self.unet.config["in_channels"], height // self.vae_scale_factor,
                 width // self.vae_scale_factor)

        def unet(x, t, cond):
            return self.unet(x, t, encoder_hidden_states=cond)

        denoiser = ClassifierFreeGuidance(unet, embeds, neg if guided else None, guidance_scale,
                                          uncond_first=True, rescale=guidance_rescale if guided else 0.0)
        config = self.scheduler_config
        graphs = self.graph_cache.scope("unet", self.unet) if cuda_graph else False
        kw = dict(generator=generator, progress=progress, callback=callback, cuda_graph=graphs)
        if sampler == "ddim":
            kw["eta"] = eta
        if image is not None:
            x = self._img2img_start(image, strength, shape, sampler, num_inference_steps, generator, latents, kw)
        else:
            x = self._initial_noise(shape, generator, latents)
        x = sample(sampler, denoiser, x.contiguous(memory_format=self.memory_format), config,
                   num_inference_steps, **kw)
        decoded = self.vae.decode(x / self.vae.scaling_factor)
        images = (decoded / 2 + 0.5).clamp(0, 1)
        return to_output(images, output_type)

    __call__ = generate

    def _check_size(self, height, width):
        default = self.unet.config["sample_size"] * self.vae_scale_factor
        height, width = height or default, width or default
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE's downsampling factor), "
                                 f"got {value}")
        return height, width

    def _initial_noise(self, shape, generator, latents):
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
            if not torch.isfinite(latents).all():
                raise ValueError("latents contain NaN or infinite values")
            return latents.to(self.device, self.dtype)
        device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=device, dtype=self.dtype).to(self.device)

    def _img2img_start(self, image, strength, shape, sampler, steps, generator, latents, kw):
        from ..sampling.img2img import noised_start
        from ..sampling.samplers import _randn

        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        pixels = _image_tensor(image, shape[0], self.device, self.dtype)
        if pixels.shape[-2:] != (shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor):
            raise ValueError(f"image is {tuple(pixels.shape[-2:])}, but height/width ask for "
                             f"{(shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor)}")
        mean, logvar = self.vae.encode(pixels)
        # As diffusers: sample the posterior with the generator, then draw the noise.
        z = mean + torch.exp(0.5 * logvar) * _randn(mean, generator)
        z = z * self.vae.scaling_factor
        noise = self._initial_noise(shape, generator, latents)
        return noised_start(z, noise, sampler, self.scheduler_config, steps, strength, kw)


def _image_tensor(image, batch, device, dtype) -> Tensor:
    """PIL image(s), numpy [H, W, 3] / [B, H, W, 3] in [0, 1], or a tensor [B, 3, H, W] in [0, 1] -> [-1, 1]."""
    import numpy as np

    if isinstance(image, Tensor):
        t = image if image.dim() == 4 else image[None]
    else:
        images = image if isinstance(image, (list, tuple)) else [image]
        arrays = []
        for im in images:
            a = np.asarray(im, dtype=np.float32)
            if a.ndim == 3 and a.max() > 1.0:
                a = a / 255.0
            arrays.append(a[None] if a.ndim == 3 else a)
        t = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"image must have 3 channels (RGB), got shape {tuple(t.shape)}")
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, -1, -1, -1)
    if t.shape[0] != batch:
        raise ValueError(f"{t.shape[0]} images for a batch of {batch}")
    return (t.to(device, dtype) * 2 - 1)
