"""The Stable Diffusion 1.5 architecture on the CPU, fp32: diffusers vs fastdiff's routes, in
one process, alternated.

Random weights in SD 1.5's shapes (sd15_arch.py: UNet 860M parameters, CLIP ViT-L/14, the
SD VAE), 256 x 256 images (32 x 32 latents), 77 text tokens, torch's threads (ONNX Runtime
takes the same count, spinning off: fastdiff/loaders/onnx_folder.py).

  unet call   one UNet call on the CFG batch of 2, every route in turn each round:
                diffusers      diffusers' UNet2DConditionModel, eager
                fastdiff       fastdiff's UNet, eager (the default runtime)
                onnxruntime    Pipeline.from_pretrained(folder, runtime="onnxruntime")'s UNet
                               (the export, 3.4 GB of external data, made once into the cache)
              and with FASTDIFF_BENCH_SD15_ROUTES=1 the other routes tried, each alone beside
              fastdiff eager (another copy of the weights each, so one at a time):
                channels_last  fastdiff's UNet in NHWC (pipe.to(memory_format=torch.channels_last))
                jit_frozen     torch.jit.trace + freeze + optimize_for_inference (oneDNN weight
                               prepacking, conv + bias/add/SiLU folding)
                inductor       torch.compile with inductor's freezing (constant-folded weights,
                               prepacked oneDNN convolutions, fused pointwise epilogues)
              with the call's FLOPs (torch.utils.flop_counter), the rate each reaches, and that
              rate against a large GEMM's on this machine (its practical fp32 ceiling)
  profile     where one call's time goes: torch.profiler by operator for diffusers and
              fastdiff, ONNX Runtime's own profiler by node type, with the convolutions' and
              GEMMs' FLOPs, so the rate each class reaches (the table RESULTS.md records);
              ONNX Runtime's graph writes attention as MatMul + Softmax, so there its GEMM
              row carries attention's FLOPs too
  generation  4 DPM-Solver++(2M) steps with guidance 7.5, text encoding and VAE decode
              included: diffusers' StableDiffusionPipeline, fastdiff generate() on the torch
              and onnxruntime runtimes, alternated

Outputs are compared before anything is timed: each route's UNet against fastdiff's eager one
(diffusers' too) within float32's rounding of reordered sums (tests/tolerances.py's
fp32_bound, its terms counted on this call), the images within the pipelines' bound (below).
Tables are printed (run with -s) and kept in each benchmark's extra_info.

    pytest benchmarks/bench_sd15_cpu.py --benchmark-only -s          (about 6 minutes on 2 cores)
    FASTDIFF_BENCH_SD15_ROUTES=1 pytest benchmarks/bench_sd15_cpu.py --benchmark-only -s   (about 9 minutes)
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 pytest ...  (every block on the heap)
    FASTDIFF_BENCH_SD15_TINY=1 pytest benchmarks/bench_sd15_cpu.py  (the harness on tiny models)
"""
import collections
import json
import os
import statistics
import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fastdiff  # noqa: E402
import sd15_arch  # noqa: E402
from timing import alternate, assert_varied  # noqa: E402
from tolerances import fp32_bound, reduction_terms  # noqa: E402

TINY = os.environ.get("FASTDIFF_BENCH_SD15_TINY") == "1"
ALL_ROUTES = os.environ.get("FASTDIFF_BENCH_SD15_ROUTES") == "1"
SAMPLE_SIZE = 32  # latent pixels: 256 x 256 images
STEPS, SCALE = 4, 7.5
PROMPT, NEGATIVE = "a red circle above a blue square", "blurry"
if TINY:
    ARCH = dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                          attention_head_dim=8, norm_num_groups=16,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8))
    SAMPLE_SIZE = 8
else:
    ARCH = {}
