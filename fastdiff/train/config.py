"""What a training run is: architectures, the two stages' hyper-parameters, and the run's settings.

Two presets: ``tiny`` (tests: trains in seconds) and ``default`` (the shipped 64x64 model:
VAE f8 -> 4x8x8 latents, a two-level UNet, a 3-layer CLIP text encoder; ~24 MB of fp32
weights). ``preset(name, **overrides)`` builds one; nested fields are replaced with
``dataclasses.replace`` on the sub-config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("auto", "scaled_linear", "squaredcos_cap_v2")
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class AutoencoderArch:
    """diffusers AutoencoderKL: one DownEncoderBlock2D per entry; each but the last halves the side."""

    block_out_channels: Tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    # 4 groups: 4 channels per group at the first level, as SD's 128/32. One channel per group
    # (16/16) normalises each feature map on its own and the VAE then learns colours slowly.
    norm_num_groups: int = 4
    mid_block_attention: bool = True


@dataclass
class UNetArch:
    """UNet2DConditionModel with cross-attention at every level (relations need it at full latent size)."""

    block_out_channels: Tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    attention_heads: int = 4  # diffusers calls this `attention_head_dim` for SD-style UNets
    norm_num_groups: int = 16  # 4 and 8 channels per group (SD: 10 to 40); fewer keep the latents' colour code


@dataclass
class TextEncoderArch:
    """transformers CLIPTextModel, randomly initialised; its width is the UNet's cross_attention_dim."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 20  # also the tokenizer's model_max_length
    hidden_act: str = "quick_gelu"
    max_vocab: int = 16384  # cap on BPE vocabulary for large user caption sets


@dataclass
class ProceduralData:
    """The mix of the built-in scene stream (fastdiff.data.scenes.random_scene); unused for a user's data."""

    two_object_prob: float = 0.75  # the rest are one-object scenes
    place_prob: float = 0.8  # of one-object scenes: placed and captioned "... on the left"
    placed_pair_prob: float = 0.3  # of two-object scenes: captioned "... at the top and ... at the bottom"


# the mix of runs saved before the mix was a setting (a config without a "procedural" section)
RELATIONS_ONLY = ProceduralData(place_prob=0.0, placed_pair_prob=0.0)


@dataclass
class AutoencoderTraining:
    """Stage 1. Loss per image: (sum |x - x'| + sum (x - x')^2 + kl_weight * KL) / pixel values,
    the proportions of Stable Diffusion's VAE loss (which uses kl_weight 1e-6), without LPIPS/GAN."""

    steps: int = 1000
    batch_size: int = 8  # on CPU, twice the updates of batch 16 for ~the same images/s, and lower loss
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-6
    grad_clip: float = 1.0
    scaling_images: int = 512  # images encoded to measure the latents' std (scaling_factor = 1/std)


@dataclass
class DiffusionTraining:
    """Stage 2: UNet (+ text encoder) on frozen VAE latents."""

    # ~25 min on 2 CPU cores at the 1.5-1.85 steps/s measured (batch 32); stage 1's 1000 steps ~5 min
    steps: int = 2400
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 200
    lr_schedule: str = "constant"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    prediction_type: str = "v_prediction"
    # "auto": squaredcos_cap_v2 for v_prediction, scaled_linear for epsilon (see objectives.py)
    beta_schedule: str = "auto"
    num_train_timesteps: int = 1000
    p2_gamma: float = 0.0  # 0 = the plain loss
    p2_k: float = 1.0
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    latent_sample: bool = True  # sample the VAE posterior (as SD) rather than take its mean
    train_text_encoder: bool = True
    text_encoder_lr_scale: float = 1.0  # the text encoder's learning rate = lr x this


