"""fastdiff.train: the two stages learn, the exported folder runs in fastdiff's pipeline (and
diffusers'), runs are reproducible and resumable bit for bit, and the pieces (tokenizer,
data, P2 weights, caption dropout, gradient checkpointing, CLI) do what they say."""
import argparse
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastdiff
from fastdiff.data.scenes import SceneDataset, vocabulary
from fastdiff.train import objectives as obj
from fastdiff.train import preset, train, train_autoencoder, train_text2img, with_section
from fastdiff.train.cli import add_train_parser
from fastdiff.train.data import ImageCaptionFiles, ProceduralScenes, make_dataset
from fastdiff.train.models import build_unet, enable_gradient_checkpointing
from fastdiff.train.tokenizer import build_tokenizer

from sd_fixtures import generate_counting_unet_calls, image_terms
from tolerances import fp32_bound, guidance_gain
from deps import require

STEPS = 24  # stage-2 steps of the reference run; the resumed run stops halfway


def tiny(output, **overrides):
    # one thread: on a small shared CPU, a second thread mostly waits for the other jobs' cores
    return preset("tiny", output=str(output), num_threads=1, progress=False, **overrides)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(folder):
    out = {}
    diffusers_file = "diffusion_pytorch_model.safetensors"
    for component, name in (("unet", diffusers_file), ("vae", diffusers_file), ("text_encoder", "model.safetensors")):
        for key, value in load_file(os.path.join(folder, component, name)).items():
            out[f"{component}.{key}"] = value
    return out


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    result = train_autoencoder(tiny(out))
    return out, result


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, vae_run):
    """The reference run: STEPS uninterrupted stage-2 steps on the shared stage-1 VAE."""
    out = tmp_path_factory.mktemp("full")
    cfg = tiny(out, vae_path=str(vae_run[0] / "vae"))
    result = train_text2img(with_section(cfg, "diffusion", steps=STEPS))
    return out, result


def test_autoencoder_loss_falls_and_latents_are_scaled(vae_run):
    out, result = vae_run
    losses = result.losses
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    config = json.load(open(out / "vae" / "config.json"))
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == result.summary["scaling_factor"]
    assert 0 < config["scaling_factor"] < 100


def test_text2img_loss_falls(full_run):
    losses = full_run[1].losses
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < 0.9 * np.mean(losses[:6]), losses


def test_exported_folder_runs_in_the_pipeline(full_run, one_thread):
    out = full_run[0]
    for name in ("model_index.json", "TRAINING.md", "unet/config.json", "vae/config.json", "tokenizer/vocab.json",
                 "text_encoder/model.safetensors", "scheduler/scheduler_config.json"):
        assert (out / name).is_file(), name
    index = json.load(open(out / "model_index.json"))
    assert index["_class_name"] == "StableDiffusionPipeline"
    scheduler = json.load(open(out / "scheduler" / "scheduler_config.json"))
    assert scheduler["beta_schedule"] == "squaredcos_cap_v2" and scheduler["prediction_type"] == "v_prediction"
    pipe = fastdiff.Pipeline.from_pretrained(str(out))
    images = pipe.generate("a red circle", num_inference_steps=2, output_type="np", progress=False)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1
    record = (out / "TRAINING.md").read_text()
    assert f"| 2: text-to-image | {STEPS} |" in record and '"seed": 0' in record


def test_diffusers_reads_the_folder_and_agrees(full_run, one_thread):
    diffusers = require("diffusers")
    out = str(full_run[0])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = fastdiff.Pipeline.from_pretrained(out)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = ["a blue square above a red circle"]
    want = ref(prompt, num_inference_steps=4, guidance_scale=4.0, latents=latents.clone(), output_type="pt").images
    got, calls = generate_counting_unet_calls(ours, prompt, num_inference_steps=4, guidance_scale=4.0,
                                              latents=latents.clone(), output_type="pt", progress=False)
    # the same math in another order, bounded as in test_pipeline_sd (tests/tolerances.py)
    bound = fp32_bound(1.0, image_terms(ours, calls, gain=guidance_gain(4.0), size=tuple(got.shape[-2:])))
    assert (got - want).abs().max().item() <= bound


