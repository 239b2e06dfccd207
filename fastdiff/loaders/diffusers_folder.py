"""Reading a diffusers pipeline folder: model_index.json and one folder per component.

Configs and weights load from the local folder only; a missing file, an unsupported
component or a corrupt weight file is an error that names it.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from .files import CheckpointError, check_weights, find_weights, load_state_dict_file, state_dict_problems


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def read_model_index(folder: str) -> Dict[str, Optional[tuple]]:
    """{"_class_name": ..., component: (library, class) or None} from model_index.json."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    path = os.path.join(folder, "model_index.json")
    index = read_json(path)
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object (\"_class_name\" and one entry per component), "
                         f"got a JSON {type(index).__name__}")
    return index


def _prefixed(source: str, make):
    try:
        return make()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def check_config(module_cls, config, source: str) -> None:
    """module_cls.check_config(config) (builds nothing); an error is prefixed by `source`, the file."""
    if not isinstance(config, dict):
        raise ValueError(f"{source} must hold a JSON object of {module_cls.__name__} settings, "
                         f"got {type(config).__name__}")
    _prefixed(source, lambda: module_cls.check_config(config))


def build_module(module_cls, config, source: str) -> torch.nn.Module:
    """module_cls.from_config(config) after check_config; a config error is prefixed by `source`, the file."""
    check_config(module_cls, config, source)
    return _prefixed(source, lambda: module_cls.from_config(config))


def check_component_configs(folder: str, components: Dict[str, type]) -> None:
    """Every {name: module class} config of a folder checked before any module is built or weight read."""
    for name, module_cls in components.items():
        config_file = os.path.join(component_dir(folder, name), "config.json")
        check_config(module_cls, read_json(config_file), config_file)


def check_components(folder: str, index: dict, required, family: str) -> None:
    """ValueError naming the first of `required` that model_index.json does not list."""
    for name in required:
        entry = index.get(name)
        if not entry or not isinstance(entry, list) or entry[0] is None:
            raise ValueError(f"{folder}/model_index.json has no '{name}' component; "
                             f"a {family} folder needs {', '.join(required)}")


def component_dir(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{folder} lacks the '{name}' component folder listed in model_index.json")
    return path


def load_module(module_cls, folder: str, name: str, device=None, dtype=None) -> torch.nn.Module:
    """Build fastdiff's module from <folder>/<name>/config.json and load its weights strictly."""
    path = component_dir(folder, name)
    config_file = os.path.join(path, "config.json")
    model = build_module(module_cls, read_json(config_file), config_file)
    weights_file = find_weights(path)
    state = load_state_dict_file(weights_file)
    check_weights(state, weights_file, model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file} does not match the {name} architecture of its config.json: "
            + (f"missing {sorted(missing)[:8]}" if missing else "")
            + (f" unexpected {sorted(unexpected)[:8]}" if unexpected else ""))
    return model.to(device=device, dtype=dtype).eval()


# Where transformers < 5.6 keeps CLIPTextModel's weights; since 5.6 the names are flat.
CLIP_TEXT_PREFIX = "text_model."


def load_clip_text(path: str, device=None, dtype=None, name: str = "text encoder"):
    """A transformers CLIPTextModel folder (config.json, then model.safetensors, else
    pytorch_model.bin read with weights_only=True) as fastdiff's CLIP text transformer
    (fastdiff/models/clip_text.py, which computes what CLIPTextModel computes without
    importing transformers), loaded as strictly as fastdiff's other modules: every weight of
    the architecture present with its shape, float, finite; nothing unknown besides
    position_ids (a buffer the model does not need)."""
    from ..models.clip_text import CLIPTextConfig, CLIPTextTransformer

    config_file = os.path.join(path, "config.json")
    config = CLIPTextConfig(read_json(config_file), source=config_file)
    weights_file = find_weights(path, stems=("model", "pytorch_model"))
    state = {k: v for k, v in load_state_dict_file(weights_file).items() if not k.endswith("position_ids")}
    if state and all(k.startswith(CLIP_TEXT_PREFIX) for k in state):
        state = {k[len(CLIP_TEXT_PREFIX):]: v for k, v in state.items()}
    # Built on the CPU as fastdiff's other modules are (on the meta device, the initialisers'
    # reference implementations would import torch._dynamo: a second of start-up).
    model = CLIPTextTransformer(config)
    expected = model.state_dict()
    problems = state_dict_problems(expected, state)
    if problems:
        raise CheckpointError(f"{weights_file} does not match the {name} architecture of its config.json: "
                              + "; ".join(problems))
    check_weights(state, weights_file, expected)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_text_encoder(folder: str, name: str = "text_encoder", device=None, dtype=None):
    """<folder>/<name>, a transformers CLIPTextModel folder, as fastdiff's CLIP text
    transformer (load_clip_text)."""
    return load_clip_text(component_dir(folder, name), device=device, dtype=dtype, name=name)


def load_tokenizer(folder: str, name: str = "tokenizer"):
    """<folder>/<name>, a saved CLIPTokenizer folder (tokenizer.json, or vocab.json + merges.txt),
    as fastdiff's CLIP tokenizer (fastdiff/loaders/clip_tokenizer.py: transformers' ids without
    importing transformers). A folder with no model_max_length in its tokenizer_config.json is
    an error naming the file; a missing or corrupt file is one too."""
    from .clip_tokenizer import CLIPTokenizer

    return CLIPTokenizer.from_folder(component_dir(folder, name))


def load_learned_null_embeddings(folder: str, name: str) -> Optional[torch.Tensor]:
    """VQ-Diffusion's learned null-text embedding [length, hidden_size], or None when the
    component says it is not learnable (the pipeline then embeds the empty prompt)."""
    path = component_dir(folder, name)
    config = read_json(os.path.join(path, "config.json"))
    if not config.get("learnable", False):
        return None
    length, hidden = config.get("length"), config.get("hidden_size")
    if not isinstance(length, int) or not isinstance(hidden, int):
        raise ValueError(f"{path}/config.json: a learnable null embedding needs integer 'length' and "
                         f"'hidden_size', got {length!r} and {hidden!r}")
    weights_file = find_weights(path)
    state = load_state_dict_file(weights_file)
    embeddings = state.get("embeddings")
    if embeddings is None or set(state) != {"embeddings"}:
        raise CheckpointError(f"{weights_file} should hold exactly one tensor named 'embeddings', "
                              f"found {sorted(state)[:8]}")
    if tuple(embeddings.shape) != (length, hidden):
        raise CheckpointError(f"{weights_file}: 'embeddings' has shape {tuple(embeddings.shape)}, its config "
                              f"says {(length, hidden)}")
    check_weights(state, weights_file, {"embeddings": torch.empty(0)})  # a float embedding, finite
    return embeddings