@dataclass
class TrainConfig:
    output: str = "fastdiff-model"
    preset: str = "default"
    data: str = "procedural"  # or a folder of name.png + name.txt, or a .jsonl of {"image", "text"}
    image_size: int = 64
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    precision: str = "auto"  # "auto" = bf16 autocast on CUDA, fp32 on CPU
    num_threads: Optional[int] = None  # torch CPU threads while training; None leaves torch's setting
    gradient_checkpointing: bool = False
    progress: bool = True
    checkpoint_every: int = 500  # steps between checkpoints; 0 = only when a stage ends
    resume: bool = False
    vae_path: Optional[str] = None  # an existing diffusers VAE folder for stage 2 (default: <output>/vae)
    init_from: Optional[str] = None  # a pipeline folder whose unet, text encoder and tokenizer start stage 2
    command: Optional[str] = None  # how the run was started, for TRAINING.md
    autoencoder: AutoencoderArch = field(default_factory=AutoencoderArch)
    unet: UNetArch = field(default_factory=UNetArch)
    text_encoder: TextEncoderArch = field(default_factory=TextEncoderArch)
    procedural: ProceduralData = field(default_factory=ProceduralData)
    vae_training: AutoencoderTraining = field(default_factory=AutoencoderTraining)
    diffusion: DiffusionTraining = field(default_factory=DiffusionTraining)

    def __post_init__(self):
        check_config(self)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.autoencoder.block_out_channels) - 1)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        nested = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = dict(autoencoder=AutoencoderArch, unet=UNetArch, text_encoder=TextEncoderArch,
                     procedural=ProceduralData, vae_training=AutoencoderTraining, diffusion=DiffusionTraining)
        kwargs = {}
        for key, value in data.items():
            if key not in nested:
                raise ValueError(f"unknown training config key {key!r}")
            kwargs[key] = kinds[key](**_tuples(value)) if key in kinds else value
        kwargs.setdefault("procedural", RELATIONS_ONLY)
        return cls(**kwargs)


def _tuples(section: Dict[str, Any]) -> Dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}


def _choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the first setting that cannot work."""
    d, v = cfg.diffusion, cfg.vae_training
    _choice("diffusion.prediction_type", d.prediction_type, PREDICTION_TYPES)
    _choice("diffusion.beta_schedule", d.beta_schedule, BETA_SCHEDULES)
    _choice("diffusion.lr_schedule", d.lr_schedule, LR_SCHEDULES)
    _choice("precision", cfg.precision, PRECISIONS)
    for name, value in (("diffusion.steps", d.steps), ("vae_training.steps", v.steps),
                        ("diffusion.batch_size", d.batch_size), ("vae_training.batch_size", v.batch_size),
                        ("image_size", cfg.image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cfg.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    if not 0.0 <= d.cond_dropout < 1.0:
        raise ValueError(f"diffusion.cond_dropout must be in [0, 1), got {d.cond_dropout}")
    if not 0.0 <= d.ema_decay < 1.0:
        raise ValueError(f"diffusion.ema_decay must be in [0, 1), got {d.ema_decay}")
    if d.p2_gamma < 0 or d.p2_k <= 0:
        raise ValueError(f"P2 weighting needs p2_gamma >= 0 and p2_k > 0, got {d.p2_gamma}, {d.p2_k}")
    for name, lr in (("diffusion.lr", d.lr), ("vae_training.lr", v.lr),
                     ("diffusion.text_encoder_lr_scale", d.text_encoder_lr_scale)):
        if not lr > 0:
            raise ValueError(f"{name} must be positive, got {lr}")
    for name, value in dataclasses.asdict(cfg.procedural).items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"procedural.{name} must be in [0, 1], got {value}")
    factor = 2 ** (len(cfg.autoencoder.block_out_channels) - 1)
    if cfg.image_size % factor:
        raise ValueError(f"image_size {cfg.image_size} must be a multiple of the VAE's downsampling factor {factor}")
    levels = len(cfg.unet.block_out_channels)
    if cfg.latent_size % 2 ** (levels - 1):
        raise ValueError(f"latents of side {cfg.latent_size} cannot be halved {levels - 1} times by the UNet")
    if cfg.text_encoder.hidden_size % cfg.text_encoder.num_heads:
        raise ValueError("text_encoder.hidden_size must be divisible by text_encoder.num_heads")


def _tiny() -> TrainConfig:
    return TrainConfig(
        preset="tiny", image_size=16, checkpoint_every=0,
        autoencoder=AutoencoderArch(block_out_channels=(8, 16), norm_num_groups=4, mid_block_attention=False),
        unet=UNetArch(block_out_channels=(16, 32), attention_heads=2, norm_num_groups=8),
        text_encoder=TextEncoderArch(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                     max_positions=16),
        vae_training=AutoencoderTraining(steps=30, batch_size=8, lr=3e-3, warmup_steps=5, scaling_images=32),
        diffusion=DiffusionTraining(steps=30, batch_size=8, lr=2e-3, warmup_steps=5, ema_decay=0.9))


PRESETS = {"tiny": _tiny, "default": TrainConfig}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset with top-level fields replaced; pass a sub-config (e.g. ``diffusion=...``) to replace a section."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides)


def with_section(cfg: TrainConfig, section: str, **changes: Any) -> TrainConfig:
    """cfg with some fields of one nested section changed, e.g. with_section(cfg, "diffusion", steps=10)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
