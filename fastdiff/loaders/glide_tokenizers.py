"""GLIDE's two tokenizers, read from local files (plain or gzipped).

- ``GlideTokenizer``: the U-Nets' text tokenizer, GPT-2's byte-level BPE (``encoder.json`` +
  ``vocab.bpe``) over the lower-cased prompt; padded with the end token (the last id) plus a
  mask of the real tokens.
- ``ClipTokenizer``: the noised CLIP's tokenizer, CLIP's BPE with end-of-word markers
  (``bpe_simple_vocab_16e6.txt``), its vocabulary derived from the merges as CLIP derives it;
  start/end tokens, padded with 0, plus the length.

Both give exactly the reference implementations' ids. The BPE is a short merge loop with a
per-word cache, which is plenty for prompts.
"""
from __future__ import annotations

import gzip
import html
import json
import os
import zlib
from functools import lru_cache
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import regex
import torch
from torch import Tensor

Merge = Tuple[str, str]

# GPT-2's pre-tokenizer; glide keeps it as is (case-sensitive contractions) and lower-cases first.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# CLIP's pre-tokenizer: special tokens kept whole, digits one by one, no leading spaces.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
# CLIP's 49408 ids = 256 bytes + 256 word-final bytes + 48894 merges + 2 specials: the merge count is
# part of the vocabulary's definition, whatever the file holds beyond it.
CLIP_MAX_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
UNRANKED = float("inf")


@lru_cache(maxsize=1)
def byte_symbols() -> Dict[int, str]:
    """GPT-2's reversible table from bytes to printable characters.

    Printable Latin-1 bytes stand for themselves; the others (space, controls, ...) move to code
    points 256 and up, so BPE never sees whitespace. The insertion order matters: CLIP numbers its
    first 256 ids in this order (printable bytes first), not by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate([b for b in range(256) if b not in table]):
        table[b] = chr(256 + n)
    return table


def merge_symbols(word: Sequence[str], ranks: Mapping[Merge, int]) -> Tuple[str, ...]:
    """Apply BPE merges to one word: repeatedly join every non-overlapping occurrence (left to
    right) of the adjacent pair with the lowest rank, until no adjacent pair has a rank."""
    symbols = list(word)
    while len(symbols) > 1:
        _, first, second = min((ranks.get(pair, UNRANKED), *pair) for pair in zip(symbols, symbols[1:]))
        if (first, second) not in ranks:
            break
        joined: List[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                joined.append(first + second)
                i += 2
            else:
                joined.append(symbols[i])
                i += 1
        symbols = joined
    return tuple(symbols)


def read_text(path: str) -> str:
    """A UTF-8 text file, gunzipped when it is gzip (told by its magic bytes, not its name)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: corrupt or truncated ({exc})") from None


