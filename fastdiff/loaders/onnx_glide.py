"""A GLIDE folder written by ``fastdiff.export.onnx`` (fastdiff/export/glide.py) as the
components of GlidePipeline, its networks in ONNX Runtime.

``OnnxText2ImUNet`` stands in for ``Text2ImUNet`` inside GlidePipeline.generate: the same
attributes (image_size, text_ctx, inpaint, super_res, options, xf_width, n_vocab),
``encode_text(tokens, mask) -> TextContext`` on the text encoder graph and
``model(x, t, text, low_res=..., inpaint_image=..., inpaint_mask=...)`` on the U-Net graph,
so GLIDE's sampling loop, classifier-free batching and fused guided_step run unchanged.
The checks the graphs leave out (token ids in the vocabulary, one text conditioning per
sample) are made here, before a graph runs.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from ..models.adm_unet import TextContext, glide_options
from .glide_tokenizers import GlideTokenizer
from .onnx_folder import _config, _Graph, check_providers, graph_files, read_manifest

FAMILY = "GlidePipeline"
STAGES = ("", "upsampler_")  # graph name prefixes: the base model, the upsampler


class OnnxText2ImUNet:
    """One GLIDE model (base or upsampler) on its text encoder and U-Net graphs."""

    def __init__(self, text_encoder: _Graph, unet: _Graph):
        self.text_encoder, self.unet = text_encoder, unet
        unet_config = os.path.join(os.path.dirname(unet.file), "config.json")
        try:
            self.options = glide_options(**unet.config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{unet_config}: not GLIDE options ({exc})") from None
        o = self.options
        self.image_size, self.text_ctx, self.xf_width = int(o["image_size"]), int(o["text_ctx"]), int(o["xf_width"])
        self.super_res, self.inpaint = bool(o["super_res"]), bool(o["inpaint"])
        self.n_vocab = int(text_encoder.config.get("n_vocab", 0))
        self.text_names = list(text_encoder.outputs)
        wanted = ["sample", "timestep"] + self.text_names + (["low_res"] if self.super_res else []) \
            + (["inpaint_image", "inpaint_mask"] if self.inpaint else [])
        if list(unet.inputs) != wanted:
            raise ValueError(f"{unet.file}: its inputs {list(unet.inputs)} do not fit {text_encoder.file}'s outputs "
                             f"and {unet_config} (super_res={self.super_res}, inpaint={self.inpaint}): {wanted}")

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def encode_text(self, tokens: Tensor, mask: Optional[Tensor] = None) -> TextContext:
        """tokens [B, text_ctx] and mask [B, text_ctx] (True for real tokens) -> TextContext."""
        if tokens.dim() != 2 or tokens.shape[1] != self.text_ctx:
            raise ValueError(f"tokens must be [B, text_ctx={self.text_ctx}], got {tuple(tokens.shape)}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.n_vocab:
            raise ValueError(f"token ids must lie in [0, {self.n_vocab}) for this model's vocabulary")
        mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
        outs = self.text_encoder.run(tokens=tokens, mask=mask.to(torch.bool))
        kv = tuple((outs[i], outs[i + 1]) for i in range(1, len(outs), 2))
        return TextContext(outs[0], kv)

    def __call__(self, x: Tensor, timesteps, text: TextContext, *, low_res: Optional[Tensor] = None,
                 inpaint_image: Optional[Tensor] = None, inpaint_mask: Optional[Tensor] = None) -> Tensor:
        """[B, 6, H, W]: eps and the learned-range variance, as Text2ImUNet.forward."""
        t = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        if len(text) != x.shape[0]:
            raise ValueError(f"text conditioning for {len(text)} samples, x has {x.shape[0]}")
        feeds: Dict[str, Tensor] = dict(sample=x, timestep=t)
        feeds.update(zip(self.text_names, [text.xf_proj] + [u for pair in text.kv for u in pair]))
        if self.super_res:
            if low_res is None:
                raise ValueError("the super-resolution model needs low_res, the image to upsample")
            feeds["low_res"] = low_res
        if self.inpaint:
            feeds["inpaint_image"] = torch.zeros_like(x) if inpaint_image is None else inpaint_image
            feeds["inpaint_mask"] = torch.zeros_like(x[:, :1]) if inpaint_mask is None else inpaint_mask
        out, = self.unet.run(**feeds)
        return out.to(x.device, x.dtype)

    def check_call(self, images: int, unet_batch: int) -> None:
        """ValueError, before any work, when a static export cannot take a call of `images`
        prompts (the text encoder's batch) whose U-Net runs on `unet_batch` samples."""
        self.text_encoder.check_shape("tokens", (images, self.text_ctx), f"{images} prompts per text encoder call")
        self.unet.check_shape("sample", (unet_batch, 3, self.image_size, self.image_size),
                              f"{unet_batch} samples per U-Net call, the guided batch twice the images")


def load_glide(path: str, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Dict[str, Any]:
    """The keyword arguments of the ONNX GLIDE pipeline (base, upsampler, tokenizer, clip),
    read from `path`. Errors name the file."""
    path = os.fspath(path)
    manifest = read_manifest(path, FAMILY, ("text_encoder", "unet"))
    stages = STAGES if manifest.get("upsampler") else STAGES[:1]
    read_manifest(path, FAMILY, [f"{p}{g}" for p in stages for g in ("text_encoder", "unet")])
    check_providers(path, manifest, providers)
    files = graph_files(path, manifest)

    def graph(name: str) -> _Graph:
        file, record = files[name]
        return _Graph(file, providers, _config(path, name), record)

    models = [OnnxText2ImUNet(graph(f"{p}text_encoder"), graph(f"{p}unet")) for p in stages]
    return dict(base=models[0], upsampler=models[1] if len(models) > 1 else None,
                tokenizer=GlideTokenizer.from_folder(os.path.join(path, "tokenizer")), clip=None)
