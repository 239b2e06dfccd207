"""scripts/gpu_check.sh, the one call a lent GPU gets, run here against stand-in tools.

The GPU is not needed to check what the script promises: every GPU test file is its own
phase and none stops the others (no -x), a failing phase makes the exit status non-zero,
memcheck runs with the caching allocator off after a probe, the benchmarks get the JSONL
path, and $OUT holds at most the 8 files the device tool returns.
"""
import os
import stat
import subprocess


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Records each call; fails the phases named in FAIL_ON (a substring of the arguments).
echo "python $* | caching=${PYTORCH_NO_CUDA_MEMORY_CACHING:-on} jsonl=${FASTDIFF_BENCH_JSONL:-}" >>"$CALLS"
if [[ "$*" == *"${FAIL_ON:-<none>}"* ]]; then echo "failing as asked"; exit 1; fi
if [[ "$*" == *"-c import torch, triton"* ]]; then echo "torch 2.11 cuda 13.0 triton 3.6"; fi
[[ "${1:-}" == "-" ]] && cat >/dev/null
exit 0
"""

FAKE_SANITIZER = r"""#!/usr/bin/env bash
echo "sanitizer $* | caching=${PYTORCH_NO_CUDA_MEMORY_CACHING:-on}" >>"$CALLS"
if [[ "$*" == *probe.py* && -n "${SANITIZER_REFUSES:-}" ]]; then echo "Device not supported"; exit 1; fi
exec "$@" 2>/dev/null || true
"""

FAKE_SMI = "#!/usr/bin/env bash\necho 'name, driver_version'\necho 'NVIDIA H200, 580'\n"


def tool(folder, name, text):
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run(tmp_path, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = tool(bin_dir, "fakepython", FAKE_PYTHON)
    tool(bin_dir, "compute-sanitizer", FAKE_SANITIZER.replace('exec "$@"', f'exec "{python}" "${{@:5}}"'))
    tool(bin_dir, "nvidia-smi", FAKE_SMI)
    out, calls = tmp_path / "out", tmp_path / "calls.log"
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(python), OUT=str(out),
                    CALLS=str(calls), GPU_CHECK_SECONDS="120", **env)
    r = subprocess.run(["bash", "scripts/gpu_check.sh", *args], capture_output=True, text=True, cwd=ROOT,
                       env=full_env, timeout=300)
    return r, out, calls.read_text().splitlines()


def test_every_phase_runs_and_a_failure_makes_the_call_fail(tmp_path):
    r, out, calls = run(tmp_path, FAIL_ON="test_group_norm.py")
    assert r.returncode != 0
    summary = (out / "summary.txt").read_text()
    assert "[test_group_norm] FAILED" in summary
    # the phases after the failing one still ran: each GPU test file, memcheck, the benchmarks
    for phase in ("build", "backends", "test_attention_triton", "test_guided_step", "test_discrete_step_triton",
                  "test_cuda_graphs", "memcheck", "bench_ops", "bench_sd15", "bench_attention"):
        assert f"[{phase}] ok" in summary, (phase, summary)
    pytest_calls = [c for c in calls if " -m pytest " in c]
    assert pytest_calls and not any(" -x " in c for c in pytest_calls)
    assert all(sum(part.endswith(".py") for part in c.split("|")[0].split()) == 1
               for c in pytest_calls if "tests/" in c), "one test file per phase"
    assert all(f"jsonl={out}/bench.jsonl" in c for c in pytest_calls if "benchmarks/" in c)
    assert len(list(out.iterdir())) <= 8 and (out / "logs.tar.gz").exists()


def test_all_green_exits_zero_and_quick_skips_the_benchmarks(tmp_path):
    r, out, calls = run(tmp_path, "quick")
    assert r.returncode == 0, r.stdout[-2000:]
    assert not any("benchmarks/" in c for c in calls)


def test_memcheck_probes_first_and_runs_without_the_caching_allocator(tmp_path):
    r, out, calls = run(tmp_path, "quick")
    sanitizer = [c for c in calls if c.startswith("sanitizer")]
    assert len(sanitizer) == 2 and "probe.py" in sanitizer[0] and "cuda_ops_once.py" in sanitizer[1]
    assert all("caching=1" in c for c in sanitizer)
    (tmp_path / "refused").mkdir()
    r, out, calls = run(tmp_path / "refused", "quick", SANITIZER_REFUSES="1")
    assert r.returncode != 0
    assert "[memcheck] FAILED" in (out / "summary.txt").read_text()
    assert not any("cuda_ops_once.py" in c for c in calls if c.startswith("sanitizer"))