IMAGE_SIZE = SAMPLE_SIZE * 2 ** (len((ARCH.get("vae") or sd15_arch.VAE)["block_out_channels"]) - 1)
# Images in [0, 1] from pipelines whose every network agrees within float32's rounding (the
# UNet check above): bench_onnx_sd.py's and bench_pipeline_sd.py's bound, which a wrong
# coefficient or a 1% guidance error exceeds many times over.
IMAGE_ATOL = 2e-3
ROUTES = ("diffusers", "fastdiff", "onnxruntime")
# Tried one at a time against fastdiff's eager UNet (each holds another copy of the weights).
OTHER_ROUTES = ("channels_last", "jit_frozen", "inductor")
# glibc's malloc serves blocks above its mmap threshold (128 KiB at start) with fresh mmaps,
# each page then faulted in and zeroed, and raises the threshold (up to 32 MiB) once such a
# block is freed, so what a process freed before decides whether eager PyTorch pays that
# (~20% of an SD 1.5 UNet call here, diffusers and fastdiff alike; ONNX Runtime has its own
# arena). The run leaves glibc as a user's process has it; to time a process that keeps every
# block on the heap, run it under MALLOC_MMAP_THRESHOLD_=17179869184
# MALLOC_TRIM_THRESHOLD_=17179869184 (mallopt cannot raise the threshold past 32 MiB, and
# 32 MiB was measured not to be enough).
HEAP = os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None
# FLOP classes of torch's flop counter and of the profilers' operator names.
CONV, GEMM, ATTENTION = "convolution", "GEMM (linear, matmul)", "attention (SDPA)"
TORCH_OPS = {CONV: ("convolution",), GEMM: ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear"),
             ATTENTION: ("scaled_dot_product",)}
