"""CLIP guidance for GLIDE (Nichol et al. 2022): the noised CLIP's gradient as a ``cond_fn``.

``NoisedClip`` holds the two encoders of ``fastdiff.models.glide_clip`` (plain modules) and
the tokenizer that turns prompts into their input; ``cond_fn`` gives the gradient of
exp(logit_scale) * <z_text, z_image(x_t, t)> with respect to x_t, which a sampler adds as
classifier guidance (fastdiff.sampling: the DDPM mean, or the score).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Protocol, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..models.glide_clip import CLIP_DEFAULTS, ClipTextEncoder, NoisedClipImageEncoder


class PromptTokenizer(Protocol):
    """What NoisedClip needs of its tokenizer (``fastdiff.loaders.glide_tokenizers.ClipTokenizer``)."""

    def __call__(self, prompts: Sequence[str], text_ctx: int) -> Tuple[Tensor, Tensor]: ...


def _graph_ready(x: Tensor) -> Tensor:
    # Tensors made under inference_mode cannot be saved for backward: copy them out first.
    return x.clone() if x.is_inference() else x


def _prompt_list(prompts: Sequence[str]) -> List[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _unit(z: Tensor) -> Tensor:
    return z / (torch.linalg.norm(z, dim=-1, keepdim=True) + 1e-12)


class NoisedClip(nn.Module):
    """The noised CLIP of GLIDE's CLIP guidance: embeddings, scores, and glide's ``cond_fn``."""

    def __init__(self, text_encoder: ClipTextEncoder, image_encoder: NoisedClipImageEncoder,
                 tokenizer: PromptTokenizer, logit_scale: float = CLIP_DEFAULTS["logit_scale"]):
        super().__init__()
        self.text_encoder, self.image_encoder, self.tokenizer = text_encoder, image_encoder, tokenizer
        # The config holds the scale itself; glide keeps its log, outside the state dicts.
        self.register_buffer("logit_scale", torch.tensor(math.log(logit_scale), dtype=torch.float32),
                             persistent=False)

    @classmethod
    def from_config(cls, config: Dict[str, Any], tokenizer: PromptTokenizer) -> "NoisedClip":
        """Randomly initialised encoders shaped by a config with CLIP_DEFAULTS' keys."""
        c = {**CLIP_DEFAULTS, **config}
        text = ClipTextEncoder(int(c["n_vocab"]), int(c["max_text_len"]), int(c["n_embd"]), int(c["n_head_text"]),
                               int(c["n_xf_blocks_text"]), int(c["n_head_state_text"]))
        image = NoisedClipImageEncoder(int(c["image_size"]), int(c["patch_size"]), int(c["n_embd"]),
                                       int(c["n_head_image"]), int(c["n_xf_blocks_image"]),
                                       int(c["n_head_state_image"]), int(c["n_timesteps"]))
        return cls(text, image, tokenizer, float(c["logit_scale"]))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_prompts(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        tokens, lengths = self.tokenizer(_prompt_list(prompts), self.text_encoder.max_text_len)
        return tokens.to(self.device), lengths.to(self.device)

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Unit-length text embeddings [P, n_embd]."""
        return _unit(self.text_encoder(*self.encode_prompts(prompts)))

    def image_embeddings(self, images: Tensor, t: Union[Tensor, int, None]) -> Tensor:
        """Unit-length embeddings [B, n_embd] of images in [-1, 1] (noised x_t) at original timesteps t."""
        return _unit(self.image_encoder((images + 1) * 127.5, t))

    def _check_pairing(self, n_prompts: int, batch: int) -> None:
        if n_prompts not in (1, batch):
            raise ValueError(f"{n_prompts} prompts for a batch of {batch} images: give one prompt or one per image")

    def score(self, images: Tensor, t: Union[Tensor, int, None], prompts: Sequence[str]) -> Tensor:
        """exp(logit_scale) * cosine similarity, per image [B] (one prompt, or one per image)."""
        self._check_pairing(len(_prompt_list(prompts)), images.shape[0])
        z_t = self.text_embeddings(prompts)
        return torch.exp(self.logit_scale) * (z_t * self.image_embeddings(images, t)).sum(-1)

    def cond_fn(self, prompts: Sequence[str], grad_scale: float) -> Callable[..., Tensor]:
        """glide's CLIP-guidance gradient: fn(x, t, **kwargs) = grad_scale * d/dx of
        exp(logit_scale) * sum(z_text * z_image(x, t)), summed over the batch.

        t are ORIGINAL (un-respaced) timesteps: with a respaced schedule the caller maps the
        step indices to original timesteps first, as glide's SpacedDiffusion wrapper does
        before calling cond_fn. Works under torch.no_grad (and inference_mode) too."""
        with torch.no_grad():
            z_t = self.text_embeddings(prompts)
        n_prompts = len(_prompt_list(prompts))

        def fn(x: Tensor, t: Union[Tensor, int, None], grad_scale: float = grad_scale, **kwargs: Any) -> Tensor:
            self._check_pairing(n_prompts, x.shape[0])
            with torch.inference_mode(False), torch.enable_grad():
                x_var = _graph_ready(x).detach().requires_grad_(True)
                t_ = _graph_ready(t) if isinstance(t, Tensor) else t
                loss = torch.exp(self.logit_scale) * (_graph_ready(z_t) * self.image_embeddings(x_var, t_)).sum()
                grad = torch.autograd.grad(loss, x_var)[0].detach()
            return grad * grad_scale

        return fn
