"""A folder written by ``fastdiff.export.onnx`` (optimum's layout) as pipeline components whose
networks run in ONNX Runtime: they take and return torch tensors, so fastdiff's sampling loop
(and its fused guided_step) drives them as it drives the PyTorch modules.

On the CPU, ONNX Runtime's thread pool takes torch's thread count with spinning off: the
networks and torch's sampler step run one after the other, so the two pools take turns
instead of spinning against each other. With CUDAExecutionProvider first (and a CUDA build of
torch), the graphs run on torch's GPU and current CUDA stream, their tensors bound with I/O
binding: inputs are read from torch's device memory and outputs handed back through DLPack,
with no host round trip, so the pipeline's latents and its sampler step stay on the GPU
(``onnx_device``). The manifest is checked against the graphs present (names, ranks), and a
static graph's sizes against each call before any work.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..sampling import SchedulerConfig
from . import diffusers_folder as folder_io

MANIFEST = "fastdiff_onnx.json"
GRAPHS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def read_manifest(path: str, family: Optional[str] = None, graphs: Sequence[str] = GRAPHS) -> Dict[str, Any]:
    """The folder's manifest, checked: its format, its family (when given), the `graphs` it must
    list and that every file it lists is present. Errors name the file."""
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
    if family is not None and manifest.get("family") != family:
        raise ValueError(f"{file}: the manifest is of a {manifest.get('family')!r} export, not {family!r}")
    listed = manifest.get("graphs")
    if not isinstance(listed, list) or not all(isinstance(g, dict) and isinstance(g.get("file"), str) for g in listed):
        raise ValueError(f"{file}: 'graphs' must list the exported graphs (name, file, inputs, outputs)")
    for graph in listed:
        graph_file = os.path.join(path, graph["file"])
        if not os.path.isfile(graph_file):
            raise FileNotFoundError(f"{path}: the manifest lists {graph['file']!r}, which is missing")
    names = [g.get("name") for g in listed]
    missing = [name for name in graphs if name not in names]
    if missing:
        raise ValueError(f"{file}: the manifest has no {', '.join(missing)} graph")
    return manifest


def graph_files(path: str, manifest: Dict[str, Any]) -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """{graph name: (its file, its manifest record)}."""
    return {g["name"]: (os.path.join(path, g["file"]), g) for g in manifest["graphs"]}


def check_providers(path: str, manifest: Dict[str, Any], providers: Sequence[str]) -> None:
    """A folder optimised for ONNX Runtime's CUDA provider (contrib ops) runs on that provider only."""
    if manifest.get("optimized") == "cuda" and "CUDAExecutionProvider" not in providers:
        raise ValueError(f"{path}: the graphs were optimised for CUDAExecutionProvider (fused contrib ops with "
                         f"CUDA kernels only); give providers=['CUDAExecutionProvider'] or export without optimize")


def onnx_device(providers: Sequence[str]) -> torch.device:
    """Where an ONNX pipeline's tensors live: torch's current GPU when the CUDA provider comes
    first and torch has CUDA (the graphs then run on its memory, I/O bound), else the CPU."""
    if list(providers)[:1] == ["CUDAExecutionProvider"] and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def session_options():
    """The SessionOptions every graph of an ONNX pipeline runs with. The networks and torch's
    sampler step run one after the other: ONNX Runtime's pool takes torch's thread count, with
    spinning off so neither pool burns the cores the other needs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _session(file: str, providers: Sequence[str], device: torch.device):
    """An InferenceSession on `providers`; on `device` (onnx_device(providers)) when that is a GPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("running ONNX graphs needs ONNX Runtime: pip install onnxruntime "
                           "(onnxruntime-gpu on a machine with an NVIDIA GPU)") from None
    if isinstance(providers, str) or not all(isinstance(p, str) for p in providers):
        raise TypeError(f"providers must be a list of ONNX Runtime provider names, got {providers!r}")
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ValueError(f"providers {unknown} are not available in this ONNX Runtime; available: {available}")
    options = session_options()
    chosen: List[Any] = list(providers)
    if device.type == "cuda":  # torch's device and stream: no copies, no cross-stream waits
        stream = torch.cuda.current_stream(device).cuda_stream
        chosen[0] = ("CUDAExecutionProvider", {"device_id": str(device.index),
                                               "user_compute_stream": str(stream)})
    try:
        session = ort.InferenceSession(file, options, providers=chosen)
    except Exception as exc:  # ONNX Runtime's own errors (a corrupt or truncated graph)
        raise ValueError(f"{file}: ONNX Runtime cannot load it ({' '.join(str(exc).split())[:300]})") from None
    if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"{file}: ONNX Runtime could not start CUDAExecutionProvider (it fell back to "
                           f"{session.get_providers()}); check that onnxruntime-gpu matches the CUDA and "
                           f"cuDNN that torch brings, or run on providers=['CPUExecutionProvider']")
    return session


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
          "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}
_NUMPY_OF_TORCH = {_TORCH[kind]: _NUMPY[kind] for kind in _NUMPY}