def test_resumed_run_equals_uninterrupted_run(tmp_path, vae_run, full_run):
    cfg = tiny(tmp_path, vae_path=str(vae_run[0] / "vae"))
    first = train_text2img(with_section(cfg, "diffusion", steps=STEPS // 2))
    assert first.steps == STEPS // 2
    resumed = train_text2img(replace(with_section(cfg, "diffusion", steps=STEPS), resume=True))
    assert resumed.steps == STEPS
    assert resumed.losses == full_run[1].losses
    assert_same_weights(tmp_path, full_run[0])


def test_resume_refuses_changed_settings(tmp_path, vae_run):
    cfg = tiny(tmp_path, vae_path=str(vae_run[0] / "vae"))
    train_text2img(with_section(cfg, "diffusion", steps=2))
    changed = with_section(replace(cfg, resume=True), "diffusion", steps=4, lr=1e-4)
    with pytest.raises(ValueError, match="diffusion.lr"):
        train_text2img(changed)


def test_same_seed_same_weights_through_the_cli(tmp_path, vae_run, full_run):
    """The CLI run of the reference settings reproduces its weights; and records its command."""
    parser = argparse.ArgumentParser(prog="fastdiff")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--preset", "tiny", "--output", str(tmp_path), "--stage", "text2img",
                              "--vae", str(vae_run[0] / "vae"), "--steps", str(STEPS), "--threads", "1",
                              "--no-progress"])
    assert args.func(args) == 0
    assert_same_weights(tmp_path, full_run[0])
    record = (tmp_path / "TRAINING.md").read_text()
    assert f"fastdiff train --preset tiny --output {tmp_path} --stage text2img" in record


def test_init_from_starts_at_the_exported_weights(tmp_path, vae_run, full_run):
    """A fine-tuning run starts from the folder's (EMA) unet and text encoder and its tokenizer:
    after zero optimiser steps at lr ~0 its export is those weights."""
    cfg = tiny(tmp_path, vae_path=str(vae_run[0] / "vae"), init_from=str(full_run[0]))
    train_text2img(with_section(cfg, "diffusion", steps=1, lr=1e-30, ema_decay=0.0))
    for key, value in weights(full_run[0]).items():
        if not key.startswith("vae."):
            torch.testing.assert_close(weights(tmp_path)[key], value, atol=1e-6, rtol=0, msg=key)
    assert (tmp_path / "tokenizer" / "vocab.json").read_text() == (full_run[0] / "tokenizer" / "vocab.json").read_text()
    record = json.load(open(tmp_path / "training_log.json"))
    assert record  # the run is logged like any other


def test_init_from_refuses_another_architecture(tmp_path, vae_run, full_run):
    cfg = tiny(tmp_path, vae_path=str(vae_run[0] / "vae"), init_from=str(full_run[0]))
    cfg = replace(cfg, unet=replace(cfg.unet, block_out_channels=(16, 16)))
    with pytest.raises(ValueError, match="does not fit this run's architecture"):
        train_text2img(with_section(cfg, "diffusion", steps=1))


def test_text_encoder_learning_rate_scale(tmp_path, vae_run):
    """text_encoder_lr_scale = 0 freezes the encoder's weights while the UNet still learns."""
    cfg = with_section(tiny(tmp_path, vae_path=str(vae_run[0] / "vae")), "diffusion", steps=3, ema_decay=0.0,
                       text_encoder_lr_scale=1e-30)
    train_text2img(cfg)
    torch.manual_seed(cfg.seed)
    from fastdiff.train.models import build_text_encoder
    from fastdiff.train.tokenizer import load_tokenizer

    initial = build_text_encoder(cfg, load_tokenizer(str(tmp_path / "tokenizer"))).state_dict()
    trained = weights(tmp_path)
    for key, value in initial.items():
        if f"text_encoder.{key}" in trained and value.is_floating_point():
            torch.testing.assert_close(trained[f"text_encoder.{key}"], value, atol=1e-6, rtol=0, msg=key)
    with pytest.raises(ValueError, match="text_encoder_lr_scale"):
        with_section(preset("tiny"), "diffusion", text_encoder_lr_scale=0.0)


