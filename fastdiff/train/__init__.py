"""Training a small latent text-to-image model from fastdiff's own modules.

    from fastdiff.train import preset, train
    train(preset("default", output="my-model"))        # stage 1 (VAE), then stage 2 (UNet + text encoder)
    fastdiff.Pipeline.from_pretrained("my-model").generate("a red circle above a blue square")

Files: config (presets), data (procedural scenes, image+caption folders), tokenizer (CLIP BPE
learned from the captions), objectives (schedule, targets, P2, dropout), models (building,
saving, gradient checkpointing), state (EMA, checkpoints), loop (the shared optimisation
loop), trainer (the two stages), export (the diffusers folder and TRAINING.md), cli.

Names are resolved on first use (PEP 562), so `fastdiff train --help` (cli.py, which reads only
config.py) starts without importing torch.
"""
from .._lazy import lazy_names

_EXPORTS = {"TrainConfig": "config", "AutoencoderArch": "config", "UNetArch": "config", "TextEncoderArch": "config",
            "AutoencoderTraining": "config", "DiffusionTraining": "config", "PRESETS": "config", "preset": "config",
            "with_section": "config", "train": "trainer", "train_autoencoder": "trainer",
            "train_text2img": "trainer", "export_pipeline": "export", "StageResult": "loop"}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
