"""Benchmarks' pytest setup: the Triton interpreter without a GPU, and results kept as they finish.

With FASTDIFF_BENCH_JSONL=<file>, each benchmark that was timed appends one JSON line to
<file> as soon as its test finishes (one unbuffered write(2), then fsync), so a run
killed by a time limit keeps every result that finished; --benchmark-json, by contrast, is
written only at the end of the session. One line:

  {"name": "test_attention[fastdiff-self-Lq1024-Lk1024-d80]", "fullname": "<node id>",
   "group": "...", "params": {...}, "outcome": "passed",
   "stats": {"median": s, "min": s, "max": s, "mean": s, "stddev": s, "rounds": R,
             "iterations": N},                  # seconds per call (pytest-benchmark's host clock)
   "extra_info": {"device": "<GPU/CPU name>", "dtype": ..., "shape"/...: ..., "per_call_ms": ...,
                  "timer": "cuda_events" | "perf_counter", "calls_per_round": N, ...},
   "date": "<UTC ISO 8601>",
   "machine": {"torch": ..., "cuda": ..., "triton": ..., "gpu": <name or null>, "python": ..., "platform": ...}}
"""
import datetime
import json
import os
import platform
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tiny-pipeline builders live beside the tests.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

JSONL_ENV = "FASTDIFF_BENCH_JSONL"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Size):
        return list(value)
    return str(value)  # torch.dtype, torch.device, ...


def _machine():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version, gpu=gpu,
                python=platform.python_version(), platform=platform.platform())


def benchmark_record(item, outcome):
    """The JSON line for a finished test's benchmark fixture, or None if it timed nothing."""
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    meta = getattr(fixture, "stats", None)
    stats = getattr(meta, "stats", None)
    if stats is None or not getattr(stats, "data", None):
        return None
    return _jsonable(dict(
        name=fixture.name, fullname=fixture.fullname, group=fixture.group,
        params=getattr(fixture, "params", None), outcome=outcome,
        stats=dict(median=stats.median, min=stats.min, max=stats.max, mean=stats.mean,
                   stddev=stats.stddev, rounds=stats.rounds, iterations=meta.iterations),
        extra_info=dict(fixture.extra_info),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=_machine()))


def append_line(path, record):
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of O_APPEND: lines of concurrent runs do not interleave
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    path = os.environ.get(JSONL_ENV)
    if not path or call.when != "call":
        return
    report = outcome.get_result()
    record = benchmark_record(item, report.outcome)
    if record is not None:
        append_line(path, record)