def test_cli_help_explains_every_option(capsys):
    parser = argparse.ArgumentParser(prog="fastdiff")
    add_train_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--preset", "--output", "--data", "--steps", "--vae-steps", "--batch-size", "--lr",
                   "--prediction-type", "--p2-gamma", "--p2-k", "--cond-dropout", "--ema-decay", "--seed",
                   "--device", "--precision", "--grad-checkpointing", "--resume", "--no-progress",
                   "--checkpoint-every", "--init-from", "--lr-schedule", "--text-lr-scale", "--place-prob",
                   "--placed-pair-prob"):
        assert option in text, option


def test_tokenizer_gives_each_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    data = ProceduralScenes(16, seed=0)
    build_tokenizer(data.tokenizer_texts(), str(tmp_path), max_length=20)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tok.model_max_length == 20
    for word in vocabulary():
        ids = tok(word).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    caption = "a red circle to the left of a blue square"
    assert len(tok(caption).input_ids) == len(caption.split()) + 2
    # an unseen word still encodes, in pieces, without the unknown token
    pieces = tok("a magenta hexagon").input_ids
    assert len(pieces) > 5 and tok.unk_token_id not in pieces[1:-1]
    # learning is deterministic
    build_tokenizer(data.tokenizer_texts(), str(tmp_path / "again"), max_length=20)
    assert (tmp_path / "again" / "vocab.json").read_text() == (tmp_path / "vocab.json").read_text()
    assert (tmp_path / "again" / "merges.txt").read_text() == (tmp_path / "merges.txt").read_text()


def test_procedural_stream_is_scene_dataset_and_resumable():
    stream = ProceduralScenes(16, seed=3)
    images, captions = stream.next_batch(3)
    reference = SceneDataset(size=16, seed=3)
    for (image, caption), got_image, got_caption in zip(reference, images, captions):
        assert caption == got_caption and torch.equal(image, got_image)
    state = stream.state_dict()
    after = stream.next_batch(4)
    stream.load_state_dict(state)
    again = stream.next_batch(4)
    assert torch.equal(after[0], again[0]) and after[1] == again[1]


def write_png(path, rgb):
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), rgb, dtype=np.uint8)).save(path)


def test_folder_dataset_loads_and_resumes(tmp_path):
    colours = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 60, 230)}
    for name, rgb in colours.items():
        write_png(tmp_path / f"{name}.png", rgb)
        (tmp_path / f"{name}.txt").write_text(f"a {name} square\n")
    data = make_dataset(str(tmp_path), 16, seed=0)
    assert isinstance(data, ImageCaptionFiles) and len(data) == 3
    images, captions = data.next_batch(3)
    assert images.shape == (3, 3, 16, 16) and sorted(captions) == ["a blue square", "a green square", "a red square"]
    for image, caption in zip(images, captions):
        expected = torch.tensor(colours[caption.split()[1]], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.02)
    state = data.state_dict()
    after = data.next_batch(5)  # crosses into the next epoch
    data.load_state_dict(state)
    again = data.next_batch(5)
    assert torch.equal(after[0], again[0]) and after[1] == again[1]
    # the same pairs as JSONL, with paths relative to the file
    lines = [json.dumps({"image": f"{n}.png", "text": f"a {n} square"}) for n in colours]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    assert len(make_dataset(str(tmp_path / "data.jsonl"), 16, seed=0)) == 3


