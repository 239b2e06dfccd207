"""fastdiff.eval.image_metrics against its oracles: scikit-image's PSNR and SSIM (Wang et al.'s
settings) over odd shapes, image kinds and noise levels; transformers' slow CLIPImageProcessor for
the reference and CLIP preprocessing; a tiny random CLIPModel with embeddings taken by hand for the
CLIP score. Every error the module raises is provoked. Nothing downloads: sockets cannot connect.

Tolerances. PSNR: both sides sum exact squared integer differences in float64 (3*H*W*255^2 <
2^53), divide once and take one log10, so they differ by an ulp or two: 1e-12 relative. SSIM:
float64 filters summed in a different order (scipy's separable passes with mirrored borders, a
valid torch conv here) differ by ~1e-16 * 255^2 in the local moments; the smallest denominator
is C1 = (0.01 * 255)^2 = 6.5, so the map differs by ~1e-12 at worst: 1e-10 absolute (SSIM is in
[-1, 1]). CLIP score: the same float32 model on bitwise-equal inputs, the cosine in float64:
1e-4 absolute on the 0..100 scale, far under 1% of the smallest positive score here.
"""
import json
import os
import shutil
import socket
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from deps import require

from fastdiff.eval.image_metrics import (
    SSIM_WINDOW, ClipPreprocessing, ClipScorer, clip_score, load_reference, mean_psnr, mean_ssim,
    prepare_reference, psnr, ssim)

PSNR_RTOL = 1e-12
SSIM_ATOL = 1e-10
CLIP_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def no_network():
    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"a test tried to open a network connection to {args!r}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def _skimage():
    return require("skimage.metrics")


def _hwc(batch):
    return [x.permute(1, 2, 0).numpy() for x in batch]


def _oracle_psnr(refs, imgs):
    metrics = _skimage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # identical pairs: numpy's divide by zero -> inf
        return torch.tensor([metrics.peak_signal_noise_ratio(r, i, data_range=255)
                             for r, i in zip(_hwc(refs), _hwc(imgs))], dtype=torch.float64)


def _oracle_ssim(refs, imgs):
    metrics = _skimage()
    return torch.tensor([metrics.structural_similarity(r, i, data_range=255, channel_axis=-1, gaussian_weights=True,
                                                       sigma=1.5, use_sample_covariance=False)
                         for r, i in zip(_hwc(refs), _hwc(imgs))], dtype=torch.float64)


# ---------------------------------------------------------------- image pairs

