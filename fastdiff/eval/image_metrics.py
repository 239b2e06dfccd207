"""PSNR, SSIM and CLIP score of generated images, per image then averaged (the MS-COCO protocol:
each image against its caption's own reference image, and against its caption).

    refs = torch.stack([load_reference(path, 512) for path in reference_paths])
    mean_psnr(refs, images), mean_ssim(refs, images)          # images: uint8 [N, 3, 512, 512]
    clip_score(ClipScorer.from_folder("clip-vit-large-patch14"), images, captions)

Images are uint8 RGB batches [N, 3, H, W] (data range 255) and nothing else: a float image
in [0, 1] scored with a data range of 255 would give plausible-looking wrong numbers, so
floats are refused and the caller quantises as it saves. PSNR and SSIM are computed in
float64 and equal scikit-image's (tests/test_image_metrics.py is the proof):

    peak_signal_noise_ratio(ref, img, data_range=255)
    structural_similarity(ref, img, data_range=255, channel_axis=-1, gaussian_weights=True,
                          sigma=1.5, use_sample_covariance=False)

(Wang et al. 2004's settings: an 11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
population covariances). CLIP score is Hessel et al. 2021's CLIP-S with w = 100, on a
transformers CLIPModel read from a local folder, with the folder's own image preprocessing
(written here in torch/PIL, equal to CLIPImageProcessor's slow path) and fastdiff's CLIP tokenizer.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

PathLike = Union[str, "os.PathLike[str]"]

DATA_RANGE = 255.0
# Wang et al. 2004 (skimage's gaussian_weights=True): sigma 1.5 truncated at 3.5 sigma -> 11 taps
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # scipy.ndimage's radius rule
SSIM_WINDOW = 2 * SSIM_RADIUS + 1
_SSIM_CHUNK = 8  # images filtered at once (15 float64 maps each)

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, CLIPImageProcessor's defaults
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- PSNR and SSIM

def _check_pair(references: Tensor, images: Tensor) -> None:
    for name, x in (("references", references), ("images", images)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 in [0, 255], got {x.dtype} (quantise first, e.g. "
                            "(x * 255).round().clamp(0, 255).to(torch.uint8) for floats in [0, 1])")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be RGB batches [N, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
    if references.shape != images.shape:
        raise ValueError(f"references {tuple(references.shape)} and images {tuple(images.shape)} differ in shape")


def psnr(references: Tensor, images: Tensor) -> Tensor:
    """Per-image PSNR in dB, float64 [N]: 10 log10(255^2 / MSE) over all pixels and channels, as
    skimage's peak_signal_noise_ratio(ref, img, data_range=255). An identical pair has MSE 0 and
    PSNR inf (skimage's value too); the MSE's sum of squared integer differences is exact in float64."""
    _check_pair(references, images)
    diff = references.to(torch.float64) - images.to(torch.float64)
    mse = (diff * diff).mean(dim=(1, 2, 3))
    return 10 * torch.log10(DATA_RANGE ** 2 / mse)


def _gaussian_taps(device) -> Tensor:
    """scipy.ndimage's Gaussian kernel: exp(-x^2 / 2 sigma^2) over [-radius, radius], summing to 1."""
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 / SSIM_SIGMA ** 2 * x * x)
    return taps / taps.sum()


def _ssim_maps(x: Tensor, y: Tensor) -> Tensor:
    """Wang et al.'s SSIM map of float64 [M, H, W] pairs, on the pixels whose window lies inside the
    image: [M, H - 10, W - 10]. skimage filters the whole image (mirroring the borders) and then
    crops (win_size - 1) // 2 = 5 pixels from each side of the map; the pixels it keeps never
    see the mirrored border, so a valid (unpadded) filter gives the same map."""
    taps = _gaussian_taps(x.device)
    stack = torch.stack([x, y, x * x, y * y, x * y], dim=1).flatten(0, 1).unsqueeze(1)
    filtered = F.conv2d(F.conv2d(stack, taps.view(1, 1, -1, 1)), taps.view(1, 1, 1, -1))
    ux, uy, uxx, uyy, uxy = filtered.view(x.shape[0], 5, *filtered.shape[-2:]).unbind(1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy  # population covariances
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim(references: Tensor, images: Tensor) -> Tensor:
    """Per-image SSIM, float64 [N]: each channel's mean SSIM map (Gaussian window, sigma 1.5, 11
    taps, K1 0.01, K2 0.03, data range 255, population covariances; 5 border pixels left out),
    averaged over R, G, B -- skimage's structural_similarity(ref, img, data_range=255,
    channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False). Images
    smaller than the 11x11 window are an error, as in skimage."""
    _check_pair(references, images)
    height, width = images.shape[-2:]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} (Wang et al.'s Gaussian "
                         f"window: sigma {SSIM_SIGMA} truncated at {SSIM_TRUNCATE} sigma), got {height}x{width}")
    out = []
    for start in range(0, images.shape[0], _SSIM_CHUNK):
        ref = references[start:start + _SSIM_CHUNK].to(torch.float64)
        img = images[start:start + _SSIM_CHUNK].to(torch.float64)
        maps = _ssim_maps(ref.flatten(0, 1), img.flatten(0, 1))
        out.append(maps.mean(dim=(1, 2)).view(-1, 3).mean(dim=1))
    return torch.cat(out)


