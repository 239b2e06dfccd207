"""Guidance by a CLIP's gradient: contrastive sampling with distractor captions, and its baseline.

Contrastive conditional sampling (reference 003, approach 1) models p(y | x) with CLIP over a
few captions, the target and distractors:

    log p(target | x) = log softmax_k(logit_scale * cos(z_image(x), z_text_k))[target],

and adds gamma * grad_x log p(target | x) to the step as classifier guidance (run_plan's
cond_fn: the DDPM mean moves by the step's variance times it -- 003 writes gamma beta_t grad,
the same for a fixed-large variance up to its 1/sqrt(alpha_t) ~ 1 + beta_t / 2 -- and the other
samplers' score by it). The distractors make it contrastive: the image is pushed towards the
target *and away from* the captions it could be confused with, where a single-caption loss
only pulls. The baseline 003 compares against is ``SphericalClipGuidance``: the spherical
distance between the image and one caption (the "Quick CLIP Guided Diffusion" loss).

What CLIP reads (``ClipEncoders``):
- GLIDE's noised CLIP (``fastdiff.guidance.NoisedClip``) reads the noised sample x_t at t;
- any other CLIP-like pair -- ``encode_image(images in [-1, 1]) -> [B, D]`` and
  ``encode_text(captions) -> [P, D]`` -- reads the step's predicted clean image: x0 from the
  model's own prediction at x_t (for latent models decoded by the VAE), differentiated through
  the model, the decoder and CLIP. The pipeline supplies that image (``image_of``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..sampling.denoiser import as_model_output

ImageOf = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]  # (x_t, t, alpha_bar) -> image in [-1, 1]


def _unit(z: Tensor) -> Tensor:
    return z / (torch.linalg.norm(z, dim=-1, keepdim=True) + 1e-12)


@dataclass(frozen=True)
class ClipEncoders:
    """A CLIP-like pair of encoders as guidance reads them.

    encode_image(images, t) for a noised CLIP (``noised=True``: it reads x_t at timesteps t),
    encode_image(images) otherwise, images in [-1, 1]; encode_text(list of captions) -> [P, D];
    logit_scale: the scale itself (CLIP's exp(t), 100 for OpenAI's models)."""

    encode_image: Callable[..., Tensor]
    encode_text: Callable[[List[str]], Tensor]
    logit_scale: float = 100.0
    noised: bool = False

    def __post_init__(self):
        for name in ("encode_image", "encode_text"):
            if not callable(getattr(self, name)):
                raise TypeError(f"ClipEncoders.{name} must be callable, got {type(getattr(self, name)).__name__}")
        scale = self.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"the CLIP's logit_scale must be a finite number > 0 (the scale itself, not its log), "
                             f"got {scale!r}")

    @classmethod
    def of(cls, clip) -> "ClipEncoders":
        """ClipEncoders from what a user has: ClipEncoders, GLIDE's NoisedClip, a module with
        encode_image / encode_text (and a float logit_scale), or a pair of callables
        (image encoder, text encoder) at logit scale 100."""
        from .clip import NoisedClip

        if isinstance(clip, ClipEncoders):
            return clip
        if isinstance(clip, NoisedClip):
            return cls(clip.image_embeddings, clip.text_embeddings, float(torch.exp(clip.logit_scale)), noised=True)
        if callable(getattr(clip, "encode_image", None)) and callable(getattr(clip, "encode_text", None)):
            scale = getattr(clip, "logit_scale", 100.0)
            if isinstance(scale, Tensor):
                raise TypeError("the CLIP's logit_scale is a tensor (transformers keeps its log there): pass "
                                "ClipEncoders(clip.encode_image, clip.encode_text, logit_scale=<the scale>) instead")
            return cls(clip.encode_image, clip.encode_text, scale)
        if isinstance(clip, (tuple, list)) and len(clip) == 2 and all(callable(f) for f in clip):
            return cls(clip[0], clip[1])
        raise TypeError(f"clip must be a NoisedClip, a module with encode_image and encode_text, ClipEncoders or a "
                        f"pair (image_encoder, text_encoder) of callables; got {type(clip).__name__}")

    def text_embeddings(self, captions: Sequence[str]) -> Tensor:
        with torch.no_grad():
            z = self.encode_text(list(captions))
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != len(captions):
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"the CLIP's text encoder gave {shape} for {len(captions)} captions; "
                             f"it must give [captions, width]")
        return _unit(z.detach().float())

    def image_embeddings(self, images: Tensor, t: Optional[Tensor] = None) -> Tensor:
        z = self.encode_image(images, t) if self.noised else self.encode_image(images)
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != images.shape[0]:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"the CLIP's image encoder gave {shape} for {images.shape[0]} images; "
                             f"it must give [images, width]")
        return _unit(z.float())


def check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _captions(name: str, value) -> List[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(c, str) for c in items):
        raise TypeError(f"{name} must be a caption or a non-empty list of captions, got {value!r}")
    if not all(c.strip() for c in items):
        raise ValueError(f"{name} holds an empty caption")
    return list(items)


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


class ClipGuidance:
    """A CLIP-scored guidance: ``log_prob(image embeddings) -> [B]``, whose gradient times
    ``scale`` steers the sampler. Subclasses say what the log-probability is."""

    def __init__(self, clip, scale: float):
        self.clip = ClipEncoders.of(clip)
        self.scale = check_scale("the guidance scale (gamma)", scale)
        self.width: Optional[int] = None  # the text embeddings' width, checked against the images'

    def log_prob(self, z_image: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pairs_with(self, batch: int) -> None:
        """Refuse a batch the captions do not pair with (one target, or one per image)."""
        n = self.n_targets
        if n not in (1, batch):
            raise ValueError(f"{n} target captions for a batch of {batch} images: give one, or one per image")

    def check_images(self, images: Tensor, t: Optional[Tensor] = None) -> None:
        """Run the image encoder once on `images` (e.g. zeros of the sampling shape) and refuse
        a CLIP whose image and text embeddings differ in width: before any sampling."""
        with torch.no_grad():
            z = self.clip.image_embeddings(images.float(), t)
        if z.shape[1] != self.width:
            raise ValueError(f"the CLIP's image embeddings are {z.shape[1]} wide but its text embeddings "
                             f"{self.width}: the encoders are not a pair")

    def probabilities(self, images: Tensor, t: Optional[Tensor] = None) -> Tensor:
        """What the guidance maximises, per image, as a probability [B] (no gradient)."""
        with torch.no_grad():
            return self.log_prob(self.clip.image_embeddings(images.float(), t)).exp()

    def cond_fn(self, image_of: Optional[ImageOf] = None, timestep_of: Optional[Callable] = None):
        """run_plan's cond_fn: scale * grad_x sum_b log_prob(x_b).

        A noised CLIP reads x_t at ``timestep_of(t)`` (GLIDE: the nearest trained timestep);
        another CLIP reads ``image_of(x_t, t, alpha_bar)``, the step's predicted clean image."""
        if not self.clip.noised and image_of is None:
            raise ValueError("this CLIP reads clean images: guidance needs image_of (the step's predicted image)")

        def fn(x: Tensor, t: Tensor, alpha_bar: Optional[Tensor] = None, **kwargs) -> Tensor:
            self.pairs_with(x.shape[0])
            with torch.inference_mode(False), torch.enable_grad():
                x_var = (x.clone() if x.is_inference() else x).detach().float().requires_grad_(True)
                if self.clip.noised:
                    t_clip = timestep_of(t, x.shape[0]) if timestep_of is not None else t
                    z = self.clip.image_embeddings(x_var, t_clip)
                else:
                    z = self.clip.image_embeddings(image_of(x_var, t, alpha_bar))
                grad = torch.autograd.grad(self.log_prob(z).sum(), x_var)[0]
            return (grad * self.scale).to(x.dtype)

        fn.needs_alpha_bar = not self.clip.noised
        return fn