def _structured(n, h, w, gen):
    """Gradients, a checkerboard, constant patches and stripes: the cases where borders, flat
    regions (zero variance) and strong edges each dominate."""
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    patterns = [255 * x, 255 * y, 255 * ((torch.arange(h).view(h, 1) // 3 + torch.arange(w) // 3) % 2),
                torch.full((h, w), 255.0), torch.zeros(h, w), 127 + 120 * torch.sin(x * 17 + y * 5)]
    out = []
    for k in range(n):
        order = torch.randperm(len(patterns), generator=gen)[:3]
        out.append(torch.stack([patterns[int(i)] for i in order]))
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8)


def _noisy(images, sigma, gen):
    noise = sigma * torch.randn(images.shape, generator=gen, dtype=torch.float64)
    return (images.to(torch.float64) + noise).round().clamp(0, 255).to(torch.uint8)


def _pairs(h, w, seed=0):
    """(name, references, images) for one shape."""
    gen = torch.Generator().manual_seed(seed + 1000 * h + w)
    rand = torch.randint(0, 256, (3, 3, h, w), generator=gen, dtype=torch.uint8)
    other = torch.randint(0, 256, (3, 3, h, w), generator=gen, dtype=torch.uint8)
    structured = _structured(3, h, w, gen)
    out = [("random vs random", rand, other), ("structured vs random", structured, other)]
    for sigma in (1, 5, 20, 60):
        out.append((f"random + noise {sigma}", rand, _noisy(rand, sigma, gen)))
        out.append((f"structured + noise {sigma}", structured, _noisy(structured, sigma, gen)))
    shifted = torch.roll(structured, shifts=(1, 2), dims=(2, 3))
    out.append(("structured shifted", structured, shifted))
    out.append(("black vs white", torch.zeros(2, 3, h, w, dtype=torch.uint8),
                torch.full((2, 3, h, w), 255, dtype=torch.uint8)))
    mixed = rand.clone()
    mixed[1] = other[1]  # one identical pair, one not
    out.append(("identical and not", rand, mixed))
    return out


SHAPES = [(11, 11), (11, 23), (31, 45), (45, 31), (64, 64), (12, 97)]


@pytest.mark.parametrize("h,w", SHAPES)
def test_psnr_and_ssim_equal_skimage(h, w):
    for name, refs, imgs in _pairs(h, w):
        expected_psnr, got_psnr = _oracle_psnr(refs, imgs), psnr(refs, imgs)
        assert got_psnr.dtype == torch.float64 and got_psnr.shape == (refs.shape[0],)
        finite = torch.isfinite(expected_psnr)
        assert torch.equal(finite, torch.isfinite(got_psnr)), name
        assert torch.equal(got_psnr[~finite], expected_psnr[~finite]), name  # +inf on both sides
        torch.testing.assert_close(got_psnr[finite], expected_psnr[finite], rtol=PSNR_RTOL, atol=0, msg=name)
        got_ssim = ssim(refs, imgs)
        assert got_ssim.dtype == torch.float64 and got_ssim.shape == (refs.shape[0],)
        torch.testing.assert_close(got_ssim, _oracle_ssim(refs, imgs), rtol=0, atol=SSIM_ATOL, msg=name)


def test_ssim_of_identical_images_is_one_and_psnr_inf():
    images = _structured(2, 16, 20, torch.Generator().manual_seed(3))
    assert torch.equal(psnr(images, images), torch.full((2,), float("inf"), dtype=torch.float64))
    torch.testing.assert_close(ssim(images, images), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert mean_psnr(images, images) == float("inf")


def test_means_average_the_per_image_values():
    _, refs, imgs = _pairs(31, 45)[3]
    assert mean_psnr(refs, imgs) == pytest.approx(float(_oracle_psnr(refs, imgs).mean()), rel=PSNR_RTOL)
    assert mean_ssim(refs, imgs) == pytest.approx(float(_oracle_ssim(refs, imgs).mean()), abs=SSIM_ATOL)


def test_ssim_is_exact_enough_to_see_a_one_pixel_change():
    """The tolerance is far tighter than any real difference: one pixel changed by one level moves
    SSIM by more than a thousand times SSIM_ATOL."""
    refs = _structured(1, 32, 32, torch.Generator().manual_seed(5))
    imgs = refs.clone()
    imgs[0, 0, 16, 16] = (int(imgs[0, 0, 16, 16]) + 1) % 256
    assert float(ssim(refs, refs) - ssim(refs, imgs)) > 1000 * SSIM_ATOL


@pytest.mark.parametrize("h,w", [(7, 7), (10, 64), (64, 10)])
def test_ssim_smaller_than_the_window_is_an_error_as_in_skimage(h, w):
    refs = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    imgs = 255 - refs
    with pytest.raises(ValueError, match="win_size exceeds image extent"):
        _oracle_ssim(refs, imgs)
    with pytest.raises(ValueError, match=f"at least {SSIM_WINDOW}x{SSIM_WINDOW}.*got {h}x{w}"):
        ssim(refs, imgs)
    # PSNR has no window: any size, as skimage
    torch.testing.assert_close(psnr(refs, imgs), _oracle_psnr(refs, imgs), rtol=PSNR_RTOL, atol=0)


def test_psnr_of_a_single_pixel():
    refs = torch.tensor([[[[0]], [[10]], [[255]]]], dtype=torch.uint8)
    imgs = torch.tensor([[[[3]], [[10]], [[250]]]], dtype=torch.uint8)
    torch.testing.assert_close(psnr(refs, imgs), _oracle_psnr(refs, imgs), rtol=PSNR_RTOL, atol=0)


def test_psnr_ssim_bad_input():
    ok = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    for metric in (psnr, ssim, mean_psnr, mean_ssim):
        with pytest.raises(TypeError, match="must be uint8"):
            metric(ok.float(), ok)
        with pytest.raises(TypeError, match="must be uint8"):
            metric(ok, ok.to(torch.int16))
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            metric(ok.numpy(), ok)
        with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got shape \(3, 16, 16\)"):
            metric(ok[0], ok[0])
        with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got shape \(2, 4, 16, 16\)"):
            metric(torch.zeros(2, 4, 16, 16, dtype=torch.uint8), torch.zeros(2, 4, 16, 16, dtype=torch.uint8))
        with pytest.raises(ValueError, match="empty batch"):
            metric(ok[:0], ok[:0])
        with pytest.raises(ValueError, match="differ in shape"):
            metric(ok, ok[:1])
        with pytest.raises(ValueError, match="differ in shape"):
            metric(ok, ok[..., :15])


# ---------------------------------------------------------------- reference images

def _picture(mode, size=(45, 31), seed=0):
    """A PIL image of `mode` with content in every band (and partial transparency where it has one)."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    base = Image.fromarray(rgba, "RGBA")
    if mode == "P+transparency":
        image = base.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
        return image
    return base if mode == "RGBA" else base.convert(mode)


def _slow_processor(**kwargs):
    transformers = require("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kwargs)


MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "CMYK", "1", "YCbCr"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image_size,size", [((45, 31), 16), ((31, 45), 16), ((64, 64), 64), ((20, 13), 40),
                                             ((97, 11), 8)])
def test_prepare_reference_equals_clip_processors_geometry(mode, image_size, size):
    """transformers' slow CLIPImageProcessor with rescaling and normalisation off is the oracle for
    the conversion to RGB, the shortest-side bicubic resize and the centre crop."""
    image = _picture(mode, image_size)
    processor = _slow_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                do_rescale=False, do_normalize=False)
    expected = torch.as_tensor(np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0]))
    got = prepare_reference(image, size)
    assert got.dtype == torch.uint8 and got.shape == (3, size, size)
    assert torch.equal(got, expected.to(torch.uint8))


def test_prepare_reference_crop_offset_and_filter():
    """Stated by hand: 640x480 -> shorter side 64, longer int(64 * 640 / 480) = 85, BICUBIC, then the
    crop from left (85 - 64) // 2 = 10."""
    image = _picture("RGB", (640, 480))
    resized = image.resize((85, 64), resample=Image.BICUBIC)
    expected = torch.from_numpy(np.array(resized)[:, 10:74]).permute(2, 0, 1)
    assert torch.equal(prepare_reference(image, 64), expected)
    bilinear = torch.from_numpy(np.array(image.resize((85, 64), Image.BILINEAR))[:, 10:74]).permute(2, 0, 1)
    assert not torch.equal(prepare_reference(image, 64), bilinear)


def test_load_reference(tmp_path):
    image = _picture("RGBA", (50, 40))
    image.save(tmp_path / "ref.png")
    assert torch.equal(load_reference(tmp_path / "ref.png", 24), prepare_reference(image, 24))
    assert torch.equal(load_reference(str(tmp_path / "ref.png"), 24), prepare_reference(image, 24))


def test_reference_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference image not found: .*nothing.png"):
        load_reference(tmp_path / "nothing.png", 16)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_reference(tmp_path, 16)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not an image PIL can read"):
        load_reference(tmp_path / "notes.png", 16)
    _picture("RGB", (64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.png could not be decoded"):
        load_reference(tmp_path / "cut.png", 16)
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="deep.png: a 'I;16' image|deep.png: a 'I' image"):
        load_reference(tmp_path / "deep.png", 16)
    for size in (0, -3, 2.5, True, "16"):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            prepare_reference(_picture("RGB"), size)
    with pytest.raises(TypeError, match="expected a PIL image, got ndarray"):
        prepare_reference(np.zeros((8, 8, 3), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="a 'F' image"):
        prepare_reference(Image.fromarray(np.zeros((8, 8), dtype=np.float32)), 8)


# ---------------------------------------------------------------- CLIP score

VOCAB_CAPTIONS = ["a red circle", "blue", "a blue circle above a red square", "", "red red red",
                  "circle! blue? 123", " ".join(["red blue circle"] * 10), "BLUE Circle"]


def _write_clip(folder, seed=0, image_size=32, preprocessor=True):
    """A tiny random CLIPModel saved by transformers, with fastdiff's test tokenizer files beside it."""
    transformers = require("transformers")
    from sd_fixtures import randomize, write_tokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = write_tokenizer(folder, max_length=16)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = randomize(transformers.CLIPModel(config), seed).eval()
    model.save_pretrained(folder)
    if preprocessor:
        _slow_processor(size={"shortest_edge": image_size},
                        crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip") / "model")
    _write_clip(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return ClipScorer.from_folder(clip_folder)


def _images(n, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=gen) * 255, size=(h, w),
                                             mode="bilinear", align_corners=False)
    return (smooth + 30 * torch.rand(n, 3, h, w, generator=gen)).round().clamp(0, 255).to(torch.uint8)


def _oracle_inputs(folder, images, captions):
    """transformers' own preprocessing and tokenizer for the folder: the CLIP score's inputs."""
    transformers = require("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = cls.from_pretrained(folder, local_files_only=True)
    pictures = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = tokenizer(list(captions), padding=True, truncation=True, max_length=16, return_tensors="pt")
    return pixels, tokens


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _oracle_cosines(folder, images, captions):
    """The cosine of CLIP's image and text embeddings, by hand from transformers' model."""
    transformers = require("transformers")
    model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    pixels, tokens = _oracle_inputs(folder, images, captions)
    with torch.no_grad():
        image = _features(model.get_image_features(pixel_values=pixels)).double()
        text = _features(model.get_text_features(input_ids=tokens["input_ids"],
                                                 attention_mask=tokens["attention_mask"])).double()
        # the projections by hand too: pooled vision / text states times the projection matrices
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        torch.testing.assert_close(image.float(), pooled @ model.visual_projection.weight.T, rtol=1e-5, atol=1e-6)
    return (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))


def test_clip_preprocessing_equals_transformers_slow_path(clip_folder, scorer):
    for n, (h, w) in enumerate([(32, 32), (48, 64), (100, 37), (20, 20), (33, 32)]):
        images = _images(3, h, w, seed=n)
        pixels, _ = _oracle_inputs(clip_folder, images, ["x"] * 3)
        got = scorer.pixel_values(images)
        assert got.dtype == torch.float32 and got.shape == (3, 3, 32, 32)
        assert torch.equal(got, pixels), (h, w)


@pytest.mark.parametrize("config", [
    dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
         image_std=[0.2, 0.25, 0.3]),
    dict(size={"height": 32, "width": 32}, do_center_crop=False, resample=2),
    dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_normalize=False),
    dict(size={"shortest_edge": 35}, crop_size={"height": 32, "width": 32}, rescale_factor=0.5, resample=1),
])
def test_clip_preprocessing_configs_equal_transformers(config):
    processor = _slow_processor(**config)
    ours = ClipPreprocessing.from_config(json.loads(processor.to_json_string()), 32)
    images = _images(2, 45, 61, seed=7)
    expected = processor(images=[Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images],
                         return_tensors="pt")["pixel_values"]
    assert torch.equal(ours(images), expected)


def test_tokens_equal_transformers_tokenizer(clip_folder, scorer):
    _, tokens = _oracle_inputs(clip_folder, _images(len(VOCAB_CAPTIONS), 32, 32), VOCAB_CAPTIONS)
    got = scorer.tokens(VOCAB_CAPTIONS)
    assert torch.equal(got["input_ids"], tokens["input_ids"])
    assert torch.equal(got["attention_mask"], tokens["attention_mask"])
    assert got["input_ids"].shape[1] == 16  # the long caption is cut to the model's length, eos kept
    assert int(got["input_ids"][6, -1]) == scorer.tokenizer.eos_token_id


def test_clip_score_equals_its_formula(clip_folder, scorer):
    images = _images(len(VOCAB_CAPTIONS), 48, 40, seed=11)
    cosines = _oracle_cosines(clip_folder, images, VOCAB_CAPTIONS)
    assert (cosines < 0).any() and (cosines > 0).any(), "the data must exercise the clamp at 0"
    expected = 100 * cosines.clamp(min=0)
    got = scorer.score(images, VOCAB_CAPTIONS)
    assert got.dtype == torch.float64 and got.shape == (len(VOCAB_CAPTIONS),)
    torch.testing.assert_close(got, expected, rtol=0, atol=CLIP_ATOL)
    assert clip_score(scorer, images, VOCAB_CAPTIONS) == pytest.approx(float(expected.mean()), abs=CLIP_ATOL)
    # the comparison is exact enough that a 1% error anywhere in a positive score would fail it
    positive = expected > 0
    assert CLIP_ATOL < 0.01 * float(expected[positive].min())
    assert not torch.allclose(got[positive] * 1.01, expected[positive], rtol=0, atol=CLIP_ATOL)
    # batches of 3 (padded to their own longest caption) give the same scores
    chunked = ClipScorer(scorer.model, scorer.tokenizer, scorer.preprocessing, batch_size=3)
    torch.testing.assert_close(chunked.score(images, VOCAB_CAPTIONS), expected, rtol=0, atol=CLIP_ATOL)


def test_clip_folder_layouts(tmp_path):
    """The tokenizer in a tokenizer/ folder; no preprocessor_config.json (CLIP's defaults at the
    model's image size, which the processor's defaults at that size reproduce)."""
    folder = str(tmp_path / "clip")
    _write_clip(folder, seed=1, preprocessor=False)
    os.makedirs(os.path.join(folder, "tokenizer"))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.move(os.path.join(folder, name), os.path.join(folder, "tokenizer", name))
    scorer = ClipScorer.from_folder(folder)
    images = _images(2, 40, 50, seed=2)
    expected = _slow_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=[Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images], return_tensors="pt")["pixel_values"]
    assert torch.equal(scorer.pixel_values(images), expected)
    assert scorer.score(images, ["red", "blue"]).shape == (2,)


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in drop])
    return str(dst)


