"""VQ-Diffusion pipeline against diffusers' VQDiffusionPipeline on the same tiny random folder.

Per step, from the same token state: the transformer's log-probabilities and the
scheduler's posterior log-probabilities. Whole runs: the same generator gives the same
tokens after every step and the same images, with the learned null embedding and the
zero-shot one, with and without guidance and truncation, and with fewer steps than
training. Then bad input, and the CLI.
"""
import os
import shutil

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.pipelines import VQDiffusionPipeline
from fastdiff.ops import discrete_step
from fastdiff.sampling.discrete import discrete_step_rows
from deps import require

diffusers = require("diffusers")
from test_discrete_step import logp_tolerance  # noqa: E402
from tolerances import fp32_bound, guidance_gain, reduction_terms  # noqa: E402
from vq_pipeline_fixtures import load_diffusers_pipeline, make_vq_components  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module", params=["learned", "zero-shot"])
def folders(request, tmp_path_factory):
    folder = make_vq_components(tmp_path_factory.mktemp(request.param), learned=request.param == "learned")
    ours = fastdiff.Pipeline.from_pretrained(folder)
    theirs = load_diffusers_pipeline(folder)
    return folder, ours, theirs


def test_from_pretrained_picks_vq_diffusion(folders):
    folder, ours, theirs = folders
    assert isinstance(ours, VQDiffusionPipeline)
    learned = theirs.learned_classifier_free_sampling_embeddings
    if learned.learnable:
        assert torch.equal(ours.null_embeddings, learned.embeddings.detach())
    else:
        assert ours.null_embeddings is None


def test_prompt_embeddings_match(folders):
    _, ours, theirs = folders
    # the same CLIP text model, run on other batches (so other GEMM blockings), then normalised
    terms = reduction_terms(ours.text_encoder, lambda: ours.encode_prompt(PROMPTS, 1, guided=False))
    embeds, null = ours.encode_prompt(PROMPTS, 2, guided=True)
    ref = theirs._encode_prompt(PROMPTS, 2, True)
    torch.testing.assert_close(torch.cat([null, embeds]), ref, atol=fp32_bound(1.0, terms), rtol=0)
    embeds, null = ours.encode_prompt(PROMPTS, 1, guided=False)
    assert null is None
    torch.testing.assert_close(embeds, theirs._encode_prompt(PROMPTS, 1, False), atol=fp32_bound(1.0, terms), rtol=0)


@pytest.mark.parametrize("t", [0, 3, 9])
def test_one_step_log_probs_match(folders, t):
    """From one token state: transformer log p(x0 | x_t), then the guided, truncated posterior."""
    _, ours, theirs = folders
    K, N = ours.transformer.num_vector_embeds, ours.num_tokens
    gen = torch.Generator().manual_seed(t)
    x = torch.randint(0, K, (2, N), generator=gen)
    x[:, ::2] = K - 1
    embeds, null = ours.encode_prompt(PROMPTS, 1, guided=True)
    context = torch.cat([null, embeds])
    timestep = torch.tensor([t])
    with torch.no_grad():
        mine = ours.transformer(torch.cat([x, x]), encoder_hidden_states=context, timestep=timestep)
        ref = theirs.transformer(torch.cat([x, x]), encoder_hidden_states=context, timestep=timestep[0]).sample
    # the same transformer with other kernels and orders (tests/tolerances.py)
    terms = reduction_terms(ours.transformer, lambda: ours.transformer(torch.cat([x, x]), encoder_hidden_states=context,
                                                                         timestep=timestep))
    model_tol = fp32_bound(max(1.0, ref.abs().max().item()), terms)
    torch.testing.assert_close(mine, ref, atol=model_tol, rtol=0)

    scale, rate = 5.0, 0.9
    u, c = ref.chunk(2)
    out = u + scale * (c - u)
    out = out - torch.logsumexp(out, dim=1, keepdim=True)
    out = theirs.truncate(out, rate).clamp(-70)
    theirs.scheduler.set_timesteps(10)
    ref_post = out if t == 0 else theirs.scheduler.q_posterior(out, x, torch.tensor(t))
    rows = discrete_step_rows(ours.scheduler_config, [t])
    _, post = discrete_step(x, mine[2:], mine[:2], torch.tensor([scale]), coeffs=rows[0], truncation_rate=rate,
                            write_log_probs=True)
    finite = torch.isfinite(ref_post)
    if t == 0:
        post = post[:, :-1]  # x0 itself: the mask class is -inf
    assert torch.equal(torch.isfinite(post), finite)
    # the transformer's differences, through the log-space guidance, then the step's own
    tol = guidance_gain(scale) * model_tol + logp_tolerance(K)
    torch.testing.assert_close(post[finite], ref_post[finite], atol=tol, rtol=0)
    # and a real error is outside that bound: the same step with 1% less guidance
    _, off = discrete_step(x, mine[2:], mine[:2], torch.tensor([scale * 0.99]), coeffs=rows[0], truncation_rate=rate,
                           write_log_probs=True)
    off = off[:, :-1] if t == 0 else off
    both = finite & torch.isfinite(off)
    assert (off[both] - ref_post[both]).abs().max() > tol


def _run_both(ours, theirs, *, steps, scale, rate, per_prompt=1, seed=0):
    ref_tokens, my_tokens = [], []
    ref = theirs(PROMPTS, num_inference_steps=steps, guidance_scale=scale, truncation_rate=rate,
                 num_images_per_prompt=per_prompt, generator=torch.Generator().manual_seed(seed),
                 output_type="np", callback=lambda i, t, s: ref_tokens.append(s.clone())).images
    mine = ours.generate(PROMPTS, num_inference_steps=steps, guidance_scale=scale, truncation_rate=rate,
                         num_images_per_prompt=per_prompt, seed=seed, output_type="np", progress=False,
                         callback=lambda info: my_tokens.append(info.x.clone()))
    return ref, mine, ref_tokens, my_tokens


