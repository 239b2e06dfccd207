"""Batch generation for evaluation: N images with per-image seeds, on one process or many, resumable.

    from fastdiff.eval.batch import sample_images
    summary = sample_images(pipe, load_prompts("captions_val2014.json", n=10000), "out/", seed=0,
                            num_inference_steps=50, guidance_scale=7.5, batch_size=8)

What a run guarantees:
- Image i's noise (initial and at every stochastic step) comes from its own generator, seeded with
  `image_seed(seed, i)` (fastdiff.sampling.noise's per-sample generators), and image i is always made
  in the same batch: chunk k holds indices [k * batch_size, (k + 1) * batch_size). Which process
  makes a chunk, or whether the run was interrupted before it, changes nothing, so one process and
  `torchrun --nproc_per_node=W` give the same bytes. (A batch's floating-point sums can depend on the
  batch's size and the kernels' thread count, hence the fixed chunks; run the processes with the same
  number of threads each to compare bytes.)
- Distributed through torch.distributed as torchrun (and `accelerate launch`, SLURM's srun with the
  same variables) sets it up: RANK, WORLD_SIZE and LOCAL_RANK. Rank r takes every W-th chunk still
  missing; rank 0's bar shows the whole run (it counts the folder); all ranks meet at a final
  barrier. One process needs no process group.
- Resumable: each image is written to a temporary file, fsynced and renamed to `{index:06d}.png`, then
  its line appended to the rank's manifest (`manifest.rank{r}.jsonl`). A restart lists the images
  there, skips their chunks (a chunk with any image missing is made again, whole, and only the missing
  images written), and removes temporary files a killed run left. The run's settings live in
  `run.json` with a hash; a restart with other settings, or a folder of images without a run.json,
  is refused before any work. At the end rank 0 writes `manifest.jsonl`: one line per image, in
  index order.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from typing import Callable, Dict, List, Optional, Sequence

from .distributed import ProcessGroup, Ranks, chunks

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"
KILL_AFTER_ENV = "FASTDIFF_SAMPLE_KILL_AFTER"  # test hook: SIGKILL this process after it wrote k images
_IMAGE = re.compile(r"^(\d{6,})\.png$")
_RANK_MANIFEST = re.compile(r"^manifest\.rank(\d+)\.jsonl$")
_TEMP = re.compile(r"^\..+\.tmp$")


class RunMismatch(ValueError):
    """The output folder holds a different run's images."""


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def image_seed(seed: int, index: int) -> int:
    """Image `index`'s generator seed: a hash of (seed, index), so that neighbouring runs and images
    draw unrelated noise (seed + index would make run 1's image 0 run 0's image 1)."""
    digest = hashlib.sha256(f"fastdiff-image-seed:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63: any torch.Generator accepts it


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, before_rename: Optional[Callable[[], None]] = None) -> None:
    """`data` into `path` through a temporary file in the same folder: written, fsynced, renamed."""
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(temp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(temp, path)
    _fsync_dir(folder or ".")


def _append_line(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def config_hash(config: dict) -> str:
    text = json.dumps(config, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def existing_images(folder: str) -> Dict[int, str]:
    """index -> file name of the finished images in `folder`."""
    found = {}
    for name in os.listdir(folder):
        match = _IMAGE.match(name)
        if match:
            found[int(match.group(1))] = name
    return found


def _check_folder(folder: str, config: dict, digest: str) -> bool:
    """Raises unless `folder` is empty of images or holds this run; True when run.json must be written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"output {folder} is a file, not a folder")
    if not os.path.isdir(folder):
        return True
    run_path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(run_path):
        images = existing_images(folder)
        if images:
            raise RunMismatch(f"{folder} holds {len(images)} images but no {RUN_FILE}: not a fastdiff sample run; "
                              f"choose an empty folder")
        return True
    try:
        with open(run_path, encoding="utf-8") as fh:
            previous = json.load(fh)
        old_config, old_hash = previous["config"], previous["hash"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunMismatch(f"{run_path} is unreadable ({exc}); delete the folder or choose another") from None
    if old_hash != digest:
        changed = sorted(k for k in set(config) | set(old_config) if config.get(k) != old_config.get(k))
        details = "; ".join(f"{k}: {old_config.get(k)!r} there, {config.get(k)!r} now" for k in changed[:4])
        raise RunMismatch(f"{folder} holds a different run (config hash {old_hash}, this one {digest}): {details}. "
                          f"Continue it with its own settings, or choose another folder")
    return False


def _prepare_folder(folder: str, config: dict, digest: str, write_config: bool) -> None:
    """Rank 0: the folder, its run.json, and no temporary files left by a killed run."""
    os.makedirs(folder, exist_ok=True)
    if write_config:
        body = json.dumps({"hash": digest, "config": config}, indent=2, sort_keys=True, ensure_ascii=False)
        write_atomic(os.path.join(folder, RUN_FILE), (body + "\n").encode("utf-8"))
    for name in os.listdir(folder):
        if _TEMP.match(name):
            os.remove(os.path.join(folder, name))


def _read_manifests(folder: str) -> Dict[int, dict]:
    lines: Dict[int, dict] = {}
    for name in sorted(os.listdir(folder)):
        if not _RANK_MANIFEST.match(name):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a killed process: rebuilt below
                    continue
                lines[int(record["index"])] = record
    return lines


def _generate_options(pipe, given: dict, per_chunk: Optional[dict] = None) -> dict:
    """generate()'s keywords: the settings the caller gave (None ones are the pipeline's defaults,
    which run_config records resolved), checked with a first chunk's own keywords `per_chunk`."""
    import inspect

    names = inspect.signature(pipe.generate).parameters
    options = {k: v for k, v in given.items() if v is not None}
    per_chunk = per_chunk or {}
    missing = sorted(k for k in {**options, **per_chunk} if k not in names)
    if missing:
        raise ValueError(f"{type(pipe).__name__}.generate takes no {', '.join(missing)}")
    if "progress" in names:
        options["progress"] = False
    if hasattr(pipe, "check_arguments") and hasattr(pipe, "_signature_defaults"):  # the pipeline's own checks, now
        pipe.check_arguments(dict(pipe._signature_defaults(), output_type="pil", **options, **per_chunk))
    return options


def _resolved(pipe, name: str, value):
    return value if value is not None else getattr(pipe, "defaults", {}).get(name)


def run_config(pipe, prompts: Sequence[dict], *, model: str, seed: int, num_inference_steps=None,
               guidance_scale=None, sampler=None, batch_size: int = 8, height=None, width=None,
               negative_prompt=None) -> dict:
    """Every setting that decides the images: what run.json records and hashes."""
    from .. import __version__
    from .prompts import prompts_digest

    return {"model": model, "pipeline": type(pipe).__name__, "dtype": str(getattr(pipe, "dtype", "")),
            "n": len(prompts), "prompts_sha256": prompts_digest(list(prompts)), "seed": int(seed),
            "steps": _resolved(pipe, "num_inference_steps", num_inference_steps),
            "guidance_scale": _resolved(pipe, "guidance_scale", guidance_scale),
            "sampler": _resolved(pipe, "sampler", sampler), "batch_size": int(batch_size),
            "height": _resolved(pipe, "height", height), "width": _resolved(pipe, "width", width),
            "negative_prompt": negative_prompt, "fastdiff": __version__}


def _manifest_line(config: dict, prompt: dict, rank: Optional[int]) -> dict:
    index = prompt["index"]
    extra = {k: v for k, v in prompt.items() if k not in ("index", "caption")}
    return dict(extra, index=index, file=image_name(index), caption=prompt["caption"],
                seed=image_seed(config["seed"], index), run_seed=config["seed"], model=config["model"],
                sampler=config["sampler"], steps=config["steps"], guidance=config["guidance_scale"], rank=rank)


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _kill_hook():
    """FASTDIFF_SAMPLE_KILL_AFTER=k: after k images, the next one's temporary file is written and the
    process is killed before renaming it (the worst moment), as a crash or a pre-empted job would."""
    text = os.environ.get(KILL_AFTER_ENV)
    if not text:
        return None
    left = [int(text)]

    def hook():
        if left[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
        left[0] -= 1
    return hook


def _check_prompts(prompts) -> List[dict]:
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate")
    for position, prompt in enumerate(prompts):
        if not isinstance(prompt, dict) or prompt.get("index") != position \
                or not isinstance(prompt.get("caption"), str):
            raise ValueError(f"prompts[{position}] must be a dict with index {position} and a caption string "
                             f"(fastdiff.eval.prompts.load_prompts makes them), got {prompt!r:.80}")
    return prompts


def sample_images(pipe, prompts: Sequence[dict], output: str, *, model: str = "", seed: int = 0,
                  num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                  sampler: Optional[str] = None, batch_size: int = 8, height: Optional[int] = None,
                  width: Optional[int] = None, negative_prompt: Optional[str] = None, progress: bool = True,
                  ranks: Optional[Ranks] = None, options_for: Optional[Callable[[List[str]], dict]] = None,
                  extra_config: Optional[dict] = None) -> dict:
    """Generate image i of `prompts` (load_prompts' dicts) into `output` for every i not there yet.

    None settings take the pipeline's defaults (recorded resolved in run.json). `model` names the
    model in run.json and the manifest. options_for(captions) -> more generate() keywords for a
    chunk (e.g. its CLIP guidance, which depends on the captions); extra_config: what they are,
    recorded in run.json and its hash (a run with other ones is refused on resume). Returns {"n", "generated" (by this process), "skipped",
    "seconds", "images_per_second", "rank", "world_size", "config_hash"}.
    """
    import torch

    prompts = _check_prompts(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    ranks = Ranks.from_env() if ranks is None else ranks
    config = run_config(pipe, prompts, model=model, seed=seed, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, sampler=sampler, batch_size=batch_size, height=height,
                        width=width, negative_prompt=negative_prompt)
    if extra_config:
        config.update(extra_config)
    options_for = options_for or (lambda captions: {})
    first = [prompts[i]["caption"] for i in chunks(len(prompts), batch_size)[0]]
    options = _generate_options(pipe, dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                           sampler=sampler, height=height, width=width,
                                           negative_prompt=negative_prompt), dict(options_for(first), prompt=first))
    digest = config_hash(config)
    write_config = _check_folder(output, config, digest)  # every rank: the same answer, before any work
    group = ProcessGroup(ranks, getattr(pipe, "device", "cpu"))
    try:
        if ranks.rank == 0:
            _prepare_folder(output, config, digest, write_config)
        group.barrier()
        done = existing_images(output)
        missing = [c for c in chunks(len(prompts), batch_size) if any(i not in done for i in c)]
        mine = missing[ranks.rank::ranks.world_size]
        manifest = os.path.join(output, f"manifest.rank{ranks.rank}.jsonl")
        bar = None
        if progress and ranks.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(prompts), initial=len(done), desc="sampling", unit="img")
        hook, generated, start = _kill_hook(), 0, time.perf_counter()
        for chunk in mine:
            captions = [prompts[i]["caption"] for i in chunk]
            generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in chunk]
            images = pipe.generate(captions, generator=generators, output_type="pil", **options,
                                   **options_for(captions))
            for i, image in zip(chunk, images):
                if i in done:
                    continue
                write_atomic(os.path.join(output, image_name(i)), _png_bytes(image), before_rename=hook)
                _append_line(manifest, _manifest_line(config, prompts[i], ranks.rank))
                generated += 1
            if bar is not None:
                bar.n = len(existing_images(output))
                bar.refresh()
        seconds = time.perf_counter() - start
        group.barrier()
        if ranks.rank == 0:
            _finish(output, config, prompts)
            if bar is not None:
                bar.n = len(prompts)
                bar.close()
    finally:
        group.close()
    return {"n": len(prompts), "generated": generated, "skipped": len(done), "seconds": round(seconds, 3),
            "images_per_second": round(generated / seconds, 4) if generated and seconds > 0 else None,
            "rank": ranks.rank, "world_size": ranks.world_size, "config_hash": digest}


def _finish(output: str, config: dict, prompts: Sequence[dict]) -> None:
    """Rank 0 after the barrier: every image there, and manifest.jsonl in index order."""
    done = existing_images(output)
    lost = [i for i in range(len(prompts)) if i not in done]
    if lost:
        raise RuntimeError(f"{len(lost)} images missing after the run (first {lost[:5]}); run the command again "
                           f"to make them")
    lines = _read_manifests(output)
    body = "".join(json.dumps(lines.get(i) or _manifest_line(config, prompts[i], None), ensure_ascii=False,
                              sort_keys=True) + "\n" for i in range(len(prompts)))
    write_atomic(os.path.join(output, MANIFEST), body.encode("utf-8"))


def read_run(folder: str) -> dict:
    """A finished run's run.json and manifest: {"hash", "config", "manifest": [line per image]}."""
    run_path, manifest_path = os.path.join(folder, RUN_FILE), os.path.join(folder, MANIFEST)
    for path in (run_path, manifest_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: not a finished `fastdiff sample` run")
    with open(run_path, encoding="utf-8") as fh:
        run = json.load(fh)
    with open(manifest_path, encoding="utf-8") as fh:
        run["manifest"] = [json.loads(line) for line in fh if line.strip()]
    return run
