"""fastdiff's CLIP tokenizer (fastdiff/loaders/clip_tokenizer.py) against transformers' CLIPTokenizer,
the oracle: the same backend (vocabulary, merges, added tokens and their flags, pipeline), ids and
attention masks in every padding mode, on the built-in model's tokenizer and on folders in each
format CLIP tokenizers are saved in (SD 1.x and SD 2.x's legacy files, transformers 4's and 5's
saves, bare vocab.json + merges.txt), written here from a small BPE learned on a random corpus.
Loading the built-in model never imports transformers.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from deps import require

from fastdiff.loaders.clip_tokenizer import BOS, EOS, CLIPTokenizer, TokenBatch
from fastdiff.loaders.diffusers_folder import load_tokenizer

transformers = require("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "fastdiff", "assets", "default_model")
BUILT_IN = os.path.join(DEFAULT_MODEL, "tokenizer")
LENGTH = 16  # the folders' model_max_length: short, so real prompts truncate

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "above", "below", "left", "right", "café",
         "naïve", "über", "straße", "日本", "photo", "painting", "of", "a", "the", "dog", "cat", "don't", "it's"]
PROMPTS = [
    "a red circle above a blue square",
    "",
    "   A  RED\tCircle\n\nabove  ",                       # whitespace runs, tabs, newlines, upper case
    "Café naïve ÜBER straße 日本 😀 ∑",                     # accents (composed and not), CJK, emoji
    "Cafe\u0301 nai\u0308ve",                            # decomposed accents: NFC first
    "photo 1234 of 3.14 dogs, 2nd-best!!",               # digits one by one, punctuation runs
    "hello!world! ! !! ?!",                              # "!" is SD 2.x's pad token
    "don't it's we'll THEY'RE",                          # contractions
    "a <|endoftext|> b <|startoftext|>c",                # special tokens typed in the prompt
    "<|ENDOFTEXT|> <|endoftext|><|endoftext|>",
    " ".join(["red green"] * 20),                        # longer than any max_length here
    "x" * 120,
]
CALLS = [
    dict(padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt"),  # the pipelines' call
    dict(padding="max_length", truncation=True, return_tensors="pt"),                       # model_max_length
    dict(),
    dict(padding=True),
    dict(padding="longest", truncation=True, max_length=9),
    dict(padding=False, truncation=True),
    dict(max_length=5),                                   # a max_length alone truncates
    dict(padding="max_length", max_length=7),             # pads, never truncates: long rows stay long
    dict(padding="do_not_pad", truncation="longest_first", max_length=4),
    dict(padding=True, pad_to_multiple_of=8),
    dict(padding="max_length", max_length=6, truncation=True, padding_side="left", return_tensors="pt"),
    dict(padding=True, add_special_tokens=False),
    dict(padding="max_length", max_length=2, truncation=True),  # bos and eos only
    dict(padding=True, return_tensors="np"),
]


# ---------------------------------------------------------------- tokenizer folders in the saved formats

def _learned(seed=0):
    """(vocab, merges) of a CLIP-layout BPE learned from a random corpus (bytes, bytes + "</w>", merges, specials)."""
    from fastdiff.train.tokenizer import clip_vocab, learn_merges

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(300)]
    merges = learn_merges(corpus, max_merges=120)
    return clip_vocab(merges), merges


def _write(folder, name, content):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
        if isinstance(content, str):
            fh.write(content)
        else:
            json.dump(content, fh, indent=2, ensure_ascii=False)


def _bpe_files(folder, vocab, merges):
    _write(folder, "vocab.json", vocab)
    _write(folder, "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _legacy_token(content):  # how transformers 3/4 wrote an AddedToken into tokenizer_config.json
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def _map_token(content):  # ... and into special_tokens_map.json
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_legacy(folder, vocab, merges, pad="<|endoftext|>"):
    """The files of SD 1.x's tokenizer (openai/clip-vit-large-patch14); pad="!" gives SD 2.x's, whose
    special_tokens_map.json pads with "!" (id 0) over a tokenizer_config.json that says <|endoftext|>."""
    _bpe_files(folder, vocab, merges)
    _write(folder, "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": _legacy_token(BOS), "do_lower_case": True,
        "eos_token": _legacy_token(EOS), "errors": "replace", "model_max_length": LENGTH,
        "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": _legacy_token(EOS)})
    _write(folder, "special_tokens_map.json", {"bos_token": _map_token(BOS), "eos_token": _map_token(EOS),
                                               "pad_token": pad, "unk_token": _map_token(EOS)})


def write_transformers4(folder, vocab, merges, pad=EOS):
    """A transformers 4.3x save: tokenizer.json, vocab.json + merges.txt, a tokenizer_config.json
    with added_tokens_decoder (which transformers then reads instead of special_tokens_map.json)."""
    _bpe_files(folder, vocab, merges)
    reference = transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges])
    reference.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    decoder = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": True, "rstrip": False,
                               "single_word": False, "special": True} for t in (BOS, EOS)}
    if pad != EOS:
        decoder[str(vocab[pad])] = {"content": pad, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True}
    _write(folder, "tokenizer_config.json", {
        "added_tokens_decoder": decoder, "bos_token": BOS, "clean_up_tokenization_spaces": True,
        "do_lower_case": True, "eos_token": EOS, "errors": "replace", "model_max_length": LENGTH,
        "pad_token": pad, "tokenizer_class": "CLIPTokenizer", "unk_token": EOS})
    _write(folder, "special_tokens_map.json", {"bos_token": _map_token(BOS), "eos_token": _map_token(EOS),
                                               "pad_token": pad, "unk_token": _map_token(EOS)})


def write_plain(folder, vocab, merges, **config):
    """vocab.json + merges.txt and a tokenizer_config.json of strings (tests/sd_fixtures.py's shape)."""
    _bpe_files(folder, vocab, merges)
    _write(folder, "tokenizer_config.json", {"model_max_length": LENGTH, "bos_token": BOS, "eos_token": EOS,
                                             "pad_token": EOS, "unk_token": EOS, "tokenizer_class": "CLIPTokenizer",
                                             **config})


def write_extras(folder, vocab, merges):
    """Tokens beyond the vocabulary: an extra special token, a legacy added_tokens.json entry, a mask token."""
    write_plain(folder, vocab, merges, additional_special_tokens=["<|cat|>"], mask_token="<|mask|>")
    _write(folder, "added_tokens.json", {"<|dog|>": len(vocab)})


def write_tokenizer_json_only(folder, vocab, merges):
    reference = transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges])
    os.makedirs(folder, exist_ok=True)
    reference.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    _write(folder, "tokenizer_config.json", {"model_max_length": LENGTH, "tokenizer_class": "CLIPTokenizer"})


