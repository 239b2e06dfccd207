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
import types
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..guidance import ClassifierFreeGuidance
from ..guidance.contrastive import predicted_x0
from ..models.adm_unet import Text2ImUNet
from ..sampling import SAMPLERS, SchedulerConfig, run_plan, sample
from ..sampling.graphs import GraphCache
from ..sampling.noise import Generators, is_per_sample, randn
from ..sampling.steps import Plan as S_Plan
from ..sampling.respaced import RespacedSchedule, named_betas, respaced_ddim_plan, respaced_ddpm_plan
from . import arguments as A
from .base import Pipeline, register_pipeline, to_output
from .guided import Chain, check_clip_guidance
from .images import image_tensor, open_image

# ddpm and ddim run on GLIDE's own respaced schedules (the registry's `respaced`); the other
# engine samplers on GLIDE's training betas through a diffusers-style config.
RESPACED_SAMPLERS = tuple(name for name, spec in SAMPLERS.items() if spec.respaced)
CONFIG_SAMPLERS = tuple(name for name, spec in SAMPLERS.items() if not spec.respaced)


class _GlideDraws:
    """Normal draws in glide-text2im's order: each step draws for the whole (possibly
    doubled) batch, used or not; the first `n` samples are the ones that count."""

    def __init__(self, generator: Optional[torch.Generator], drawn_batch: int, device, dtype=torch.float32):
        self.generator, self.drawn_batch, self.device, self.dtype = generator, drawn_batch, device, dtype
        self.next_step = 0

    def draw(self, shape: Sequence[int]) -> Tensor:
        n = shape[0]
        if is_per_sample(self.generator):  # one generator per image: only the images' own rows are drawn
            return randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)
        full = (self.drawn_batch,) + tuple(shape[1:])
        return randn(full, generator=self.generator, device=self.device, dtype=self.dtype)[:n]

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
    """An input image (see fastdiff/pipelines/images.py; a path opens as PIL) -> [B, 3, size, size] in
    [-1, 1], resized bicubically (PIL's BICUBIC for PIL input, as the glide notebooks read images)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        resized = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
    t = image_tensor(image)
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


def _nearest_timestep(t: Tensor) -> Tensor:
    """Integer timesteps for a timestep-indexed model (GLIDE's noised CLIP); the respaced
    samplers' integer timesteps pass unchanged."""
    return t.round().long() if t.is_floating_point() else t.long()


@register_pipeline("GlidePipeline")
class GlidePipeline(Pipeline):
    """GLIDE base (+ upsampler) (+ noised CLIP); see the module docstring."""

    components = ("base", "upsampler", "clip")
    # The noised CLIP stays float32: its guidance gradient is taken on float32 images.
    float32_components = ("clip",)
    reads_folders = False  # glide-text2im ships .pt checkpoints: from_glide

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

    @classmethod
    def load_components(cls, path, *, device=None, dtype=None) -> dict:
        raise ValueError(f"{path}: GLIDE has no diffusers folder; load glide-text2im checkpoints with "
                         f"fastdiff.Pipeline.from_glide(base.pt, upsample.pt, tokenizer=...)")

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

    def _stage_plan(self, model: Text2ImUNet, sampler: str, steps, *, eta: float, clip_denoised: bool,
                    stage: str):
        """What a stage runs, built (and so checked) before any work: a respaced Plan for ddpm and
        ddim, else (the sampler's config on GLIDE's training betas, the step count)."""
        o = model.options
        if sampler in RESPACED_SAMPLERS:
            if isinstance(steps, bool) or not isinstance(steps, (str, int)):
                raise TypeError(f"{stage} steps must be a GLIDE respacing string or an integer, got {steps!r}")
            schedule = self._schedule(model, steps)
            plan = (respaced_ddpm_plan(schedule, learned_variance=True, clip_denoised=clip_denoised)
                    if sampler == "ddpm" else respaced_ddim_plan(schedule, eta, clip_denoised))
            plan.name = f"{stage} ({sampler})"
            return plan
        if isinstance(steps, str):
            if not steps.strip().isdigit():
                raise ValueError(f"sampler {sampler!r} takes a step count, not the respacing {steps!r} "
                                 f"(respacings are for ddpm and ddim)")
            steps = int(steps)
        config = SchedulerConfig.from_dict(dict(
            _class_name=SAMPLERS[sampler].diffusers_class, num_train_timesteps=int(o["diffusion_steps"]),
            prediction_type="epsilon", clip_sample=clip_denoised, use_karras_sigmas=sampler.endswith("karras"),
            trained_betas=named_betas(o["noise_schedule"], int(o["diffusion_steps"])).tolist()))
        return config, A.check_steps(sampler, config, steps)

    def _run_stage(self, model: Text2ImUNet, denoiser, x: Tensor, sampler: str, plan, *, draws: _GlideDraws,
                   cond_fn, callback, progress: bool, stage: str, denoised_fn=None, cuda_graph: bool = False):
        graphs = self.graph_cache.scope(stage, model) if cuda_graph else False
        stage_callback = None if callback is None else \
            (lambda info: callback(dataclasses.replace(info, stage=stage)))
        if sampler in RESPACED_SAMPLERS:
            out = run_plan(denoiser, x, plan, noise=draws, callback=stage_callback, progress=progress,
                           cond_fn=cond_fn, denoised_fn=denoised_fn, cuda_graph=graphs)
            draws.finish(len(plan.steps), x.shape)
            return out
        config, steps = plan
        extra = {} if cond_fn is None else dict(cond_fn=cond_fn)
        return sample(sampler, denoiser, x, config, steps, generator=draws.generator, progress=progress,
                      callback=stage_callback, cuda_graph=graphs, **extra)

    # ------------------------------------------------------------------ arguments

    def family_defaults(self) -> dict:
        """glide-text2im's notebooks: guidance 3, learned-range DDPM on "100" for the base, DDIM
        on "fast27" from noise * 0.997 for the upsampler (DDPM for the inpainting one)."""
        return dict(guidance_scale=3.0, num_inference_steps="100", sampler="ddpm", upsample_steps="fast27",
                    upsample_sampler="ddpm" if self.inpaint else "ddim", upsample_temp=0.997, eta=0.0)

    def check_family(self, a: types.SimpleNamespace) -> None:
        if a.negative_prompt is not None:
            raise ValueError("GLIDE takes no negative_prompt: its unconditional half is the empty text, as in "
                             "glide-text2im")
        for name in ("sampler", "upsample_sampler"):
            A.check_sampler(name, getattr(a, name))
        a.upsample_temp = A.check_real("upsample_temp", a.upsample_temp)
        a.eta = A.check_real("eta", a.eta, low=0.0)
        if a.clip_guidance_scale is not None:
            a.clip_guidance_scale = A.check_real("clip_guidance_scale", a.clip_guidance_scale)
            if self.clip is None:
                raise ValueError("clip_guidance_scale needs a noised CLIP: load one with from_glide(..., clip=folder)")
        A.check_callback("cond_fn", a.cond_fn)
        guided_by_gradient = a.clip_guidance_scale is not None or a.cond_fn is not None or a.clip_guidance is not None
        if guided_by_gradient and not A.check_sampler("sampler", a.sampler).classifier_guidance:
            raise ValueError(f"CLIP / classifier guidance has no rule for sampler {a.sampler!r}; use one whose "
                             f"registry entry has classifier_guidance (e.g. ddpm, ddim)")
        a.upsampling = bool(a.upsample) and self.upsampler is not None
        if self.inpaint:
            if a.image is None or a.mask is None:
                raise ValueError("this is an inpainting pipeline: give image= and mask= (mask 1 = keep, 0 = generate)")
            for name, sampler in (("sampler", a.sampler), ("upsample_sampler", a.upsample_sampler)):
                if sampler not in RESPACED_SAMPLERS and (name == "sampler" or a.upsampling):
                    raise ValueError(f"inpainting needs the ddpm or ddim sampler, not {name}={sampler!r}")
        elif a.image is not None or a.mask is not None:
            raise ValueError("image/mask are for inpainting checkpoints; load base_inpaint.pt with inpaint=True")
        size = self.upsampler.image_size if a.upsampling else self.base.image_size
        A.check_fixed_size("height", a.height, size, "this GLIDE pipeline (base, then upsampler if upsample=True)")
        A.check_fixed_size("width", a.width, size, "this GLIDE pipeline (base, then upsampler if upsample=True)")
        a.n = len(a.prompts) * a.num_images_per_prompt
        size = self.base.image_size
        check_clip_guidance(a.clip_guidance, A.check_sampler("sampler", a.sampler), a.n,
                            torch.zeros(1, 3, size, size, device=self.device),
                            torch.zeros(1, dtype=torch.long, device=self.device))
        # As glide-text2im's notebooks: the guided batch runs for any scale but 1 (a scale below
        # 1 is weaker guidance, not none), where SD and VQ-Diffusion guide only above 1.
        a.guided = a.guidance_scale != 1.0
        a.base_plan = self._stage_plan(self.base, a.sampler, a.num_inference_steps, eta=a.eta,
                                       clip_denoised=a.clip_denoised, stage="base")
        if a.upsampling:
            a.upsample_plan = self._stage_plan(self.upsampler, a.upsample_sampler, a.upsample_steps, eta=a.eta,
                                               clip_denoised=a.clip_denoised, stage="upsampler")
        if a.latents is not None:
            A.check_latents(a.latents, (a.n, 3, self.base.image_size, self.base.image_size))
        if self.inpaint:
            self._inpaint_inputs(a)
        ddim_stages = [a.sampler] + ([a.upsample_sampler] if a.upsampling else [])
        if "eta" in a.given and a.eta and "ddim" not in ddim_stages:
            A.warn_no_effect("eta", f"it is DDIM's, and no stage runs ddim (sampler {a.sampler!r}"
                                    f"{f', upsample_sampler {a.upsample_sampler!r}' if a.upsampling else ''})")

    def _inpaint_inputs(self, a: types.SimpleNamespace) -> None:
        """The image and mask at the base size (and the image at the upsampler's), read once."""
        image = open_image(a.image) if isinstance(a.image, (str, os.PathLike)) else a.image
        size = self.base.image_size
        image_base = self._batch(_as_image_tensor(image, size, self.device), a.n, "image")
        mask_base = self._batch(_as_mask(a.mask, self._image_hw(image), size, self.device), a.n, "mask")
        a.inputs = dict(inpaint_image=image_base * mask_base, inpaint_mask=mask_base)
        if a.upsampling:
            a.image_up = self._batch(_as_image_tensor(image, self.upsampler.image_size, self.device), a.n, "image")

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        *,
        num_inference_steps: Optional[Union[str, int]] = None,
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
        eta: Optional[float] = None,
        upsample: bool = True,
        upsample_steps: Optional[Union[str, int]] = None,
        upsample_temp: Optional[float] = None,
        upsample_sampler: Optional[str] = None,
        latents: Optional[Tensor] = None,
        image=None,
        mask=None,
        clip_guidance_scale: Optional[float] = None,
        cond_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        clip_guidance=None,
        clip_denoised: bool = True,
        cuda_graph: bool = False,
    ):
        """Images for `prompt`: 64 px from the base model, 256 px when an upsampler is loaded
        and upsample=True. Every argument after `prompt` is a keyword; None means
        ``self.defaults`` (the notebooks' settings); all are checked before any work.

        guidance_scale: as glide-text2im's notebooks, the guided batch (conditional first)
            runs for any scale but 1; SD and VQ-Diffusion guide only above 1.
        negative_prompt: not GLIDE's (refused); height / width: None or the output size.
        eta: DDIM's noise, for the stages that run ddim (a warning when none does).
        cuda_graph=True replays each step from a captured CUDA graph (same images; not with
        CLIP/classifier guidance or inpainting, which run user code inside the step). The
        graphs stay in ``self.graph_cache`` for later calls with the same shapes.

        num_inference_steps / upsample_steps: a GLIDE respacing ("100", "fast27", "ddim50",
        "10,10,3,2,2") for the ddpm and ddim samplers, a step count for the others. image +
        mask (inpainting models): mask 1 keeps the image, 0 is generated (GLIDE's
        convention); the image may be any input fastdiff/pipelines/images.py reads.
        clip_guidance_scale: CLIP guidance with the loaded noised CLIP; cond_fn(x, t) ->
        gradient: any classifier's guidance (t: original timesteps; for the sigma samplers,
        the model's fractional timesteps, which the noised CLIP rounds to the nearest). Both
        work with every sampler: as a shift of the posterior mean for ddpm, of the score for
        the others (glide-text2im's condition_mean / condition_score).
        clip_guidance: a fastdiff.guidance ContrastiveClipGuidance (target + distractor captions,
        reference 003) or SphericalClipGuidance, on the base stage: a noised CLIP reads x_t,
        another CLIP the base model's predicted x0 (differentiated through the model).
        """
        a = self.check_arguments(locals())
        prompts = [p for p in a.prompts for _ in range(a.num_images_per_prompt)]
        n, size, device, guided = a.n, self.base.image_size, self.device, a.guided

        # --- base stage
        inputs = a.inputs if self.inpaint else {}
        cond_text, uncond_text = self._text(self.base, prompts, guided)
        paste = self._paste(inputs) if self.inpaint else None
        denoiser = self._denoiser(self.base, cond_text, uncond_text, inputs, a.guidance_scale)
        draws = _GlideDraws(a.generator, 2 * n if guided else n, device)
        x = self._start(latents, draws, (n, 3, size, size))
        guidance_fn = self._guidance_fn(prompts, a.clip_guidance_scale, cond_fn, a.clip_guidance, denoiser)
        x = self._run_stage(self.base, denoiser, x, a.sampler, a.base_plan, draws=draws, cond_fn=guidance_fn,
                            callback=callback, progress=progress, stage="base", denoised_fn=paste,
                            cuda_graph=cuda_graph)

        # --- upsampler stage
        if a.upsampling:
            up = self.upsampler
            up_size = up.image_size
            low_res = ((x + 1) * 127.5).round() / 127.5 - 1  # the 8-bit image the notebooks pass on
            up_inputs = dict(low_res=low_res)
            if self.inpaint:
                mask_up = F.interpolate(inputs["inpaint_mask"], (up_size, up_size), mode="nearest")
                up_inputs.update(inpaint_image=a.image_up * mask_up, inpaint_mask=mask_up)
            up_text, _ = self._text(up, prompts, guided=False)
            up_paste = self._paste(up_inputs) if self.inpaint else None
            up_denoiser = self._denoiser(up, up_text, None, up_inputs, 1.0)
            up_draws = _GlideDraws(a.generator, n, device)
            x = up_draws.draw((n, 3, up_size, up_size)) * a.upsample_temp
            x = self._run_stage(up, up_denoiser, x, a.upsample_sampler, a.upsample_plan, draws=up_draws,
                                cond_fn=None, callback=callback, progress=progress, stage="upsampler",
                                denoised_fn=up_paste, cuda_graph=cuda_graph)
        images = ((x.float() + 1) / 2).clamp(0, 1)
        return to_output(images, output_type)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _image_hw(image) -> Tuple[int, int]:
        from PIL import Image

        if isinstance(image, (list, tuple)) and image:
            return GlidePipeline._image_hw(image[0])
        if isinstance(image, Image.Image):
            return image.size[1], image.size[0]
        if isinstance(image, np.ndarray):  # [H, W], [H, W, C] or [B, H, W, C]
            return tuple(image.shape[:2]) if image.ndim == 2 else tuple(image.shape[-3:-1])
        return tuple(image.shape[-2:])

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

    def optimization_chain(self, a) -> Chain:
        """optimize_latents' chain: the base model under CFG on the prompt, its plan, images as they are."""
        from ..sampling.samplers import build_plan

        prompts = [p for p in a.prompts for _ in range(a.num_images_per_prompt)]
        cond_text, uncond_text = self._text(self.base, prompts, a.guided)
        denoiser = self._denoiser(self.base, cond_text, uncond_text, {}, a.guidance_scale)
        plan = a.base_plan if isinstance(a.base_plan, S_Plan) else build_plan(a.sampler, *a.base_plan)
        draws = _GlideDraws(a.generator, 2 * a.n if a.guided else a.n, self.device)
        size = self.base.image_size
        x = self._start(a.latents, draws, (a.n, 3, size, size))
        return Chain(denoiser, x, plan, lambda image: image, (3, size, size))

    def _clip_guidance_fn(self, guidance, denoiser):
        if guidance.clip.noised:
            return guidance.cond_fn(timestep_of=lambda t, n: _nearest_timestep(t).reshape(-1).expand(n))
        x0 = predicted_x0(denoiser, "epsilon", 3, self.dtype)  # GLIDE predicts eps (and a variance)
        return guidance.cond_fn(image_of=x0)

    def _guidance_fn(self, prompts: List[str], clip_scale: Optional[float], user_fn, clip_guidance=None,
                     denoiser=None):
        fns = []
        if clip_guidance is not None:
            fns.append(self._clip_guidance_fn(clip_guidance, denoiser))
        if clip_scale is not None:
            clip_fn = self.clip.cond_fn(prompts, float(clip_scale))
            # The noised CLIP embeds trained (integer) timesteps; the sigma samplers' model
            # timesteps fall between them, so they take the nearest.
            fns.append(lambda x, t: clip_fn(x.float(), _nearest_timestep(t).reshape(-1).expand(x.shape[0])))
        if user_fn is not None:
            fns.append(user_fn)
        if not fns:
            return None
        if len(fns) == 1:
            return fns[0]

        def total(x, t, alpha_bar=None):
            return sum(fn(x, t, alpha_bar=alpha_bar) if getattr(fn, "needs_alpha_bar", False) else fn(x, t)
                       for fn in fns)
        total.needs_alpha_bar = any(getattr(fn, "needs_alpha_bar", False) for fn in fns)
        return total

