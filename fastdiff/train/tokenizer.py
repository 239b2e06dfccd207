"""A CLIP-format BPE tokenizer learned locally from the training captions.

The normaliser and pre-tokeniser are the ones transformers' CLIPTokenizer applies (NFC,
whitespace collapse, lower case; CLIP's word regex, then byte-level), so the trainer
sees the same words as inference. Merges come from the `tokenizers` library's BPE
trainer with CLIP's "</w>" end-of-word suffix and no frequency floor, so it merges
until every caption word is one token. The vocabulary is laid out as CLIP's: all 256
byte symbols, the same with "</w>", the merges in order, then <|startoftext|> and
<|endoftext|>; any text still tokenises (unknown words split into pieces).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Sequence

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
# transformers' CLIPTokenizer word pattern (contractions, letter runs, single digits, other runs)
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _clip_pipeline(model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


def learn_merges(texts: Iterable[str], max_merges: int) -> List[List[str]]:
    """BPE merges over the texts' words, most frequent pair first, until each word is one symbol."""
    tok = _clip_pipeline(models.BPE(end_of_word_suffix=SUFFIX, continuing_subword_prefix=""))
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
    """Learn a CLIP BPE tokenizer from `texts`, save it in `folder`, return transformers' CLIPTokenizer of it."""
    from transformers import CLIPTokenizer

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
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    # transformers 5 reads a folder through tokenizer.json first; write it from the loaded tokenizer
    tokenizer.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return load_tokenizer(folder)


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def words_of(texts: Iterable[str]) -> List[str]:
    """The distinct words (as CLIP splits and lower-cases them) of `texts`, sorted."""
    tok = _clip_pipeline(models.BPE())
    words = set()
    for text in texts:
        normal = tok.normalizer.normalize_str(text)
        words.update(piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(normal))
    return sorted(words)
