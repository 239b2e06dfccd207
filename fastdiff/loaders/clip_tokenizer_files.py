"""Reading a saved CLIP tokenizer folder as transformers 5 reads it: the BPE vocabulary and
merges (tokenizer.json's model, else vocab.json + merges.txt) and the special and added tokens
(tokenizer_config.json, special_tokens_map.json, added_tokens.json, tokenizer.json's
added_tokens), each with its flags. fastdiff/loaders/clip_tokenizer.py builds the tokenizer
from them; every error here names the file at fault.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from tokenizers import AddedToken

# transformers' named special tokens, in the order it adds them to the backend
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EXTRA_KEYS = ("extra_special_tokens", "additional_special_tokens")


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def read_vocab_and_merges(path: str, serialized: Optional[dict] = None) -> Tuple[Dict[str, int], list, str]:
    """(vocab, merges, the file they came from) as transformers reads them: the BPE model of
    `serialized` (<path>/tokenizer.json, already parsed), else vocab.json + merges.txt. An error
    names the file that is missing or corrupt."""
    tokenizer_file = os.path.join(path, "tokenizer.json")
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if serialized is not None:
        model = serialized.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("vocab"), (dict, list)):
            raise ValueError(f"{tokenizer_file} holds no tokenizer model with a vocabulary")
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{tokenizer_file} holds a {model['type']} model, not CLIP's BPE")
        vocab = model["vocab"]
        if isinstance(vocab, list):
            vocab = {t[0] if isinstance(t, list) else t: i for i, t in enumerate(vocab)}
        if not all(isinstance(k, str) and _is_id(i) for k, i in vocab.items()):
            raise ValueError(f"{tokenizer_file}: the vocabulary must map each token to an integer id")
        merges = model.get("merges") or []
        if not isinstance(merges, list):
            raise ValueError(f"{tokenizer_file}: the BPE merges must be a list, got {type(merges).__name__}")
        return vocab, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges], tokenizer_file
    if not (os.path.isfile(vocab_file) and os.path.isfile(merges_file)):
        raise FileNotFoundError(f"tokenizer files missing in {path}: expected tokenizer.json, "
                                "or vocab.json and merges.txt")
    vocab = read_json(vocab_file)
    if not isinstance(vocab, dict) or not all(_is_id(i) for i in vocab.values()):
        # (the Rust reader would skip such entries silently)
        raise ValueError(f"{vocab_file} must hold a JSON object mapping each token to an integer id")
    return vocab, read_merges(merges_file), merges_file


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 32


def read_merges(merges_file: str) -> List[Tuple[str, str]]:
    """merges.txt as the `tokenizers` reader (BPE.read_file) parses it: one "a b" pair a line
    (split on single spaces), "#version" lines skipped, no other line allowed."""
    try:
        with open(merges_file, encoding="utf-8", newline="") as fh:
            lines = fh.read().split("\n")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{merges_file} is not UTF-8 text: {exc}") from None
    if lines[-1] == "":  # a final newline ends the last line, it does not start another
        lines.pop()
    merges = []
    for number, line in enumerate(lines, 1):
        line = line[:-1] if line.endswith("\r") else line
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_file} is corrupt: line {number} should hold one merge 'a b', got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _added_token(entry, where: str) -> AddedToken:
    if isinstance(entry, AddedToken):
        return entry
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise ValueError(f"{where}: a token must be a string or an object with a 'content' string, got {entry!r}")
    fields = {k: v for k, v in entry.items() if k not in ("__type", "id")}
    try:
        return AddedToken(**fields)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _token_id(value, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a token id") from None


def _token_value(value, where: str):
    """A config's token: a string, None, or an AddedToken ({"content": ...} objects; the legacy "__type" too)."""
    if value is None or isinstance(value, str):
        return value
    return _added_token(value, where)


