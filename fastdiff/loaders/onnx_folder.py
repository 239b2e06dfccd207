"""A folder written by ``fastdiff.export.onnx`` (optimum's layout) as pipeline components whose
networks run in ONNX Runtime: they take and return torch tensors, so fastdiff's sampling loop
(and its fused guided_step) drives them as it drives the PyTorch modules.

On the CPU, ONNX Runtime's thread pool takes torch's thread count with spinning off: the
networks and torch's sampler step run one after the other, so the two pools take turns
instead of spinning against each other. I/O binding on CUDA is not done yet: inputs and
outputs pass through host memory.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..sampling import SchedulerConfig
from . import diffusers_folder as folder_io

MANIFEST = "fastdiff_onnx.json"
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def read_manifest(path: str) -> Dict[str, Any]:
    """The folder's manifest, checked against the graphs present."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {MANIFEST}; this is not a folder written by fastdiff.export.onnx")
    try:
        with open(file) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: not a readable JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "fastdiff-onnx":
        raise ValueError(f"{file}: not a fastdiff ONNX manifest")
    for graph in manifest.get("graphs", []):
        graph_file = os.path.join(path, graph.get("file", ""))
        if not os.path.isfile(graph_file):
            raise FileNotFoundError(f"{path}: the manifest lists {graph.get('file')!r}, which is missing")
    names = [g.get("name") for g in manifest.get("graphs", [])]
    missing = [name for name in GRAPHS if name not in names]
    if missing:
        raise ValueError(f"{file}: the manifest has no {', '.join(missing)} graph")
    return manifest


def _session(file: str, providers: Sequence[str]):
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("running ONNX graphs needs ONNX Runtime: pip install onnxruntime "
                           "(onnxruntime-gpu on a machine with an NVIDIA GPU)") from None
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ValueError(f"providers {unknown} are not available in this ONNX Runtime; available: {available}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(file, options, providers=list(providers))
    except Exception as exc:  # ONNX Runtime's own errors (a corrupt or truncated graph)
        raise ValueError(f"{file}: ONNX Runtime cannot load it ({' '.join(str(exc).split())[:300]})") from None


class _Graph:
    """One ONNX Runtime session called with torch tensors."""

    def __init__(self, file: str, providers: Sequence[str], config: Dict[str, Any]):
        self.file, self.session, self.config = file, _session(file, providers), config
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    def run(self, **inputs: Tensor) -> List[Tensor]:
        feeds = {}
        for name, t in inputs.items():
            array = t.detach().cpu().numpy()
            if self.input_types.get(name) == "tensor(float)":
                array = array.astype(np.float32, copy=False)
            elif self.input_types.get(name) == "tensor(int64)":
                array = array.astype(np.int64, copy=False)
            feeds[name] = array
        return [torch.from_numpy(np.ascontiguousarray(out)) for out in self.session.run(None, feeds)]


class OnnxUNet(_Graph):
    """``unet(sample, timestep, encoder_hidden_states=...)`` on the exported graph, whose
    timestep is one value for the whole batch (shape [1], as optimum feeds it)."""

    def __call__(self, sample: Tensor, timestep, encoder_hidden_states: Tensor) -> Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.numel() > 1 and not bool((t == t[0]).all()):
            raise ValueError("the exported UNet takes one timestep for the whole batch")
        out, = self.run(sample=sample, timestep=t[:1], encoder_hidden_states=encoder_hidden_states)
        return out.to(sample.device, sample.dtype)


class OnnxVAE:
    """encode (-> posterior mean, log-variance) and decode on the two exported VAE graphs."""

    def __init__(self, encoder: _Graph, decoder: _Graph):
        self.encoder, self.decoder, self.config = encoder, decoder, decoder.config
        self.scaling_factor = float(self.config.get("scaling_factor", 0.18215))

    def encode(self, x: Tensor):
        moments, = self.encoder.run(sample=x)
        mean, logvar = moments.to(x.device, x.dtype).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        image, = self.decoder.run(latent_sample=z)
        return image.to(z.device, z.dtype)


class _TextConfig:
    def __init__(self, config: Dict[str, Any]):
        self.__dict__.update(config)
        self.use_attention_mask = bool(config.get("use_attention_mask", False))


class OnnxTextEncoder(_Graph):
    """``text_encoder(input_ids)[0]`` -> last_hidden_state, as transformers' CLIPTextModel."""

    def __init__(self, file, providers, config):
        super().__init__(file, providers, config)
        self.config = _TextConfig(config)

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        if kwargs.get("output_hidden_states"):
            raise ValueError("the exported text encoder returns the last hidden state only (no clip_skip)")
        hidden, pooled = self.run(input_ids=input_ids)
        return hidden.to(input_ids.device), pooled.to(input_ids.device)


def _config(path: str, name: str) -> Dict[str, Any]:
    file = os.path.join(path, name, "config.json")
    try:
        with open(file) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {name}/config.json is missing") from None
    except ValueError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


def load_stable_diffusion(path: str, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Dict[str, Any]:
    """The keyword arguments of the ONNX Stable Diffusion pipeline, read from `path`."""
    path = os.fspath(path)
    manifest = read_manifest(path)
    if manifest.get("family") != "StableDiffusionPipeline":
        raise ValueError(f"{path}: the manifest's family {manifest.get('family')!r} has no ONNX pipeline")
    files = {g["name"]: os.path.join(path, g["file"]) for g in manifest["graphs"]}
    scheduler = SchedulerConfig.from_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return dict(
        unet=OnnxUNet(files["unet"], providers, _config(path, "unet")),
        vae=OnnxVAE(_Graph(files["vae_encoder"], providers, _config(path, "vae_encoder")),
                    _Graph(files["vae_decoder"], providers, _config(path, "vae_decoder"))),
        text_encoder=OnnxTextEncoder(files["text_encoder"], providers, _config(path, "text_encoder")),
        tokenizer=folder_io.load_tokenizer(path),
        scheduler_config=scheduler)
