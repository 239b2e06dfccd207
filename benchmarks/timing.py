"""How every benchmark here times a call: rounds of many back-to-back calls, medians.

On a GPU (../shared/GPU.md): after warm-up, R rounds of N back-to-back calls, each round
between two CUDA events, so the figure is device time and not the host's launch latency
plus a synchronize; N is chosen so that a round lasts about TARGET_ROUND_S["cuda"]
(milliseconds, not microseconds: the event resolution is about 0.5 us). The per-call
time is the median over rounds of (round time / N). On the CPU the same rounds are timed
with the wall clock (time.perf_counter), as before.

With pytest-benchmark, ``bench(benchmark, fn, ...)`` runs the timed rounds through
``benchmark.pedantic`` (one round = N calls + one sync), so ``--benchmark-only``,
``--benchmark-json`` and the tables keep working; its statistics are rescaled to one call
(``iterations`` = N, as pytest-benchmark itself reports a round of N iterations), and the
clock's per-call median, min and max go to ``benchmark.extra_info`` (``per_call_ms`` ...),
with TFLOP/s and GB/s derived from the median where the caller gives FLOPs or bytes.

Capture a CUDA graph, compile a kernel or check a result before calling bench: nothing
but the calls themselves may run inside the timed rounds.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

# Seconds one timed round should last. On CUDA a few ms: long against the event resolution
# and the one synchronize per round, short enough for 20+ rounds per case in the GPU call's
# time budget. On the CPU the wall clock resolves far below that; 10 ms keeps per-case time
# near what the benchmarks took before.
TARGET_ROUND_S = {"cuda": 10e-3, "cpu": 10e-3}
MAX_CALLS = 10_000


class WallClock:
    """The host clock; on the CPU a call's work is done when it returns."""

    name = "perf_counter"

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0


class CudaEventClock:
    """Two CUDA events on the current stream; stop() waits for the second one."""

    name = "cuda_events"

    def __init__(self, device=None):
        self.device = torch.device(device if device is not None else "cuda")

    def start(self) -> None:
        self._a = torch.cuda.Event(enable_timing=True)
        self._a.record(torch.cuda.current_stream(self.device))

    def stop(self) -> float:
        b = torch.cuda.Event(enable_timing=True)
        b.record(torch.cuda.current_stream(self.device))
        b.synchronize()
        return self._a.elapsed_time(b) / 1e3


def clock_for(device) -> "WallClock | CudaEventClock":
    device = torch.device(device)
    return CudaEventClock(device) if device.type == "cuda" else WallClock()


def calls_per_round(per_call_s: float, target_round_s: float, max_calls: int = MAX_CALLS) -> int:
    """N such that N calls of per_call_s last at least target_round_s (1 <= N <= max_calls)."""
    if not per_call_s > 0:
        return max_calls
    return max(1, min(max_calls, math.ceil(target_round_s / per_call_s)))


def time_round(fn: Callable[[], object], n: int, clock, host=time.perf_counter):
    """(clock seconds, host seconds to issue the calls) for n back-to-back calls of fn."""
    clock.start()
    t0 = host()
    for _ in range(n):
        fn()
    issued = host() - t0
    return clock.stop(), issued


def estimate_per_call(fn: Callable[[], object], clock, target_round_s: float, max_calls: int = MAX_CALLS) -> float:
    """Seconds per call from probe rounds of 1, 10, 100, ... calls, until one lasts target/10."""
    k = 1
    while True:
        elapsed, _ = time_round(fn, k, clock)
        if elapsed >= target_round_s / 10 or k >= max_calls:
            return elapsed / k
        k = min(max_calls, k * 10)


@dataclass
class Timing:
    """Per-call times (seconds) of R timed rounds of N calls each."""

    calls_per_round: int
    round_s: List[float]                 # clock time of each timed round
    issue_s: List[float] = field(default_factory=list)  # host time to issue each round's calls
    clock: str = "perf_counter"

    @property
    def rounds(self) -> int:
        return len(self.round_s)

    @property
    def per_call_s(self) -> float:
        return statistics.median(self.round_s) / self.calls_per_round

    @property
    def per_call_min_s(self) -> float:
        return min(self.round_s) / self.calls_per_round

    @property
    def per_call_max_s(self) -> float:
        return max(self.round_s) / self.calls_per_round

    @property
    def issue_per_call_s(self) -> Optional[float]:
        return statistics.median(self.issue_s) / self.calls_per_round if self.issue_s else None

    def info(self, flops: Optional[float] = None, bytes_moved: Optional[float] = None) -> dict:
        out = dict(timer=self.clock, calls_per_round=self.calls_per_round, timed_rounds=self.rounds,
                   per_call_ms=self.per_call_s * 1e3, per_call_min_ms=self.per_call_min_s * 1e3,
                   per_call_max_ms=self.per_call_max_s * 1e3)
        if self.clock == CudaEventClock.name and self.issue_s:
            # Host time to issue one call. Near per_call_ms, the GPU may have waited for the
            # host (the figure is then launch throughput, not kernel time) - or the launch
            # queue was full and the host waited for the GPU; far below it, device-bound.
            out["issue_per_call_ms"] = self.issue_per_call_s * 1e3
        if flops is not None:
            out["tflops"] = flops / self.per_call_s / 1e12
        if bytes_moved is not None:
            out["gb_per_s"] = bytes_moved / self.per_call_s / 1e9
        return out


