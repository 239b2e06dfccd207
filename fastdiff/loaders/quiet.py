"""Loading without noise: transformers' progress bars and log lines are off while fastdiff
loads, and the user's own settings come back afterwards.

fastdiff reports its own progress where it is asked for (``progress=True``); a library's
"Loading weights" bar or a warning about weights fastdiff has already checked would only
bury it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' (and diffusers', when imported) logging at ERROR, progress bars off; restored on exit.

    transformers is silenced only where it is already imported: importing it here would cost
    most of a second of start-up for a load that never uses it (fastdiff reads the built-in
    model's text encoder and tokenizer itself)."""
    restore = []
    if sys.modules.get("transformers") is not None:
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        def undo_transformers() -> None:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        restore.append(undo_transformers)
    # Other libraries that may log while their files load (huggingface_hub, safetensors conversions).
    for name in ("huggingface_hub", "diffusers"):
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(max(level, logging.ERROR))
        restore.append(lambda logger=logger, level=level: logger.setLevel(level))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()
