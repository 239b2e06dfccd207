"""The benchmark harness itself, on the CPU: benchmarks/timing.py and benchmarks/conftest.py.

A GPU is lent rarely and for one short call, so what the benchmarks do there must already
be right: the timing helper's round arithmetic (with a fake clock), its CPU path, the JSON
lines written as each benchmark finishes (also when the run is killed), and the tiny SD 1.5
benchmark with its graph variants run through graphs.EagerCapture rather than skipped.
"""
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from deps import require

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


timing = _load("fastdiff_bench_timing", BENCH / "timing.py")


class FakeClock:
    """A clock over a fake time that the timed function advances."""

    name = "fake"

    def __init__(self):
        self.now = 0.0

    def start(self):
        self._t0 = self.now

    def stop(self):
        return self.now - self._t0


def fake_call(clock, cost_s, counter):
    def fn():
        clock.now += cost_s
        counter.append(1)
    return fn


@pytest.mark.parametrize("per_call, target, n", [(1e-5, 1e-2, 1000), (3e-3, 1e-2, 4), (0.5, 1e-2, 1),
                                                  (1e-9, 1e-2, timing.MAX_CALLS), (0.0, 1e-2, timing.MAX_CALLS)])
def test_calls_per_round(per_call, target, n):
    assert timing.calls_per_round(per_call, target) == n


def test_probe_grows_the_round_until_it_lasts_a_tenth_of_the_target():
    clock, calls = FakeClock(), []
    per_call = timing.estimate_per_call(fake_call(clock, 1e-5, calls), clock, 1e-2)
    assert per_call == pytest.approx(1e-5)
    assert len(calls) == 1 + 10 + 100  # 1e-5 and 1e-4 s are short of 1e-3 s; 100 calls reach it


def test_measure_times_rounds_of_n_back_to_back_calls():
    clock, calls = FakeClock(), []
    result = timing.measure(fake_call(clock, 2e-5, calls), rounds=7, clock=clock, warmup_rounds=2,
                            target_round_s=1e-2)
    assert result.calls_per_round == 500
    assert result.rounds == 7 and len(result.round_s) == 7
    assert result.per_call_s == pytest.approx(2e-5)
    assert len(calls) == (1 + 10 + 100) + 2 * 500 + 7 * 500  # probe, warm-up rounds, timed rounds
    info = result.info(flops=2e7, bytes_moved=4e6)
    assert info["tflops"] == pytest.approx(2e7 / 2e-5 / 1e12)
    assert info["gb_per_s"] == pytest.approx(4e6 / 2e-5 / 1e9)
    assert info["per_call_ms"] == pytest.approx(2e-2) and info["calls_per_round"] == 500


def test_per_call_figures_are_round_medians_over_n():
    class Scripted(FakeClock):
        def __init__(self, rounds):
            super().__init__()
            self.rounds = list(rounds)

        def stop(self):
            return self.rounds.pop(0)

    result = timing.measure(lambda: None, rounds=3, calls=2, warmup_rounds=0, clock=Scripted([5e-3, 1e-3, 3e-3]))
    assert result.calls_per_round == 2
    assert result.per_call_s == pytest.approx(1.5e-3)
    assert result.per_call_min_s == pytest.approx(0.5e-3) and result.per_call_max_s == pytest.approx(2.5e-3)


def test_run_rounds_is_handed_the_timed_rounds():
    """bench() passes pytest-benchmark's pedantic here; the timed rounds must go through it."""
    clock, calls, seen = FakeClock(), [], []

    def run_rounds(round_fn, rounds):
        seen.append(rounds)
        for _ in range(rounds):
            round_fn()

    result = timing.measure(fake_call(clock, 1e-3, calls), rounds=4, calls=3, warmup_rounds=0, clock=clock,
                            run_rounds=run_rounds)
    assert seen == [4] and result.rounds == 4 and len(calls) == 12


def test_cpu_path_uses_the_wall_clock():
    result = timing.measure(lambda: time.sleep(2e-3), rounds=3, device="cpu")
    assert result.clock == "perf_counter"
    assert 1 <= result.calls_per_round <= 5  # a 10 ms round of calls that sleep at least 2 ms
    assert result.per_call_s >= 2e-3 and result.rounds == 3
    assert isinstance(timing.clock_for("cpu"), timing.WallClock)


class FakeCuda:
    """torch.cuda's event API over the host clock, to run timing's CUDA path without a GPU."""

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self, stream=None):
            self.t = time.perf_counter()

        def synchronize(self):
            assert self.t is not None

        def elapsed_time(self, other):  # milliseconds, as CUDA's
            return (other.t - self.t) * 1e3

    @classmethod
    def install(cls, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", cls.Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H200")


def test_cuda_path_times_with_events_in_seconds(monkeypatch):
    FakeCuda.install(monkeypatch)
    calls = []
    result = timing.measure(lambda: (time.sleep(1.5e-3), calls.append(1)), rounds=4, device="cuda")
    assert result.clock == "cuda_events" and result.rounds == 4
    assert 1.5e-3 <= result.per_call_s < 0.1  # seconds, not the events' milliseconds
    n = result.calls_per_round
    assert 1 <= n <= 10 and len(calls) == 1 + n + 4 * n  # probe (one call: >= target / 10), 1 warm-up round
    assert "issue_per_call_ms" in result.info()