def test_clip_bad_folders(clip_folder, tmp_path):
    transformers = require("transformers")
    with pytest.raises(FileNotFoundError, match="CLIP model folder not found"):
        ClipScorer.from_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match="has no config.json: not a transformers CLIP model folder"):
        ClipScorer.from_folder(_copy(clip_folder, tmp_path / "no_config", drop=("config.json",)))
    text_only = str(tmp_path / "text_only")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=524, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16)).save_pretrained(text_only)
    with pytest.raises(ValueError, match="'clip_text_model' model, not a CLIP model"):
        ClipScorer.from_folder(text_only)
    with pytest.raises(FileNotFoundError, match="no weights in"):
        ClipScorer.from_folder(_copy(clip_folder, tmp_path / "no_weights", drop=("model.safetensors",)))
    with pytest.raises(FileNotFoundError, match="no tokenizer files in"):
        ClipScorer.from_folder(_copy(clip_folder, tmp_path / "no_tok", drop=("vocab.json", "merges.txt")))
    broken = _copy(clip_folder, tmp_path / "broken_config")
    with open(os.path.join(broken, "config.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match="config.json could not be read as JSON"):
        ClipScorer.from_folder(broken)
    crop = _copy(clip_folder, tmp_path / "bad_crop")
    _slow_processor(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48}).save_pretrained(crop)
    with pytest.raises(ValueError, match=r"crop_size \(48, 48\) does not fit the model's 32x32 images"):
        ClipScorer.from_folder(crop)


def test_clip_weights_nan_and_missing(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / "nan")
    _write_clip(folder, seed=2)
    weights = os.path.join(folder, "model.safetensors")
    state = load_file(weights)
    name = next(k for k in sorted(state) if k.endswith("visual_projection.weight"))
    good = state[name].clone()
    state[name][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"the weight {name} holds NaN or inf"):
        ClipScorer.from_folder(folder)
    state[name] = good
    del state[next(k for k in sorted(state) if k.endswith("text_projection.weight"))]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the weights lack 1 of the model's tensors .*text_projection"):
        ClipScorer.from_folder(folder)


def test_clip_score_bad_input(scorer):
    images = _images(2, 32, 32)
    with pytest.raises(ValueError, match="2 images but 3 captions: one caption per image"):
        scorer.score(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        clip_score(scorer, images, ["a"])
    with pytest.raises(TypeError, match="captions must be a list of strings, got str"):
        scorer.score(images, "a red circle")
    with pytest.raises(TypeError, match="caption 1 must be a string, got int"):
        scorer.score(images, ["a", 3])
    with pytest.raises(ValueError, match="no captions"):
        scorer.score(images[:0], [])
    with pytest.raises(ValueError, match=r"uint8 RGB batch \[N, 3, H, W\], got torch.float32"):
        scorer.score(images.float(), ["a", "b"])
    with pytest.raises(ValueError, match=r"uint8 RGB batch \[N, 3, H, W\], got torch.uint8 \(2, 1, 32, 32\)"):
        scorer.score(images[:, :1], ["a", "b"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ClipScorer(scorer.model, scorer.tokenizer, scorer.preprocessing, batch_size=0)
    with pytest.raises(ValueError, match="size must be an integer or"):
        ClipPreprocessing.from_config({"crop_size": "big"}, 32)
