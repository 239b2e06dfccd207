"""GLIDE (Nichol et al. 2022): pixel-space text-to-image, 64 px base + 256 px upsampler,
inpainting, classifier-free and CLIP guidance, equal to openai/glide-text2im.

The models are fastdiff's ``Text2ImUNet`` loading the released checkpoints; the loop is
fastdiff's fused sampler. What glide-text2im's notebooks do, this does the same way:

- classifier-free guidance is one model call on [conditional; unconditional] (GLIDE's
  order), combining the eps channels only, with the variance channels of the
  conditional half (fused in ``guided_step``);
- the base model samples with learned-range DDPM on the "100" respacing, the upsampler
  with DDIM on "fast27" (DDPM for the inpainting upsampler), from noise * 0.997;
- the upsampler sees the base samples quantised to 8 bits, as the notebooks pass them;
- inpainting pastes the known pixels into every x0 prediction before clipping
  (glide's ``denoised_fn``; the step then runs as two op calls, see ``run_plan``), so the
  last step returns the kept pixels exactly;
- CLIP guidance adds the noised CLIP's gradient: variance * grad to the DDPM mean,
  through the score for DDIM (glide's ``condition_mean`` / ``condition_score``);
- random draws follow the notebooks' order and shapes (a doubled batch when guidance is
  on, one draw per step), so a seed here matches ``torch.manual_seed`` there on CPU.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..guidance import ClassifierFreeGuidance
from ..models.adm_unet import Text2ImUNet
from ..sampling import SAMPLERS, SchedulerConfig, run_plan, sample
from ..sampling.graphs import GraphCache
from ..sampling.respaced import RespacedSchedule, named_betas, respaced_ddim_plan, respaced_ddpm_plan
from ..sampling.schedules import SAMPLER_CLASS
from .base import Pipeline, check_prompts, make_generator, to_output

RESPACED_SAMPLERS = ("ddpm", "ddim")
# The other engine samplers run on GLIDE's training betas through a diffusers-style config.
CONFIG_SAMPLERS = tuple(s for s in SAMPLERS if s not in RESPACED_SAMPLERS)


class _GlideDraws:
    """Normal draws in glide-text2im's order: each step draws for the whole (possibly
    doubled) batch, used or not; the first `n` samples are the ones that count."""

    def __init__(self, generator: Optional[torch.Generator], drawn_batch: int, device, dtype=torch.float32):
        self.generator, self.drawn_batch, self.device, self.dtype = generator, drawn_batch, device, dtype
        self.next_step = 0

    def draw(self, shape: Sequence[int]) -> Tensor:
        n = shape[0]
        full = (self.drawn_batch,) + tuple(shape[1:])
        device = self.generator.device if self.generator is not None else self.device
        z = torch.randn(full, generator=self.generator, device=device, dtype=self.dtype)
        return z[:n].to(self.device)

    def __call__(self, step: int, like: Tensor) -> Tensor:
        while self.next_step < step:  # a step that added no noise still drew it
            self.draw(like.shape)
            self.next_step += 1
        self.next_step = step + 1
        return self.draw(like.shape)

    def finish(self, total_steps: int, shape: Sequence[int]) -> None:
        while self.next_step < total_steps:
            self.draw(shape)
            self.next_step += 1


def _as_image_tensor(image, size: int, device) -> Tensor:
    """PIL / numpy [H, W, 3] (0-255 or 0-1) / tensor [B, 3, H, W] in [0, 1] -> [B, 3, size, size] in [-1, 1],
    resized bicubically (PIL's BICUBIC for PIL input, as the glide notebooks read images)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        resized = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
    if isinstance(image, np.ndarray):
        a = image.astype(np.float32)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"image array must be [H, W, 3], got shape {a.shape}")
        t = torch.from_numpy(a / 255.0 if a.max() > 1.0 else a).permute(2, 0, 1)[None]
    elif isinstance(image, Tensor):
        t = image[None] if image.dim() == 3 else image
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"image tensor must be [3, H, W] or [B, 3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        t = t.float()
    else:
        raise TypeError(f"image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if not torch.isfinite(t).all():
        raise ValueError("image contains NaN or infinite values")
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, (size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return t.to(device) * 2 - 1


def _as_mask(mask, image_hw: Tuple[int, int], base_size: int, device) -> Tensor:
    """Mask at the base size [B or 1, 1, S, S], 1 = keep the image there, 0 = generate."""
    from PIL import Image

    if isinstance(mask, Image.Image):
        mask = np.array(mask.convert("L"), dtype=np.float32) / 255.0
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32) if not isinstance(mask, Tensor) else mask).float()
    while m.dim() < 4:
        m = m[None]
    if m.shape[1] != 1:
        raise ValueError(f"mask must have one channel ([H, W], [1, H, W] or [B, 1, H, W]), got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError("mask values must lie in [0, 1] (1 = keep the image, 0 = generate)")
    hw = tuple(m.shape[-2:])
    if hw not in (tuple(image_hw), (base_size, base_size)):
        raise ValueError(f"mask is {hw[0]}x{hw[1]} but the image is {image_hw[0]}x{image_hw[1]}; give a mask of the "
                         f"image's size or of the model's size {base_size}x{base_size}")
    if hw != (base_size, base_size):
        m = F.interpolate(m, (base_size, base_size), mode="nearest")
    return m.to(device)


class GlidePipeline(Pipeline):
    """GLIDE base (+ upsampler) (+ noised CLIP); see the module docstring."""

    def __init__(self, base: Text2ImUNet, tokenizer, upsampler: Optional[Text2ImUNet] = None, clip=None):
        if upsampler is not None and upsampler.inpaint != base.inpaint:
            raise ValueError("the base model and the upsampler must both be inpainting models, or neither")
        if upsampler is not None and not upsampler.super_res:
            raise ValueError("the upsampler checkpoint must be a super-resolution model (super_res=True)")
        if base.super_res:
            raise ValueError("the base model must not be a super-resolution model (super_res=False)")
        self.base, self.upsampler, self.tokenizer, self.clip = base, upsampler, tokenizer, clip
        # Step graphs of generate(cuda_graph=True) (base and upsampler), kept for later calls.
        self.graph_cache = GraphCache()
        for model in (base, upsampler):
            if model is not None and model.xf_width and model.n_vocab != tokenizer.n_vocab:
                raise ValueError(f"the tokenizer has {tokenizer.n_vocab} tokens but a model's token embedding has "
                                 f"{model.n_vocab}: the tokenizer does not belong to these checkpoints")

    @property
    def inpaint(self) -> bool:
        return self.base.inpaint

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_glide(cls, base: Union[str, os.PathLike], upsampler: Optional[Union[str, os.PathLike]] = None, *,
                   tokenizer, inpaint: bool = False, clip=None, options: Optional[dict] = None,
                   upsampler_options: Optional[dict] = None, device=None, dtype=None) -> "GlidePipeline":
        """Released GLIDE checkpoints (or any in their layout) with GLIDE options.

        tokenizer: a folder holding encoder.json(.gz) and vocab.bpe(.gz) (GLIDE's BPE), or a
        ``GlideTokenizer``. clip: a folder with clip_image_enc.pt, clip_text_enc.pt and
        bpe_simple_vocab_16e6.txt(.gz), or a ``NoisedClip``. options / upsampler_options:
        glide-text2im option dicts (missing keys take its defaults; ``inpaint`` follows
        the argument unless given there).
        """
        from ..loaders.glide import load_glide_model
        from ..loaders.glide_tokenizers import GlideTokenizer

        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = GlideTokenizer.from_folder(tokenizer)
        base_opts = dict({"inpaint": inpaint}, **(options or {}))
        base_model = load_glide_model(base, base_opts, device=device, dtype=dtype)
        up_model = None
        if upsampler is not None:
            up_opts = dict({"inpaint": inpaint}, **(upsampler_options or {}))
            up_model = load_glide_model(upsampler, up_opts, upsampler=True, device=device, dtype=dtype)
        if isinstance(clip, (str, os.PathLike)):
            from ..loaders.glide_clip_loader import load_noised_clip

            clip = load_noised_clip(clip, device=device or "cpu")
        return cls(base_model, tokenizer, up_model, clip)

    def to(self, device=None, dtype=None) -> "GlidePipeline":
        for model in (self.base, self.upsampler):
            if model is not None:
                model.to(device=device, dtype=dtype)
        if self.clip is not None:
            self.clip.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # ------------------------------------------------------------------ pieces

    def _text(self, model: Text2ImUNet, prompts: List[str], guided: bool):
        tokens, mask = self.tokenizer(prompts, model.text_ctx)
        cond = model.encode_text(tokens.to(self.device), mask.to(self.device))
        if not guided:
            return cond, None
        empty, empty_mask = self.tokenizer([""] * len(prompts), model.text_ctx)  # no tokens: all padding
        return cond, model.encode_text(empty.to(self.device), empty_mask.to(self.device))

    @staticmethod
    def _schedule(model: Text2ImUNet, steps) -> RespacedSchedule:
        o = model.options
        return RespacedSchedule.named(o["noise_schedule"], int(o["diffusion_steps"]), steps)

    def _run_stage(self, model: Text2ImUNet, denoiser, x: Tensor, sampler: str, steps, *, eta: float,
                   clip_denoised: bool, draws: _GlideDraws, cond_fn, callback, progress: bool, stage: str,
                   denoised_fn=None, cuda_graph: bool = False):
        graphs = self.graph_cache.scope(stage, model) if cuda_graph else False
        stage_callback = None
        if callback is not None:
            def stage_callback(info):
                callback(dataclasses.replace(info, stage=stage))
        if sampler in RESPACED_SAMPLERS:
            schedule = self._schedule(model, steps)
            plan = (respaced_ddpm_plan(schedule, learned_variance=True, clip_denoised=clip_denoised)
                    if sampler == "ddpm" else respaced_ddim_plan(schedule, eta, clip_denoised))
            plan.name = f"{stage} ({sampler})"
            out = run_plan(denoiser, x, plan, noise=draws, callback=stage_callback, progress=progress,
                           cond_fn=cond_fn, denoised_fn=denoised_fn, cuda_graph=graphs)
            draws.finish(len(plan.steps), x.shape)
            return out
        if cond_fn is not None:
            raise ValueError(f"CLIP / classifier guidance needs the ddpm or ddim sampler, not {sampler!r}")
        if denoised_fn is not None:
            raise ValueError(f"inpainting needs the ddpm or ddim sampler, not {sampler!r}")
        o = model.options
        config = SchedulerConfig.from_dict(dict(
            _class_name=SAMPLER_CLASS[sampler], num_train_timesteps=int(o["diffusion_steps"]),
            prediction_type="epsilon", clip_sample=clip_denoised, use_karras_sigmas=sampler.endswith("karras"),
            trained_betas=named_betas(o["noise_schedule"], int(o["diffusion_steps"])).tolist()))
        if isinstance(steps, str) and not steps.strip().isdigit():
            raise ValueError(f"sampler {sampler!r} takes a step count, not the respacing {steps!r} "
                             f"(respacings are for ddpm and ddim)")
        return sample(sampler, denoiser, x, config, int(steps), generator=draws.generator, progress=progress,
                      callback=stage_callback, cuda_graph=graphs)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        guidance_scale: float = 3.0,
        num_inference_steps: Union[str, int] = "100",
        upsample: bool = True,
        upsample_steps: Union[str, int] = "fast27",
        upsample_temp: float = 0.997,
        sampler: str = "ddpm",
        upsample_sampler: Optional[str] = None,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        latents: Optional[Tensor] = None,
        image=None,
        mask=None,
        clip_guidance_scale: Optional[float] = None,
        cond_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        clip_denoised: bool = True,
        output_type: str = "pil",
        progress: bool = True,
        callback: Optional[Callable] = None,
        cuda_graph: bool = False,
    ):
        """Images for `prompt`: 64 px from the base model, 256 px when an upsampler is loaded
        and upsample=True.

        cuda_graph=True replays each step from a captured CUDA graph (same images; not with
        CLIP/classifier guidance or inpainting, which run user code inside the step). The
        graphs stay in ``self.graph_cache`` for later calls with the same shapes.

        num_inference_steps / upsample_steps: a GLIDE respacing ("100", "fast27", "ddim50",
        "10,10,3,2,2") for the ddpm and ddim samplers, a step count for the others. image +
        mask (inpainting models): mask 1 keeps the image, 0 is generated (GLIDE's
        convention). clip_guidance_scale: CLIP guidance with the loaded noised CLIP;
        cond_fn(x, t) -> gradient: any classifier's guidance (t: original timesteps).
        """
        prompts = check_prompts(prompt)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        for name, value in (("guidance_scale", guidance_scale), ("upsample_temp", upsample_temp), ("eta", eta)):
            if not np.isfinite(float(value)):
                raise ValueError(f"{name} must be finite, got {value}")
        valid = RESPACED_SAMPLERS + CONFIG_SAMPLERS
        up_sampler = upsample_sampler or ("ddpm" if self.inpaint else "ddim")
        for name, value in (("sampler", sampler), ("upsample_sampler", up_sampler)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if clip_guidance_scale is not None and self.clip is None:
            raise ValueError("clip_guidance_scale needs a noised CLIP: load one with from_glide(..., clip=folder)")
        if self.inpaint and (image is None or mask is None):
            raise ValueError("this is an inpainting pipeline: give image= and mask= (mask 1 = keep, 0 = generate)")
        if not self.inpaint and (image is not None or mask is not None):
            raise ValueError("image/mask are for inpainting checkpoints; load base_inpaint.pt with inpaint=True")
        generator = make_generator(seed, generator)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n, size, device = len(prompts), self.base.image_size, self.device
        guided = float(guidance_scale) != 1.0

        # --- base stage
        inputs = {}
        if self.inpaint:
            image_base = _as_image_tensor(image, size, device)
            mask_base = _as_mask(mask, self._image_hw(image), size, device)
            image_base, mask_base = self._batch(image_base, n, "image"), self._batch(mask_base, n, "mask")
            inputs = dict(inpaint_image=image_base * mask_base, inpaint_mask=mask_base)
        cond_text, uncond_text = self._text(self.base, prompts, guided)
        paste = self._paste(inputs) if self.inpaint else None
        denoiser = self._denoiser(self.base, cond_text, uncond_text, inputs, guidance_scale)
        draws = _GlideDraws(generator, 2 * n if guided else n, device)
        x = self._start(latents, draws, (n, 3, size, size))
        guidance_fn = self._guidance_fn(prompts, clip_guidance_scale, cond_fn)
        x = self._run_stage(self.base, denoiser, x, sampler, num_inference_steps, eta=eta,
                            clip_denoised=clip_denoised, draws=draws, cond_fn=guidance_fn, callback=callback,
                            progress=progress, stage="base", denoised_fn=paste, cuda_graph=cuda_graph)

        # --- upsampler stage
        if upsample and self.upsampler is not None:
            up = self.upsampler
            up_size = up.image_size
            low_res = ((x + 1) * 127.5).round() / 127.5 - 1  # the 8-bit image the notebooks pass on
            up_inputs = dict(low_res=low_res)
            if self.inpaint:
                image_up = self._batch(_as_image_tensor(image, up_size, device), n, "image")
                mask_up = F.interpolate(inputs["inpaint_mask"], (up_size, up_size), mode="nearest")
                up_inputs.update(inpaint_image=image_up * mask_up, inpaint_mask=mask_up)
            up_text, _ = self._text(up, prompts, guided=False)
            up_paste = self._paste(up_inputs) if self.inpaint else None
            up_denoiser = self._denoiser(up, up_text, None, up_inputs, 1.0)
            up_draws = _GlideDraws(generator, n, device)
            x = up_draws.draw((n, 3, up_size, up_size)) * float(upsample_temp)
            x = self._run_stage(up, up_denoiser, x, up_sampler, upsample_steps, eta=eta, clip_denoised=clip_denoised,
                                draws=up_draws, cond_fn=None, callback=callback, progress=progress, stage="upsampler",
                                denoised_fn=up_paste, cuda_graph=cuda_graph)
        images = ((x.float() + 1) / 2).clamp(0, 1)
        return to_output(images, output_type)

    __call__ = generate

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _image_hw(image) -> Tuple[int, int]:
        from PIL import Image

        if isinstance(image, Image.Image):
            return image.size[1], image.size[0]
        shape = tuple(np.shape(image)) if not isinstance(image, Tensor) else tuple(image.shape)
        return (shape[0], shape[1]) if isinstance(image, np.ndarray) else (shape[-2], shape[-1])

    @staticmethod
    def _batch(t: Tensor, n: int, name: str) -> Tensor:
        if t.shape[0] == n:
            return t
        if t.shape[0] == 1:
            return t.expand(n, *t.shape[1:])
        raise ValueError(f"{t.shape[0]} {name}s for a batch of {n} images; give one, or one per image")

    def _start(self, latents: Optional[Tensor], draws: _GlideDraws, shape) -> Tensor:
        if latents is None:
            return draws.draw(shape)
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")
        return latents.to(self.device, torch.float32)

    @staticmethod
    def _paste(inputs: dict):
        """glide's inpainting denoised_fn: the known pixels replace the x0 prediction's."""
        image, mask = inputs["inpaint_image"], inputs["inpaint_mask"]
        return lambda x0, t: x0 * (1 - mask) + image * mask

    def _denoiser(self, model: Text2ImUNet, cond_text, uncond_text, inputs: dict, scale: float):
        def call(x: Tensor, t: Tensor, c: dict) -> Tensor:
            return model(x, t, **c)

        cond = dict(text=cond_text, **inputs)
        if uncond_text is None or float(scale) == 1.0:
            return ClassifierFreeGuidance(call, cond, None, 1.0)
        uncond = dict(text=uncond_text, **inputs)
        # GLIDE's order: conditional half first.
        return ClassifierFreeGuidance(call, cond, uncond, float(scale), uncond_first=False)

    def _guidance_fn(self, prompts: List[str], clip_scale: Optional[float], user_fn):
        fns = []
        if clip_scale is not None:
            clip_fn = self.clip.cond_fn(prompts, float(clip_scale))
            fns.append(lambda x, t: clip_fn(x.float(), t.long().reshape(-1).expand(x.shape[0])))
        if user_fn is not None:
            fns.append(user_fn)
        if not fns:
            return None
        if len(fns) == 1:
            return fns[0]
        return lambda x, t: sum(fn(x, t) for fn in fns)

