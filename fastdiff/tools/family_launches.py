"""The launches fastdiff's Triton kernels make for the three model families, recorded on
meta tensors (step 1 of fastdiff/tools/triton_resources.py's ahead-of-time check).

The real models (SD 1.5 and 2.x UNets and VAE at 512 and 768 px, GLIDE's 64 px base with
its text transformer and its 256 px upsampler, VQ-Diffusion ITHQ's transformer and VQ-VAE)
are built on the meta device and run forward with ``fastdiff.ops.attention``/``group_norm``
replaced by recorders that call the Triton wrappers on the meta tensors the model hands
them (``_launch.recording``: the wrapper says what it would launch and computes nothing);
every sampler runs on meta samples for ``guided_step``; the VQ-Diffusion step for
``discrete_step``; and attention at the other head dims it accepts (16-256). Batches 1 and 4
with classifier-free guidance, fp16, bf16 and fp32; for attention, every configuration
``tune()`` may try as well.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Sequence

import torch

from ..ops.triton._launch import Launch, recording

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Recorded:
    launch: Launch
    problem: str            # "SD 1.5 512 fp16 B1: attention Lq=4096 Lk=77 D=40"
    tuning: bool = False    # a tune() candidate rather than the heuristic's choice


def _meta(shape, dtype, strides=None) -> torch.Tensor:
    if strides is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


class _OpRecorder:
    """Stands in for fastdiff.ops.attention / group_norm while a model runs on meta tensors."""

    def __init__(self, label: str, tuning: bool):
        self.label, self.tuning = label, tuning
        self.records: List[Recorded] = []

    def _keep(self, launches: Sequence[Launch], what: str, tuning: bool = False) -> None:
        self.records += [Recorded(launch, f"{self.label}: {what}", tuning) for launch in launches]

    def attention(self, q, k, v, key_padding_mask=None, scale=None):
        from ..ops.triton import attention as kernel

        mask = None if key_padding_mask is None else (
            key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0)
        what = f"attention Lq={q.shape[2]} Lk={k.shape[2]} D={q.shape[3]}{' masked' if mask is not None else ''}"
        if kernel.check_supported(q, k, v) is not None:  # ops.attention runs SDPA for these
            from ..ops.attention import _sdpa
            return _sdpa(q, k, v, mask, scale)
        with recording() as launches:
            out = kernel.attention_triton(q, k, v, mask, scale)
        self._keep(launches, what)
        if self.tuning:
            d0, d1 = kernel.split_head_dim(q.shape[3])
            for config in kernel.tune_candidates(q.shape[2], k.shape[2], d0, d1, q.dtype, q.shape[3]):
                with recording() as launches:
                    kernel.attention_triton(q, k, v, mask, scale, config=config)
                self._keep(launches, f"{what} tune {config}", tuning=True)
        return out

    def group_norm(self, x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None, silu=False):
        from ..ops.triton.group_norm import group_norm_triton

        with recording() as launches:
            out = group_norm_triton(x, num_groups, weight, bias, eps, scale, shift, silu)
        layout = "NHWC" if not x.is_contiguous() else "NCHW"
        self._keep(launches, f"group_norm {list(x.shape)} G={num_groups} {layout}"
                             f"{' scale-shift' if scale is not None else ''}{' silu' if silu else ''}")
        return out


@contextlib.contextmanager
def _recording_ops(recorder: _OpRecorder) -> Iterator[None]:
    from .. import ops

    saved = ops.attention, ops.group_norm
    ops.attention, ops.group_norm = recorder.attention, recorder.group_norm
    try:
        with torch.device("meta"), torch.no_grad():
            yield
    finally:
        ops.attention, ops.group_norm = saved


SD15_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# microsoft/vq-diffusion-ithq: the transformer's config, and a taming VQGAN f8 layout for the
# VQ-VAE (4096 codes, 32 x 32 tokens for 256 px images).
ITHQ_TRANSFORMER = dict(num_attention_heads=16, attention_head_dim=88, num_layers=24, cross_attention_dim=512,
                        sample_size=32, num_vector_embeds=4097, num_embeds_ada_norm=100, norm_num_groups=32,
                        activation_fn="geglu-approximate", attention_bias=True)
ITHQ_VQVAE = dict(in_channels=3, out_channels=3, latent_channels=256, block_out_channels=(128, 128, 256, 512),
                  layers_per_block=2, norm_num_groups=32, num_vq_embeddings=4096, vq_embed_dim=128,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _sd_models(label, unet_config, size, dtype, batches, recorder):
    from ..models import AutoencoderKL, UNet2DConditionModel

    latent = size // 8
    with _recording_ops(recorder):
        unet = UNet2DConditionModel(dict(unet_config, sample_size=latent)).to(dtype)
        vae = AutoencoderKL(dict(SD_VAE, sample_size=size)).to(dtype)
        for batch in batches:
            recorder.label = f"{label} B{batch}"
            context = _meta((2 * batch, 77, unet_config["cross_attention_dim"]), dtype)
            for layout in (torch.contiguous_format, torch.channels_last):
                unet.to(memory_format=layout)
                x = _meta((2 * batch, 4, latent, latent), dtype).contiguous(memory_format=layout)
                unet(x, torch.tensor(500), encoder_hidden_states=context)
            vae.decode(_meta((batch, 4, latent, latent), dtype))


def _glide_models(label, dtype, batches, recorder):
    from ..models.adm_unet import Text2ImUNet, glide_options

    with _recording_ops(recorder):
        base = Text2ImUNet(glide_options(), n_vocab=50257).to(dtype)
        up = Text2ImUNet(glide_options(upsampler=True), n_vocab=50257).to(dtype)
        for batch in batches:
            recorder.label = f"{label} 64 B{batch}"
            tokens = torch.zeros(2 * batch, base.text_ctx, dtype=torch.long)
            mask = torch.ones(2 * batch, base.text_ctx, dtype=torch.bool)
            text = base.encode_text(tokens, mask)
            base(_meta((2 * batch, 3, 64, 64), dtype), torch.zeros(2 * batch, dtype=torch.long), text)
            recorder.label = f"{label} 256 B{batch}"
            text = up.encode_text(tokens[:batch], mask[:batch])
            up(_meta((batch, 3, 256, 256), dtype), torch.zeros(batch, dtype=torch.long), text,
               low_res=_meta((batch, 3, 64, 64), dtype))


def _vq_models(label, dtype, batches, recorder):
    from ..models.discrete_transformer import VQDiffusionTransformer
    from ..models.vqvae import VQModel

    with _recording_ops(recorder):
        transformer = VQDiffusionTransformer(ITHQ_TRANSFORMER).to(dtype)
        vqvae = VQModel(dict(ITHQ_VQVAE, sample_size=256)).to(dtype)
        for batch in batches:
            recorder.label = f"{label} B{batch}"
            transformer(torch.zeros(2 * batch, 1024, dtype=torch.long), _meta((2 * batch, 77, 512), dtype),
                        torch.tensor([50]))
            # decode_tokens checks token values, which meta tensors lack: decode the looked-up codes
            vqvae.decoder(vqvae.post_quant_conv(_meta((batch, ITHQ_VQVAE["vq_embed_dim"], 32, 32), dtype)))


def _sampler_steps(label, shape, dtype, recorder, *, glide: bool):
    """guided_step launches of every sampler (SD-style configs), or GLIDE's respaced plans."""
    from ..sampling import SAMPLERS, ModelOutput, SchedulerConfig, run_plan, sample
    from ..sampling import samplers as samplers_module
    from ..ops.triton.guided_step import guided_step_triton

    def record_step(x, cond, uncond=None, guidance_scale=None, *, coeffs, noise=None, history=(), clip_range=None,
                    learned_variance=False, write_denoised=False):
        with recording() as launches:
            out = guided_step_triton(x, cond, uncond, guidance_scale, coeffs, noise, list(history), clip_range,
                                     learned_variance, write_denoised)
        what = (f"guided_step {list(x.shape)} history={len(history)} noise={noise is not None} "
                f"cfg={uncond is not None} learned={learned_variance} clip={clip_range is not None} "
                f"x0={write_denoised}")
        recorder.records += [Recorded(launch, f"{label}: {what}") for launch in launches]
        return out

    channels = shape[1]
    out_channels = 2 * channels if glide else channels

    def denoiser(x, t):
        n = x.shape[0]
        return ModelOutput(_meta((n, out_channels) + tuple(x.shape[2:]), x.dtype),
                           _meta((n, out_channels) + tuple(x.shape[2:]), x.dtype), _meta((n,), torch.float32))

    saved = samplers_module.guided_step
    samplers_module.guided_step = record_step
    try:
        x = _meta(shape, dtype)
        if glide:
            from ..sampling.respaced import RespacedSchedule, respaced_ddim_plan, respaced_ddpm_plan

            schedule = RespacedSchedule.named("squaredcos_cap_v2", 1000, "4")
            for plan in (respaced_ddpm_plan(schedule, learned_variance=True, clip_denoised=True),
                         respaced_ddim_plan(schedule, 0.0, True)):
                run_plan(denoiser, x, plan, progress=False)
            return
        config = SchedulerConfig.from_dict(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", prediction_type="epsilon"))
        for name in SAMPLERS:
            sample(name, denoiser, x, config, 4, progress=False)
    finally:
        samplers_module.guided_step = saved


def _vq_steps(label, batches, recorder):
    """discrete_step as sample_discrete calls it: each step with noise, and the noiseless x0
    call of a callback; guided or not, truncated or not (ITHQ: 4096 codes + the mask class)."""
    from ..ops.reference import DS_NUM_COEFFS
    from ..ops.triton.discrete_step import discrete_step_triton

    classes, tokens = 4096, 1024
    for batch in batches:
        for guided in (True, False):
            for truncation in (0.86, 1.0):
                for noised in (True, False):
                    with recording() as launches:
                        discrete_step_triton(
                            _meta((batch, tokens), torch.int64), _meta((batch, classes, tokens), torch.float32),
                            _meta((batch, classes, tokens), torch.float32) if guided else None,
                            _meta((1,), torch.float32) if guided else None,
                            _meta((1, DS_NUM_COEFFS), torch.float32),
                            _meta((batch, classes + 1, tokens), torch.float32) if noised else None,
                            truncation, False)
                    recorder.records += [Recorded(launch, f"{label} B{batch}: discrete_step K={classes + 1} "
                                                          f"N={tokens} cfg={guided} truncation={truncation} "
                                                          f"noise={noised}") for launch in launches]


def _generic_attention(label, dtype, recorder):
    """Head dims no family uses but ops.attention accepts (up to 256), self and cross, masked
    or not: a user's own model must not meet a launch that cannot run either."""
    tuning, recorder.tuning = recorder.tuning, False  # the heuristic's configs only
    for d in (16, 32, 48, 96, 128, 192, 256):
        for lq, lk, masked in ((4096, 77, False), (4096, 77, True), (1024, 1024, False), (77, 77, False)):
            recorder.label = label
            q = _meta((2, lq, 8, d), dtype).transpose(1, 2)
            k = _meta((2, lk, 8, d), dtype).transpose(1, 2)
            recorder.attention(q, k, k, _meta((2, lk), torch.bool) if masked else None)
    recorder.tuning = tuning


def family_launches(dtypes: Sequence[torch.dtype] = tuple(DTYPES.values()), batches: Sequence[int] = (1, 4),
                    tuning: bool = True, families: Sequence[str] = ("sd", "glide", "vq", "generic")) -> List[Recorded]:
    """Every Triton launch fastdiff makes for the three families (see the module docstring)."""
    records: List[Recorded] = []
    for dtype in dtypes:
        tag = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        recorder = _OpRecorder("", tuning)
        if "sd" in families:
            for size in (512, 768):
                _sd_models(f"SD 1.5 {size} {tag}", SD15_UNET, size, dtype, batches, recorder)
                _sd_models(f"SD 2.x {size} {tag}", dict(SD2_UNET, upcast_attention=size == 768), size, dtype,
                           batches, recorder)
                for batch in batches:
                    _sampler_steps(f"SD {size} {tag} B{batch}", (batch, 4, size // 8, size // 8), dtype, recorder,
                                   glide=False)
        if "glide" in families:
            _glide_models(f"GLIDE {tag}", dtype, batches, recorder)
            for batch in batches:
                _sampler_steps(f"GLIDE 64 {tag} B{batch}", (batch, 3, 64, 64), dtype, recorder, glide=True)
                _sampler_steps(f"GLIDE 256 {tag} B{batch}", (batch, 3, 256, 256), dtype, recorder, glide=True)
        if "vq" in families:
            _vq_models(f"VQ-Diffusion ITHQ {tag}", dtype, batches, recorder)
        if "generic" in families:
            _generic_attention(f"other head dims {tag}", dtype, recorder)
        records += recorder.records
    if "vq" in families:  # discrete_step works in float32 log space whatever the model's dtype
        recorder = _OpRecorder("", tuning)
        _vq_steps("VQ-Diffusion ITHQ", batches, recorder)
        records += recorder.records
    return records