class _Graph:
    """One ONNX Runtime session called with torch tensors (cast to the graph's input types;
    floating outputs come back as float32)."""

    def __init__(self, file: str, providers: Sequence[str], config: Dict[str, Any],
                 record: Optional[Dict[str, Any]] = None):
        self.device = onnx_device(providers)
        self.file, self.session, self.config = file, _session(file, providers, self.device), config
        # I/O binding where the tensors live on the GPU (the CPU path's numpy views are
        # already copy-free); `bound` can be set to run the bound path on the CPU too.
        self.bound = self.device.type == "cuda"
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        if record is not None:
            self._check_record(record)

    def _check_record(self, record: Dict[str, Any]) -> None:
        """The graph's inputs and outputs as the manifest recorded them (names and ranks)."""
        for kind, declared, actual in (("inputs", record.get("inputs"), {n: i.shape for n, i in self.inputs.items()}),
                                       ("outputs", record.get("outputs"),
                                        {o.name: o.shape for o in self.session.get_outputs()})):
            if not isinstance(declared, dict) or list(declared) != list(actual):
                raise ValueError(f"{self.file}: its {kind} {list(actual)} do not match the manifest's "
                                 f"{list(declared) if isinstance(declared, dict) else declared!r}")
            for name, shape in actual.items():
                if not isinstance(declared[name], list) or len(declared[name]) != len(shape):
                    raise ValueError(f"{self.file}: {kind[:-1]} {name!r} has rank {len(shape)} but the manifest "
                                     f"records {declared[name]!r}")

    def fixed_shape(self, name: str) -> Optional[Tuple[int, ...]]:
        """The input's shape when every axis is fixed (a static export), else None."""
        shape = self.inputs[name].shape
        return tuple(shape) if all(isinstance(d, int) for d in shape) else None

    def check_shape(self, name: str, shape: Sequence[int], what: str) -> None:
        """ValueError, before any work, when a static graph cannot take `shape` at input `name`."""
        fixed = self.fixed_shape(name)
        if fixed is not None and tuple(fixed) != tuple(shape):
            raise ValueError(f"{self.file} was exported with static shapes: its {name} is {list(fixed)}, but this "
                             f"call needs {list(shape)} ({what}); call with the exported sizes or export again")

    def run(self, **inputs: Tensor) -> List[Tensor]:
        """The graph's outputs for `inputs` (each cast to its input's type), floating ones as
        float32, on ``self.device``."""
        if self.bound:
            return self._run_bound(inputs)
        feeds = {}
        for name, t in inputs.items():
            array = t.detach().cpu().numpy()
            kind = _NUMPY.get(self.inputs[name].type) if name in self.inputs else None
            feeds[name] = array.astype(kind, copy=False) if kind is not None else array
        outs = []
        for out in self.session.run(None, feeds):
            t = torch.from_numpy(np.ascontiguousarray(out))
            outs.append(t.float() if t.is_floating_point() else t)
        return outs

    def _run_bound(self, inputs: Dict[str, Tensor]) -> List[Tensor]:
        """run() with I/O binding: ONNX Runtime reads the inputs in place in ``self.device``'s
        memory and allocates the outputs there, handed to torch through DLPack (no copies)."""
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        held = []  # the bound inputs stay alive until the run returns
        for name, t in inputs.items():
            declared = self.inputs.get(name)
            dtype = _TORCH.get(declared.type, t.dtype) if declared is not None else t.dtype
            t = t.detach().to(self.device, dtype).contiguous()
            held.append(t)
            binding.bind_input(name, kind, index, _NUMPY_OF_TORCH[t.dtype], list(t.shape), t.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, kind, index)
        self.session.run_with_iobinding(binding)
        outs = [torch.from_dlpack(value) for value in binding.get_outputs()]
        return [t.float() if t.is_floating_point() else t for t in outs]


class OnnxUNet(_Graph):
    """``unet(sample, timestep, encoder_hidden_states=...)`` on the exported graph, whose
    timestep is one value for the whole batch (shape [1], as optimum feeds it)."""

    def check_call(self, batch: int, height: int, width: int) -> None:
        """The UNet batch and latent size a generate() call will run, against a static graph."""
        channels = self.config.get("in_channels", 4)
        self.check_shape("sample", (batch, channels, height, width),
                         f"{batch} latents of {height}x{width} per UNet call, the guided batch twice the images")

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

    def __init__(self, file, providers, config, record=None):
        super().__init__(file, providers, config, record)
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
    manifest = read_manifest(path, "StableDiffusionPipeline", GRAPHS)
    check_providers(path, manifest, providers)
    files = graph_files(path, manifest)

    def graph(kind, name, config_name=None):
        file, record = files[name]
        return kind(file, providers, _config(path, config_name or name), record)

    scheduler = SchedulerConfig.from_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return dict(
        unet=graph(OnnxUNet, "unet"),
        vae=OnnxVAE(graph(_Graph, "vae_encoder"), graph(_Graph, "vae_decoder")),
        text_encoder=graph(OnnxTextEncoder, "text_encoder"),
        tokenizer=folder_io.load_tokenizer(path),
        scheduler_config=scheduler)
