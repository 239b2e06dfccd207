"""VQ-Diffusion, equal to diffusers' VQDiffusionPipeline (Gu et al. 2022; Tang et al. 2022).

Discrete diffusion over the tokens of a VQ-VAE: every token starts as the mask class, a
transformer predicts log p(x0 | x_t) over the codebook from the tokens and the
L2-normalised CLIP text embedding, and ``discrete_step`` fuses the log-space
classifier-free guidance, truncation, q-posterior and Gumbel sampling of each step.
The unconditional half sees the learned null-text embedding when the model ships one
(``learned_classifier_free_sampling_embeddings``, learnable), else the embedding of "".
Same folder, prompt, generator and steps give diffusers' tokens and images.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..loaders import diffusers_folder as folder_io
from ..sampling.discrete import DiscreteScheduleConfig, sample_discrete
from .base import Pipeline, check_prompts, make_generator, to_output

NULL_EMBEDDINGS = "learned_classifier_free_sampling_embeddings"


class VQDiffusionPipeline(Pipeline):
    """Text-to-image by discrete diffusion over VQ-VAE tokens."""

    CLASS_NAMES = ("VQDiffusionPipeline",)
    REQUIRED = ("vqvae", "transformer", "text_encoder", "tokenizer", "scheduler", NULL_EMBEDDINGS)

    def __init__(self, vqvae, transformer, text_encoder, tokenizer, scheduler_config: DiscreteScheduleConfig,
                 null_embeddings: Optional[Tensor] = None):
        """null_embeddings: the learned [L, D] null-text embedding, or None for the embedding of ""."""
        if scheduler_config.num_vec_classes != transformer.num_vector_embeds:
            raise ValueError(f"the scheduler has {scheduler_config.num_vec_classes} classes but the transformer "
                             f"{transformer.num_vector_embeds}; they must agree (codebook size + the mask class)")
        if transformer.num_vector_embeds - 1 != vqvae.num_codes:
            raise ValueError(f"the transformer predicts {transformer.num_vector_embeds - 1} codes but the VQ-VAE's "
                             f"codebook has {vqvae.num_codes}")
        self.vqvae, self.transformer, self.text_encoder, self.tokenizer = vqvae, transformer, text_encoder, tokenizer
        self.scheduler_config = scheduler_config
        self.null_embeddings = null_embeddings

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "VQDiffusionPipeline":
        from ..models.vqvae import VQModel
        from ..models.discrete_transformer import VQDiffusionTransformer

        path = os.fspath(path)
        index = folder_io.read_model_index(path)
        folder_io.check_components(path, index, cls.REQUIRED, "VQ-Diffusion")
        vqvae = folder_io.load_module(VQModel, path, "vqvae", device, dtype)
        transformer = folder_io.load_module(VQDiffusionTransformer, path, "transformer", device, dtype)
        text_encoder = folder_io.load_text_encoder(path, device=device, dtype=dtype)
        tokenizer = folder_io.load_tokenizer(path)
        scheduler_dir = folder_io.component_dir(path, "scheduler")
        config = folder_io.read_json(os.path.join(scheduler_dir, "scheduler_config.json"))
        if config.get("_class_name", "VQDiffusionScheduler") != "VQDiffusionScheduler":
            raise ValueError(f"{scheduler_dir}: scheduler {config.get('_class_name')!r} is not a "
                             f"VQDiffusionScheduler")
        if "num_vec_classes" not in config:
            raise ValueError(f"{scheduler_dir}/scheduler_config.json lacks num_vec_classes")
        null = folder_io.load_learned_null_embeddings(path, NULL_EMBEDDINGS)
        if null is not None:
            null = null.to(device=device, dtype=dtype)
        return cls(vqvae, transformer, text_encoder, tokenizer, DiscreteScheduleConfig.from_dict(config), null)

    def to(self, device=None, dtype=None) -> "VQDiffusionPipeline":
        for module in (self.vqvae, self.transformer, self.text_encoder):
            module.to(device=device, dtype=dtype)
        if self.null_embeddings is not None:
            self.null_embeddings = self.null_embeddings.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def num_tokens(self) -> int:
        return self.transformer.height * self.transformer.width

    @property
    def mask_class(self) -> int:
        return self.transformer.num_vector_embeds - 1

    # ------------------------------------------------------------------ text

    def _embed(self, texts: List[str], max_length: int) -> Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        out = self.text_encoder(ids.to(self.device))[0]
        # As the pipeline: each token's embedding is L2-normalised (CLIP's cosine space).
        return (out / out.norm(dim=-1, keepdim=True)).to(self.dtype)

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str], num_images_per_prompt: int, guided: bool):
        """(prompt embeddings [B, L, D], null embeddings [B, L, D] or None), repeated per image."""
        embeds = self._embed(prompts, self.tokenizer.model_max_length)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if not guided:
            return embeds, None
        if self.null_embeddings is not None:
            null = self.null_embeddings.to(self.device, self.dtype).unsqueeze(0)
        else:  # the zero-shot variant: the empty prompt
            null = self._embed([""], embeds.shape[1])
        if null.shape[1:] != embeds.shape[1:]:
            raise ValueError(f"the learned null embedding has shape {tuple(null.shape[1:])} but the prompt "
                             f"embeddings {tuple(embeds.shape[1:])}")
        return embeds, null.expand_as(embeds)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        num_inference_steps: int = 100,
        guidance_scale: float = 5.0,
        truncation_rate: float = 1.0,
        num_images_per_prompt: int = 1,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        latents: Optional[Tensor] = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Optional[Callable] = None,
    ):
        """Images for `prompt` (a string or a list).

        num_inference_steps: at most the model's training timesteps; fewer run the chain's
            last timesteps, as diffusers does.
        guidance_scale: log-space classifier-free guidance; 1 or less turns it off.
        truncation_rate: keep each token's most likely classes up to this cumulative
            probability, in (0, 1]; 1 keeps every class.
        latents: int64 [B, N] starting tokens (default: every token masked).
        callback: called with a StepInfo after every step (tokens as ``x``, the predicted
            clean tokens as ``x0``).
        """
        prompts = check_prompts(prompt)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if not torch.isfinite(torch.tensor(float(guidance_scale))):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if not 0.0 < float(truncation_rate) <= 1.0:
            raise ValueError(f"truncation_rate must be in (0, 1], got {truncation_rate}")
        T = self.scheduler_config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}] (the model's training "
                             f"timesteps), got {num_inference_steps!r}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"unknown output_type {output_type!r}; valid: pil, np, pt")
        generator = make_generator(seed, generator)

        guided = guidance_scale > 1.0  # as diffusers
        embeds, null = self.encode_prompt(prompts, num_images_per_prompt, guided)
        batch = embeds.shape[0]
        x = self._initial_tokens(batch, latents)
        context = torch.cat([null, embeds]) if guided else embeds  # unconditional half first, as diffusers

        def denoise(tokens: Tensor, t: Tensor):
            model_input = torch.cat([tokens, tokens]) if guided else tokens
            log_p = self.transformer(model_input, encoder_hidden_states=context, timestep=t)
            if not guided:
                return log_p, None
            return log_p[batch:], log_p[:batch]

        x = sample_discrete(denoise, x, self.scheduler_config, num_inference_steps,
                            guidance_scale=guidance_scale if guided else None, truncation_rate=float(truncation_rate),
                            generator=generator, progress=progress, callback=callback)
        decoded = self.vqvae.decode_tokens(x, self.transformer.height, self.transformer.width)
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        return to_output(images, output_type)

    __call__ = generate

    def _initial_tokens(self, batch: int, latents: Optional[Tensor]) -> Tensor:
        if latents is None:
            return torch.full((batch, self.num_tokens), self.mask_class, dtype=torch.int64, device=self.device)
        if tuple(latents.shape) != (batch, self.num_tokens):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {(batch, self.num_tokens)} "
                             f"(images x tokens)")
        if latents.dtype.is_floating_point or latents.dtype == torch.bool or latents.is_complex():
            raise ValueError(f"latents must be integer token indices, got {latents.dtype}")
        if (latents < 0).any() or (latents > self.mask_class).any():
            raise ValueError(f"latents must be token indices in [0, {self.mask_class}] ({self.mask_class} is the "
                             f"mask class)")
        return latents.to(self.device, torch.int64)
