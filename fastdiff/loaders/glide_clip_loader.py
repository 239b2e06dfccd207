"""GLIDE's noised CLIP from local files: ``clip_image_enc.pt``, ``clip_text_enc.pt`` and
``bpe_simple_vocab_16e6.txt(.gz)``, shaped by glide's ``config.yaml`` values (or a
``config.json`` / ``config.yaml`` beside the weights).

The released weights are the state dicts of glide's encoders, whose names
``fastdiff.models.glide_clip`` keeps, so loading is strict; a file that does not fit is
reported by its first missing / unexpected keys and shape mismatches.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..guidance.clip import NoisedClip
from ..models.glide_clip import CLIP_DEFAULTS, ClipTextEncoder, NoisedClipImageEncoder
from .files import check_weights, load_state_dict_file, state_dict_problems
from .glide_tokenizers import ClipTokenizer, require_files

IMAGE_WEIGHTS, TEXT_WEIGHTS = "clip_image_enc.pt", "clip_text_enc.pt"
CLIP_BPE = "bpe_simple_vocab_16e6.txt"
ARCHITECTURE_KEYS = ("image_size", "patch_size", "n_vocab", "max_text_len", "n_embd", "n_head_state_text",
                     "n_head_text", "n_xf_blocks_text", "n_head_state_image", "n_head_image", "n_xf_blocks_image",
                     "n_timesteps")
SHOWN = 5  # mismatches named per kind in an error

PathLike = Union[str, "os.PathLike[str]"]


def load_strict(module: nn.Module, state: Mapping[str, Tensor], source: str, hint: str = "") -> None:
    """load_state_dict(strict=True), after turning any mismatch, integer tensor for a float weight,
    or NaN / infinite value into a ValueError that names it."""
    expected = module.state_dict()
    problems = state_dict_problems(expected, state)
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems) + (f". {hint}" if hint else ""))
    check_weights(state, source, expected, shown=SHOWN)
    module.load_state_dict(state, strict=True)


def _read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read {path}: not UTF-8 text ({exc})") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading {path} needs PyYAML; install it or write the config as config.json") from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of CLIP settings")
    return config


def clip_config(config: Union[None, PathLike, Mapping[str, Any]] = None,
                folder: Optional[PathLike] = None) -> Dict[str, Any]:
    """CLIP_DEFAULTS updated by `config` (a mapping or a .json / .yaml file), or by the folder's
    config.json / config.yaml when no config is given."""
    if config is None and folder is not None:
        for name in ("config.json", "config.yaml"):
            path = os.path.join(os.fspath(folder), name)
            if os.path.isfile(path):
                config = path
                break
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP config not found: {path}")
        config = _read_config(path)
    merged = {**CLIP_DEFAULTS, **dict(config or {})}
    bad = [k for k in ARCHITECTURE_KEYS if isinstance(merged[k], bool) or not isinstance(merged[k], int)
           or merged[k] < 0]
    if bad:
        shown = ", ".join(f"{k}={merged[k]!r}" for k in bad)
        raise ValueError(f"CLIP config values must be non-negative integers: {shown}")
    return merged


def _paths(folder: Optional[PathLike], image: Optional[PathLike], text: Optional[PathLike],
           bpe: Optional[PathLike]) -> Dict[str, str]:
    if folder is None:
        absent = [name for name, value in (("image", image), ("text", text), ("bpe", bpe)) if value is None]
        if absent:
            raise ValueError(f"give a folder, or every one of image=, text= and bpe= (missing: {', '.join(absent)})")
    folder = os.fspath(folder) if folder is not None else ""
    paths = {"image": os.fspath(image) if image is not None else os.path.join(folder, IMAGE_WEIGHTS),
             "text": os.fspath(text) if text is not None else os.path.join(folder, TEXT_WEIGHTS)}
    paths["bpe"] = os.fspath(bpe) if bpe is not None else require_files(folder, (CLIP_BPE,))[0]
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"noised CLIP file(s) not found: {', '.join(missing)}")
    return paths


def load_noised_clip(folder: Optional[PathLike] = None, *, image: Optional[PathLike] = None,
                     text: Optional[PathLike] = None, bpe: Optional[PathLike] = None,
                     config: Union[None, PathLike, Mapping[str, Any]] = None,
                     device: Union[str, torch.device] = "cpu") -> NoisedClip:
    """GLIDE's noised CLIP, in eval mode with frozen weights.

    folder holds clip_image_enc.pt, clip_text_enc.pt, bpe_simple_vocab_16e6.txt(.gz) and
    optionally config.json / config.yaml; image= / text= / bpe= / config= override single files
    (config may also be a mapping). Settings missing from the config take glide's defaults."""
    paths = _paths(folder, image, text, bpe)
    settings = clip_config(config, folder)
    tokenizer = ClipTokenizer.from_file(paths["bpe"])
    clip = NoisedClip(
        ClipTextEncoder(settings["n_vocab"], settings["max_text_len"], settings["n_embd"], settings["n_head_text"],
                        settings["n_xf_blocks_text"], settings["n_head_state_text"]),
        NoisedClipImageEncoder(settings["image_size"], settings["patch_size"], settings["n_embd"],
                               settings["n_head_image"], settings["n_xf_blocks_image"],
                               settings["n_head_state_image"], settings["n_timesteps"]),
        tokenizer, float(settings["logit_scale"]))
    hint = "Check the CLIP config (CLIP_DEFAULTS holds glide's values)."
    for part, module in (("image", clip.image_encoder), ("text", clip.text_encoder)):
        state = load_state_dict_file(paths[part])
        load_strict(module, state, paths[part], hint)
    if tokenizer.n_vocab > settings["n_vocab"]:
        raise ValueError(f"{paths['bpe']} gives {tokenizer.n_vocab} token ids but the text encoder embeds only "
                         f"{settings['n_vocab']}: the tokenizer does not belong to these weights")
    return clip.eval().requires_grad_(False).to(device)
