"""Evaluation: an independent judge of scene images and the attribute-accuracy metrics built on it.

    from fastdiff.eval import Judge, evaluate, format_table
    results = evaluate(pipe, Judge.load(), n=200, guidance_scales=(1, 3, 5, 8))
    print(format_table(results))

Names are resolved on first use, so `python -m fastdiff.eval.judge` runs its module once
(importing it here eagerly would load it twice and make runpy warn).
"""
from importlib import import_module

_EXPORTS = {"Judge": "judge", "train_judge": "judge", "DEFAULT_JUDGE_DIR": "judge_files",
            "evaluate": "attributes", "attribute_scores": "attributes", "format_table": "attributes",
            "image_grid": "attributes"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