def mean_psnr(references: Tensor, images: Tensor) -> float:
    """The mean of the per-image PSNRs (dB). inf if any pair is identical: no cap (e.g. 100 dB) is
    applied, since a cap is a convention that changes the number, and an identical generated and
    reference image means the evaluation compared the wrong files."""
    return float(psnr(references, images).mean())


def mean_ssim(references: Tensor, images: Tensor) -> float:
    """The mean of the per-image SSIMs."""
    return float(ssim(references, images).mean())


# ---------------------------------------------------------------- reference images

def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy, transparency composited onto white (as transformers' convert_to_rgb).
    16/32-bit modes are an error: PIL's convert clips them to 0..255 instead of scaling."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise ValueError(f"a {image.mode!r} image (16/32-bit): convert it to 8 bits first (PIL's convert would "
                         "clip its values, not scale them)")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resize: Tuple[str, int, int], crop: Optional[Tuple[int, int]],
                       resample: int = Image.BICUBIC) -> Image.Image:
    """transformers' slow image-processor geometry: resize ("shortest_edge", n, _) makes the shorter
    side n and the longer int(n * long / short) (truncated); ("exact", h, w) resizes to h x w; both
    with PIL's `resample` on the uint8 image. Then a crop of (h, w) at top = (H - h) // 2,
    left = (W - w) // 2 (rounded down). A crop larger than the image is an error."""
    width, height = image.size
    kind, first, second = resize
    if kind == "shortest_edge":
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(first * long / short)
        new_height, new_width = (new_long, first) if width <= height else (first, new_long)
    else:
        new_height, new_width = first, second
    image = image.resize((new_width, new_height), resample=resample)
    if crop is None:
        return image
    crop_height, crop_width = crop
    if crop_height > new_height or crop_width > new_width:
        raise ValueError(f"a {crop_height}x{crop_width} crop of a {new_height}x{new_width} image")
    top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
    return image.crop((left, top, left + crop_width, top + crop_height))


