"""Checks on the config values every model shares: counts that must be positive integers,
GroupNorm group counts that must divide the channels they normalise, sample sizes.

Each failure is a ValueError naming the model, the key, the value and what is valid; the
loaders prefix the file it came from. Checked before any layer is built, so a bad config
never becomes a ZeroDivisionError deep inside a block or a model that silently differs.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterable


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(model: str, key: str, value: Any, *, minimum: int = 1) -> int:
    if not is_int(value) or value < minimum:
        valid = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{model}: config {key}={value!r} is not valid (needs {valid})")
    return int(value)


def check_channels(model: str, key: str, channels: Any) -> None:
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Iterable):
        raise ValueError(f"{model}: config {key}={channels!r} is not valid (needs a list of positive integers)")
    channels = list(channels)
    if not channels or not all(is_int(c) and c > 0 for c in channels):
        raise ValueError(f"{model}: config {key}={channels!r} is not valid (needs a non-empty list of positive "
                         f"integers)")


def check_groups(model: str, groups: Any, channels: Iterable[int], key: str = "norm_num_groups") -> None:
    """GroupNorm's group count: a positive integer dividing every width it normalises."""
    positive_int(model, key, groups)
    bad = sorted({c for c in channels if c % groups})
    if bad:
        raise ValueError(f"{model}: config {key}={groups!r} does not divide the channel count(s) {bad} of "
                         f"block_out_channels; give a group count that divides every entry")


def check_sample_size(model: str, value: Any, *, optional: bool = False) -> None:
    """A positive integer, or a (height, width) pair of them (None where the model allows it)."""
    if value is None and optional:
        return
    pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) and v > 0 for v in value)
    if not (pair or (is_int(value) and value > 0)):
        valid = "a positive integer or a [height, width] pair" + (", or null" if optional else "")
        raise ValueError(f"{model}: config sample_size={value!r} is not valid (needs {valid})")
