"""Tiny random Stable Diffusion pipelines, saved by diffusers itself into a temp folder.

Everything is built locally: a byte-level CLIP BPE tokenizer (vocab.json + merges.txt),
a CLIP text encoder, a UNet and a VAE with random weights (every parameter, so
zero-initialised layers cannot hide a bug).
"""
import json
import os

import torch

CONFIGS = {
    # SD 1.x-like: int attention_head_dim, conv projections, epsilon, CLIP-L-style quick_gelu
    "sd1": dict(unet=dict(attention_head_dim=8, use_linear_projection=False, upcast_attention=False),
                text=dict(hidden_act="quick_gelu"), prediction_type="epsilon"),
    # SD 2.x-like: per-level head counts, linear projections, upcast attention, v-prediction, gelu
    "sd2": dict(unet=dict(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True),
                text=dict(hidden_act="gelu"), prediction_type="v_prediction"),
}


def _bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder, max_length=16):
    os.makedirs(folder, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "b l", "bl u", "blu e</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({"model_max_length": max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "tokenizer_class": "CLIPTokenizer"}, fh)
    return len(vocab)


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return module


def make_pipeline(folder, kind="sd1", scheduler="PNDMScheduler", seed=0, unet_channels=(32, 64)):
    """Save a tiny random diffusers StableDiffusionPipeline under `folder`; return it.
    unet_channels: the UNet's levels (cross-attention in all but the deepest, as SD's)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = CONFIGS[kind]
    tok_dir = os.path.join(folder, "_tok")
    vocab = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    text_encoder = randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        pad_token_id=vocab - 1, **cfg["text"])), seed)
    unet = randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (len(unet_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(unet_channels) - 1),
        cross_attention_dim=32, norm_num_groups=16, **cfg["unet"]), seed + 1)
    vae = randomize(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64), seed + 2)
    sched_cls = getattr(diffusers, scheduler)
    sched = sched_cls.from_config(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=cfg["prediction_type"], set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
        clip_sample=False))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # Compare against the pipeline as a user gets it, loaded from the folder: an in-memory
    # scheduler remembers which keys took defaults and drops them when switching class.
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


DIFFUSERS_SCHEDULER = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler",
}


def with_scheduler(pipe, sampler):
    import diffusers

    cls = getattr(diffusers, DIFFUSERS_SCHEDULER[sampler.replace("_karras", "")])
    extra = {"use_karras_sigmas": True} if sampler.endswith("_karras") else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipe


def image_terms(pipe, unet_calls, gain=1.0, size=(64, 64), encode=False):
    """tests/tolerances.py `terms` of an image of fastdiff's SD pipeline `pipe`: `unet_calls`
    UNet calls in sequence, whose differences guidance amplifies by `gain`
    (tolerances.guidance_gain), then a VAE decode (after an encode for img2img), counted on
    its modules at this image size. The sampler's own arithmetic adds ~10 terms a step, and
    the text encoder is transformers' model on both sides."""
    from tolerances import reduction_terms

    (height, width), f = size, pipe.vae_scale_factor
    latents = torch.zeros(2, pipe.unet.config["in_channels"], height // f, width // f)
    context = torch.zeros(2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    unet = reduction_terms(pipe.unet, lambda: pipe.unet(latents, torch.tensor(500), context))
    vae = reduction_terms(pipe.vae, lambda: pipe.vae.decode(latents[:1]))
    if encode:
        vae += reduction_terms(pipe.vae, lambda: pipe.vae.encode(torch.zeros(1, 3, height, width)))
    return gain ** 2 * unet_calls * unet + vae


def generate_counting_unet_calls(pipe, *args, **kwargs):
    """pipe.generate(*args, **kwargs) and how many times it called its UNet."""
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    try:
        images = pipe.generate(*args, **kwargs)
    finally:
        hook.remove()
    return images, len(calls)
