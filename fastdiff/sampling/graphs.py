"""Whole-step CUDA graphs for the sampling loop, and a guard against host syncs.

A sampling step is one model call (the CFG batch of 2N) plus one fused ``guided_step``.
Its launches depend on the step only through device tensors — the timestep, the row of
coefficients, the noise, the multistep history — so one capture serves every step of
the same *signature* (noise or not, how many history operands, whether x0 is written,
the row's width): a DDIM run captures one graph, DPM-Solver++(2M) two (first order, then
second order). Before each replay the step's operands are copied into the graph's static
input buffers (device-to-device), and the outputs are read from its static output buffers.

Noise is drawn for the whole run before the loop, in the order the eager loop draws it,
so a seed gives the same samples with and without graphs. Nothing in the loop reads a
device value on the host: a model that does (``.item()``, ``bool(tensor)``, a copy to the
host) fails the warm-up with an error naming the read, and could not be captured anyway.
"""
from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

Outputs = Tuple[Optional[Tensor], ...]


class HostSyncError(RuntimeError):
    """A device value was read on the host inside a region that must not synchronise."""


_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def forbid_host_sync(what: str = "a sampling step") -> Iterator[None]:
    """Inside, reading a tensor's value on the host raises HostSyncError.

    Catches ``.item()``, ``.tolist()``, ``.numpy()``, ``bool()/int()/float()`` of a tensor
    and ``.cpu()`` of a CUDA tensor on every device (on a CPU they are not syncs, but the
    same code on a GPU would be), and on CUDA also sets torch's sync debug mode to "error",
    which flags the syncs that happen inside C++ (e.g. a device-to-host copy).
    Not thread-safe: it patches torch.Tensor for the duration.
    """
    saved = {name: getattr(torch.Tensor, name) for name in _READS + ("cpu",)}
    own = {name for name in saved if name in vars(torch.Tensor)}  # else inherited from TensorBase

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSyncError(f"{what} read a tensor on the host (Tensor.{name}); a step must stay on the "
                                "device to be captured in a CUDA graph")
        return method

    def cpu(self, *args, **kwargs):
        if self.device.type != "cpu":
            raise HostSyncError(f"{what} copied a {self.device.type} tensor to the host (Tensor.cpu)")
        return saved["cpu"](self, *args, **kwargs)

    debug_mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else None
    try:
        for name in _READS:
            setattr(torch.Tensor, name, refuse(name))
        torch.Tensor.cpu = cpu
        if debug_mode is not None:
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        for name, method in saved.items():
            if name in own:
                setattr(torch.Tensor, name, method)
            elif name in vars(torch.Tensor):
                delattr(torch.Tensor, name)
        if debug_mode is not None:
            torch.cuda.set_sync_debug_mode(debug_mode)


class Capture:
    """How a step body becomes a replayable graph: ``capture(body) -> (outputs, replay)``."""

    def __call__(self, body: Callable[[], Outputs]) -> Tuple[Outputs, Callable[[], None]]:
        raise NotImplementedError


class CUDAGraphCapture(Capture):
    """torch.cuda.CUDAGraph, all graphs of a run in one memory pool, on the sample's device.

    torch.cuda.graph, its memory pool and its default capture stream (made once per process,
    on whichever device was current then) belong to the *current* device, so everything
    here runs with the sample's device made current and on streams made for it (a sample
    on cuda:1 while cuda:0 is current would otherwise be captured on the wrong GPU).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        with torch.cuda.device(self.device):
            self.pool = torch.cuda.graph_pool_handle()
            self.capture_stream = torch.cuda.Stream(self.device)

    def __call__(self, body):
        with torch.cuda.device(self.device):
            # Warm-up on a side stream, as torch.cuda.graphs asks: the first call may do lazy
            # one-time work (Triton compiles, a guidance scale copied to the device once); the
            # second must already be free of host syncs. Their outputs are discarded.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                body()
                with forbid_host_sync("a step being prepared for capture"):
                    body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream):
                outputs = body()
        return outputs, graph.replay


class EagerCapture(Capture):
    """Replays by running the body again and copying into the first outputs.

    The CPU stand-in for CUDAGraphCapture: the same static-buffer bookkeeping, so tests
    on a machine without a GPU check everything but the capture itself.
    """

    def __call__(self, body):
        body()  # as CUDAGraphCapture: one unguarded warm-up call, then the guarded one
        with forbid_host_sync("a step being prepared for capture"):
            outputs = body()

        def replay():
            for static, fresh in zip(outputs, body()):
                if static is not None:
                    static.copy_(fresh)
        return outputs, replay


def default_capture(device: torch.device) -> Capture:
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device; the sample is on {device}")
    return CUDAGraphCapture(device)


class StepSignature(NamedTuple):
    """What makes two steps launch the same kernels: one captured graph serves them all."""

    noise: bool
    history: int           # number of history operands
    write_denoised: bool
    width: int             # of the coefficient row


class StepGraphs:
    """One captured graph per step signature, with its static input buffers.

    ``body(signature, x, t, row, noise, history) -> outputs`` is the step; the static ``x``
    and ``t`` are shared by all signatures, the row and history buffers belong to each.
    """

    def __init__(self, body: Callable[..., Outputs], x: Tensor, t: Tensor, capture: Capture,
                 on_capture: Optional[Callable[[], None]] = None):
        self.body, self.capture = body, capture
        self.x = x.clone()
        self.t = t.clone()
        self.noise: Optional[Tensor] = None
        self._graphs: Dict[StepSignature, tuple] = {}
        self._on_capture = on_capture

    def run(self, signature: StepSignature, row: Tensor, noise: Optional[Tensor], history: Sequence[Tensor],
            t: Tensor) -> Outputs:
        """Fill the static inputs with this step's operands, replay, return the static outputs."""
        self.t.copy_(t)
        entry = self._graphs.get(signature)
        if entry is None:  # the new buffers start with this step's operands, for the warm-up
            static_row = row.clone()
            static_hist: List[Tensor] = [h.clone() for h in history]
            if noise is not None and self.noise is None:
                self.noise = noise.clone()
            static_noise = self.noise if noise is not None else None
            outputs, replay = self.capture(
                lambda: self.body(signature, self.x, self.t, static_row, static_noise, static_hist))
            entry = self._graphs[signature] = (static_row, static_hist, outputs, replay)
            if self._on_capture is not None:
                self._on_capture()
        static_row, static_hist, outputs, replay = entry
        static_row.copy_(row)
        if noise is not None:
            self.noise.copy_(noise)
        for buf, h in zip(static_hist, history):
            buf.copy_(h)
        replay()
        return outputs

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)


