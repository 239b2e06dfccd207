"""A CLIP-format BPE tokenizer learned locally from the training captions.

The normaliser and pre-tokeniser are the ones transformers' CLIPTokenizer applies (NFC,
whitespace collapse, lower case; CLIP's word regex, then byte-level), taken from
fastdiff.loaders.clip_tokenizer, the inference tokenizer the trainer also encodes with, so
it sees the same words and ids as inference. Merges come from the `tokenizers` library's BPE
trainer with CLIP's "</w>" end-of-word suffix and no frequency floor, so it merges
until every caption word is one token. The vocabulary is laid out as CLIP's: all 256
byte symbols, the same with "</w>", the merges in order, then <|startoftext|> and
<|endoftext|>; any text still tokenises (unknown words split into pieces).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Sequence

from tokenizers import models, pre_tokenizers, trainers

from ..loaders.clip_tokenizer import BOS, EOS, SUFFIX, CLIPTokenizer, clip_backend


def learn_merges(texts: Iterable[str], max_merges: int) -> List[List[str]]:
    """BPE merges over the texts' words, most frequent pair first, until each word is one symbol."""
    tok = clip_backend(models.BPE(end_of_word_suffix=SUFFIX, continuing_subword_prefix=""))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + max_merges, min_frequency=0,
                                  initial_alphabet=alphabet, end_of_word_suffix=SUFFIX, show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m.split(" ") if isinstance(m, str) else list(m) for m in merges][:max_merges]


def clip_vocab(merges: Sequence[Sequence[str]]) -> dict:
    """CLIP's layout: byte symbols, byte symbols + "</w>", merged symbols, then the two specials."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = symbols + [s + SUFFIX for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def build_tokenizer(texts: Iterable[str], folder: str, max_length: int, max_vocab: int = 16384):
    """Learn a CLIP BPE tokenizer from `texts`, save it in `folder`, return fastdiff's CLIPTokenizer of it."""
    max_merges = max(0, max_vocab - 2 * len(pre_tokenizers.ByteLevel.alphabet()) - 2)
    merges = learn_merges(texts, max_merges)
    vocab = clip_vocab(merges)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, fh, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
                   "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, "do_lower_case": True,
                   "clean_up_tokenization_spaces": False}, fh, indent=2)
    # what transformers 5 reads a folder through first, and what the exported folder ships
    CLIPTokenizer.from_folder(folder).backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return load_tokenizer(folder)


def load_tokenizer(folder: str) -> CLIPTokenizer:
    """fastdiff's CLIP tokenizer of the folder (the pipeline's own, so training sees its ids)."""
    return CLIPTokenizer.from_folder(folder)


def words_of(texts: Iterable[str]) -> List[str]:
    """The distinct words (as CLIP splits and lower-cases them) of `texts`, sorted."""
    tok = clip_backend(models.BPE())
    words = set()
    for text in texts:
        normal = tok.normalizer.normalize_str(text)
        words.update(piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(normal))
    return sorted(words)
