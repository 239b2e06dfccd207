"""CLIP's tokenizer on the `tokenizers` library alone: the ids, masks and files transformers'
CLIPTokenizer gives for the same folder, without importing transformers (~0.85 s of start-up).

The backend is built as transformers 5 builds CLIPTokenizer's: a BPE with CLIP's "</w>"
end-of-word suffix over the folder's vocabulary and merges (tokenizer.json, else vocab.json +
merges.txt), NFC + whitespace collapse + lower case, CLIP's word regex, byte-level symbols;
bos/eos around each prompt. Only the vocabulary and merges are read from a tokenizer.json:
its normaliser, pre-tokeniser and post-processor are CLIP's whatever the file says, as in
transformers. The special and added tokens are read as transformers reads them (see
``read_special_tokens``) and added to the backend in the same order with the same flags, so
special tokens typed in a prompt ("<|endoftext|>", or SD 2.x's pad token "!") split it the same
way. Truncation keeps bos and eos; padding is on the right unless the folder says otherwise.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .clip_tokenizer_files import NAMED, read_json, read_special_tokens, read_vocab_and_merges

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
# transformers' CLIPTokenizer word pattern (contractions, letter runs, single digits, other runs)
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIPTokenizer's defaults for a folder that does not name them
DEFAULT_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
PADDING = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
TRUNCATION = {None: None, False: None, "do_not_truncate": None, True: "longest_first",
              "longest_first": "longest_first", "only_first": "longest_first"}
TokenLike = Union[str, AddedToken]
# transformers' LARGE_INTEGER: a saved model_max_length above it (their 1e30 default) means none
NO_LENGTH = int(1e20)


def clip_backend(model) -> Tokenizer:
    """A `tokenizers.Tokenizer` over `model` with CLIP's normaliser, pre-tokeniser and decoder."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


class BPEError(ValueError):
    """The vocabulary and merges do not make a BPE (a merge of symbols the vocabulary lacks)."""


