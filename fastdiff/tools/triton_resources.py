"""Ahead-of-time resource check of fastdiff's Triton kernels for a GPU, without a GPU.

What a kernel launch needs from the GPU — shared memory per block, registers per thread,
and whether the compiler had to spill registers to local memory — is fixed when Triton
compiles it, so it can be known on a machine without a GPU:

1. **Record** every launch fastdiff would make for the three model families, on meta
   tensors: the real models, every sampler, the VQ-Diffusion step and attention at the
   other head dims it accepts, in fp16, bf16 and fp32, with ``tune()``'s candidates
   (fastdiff/tools/family_launches.py says which).
2. **Compile** each distinct launch for the target (sm_90 by default) with Triton, through
   a stand-in driver that names the target instead of asking a GPU.
3. **Read** the shared memory from Triton's metadata and the registers and the stack
   (spill) bytes per thread from the cubin (``cuobjdump --dump-resource-usage``).

A launch fits when its shared memory is within the target's per-block limit; 16-bit
launches must also not spill (fp32 attention, which runs SDPA by default, may; its
spills are reported). ``python -m fastdiff.tools.triton_resources`` prints the table and
exits non-zero when something does not fit; tests/test_gpu_resources.py runs it in the
suite. Compiled kernels land in Triton's own cache (keyed by source, options and Triton
version), so a second run on the same machine takes seconds.

Run it in a process without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..ops.triton._launch import Launch
from .family_launches import DTYPES, Recorded, family_launches  # noqa: F401  (Recorded: for callers)


@dataclass(frozen=True)
class Target:
    name: str
    arch: int
    warp_size: int
    shared_limit: int       # bytes of shared memory one block may use (the opt-in maximum)
    max_registers: int = 255


SM90 = Target("sm_90", 90, 32, 232_448)   # H100 / H200: 227 KiB per block
SM80 = Target("sm_80", 80, 32, 166_912)   # A100: 163 KiB per block
TARGETS = {t.name: t for t in (SM90, SM80)}


# ----------------------------------------------------------------------------- compiling

def _spec(value) -> tuple:
    """How Triton specialises an argument (its type; 16-byte alignment / divisibility;
    integers equal to 1 become constants)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -2**31 <= value < 2**31)
    if isinstance(value, float):
        return ("float",)
    return (type(value).__name__, repr(value))


def compile_key(launch: Launch) -> tuple:
    """Launches with equal keys compile to the same binary."""
    return (launch.name, tuple(_spec(a) for a in launch.args), tuple(sorted(launch.meta.items())))


