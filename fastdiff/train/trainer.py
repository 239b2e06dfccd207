"""Training a small latent text-to-image model made of fastdiff's own modules.

Stage 1, ``train_autoencoder``: a KL autoencoder (L1 + L2 reconstruction, small KL), saved as
<output>/vae with scaling_factor = 1 / std of its latents, as Stable Diffusion sets it.

Stage 2, ``train_text2img``: the UNet and a CLIP text encoder, trained jointly from random
init on the frozen VAE's latents; the EMA weights are exported with the tokenizer and a
scheduler config into a diffusers StableDiffusionPipeline folder that
``fastdiff.Pipeline.from_pretrained`` loads.

Why the text encoder trains with the UNet rather than staying frozen at random init: a
random CLIP only mixes token embeddings causally, so the UNet alone would have to untangle
"red" that belongs to the first object from "red" of the second. Trained, the encoder
learns that binding directly, costs ~5% of a step (3 layers over 20 tokens), and the
gradient reaches it through every cross-attention, as in LDM's text-to-image models,
whose transformer encoder was trained jointly from scratch.

Determinism: torch.manual_seed(seed) before building the networks, one CPU generator for
every draw of the loop (posterior samples, timesteps, noise, caption dropout), data
streams seeded from the same seed and read in the main process.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Dict

import torch

from ..loaders import diffusers_folder as folder_io
from ..models import AutoencoderKL
from ..sampling.noise import randn
from . import objectives as obj
from .config import TrainConfig
from .data import make_dataset
from .export import export_pipeline, update_training_log
from .loop import StageResult, TrainingLoop, resolve_device, run_environment, uses_bf16
from .models import (build_text_encoder, build_unet, build_vae, enable_gradient_checkpointing, parameter_count,
                     save_diffusers_weights, vae_config)
from .tokenizer import build_tokenizer, load_tokenizer

# Offsets so each stage and the scaling measurement read their own streams from one seed.
VAE_STREAM, TEXT2IMG_STREAM, SCALING_STREAM = 0, 1, 2


def _stream(cfg: TrainConfig, stream: int):
    """The run's training data for one stage (or the scaling measurement), from its own seed."""
    return make_dataset(cfg.data, cfg.image_size, cfg.seed * 2 + stream, **dataclasses.asdict(cfg.procedural))


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1009 + stream)


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Drawn in float32 on the (CPU) generator, then moved and cast: the same numbers on every
    device and in every training dtype."""
    return randn(x.shape, generator=generator, device=x.device).to(x.dtype)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# ---------------------------------------------------------------------------------------------- stage 1


def train_autoencoder(cfg: TrainConfig) -> StageResult:
    """Stage 1: train the VAE and save it as <output>/vae (diffusers AutoencoderKL layout)."""
    device = resolve_device(cfg)
    bf16 = uses_bf16(cfg, device)
    v = cfg.vae_training
    with run_environment(cfg, device):
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg).to(device)
        data = _stream(cfg, VAE_STREAM)
        generator = _generator(cfg.seed, VAE_STREAM)
        loop = TrainingLoop("vae", cfg, v.steps, {"vae": vae}, lr=v.lr, weight_decay=v.weight_decay,
                            warmup_steps=v.warmup_steps, lr_schedule="constant", grad_clip=v.grad_clip,
                            ema_decay=None, data=data, generator=generator)
        loop.resume()

        def step_loss() -> torch.Tensor:
            images, _ = data.next_batch(v.batch_size)
            images = images.to(device)
            with _autocast(device, bf16):
                mean, logvar = vae.encode(images)
                z = mean + torch.exp(0.5 * logvar) * _randn_like(mean, generator)
                recon = vae.decode(z).float()
            error = recon - images
            per_image = (v.l1_weight * error.abs().flatten(1).sum(1) + v.l2_weight * error.pow(2).flatten(1).sum(1)
                         + v.kl_weight * obj.kl_to_standard_normal(mean.float(), logvar.float()))
            return (per_image / images[0].numel()).mean()

        result = loop.run(step_loss)
        vae.eval()
        scaling = latent_scaling_factor(cfg, vae, device, bf16)
        config = dict(vae_config(cfg), scaling_factor=scaling)
        save_diffusers_weights(vae.state_dict(), os.path.join(cfg.output, "vae"), "AutoencoderKL", config)
    result.summary = dict(steps=result.steps, batch_size=v.batch_size, lr=v.lr, final_loss=result.final_loss,
                          first_loss=result.losses[0] if result.losses else None, wall_time_s=result.wall_time_s,
                          scaling_factor=scaling, parameters=parameter_count(vae), device=str(device),
                          precision="bf16" if bf16 else "fp32", threads=torch.get_num_threads()
                          if cfg.num_threads is None else cfg.num_threads)
    update_training_log(cfg.output, "vae", result.summary)
    return result


@torch.no_grad()
def latent_scaling_factor(cfg: TrainConfig, vae: AutoencoderKL, device: torch.device, bf16: bool) -> float:
    """1 / std of the latents stage 2 will see (posterior samples or means), over fresh images."""
    data = _stream(cfg, SCALING_STREAM)
    generator = _generator(cfg.seed, SCALING_STREAM)
    latents, remaining = [], cfg.vae_training.scaling_images
    while remaining > 0:
        images, _ = data.next_batch(min(64, remaining))
        remaining -= images.shape[0]
        with _autocast(device, bf16):
            mean, logvar = vae.encode(images.to(device))
        mean, logvar = mean.float(), logvar.float()
        z = mean + torch.exp(0.5 * logvar) * _randn_like(mean, generator) if cfg.diffusion.latent_sample else mean
        latents.append(z.cpu())
    return float(1.0 / torch.cat(latents).double().std())


# ---------------------------------------------------------------------------------------------- stage 2


def _load_frozen_vae(cfg: TrainConfig, device: torch.device) -> AutoencoderKL:
    vae_dir = os.path.abspath(cfg.vae_path or os.path.join(cfg.output, "vae"))
    if not os.path.isfile(os.path.join(vae_dir, "config.json")):
        raise FileNotFoundError(f"no trained VAE at {vae_dir}: run stage 1 first (fastdiff train --stage vae) "
                                f"or give an existing diffusers VAE folder with --vae")
    vae = folder_io.load_module(AutoencoderKL, os.path.dirname(vae_dir), os.path.basename(vae_dir), device=device)
    if vae.config["latent_channels"] != cfg.autoencoder.latent_channels or \
            vae.config["sample_size"] != cfg.image_size:
        raise ValueError(f"the VAE at {vae_dir} has {vae.config['latent_channels']} latent channels and sample "
                         f"size {vae.config['sample_size']}; this run needs {cfg.autoencoder.latent_channels} and "
                         f"{cfg.image_size}")
    return vae.requires_grad_(False)


def _tokenizer(cfg: TrainConfig, data):
    folder = os.path.join(cfg.output, "tokenizer")
    if cfg.resume and os.path.isfile(os.path.join(folder, "vocab.json")):
        return load_tokenizer(folder)
    if cfg.init_from:  # the text encoder's embedding rows belong to that run's vocabulary
        source = folder_io.component_dir(cfg.init_from, "tokenizer")
        if os.path.abspath(source) != os.path.abspath(folder):
            shutil.copytree(source, folder, dirs_exist_ok=True)
        return load_tokenizer(folder)
    return build_tokenizer(data.tokenizer_texts(), folder, cfg.text_encoder.max_positions,
                           cfg.text_encoder.max_vocab)


def _initialise_from(cfg: TrainConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Start stage 2 from the unet and text encoder of an exported pipeline folder (e.g. an earlier
    run's output, whose EMA weights it holds); the architectures must be this run's."""
    from ..loaders.files import find_weights, load_state_dict_file, state_dict_problems

    for name, module, stems in (("unet", unet, ("diffusion_pytorch_model",)),
                                ("text_encoder", text_encoder, ("model", "pytorch_model"))):
        path = find_weights(folder_io.component_dir(cfg.init_from, name), stems=stems)
        state = load_state_dict_file(path)
        problems = state_dict_problems(module.state_dict(), state)
        if problems:
            raise ValueError(f"--init-from {cfg.init_from}: its {name} does not fit this run's architecture ("
                             + "; ".join(problems) + ")")
        module.load_state_dict(state, strict=True)