class ContrastiveClipGuidance(ClipGuidance):
    """Contrastive conditional sampling (003): log softmax over [target] + distractors of the
    CLIP logits, at the target. target: one caption or one per image; distractors: captions
    shared by every target, or one list per target (lists of different lengths are padded
    with captions the softmax leaves out)."""

    def __init__(self, clip, target: Union[str, Sequence[str]], distractors: Sequence, scale: float):
        super().__init__(clip, scale)
        targets = _captions("target", target)
        if isinstance(distractors, str) or not isinstance(distractors, (list, tuple)) or not distractors:
            raise ValueError("contrastive guidance needs distractors: a non-empty list of captions the target "
                             "should win against (e.g. the same objects swapped or recoloured)")
        per_target = all(isinstance(d, (list, tuple)) for d in distractors)
        groups = [_captions("distractors", d) for d in distractors] if per_target \
            else [_captions("distractors", list(distractors))] * len(targets)
        if len(groups) != len(targets):
            raise ValueError(f"{len(groups)} distractor lists for {len(targets)} targets; give one per target")
        for caption, group in zip(targets, groups):
            same = [d for d in group if _same(d, caption)]
            if same:
                raise ValueError(f"distractor {same[0]!r} is the target caption itself: a distractor must be "
                                 f"a different caption")
        self.targets, self.distractors = targets, groups
        self.n_targets = len(targets)
        k = max(len(g) for g in groups)
        captions = [c for caption, group in zip(targets, groups) for c in [caption] + group]
        z = self.clip.text_embeddings(captions)
        self.width = z.shape[1]
        self.z_text = z.new_zeros(len(targets), 1 + k, self.width)  # [targets, 1 + K, D], target first
        self.keep = torch.zeros(len(targets), 1 + k, dtype=torch.bool)  # False: padding, out of the softmax
        row = 0
        for i, group in enumerate(groups):
            self.z_text[i, : 1 + len(group)] = z[row : row + 1 + len(group)]
            self.keep[i, : 1 + len(group)] = True
            row += 1 + len(group)

    def logits(self, z_image: Tensor) -> Tensor:
        """[B, 1 + K]: logit_scale * cosine of each image with its target (column 0) and distractors."""
        z_text = self.z_text.to(z_image.device).expand(z_image.shape[0], -1, -1)
        logits = self.clip.logit_scale * torch.einsum("bd,bkd->bk", z_image, z_text)
        keep = self.keep.to(z_image.device).expand(z_image.shape[0], -1)
        return logits.masked_fill(~keep, float("-inf"))

    def log_prob(self, z_image: Tensor) -> Tensor:
        return torch.log_softmax(self.logits(z_image), dim=-1)[:, 0]