@pytest.mark.parametrize("steps,scale,rate,per_prompt", [
    (10, 5.0, 1.0, 1),     # every training step, guided, no truncation
    (10, 5.0, 0.86, 2),    # truncation (ITHQ's recommended rate), two images per prompt
    (4, 3.0, 0.7, 1),      # fewer steps than training: the chain's last four timesteps
    (6, 1.0, 1.0, 1),      # no guidance: one plain model call per step
])
def test_same_generator_same_tokens_and_images(folders, steps, scale, rate, per_prompt):
    _, ours, theirs = folders
    ref, mine, ref_tokens, my_tokens = _run_both(ours, theirs, steps=steps, scale=scale, rate=rate,
                                                 per_prompt=per_prompt)
    assert len(my_tokens) == len(ref_tokens) == steps
    for i, (a, b) in enumerate(zip(my_tokens, ref_tokens)):
        assert torch.equal(a, b), f"tokens differ after step {i}"
    assert mine.shape == ref.shape and mine.dtype == np.float32
    # the same tokens, decoded by fastdiff's VQ-VAE and diffusers' (tests/tolerances.py)
    tokens = my_tokens[-1]
    terms = reduction_terms(ours.vqvae, lambda: ours.vqvae.decode_tokens(tokens, ours.transformer.height,
                                                                          ours.transformer.width))
    np.testing.assert_allclose(mine, ref, atol=fp32_bound(1.0, terms), rtol=0)


def test_seed_reproduces_and_outputs(folders):
    _, ours, _ = folders
    kw = dict(num_inference_steps=3, progress=False, seed=7)
    a = ours.generate("a red circle", output_type="pt", **kw)
    b = ours.generate("a red circle", output_type="pt", **kw)
    assert torch.equal(a, b) and a.shape[:2] == (1, 3) and 0 <= a.min() and a.max() <= 1
    images = ours.generate("a red circle", output_type="pil", **kw)
    assert images[0].size == (a.shape[3], a.shape[2])
    assert not torch.equal(a, ours.generate("a red circle", output_type="pt", **dict(kw, seed=8)))


def test_latents_start_and_callback_x0(folders):
    _, ours, _ = folders
    K, N = ours.transformer.num_vector_embeds, ours.num_tokens
    start = torch.randint(0, K - 1, (1, N), generator=torch.Generator().manual_seed(1))
    seen = []
    ours.generate("a red circle", num_inference_steps=2, latents=start, seed=0, progress=False,
                  callback=seen.append, output_type="pt")
    assert [s.index for s in seen] == [0, 1] and seen[0].total == 2
    assert seen[-1].x0.shape == (1, N) and int(seen[-1].x0.max()) < K - 1  # x0 never holds the mask


# --- bad input -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return fastdiff.Pipeline.from_pretrained(make_vq_components(tmp_path_factory.mktemp("bad"), learned=True))


@pytest.mark.parametrize("kwargs,match", [
    (dict(truncation_rate=0.0), "truncation_rate"),
    (dict(truncation_rate=1.5), "truncation_rate"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=11), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=torch.zeros(1, 3, dtype=torch.int64)), "latents have shape"),
    (dict(latents="float"), "integer token"),
    (dict(latents="range"), r"in \[0, "),
])
def test_bad_arguments_are_rejected(pipe, kwargs, match):
    N, K = pipe.num_tokens, pipe.transformer.num_vector_embeds
    if kwargs.get("latents") == "float":
        kwargs = dict(latents=torch.zeros(1, N))
    elif kwargs.get("latents") == "range":
        kwargs = dict(latents=torch.full((1, N), K, dtype=torch.int64))
    with pytest.raises(ValueError, match=match):
        pipe.generate("a red circle", progress=False, **{"num_inference_steps": 3, **kwargs})


def test_empty_prompt_is_rejected(pipe):
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe.generate("  ", progress=False)


@pytest.mark.parametrize("component", ["vqvae", "transformer", "scheduler",
                                       "learned_classifier_free_sampling_embeddings"])
def test_missing_component_is_named(tmp_path, component):
    folder = make_vq_components(tmp_path, learned=True)
    shutil.rmtree(os.path.join(folder, component))
    with pytest.raises(FileNotFoundError, match=component):
        fastdiff.Pipeline.from_pretrained(folder)


def test_corrupt_null_embedding_is_reported(tmp_path):
    folder = make_vq_components(tmp_path, learned=True)
    path = os.path.join(folder, "learned_classifier_free_sampling_embeddings")
    weights = [f for f in os.listdir(path) if f.endswith(".safetensors")][0]
    with open(os.path.join(path, weights), "r+b") as fh:
        fh.truncate(20)
    with pytest.raises(Exception, match="learned_classifier_free_sampling_embeddings"):
        fastdiff.Pipeline.from_pretrained(folder)


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_generates_with_a_vq_folder(tmp_path):
    from fastdiff.cli import main

    folder = make_vq_components(tmp_path / "model", learned=True)
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--model", folder, "--steps", "3", "--truncation-rate", "0.9",
                 "-o", str(out), "--no-progress"]) == 0
    assert out.is_file()
    assert main(["generate", "a red circle", "--model", folder, "--negative", "blue", "-o", str(out),
                 "--no-progress"]) == 2
