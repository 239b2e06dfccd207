"""Ahead-of-time resource check of fastdiff's Triton kernels for a GPU, without a GPU.

What a kernel launch needs from the GPU — shared memory per block, registers per thread,
and whether the compiler had to spill registers to local memory — is fixed when Triton
compiles it, so it can be known on a machine without a GPU:

1. **Record** every launch fastdiff would make for the three model families: the real
   models (SD 1.5 and 2.x UNets and VAE at 512 and 768 px, GLIDE's 64 px base with its
   text transformer and its 256 px upsampler, VQ-Diffusion ITHQ's transformer and VQ-VAE),
   built on the meta device, run forward with ``fastdiff.ops.attention``/``group_norm``
   replaced by recorders that call the Triton wrappers on the meta tensors the model
   hands them (``_launch.recording``: the wrapper says what it would launch and computes
   nothing); every sampler run on meta samples for ``guided_step``; the VQ-Diffusion step
   for ``discrete_step``; and attention at the other head dims it accepts (16-256). Batches
   1 and 4 with classifier-free guidance, fp16, bf16 and fp32. For attention, every
   configuration ``tune()`` may try is recorded as well.
2. **Compile** each distinct launch for the target (sm_90 by default) with Triton, through
   a stand-in driver that names the target instead of asking a GPU.
3. **Read** the shared memory from Triton's metadata and the registers and the stack
   (spill) bytes per thread from the cubin (``cuobjdump --dump-resource-usage``).

A launch fits when its shared memory is within the target's per-block limit; 16-bit
launches must also not spill (fp32 attention, which runs SDPA by default, may; its
spills are reported). ``python -m fastdiff.ops.triton.resources`` prints the table and
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

from ._launch import Launch, recording


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
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- recording

@dataclass
class Recorded:
    launch: Launch
    problem: str            # "SD 1.5 512 fp16 B1: attention Lq=4096 Lk=77 D=40"
    tuning: bool = False    # a tune() candidate rather than the heuristic's choice


def _meta(shape, dtype, strides=None) -> torch.Tensor:
    if strides is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


class _OpRecorder:
    """Stands in for fastdiff.ops.attention / group_norm while a model runs on meta tensors."""

    def __init__(self, label: str, tuning: bool):
        self.label, self.tuning = label, tuning
        self.records: List[Recorded] = []

    def _keep(self, launches: Sequence[Launch], what: str, tuning: bool = False) -> None:
        self.records += [Recorded(launch, f"{self.label}: {what}", tuning) for launch in launches]

    def attention(self, q, k, v, key_padding_mask=None, scale=None):
        from . import attention as kernel

        mask = None if key_padding_mask is None else (
            key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0)
        what = f"attention Lq={q.shape[2]} Lk={k.shape[2]} D={q.shape[3]}{' masked' if mask is not None else ''}"
        if kernel.check_supported(q, k, v) is not None:  # ops.attention runs SDPA for these
            from ..attention import _sdpa
            return _sdpa(q, k, v, mask, scale)
        with recording() as launches:
            out = kernel.attention_triton(q, k, v, mask, scale)
        self._keep(launches, what)
        if self.tuning:
            d0, d1 = kernel.split_head_dim(q.shape[3])
            for config in kernel.tune_candidates(q.shape[2], k.shape[2], d0, d1, q.dtype, q.shape[3]):
                with recording() as launches:
                    kernel.attention_triton(q, k, v, mask, scale, config=config)
                self._keep(launches, f"{what} tune {config}", tuning=True)
        return out

    def group_norm(self, x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None, silu=False):
        from .group_norm import group_norm_triton

        with recording() as launches:
            out = group_norm_triton(x, num_groups, weight, bias, eps, scale, shift, silu)
        layout = "NHWC" if not x.is_contiguous() else "NCHW"
        self._keep(launches, f"group_norm {list(x.shape)} G={num_groups} {layout}"
                             f"{' scale-shift' if scale is not None else ''}{' silu' if silu else ''}")
        return out


@contextlib.contextmanager
def _recording_ops(recorder: _OpRecorder) -> Iterator[None]:
    from ... import ops

    saved = ops.attention, ops.group_norm
    ops.attention, ops.group_norm = recorder.attention, recorder.group_norm
    try:
        with torch.device("meta"), torch.no_grad():
            yield
    finally:
        ops.attention, ops.group_norm = saved


SD15_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# microsoft/vq-diffusion-ithq: the transformer's config, and a taming VQGAN f8 layout for the
# VQ-VAE (4096 codes, 32 x 32 tokens for 256 px images).
ITHQ_TRANSFORMER = dict(num_attention_heads=16, attention_head_dim=88, num_layers=24, cross_attention_dim=512,
                        sample_size=32, num_vector_embeds=4097, num_embeds_ada_norm=100, norm_num_groups=32,
                        activation_fn="geglu-approximate", attention_bias=True)
ITHQ_VQVAE = dict(in_channels=3, out_channels=3, latent_channels=256, block_out_channels=(128, 128, 256, 512),
                  layers_per_block=2, norm_num_groups=32, num_vq_embeddings=4096, vq_embed_dim=128,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _sd_models(label, unet_config, size, dtype, batches, recorder):
    from ...models import AutoencoderKL, UNet2DConditionModel

    latent = size // 8
    with _recording_ops(recorder):
        unet = UNet2DConditionModel(dict(unet_config, sample_size=latent)).to(dtype)
        vae = AutoencoderKL(dict(SD_VAE, sample_size=size)).to(dtype)
        for batch in batches:
            recorder.label = f"{label} B{batch}"
            context = _meta((2 * batch, 77, unet_config["cross_attention_dim"]), dtype)
            for layout in (torch.contiguous_format, torch.channels_last):
                unet.to(memory_format=layout)
                x = _meta((2 * batch, 4, latent, latent), dtype).contiguous(memory_format=layout)
                unet(x, torch.tensor(500), encoder_hidden_states=context)
            vae.decode(_meta((batch, 4, latent, latent), dtype))


def _glide_models(label, dtype, batches, recorder):
    from ...models.adm_unet import Text2ImUNet, glide_options

    with _recording_ops(recorder):
        base = Text2ImUNet(glide_options(), n_vocab=50257).to(dtype)
        up = Text2ImUNet(glide_options(upsampler=True), n_vocab=50257).to(dtype)
        for batch in batches:
            recorder.label = f"{label} 64 B{batch}"
            tokens = torch.zeros(2 * batch, base.text_ctx, dtype=torch.long)
            mask = torch.ones(2 * batch, base.text_ctx, dtype=torch.bool)
            text = base.encode_text(tokens, mask)
            base(_meta((2 * batch, 3, 64, 64), dtype), torch.zeros(2 * batch, dtype=torch.long), text)
            recorder.label = f"{label} 256 B{batch}"
            text = up.encode_text(tokens[:batch], mask[:batch])
            up(_meta((batch, 3, 256, 256), dtype), torch.zeros(batch, dtype=torch.long), text,
               low_res=_meta((batch, 3, 64, 64), dtype))


def _vq_models(label, dtype, batches, recorder):
    from ...models.discrete_transformer import VQDiffusionTransformer
    from ...models.vqvae import VQModel

    with _recording_ops(recorder):
        transformer = VQDiffusionTransformer(ITHQ_TRANSFORMER).to(dtype)
        vqvae = VQModel(dict(ITHQ_VQVAE, sample_size=256)).to(dtype)
        for batch in batches:
            recorder.label = f"{label} B{batch}"
            transformer(torch.zeros(2 * batch, 1024, dtype=torch.long), _meta((2 * batch, 77, 512), dtype),
                        torch.tensor([50]))
            # decode_tokens checks token values, which meta tensors lack: decode the looked-up codes
            vqvae.decoder(vqvae.post_quant_conv(_meta((batch, ITHQ_VQVAE["vq_embed_dim"], 32, 32), dtype)))


def _sampler_steps(label, shape, dtype, recorder, *, glide: bool):
    """guided_step launches of every sampler (SD-style configs), or GLIDE's respaced plans."""
    from ...guidance.cfg import ModelOutput
    from ...sampling import SAMPLERS, SchedulerConfig, run_plan, sample
    from ...sampling import samplers as samplers_module
    from .guided_step import guided_step_triton

    def record_step(x, cond, uncond=None, guidance_scale=None, *, coeffs, noise=None, history=(), clip_range=None,
                    learned_variance=False, write_denoised=False):
        with recording() as launches:
            out = guided_step_triton(x, cond, uncond, guidance_scale, coeffs, noise, list(history), clip_range,
                                     learned_variance, write_denoised)
        what = (f"guided_step {list(x.shape)} history={len(history)} noise={noise is not None} "
                f"cfg={uncond is not None} learned={learned_variance} clip={clip_range is not None} "
                f"x0={write_denoised}")
        recorder.records += [Recorded(launch, f"{label}: {what}") for launch in launches]
        return out

    channels = shape[1]
    out_channels = 2 * channels if glide else channels

    def denoiser(x, t):
        n = x.shape[0]
        return ModelOutput(_meta((n, out_channels) + tuple(x.shape[2:]), x.dtype),
                           _meta((n, out_channels) + tuple(x.shape[2:]), x.dtype), _meta((n,), torch.float32))

    saved = samplers_module.guided_step
    samplers_module.guided_step = record_step
    try:
        x = _meta(shape, dtype)
        if glide:
            from ...sampling.respaced import RespacedSchedule, respaced_ddim_plan, respaced_ddpm_plan

            schedule = RespacedSchedule.named("squaredcos_cap_v2", 1000, "4")
            for plan in (respaced_ddpm_plan(schedule, learned_variance=True, clip_denoised=True),
                         respaced_ddim_plan(schedule, 0.0, True)):
                run_plan(denoiser, x, plan, progress=False)
            return
        config = SchedulerConfig.from_dict(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", prediction_type="epsilon"))
        for name in SAMPLERS:
            sample(name, denoiser, x, config, 4, progress=False)
    finally:
        samplers_module.guided_step = saved


def _vq_steps(label, batches, recorder):
    """discrete_step as sample_discrete calls it: each step with noise, and the noiseless x0
    call of a callback; guided or not, truncated or not (ITHQ: 4096 codes + the mask class)."""
    from ..reference import DS_NUM_COEFFS
    from .discrete_step import discrete_step_triton

    classes, tokens = 4096, 1024
    for batch in batches:
        for guided in (True, False):
            for truncation in (0.86, 1.0):
                for noised in (True, False):
                    with recording() as launches:
                        discrete_step_triton(
                            _meta((batch, tokens), torch.int64), _meta((batch, classes, tokens), torch.float32),
                            _meta((batch, classes, tokens), torch.float32) if guided else None,
                            _meta((1,), torch.float32) if guided else None,
                            _meta((1, DS_NUM_COEFFS), torch.float32),
                            _meta((batch, classes + 1, tokens), torch.float32) if noised else None,
                            truncation, False)
                    recorder.records += [Recorded(launch, f"{label} B{batch}: discrete_step K={classes + 1} "
                                                          f"N={tokens} cfg={guided} truncation={truncation} "
                                                          f"noise={noised}") for launch in launches]


def _generic_attention(label, dtype, recorder):
    """Head dims no family uses but ops.attention accepts (up to 256), self and cross, masked
    or not: a user's own model must not meet a launch that cannot run either."""
    tuning, recorder.tuning = recorder.tuning, False  # the heuristic's configs only
    for d in (16, 32, 48, 96, 128, 192, 256):
        for lq, lk, masked in ((4096, 77, False), (4096, 77, True), (1024, 1024, False), (77, 77, False)):
            recorder.label = label
            q = _meta((2, lq, 8, d), dtype).transpose(1, 2)
            k = _meta((2, lk, 8, d), dtype).transpose(1, 2)
            recorder.attention(q, k, k, _meta((2, lk), torch.bool) if masked else None)
    recorder.tuning = tuning


def family_launches(dtypes: Sequence[torch.dtype] = tuple(DTYPES.values()), batches: Sequence[int] = (1, 4),
                    tuning: bool = True, families: Sequence[str] = ("sd", "glide", "vq", "generic")) -> List[Recorded]:
    """Every Triton launch fastdiff makes for the three families (see the module docstring)."""
    records: List[Recorded] = []
    for dtype in dtypes:
        tag = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        recorder = _OpRecorder("", tuning)
        if "sd" in families:
            for size in (512, 768):
                _sd_models(f"SD 1.5 {size} {tag}", SD15_UNET, size, dtype, batches, recorder)
                _sd_models(f"SD 2.x {size} {tag}", dict(SD2_UNET, upcast_attention=size == 768), size, dtype,
                           batches, recorder)
                for batch in batches:
                    _sampler_steps(f"SD {size} {tag} B{batch}", (batch, 4, size // 8, size // 8), dtype, recorder,
                                   glide=False)
        if "glide" in families:
            _glide_models(f"GLIDE {tag}", dtype, batches, recorder)
            for batch in batches:
                _sampler_steps(f"GLIDE 64 {tag} B{batch}", (batch, 3, 64, 64), dtype, recorder, glide=True)
                _sampler_steps(f"GLIDE 256 {tag} B{batch}", (batch, 3, 256, 256), dtype, recorder, glide=True)
        if "vq" in families:
            _vq_models(f"VQ-Diffusion ITHQ {tag}", dtype, batches, recorder)
        if "generic" in families:
            _generic_attention(f"other head dims {tag}", dtype, recorder)
        records += recorder.records
    if "vq" in families:  # discrete_step works in float32 log space whatever the model's dtype
        recorder = _OpRecorder("", tuning)
        _vq_steps("VQ-Diffusion ITHQ", batches, recorder)
        records += recorder.records
    return records


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
                                "python -m fastdiff.ops.triton.resources --cache THIS_FILE --update-cache",
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
        prog="python -m fastdiff.ops.triton.resources",
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
