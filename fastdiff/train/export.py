"""Writing a trained model as a diffusers StableDiffusionPipeline folder, with TRAINING.md beside it.

    <output>/model_index.json  (with `_fastdiff_defaults`: the sampling settings generate uses by default)
    <output>/unet/          config.json + diffusion_pytorch_model.safetensors (EMA weights)
    <output>/vae/           config.json + diffusion_pytorch_model.safetensors (scaling_factor set)
    <output>/text_encoder/  transformers CLIPTextModel (EMA weights when trained)
    <output>/tokenizer/     CLIPTokenizer files
    <output>/scheduler/     scheduler_config.json (DPM-Solver++ 2M over the training schedule)
    <output>/TRAINING.md    command, config, seed, steps, losses, wall time, versions
    <output>/training_log.json, <output>/checkpoints/ (to resume; not needed for inference)
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
from typing import Dict, Optional

import torch
from torch import nn

from . import objectives as obj
from .config import TrainConfig
from .models import DIFFUSERS_VERSION, save_diffusers_weights, save_text_encoder, unet_config
from .state import EMA

LOG_NAME = "training_log.json"

# What `fastdiff generate` and Pipeline.generate use when not told otherwise (model_index.json
# `_fastdiff_defaults`, read by fastdiff.pipelines.base): the settings the built-in model, trained
# by this trainer, measured best at (README, *Evaluation of the built-in model*: guidance 3 over
# 20 DPM-Solver++ steps, the scheduler this folder is written with), not SD's 50 steps at 7.5.
SAMPLING_DEFAULTS = {"guidance_scale": 3.0, "num_inference_steps": 20, "sampler": "dpmpp_2m"}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "_fastdiff_defaults": SAMPLING_DEFAULTS,
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def averaged_state(name: str, module: nn.Module, ema: Optional[EMA]) -> Dict[str, torch.Tensor]:
    """module's state dict with its parameters replaced by their EMA (when `ema` tracks it)."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    if ema is not None and name in ema.modules:
        for key, _ in module.named_parameters():
            state[key] = ema.shadow[f"{name}.{key}"]
    return state


def _write_json(path: str, data: Dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def export_pipeline(cfg: TrainConfig, unet: nn.Module, text_encoder: nn.Module, ema: Optional[EMA] = None,
                    output: Optional[str] = None) -> str:
    """Write the pipeline folder (the VAE and tokenizer must already be in <cfg.output>, or cfg.vae_path)."""
    output = output or cfg.output
    vae_dir = os.path.join(output, "vae")
    if cfg.vae_path is not None and os.path.abspath(cfg.vae_path) != os.path.abspath(vae_dir):
        shutil.copytree(cfg.vae_path, vae_dir, dirs_exist_ok=True)
    tokenizer_dir = os.path.join(output, "tokenizer")
    source_tokenizer = os.path.join(cfg.output, "tokenizer")
    if os.path.abspath(source_tokenizer) != os.path.abspath(tokenizer_dir):
        shutil.copytree(source_tokenizer, tokenizer_dir, dirs_exist_ok=True)
    save_diffusers_weights(averaged_state("unet", unet, ema), os.path.join(output, "unet"), "UNet2DConditionModel",
                           unet_config(cfg))
    save_text_encoder(text_encoder, averaged_state("text_encoder", text_encoder, ema),
                      os.path.join(output, "text_encoder"))
    _write_json(os.path.join(output, "scheduler", "scheduler_config.json"), obj.scheduler_config(cfg.diffusion))
    _write_json(os.path.join(output, "model_index.json"), MODEL_INDEX)
    write_training_md(cfg, output)
    return output


def update_training_log(output: str, stage: str, summary: Dict) -> None:
    path = os.path.join(output, LOG_NAME)
    log = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            log = json.load(fh)
    log[stage] = dict(summary, finished=datetime.datetime.now().isoformat(timespec="seconds"))
    _write_json(path, log)


def _weights_mb(output: str) -> Dict[str, float]:
    sizes = {}
    for component in ("unet", "vae", "text_encoder"):
        folder = os.path.join(output, component)
        if os.path.isdir(folder):
            sizes[component] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                                   if f.endswith(".safetensors")) / 2**20
    return sizes


