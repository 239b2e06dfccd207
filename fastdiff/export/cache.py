"""A model run in ONNX Runtime, exported once and kept:
``fastdiff.Pipeline.from_pretrained(path, runtime="onnxruntime")``.

The first load exports the model (fastdiff.export.onnx, every graph checked against its
module) into a folder of the cache named by a key of what the export depends on: the
model's files (each one's path, size and modification time), fastdiff's, torch's and the
exporter's versions, and the export options. Later loads with the same key open that
folder in ONNX Runtime at once (Pipeline.from_onnx). A changed file, another dtype or
another version of a library gives another key, so a stale export is never used.

The export is written into a temporary folder beside its final one and renamed into place
when complete, so an interrupted export leaves nothing that a later load would take (its
temporary folder is removed by the next export of the same key once its process is gone),
and two processes exporting the same model at once end with one folder.

The cache lives in $FASTDIFF_CACHE, else $XDG_CACHE_HOME/fastdiff, else ~/.cache/fastdiff
(under onnx/); ``cache_dir=`` overrides it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Callable, Optional

RECORD = "fastdiff_source.json"  # beside the exported folder's manifest: what the key was made of


def cache_root(cache_dir: Optional[str] = None) -> str:
    """Where exports are kept: `cache_dir`, or $FASTDIFF_CACHE, $XDG_CACHE_HOME/fastdiff, ~/.cache/fastdiff."""
    if cache_dir is not None:
        return os.path.abspath(os.fspath(cache_dir))
    if os.environ.get("FASTDIFF_CACHE"):
        return os.path.abspath(os.environ["FASTDIFF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastdiff")


def _model_files(path: str) -> list:
    """[relative path, size, mtime_ns] of every file of the model (one file, or a folder's)."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return [[os.path.basename(path), stat.st_size, stat.st_mtime_ns]]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            stat = os.stat(full)
            files.append([os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns])
    return files


def source_record(path: str, dtype: str) -> dict:
    """What an export of the model at `path` in `dtype` depends on (the cache key's contents)."""
    import onnx
    import onnxscript
    import torch

    from .. import __version__

    return {"model": os.path.abspath(path), "files": _model_files(path), "dtype": dtype,
            "versions": {"fastdiff": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxscript": onnxscript.__version__}}


def cache_key(record: dict) -> str:
    text = json.dumps(record, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _providers(device) -> tuple:
    import torch

    device = torch.device("cpu" if device is None else device)
    if device.type == "cpu":
        return ("CPUExecutionProvider",)
    if device.type == "cuda":
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    raise ValueError(f"runtime='onnxruntime' runs on the CPU or a CUDA GPU, not on {device}")


def _dtype_name(dtype) -> str:
    import torch

    if dtype is None or dtype == torch.float32:
        return "float32"
    if dtype == torch.float16:
        return "float16"
    raise ValueError(f"runtime='onnxruntime' exports float32 or float16 graphs, not {dtype}")


def _remove_abandoned(root: str, key: str) -> None:
    """Temporary folders of this key left by export processes that no longer run."""
    prefix = f"{key}.tmp-"
    for name in os.listdir(root):
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except (ValueError, PermissionError):  # not ours to judge
            continue


def _report(progress) -> Optional[Callable[[str], None]]:
    if progress is True:
        return lambda what: print(f"fastdiff: {what}", file=sys.stderr, flush=True)
    return progress or None


def onnx_pipeline(cls, path, *, device=None, dtype=None, cache_dir=None, progress=True):
    """`cls.from_onnx` on the cached export of the model at `path` (exported first when there is
    none). progress: True prints a line per exported graph to stderr, a callable gets them,
    False is silent. Every argument is checked before the model loads."""
    from . import require_packages

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model folder or file")
    providers = _providers(device)
    dtype_name = _dtype_name(dtype)
    if dtype_name == "float16" and providers[0] == "CPUExecutionProvider":
        raise ValueError("runtime='onnxruntime' on the CPU runs float32 graphs (ONNX Runtime's CPU kernels have "
                         "no float16 convolutions); pass device='cuda' for float16")
    require_packages(verify=True)
    record = source_record(path, dtype_name)
    root = os.path.join(cache_root(cache_dir), "onnx")
    folder = os.path.join(root, cache_key(record))
    report = _report(progress)
    if not os.path.isfile(os.path.join(folder, RECORD)):
        os.makedirs(root, exist_ok=True)
        _export(cls, path, folder, record, dtype_name, report)
    try:
        return cls.from_onnx(folder, providers=providers)
    except (OSError, ValueError) as exc:
        raise type(exc)(f"the cached ONNX export {folder} of {path} cannot be read ({exc}); delete that folder "
                        f"and load again to export anew") from None


def _export(cls, path: str, folder: str, record: dict, dtype: str, report) -> None:
    root, key = os.path.split(folder)
    _remove_abandoned(root, key)
    pipe = cls.from_pretrained(path)  # the PyTorch pipeline, on the CPU in float32, exported from there
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if report:
        report(f"exporting {path} to ONNX once (kept in {folder})")
    try:
        from . import onnx

        onnx(pipe, tmp, dtype=dtype, progress=report)
        with open(os.path.join(tmp, RECORD), "w") as fh:
            json.dump(record, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, RECORD)):  # not another process's finished export
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["onnx_pipeline", "cache_root", "cache_key", "source_record", "RECORD"]