class TokenBatch(dict):
    """The tokenizer's output: {"input_ids", "attention_mask"}, also as attributes (as transformers' BatchEncoding)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no {key!r} in this batch (it holds {', '.join(self)})") from None

    def to(self, device) -> "TokenBatch":
        return TokenBatch({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class CLIPTokenizer:
    """CLIP's BPE tokenizer: ``tok(texts, padding="max_length", max_length=77, truncation=True,
    return_tensors="pt")`` -> TokenBatch of int64 input_ids and attention_mask, equal to
    transformers' CLIPTokenizer for the same vocabulary, merges and special tokens.

    ``CLIPTokenizer.from_folder(path)`` reads a saved tokenizer folder. A folder whose
    tokenizer_config.json gives no ``model_max_length`` is an error naming the file unless
    ``model_max_length=`` is passed (transformers would give 1e30, which no pipeline can
    embed; CLIP's own is 77, but a text encoder's position count is the model's, so it is
    not guessed)."""

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], *, model_max_length: int,
                 special_tokens: Optional[Dict[str, Optional[TokenLike]]] = None,
                 added_tokens: Sequence[AddedToken] = (), extra_special_tokens: Sequence[TokenLike] = (),
                 padding_side: str = "right", truncation_side: str = "right", split_special_tokens: bool = False,
                 name_or_path: str = ""):
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
            raise ValueError(f"model_max_length must be a positive integer, got {model_max_length!r}")
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("right", "left"):
                raise ValueError(f"{name} must be 'right' or 'left', got {side!r}")
        self.model_max_length, self.name_or_path = model_max_length, name_or_path
        self.padding_side, self.truncation_side = padding_side, truncation_side
        given = {**DEFAULT_TOKENS, **(special_tokens or {})}
        # transformers' order (the standard names, then model-specific ones) decides the added tokens' order
        named = {k: given[k] for k in NAMED if k in given}
        named.update({k: v for k, v in given.items() if k not in NAMED})
        for name in ("bos_token", "eos_token"):
            if named.get(name) is None:
                raise ValueError(f"a CLIP tokenizer needs a {name}, got None")
        self._named, self._extras = named, list(extra_special_tokens)
        # transformers 5's CLIPTokenizer.__init__: the BPE (unk_token as a string), then the added tokens
        try:
            model = BPE(vocab=vocab, merges=list(merges), dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix=SUFFIX, fuse_unk=False, unk_token=str(named["unk_token"]))
        except Exception as exc:  # the Rust builder's error: a merge of unknown symbols, a bad id
            raise BPEError(str(exc).splitlines()[0].replace("Error while initializing BPE: ", "")) from None
        self._tokenizer = clip_backend(model)
        self._tokenizer.add_tokens(_tokens_to_add(named, added_tokens, self._extras))
        self._tokenizer.encode_special_tokens = bool(split_special_tokens)
        self._bos, self._eos = self.bos_token_id, self.eos_token_id
        if self._bos is None or self._eos is None:
            raise ValueError(f"the bos token {str(named['bos_token'])!r} and eos token {str(named['eos_token'])!r} "
                             "must be in the vocabulary (and the unk token too, for an unknown one)")
        self._tokenizer.post_processor = processors.RobertaProcessing(
            (str(named["eos_token"]), self._eos), (str(named["bos_token"]), self._bos), False, False)

    @classmethod
    def from_folder(cls, path: Union[str, "os.PathLike[str]"], *, model_max_length: Optional[int] = None
                    ) -> "CLIPTokenizer":
        """A saved CLIP tokenizer folder: tokenizer.json, or vocab.json + merges.txt (older saves),
        with tokenizer_config.json / special_tokens_map.json. model_max_length: used where
        tokenizer_config.json gives none (see the class docstring)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder not found: {path}")
        config_file = os.path.join(path, "tokenizer_config.json")
        config = read_json(config_file) if os.path.isfile(config_file) else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object, got a JSON {type(config).__name__}")
        tokenizer_file = os.path.join(path, "tokenizer.json")
        serialized = read_json(tokenizer_file) if os.path.isfile(tokenizer_file) else None
        if serialized is not None and not isinstance(serialized, dict):
            raise ValueError(f"{tokenizer_file} must hold a JSON object, got a JSON {type(serialized).__name__}")
        vocab, merges, source = read_vocab_and_merges(path, serialized)
        special, added, extras = read_special_tokens(path, config, serialized)
        length = config.get("model_max_length", config.get("max_len"))
        if length is None or (isinstance(length, (int, float)) and length > NO_LENGTH):
            if model_max_length is None:
                where = config_file if os.path.isfile(config_file) else f"{path} has no tokenizer_config.json: it"
                raise ValueError(f"{where} gives no model_max_length (the text encoder's position count, 77 "
                                 "for CLIP's; transformers' 1e30 for 'none' counts as none): add it or pass "
                                 "model_max_length=")
            length = model_max_length
        try:
            return cls(vocab, merges, model_max_length=length, special_tokens=special, added_tokens=added,
                       extra_special_tokens=extras, padding_side=config.get("padding_side", "right"),
                       truncation_side=config.get("truncation_side", "right"),
                       split_special_tokens=config.get("split_special_tokens", False), name_or_path=path)
        except BPEError as exc:
            raise ValueError(f"{source}: the merges do not fit the vocabulary ({exc})") from None
        except ValueError as exc:  # a setting of the wrong kind
            raise ValueError(f"{config_file if config else path}: {exc}") from None

    # ------------------------------------------------------------------ the vocabulary

    def _token(self, name: str) -> Optional[str]:
        value = self._named.get(name)
        return None if value is None else str(value)

    def _id(self, name: str) -> Optional[int]:
        token = self._token(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token = property(lambda self: self._token("bos_token"))
    eos_token = property(lambda self: self._token("eos_token"))
    unk_token = property(lambda self: self._token("unk_token"))
    pad_token = property(lambda self: self._token("pad_token"))
    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))

    @property
    def vocab_size(self) -> int:
        """The BPE vocabulary's size, without added tokens (as transformers)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> Dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]):
        """A token's id (the unk token's for one not in the vocabulary); a list for a list."""
        if isinstance(tokens, str):
            found = self._tokenizer.token_to_id(tokens)
            if found is None and self._token("unk_token") is not None:
                found = self._tokenizer.token_to_id(self._token("unk_token"))
            return found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        return self._tokenizer.id_to_token(int(ids)) if isinstance(ids, int) else [
            self._tokenizer.id_to_token(int(i)) for i in ids]

    def tokenize(self, text: str) -> List[str]:
        """The prompt's tokens, without bos/eos."""
        return self._tokenizer.encode(_check_texts(text)[0], add_special_tokens=False).tokens

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text from ids, the end-of-word marks read as spaces (as transformers' CLIPTokenizer)."""
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).replace(SUFFIX, " ").strip()

    def __repr__(self) -> str:
        return (f"fastdiff CLIPTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r})")

    # ------------------------------------------------------------------ encoding

    def __call__(self, text, *, padding: Union[bool, str] = False, truncation: Union[bool, str, None] = None,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = None,
                 add_special_tokens: bool = True, return_attention_mask: bool = True,
                 pad_to_multiple_of: Optional[int] = None, padding_side: Optional[str] = None) -> TokenBatch:
        """One prompt or a list of prompts -> TokenBatch(input_ids, attention_mask), with
        transformers' rules: padding False / True / "longest" / "max_length", truncation to
        max_length (model_max_length when not given; a max_length alone truncates) keeping
        bos and eos, return_tensors None (lists; one prompt unbatched), "pt" or "np" (int64).
        Unlike transformers, a max_length too short to hold bos and eos is an error (transformers
        then quietly does not truncate), and so is an empty list of prompts."""
        texts = _check_texts(text)
        batched = not isinstance(text, str)
        pad_mode, truncate, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
        specials = 2 if add_special_tokens else 0
        if truncate and max_length < specials:
            raise ValueError(f"max_length={max_length} leaves no room for the bos and eos tokens")
        ids = []
        for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            tokens = encoding.ids
            if truncate and len(tokens) > max_length - specials:
                keep = max_length - specials
                tokens = tokens[:keep] if self.truncation_side == "right" else tokens[len(tokens) - keep:]
            ids.append([self._bos, *tokens, self._eos] if add_special_tokens else list(tokens))
        masks = [[1] * len(row) for row in ids]
        if pad_mode is not None:
            ids, masks = self._pad(ids, masks, pad_mode, max_length, pad_to_multiple_of, side)
        out = {"input_ids": ids, "attention_mask": masks} if return_attention_mask else {"input_ids": ids}
        if return_tensors is None:
            return TokenBatch({k: v if batched else v[0] for k, v in out.items()})
        return TokenBatch({k: _as_tensor(v, return_tensors) for k, v in out.items()})

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of):
        """(padding mode, truncate?, max_length) as transformers' _get_padding_truncation_strategies decides them."""
        if padding not in PADDING:
            raise ValueError(f"padding must be False, True, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be True, False, None, 'longest_first', 'only_first' or "
                             f"'do_not_truncate', got {truncation!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 0):
            raise ValueError(f"max_length must be a non-negative integer or None, got {max_length!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # a max_length alone truncates (transformers' backward compatibility)
        pad_mode, truncate = PADDING[padding], TRUNCATION[truncation] is not None
        if max_length is None and (pad_mode == "max_length" or truncate):
            max_length = self.model_max_length
        if pad_mode is not None and self.pad_token_id is None:
            raise ValueError("asked to pad, but this tokenizer has no pad token")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                               or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
        if truncate and pad_mode is not None and pad_to_multiple_of and max_length % pad_to_multiple_of:
            raise ValueError(f"truncation length ({max_length}) is not a multiple of pad_to_multiple_of "
                             f"({pad_to_multiple_of})")
        return pad_mode, truncate, max_length

    def _pad(self, ids, masks, mode, max_length, multiple, side):
        length = max_length if mode == "max_length" else max((len(row) for row in ids), default=0)
        if multiple and length % multiple:
            length += multiple - length % multiple
        pad = self.pad_token_id
        padded_ids, padded_masks = [], []
        for row, mask in zip(ids, masks):
            n = max(0, length - len(row))
            if side == "right":
                padded_ids.append(row + [pad] * n)
                padded_masks.append(mask + [0] * n)
            else:
                padded_ids.append([pad] * n + row)
                padded_masks.append([0] * n + mask)
        return padded_ids, padded_masks

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, folder: Union[str, "os.PathLike[str]"]) -> Tuple[str, str]:
        """tokenizer.json (the backend: BPE vocabulary and merges, added tokens, CLIP's pipeline)
        and tokenizer_config.json, as transformers 5 saves a CLIPTokenizer; both transformers
        and ``from_folder`` read the folder back to the same ids."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        self._tokenizer.save(tokenizer_file)
        config: Dict[str, Any] = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                                  "do_lower_case": True, "clean_up_tokenization_spaces": False}
        config.update({name: None if value is None else str(value) for name, value in self._named.items()})
        if self._extras:
            config["extra_special_tokens"] = [str(t) for t in self._extras]
        if self.padding_side != "right":
            config["padding_side"] = self.padding_side
        if self.truncation_side != "right":
            config["truncation_side"] = self.truncation_side
        if self._tokenizer.encode_special_tokens:
            config["split_special_tokens"] = True
        config_file = os.path.join(folder, "tokenizer_config.json")
        with open(config_file, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, ensure_ascii=False)
        return config_file, tokenizer_file


def _tokens_to_add(named: Dict[str, Optional[TokenLike]], added: Sequence[AddedToken],
                   extras: Sequence[TokenLike]) -> List[AddedToken]:
    """The backend's added tokens, in transformers' order (TokenizersBackend.__init__): the
    added tokens by id, then each named and extra special token whose text is not among them,
    strings as special AddedTokens and a named token's AddedToken marked special."""
    tokens: List[TokenLike] = list(added)
    known = [str(t) for t in tokens]
    for token in [*named.values(), *extras]:
        if token is not None and str(token) not in known and token not in tokens:
            tokens.append(token)
    names = [str(t) for t in named.values() if t]
    out = []
    for token in tokens:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and str(token) in names:
            token.special = True
        out.append(token)
    return out


def _check_texts(text) -> List[str]:
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"the prompt must be a string or a list of strings, got {type(text).__name__}: {text!r:.80}")
    for n, item in enumerate(text):
        if not isinstance(item, str):
            raise TypeError(f"prompt {n} must be a string, got {type(item).__name__}: {item!r:.80}")
    if not text:
        raise ValueError("no prompts to tokenize: got an empty list")
    return list(text)


def _as_tensor(rows, kind: str):
    if kind not in ("pt", "np"):
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {kind!r}")
    if len({len(row) for row in rows}) > 1:
        raise ValueError("the prompts tokenize to different lengths: pass padding=True or padding='max_length' "
                         "to make a tensor of them")
    if kind == "np":
        import numpy as np

        return np.asarray(rows, dtype=np.int64)
    import torch

    return torch.tensor(rows, dtype=torch.int64)

