"""Package faces whose names resolve on first use (PEP 562), so importing a package costs
nothing until one of its names is read: `fastdiff --help` starts without torch.

A package lists ``_EXPORTS`` (public name -> the submodule that defines it) and, where its
subpackages are attributes too, ``_SUBMODULES``; tests/test_house.py reads both tables as the
package's imports.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Callable, Iterable, Mapping, Tuple


def lazy_names(package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()) -> Tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`: a name of `exports` is read from its submodule, a
    name of `submodules` is that subpackage, both imported when first asked for."""
    submodules = tuple(submodules)

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(f".{exports[name]}", package), name)
        if name in submodules:
            return import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports) | set(submodules))

    return __getattr__, __dir__