ORT_OPS = {CONV: ("Conv",), GEMM: ("MatMul", "Gemm"), ATTENTION: ("Attention",)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd15_arch.write_folder(str(tmp_path_factory.mktemp("sd15_cpu")), sample_size=SAMPLE_SIZE, **ARCH)


@pytest.fixture(scope="module")
def pipes(folder, tmp_path_factory):
    """diffusers' pipeline, fastdiff's on the torch runtime, and on the onnxruntime runtime."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = fastdiff.Pipeline.from_pretrained(folder)
    cache = str(tmp_path_factory.mktemp("sd15_cpu_cache"))
    start = time.perf_counter()
    onnx_pipe = fastdiff.Pipeline.from_pretrained(folder, runtime="onnxruntime", cache_dir=cache, progress=False)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    fastdiff.Pipeline.from_pretrained(folder, runtime="onnxruntime", cache_dir=cache, progress=False)
    return dict(ref=ref, ours=ours, onnx=onnx_pipe, export_s=export_s, cached_load_s=time.perf_counter() - start)


def unet_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    dim = sd15_arch.MAX_TOKENS, (ARCH.get("unet") or sd15_arch.UNET)["cross_attention_dim"]
    x = torch.randn(2, 4, SAMPLE_SIZE, SAMPLE_SIZE, generator=gen)
    return x, torch.tensor([500]), torch.randn(2, *dim, generator=gen)


def flops_by_class(unet, x, t, context) -> dict:
    """{class: FLOPs} of one call (torch.utils.flop_counter), with "total"."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, encoder_hidden_states=context)
    out = collections.Counter(total=float(counter.get_total_flops()))
    for op, n in counter.get_flop_counts()["Global"].items():
        out[_torch_class(str(op))] += float(n)
    return dict(out)


def _torch_class(op: str) -> str:
    name = op.split("::")[-1].split(".")[-1] if "::" in op else op.split(".")[-1]
    for cls, names in TORCH_OPS.items():
        if any(n in name for n in names):
            return cls
    return "other"


class _Traced(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context)


def build_route(name, pipes, x, t, context):
    """(call(x, t, context) -> output, seconds it took to prepare) of a route. The compiled
    routes run fastdiff's UNet module itself (its parameters need no gradient: inference);
    channels_last a copy in NHWC."""
    import copy

    ref, ours, onnx_pipe = pipes["ref"], pipes["ours"], pipes["onnx"]
    start = time.perf_counter()
    if name == "diffusers":
        call = lambda x, t, c: ref.unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
    elif name == "fastdiff":
        call = lambda x, t, c: ours.unet(x, t, encoder_hidden_states=c)  # noqa: E731
    elif name == "onnxruntime":
        call = lambda x, t, c: onnx_pipe.unet(x, t, encoder_hidden_states=c)  # noqa: E731
    elif name == "channels_last":
        unet = copy.deepcopy(ours.unet).to(memory_format=torch.channels_last)
        call = lambda x, t, c: unet(x.contiguous(memory_format=torch.channels_last), t,  # noqa: E731
                                    encoder_hidden_states=c)
    elif name == "jit_frozen":
        unet = ours.unet.requires_grad_(False).eval()
        with torch.no_grad():
            traced = torch.jit.trace(_Traced(unet).eval(), (x, t, context), check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            frozen(x, t, context), frozen(x, t, context)  # its profiling runs fix the graph
        call = frozen
    elif name == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(ours.unet.requires_grad_(False).eval())
        call = lambda x, t, c: compiled(x, t, encoder_hidden_states=c)  # noqa: E731
        with torch.no_grad():
            call(x, t, context)  # the compilation
    else:
        raise ValueError(name)
    return call, time.perf_counter() - start


@pytest.fixture(scope="module")
def reference_output(pipes):
    """fastdiff's eager UNet output on unet_inputs() and the bound every route is held to."""
    x, t, context = unet_inputs()
    ours = pipes["ours"]
    with torch.no_grad():
        want = ours.unet(x, t, encoder_hidden_states=context)
        terms = reduction_terms(ours.unet, lambda: ours.unet(x, t, encoder_hidden_states=context))
    return want, fp32_bound(max(1.0, want.abs().max().item()), terms)


def checked_route(name, pipes, reference_output):
    """(call, its max abs error against fastdiff's eager UNet, prepare seconds), the error asserted first."""
    want, bound = reference_output
    x, t, context = unet_inputs()
    call, prep = build_route(name, pipes, x, t, context)
    with torch.no_grad():
        error = (call(x, t, context) - want).abs().max().item()
    assert error <= bound, f"the {name} UNet is {error} off fastdiff's (bound {bound})"
    return call, error, prep


@pytest.fixture(scope="module")
def unets(pipes, reference_output):
    """{route: call} of ROUTES, each checked first; their errors, the bound, FLOPs, prepare times."""
    x, t, context = unet_inputs()
    calls, errors, prep = {}, {}, {}
    for name in ROUTES:
        calls[name], errors[name], prep[name] = checked_route(name, pipes, reference_output)
    return dict(calls=calls, errors=errors, bound=reference_output[1], prep_s=prep,
                flops=flops_by_class(pipes["ours"].unet, x, t, context))


def gemm_ceiling(n: int = 2048) -> float:
    """FLOP/s of a large square fp32 GEMM (torch.mm, median of 5): the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def _table(rows, header) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def on_inputs(call):
    """call(x, t, context) on unet_inputs(), without gradients, as a function of nothing (to time)."""
    x, t, context = unet_inputs()

    def run():
        with torch.no_grad():
            return call(x, t, context)
    return run


def test_sd15_unet_call_cpu_fp32(benchmark, unets):
    x, t, context = unet_inputs()
    assert_varied(x=x, context=context)
    benchmark.group = f"SD 1.5 UNet call cpu fp32 batch 2 (CFG) {SAMPLE_SIZE}x{SAMPLE_SIZE} latents, alternated"
    times = alternate(benchmark, {route: on_inputs(unets["calls"][route]) for route in ROUTES},
                      rounds=3 if not TINY else 2)
    median = {route: statistics.median(v) for route, v in times.items()}
    ceiling = gemm_ceiling(256 if TINY else 2048)
    total = unets["flops"]["total"]
    rows = [(route, f"{median[route]:.3f} s", f"{median['diffusers'] / median[route]:.2f}x",
             f"{median['fastdiff'] / median[route]:.2f}x", f"{total / median[route] / 1e9:.0f}",
             f"{total / median[route] / ceiling:.0%}", f"{unets['errors'][route]:.1e}",
             f"{unets['prep_s'][route]:.0f} s") for route in ROUTES]
    table = _table(rows, ("route", "median", "vs diffusers", "vs fastdiff eager", "GFLOP/s", "of GEMM ceiling",
                          "max abs error vs fastdiff", "prepare"))
    benchmark.extra_info.update(heap_allocator=HEAP, flops=unets["flops"], gemm_ceiling_gflops=ceiling / 1e9,
                                bound=unets["bound"],
                                errors=unets["errors"], prepare_s=unets["prep_s"], table=table, tiny=TINY)
    print(f"\n{benchmark.group}: {total / 1e12:.3f} TFLOP per call, large-GEMM ceiling {ceiling / 1e9:.0f} GFLOP/s, "
          f"bound {unets['bound']:.1e}\n{table}")


@pytest.mark.skipif(not ALL_ROUTES, reason="FASTDIFF_BENCH_SD15_ROUTES=1 tries the other routes (minutes each)")
@pytest.mark.parametrize("route", OTHER_ROUTES)
def test_sd15_unet_route_cpu_fp32(benchmark, pipes, unets, reference_output, route):
    """One other route, alternated with fastdiff's eager UNet (then freed: one extra copy at a time)."""
    import gc

    benchmark.group = f"SD 1.5 UNet call cpu fp32 {route} vs fastdiff eager, alternated"
    call, error, prep = checked_route(route, pipes, reference_output)
    times = alternate(benchmark, {"fastdiff": on_inputs(unets["calls"]["fastdiff"]), route: on_inputs(call)},
                      rounds=3 if not TINY else 2)
    median = {name: statistics.median(v) for name, v in times.items()}
    total = unets["flops"]["total"]
    row = (f"| {route} | {median[route]:.3f} s | fastdiff eager {median['fastdiff']:.3f} s | "
           f"{median['fastdiff'] / median[route]:.2f}x | {total / median[route] / 1e9:.0f} GFLOP/s | "
           f"{error:.1e} | {prep:.0f} s |")
    benchmark.extra_info.update(route=route, error=error, bound=reference_output[1], prepare_s=prep, row=row,
                                tiny=TINY)
    header = "| route | median | beside | vs fastdiff eager | rate | max abs error | prepare |"
    print(f"\n{benchmark.group}\n{header}\n{row}")
    del call
    if route == "inductor":
        torch._dynamo.reset()
    gc.collect()


def torch_profile(call, x, t, context) -> dict:
    """{class: seconds} of one call from torch.profiler's self CPU times per operator."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        call(x, t, context)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call(x, t, context)
    out = collections.Counter()
    for event in prof.key_averages():
        out[_torch_class(event.key)] += event.self_cpu_time_total / 1e6
    return dict(out)


def ort_profile(onnx_file: str, x, t, context, folder: str) -> dict:
    """{class: seconds} of one call from ONNX Runtime's profiler (its node events by op type)."""
    from fastdiff.loaders.onnx_folder import session_options

    options = session_options()  # the pipeline's own settings, profiling on
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(folder, "ort_profile")
    session = ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    kinds = {i.name: i.type for i in session.get_inputs()}
    feeds = {}
    for name, value in zip(names, (x, t, context)):
        value = value.numpy()
        feeds[name] = value.astype("int64") if kinds[name] == "tensor(int64)" else value.astype("float32")
    session.run(None, feeds)  # the first run also allocates: the second is the one read
    session.run(None, feeds)
    events = json.load(open(session.end_profiling()))
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]
    out = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not last["ts"] <= e["ts"] <= last["ts"] + last["dur"]:
            continue
        op = e.get("args", {}).get("op_name", "")
        cls = next((c for c, ops in ORT_OPS.items() if any(o in op for o in ops)), "other")
        out[cls] += e["dur"] / 1e6
    return dict(out)


def test_sd15_unet_profile_cpu_fp32(benchmark, pipes, unets, tmp_path):
    """Where one UNet call's time goes, per FLOP class, for diffusers, fastdiff and ONNX Runtime."""
    x, t, context = unet_inputs()
    benchmark.group = "SD 1.5 UNet call profile cpu fp32"
    onnx_file = pipes["onnx"].unet.file
    profiles = {}

    def run_all():
        profiles["diffusers"] = torch_profile(unets["calls"]["diffusers"], x, t, context)
        profiles["fastdiff"] = torch_profile(unets["calls"]["fastdiff"], x, t, context)
        profiles["onnxruntime"] = ort_profile(onnx_file, x, t, context, str(tmp_path))

    if getattr(benchmark, "disabled", False):
        run_all()
    else:
        benchmark.pedantic(run_all, rounds=1, iterations=1)
    ceiling = gemm_ceiling(256 if TINY else 2048)
    flops = unets["flops"]
    rows = []
    for cls in (CONV, GEMM, ATTENTION, "other"):
        row = [cls, f"{flops.get(cls, 0.0) / 1e9:.1f}"]
        for route, prof in profiles.items():
            total = sum(prof.values())
            s = prof.get(cls, 0.0)
            work = flops.get(cls, 0.0)
            if route == "onnxruntime" and cls in (GEMM, ATTENTION):  # its graph writes attention as MatMuls
                work = flops.get(GEMM, 0.0) + flops.get(ATTENTION, 0.0) if cls == GEMM else 0.0
            rate = work / s if s and work and cls != "other" else None
            row.append(f"{s * 1e3:.0f} ms ({s / total:.0%})" + (f", {rate / ceiling:.0%} of ceiling" if rate else ""))
        rows.append(row)
    rows.append(["all", f"{flops['total'] / 1e9:.1f}"] + [f"{sum(p.values()) * 1e3:.0f} ms" for p in profiles.values()])
    table = _table(rows, ["class", "GFLOP"] + list(profiles))
    benchmark.extra_info.update(profiles=profiles, flops=flops, gemm_ceiling_gflops=ceiling / 1e9, table=table,
                                tiny=TINY)
    print(f"\n{benchmark.group} (self time per class; rates against the {ceiling / 1e9:.0f} GFLOP/s large-GEMM "
          f"ceiling)\n{table}")


def start_latents():
    return torch.randn(1, 4, SAMPLE_SIZE, SAMPLE_SIZE, generator=torch.Generator().manual_seed(0))


def run(impl, pipes, start):
    if impl == "diffusers":
        return pipes["ref"](PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                            height=IMAGE_SIZE, width=IMAGE_SIZE, latents=start, output_type="pt").images
    pipe = pipes["ours"] if impl == "fastdiff" else pipes["onnx"]
    return pipe.generate(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                         sampler="dpmpp_2m", height=IMAGE_SIZE, width=IMAGE_SIZE, latents=start, output_type="pt",
                         progress=False)


def test_sd15_generation_cpu_fp32(benchmark, pipes):
    start = start_latents()
    images = {impl: run(impl, pipes, start) for impl in ("diffusers", "fastdiff", "onnxruntime")}
    errors = dict(fastdiff=(images["fastdiff"] - images["diffusers"]).abs().max().item(),
                  onnxruntime=(images["onnxruntime"] - images["fastdiff"]).abs().max().item())
    for name, err in errors.items():
        assert err <= IMAGE_ATOL, f"{name} images are {err} off (bound {IMAGE_ATOL})"
    benchmark.group = f"SD 1.5 generation cpu fp32 {IMAGE_SIZE}px {STEPS} steps dpmpp_2m cfg {SCALE}, alternated"
    times = alternate(benchmark, {impl: (lambda impl=impl: run(impl, pipes, start))
                                  for impl in ("diffusers", "fastdiff", "onnxruntime")}, rounds=3, warmup_rounds=0)
    median = {impl: statistics.median(v) for impl, v in times.items()}
    rows = [(impl, f"{median[impl]:.2f} s", f"{median['diffusers'] / median[impl]:.2f}x",
             f"{errors.get(impl, 0.0):.1e}") for impl in median]
    table = _table(rows, ("pipeline", "median", "vs diffusers", "max abs image error"))
    benchmark.extra_info.update(errors=errors, bound=IMAGE_ATOL, table=table, export_s=pipes["export_s"],
                                cached_load_s=pipes["cached_load_s"], tiny=TINY)
    print(f"\n{benchmark.group} (onnxruntime: exported in {pipes['export_s']:.0f} s once, then loaded from the "
          f"cache in {pipes['cached_load_s']:.1f} s)\n{table}")