def measure(fn: Callable[[], object], *, rounds: int, device="cpu", calls: Optional[int] = None,
            warmup_rounds: Optional[int] = None, target_round_s: Optional[float] = None,
            clock=None, run_rounds: Optional[Callable] = None) -> Timing:
    """Warm up, choose N (unless ``calls`` fixes it), then time ``rounds`` rounds of N calls.

    ``run_rounds(round_fn, rounds)`` runs the timed rounds (bench passes pytest-benchmark's
    pedantic); by default a plain loop. warmup_rounds (untimed rounds of N calls after the
    probe) defaults to 1 on CUDA (clocks up, allocator warm) and 0 on the CPU, where the
    probe is the warm-up.
    """
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    clock = clock if clock is not None else clock_for(device)
    target = target_round_s if target_round_s is not None else TARGET_ROUND_S[kind]
    if warmup_rounds is None:
        warmup_rounds = 1 if kind == "cuda" else 0
    if kind == "cuda":
        torch.cuda.synchronize(device)  # the caller's check may still be running
    n = calls if calls is not None else calls_per_round(estimate_per_call(fn, clock, target), target)
    for _ in range(warmup_rounds):
        time_round(fn, n, clock)
    timing = Timing(n, [], [], clock.name)

    def round_fn():
        elapsed, issued = time_round(fn, n, clock)
        timing.round_s.append(elapsed)
        timing.issue_s.append(issued)

    if run_rounds is None:
        for _ in range(rounds):
            round_fn()
    else:
        run_rounds(round_fn, rounds)
    return timing


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _per_call_stats(benchmark, n: int) -> None:
    """pytest-benchmark's round statistics rescaled to one call (iterations = N)."""
    meta = getattr(benchmark, "stats", None)
    data = getattr(getattr(meta, "stats", None), "data", None)
    if data is None or not hasattr(meta, "iterations"):
        benchmark.extra_info["pytest_benchmark_stats"] = f"per round of {n} calls"
        return
    data[:] = [d / n for d in data]
    for cached in [k for k in vars(meta.stats) if k != "data"]:  # its cached medians etc.
        delattr(meta.stats, cached)
    meta.iterations = n


def bench(benchmark, fn: Callable[[], object], *, rounds: int, device="cpu", calls: Optional[int] = None,
          warmup_rounds: Optional[int] = None, target_round_s: Optional[float] = None,
          flops: Optional[float] = None, bytes_moved: Optional[float] = None, **info) -> Optional[Timing]:
    """measure() with pytest-benchmark's fixture running the timed rounds; see the module docstring.

    info (dtype, shape, impl, ...) goes to extra_info, with the device's name and the timing.
    """
    device = torch.device(device)
    benchmark.extra_info.update(device=device_name(device), device_type=device.type,
                                threads=torch.get_num_threads(), **info)
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: run once, as pytest-benchmark does
        fn()
        return None

    def run_rounds(round_fn, r):
        benchmark.pedantic(round_fn, rounds=r, warmup_rounds=0, iterations=1)

    timing = measure(fn, rounds=rounds, device=device, calls=calls, warmup_rounds=warmup_rounds,
                     target_round_s=target_round_s, run_rounds=run_rounds)
    _per_call_stats(benchmark, timing.calls_per_round)
    benchmark.extra_info.update(timing.info(flops, bytes_moved))
    return timing


def alternate(benchmark, fns: "dict[str, Callable[[], object]]", *, rounds: int, warmup_rounds: int = 1) -> dict:
    """Each of `fns` called once per round, in turn, for `rounds` timed rounds (pytest-benchmark's
    pedantic runs them: its figure is one round of all), after `warmup_rounds` untimed ones:
    drifts of the machine (clock, other load) then reach every side alike. Returns
    {name: [seconds of each call]} (wall clock: CPU work only)."""
    times = {name: [] for name in fns}

    def one_round(record=True):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if record:
                times[name].append(time.perf_counter() - start)

    for _ in range(warmup_rounds):
        one_round(record=False)
    if getattr(benchmark, "disabled", False):
        one_round()
    else:
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(device=device_name("cpu"), device_type="cpu", threads=torch.get_num_threads(),
                                alternated_rounds=rounds,
                                median_s={name: statistics.median(v) for name, v in times.items()},
                                min_s={name: min(v) for name, v in times.items()})
    return times


def assert_varied(**tensors) -> None:
    """Refuse to time on zeros or constant inputs (a kernel can skip work on them)."""
    for name, t in tensors.items():
        if t is None or not torch.is_tensor(t) or t.numel() < 2:
            continue
        flat = t.detach().reshape(-1)
        if not torch.is_floating_point(flat):
            flat = flat.float()
        if bool((flat == flat[0]).all()):
            raise AssertionError(f"benchmark input {name} is constant ({flat[0].item()}): time on varied data")
