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

import types
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..loaders import vq_diffusion as vq_loader
from ..sampling.discrete import DiscreteScheduleConfig, sample_discrete
from ..sampling.noise import Generators
from . import arguments as A
from .base import Pipeline, register_pipeline, to_output


@register_pipeline("VQDiffusionPipeline")
class VQDiffusionPipeline(Pipeline):
    """Text-to-image by discrete diffusion over VQ-VAE tokens."""

    components = ("transformer", "vqvae", "text_encoder", "null_embeddings")

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

    @classmethod
    def load_components(cls, path, *, device=None, dtype=None) -> dict:
        return vq_loader.load_folder(path, device=device, dtype=dtype)

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

    # ------------------------------------------------------------------ arguments

    @property
    def image_size(self):
        """(height, width) of the images: the token grid times the VQ-VAE's upsampling."""
        f = self.vqvae.downsample_factor
        return self.transformer.height * f, self.transformer.width * f

    def family_defaults(self) -> dict:
        """diffusers' VQDiffusionPipeline defaults (100 steps, or every training timestep where a model has fewer)."""
        height, width = self.image_size
        steps = min(100, self.scheduler_config.num_train_timesteps)
        return dict(num_inference_steps=steps, guidance_scale=5.0, truncation_rate=1.0, height=height, width=width)

    def check_family(self, a: types.SimpleNamespace) -> None:
        if a.negative_prompt is not None:
            raise ValueError("VQ-Diffusion takes no negative_prompt: its unconditional half is the learned "
                             "null-text embedding (or the empty prompt's)")
        if a.sampler is not None:
            raise ValueError(f"VQ-Diffusion has one sampler (its discrete diffusion), so sampler must be None, "
                             f"got {a.sampler!r}")
        T = self.scheduler_config.num_train_timesteps
        a.num_inference_steps = A.check_int("num_inference_steps", a.num_inference_steps, low=1, high=T,
                                            what=" (at most the model's training timesteps)")
        A.check_fixed_size("height", a.height, self.image_size[0], "this VQ-Diffusion model")
        A.check_fixed_size("width", a.width, self.image_size[1], "this VQ-Diffusion model")
        a.truncation_rate = A.check_real("truncation_rate", a.truncation_rate, low=0.0, high=1.0, low_open=True)
        a.guided = a.guidance_scale > 1.0  # as diffusers
        a.batch = len(a.prompts) * a.num_images_per_prompt
        if a.latents is not None:
            self._check_latents(a.latents, a.batch)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        *,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt=None,
        sampler: Optional[str] = None,
        seed: Optional[int] = None,
        generator: Optional[Generators] = None,
        num_images_per_prompt: int = 1,
        height: Optional[int] = None,
        width: Optional[int] = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Optional[Callable] = None,
        truncation_rate: Optional[float] = None,
        latents: Optional[Tensor] = None,
    ):
        """Images for `prompt` (a string or a list); every argument after it is a keyword, None
        meaning ``self.defaults`` (diffusers': 100 steps, guidance 5, no truncation), all
        checked before any work.

        num_inference_steps: at most the model's training timesteps; fewer run the chain's
            last timesteps, as diffusers does.
        guidance_scale: log-space classifier-free guidance; as diffusers, only above 1 (at 1
            or below, one plain model call per step).
        negative_prompt / sampler: not VQ-Diffusion's (refused unless None); height / width:
            None or the model's fixed size (``image_size``).
        truncation_rate: keep each token's most likely classes up to this cumulative
            probability, in (0, 1]; 1 keeps every class.
        latents: int64 [B, N] starting tokens (default: every token masked).
        callback: called with a StepInfo after every step (tokens as ``x``, the predicted
            clean tokens as ``x0``).
        """
        a = self.check_arguments(locals())
        guided, batch = a.guided, a.batch
        embeds, null = self.encode_prompt(a.prompts, a.num_images_per_prompt, guided)
        x = self._initial_tokens(batch, latents)
        context = torch.cat([null, embeds]) if guided else embeds  # unconditional half first, as diffusers

        def denoise(tokens: Tensor, t: Tensor):
            model_input = torch.cat([tokens, tokens]) if guided else tokens
            log_p = self.transformer(model_input, encoder_hidden_states=context, timestep=t)
            if not guided:
                return log_p, None
            return log_p[batch:], log_p[:batch]

        x = sample_discrete(denoise, x, self.scheduler_config, a.num_inference_steps,
                            guidance_scale=a.guidance_scale if guided else None, truncation_rate=a.truncation_rate,
                            generator=a.generator, progress=progress, callback=callback)
        decoded = self.vqvae.decode_tokens(x, self.transformer.height, self.transformer.width)
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        return to_output(images, output_type)

    def _check_latents(self, latents, batch: int) -> None:
        if not isinstance(latents, Tensor):
            raise TypeError(f"latents must be a tensor of token indices, got {type(latents).__name__}")
        if tuple(latents.shape) != (batch, self.num_tokens):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {(batch, self.num_tokens)} "
                             f"(images x tokens)")
        if latents.dtype.is_floating_point or latents.dtype == torch.bool or latents.is_complex():
            raise ValueError(f"latents must be integer token indices, got {latents.dtype}")
        if (latents < 0).any() or (latents > self.mask_class).any():
            raise ValueError(f"latents must be token indices in [0, {self.mask_class}] ({self.mask_class} is the "
                             f"mask class)")

    def _initial_tokens(self, batch: int, latents: Optional[Tensor]) -> Tensor:
        if latents is None:
            return torch.full((batch, self.num_tokens), self.mask_class, dtype=torch.int64, device=self.device)
        return latents.to(self.device, torch.int64)