class _AheadOfTimeDriver:
    """What Triton's launcher asks the active driver, answered for a target with no GPU."""

    def __init__(self, target: Target):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", target.arch, target.warp_size)

    def get_current_device(self):
        return -1  # a device id no real GPU has, so these kernels never enter a real device's cache

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def _driver_for(target: Target) -> Iterator[None]:
    from triton.runtime.driver import driver

    saved = driver._active
    driver.set_active(_AheadOfTimeDriver(target))
    try:
        yield
    finally:
        driver._active = saved


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if os.path.exists(bundled):
        return bundled
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found (neither Triton's bundled copy nor on PATH)")
    return found


def _resource_usage(cubin: bytes) -> Tuple[int, int]:
    """(registers, stack bytes) per thread of the one function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                              check=True).stdout
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return int(fields["REG"]), int(fields.get("STACK", "0")) + int(fields.get("LOCAL", "0"))
    raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")


@dataclass
class Compiled:
    kernel: str
    meta: dict
    dtype: str
    shared: int
    registers: int
    spill_bytes: int                 # stack / local memory per thread: spilled registers
    seconds: float
    problems: List[str] = field(default_factory=list)
    tuning_only: bool = True
    fits: bool = True
    why: str = ""
    cache_key: str = ""


def _launch_dtype(launch: Launch) -> str:
    for a in launch.args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return str(a.dtype).replace("torch.", "")
    return "-"


def compile_one(launch: Launch, target: Target) -> Compiled:
    kernel = launch.kernel
    start = time.perf_counter()
    with _driver_for(target):
        compiled = kernel.warmup(*launch.args, grid=launch.grid, **launch.meta)
    registers, spills = _resource_usage(compiled.asm["cubin"])
    return Compiled(launch.name, {k: v for k, v in launch.meta.items()}, _launch_dtype(launch),
                    int(compiled.metadata.shared), registers, spills, time.perf_counter() - start)


def _judge(entry: Compiled, target: Target) -> None:
    reasons = [entry.why] if entry.why else []
    if entry.shared > target.shared_limit:
        reasons.append(f"shared memory {entry.shared} B > {target.shared_limit} B")
    if entry.spill_bytes and entry.dtype in ("float16", "bfloat16"):
        reasons.append(f"spills {entry.spill_bytes} B per thread")
    entry.fits, entry.why = not reasons, "; ".join(reasons)


def _portable(launch: Launch) -> tuple:
    """A launch in a form another process can rebuild (the kernel by module and name)."""
    fn = launch.kernel.fn
    return (fn.__module__, fn.__name__, launch.grid, launch.args, launch.meta)


def _compile_portable(args) -> dict:
    (module, name, grid, launch_args, meta), target_name = args
    import importlib

    os.environ.pop("TRITON_INTERPRET", None)
    kernel = getattr(importlib.import_module(module), name)
    launch = Launch(kernel, grid, torch.device("cuda"), launch_args, meta)
    return asdict(compile_one(launch, TARGETS[target_name]))


def cache_key(launch: Launch, target: Target) -> str:
    """Names a compiled launch by everything its resources depend on: the target, the Triton
    version, the kernel's source (Triton's own hash of it and of what it calls) and the
    launch's specialisation."""
    import hashlib

    import triton

    spec = hashlib.sha1(repr(compile_key(launch)).encode()).hexdigest()[:16]
    return f"{target.name}|triton {triton.__version__}|{launch.kernel.cache_key[:16]}|{spec}"


def _load_cache(path: Optional[str]) -> Dict[str, dict]:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh).get("entries", {})