# ---------------------------------------------------------------------------------------
# Graphs kept across runs


def conditioning_leaves(obj: Any) -> List[Any]:
    """The leaves of a conditioning (a tensor, or dicts/tuples/lists/dataclasses of them),
    in a fixed order."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [leaf for f in dataclasses.fields(obj) for leaf in conditioning_leaves(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [leaf for k in sorted(obj, key=str) for leaf in conditioning_leaves(obj[k])]
    if isinstance(obj, (tuple, list)):
        return [leaf for item in obj for leaf in conditioning_leaves(item)]
    return [obj]


def conditioning_tensors(obj: Any) -> List[Tensor]:
    """The tensor leaves of a conditioning, in conditioning_leaves' order."""
    return [leaf for leaf in conditioning_leaves(obj) if isinstance(leaf, Tensor)]


def conditioning_signature(obj: Any) -> tuple:
    """What a captured graph bakes in about a conditioning: its tensors' shapes, strides,
    dtypes and devices, and the values of its other leaves (None, numbers, strings)."""
    return tuple((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device) if isinstance(leaf, Tensor)
                 else (type(leaf).__name__, repr(leaf)) for leaf in conditioning_leaves(obj))


def module_fingerprint(module: torch.nn.Module) -> tuple:
    """Identity of a module's weights as a captured graph sees them: their addresses and
    layouts. Moving, casting, re-laying out or fusing (fuse_qkv_projections) the module
    changes it; new values written in place (load_state_dict) do not, and need not: a
    replay reads the weights where they are."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return (id(module),) + tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in tensors)


class GraphCache:
    """Captured step graphs kept across sampling runs.

    ``generate(cuda_graph=True)`` captures each step signature once; with a cache (each
    pipeline keeps one as ``pipe.graph_cache``) a later run with the same shapes, dtypes,
    sampler signature, model weights and backend replays those graphs without capturing.
    What changes between runs — the starting sample, the text conditioning, the guidance
    scale, the coefficients, the noise — is copied into the graphs' static buffers.

    A key names everything a capture bakes in; a run whose key differs captures anew. At
    most ``capacity`` runs' graphs are kept (GLIDE's base and upsampler are two), the least
    recently used dropped first. ``captures`` counts the graphs captured through this cache.
    """

    def __init__(self, capacity: int = 2):
        if capacity < 1:
            raise ValueError(f"GraphCache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.captures = 0
        self._entries: "OrderedDict[Hashable, Any]" = OrderedDict()

    def scope(self, name: str, module: torch.nn.Module) -> "GraphScope":
        """This cache, for runs of `module` (its weights' fingerprint joins every key)."""
        from ..ops import _library

        return GraphScope(self, (name, _library.get_backend(), module_fingerprint(module)))

    def get(self, key: Hashable) -> Any:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: Any) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def count_capture(self) -> None:
        self.captures += 1

    def clear(self) -> None:
        """Drop every kept graph (and with them their memory pools)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class GraphScope(NamedTuple):
    """A GraphCache seen by the runs of one model: ``run_plan(cuda_graph=scope)``."""

    cache: GraphCache
    key: tuple

    def get(self, key: Hashable) -> Any:
        return self.cache.get((self.key, key))

    def put(self, key: Hashable, entry: Any) -> None:
        self.cache.put((self.key, key), entry)

    def count_capture(self) -> None:
        self.cache.count_capture()