class SphericalClipGuidance(ClipGuidance):
    """The single-caption baseline: minus the spherical distance 2 arcsin(|u - v| / 2)^2
    between the unit image and caption embeddings (its gradient pulls towards the caption)."""

    def __init__(self, clip, prompt: Union[str, Sequence[str]], scale: float):
        super().__init__(clip, scale)
        self.targets = _captions("prompt", prompt)
        self.n_targets = len(self.targets)
        self.z_text = self.clip.text_embeddings(self.targets)
        self.width = self.z_text.shape[1]

    def log_prob(self, z_image: Tensor) -> Tensor:
        return -spherical_distance(z_image, self.z_text.to(z_image.device))


def spherical_distance(u: Tensor, v: Tensor) -> Tensor:
    """2 arcsin(|u - v| / 2)^2 for unit vectors (half the squared great-circle angle, times 2)."""
    return 2 * torch.arcsin((torch.linalg.norm(u - v, dim=-1) / 2).clamp(max=1.0)) ** 2


def predicted_x0(denoiser, prediction_type: str, channels: int,
                 dtype: Optional[torch.dtype] = None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """(x_t, t, alpha_bar) -> x0 from the denoiser's (guided) prediction, differentiable in x_t:
    the variance-preserving conversion of sampling.steps.vp_conversion with alpha_bar on the device.
    dtype: what the model takes (x_t is cast to it; x0 comes back in float32)."""
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}")

    def x0(x: Tensor, t: Tensor, alpha_bar: Tensor) -> Tensor:
        out = as_model_output(denoiser(x if dtype is None else x.to(dtype), t))
        p = out.cond[:, :channels].float()
        if out.uncond is not None:
            u = out.uncond[:, :channels].float()
            p = u + out.scale.float().reshape(-1, *[1] * (x.dim() - 1)) * (p - u)
        a = alpha_bar.float().reshape(-1, *[1] * (x.dim() - 1))
        if prediction_type == "epsilon":
            return (x - torch.sqrt(1 - a) * p) / torch.sqrt(a)
        if prediction_type == "v_prediction":
            return torch.sqrt(a) * x - torch.sqrt(1 - a) * p
        return p

    return x0
