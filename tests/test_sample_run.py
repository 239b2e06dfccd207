"""Batch generation for evaluation (fastdiff.eval.batch, `fastdiff sample`): per-image seeds,
torchrun distribution, atomic writes and resumption, prompt sources, refused runs.

Byte equality across world sizes holds for the same threads per process: torchrun gives each
worker OMP_NUM_THREADS=1, so the one-process runs here are given the same (a batch's float sums
can depend on the kernels' thread count; see fastdiff/eval/batch.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff.eval.batch import (KILL_AFTER_ENV, MANIFEST, RUN_FILE, Ranks, RunMismatch, image_seed,
                                 sample_images)
from fastdiff.eval.prompts import PromptError, load_prompts, prompts_digest
from fastdiff.sampling.noise import rand, randn

sys.path.insert(0, os.path.dirname(__file__))
from glide_fixtures import tiny_options, write_checkpoint, write_glide_tokenizer  # noqa: E402
from vq_pipeline_fixtures import make_vq_components  # noqa: E402

N, BATCH, STEPS = 7, 3, 4
RUN = ["--prompts", "scenes:heldout", "--num-images", str(N), "--steps", str(STEPS), "--batch-size", str(BATCH),
       "--no-progress"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", KILL_AFTER_ENV):
        env.pop(name, None)
    env.update(extra)
    return env


def _sample(out, *args, torchrun=False, **env):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run(launcher + ["-m", "fastdiff", "sample", "--output", str(out), *RUN, *args],
                          env=_env(**env), capture_output=True, text=True, timeout=300)


def _images(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if name.endswith(".png")}


def _manifest(folder, drop=("rank",)):
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in fh]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    done = _sample(out)
    assert done.returncode == 0, done.stderr
    return out


def test_one_process_writes_every_image_and_a_manifest(reference_run):
    images = _images(reference_run)
    assert sorted(images) == [f"{i:06d}.png" for i in range(N)]
    lines = _manifest(reference_run)
    prompts = load_prompts("scenes:heldout", n=N)
    assert [line["index"] for line in lines] == list(range(N))
    for line, prompt in zip(lines, prompts):
        assert line["caption"] == prompt["caption"] and line["seed"] == image_seed(0, line["index"])
        assert (line["steps"], line["guidance"], line["sampler"], line["model"]) == (STEPS, 3.0, "dpmpp_2m",
                                                                                      "built-in")
    run = json.load(open(os.path.join(reference_run, RUN_FILE)))
    assert run["config"]["prompts_sha256"] == prompts_digest(prompts) and len(run["hash"]) == 16


def test_torchrun_two_processes_give_the_same_bytes(reference_run, tmp_path):
    out = tmp_path / "two"
    done = _sample(out, torchrun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _images(out) == _images(reference_run)
    assert _manifest(out) == _manifest(reference_run)
    ranks = {json.loads(line)["rank"] for line in open(out / MANIFEST)}
    assert ranks == {0, 1}  # both processes made images: chunks 0, 2 on rank 0; 1 on rank 1
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["rank"] == 0


@pytest.mark.parametrize("torchrun", [False, True], ids=["one-process", "torchrun"])
def test_killed_run_resumes_to_the_same_images(reference_run, tmp_path, torchrun):
    out = tmp_path / "killed"
    killed = _sample(out, torchrun=torchrun, **{KILL_AFTER_ENV: "2"})
    assert killed.returncode != 0
    names = os.listdir(out)
    made = [n for n in names if n.endswith(".png")]
    assert 2 <= len(made) < N and any(n.endswith(".tmp") for n in names)  # killed before a rename
    if not torchrun:
        assert killed.returncode == -signal.SIGKILL and len(made) == 2
    resumed = _sample(out, torchrun=torchrun)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert _images(out) == _images(reference_run)  # none lost, none duplicated, same bytes
    assert _manifest(out) == _manifest(reference_run)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(made)


def test_a_finished_run_restarts_with_nothing_to_do(reference_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(reference_run, out)
    before = _images(out)
    again = _sample(out)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["generated"] == 0 and _images(out) == before


def test_other_settings_or_foreign_images_are_refused(reference_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference_run, out)
    before = _images(out)
    refused = _sample(out, "--guidance", "5")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "different run" in refused.stderr
    assert "guidance_scale: 3.0 there, 5.0 now" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert _images(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000000.png").write_bytes(b"not ours")
    refused = _sample(foreign)
    assert refused.returncode == 2 and "no run.json" in refused.stderr
    assert (foreign / "000000.png").read_bytes() == b"not ours"


def test_per_image_generators_make_image_i_independent_of_its_batch():
    pipe = fastdiff.Pipeline()
    captions = [p["caption"] for p in load_prompts("scenes:heldout", n=3)]
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    kw = dict(num_inference_steps=4, output_type="pt", progress=False, sampler="euler_a")  # noise at every step
    batch = pipe.generate(captions, generator=gens([5, 6, 7]), **kw)
    alone = pipe.generate(captions[1:2], generator=gens([6]), **kw)
    # The same noise; only the batch's float sums differ (a few float32 ulps of values ~1, through 4 steps).
    assert torch.allclose(batch[1], alone[0], atol=1e-4)
    assert (batch[0] - alone[0]).abs().max() > 0.05  # a different image's noise is not that
    seeded = pipe.generate(captions[1:2], seed=6, **kw)
    assert torch.equal(seeded, alone)  # a list of one generator is that generator's seed


def test_per_image_generators_for_vq_and_glide(tmp_path):
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    vq = fastdiff.Pipeline.from_pretrained(make_vq_components(tmp_path / "vq", learned=True))
    kw = dict(num_inference_steps=3, output_type="pt", progress=False)
    batch = vq.generate(["a cat", "a dog", "a bird"], generator=gens([1, 2, 3]), **kw)
    alone = vq.generate(["a dog"], generator=gens([2]), **kw)
    assert torch.allclose(batch[1], alone[0], atol=1e-4)
    n_vocab = write_glide_tokenizer(str(tmp_path / "tok"))
    write_checkpoint(str(tmp_path / "base.pt"), tiny_options(), n_vocab)
    glide = fastdiff.Pipeline.from_glide(str(tmp_path / "base.pt"), tokenizer=str(tmp_path / "tok"),
                                         options=tiny_options())
    kw = dict(num_inference_steps="4", output_type="pt", progress=False, guidance_scale=3.0, sampler="ddpm")
    batch = glide.generate(["a cat", "a dog"], generator=gens([1, 2]), **kw)
    alone = glide.generate(["a dog"], generator=gens([2]), **kw)
    assert torch.allclose(batch[1], alone[0], atol=1e-4)
    with pytest.raises(ValueError, match="one per image: 2 images, got 1"):
        glide.generate(["a cat", "a dog"], generator=gens([1]), **kw)


def test_per_sample_draws_take_row_i_from_generator_i():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    z = randn((2, 5, 4), generator=gens)
    assert torch.equal(z[1], torch.randn((1, 5, 4), generator=torch.Generator().manual_seed(4))[0])
    u = rand((2, 3), generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    assert torch.equal(u[0], torch.rand((1, 3), generator=torch.Generator().manual_seed(3))[0])
    with pytest.raises(ValueError, match="one generator per sample"):
        randn((3, 2), generator=gens)


def test_image_seeds_are_distinct_and_stable():
    seeds = {image_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and max(seeds) < 2 ** 63
    assert image_seed(0, 1) != image_seed(1, 0) and image_seed(7, 7) == image_seed(7, 7)


def _coco(path, annotations, images=None):
    images = images if images is not None else [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in
                                                sorted({a["image_id"] for a in annotations})]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(path)


def test_coco_protocol_draws_one_caption_per_image_with_the_seed(tmp_path):
    anns = [{"id": 10 * im + k, "image_id": im, "caption": f"image {im} caption {k}"} for im in (3, 1, 2, 9)
            for k in range(5)]
    path = _coco(tmp_path / "captions_val2014.json", anns)
    prompts = load_prompts(path, n=3, seed=1)
    assert prompts == load_prompts(path, n=3, seed=1) and prompts != load_prompts(path, n=3, seed=2)
    assert len({p["image_id"] for p in prompts}) == 3
    for p in prompts:
        assert p["caption"].startswith(f"image {p['image_id']} caption") and p["caption_id"] // 10 == p["image_id"]
        assert p["file_name"] == f"COCO_val2014_{p['image_id']:012d}.jpg"
    with pytest.raises(PromptError, match="5 images asked for, but only 4 images have captions"):
        load_prompts(path, n=5)


@pytest.mark.parametrize("content,match", [
    ({"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]}, "no 'image_id' and"),
    ({"images": [], "annotations": []}, "holds no captions"),
    ({"annotations": []}, "not an MS-COCO captions file"),
])
def test_coco_files_without_captions_are_refused(tmp_path, content, match):
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(content))
    with pytest.raises(PromptError, match=match):
        load_prompts(str(path))


def test_text_and_jsonl_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  a blue square  \n")
    assert load_prompts(str(text)) == [{"index": 0, "caption": "a red circle"},
                                       {"index": 1, "caption": "a blue square"}]
    with pytest.raises(PromptError, match="3 images asked for, but the file holds 2"):
        load_prompts(str(text), n=3)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"index": 1, "caption": "b", "image_id": 4}\n{"index": 0, "caption": "a"}\n')
    assert load_prompts(str(jsonl))[1] == {"index": 1, "caption": "b", "image_id": 4}
    for body, match in (('{"index": 0, "caption": "a"}\n{"index": 0, "caption": "b"}\n', "appears twice"),
                        ('{"index": 0}\n', "'caption' must be"), ('{"index": 2, "caption": "a"}\n', "without gaps"),
                        ("not json\n", "not JSON")):
        jsonl.write_text(body)
        with pytest.raises(PromptError, match=match):
            load_prompts(str(jsonl))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(PromptError, match="scene sources"):
        load_prompts("scenes:test", n=3)


@pytest.mark.parametrize("env,match", [({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= RANK < WORLD_SIZE"),
                                       ({"RANK": "x"}, "not an integer")])
def test_bad_launch_variables_are_refused(env, match):
    with pytest.raises(ValueError, match=match):
        Ranks.from_env(env)
    assert Ranks.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(1, 4, 1)


def test_bad_api_arguments_are_refused_before_any_work(tmp_path):
    pipe = fastdiff.Pipeline()
    prompts = load_prompts("scenes:heldout", n=2)
    for kwargs, match in ((dict(batch_size=0), "batch_size"), (dict(seed=-1), "seed"),
                          (dict(guidance_scale=3.0, eta=1.0), "unexpected"),):
        with pytest.raises((ValueError, TypeError), match=match):
            sample_images(pipe, prompts, str(tmp_path / "x"), **kwargs)
    with pytest.raises(ValueError, match="index 0"):
        sample_images(pipe, [{"caption": "a"}], str(tmp_path / "x"))
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        sample_images(pipe, prompts, str(tmp_path / "file"))
    assert not (tmp_path / "x").exists()
    assert issubclass(RunMismatch, ValueError)


def test_vq_and_glide_runs_through_the_api(tmp_path):
    vq = fastdiff.Pipeline.from_pretrained(make_vq_components(tmp_path / "vq", learned=True))
    prompts = [{"index": i, "caption": c} for i, c in enumerate(["a cat", "a dog", "a bird"])]
    summary = sample_images(vq, prompts, str(tmp_path / "vq-run"), model="vq", num_inference_steps=2, batch_size=2,
                            progress=False)
    assert summary["generated"] == 3 and len(_manifest(tmp_path / "vq-run")) == 3
    n_vocab = write_glide_tokenizer(str(tmp_path / "tok"))
    write_checkpoint(str(tmp_path / "base.pt"), tiny_options(), n_vocab)
    glide = fastdiff.Pipeline.from_glide(str(tmp_path / "base.pt"), tokenizer=str(tmp_path / "tok"),
                                         options=tiny_options())
    summary = sample_images(glide, prompts, str(tmp_path / "glide-run"), model="glide", num_inference_steps="3",
                            batch_size=3, progress=False)
    assert summary["generated"] == 3
    config = json.load(open(tmp_path / "glide-run" / RUN_FILE))["config"]
    assert config["steps"] == "3" and config["pipeline"] == "GlidePipeline"
    with pytest.raises(ValueError, match="sampler must be None"):  # the pipeline's own check, before any work
        sample_images(vq, prompts, str(tmp_path / "vq-2"), sampler="ddim", progress=False)
    assert not (tmp_path / "vq-2").exists()