def read_special_tokens(path: str, config: dict, serialized: Optional[dict] = None):
    """({name: token}, [added tokens in id order], [extra special tokens]) as transformers 5
    reads them: tokenizer_config.json's added_tokens_decoder if it has one; otherwise its
    token settings overridden by special_tokens_map.json (dicts there become special
    AddedTokens), then added_tokens.json and tokenizer.json's added_tokens; a named token whose
    text is one of those added tokens takes that token (with its flags)."""
    config_file = os.path.join(path, "tokenizer_config.json")
    settings = dict(config)
    if "additional_special_tokens" in settings and not settings.get("extra_special_tokens"):
        settings["extra_special_tokens"] = settings.pop("additional_special_tokens")
    # model-specific named tokens (any other "*_token" string), which transformers also makes special
    custom = {k: v for k, v in settings.items() if k not in NAMED and k.endswith("_token") and isinstance(v, str)}
    if isinstance(settings.get("extra_special_tokens"), dict):
        custom.update(settings.pop("extra_special_tokens"))
    decoder: Dict[int, AddedToken] = {}
    source = {}  # setting -> the file it came from, where that is not tokenizer_config.json
    if "added_tokens_decoder" in settings:
        entries = settings["added_tokens_decoder"]
        if not isinstance(entries, dict):
            raise ValueError(f"{config_file}: added_tokens_decoder must be an object of id -> token")
        for idx, entry in entries.items():
            decoder[_token_id(idx, config_file)] = _added_token(entry, f"{config_file} added_tokens_decoder[{idx}]")
    else:
        map_file = os.path.join(path, "special_tokens_map.json")
        if os.path.isfile(map_file):
            special_map = read_json(map_file)
            if not isinstance(special_map, dict):
                raise ValueError(f"{map_file} must hold a JSON object of token settings")
            for key, value in special_map.items():
                if key in EXTRA_KEYS and isinstance(value, list):
                    merged = list(settings.get("extra_special_tokens") or [])
                    for tok in value:
                        tok = AddedToken(**{**tok, "special": True}) if isinstance(tok, dict) else tok
                        if tok not in merged:
                            merged.append(tok)
                    value, key = merged, "extra_special_tokens"
                elif isinstance(value, dict) and key not in EXTRA_KEYS:
                    value = _added_token({**value, "special": True}, f"{map_file} {key}")
                settings[key], source[key] = value, map_file
            if isinstance(settings.get("extra_special_tokens"), dict):
                custom.update(settings.pop("extra_special_tokens"))
        added_file = os.path.join(path, "added_tokens.json")
        if os.path.isfile(added_file):
            names = {str(settings[k]) for k in NAMED if settings.get(k)}
            names.update(str(t) for t in settings.get("extra_special_tokens") or [])
            added = read_json(added_file)
            if not isinstance(added, dict):
                raise ValueError(f"{added_file} must hold a JSON object of token -> id")
            for text, idx in added.items():
                special = text in names
                decoder[_token_id(idx, added_file)] = AddedToken(text, rstrip=False, lstrip=False,
                                                                 normalized=not special, special=special)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if serialized is not None:
            entries = serialized.get("added_tokens") or []
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
                    raise ValueError(f"{tokenizer_file}: an added token needs an integer 'id', got {entry!r}")
                decoder[entry["id"]] = _added_token(entry, f"{tokenizer_file} added_tokens")
    by_text = {str(tok): tok for tok in decoder.values()}
    named = {}
    for key in NAMED:
        if key in settings:
            value = _token_value(settings[key], f"{source.get(key, config_file)} {key}")
            named[key] = by_text.get(str(value), value) if value is not None and by_text else value
    for key, value in custom.items():
        named[key] = _token_value(value, f"{config_file} {key}")
    extras = settings.get("extra_special_tokens") or []
    if not isinstance(extras, list):
        raise ValueError(f"{config_file}: extra_special_tokens must be a list of tokens")
    extras = [_token_value(t, f"{source.get('extra_special_tokens', config_file)} extra_special_tokens")
              for t in extras]
    return named, [decoder[i] for i in sorted(decoder)], extras