def test_folder_dataset_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dataset(str(tmp_path / "nowhere"), 16, seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images in .*empty"):
        make_dataset(str(empty), 16, seed=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    write_png(broken / "good.png", (1, 2, 3))
    (broken / "good.txt").write_text("a good one")
    (broken / "bad.png").write_bytes(b"not a png at all")
    (broken / "bad.txt").write_text("a bad one")
    with pytest.raises(ValueError, match="bad.png"):
        make_dataset(str(broken), 16, seed=0)
    (broken / "bad.png").unlink()
    (broken / "bad.txt").unlink()
    write_png(broken / "lonely.png", (1, 2, 3))
    with pytest.raises(FileNotFoundError, match="lonely.png"):
        make_dataset(str(broken), 16, seed=0)
    (tmp_path / "list.jsonl").write_text('{"image": "missing.png", "text": "a thing"}\n')
    with pytest.raises(FileNotFoundError, match="missing.png"):
        make_dataset(str(tmp_path / "list.jsonl"), 16, seed=0)


def test_p2_weights_follow_the_formula():
    d = preset("default").diffusion
    alphas_cumprod = obj.training_alphas_cumprod(d)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    for gamma, k in ((0.0, 1.0), (1.0, 1.0), (0.5, 2.0)):
        w = obj.p2_weights(alphas_cumprod, gamma, k)
        assert torch.allclose(w, 1.0 / (k + snr) ** gamma, rtol=1e-12)
    assert torch.equal(obj.p2_weights(alphas_cumprod, 0.0, 1.0), torch.ones_like(alphas_cumprod))
    # the training schedule is the exported sampler's
    sched = fastdiff.sampling.SchedulerConfig.from_dict(obj.scheduler_config(d))
    assert np.array_equal(sched.noise_schedule("dpmpp_2m").alphas_cumprod, alphas_cumprod.numpy())


def test_caption_dropout_rate_is_the_configured_one():
    captions = ["a red circle"] * 20000
    for rate in (0.0, 0.1, 0.3):
        dropped = obj.drop_captions(captions, rate, torch.Generator().manual_seed(1))
        assert all(c in ("", "a red circle") for c in dropped)
        assert abs(dropped.count("") / len(captions) - rate) < 0.01


def test_v_target_and_forward_process():
    x0, noise = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2)
    alpha_bar = torch.tensor([0.999, 0.7, 0.5, 0.1, 1e-4])
    x_t = obj.noised(x0, noise, alpha_bar)
    v = obj.target(x0, noise, alpha_bar, "v_prediction")
    a, s = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    # x0 = alpha x_t - sigma v, up to the ~6 roundings of both formulas (tests/tolerances.py)
    atol = fp32_bound(max(x0.abs().max().item(), noise.abs().max().item()), terms=6)
    assert torch.allclose(a * x_t - s * v, x0, atol=atol, rtol=0)
    assert torch.equal(obj.target(x0, noise, alpha_bar, "epsilon"), noise)


def test_gradient_checkpointing_gives_the_same_gradients(one_thread):
    cfg = preset("tiny")
    torch.manual_seed(0)
    plain = build_unet(cfg)
    for p in plain.parameters():  # the zero-init layers would leave most gradients at 0
        torch.nn.init.normal_(p, std=0.05)
    wrapped = build_unet(cfg)
    wrapped.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(wrapped)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    context = torch.randn(2, 16, cfg.text_encoder.hidden_size)
    for model in (plain, wrapped):
        model(x, t, context).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="prediction_type"):
        with_section(preset("tiny"), "diffusion", prediction_type="sample")
    with pytest.raises(ValueError, match="cond_dropout"):
        with_section(preset("tiny"), "diffusion", cond_dropout=1.5)
    with pytest.raises(FileNotFoundError, match="stage 1"):
        train(tiny(tmp_path), stage="text2img")