def _stage_lines(name: str, summary: Optional[Dict]) -> str:
    if not summary:
        return f"| {name} | (not run here) | | | | |\n"
    steps, wall = summary["steps"], summary["wall_time_s"]
    rate = steps / wall if wall else float("nan")
    first = "" if summary.get("first_loss") is None else f" (first step {summary['first_loss']:.4f})"
    return (f"| {name} | {steps} | {summary['batch_size']} | {summary['final_loss']:.5f}{first} "
            f"| {wall / 60:.1f} min ({wall:.0f} s) | {rate:.2f} |\n")


def write_training_md(cfg: TrainConfig, output: str) -> None:
    import fastdiff

    log = {}
    log_path = os.path.join(cfg.output, LOG_NAME)
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8") as fh:
            log = json.load(fh)
    d = cfg.diffusion
    sizes = _weights_mb(output)
    command = cfg.command or "Python API: fastdiff.train.train(TrainConfig(...)) with the config below"
    run = log.get("text2img", {})
    latents = f"{cfg.autoencoder.latent_channels}x{cfg.latent_size}x{cfg.latent_size}"
    size_text = ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items())
    averaged = "unet and text_encoder" if d.train_text_encoder else "unet"
    text_mode = "trained jointly with the UNet" if d.train_text_encoder else "frozen at random init"
    data_text = f"`{cfg.data}`"
    if cfg.data == "procedural":
        mix = cfg.procedural
        data_text += (f" (two-object scenes {mix.two_object_prob:g}; one-object scenes captioned with their "
                      f"place {mix.place_prob:g}; two-object scenes captioned place by place "
                      f"{mix.placed_pair_prob:g})")
    vae_text = f" (copied from `{cfg.vae_path}`)" if cfg.vae_path else ""
    text = f"""# Training record

Trained with fastdiff's trainer (`fastdiff/train/`); a diffusers `StableDiffusionPipeline` folder
that `fastdiff.Pipeline.from_pretrained("{output}")` loads.

## Command

```
{command}
```

## Run

- fastdiff {fastdiff.__version__}, torch {torch.__version__}, Python {platform.python_version()} on {platform.machine()}
- preset `{cfg.preset}`, data {data_text}, image size {cfg.image_size}, latents {latents}
- seed {cfg.seed}; device {run.get('device', cfg.device)}, precision {run.get('precision', cfg.precision)}, CPU threads {run.get('threads', cfg.num_threads)}
- weights (fp32 safetensors): {size_text}; total {sum(sizes.values()):.1f} MB
- VAE scaling_factor: {log.get('vae', {}).get('scaling_factor', 'from the given VAE')}{vae_text}

| stage | steps | batch | final loss (mean of last 100) | wall time | steps/s |
|---|---|---|---|---|---|
{_stage_lines("1: autoencoder", log.get("vae"))}{_stage_lines("2: text-to-image", log.get("text2img"))}
## Diffusion

- objective: {d.prediction_type}, noise schedule {obj.beta_schedule_for(d)} over {d.num_train_timesteps} steps
- P2 weighting: gamma {d.p2_gamma}, k {d.p2_k}{" (off)" if d.p2_gamma == 0 else ""}; caption dropout {d.cond_dropout}
- EMA decay {d.ema_decay}: the exported {averaged} hold the EMA weights; text encoder {text_mode}
- sampler: scheduler/scheduler_config.json is DPMSolverMultistepScheduler (DPM-Solver++ 2M) on the same schedule

Sample with, e.g. (model_index.json's `_fastdiff_defaults` gives {SAMPLING_DEFAULTS["num_inference_steps"]} steps of
{SAMPLING_DEFAULTS["sampler"]} at guidance {SAMPLING_DEFAULTS["guidance_scale"]:g} unless told otherwise):

```
fastdiff generate "a red circle above a blue square" --model {output}
```

## Config

```json
{json.dumps(cfg.to_dict(), indent=2)}
```
"""
    with open(os.path.join(output, "TRAINING.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