def parse_merges(lines: Sequence[str], path: str) -> List[Merge]:
    """Merge lines ("a b") in rank order; blank lines are skipped, anything else is corruption."""
    merges: List[Merge] = []
    for number, line in enumerate(lines, start=2):  # line 1 is the header
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{path} is corrupt: line {number} should hold one merge 'a b', got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def find_file(folder: str, name: str) -> Optional[str]:
    """`name` or `name`.gz inside `folder`, whichever exists first."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def require_files(folder: str | os.PathLike, names: Sequence[str]) -> List[str]:
    """The paths of `names` (each plain or .gz) in `folder`; one error naming every file not found."""
    folder = os.fspath(folder)
    found = [find_file(folder, name) for name in names]
    missing = [name for name, path in zip(names, found) if path is None]
    if missing:
        looked = "; ".join(f"{os.path.join(folder, n)} or {os.path.join(folder, n)}.gz" for n in missing)
        raise FileNotFoundError(f"tokenizer file(s) not found: looked for {looked}")
    return [p for p in found if p is not None]


def _as_list(prompts: Sequence[str] | str) -> List[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _bytes_to_text(symbols: str) -> str:
    reverse = {s: b for b, s in byte_symbols().items()}
    return bytes(reverse[c] for c in symbols).decode("utf-8", errors="replace")


class GlideTokenizer:
    """GLIDE's text tokenizer: GPT-2's byte-level BPE over the lower-cased prompt."""

    def __init__(self, encoder: Mapping[str, int], merges: Sequence[Merge], source: str = "the GLIDE vocabulary"):
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.source = source
        self._cache: Dict[str, Tuple[str, ...]] = {}
        absent = [s for s in byte_symbols().values() if s not in self.encoder]
        if absent:
            raise ValueError(f"{source} lacks {len(absent)} of the 256 byte symbols (e.g. {absent[:3]}): "
                             f"not a byte-level BPE vocabulary")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "GlideTokenizer":
        """From encoder.json(.gz) and vocab.bpe(.gz) in `folder`, as glide-text2im ships them."""
        encoder_path, bpe_path = require_files(folder, ("encoder.json", "vocab.bpe"))
        return cls.from_files(encoder_path, bpe_path)

    @classmethod
    def from_files(cls, encoder_path: str | os.PathLike, bpe_path: str | os.PathLike) -> "GlideTokenizer":
        """From an encoder.json and a vocab.bpe file (either may be gzipped)."""
        encoder_path, bpe_path = os.fspath(encoder_path), os.fspath(bpe_path)
        missing = [p for p in (encoder_path, bpe_path) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"tokenizer file(s) not found: {', '.join(missing)}")
        try:
            encoder = json.loads(read_text(encoder_path))
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot read {encoder_path}: not valid JSON ({exc})") from None
        if not isinstance(encoder, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in encoder.items()):
            raise ValueError(f"{encoder_path} is corrupt: expected a JSON object of token -> integer id")
        # glide (like GPT-2 and transformers) drops the header line and whatever follows the last newline.
        merges = parse_merges(read_text(bpe_path).split("\n")[1:-1], bpe_path)
        return cls(encoder, merges, source=f"{encoder_path} / {bpe_path}")

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    @property
    def end_token(self) -> int:
        return self.n_vocab - 1  # GLIDE pads with the last id (GPT-2's <|endoftext|>)

    def _word(self, piece: str) -> Tuple[str, ...]:
        word = self._cache.get(piece)
        if word is None:
            table = byte_symbols()
            word = merge_symbols([table[b] for b in piece.encode("utf-8")], self.ranks)
            self._cache[piece] = word
        return word

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for piece in GPT2_PATTERN.findall(text.lower()):
            for symbol in self._word(piece):
                if symbol not in self.encoder:
                    raise ValueError(f"BPE symbol {symbol!r} (from {piece!r}) is not in {self.source}: "
                                     f"the vocabulary and the merges do not belong together")
                ids.append(self.encoder[symbol])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        unknown = [int(i) for i in ids if int(i) not in self.decoder]
        if unknown:
            raise ValueError(f"token ids not in the vocabulary: {unknown[:5]}")
        return _bytes_to_text("".join(self.decoder[int(i)] for i in ids))

    def padded_tokens_and_mask(self, tokens: Sequence[int], text_ctx: int) -> Tuple[List[int], List[bool]]:
        """Truncate to `text_ctx`, pad with the end token; the mask is True on real tokens."""
        tokens = list(tokens)[:text_ctx]
        padding = text_ctx - len(tokens)
        return tokens + [self.end_token] * padding, [True] * len(tokens) + [False] * padding

    def __call__(self, prompts: Sequence[str] | str, text_ctx: int) -> Tuple[Tensor, Tensor]:
        """tokens LongTensor [B, text_ctx] and mask BoolTensor [B, text_ctx]."""
        rows = [self.padded_tokens_and_mask(self.encode(p), text_ctx) for p in _as_list(prompts)]
        tokens = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), text_ctx)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool).reshape(len(rows), text_ctx)
        return tokens, mask


def _load_fix_text() -> Optional[Callable[[str], str]]:
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy.fix_text


class ClipTokenizer:
    """GLIDE's CLIP tokenizer (CLIP's SimpleTokenizer).

    Cleaning: ftfy.fix_text when ftfy is installed; it is not a fastdiff dependency, and without
    it the step is skipped, which changes only text ftfy would repair (mojibake, odd quotes and
    the like). Then HTML unescaping twice, whitespace collapsed, lower-cased."""

    def __init__(self, merges: Sequence[Merge], source: str = "the CLIP vocabulary"):
        merges = list(merges)[:CLIP_MAX_MERGES]
        chars = list(byte_symbols().values())
        vocab = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [CLIP_START, CLIP_END]
        # dict(zip(...)) as CLIP builds it: a repeated string keeps its last id.
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.source = source
        self._cache: Dict[str, Tuple[str, ...]] = {CLIP_START: (CLIP_START,), CLIP_END: (CLIP_END,)}
        self._fix_text = _load_fix_text()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ClipTokenizer":
        """From bpe_simple_vocab_16e6.txt or its .gz (told apart by content): a header, then merges."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP BPE file not found: {path}")
        # CLIP reads the released file up to CLIP_MAX_MERGES lines, never reaching its trailing newline;
        # skipping blank lines makes shorter files behave the same (and as transformers reads them).
        return cls(parse_merges(read_text(path).split("\n")[1:CLIP_MAX_MERGES + 1], path), source=path)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ClipTokenizer":
        """From bpe_simple_vocab_16e6.txt(.gz) in `folder`."""
        (path,) = require_files(folder, ("bpe_simple_vocab_16e6.txt",))
        return cls.from_file(path)

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    @property
    def start_token(self) -> int:
        return self.encoder[CLIP_START]

    @property
    def end_token(self) -> int:
        return self.encoder[CLIP_END]

    def clean(self, text: str) -> str:
        if self._fix_text is not None:
            text = self._fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def _word(self, piece: str) -> Tuple[str, ...]:
        word = self._cache.get(piece)
        if word is None:
            table = byte_symbols()
            symbols = [table[b] for b in piece.encode("utf-8")]
            symbols[-1] += END_OF_WORD  # CLIP marks the last symbol of every word
            word = merge_symbols(symbols, self.ranks)
            self._cache[piece] = word
        return word

    def encode(self, text: str) -> List[int]:
        return [self.encoder[s] for piece in CLIP_PATTERN.findall(self.clean(text)) for s in self._word(piece)]

    def decode(self, ids: Sequence[int]) -> str:
        unknown = [int(i) for i in ids if int(i) not in self.decoder]
        if unknown:
            raise ValueError(f"token ids not in the vocabulary: {unknown[:5]}")
        return _bytes_to_text("".join(self.decoder[int(i)] for i in ids)).replace(END_OF_WORD, " ")

    def padded_tokens_and_len(self, tokens: Sequence[int], text_ctx: int) -> Tuple[List[int], int]:
        """start + tokens[:text_ctx - 2] + end, padded with 0 to `text_ctx`; and the unpadded length."""
        if text_ctx < 2:
            raise ValueError(f"text_ctx must leave room for the start and end tokens, got {text_ctx}")
        tokens = [self.start_token, *list(tokens)[:text_ctx - 2], self.end_token]
        return tokens + [0] * (text_ctx - len(tokens)), len(tokens)

    def __call__(self, prompts: Sequence[str] | str, text_ctx: int) -> Tuple[Tensor, Tensor]:
        """tokens LongTensor [B, text_ctx] and lengths LongTensor [B]."""
        rows = [self.padded_tokens_and_len(self.encode(p), text_ctx) for p in _as_list(prompts)]
        tokens = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), text_ctx)
        return tokens, torch.tensor([r[1] for r in rows], dtype=torch.long)
