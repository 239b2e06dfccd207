"""Test dependencies (the oracles: diffusers, triton, ...): skip where absent, fail under CI.

``require("diffusers")`` returns the module. On a developer's machine without it the test
(or, at module level, the file) is skipped; with ``CI=true`` (set by .ci/run and by every
CI service) a missing test dependency is a failure, so an oracle suite can never pass by
not running.
"""
from __future__ import annotations

import importlib
import os

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if under_ci():
            pytest.fail(f"test dependency {module!r} is missing under CI=true ({exc}); "
                        f"install the test extra: pip install -e '.[test]'", pytrace=False)
        pytest.skip(f"{module} is not installed ({exc})", allow_module_level=True)
