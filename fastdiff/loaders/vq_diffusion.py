"""VQ-Diffusion components from a diffusers VQDiffusionPipeline folder.

Returns the keyword arguments of ``VQDiffusionPipeline``: fastdiff's VQ-VAE and transformer,
fastdiff's CLIP text encoder and tokenizer (read from transformers' folder formats), the
discrete schedule and the learned null-text embedding (None when the folder says it is not
learnable).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Union

from ..sampling.discrete import DiscreteScheduleConfig
from . import diffusers_folder as folder_io
from .quiet import quiet_loading

NULL_EMBEDDINGS = "learned_classifier_free_sampling_embeddings"
REQUIRED = ("vqvae", "transformer", "text_encoder", "tokenizer", "scheduler", NULL_EMBEDDINGS)


def load_scheduler_config(path: str) -> DiscreteScheduleConfig:
    scheduler_dir = folder_io.component_dir(path, "scheduler")
    config = folder_io.read_json(os.path.join(scheduler_dir, "scheduler_config.json"))
    if config.get("_class_name", "VQDiffusionScheduler") != "VQDiffusionScheduler":
        raise ValueError(f"{scheduler_dir}: scheduler {config.get('_class_name')!r} is not a "
                         f"VQDiffusionScheduler")
    if "num_vec_classes" not in config:
        raise ValueError(f"{scheduler_dir}/scheduler_config.json lacks num_vec_classes")
    return DiscreteScheduleConfig.from_dict(config)


def load_folder(path: Union[str, os.PathLike], *, device=None, dtype=None) -> Dict[str, Any]:
    """dict(vqvae, transformer, text_encoder, tokenizer, scheduler_config, null_embeddings)."""
    from ..models.discrete_transformer import VQDiffusionTransformer
    from ..models.vqvae import VQModel

    path = os.fspath(path)
    index = folder_io.read_model_index(path)
    folder_io.check_components(path, index, REQUIRED, "VQ-Diffusion")
    # Every config first (cheap), so a bad one is reported before any weights are read.
    folder_io.check_component_configs(path, {"vqvae": VQModel, "transformer": VQDiffusionTransformer})
    scheduler_config = load_scheduler_config(path)
    with quiet_loading():
        vqvae = folder_io.load_module(VQModel, path, "vqvae", device, dtype)
        transformer = folder_io.load_module(VQDiffusionTransformer, path, "transformer", device, dtype)
        text_encoder = folder_io.load_text_encoder(path, device=device, dtype=dtype)
        tokenizer = folder_io.load_tokenizer(path)
    null = folder_io.load_learned_null_embeddings(path, NULL_EMBEDDINGS)
    if null is not None:
        null = null.to(device=device, dtype=dtype)
    return dict(vqvae=vqvae, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler_config=scheduler_config, null_embeddings=null)