def check(target: Target = SM90, jobs: int = 1, progress: Optional[Callable[[str], None]] = None,
          cache: Optional[str] = None, verify: int = 0, update_cache: bool = False, **options) -> List[Compiled]:
    """Compile every distinct launch of ``family_launches(**options)`` for `target`; one
    Compiled per distinct launch, with the problems that make it and whether it fits.

    cache: a JSON file of earlier results (cache_key -> resources). A launch found there is
    not compiled again, except the `verify` largest (by shared memory) of them, which are,
    and must give the same figures. update_cache writes this run's results back to it,
    dropping entries no launch uses any more.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("resources.check compiles kernels: run it without TRITON_INTERPRET")
    records = family_launches(**options)
    groups: Dict[tuple, List[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(compile_key(record.launch), []).append(i)
    firsts = [members[0] for members in groups.values()]
    keys = {i: cache_key(records[i].launch, target) for i in firsts}
    known = _load_cache(cache)
    cached = [i for i in firsts if keys[i] in known]
    checked = sorted(cached, key=lambda i: (-known[keys[i]]["shared"], keys[i]))[:verify]
    todo = [i for i in firsts if keys[i] not in known] + checked
    if progress:
        progress(f"{len(records)} launches recorded, {len(firsts)} distinct, {len(cached)} known from the cache "
                 f"({len(checked)} of them compiled again to check it); compiling {len(todo)} for {target.name} "
                 f"with {jobs} process(es)")
    results: Dict[int, dict] = {}
    if jobs <= 1 or len(todo) <= 1:
        for n, i in enumerate(todo):
            results[i] = asdict(compile_one(records[i].launch, target))
            if progress and (n + 1) % 25 == 0:
                progress(f"  {n + 1}/{len(todo)}")
    else:
        import multiprocessing

        work = [(_portable(records[i].launch), target.name) for i in todo]
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for n, (i, result) in enumerate(zip(todo, pool.imap(_compile_portable, work))):
                results[i] = result
                if progress and (n + 1) % 25 == 0:
                    progress(f"  {n + 1}/{len(todo)}")
    out = []
    figures = ("shared", "registers", "spill_bytes")
    for members in groups.values():
        i = members[0]
        if i in results:
            entry = Compiled(**results[i])
            if i in checked:
                was = known[keys[i]]
                if any(was[k] != getattr(entry, k) for k in figures):
                    entry.why = (f"the cache says {[was[k] for k in figures]} but compiling gives "
                                 f"{[getattr(entry, k) for k in figures]}: refresh it (--update-cache)")
        else:
            was = known[keys[i]]
            entry = Compiled(was["kernel"], was["meta"], was["dtype"], was["shared"], was["registers"],
                             was["spill_bytes"], 0.0)
        entry.problems = sorted({records[j].problem for j in members})
        entry.tuning_only = all(records[j].tuning for j in members)
        entry.cache_key = keys[i]
        _judge(entry, target)
        out.append(entry)
    if update_cache and cache:
        entries = {e.cache_key: {k: getattr(e, k) for k in ("kernel", "meta", "dtype") + figures} for e in out}
        with open(cache + ".tmp", "w") as fh:
            json.dump({"about": "fastdiff's Triton launches compiled ahead of time; refresh with "
                                "python -m fastdiff.tools.triton_resources --cache THIS_FILE --update-cache",
                       "entries": dict(sorted(entries.items()))}, fh, indent=0, default=str)
        os.replace(cache + ".tmp", cache)
    return out


def _describe(entry: Compiled) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "D", "BLOCK", "BLOCK_K", "CHUNK", "num_warps", "num_stages")
    meta = " ".join(f"{k}={entry.meta[k]}" for k in keys if k in entry.meta)
    return f"{entry.kernel:<24} {entry.dtype:<9} {meta}"


def report(entries: Sequence[Compiled], target: Target) -> str:
    lines = [f"{'kernel':<24} {'dtype':<9} config | shared (limit {target.shared_limit}) | regs | spill B | "
             "problems"]
    for e in sorted(entries, key=lambda e: (e.kernel, e.dtype, -e.shared)):
        flag = "" if e.fits else f"   DOES NOT FIT: {e.why}"
        lines.append(f"{_describe(e)} | {e.shared} | {e.registers} | {e.spill_bytes} | {len(e.problems)} "
                     f"(e.g. {e.problems[0]}){' [tune]' if e.tuning_only else ''}{flag}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.tools.triton_resources",
        description="Compile every Triton launch fastdiff makes for SD 1.x/2.x, GLIDE and VQ-Diffusion ahead of "
                    "time for a GPU and check shared memory and register spills against its limits (no GPU needed).")
    parser.add_argument("--target", choices=sorted(TARGETS), default="sm_90")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16", "fp32"])
    parser.add_argument("--families", nargs="+", choices=["sd", "glide", "vq", "generic"],
                        default=["sd", "glide", "vq", "generic"],
                        help="generic: head dims 16-256 that no family uses but attention accepts")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="prompt batches (CFG doubles them)")
    parser.add_argument("--no-tuning", action="store_true", help="leave out tune()'s candidate configs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--json", help="write every compiled launch and its resources here")
    parser.add_argument("--cache", help="a JSON file of earlier results: launches found there are not compiled again")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="compile the N largest cached launches anyway and require the same figures")
    parser.add_argument("--update-cache", action="store_true", help="write this run's results to --cache")
    parser.add_argument("--quiet", action="store_true", help="print only what does not fit and the summary")
    args = parser.parse_args(argv)
    # Triton's default (FMA contraction on), said out loud: Triton 3.9 warns while it is unset.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    target = TARGETS[args.target]
    start = time.perf_counter()
    entries = check(target, jobs=args.jobs, progress=print, cache=args.cache, verify=args.verify,
                    update_cache=args.update_cache, dtypes=[DTYPES[d] for d in args.dtypes], batches=args.batches,
                    tuning=not args.no_tuning, families=args.families)
    bad = [e for e in entries if not e.fits]
    if not args.quiet:
        print(report(entries, target))
    for e in bad:
        print(f"DOES NOT FIT on {target.name}: {_describe(e)}: {e.why}; e.g. {e.problems[0]}")
    print(f"{len(entries)} distinct launches compiled for {target.name} in {time.perf_counter() - start:.0f} s; "
          f"{len(bad)} do not fit")
    if args.json:
        import triton

        with open(args.json, "w") as fh:
            json.dump({"target": asdict(target), "triton": triton.__version__,
                       "launches": [asdict(e) for e in entries]}, fh, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
