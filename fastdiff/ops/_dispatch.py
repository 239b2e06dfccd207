"""Which implementation serves each op: one table, read by every op wrapper and by backend_info.

Each op module registers, per device type, its implementations in order of preference
(``register``). An implementation is one of three families:

  compiled  a kernel of fastdiff._C under the device's dispatch key (C++ on CPU, CUDA C++);
            available when the extension filled that key, reached through torch.ops.fastdiff
  triton    a Triton wrapper (fastdiff/ops/triton/); available when Triton imports
  torch     PyTorch code (the twin, SDPA, eager group_norm): always available

and may decline particular operands (``serves``: attention's check_supported, discrete_step's
class count), the next one in order then serving them. The backends (fastdiff/ops/_library.py)
read the table as:

  reference  the op's twin (reference.py), on every device
  auto       the first available implementation that serves the operands
  triton     the same, with the Triton implementations moved to the front

For the dispatch keys the extension did not fill, the first available non-compiled
implementation is registered as the op's kernel, so torch.ops.fastdiff.<op> (torch.compile,
opcheck, CUDA graphs) works on every build.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from . import _library

COMPILED, TRITON, TORCH = "compiled", "triton", "torch"
DEVICE_TYPES = {"cpu": "CPU", "cuda": "CUDA"}  # device type -> dispatch key


@dataclass(frozen=True)
class Impl:
    name: str                                   # what backend_info reports
    family: str                                 # COMPILED, TRITON or TORCH
    kernel: Optional[Callable] = None           # the Python callable (None for COMPILED)
    serves: Optional[Callable[..., bool]] = None  # (backend, *op args) -> takes these operands
    label: Optional[Callable[[str], str]] = None  # (backend) -> the name, with per-call notes


@dataclass
class _Op:
    twin: Callable
    impls: Dict[str, Tuple[Impl, ...]]
    compiled_keys: frozenset


_OPS: Dict[str, _Op] = {}
_TWIN_NAME = "reference"


def compiled(name: str, serves: Optional[Callable[..., bool]] = None) -> Impl:
    """The extension's kernel for the device's dispatch key; `serves` may decline operands
    (guided_step's float64), which ``call`` then hands to the next implementation directly."""
    return Impl(name, COMPILED, serves=serves)


def register(op: str, twin: Callable, **impls: Sequence[Impl]) -> None:
    """Enter op's implementations per device type (cpu=..., cuda=...), most preferred first;
    each list ends with an implementation that is always available. Registers the first
    non-compiled one as the op's kernel for every dispatch key the extension left empty."""
    keys = frozenset(key for key in DEVICE_TYPES.values() if _library.has_kernel(op, key))
    _OPS[op] = _Op(twin, {device: tuple(chain) for device, chain in impls.items()}, keys)
    for device, key in DEVICE_TYPES.items():
        if key not in keys:
            torch.library.impl(f"fastdiff::{op}", key)(python_kernel(op, device))


def ops() -> Tuple[str, ...]:
    return tuple(_OPS)


def is_compiled(op: str, device_type: str) -> bool:
    """Whether fastdiff._C holds op's kernel for this device type."""
    return DEVICE_TYPES.get(device_type) in _OPS[op].compiled_keys


def available(op: str, device_type: str, impl: Impl) -> bool:
    if impl.family == COMPILED:
        return is_compiled(op, device_type)
    if impl.family == TRITON:
        return _library.triton_available()
    return True


def _order(chain: Tuple[Impl, ...], backend: str) -> Tuple[Impl, ...]:
    if backend != "triton":
        return chain
    return tuple(i for i in chain if i.family == TRITON) + tuple(i for i in chain if i.family != TRITON)


def select(op: str, device_type: str, backend: Optional[str] = None, args: Optional[tuple] = None,
           *, compiled_ok: bool = True) -> Impl:
    """The implementation that serves op on device_type under backend (default: the current
    one); with args, the one that serves these operands. compiled_ok=False skips the
    extension's kernels (for the kernels registered in their place)."""
    entry = _OPS[op]
    backend = _library.get_backend() if backend is None else backend
    chain = entry.impls.get(device_type)
    if backend == "reference" or chain is None:
        return Impl(_TWIN_NAME, TORCH, entry.twin)
    for impl in _order(chain, backend):
        if not compiled_ok and impl.family == COMPILED:
            continue
        if not available(op, device_type, impl):
            continue
        if args is not None and impl.serves is not None and not impl.serves(backend, *args):
            continue
        return impl
    raise AssertionError(f"{op}: no implementation for {device_type} ends the table")  # pragma: no cover


def python_kernel(op: str, device_type: str) -> Callable:
    """The op's kernel for a dispatch key the extension did not fill: the first
    non-compiled implementation that serves the operands, as under the auto backend."""
    def kernel(*args):
        return select(op, device_type, "auto", args, compiled_ok=False).kernel(*args)
    kernel.__name__ = f"{op}_{device_type}_python_kernel"
    return kernel


def call(op: str, device_type: str, args: tuple):
    """Run op under the current backend (the public wrappers' last line; arguments checked).

    reference: the twin. triton: a Triton implementation that serves the operands is called
    directly. Everything else goes through torch.ops.fastdiff.<op>, so that torch.compile and
    the dispatcher see one op: its compiled kernel, or the one ``python_kernel`` registered.

    A compiled kernel that declines the operands (its ``serves``) cannot be bypassed inside
    torch.ops.fastdiff.<op>, whose dispatch key it fills, so the implementation that serves
    them instead is called directly."""
    backend = _library.get_backend()
    if backend == "reference":
        return _OPS[op].twin(*args)
    if backend == "triton" and device_type in DEVICE_TYPES:
        impl = select(op, device_type, backend, args)
        if impl.family == TRITON:
            return impl.kernel(*args)
    if is_compiled(op, device_type) and _declined(op, device_type, backend, args):
        return select(op, device_type, backend, args, compiled_ok=False).kernel(*args)
    return getattr(torch.ops.fastdiff, op)(*args)


def _declined(op: str, device_type: str, backend: str, args: tuple) -> bool:
    """Whether op's compiled kernel on device_type refuses these operands."""
    chain = _OPS[op].impls.get(device_type, ())
    return any(impl.family == COMPILED and impl.serves is not None and not impl.serves(backend, *args)
               for impl in chain)


def implementation(op: str, device_type: str, backend: Optional[str] = None) -> str:
    """The name of what serves op on device_type under backend (operands it declines aside)."""
    backend = _library.get_backend() if backend is None else backend
    impl = select(op, device_type, backend)
    return impl.label(backend) if impl.label is not None else impl.name


def table(backend: Optional[str] = None) -> Dict[str, Dict[str, str]]:
    """{op: {device type: implementation name}} for every op (backend_info's "ops")."""
    return {op: {device: implementation(op, device, backend) for device in DEVICE_TYPES} for op in _OPS}