def write_hub_clip(folder, vocab, merges):
    """openai/clip-vit-large-patch14's files (what a single file's --tokenizer often names): SD 1.x's legacy
    files plus a tokenizer.json whose added tokens are normalized (matched after lower-casing)."""
    write_legacy(folder, vocab, merges)
    serialized = json.loads(transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges])
                            .backend_tokenizer.to_str())
    for token in serialized["added_tokens"]:
        token["normalized"] = True
    _write(folder, "tokenizer.json", serialized)


def write_transformers5(folder, vocab, merges):
    """What transformers 5 itself writes (tokenizer.json + tokenizer_config.json), from SD 2.x's files."""
    write_legacy(folder + "_source", vocab, merges, pad="!")
    reference(folder + "_source").save_pretrained(folder)


STYLES = {
    "sd1_legacy": write_legacy,
    "sd2_legacy": lambda f, v, m: write_legacy(f, v, m, pad="!"),
    "transformers4": write_transformers4,
    "transformers4_sd2": lambda f, v, m: write_transformers4(f, v, m, pad="!"),
    "transformers5": write_transformers5,
    "hub_clip_l": write_hub_clip,
    "plain_bpe": write_plain,
    "left_sides": lambda f, v, m: write_plain(f, v, m, padding_side="left", truncation_side="left"),
    "extras": write_extras,
    "tokenizer_json_only": write_tokenizer_json_only,
}