def test_bench_reports_per_call_figures_to_pytest_benchmark(benchmark, monkeypatch):
    """The fixture's statistics are per call (iterations = N); the events' figures are in extra_info."""
    FakeCuda.install(monkeypatch)
    result = timing.bench(benchmark, lambda: sum(range(2000)), device="cuda", rounds=5, flops=1e6, dtype="x",
                          shape=[3])
    if result is None:  # --benchmark-disable
        return
    assert benchmark.stats.iterations == result.calls_per_round > 1
    assert benchmark.stats.stats.rounds == 5
    assert benchmark.stats.stats.median == pytest.approx(result.per_call_s, rel=0.5)
    info = benchmark.extra_info
    assert info["device"] == "Fake H200" and info["device_type"] == "cuda" and info["timer"] == "cuda_events"
    assert info["per_call_ms"] == pytest.approx(result.per_call_s * 1e3) and info["tflops"] > 0
    assert info["dtype"] == "x" and info["shape"] == [3]


def test_constant_inputs_are_refused():
    timing.assert_varied(x=torch.randn(4, 4), none=None, scalar=torch.tensor(3.0))
    with pytest.raises(AssertionError, match="zeros"):
        timing.assert_varied(zeros=torch.zeros(8))
    with pytest.raises(AssertionError, match="tokens"):
        timing.assert_varied(tokens=torch.full((4,), 7))


def _run(args, env, cwd=ROOT, **kw):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True, text=True, **kw)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_the_tiny_sd15_and_a_kernel_benchmark_write_one_json_line_each(tmp_path):
    """The tiny SD 1.5 benchmark (graph variants through EagerCapture) and guided_step's smallest case."""
    require("diffusers")
    from fastdiff.ops import _library

    jsonl = tmp_path / "bench.jsonl"
    kernel = _library.extension_loaded()
    files = ["benchmarks/bench_sd15_gpu.py"] + (["benchmarks/bench_guided_step.py::test_guided_step_cpu_fp32"]
                                                if kernel else [])
    proc = _run([*files, "-k", "not 128x128 and not 256x256", "--benchmark-only", "-rs",
                 f"--junitxml={tmp_path / 'junit.xml'}"],
                # One thread: this checks the harness, not speed, and OpenMP's 2 threads on 2 cores
                # shared with other jobs run some tiny-model calls 10x slower.
                dict(FASTDIFF_BENCH_SD15_TINY="1", FASTDIFF_BENCH_JSONL=str(jsonl), OMP_NUM_THREADS="1"),
                timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]  # the graph variants ran

    records = {r["name"]: r for r in _lines(jsonl)}
    impls = ("diffusers", "fastdiff", "fastdiff-graph")
    want = {f"test_unet_step[{i}]" for i in impls} | {f"test_generation_50_steps[{i}]" for i in impls}
    if kernel:
        want |= {f"test_guided_step_cpu_fp32[{i}-2x4x64x64]" for i in ("fused_cpp", "eager_twin")}
    assert set(records) == want and len(_lines(jsonl)) == len(want)

    for name, r in records.items():
        assert r["outcome"] == "passed" and r["fullname"].endswith(name) and r["group"], name
        assert isinstance(r["params"], dict) and r["params"], name
        stats, info = r["stats"], r["extra_info"]
        assert 0 < stats["min"] <= stats["median"] <= stats["max"], name
        assert stats["rounds"] == info["timed_rounds"] >= 1 and stats["iterations"] == info["calls_per_round"], name
        # pytest-benchmark's figure (per call, its host timer around the round) and the clock's agree
        assert stats["median"] * 1e3 == pytest.approx(info["per_call_ms"], rel=0.25, abs=0.05), name
        assert info["timer"] == "perf_counter" and info["device_type"] == "cpu" and info["device"], name
        assert info["dtype"] == "torch.float32" and info["shape"], name
        assert datetime.datetime.fromisoformat(r["date"]).tzinfo is not None, name
        assert r["machine"]["torch"] == torch.__version__, name

    unet_graph = records["test_unet_step[fastdiff-graph]"]["extra_info"]
    assert unet_graph["replay_vs_eager_max_abs"] == 0.0  # EagerCapture replays the very same ops
    gen_graph = records["test_generation_50_steps[fastdiff-graph]"]["extra_info"]
    assert gen_graph["graphed_vs_eager_max_abs"] == 0.0 and gen_graph["captures_in_warmup"] >= 1
    if kernel:
        assert records["test_guided_step_cpu_fp32[fused_cpp-2x4x64x64]"]["extra_info"]["gb_per_s"] > 0


KILLED = '''
import time

from timing import bench


def test_finishes(benchmark):
    benchmark.group = "harness"
    bench(benchmark, lambda: sum(range(1000)), device="cpu", rounds=3, dtype="int", shape=[1000])


def test_hangs(benchmark):
    time.sleep(600)
'''


def test_a_killed_run_keeps_the_lines_of_the_benchmarks_that_finished(tmp_path):
    """The line is on disk when its test ends, not when the session does."""
    (tmp_path / "test_killed.py").write_text(textwrap.dedent(KILLED))
    jsonl = tmp_path / "bench.jsonl"
    env = {**os.environ, "FASTDIFF_BENCH_JSONL": str(jsonl),
           "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])}
    # benchmarks/conftest.py loaded as a plugin, for a test file outside benchmarks/
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                             "--benchmark-json", str(tmp_path / "all.json"), "test_killed.py"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and jsonl.read_text().endswith("\n"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    (line,) = _lines(jsonl)
    assert line["name"] == "test_finishes" and line["outcome"] == "passed" and line["stats"]["rounds"] == 3
    assert line["extra_info"]["shape"] == [1000] and line["extra_info"]["per_call_ms"] > 0
    all_json = tmp_path / "all.json"  # what --benchmark-json alone would have kept: nothing
    assert not all_json.exists() or all_json.stat().st_size == 0