def _pil_to_tensor(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return size


def prepare_reference(image: Image.Image, size: int) -> Tensor:
    """A reference image as uint8 [3, size, size]: to RGB (see ``to_rgb``), the shorter side resized
    to `size` with PIL BICUBIC (the longer to int(size * long / short)), then the centre size x size
    crop at offset (extra // 2) -- the geometry of CLIP's own preprocessing (``resize_center_crop``).
    EXIF orientation is not applied (as PIL.Image.open, and the usual COCO loaders)."""
    size = _check_size(size)
    return _pil_to_tensor(resize_center_crop(to_rgb(image), ("shortest_edge", size, size), (size, size)))


def load_reference(path: PathLike, size: int) -> Tensor:
    """``prepare_reference`` of the image file at `path`; a missing file or one PIL cannot decode
    is an error naming it."""
    path = os.fspath(path)
    size = _check_size(size)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference image not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"reference image is a folder, not a file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            try:
                return prepare_reference(image, size)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read") from None
    except (OSError, SyntaxError) as exc:  # truncated or corrupt data after a valid header
        raise ValueError(f"{path} could not be decoded: {exc}") from None


# ---------------------------------------------------------------- CLIP score

@dataclass(frozen=True)
class ClipPreprocessing:
    """CLIPImageProcessor's slow path: resize (``resize_center_crop``), crop, x * rescale_factor
    (float64, then float32), (x - mean) / std in float32. None skips a step."""
    resize: Optional[Tuple[str, int, int]]
    crop: Optional[Tuple[int, int]]
    resample: int = Image.BICUBIC
    rescale_factor: Optional[float] = 1 / 255
    mean: Optional[Tuple[float, ...]] = OPENAI_CLIP_MEAN
    std: Optional[Tuple[float, ...]] = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, config: dict, image_size: int, where: str = "preprocessor_config.json"
                    ) -> "ClipPreprocessing":
        """From a preprocessor_config.json's dict ({} for none: CLIP's defaults at `image_size`)."""
        def square(value, name):
            if isinstance(value, int) and not isinstance(value, bool):
                return value, value
            if isinstance(value, dict) and {"height", "width"} <= set(value):
                return int(value["height"]), int(value["width"])
            raise ValueError(f"{where}: {name} must be an integer or {{'height', 'width'}}, got {value!r}")

        size = config.get("size", {"shortest_edge": image_size})
        if isinstance(size, dict) and "shortest_edge" in size and size.get("longest_edge") is None:
            resize = ("shortest_edge", int(size["shortest_edge"]), int(size["shortest_edge"]))
        elif isinstance(size, int) and not isinstance(size, bool):
            resize = ("shortest_edge", size, size)  # an old config's int: default_to_square=False
        else:
            resize = ("exact", *square(size, "size"))
        crop = square(config.get("crop_size", image_size), "crop_size")
        normalize = config.get("do_normalize", True)
        return cls(resize=resize if config.get("do_resize", True) else None,
                   crop=crop if config.get("do_center_crop", True) else None,
                   resample=int(config.get("resample", Image.BICUBIC)),
                   rescale_factor=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True)
                   else None,
                   mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
                   std=tuple(config.get("image_std", OPENAI_CLIP_STD)) if normalize else None)

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 [N, 3, H, W] -> float32 pixel values [N, 3, h, w]."""
        pictures = []
        for image in images.cpu():
            picture = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
            if self.resize is not None:
                picture = resize_center_crop(picture, self.resize, self.crop, self.resample)
            elif self.crop is not None:
                picture = resize_center_crop(picture, ("exact", picture.height, picture.width), self.crop)
            pictures.append(_pil_to_tensor(picture))
        if len({tuple(p.shape) for p in pictures}) > 1:
            raise ValueError("the preprocessed images differ in size (no centre crop in the preprocessing?)")
        pixels = torch.stack(pictures).to(torch.float64)
        if self.rescale_factor is not None:
            pixels = pixels * self.rescale_factor
        pixels = pixels.to(torch.float32)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} could not be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a JSON {type(data).__name__}")
    return data


def _tokenizer_folder(path: str) -> str:
    for folder in (path, os.path.join(path, "tokenizer")):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")) or all(
                os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "merges.txt")):
            return folder
    raise FileNotFoundError(f"no tokenizer files in {path} (nor in its tokenizer/ folder): expected "
                            "tokenizer.json, or vocab.json and merges.txt")


def _check_finite(model, path: str) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: the weight {name} holds NaN or inf values")


class ClipScorer:
    """CLIP-S (Hessel et al. 2021) with w = 100: 100 * max(cos(image embedding, text embedding), 0)
    per image. torchmetrics' CLIPScore averages 100 * cos and clamps the mean at 0 instead, which
    is the same number whenever no pair's cosine is negative (as with real CLIP models and
    captions); it also cuts captions past the model's length without keeping their end-of-text
    token, where this scorer truncates as CLIP's tokenizer does (keeping it)."""

    def __init__(self, model, tokenizer, preprocessing: ClipPreprocessing, *, device="cpu",
                 batch_size: int = 32, name: str = ""):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer, self.preprocessing, self.batch_size, self.name = tokenizer, preprocessing, batch_size, name
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))

    @classmethod
    def from_folder(cls, path: PathLike, device="cpu", *, batch_size: int = 32) -> "ClipScorer":
        """A saved transformers CLIPModel folder (config.json with model_type "clip", its weights,
        the tokenizer's files there or in tokenizer/, and optionally preprocessor_config.json;
        without one, CLIP's defaults at the model's image size). Nothing is downloaded."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP model folder not found: {path}")
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"{path} has no config.json: not a transformers CLIP model folder")
        model_type = _read_json(config_file).get("model_type")
        if model_type != "clip":
            raise ValueError(f"{config_file} is a {model_type!r} model, not a CLIP model (CLIPModel, model_type "
                             "'clip', with both its text and its vision tower)")
        if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
            raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")
        from ..loaders.clip_tokenizer import CLIPTokenizer

        tokenizer_dir = _tokenizer_folder(path)
        from transformers import CLIPModel

        from ..loaders.quiet import quiet_loading
        try:
            with quiet_loading():
                model, info = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                        output_loading_info=True)
        except Exception as exc:  # transformers' errors run to many lines: keep the first
            raise ValueError(f"{path}: transformers could not load the CLIP model: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                             ) from None
        if info.get("missing_keys"):
            raise ValueError(f"{path}: the weights lack {len(info['missing_keys'])} of the model's tensors (e.g. "
                             f"{sorted(info['missing_keys'])[0]}): they would be random")
        _check_finite(model, path)
        tokenizer = CLIPTokenizer.from_folder(
            tokenizer_dir, model_max_length=int(model.config.text_config.max_position_embeddings))
        preprocessor_file = os.path.join(path, "preprocessor_config.json")
        config = _read_json(preprocessor_file) if os.path.isfile(preprocessor_file) else {}
        image_size = int(model.config.vision_config.image_size)
        preprocessing = ClipPreprocessing.from_config(config, image_size, where=preprocessor_file)
        if preprocessing.crop is not None and preprocessing.crop != (image_size, image_size):
            raise ValueError(f"{preprocessor_file}: crop_size {preprocessing.crop} does not fit the model's "
                             f"{image_size}x{image_size} images")
        return cls(model, tokenizer, preprocessing, device=device, batch_size=batch_size, name=path)

    def __repr__(self) -> str:
        return (f"ClipScorer({self.name!r}, device={self.device}, image_size={self.image_size}, "
                f"max_length={self.max_length})")

    def pixel_values(self, images: Tensor) -> Tensor:
        """The model's float32 input [N, 3, image_size, image_size] of uint8 images [N, 3, H, W]."""
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a uint8 RGB batch [N, 3, H, W], got {got}")
        pixels = self.preprocessing(images)
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the preprocessing gives {tuple(pixels.shape[-2:])} images; the model takes "
                             f"{self.image_size}x{self.image_size}")
        return pixels

    def tokens(self, captions: Sequence[str]):
        """The captions' input_ids and attention_mask, padded to the longest and truncated to the model's
        length (keeping the end-of-text token the text tower pools at)."""
        return self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def embeddings(self, images: Tensor, captions: Sequence[str]) -> Tuple[Tensor, Tensor]:
        """(image embeddings, text embeddings), float32 [N, projection_dim] each, of one batch."""
        tokens = self.tokens(captions).to(self.device)
        image = self.model.get_image_features(pixel_values=self.pixel_values(images).to(self.device))
        text = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        # transformers 5 returns a model output whose pooler_output is the projection; 4.x the tensor
        return tuple(x if isinstance(x, Tensor) else x.pooler_output for x in (image, text))

    def score(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Per-image CLIP score, float64 [N] on the CPU: 100 * max(cos, 0), the cosine in float64."""
        captions = _check_captions(captions)
        if isinstance(images, Tensor) and images.dim() >= 1 and images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions: one caption per image")
        out: List[Tensor] = []
        for start in range(0, len(captions), self.batch_size):
            stop = start + self.batch_size
            image, text = (x.to("cpu", torch.float64) for x in self.embeddings(images[start:stop],
                                                                              captions[start:stop]))
            image = image / image.norm(dim=-1, keepdim=True)
            text = text / text.norm(dim=-1, keepdim=True)
            out.append(100 * (image * text).sum(dim=-1).clamp(min=0))
        return torch.cat(out)


def _check_captions(captions) -> List[str]:
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
    for n, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {n} must be a string, got {type(caption).__name__}")
    if not captions:
        raise ValueError("no captions (and so no images) to score")
    return list(captions)


def clip_score(scorer: ClipScorer, images: Tensor, captions: Sequence[str]) -> float:
    """The mean of ``scorer.score(images, captions)``: the corpus CLIP-S (Hessel et al. 2021, w = 100)."""
    return float(scorer.score(images, captions).mean())