def reference(folder):
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tokenizers")
    vocab, merges = _learned()
    out = {"built_in": BUILT_IN}
    for name, write in STYLES.items():
        write(str(root / name), vocab, merges)
        out[name] = str(root / name)
    return out


def _plain(batch):
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in batch.items()}


def assert_same(ours, theirs, prompts=PROMPTS):
    """Same backend, same ids and masks for every call, same vocabulary and special ids."""
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    for call in CALLS:
        for batch in (prompts, prompts[0], prompts[-2], [prompts[1]], prompts[3:6]):
            a, b = ours(batch, **call), theirs(batch, **call)
            assert set(a) == set(b) == {"input_ids", "attention_mask"}, call
            assert _plain(a) == _plain(b), (call, batch)
            if call.get("return_tensors") == "pt":
                assert a.input_ids.dtype == a["attention_mask"].dtype == torch.int64
                assert a.input_ids.shape == b.input_ids.shape
            if call.get("return_tensors") == "np":
                assert a["input_ids"].dtype == b["input_ids"].dtype
    for name in ("model_max_length", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
                 "bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    for text in prompts:
        assert ours.tokenize(text) == theirs.tokenize(text)
        ids = theirs(text).input_ids
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)


# ---------------------------------------------------------------- equal to transformers

@pytest.mark.parametrize("style", ["built_in", *STYLES])
def test_equal_to_transformers(folders, style):
    assert_same(CLIPTokenizer.from_folder(folders[style]), reference(folders[style]))


def test_built_in_model_every_caption_word_and_caption(folders):
    from fastdiff.data.scenes import vocabulary

    ours, theirs = CLIPTokenizer.from_folder(BUILT_IN), reference(BUILT_IN)
    words = vocabulary()
    captions = [" ".join(random.Random(n).choice(words) for _ in range(n % 12)) for n in range(40)]
    assert_same(ours, theirs, prompts=[*words, *captions])
    for word in words:  # the built-in vocabulary holds each caption word whole
        assert len(ours(word).input_ids) == 3, (word, ours.tokenize(word))


def test_sd2_pads_with_exclamation_mark_id_0(folders):
    """SD 2.x's special_tokens_map.json makes "!" (id 0) the pad token, and so an added token: a "!" in
    the prompt is that token (id 0), not the BPE's word-final "!</w>"."""
    for style in ("sd2_legacy", "transformers4_sd2", "transformers5"):
        tok = CLIPTokenizer.from_folder(folders[style])
        assert tok.pad_token == "!" and tok.pad_token_id == 0, style
        ids = tok(["hi!", "a"], padding="max_length", max_length=6, truncation=True).input_ids
        assert ids[1][-3:] == [0, 0, 0] and 0 in ids[0], (style, ids)
    sd1 = CLIPTokenizer.from_folder(folders["sd1_legacy"])
    assert sd1.pad_token == EOS and sd1.pad_token_id == sd1.eos_token_id


