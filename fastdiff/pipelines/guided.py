"""What the pixel and latent families share of CLIP-steered generation.

``check_clip_guidance`` checks generate()'s ``clip_guidance`` (a fastdiff.guidance.ClipGuidance:
contrastive or spherical-distance) before any work: its sampler has a guidance rule, its
captions pair with the batch, its CLIP's image and text embeddings are equally wide.
``optimize_latents`` is Pipeline.optimize_latents: CLIP-guided optimisation of x_T through a
deterministic chain (fastdiff.guidance.optimize), for the families that say how their chain
runs (``Pipeline.optimization_chain``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..guidance.contrastive import ClipEncoders, ClipGuidance
from ..guidance.optimize import LatentOptimization, check_optimisation, optimize_start
from ..sampling import steps as S


@dataclass
class Chain:
    """What a family hands optimize_latents: the denoiser, unit starting noise, the plan, and
    how a final sample becomes an image in [-1, 1] (the VAE decoder of a latent model)."""

    denoiser: Callable
    x_T: Tensor
    plan: S.Plan
    to_image: Callable[[Tensor], Tensor]
    image_shape: tuple  # of one image, for the CLIP's width check before any work


def check_clip_guidance(guidance, sampler_spec, batch: int, probe: Tensor, t: Optional[Tensor] = None,
                        noised_ok: bool = True) -> None:
    """Refuse, before any work, a clip_guidance generate() cannot run."""
    if guidance is None:
        return
    if not isinstance(guidance, ClipGuidance):
        raise TypeError(f"clip_guidance must be a fastdiff.guidance ContrastiveClipGuidance or SphericalClipGuidance, "
                        f"got {type(guidance).__name__}")
    if not sampler_spec.classifier_guidance:
        raise ValueError(f"CLIP guidance has no rule for sampler {sampler_spec.name!r}; use one whose registry entry "
                         f"has classifier_guidance (e.g. ddpm, ddim)")
    if guidance.clip.noised and not noised_ok:
        raise ValueError("a noised CLIP reads GLIDE's 64 px pixels x_t; a latent model needs a CLIP that reads "
                         "images (it is given the VAE's decoding of each step's predicted x0)")
    guidance.pairs_with(batch)
    guidance.check_images(probe, t)


def target_embeddings(clip: ClipEncoders, prompt) -> Tensor:
    """The caption(s) as unit CLIP text embeddings [P, D], or a given embedding [D] / [P, D] normalised."""
    if isinstance(prompt, Tensor):
        if prompt.dim() not in (1, 2) or not prompt.dtype.is_floating_point or prompt.numel() == 0:
            raise ValueError(f"a text embedding must be a float [width] or [prompts, width] tensor, "
                             f"got {prompt.dtype} {tuple(prompt.shape)}")
        if not torch.isfinite(prompt).all():
            raise ValueError("the text embedding holds NaN or infinite values")
        z = prompt.detach().float().reshape(-1, prompt.shape[-1])
        return z / torch.linalg.norm(z, dim=-1, keepdim=True).clamp_min(1e-12)
    from . import arguments as A

    return clip.text_embeddings(A.check_prompts(prompt))


def optimize_latents(pipe, prompt, *, clip, steps=None, iterations: int = 10, lr: float = 0.05,
                     sampler: str = "ddim", model_prompt=None, guidance_scale: Optional[float] = None,
                     seed=None, generator=None, latents: Optional[Tensor] = None, num_images_per_prompt: int = 1,
                     output_type: str = "pil", progress: bool = True, callback=None,
                     checkpoint: bool = True, to_output: Callable = None) -> LatentOptimization:
    """See Pipeline.optimize_latents; to_output(images in [0, 1], output_type) converts the images."""
    clip = ClipEncoders.of(clip)
    z_text = target_embeddings(clip, prompt)
    if model_prompt is None:
        if isinstance(prompt, Tensor):
            raise ValueError("with a text embedding as the target, give model_prompt: the text the model is "
                             "conditioned on")
        model_prompt = prompt
    given = dict(pipe._signature_defaults(), prompt=model_prompt, num_inference_steps=steps,
                 guidance_scale=guidance_scale, sampler=sampler, seed=seed, generator=generator, latents=latents,
                 num_images_per_prompt=num_images_per_prompt, output_type=output_type, progress=False)
    if "upsample" in given:
        given["upsample"] = False  # the chain is the base model's (GLIDE)
    a = pipe.check_arguments(given)
    chain: Chain = pipe.optimization_chain(a)
    iterations, lr = check_optimisation(chain.plan, iterations, lr)
    batch = chain.x_T.shape[0]
    if z_text.shape[0] not in (1, batch):
        raise ValueError(f"{z_text.shape[0]} target captions for a batch of {batch} images: give one or one per image")
    probe = torch.zeros(1, *chain.image_shape, device=pipe.device)
    with torch.no_grad():
        width = clip.image_embeddings(probe, torch.zeros(1, dtype=torch.long, device=pipe.device)).shape[1]
    if width != z_text.shape[1]:
        raise ValueError(f"the CLIP's image embeddings are {width} wide but the target's text embedding "
                         f"{z_text.shape[1]}: they do not pair")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (or None), got {type(callback).__name__}")
    x, image, distances = optimize_start(chain.denoiser, chain.x_T, chain.plan, clip=clip, z_text=z_text,
                                         to_image=chain.to_image, iterations=iterations, lr=lr,
                                         checkpoint=checkpoint, progress=progress, callback=callback)
    images = to_output(((image.float() + 1) / 2).clamp(0, 1), a.output_type)
    return LatentOptimization(x, images, distances.cpu())
