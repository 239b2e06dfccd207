"""Small GLIDE checkpoints and tokenizer files, in the released formats, built in a temp folder.

Checkpoints come from glide_reference.random_glide_state_dict (GLIDE's own key layout,
derived from the options independently of fastdiff's model) and are saved with
torch.save, as the released base.pt / upsample.pt are. The tokenizer is a byte-level
BPE trained on a few captions and written as GPT-2's encoder.json + vocab.bpe.
"""
from __future__ import annotations

import json
import os
from typing import Dict

import torch

import glide_reference as R

TEXT_CTX = 8
CAPTIONS = [
    "a red circle above a blue square", "an oil painting of a corgi", "a corgi in a field",
    "a green triangle to the left of a yellow circle", "a photo of a cat, 4k", "two dogs playing!",
]


def write_glide_tokenizer(folder: str, vocab_size: int = 320) -> int:
    """encoder.json + vocab.bpe (GPT-2 format, '#version: 0.2' header) in `folder`; returns n_vocab.
    As in GLIDE's files, the last id is the end token."""
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(folder, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CAPTIONS * 4, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    bpe.save_model(folder)
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as fh:
        vocab = json.load(fh)
    vocab = {token: i for i, token in enumerate(sorted(vocab, key=vocab.get))}
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "encoder.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh)
    os.replace(os.path.join(folder, "merges.txt"), os.path.join(folder, "vocab.bpe"))
    os.remove(os.path.join(folder, "vocab.json"))
    return len(vocab)


def tiny_options(upsampler: bool = False, inpaint: bool = False, small: bool = True) -> dict:
    """GLIDE options for fast CPU tests: 16 px base / 32 px upsampler (small=True), or the
    real 64 / 256 px sizes with tiny widths (small=False)."""
    overrides = dict(num_channels=32, num_res_blocks=1, num_head_channels=16, text_ctx=TEXT_CTX, xf_width=32,
                     xf_layers=1, xf_heads=2, use_fp16=False, inpaint=inpaint)
    if small:
        overrides.update(image_size=32 if upsampler else 16, channel_mult="1,1,2" if upsampler else "1,2",
                         attention_resolutions="8" if upsampler else "16,8")
    else:
        overrides.update(attention_resolutions="16,8")
    return R.glide_options(upsampler=upsampler, **overrides)


def write_checkpoint(path: str, options: dict, n_vocab: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    state = R.random_glide_state_dict(options, seed=seed, n_vocab=n_vocab)
    torch.save(state, path)
    return state



def sample_terms(model, calls: int, gain: float = 1.0) -> float:
    """tests/tolerances.py `terms` of a sample after `calls` calls of fastdiff's ADM U-Net
    `model` (text encoder included), whose differences guidance amplifies by `gain`
    (tolerances.guidance_gain); the step arithmetic adds ~10 a step."""
    from tolerances import reduction_terms

    size = model.image_size
    x, t = torch.zeros(2, 3, size, size), torch.tensor([0, 1])
    tokens, mask = torch.zeros(2, model.text_ctx, dtype=torch.long), torch.ones(2, model.text_ctx, dtype=torch.bool)
    extra = {}
    if model.super_res:
        extra["low_res"] = torch.zeros(2, 3, size // 4, size // 4)
    if model.inpaint:
        extra.update(inpaint_image=torch.zeros(2, 3, size, size), inpaint_mask=torch.ones(2, 1, size, size))
    per_call = reduction_terms(model, lambda: model(x, t, tokens=tokens, mask=mask, **extra))
    return gain ** 2 * calls * (per_call + 10)


def base_capture():
    """(seen, callback): a generate() callback keeping the base stage's final sample exactly
    (in [-1, 1]) as seen["x"]."""
    seen = {}

    def callback(info):
        if info.stage == "base":
            seen["x"] = info.x
    return seen, callback