def train_text2img(cfg: TrainConfig) -> StageResult:
    """Stage 2: train UNet (+ text encoder) on the frozen VAE's latents, then export the pipeline folder."""
    device = resolve_device(cfg)
    bf16 = uses_bf16(cfg, device)
    d = cfg.diffusion
    with run_environment(cfg, device):
        vae = _load_frozen_vae(cfg, device)
        data = _stream(cfg, TEXT2IMG_STREAM)
        tokenizer = _tokenizer(cfg, data)
        torch.manual_seed(cfg.seed)
        text_encoder = build_text_encoder(cfg, tokenizer).to(device)
        unet = build_unet(cfg).to(device)
        if cfg.init_from:
            _initialise_from(cfg, unet, text_encoder)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(unet)
        trainable = {"unet": unet}
        if d.train_text_encoder:
            trainable["text_encoder"] = text_encoder
        else:
            text_encoder.requires_grad_(False).eval()
        generator = _generator(cfg.seed, TEXT2IMG_STREAM)
        loop = TrainingLoop("text2img", cfg, d.steps, trainable, lr=d.lr, weight_decay=d.weight_decay,
                            warmup_steps=d.warmup_steps, lr_schedule=d.lr_schedule, grad_clip=d.grad_clip,
                            ema_decay=d.ema_decay, data=data, generator=generator,
                            lr_scales={"text_encoder": d.text_encoder_lr_scale})
        loop.resume()

        alphas_cumprod = obj.training_alphas_cumprod(d).float().to(device)
        p2 = obj.p2_weights(alphas_cumprod.double(), d.p2_gamma, d.p2_k).float()
        scaling = vae.scaling_factor
        max_length = tokenizer.model_max_length

        def step_loss() -> torch.Tensor:
            images, captions = data.next_batch(d.batch_size)
            captions = obj.drop_captions(captions, d.cond_dropout, generator)
            with torch.no_grad(), _autocast(device, bf16):
                mean, logvar = vae.encode(images.to(device))
            mean, logvar = mean.float(), logvar.float()
            z = mean + torch.exp(0.5 * logvar) * _randn_like(mean, generator) if d.latent_sample else mean
            x0 = z * scaling
            t = torch.randint(0, d.num_train_timesteps, (x0.shape[0],), generator=generator).to(device)
            noise = _randn_like(x0, generator)
            alpha_bar = alphas_cumprod[t]
            x_t = obj.noised(x0, noise, alpha_bar)
            # the pipeline's exact text path: pad to model_max_length, no attention mask, last hidden state
            ids = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            with _autocast(device, bf16), torch.set_grad_enabled(d.train_text_encoder):
                context = text_encoder(ids)[0]
            with _autocast(device, bf16):
                prediction = unet(x_t, t, encoder_hidden_states=context).float()
            per_sample = (prediction - obj.target(x0, noise, alpha_bar, d.prediction_type)).pow(2).flatten(1).mean(1)
            return (per_sample * p2[t]).mean()

        result = loop.run(step_loss)
    result.summary = dict(
        steps=result.steps, batch_size=d.batch_size, lr=d.lr, final_loss=result.final_loss,
        first_loss=result.losses[0] if result.losses else None, wall_time_s=result.wall_time_s,
        parameters_unet=parameter_count(unet), parameters_text_encoder=parameter_count(text_encoder),
        device=str(device), precision="bf16" if bf16 else "fp32",
        threads=torch.get_num_threads() if cfg.num_threads is None else cfg.num_threads)
    update_training_log(cfg.output, "text2img", result.summary)
    export_pipeline(cfg, unet, text_encoder, loop.ema)
    return result


def train(cfg: TrainConfig, stage: str = "all") -> Dict[str, StageResult]:
    """Both stages (or one: stage="vae" / "text2img"); stage 1 is skipped when cfg.vae_path names a VAE."""
    if stage not in ("all", "vae", "text2img"):
        raise ValueError(f"unknown stage {stage!r}; valid: all, vae, text2img")
    results: Dict[str, StageResult] = {}
    if stage in ("all", "vae") and cfg.vae_path is None:
        results["vae"] = train_autoencoder(cfg)
    if stage in ("all", "text2img"):
        results["text2img"] = train_text2img(cfg)
    return results

