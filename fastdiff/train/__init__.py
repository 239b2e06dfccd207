"""Training a small latent text-to-image model from fastdiff's own modules.

    from fastdiff.train import preset, train
    train(preset("default", output="my-model"))        # stage 1 (VAE), then stage 2 (UNet + text encoder)
    fastdiff.Pipeline.from_pretrained("my-model").generate("a red circle above a blue square")

Files: config (presets), data (procedural scenes, image+caption folders), tokenizer (CLIP BPE
learned from the captions), objectives (schedule, targets, P2, dropout), models (building,
saving, gradient checkpointing), state (EMA, checkpoints), loop (the shared optimisation
loop), trainer (the two stages), export (the diffusers folder and TRAINING.md), cli.
"""
from .config import (AutoencoderArch, AutoencoderTraining, DiffusionTraining, PRESETS, TextEncoderArch,
                     TrainConfig, UNetArch, preset, with_section)
from .export import export_pipeline
from .loop import StageResult
from .trainer import train, train_autoencoder, train_text2img

__all__ = ["TrainConfig", "AutoencoderArch", "UNetArch", "TextEncoderArch", "AutoencoderTraining",
           "DiffusionTraining", "PRESETS", "preset", "with_section", "train", "train_autoencoder",
           "train_text2img", "export_pipeline", "StageResult"]