def test_the_pipelines_call_truncates_keeping_bos_and_eos(folders):
    tok = CLIPTokenizer.from_folder(folders["sd1_legacy"])
    out = tok([PROMPTS[-2], "red", ""], padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    assert isinstance(out, TokenBatch) and out.input_ids.shape == (3, LENGTH)
    assert out.input_ids[:, 0].tolist() == [tok.bos_token_id] * 3
    assert out.input_ids[0, -1] == tok.eos_token_id and out.attention_mask[0].all()
    assert out.attention_mask.sum(1).tolist() == [LENGTH, 3, 2]
    assert out.to("cpu").input_ids.equal(out["input_ids"])


def test_extra_tokens_get_new_ids(folders):
    tok, theirs = CLIPTokenizer.from_folder(folders["extras"]), reference(folders["extras"])
    for token in ("<|cat|>", "<|dog|>", "<|mask|>"):
        assert tok.convert_tokens_to_ids(token) == theirs.convert_tokens_to_ids(token) >= tok.vocab_size
        assert tok(f"a {token} b").input_ids == theirs(f"a {token} b").input_ids
    assert len(tok) == tok.vocab_size + 3


def test_without_model_max_length_the_error_names_the_file(tmp_path, folders):
    """transformers gives such a folder 1e30 (no pipeline can embed that); fastdiff asks for the length."""
    vocab, merges = _learned()
    folder = str(tmp_path / "bare")
    _bpe_files(folder, vocab, merges)  # no tokenizer_config.json at all
    with pytest.raises(ValueError, match="gives no model_max_length") as info:
        CLIPTokenizer.from_folder(folder)
    assert f"{folder} has no tokenizer_config.json" in _one_line(info)
    ours, theirs = CLIPTokenizer.from_folder(folder, model_max_length=LENGTH), reference(folder)
    assert theirs.model_max_length == int(1e30) and ours.model_max_length == LENGTH
    theirs.model_max_length = LENGTH  # the oracle with the same length
    assert_same(ours, theirs)
    # a length transformers wrote for "none" (1e30) is none too; a folder's own length wins over the argument
    saved = str(tmp_path / "saved_by_transformers")
    reference(folder).save_pretrained(saved)
    with pytest.raises(ValueError, match="gives no model_max_length") as info:
        CLIPTokenizer.from_folder(saved)
    assert os.path.join(saved, "tokenizer_config.json") in _one_line(info)
    assert CLIPTokenizer.from_folder(folders["plain_bpe"], model_max_length=77).model_max_length == LENGTH


# ---------------------------------------------------------------- saving

@pytest.mark.parametrize("style", ["built_in", "sd1_legacy", "sd2_legacy", "transformers4", "hub_clip_l", "extras",
                                   "left_sides"])
def test_save_pretrained_round_trips(tmp_path, folders, style):
    """The saved folder reads back, in transformers and in fastdiff, to the same tokenizer; it holds the
    tokenizer.json whose BPE model the ONNX export turns into vocab.json + merges.txt."""
    original = CLIPTokenizer.from_folder(folders[style])
    original(PROMPTS, padding="max_length", max_length=8, truncation=True)  # no call state is saved
    saved = str(tmp_path / "saved")
    original.save_pretrained(saved)
    assert sorted(os.listdir(saved)) == ["tokenizer.json", "tokenizer_config.json"]
    model = json.load(open(os.path.join(saved, "tokenizer.json"), encoding="utf-8"))["model"]
    assert model["vocab"] == original.backend_tokenizer.get_vocab(with_added_tokens=False) and model["merges"]
    theirs = reference(folders[style])
    assert_same(CLIPTokenizer.from_folder(saved), theirs)
    assert_same(CLIPTokenizer.from_folder(saved), reference(saved))
    # and the export's vocab.json + merges.txt alone (transformers 4's slow tokenizer reads those; without
    # tokenizer.json's added tokens the legacy "normalized" flag of SD's bos/eos is gone, for both readers)
    bpe_only = str(tmp_path / "bpe_only")
    _bpe_files(bpe_only, model["vocab"], [m if isinstance(m, list) else m.split(" ") for m in model["merges"]])
    _write(bpe_only, "tokenizer_config.json", json.load(open(os.path.join(saved, "tokenizer_config.json"))))
    assert_same(CLIPTokenizer.from_folder(bpe_only), reference(bpe_only))


def test_load_tokenizer_reads_a_model_folder():
    tok = load_tokenizer(DEFAULT_MODEL)
    assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 20
    with pytest.raises(FileNotFoundError, match="lacks the 'nowhere' component"):
        load_tokenizer(DEFAULT_MODEL, "nowhere")


# ---------------------------------------------------------------- bad folders, bad input

def _one_line(info):
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _broken(tmp_path, name, change):
    vocab, merges = _learned()
    folder = tmp_path / name
    write_transformers4(str(folder), vocab, merges) if name.startswith("json_") else write_plain(
        str(folder), vocab, merges)
    change(folder)
    return folder


BROKEN = {  # folder -> (what is done to it, the error, the file its message names)
    "no_files": (lambda f: [os.remove(f / n) for n in ("vocab.json", "merges.txt")], FileNotFoundError, ""),
    "no_merges": (lambda f: os.remove(f / "merges.txt"), FileNotFoundError, ""),
    "vocab_not_json": (lambda f: (f / "vocab.json").write_text("{oops"), ValueError, "vocab.json"),
    "vocab_not_ids": (lambda f: (f / "vocab.json").write_text('{"a": "b"}'), ValueError, "vocab.json"),
    "merges_three_parts": (lambda f: (f / "merges.txt").write_text("#version: 0.2\nr e d\n"), ValueError,
                           "merges.txt"),
    "merges_unknown_symbol": (lambda f: (f / "merges.txt").write_text("#version: 0.2\nq\u0101 zz\n"), ValueError,
                              "merges.txt"),
    "config_not_json": (lambda f: (f / "tokenizer_config.json").write_text("{"), ValueError, "tokenizer_config.json"),
    "config_a_list": (lambda f: (f / "tokenizer_config.json").write_text("[]"), ValueError, "tokenizer_config.json"),
    "length_not_int": (lambda f: _write(f, "tokenizer_config.json", {"model_max_length": "77"}), ValueError,
                       "tokenizer_config.json"),
    "token_a_number": (lambda f: _write(f, "tokenizer_config.json", {"model_max_length": 8, "pad_token": 5}),
                       ValueError, "tokenizer_config.json"),
    "map_token_a_list": (lambda f: _write(f, "special_tokens_map.json", {"pad_token": [1]}), ValueError,
                         "special_tokens_map.json"),
    "json_not_json": (lambda f: (f / "tokenizer.json").write_text("nope"), ValueError, "tokenizer.json"),
    "json_no_model": (lambda f: _write(f, "tokenizer.json", {"version": "1.0"}), ValueError, "tokenizer.json"),
    "json_wordpiece": (lambda f: _write(f, "tokenizer.json", {"model": {"type": "WordPiece", "vocab": {"a": 0}}}),
                       ValueError, "tokenizer.json"),
    "json_bad_merge": (lambda f: _write(f, "tokenizer.json", {"model": {"type": "BPE", "vocab": {"a": 0},
                                                                        "merges": ["a b"]}}),
                       ValueError, "tokenizer.json"),
    "json_bad_added": (lambda f: _write(f, "tokenizer_config.json", {"model_max_length": 8, "added_tokens_decoder":
                                                                     {"x": {"content": "a"}}}),
                       ValueError, "tokenizer_config.json"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_bad_folders_give_one_line_naming_the_file(tmp_path, name):
    change, error, file = BROKEN[name]
    folder = _broken(tmp_path, name, change)
    with pytest.raises(error) as info:
        CLIPTokenizer.from_folder(folder)
    message = _one_line(info)
    assert str(folder / file) in message if file else str(folder) in message
    if file == "":
        assert "tokenizer.json, or vocab.json and merges.txt" in message


@pytest.mark.parametrize("text", ["#version: 0.2\na b\nab c\n", "a b\r\nab c", "", "#version: 0.2\n",
                                  "#version x\n#version y\na b\n", "a\u00a0b c\n"])
def test_merges_are_read_as_the_tokenizers_library_reads_them(tmp_path, text):
    from tokenizers.models import BPE

    from fastdiff.loaders.clip_tokenizer_files import read_merges

    (tmp_path / "vocab.json").write_text("{}")
    with open(tmp_path / "merges.txt", "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    assert read_merges(str(tmp_path / "merges.txt")) == BPE.read_file(str(tmp_path / "vocab.json"),
                                                                      str(tmp_path / "merges.txt"))[1]
    assert read_merges(os.path.join(BUILT_IN, "merges.txt")) == BPE.read_file(
        os.path.join(BUILT_IN, "vocab.json"), os.path.join(BUILT_IN, "merges.txt"))[1]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found") as info:
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in _one_line(info)


@pytest.mark.parametrize("prompt, named", [(5, "int"), (None, "NoneType"), (["a", 3.5], "prompt 1"),
                                           (("a", b"bytes"), "bytes"), ({"a": 1}, "dict")])
def test_a_prompt_that_is_not_a_string_is_a_type_error_naming_it(prompt, named):
    tok = CLIPTokenizer.from_folder(BUILT_IN)
    with pytest.raises(TypeError, match=named):
        tok(prompt, padding="max_length", truncation=True, return_tensors="pt")


@pytest.mark.parametrize("call, words", [
    (dict(text=[]), "no prompts"),
    (dict(padding="bogus"), "padding must be"),
    (dict(truncation="only_second"), "truncation must be"),
    (dict(return_tensors="tf"), "return_tensors"),
    (dict(text=["a", "a red circle"], return_tensors="pt"), "different lengths"),
    (dict(max_length=1, truncation=True), "no room for the bos and eos"),
    (dict(max_length=-3), "max_length must be"),
    (dict(padding=True, pad_to_multiple_of=0), "pad_to_multiple_of"),
    (dict(padding="max_length", max_length=10, truncation=True, pad_to_multiple_of=4), "multiple"),
    (dict(padding=True, padding_side="middle"), "padding_side"),
])
def test_bad_arguments_are_value_errors(call, words):
    tok = CLIPTokenizer.from_folder(BUILT_IN)
    call = {"text": "a red circle", **call}
    with pytest.raises(ValueError, match=words):
        tok(call.pop("text"), **call)


def test_no_pad_token_refuses_to_pad(tmp_path):
    vocab, merges = _learned()
    write_plain(str(tmp_path), vocab, merges, pad_token=None)
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok("a b").input_ids == reference(tmp_path)("a b").input_ids
    with pytest.raises(ValueError, match="no pad token"):
        tok(["a", "b c"], padding=True)


# ---------------------------------------------------------------- start-up: transformers stays out

def _run(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


NO_TRANSFORMERS = ("found = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'); "
                   "assert not found, found")


def test_loading_the_built_in_model_never_imports_transformers():
    """The main job's load (the built-in model, a diffusers SD folder) and a generation: fastdiff's
    tokenizer, and no transformers module at all (its import alone is ~0.85 s of start-up)."""
    _run("import sys; from fastdiff.loaders.stable_diffusion import load_folder; "
         f"parts = load_folder({DEFAULT_MODEL!r}); "
         "from fastdiff.loaders.clip_tokenizer import CLIPTokenizer; "
         "assert isinstance(parts['tokenizer'], CLIPTokenizer), type(parts['tokenizer']); "
         "import fastdiff; pipe = fastdiff.Pipeline(); "
         "assert isinstance(pipe.tokenizer, CLIPTokenizer), type(pipe.tokenizer); "
         "pipe.generate('a red circle above a blue square', num_inference_steps=2, seed=0); " + NO_TRANSFORMERS)


def test_quiet_loading_leaves_transformers_alone_unless_it_is_in_use():
    _run("import sys; from fastdiff.loaders.quiet import quiet_loading\n"
         "with quiet_loading(): pass\n" + NO_TRANSFORMERS)
    from transformers.utils import logging as hf_logging

    from fastdiff.loaders.quiet import quiet_loading

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        with quiet_loading():
            assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(before)
