"""CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), the text encoder of Stable Diffusion 1.x (CLIP ViT-L/14) and
2.x (OpenCLIP ViT-H/14, converted).

It computes what transformers' ``CLIPTextModel`` computes, on its weights and config,
without importing transformers (whose modeling code costs seconds at start-up);
fastdiff/loaders/diffusers_folder.py's load_text_encoder reads a CLIPTextModel folder into it
(with or without the ``text_model.`` key prefix that transformers dropped in 5.6). Its state
dict uses the flat names of transformers >= 5.6, and ``final_layer_norm`` sits where the SD
pipeline looks for it when it applies clip_skip.

The math: token + position embeddings; pre-LayerNorm layers of causal self-attention (the
padding mask, where given, combined with the causal one) and a two-layer MLP with quick_gelu
(CLIP) or gelu (OpenCLIP), each added back to its input; a final LayerNorm. The pooled output
is the final state at the end-of-text token.
"""
from __future__ import annotations

import copy
import json
import numbers
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config_checks import is_int

ACTIVATIONS = {
    # CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x).
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}
# transformers' CLIPTextConfig defaults for keys a config.json may leave out. eos_token_id is
# not among them: its default changed (2 before transformers 4.31, 49407 since) and it decides
# where the pooled output is read, so a config without it is refused.
DEFAULTS = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406, pad_token_id=1,
                projection_dim=None)
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings")
# Legacy configs (before transformers PR #24773) carry eos_token_id 2; for them transformers pools at
# the largest token id (CLIP's end-of-text is the last entry of its vocabulary), and so does this model.
LEGACY_EOS_TOKEN_ID = 2


class CLIPTextConfig:
    """The architecture of a CLIP text transformer, checked, from a config.json's dict.

    Attribute access reads the checked fields (``config.hidden_size``) and, for any other key
    of the file, its value (``config.use_attention_mask`` where the file has one); ``to_dict()``
    gives the file's dict back with the defaults it left out filled in."""

    def __init__(self, values: Mapping[str, Any], source: str = "CLIP text config"):
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: a CLIP text config must be a JSON object, got {type(values).__name__}")
        raw = {**DEFAULTS, **dict(values)}
        fields: Dict[str, Any] = {}
        for key in SHAPE_KEYS + ("eos_token_id",):
            if key not in values:
                raise ValueError(f"{source}: config key {key!r} is missing (a CLIP text config needs "
                                 f"{', '.join(SHAPE_KEYS)} and eos_token_id)")
        for key in SHAPE_KEYS:
            fields[key] = _check_int(source, key, raw[key], minimum=1)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id", "projection_dim"):
            optional = key != "eos_token_id"
            fields[key] = None if raw[key] is None and optional else _check_int(
                source, key, raw[key], minimum=1 if key == "projection_dim" else 0, optional=optional)
        act = raw["hidden_act"]
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: config key 'hidden_act'={act!r} is not supported (fastdiff's CLIP text "
                             f"transformer has {' and '.join(repr(a) for a in ACTIVATIONS)})")
        fields["hidden_act"] = act
        eps = raw["layer_norm_eps"]
        if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"{source}: config key 'layer_norm_eps'={eps!r} is not valid (needs a number in (0, 1))")
        fields["layer_norm_eps"] = float(eps)
        if fields["hidden_size"] % fields["num_attention_heads"]:
            raise ValueError(f"{source}: config hidden_size={fields['hidden_size']} is not divisible by "
                             f"num_attention_heads={fields['num_attention_heads']}")
        self.__dict__["_fields"] = fields
        self.__dict__["_raw"] = raw

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "CLIPTextConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing file: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                values = json.load(fh)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"cannot read {path}: not a JSON file ({str(exc).splitlines()[0]})") from None
        return cls(values, source=path)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy({**self._raw, **self._fields})

    def __getattr__(self, name: str) -> Any:
        fields, raw = self.__dict__.get("_fields", {}), self.__dict__.get("_raw", {})
        if name in fields:
            return fields[name]
        if name in raw:
            return raw[name]
        raise AttributeError(f"CLIPTextConfig has no {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("CLIPTextConfig is read-only: build a new one from a changed to_dict()")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CLIPTextConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CLIPTextConfig({', '.join(f'{k}={v!r}' for k, v in self._fields.items())})"


def _check_int(source: str, key: str, value: Any, *, minimum: int, optional: bool = False) -> int:
    if not is_int(value) or value < minimum:
        valid = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ValueError(f"{source}: config key {key!r}={value!r} is not valid (needs {valid})")
    return int(value)


@dataclass
class CLIPTextOutput:
    """What CLIPTextModel returns: ``out[0]`` / ``out.last_hidden_state`` [B, L, C] (after the final
    LayerNorm), ``out[1]`` / ``out.pooler_output`` [B, C], and, when asked for, ``hidden_states``:
    the embeddings, then each layer's output (before the final LayerNorm)."""
    last_hidden_state: Tensor
    pooler_output: Tensor
    hidden_states: Optional[Tuple[Tensor, ...]] = None

    def to_tuple(self) -> tuple:
        """As transformers' ModelOutput: the fields that are set, in order."""
        return tuple(v for v in (self.last_hidden_state, self.pooler_output, self.hidden_states) if v is not None)

    def __getitem__(self, index):
        return self.to_tuple()[index]

    def __len__(self) -> int:
        return len(self.to_tuple())

    def __iter__(self):
        return iter(self.to_tuple())


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections, scale head_dim^-0.5."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        """keep: None for plain causal attention, else [B, 1, L, L] bool, True where a query may see a key."""
        batch, length, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scale = self.head_dim ** -0.5
        # fastdiff.ops.attention takes a key-padding mask but no causal one, so SDPA serves here
        # (looked up at call time: tests/tolerances.reduction_terms counts it through F).
        if keep is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            # A query that sees no key at all (a padded first token) gets zeros, as transformers' SDPA path.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale).nan_to_num(0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: Tensor, keep: Optional[Tensor]) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), keep)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """transformers' CLIPTextModel, same weights and names (flat, as transformers >= 5.6)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if not isinstance(config, CLIPTextConfig):
            config = CLIPTextConfig(config)
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                output_hidden_states: bool = False, return_dict: bool = True) -> CLIPTextOutput:
        """input_ids [B, L] (L <= max_position_embeddings); attention_mask [B, L], 1/True where a
        token is real and 0/False at padding. return_dict is accepted for transformers' callers:
        the output indexes like a tuple either way."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a [batch, length] integer tensor, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if not 1 <= length <= self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens; this text encoder takes 1 to "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        keep = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(f"attention_mask must have input_ids' shape {(batch, length)}, got "
                                 f"{tuple(attention_mask.shape)}")
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            keep = causal & attention_mask.to(device=input_ids.device, dtype=torch.bool)[:, None, None, :]
        x = self.embeddings(input_ids)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, keep)
            states.append(x)
        last = self.final_layer_norm(x)
        return CLIPTextOutput(last, self.pool(last, input_ids),
                              tuple(states) if output_hidden_states else None)

    def pool(self, last_hidden_state: Tensor, input_ids: Tensor) -> Tensor:
        """The state at each sequence's end-of-text token: the first eos_token_id (position 0 where there
        is none, as transformers), or, for legacy configs (eos_token_id 2), the largest token id."""
        ids = input_ids.to(device=last_hidden_state.device, dtype=torch.int32)  # int32 argmax: ONNX opset 14
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            where = ids.argmax(dim=-1)
        else:
            where = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        return last_hidden_state[torch.arange(ids.shape[0], device=ids.device), where]
