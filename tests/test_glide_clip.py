"""GLIDE's tokenizers and noised CLIP: ids equal to transformers' GPT-2 / CLIP tokenizers on
small vocabularies written in the released file formats; encoders equal to an einsum
restatement of glide-text2im's clip/encoders.py computed from the state dict alone; the
loader strict and its errors named; cond_fn's gradient checked against finite differences.
"""
from __future__ import annotations

import collections
import gzip
import json
import math
import os
import shutil

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F

from fastdiff.loaders.files import CheckpointError
from fastdiff.loaders.files import state_dict_problems
from fastdiff.loaders.glide_clip_loader import load_noised_clip
from fastdiff.loaders.glide_tokenizers import ClipTokenizer, GlideTokenizer
from fastdiff.guidance.clip import NoisedClip
from fastdiff.models.glide_clip import CLIP_DEFAULTS
from tolerances import fp32_bound, reduction_terms
from deps import require

CORPUS = [
    "a red circle above a blue square", "an oil painting of a corgi wearing a hat", "a corgi in a field",
    "the cat's hat, 4k photo!!", "two dogs playing... in 2024", "café crème brûlée über straße",
    "don't stop: it's 12:30 and we're late", "日本の猫 and a naïve résumé", "emoji 🐶🐱 fun",
    "a   lot\tof   space",
]
PROMPTS = [
    "A Red Circle above a blue square", "an oil painting of a CORGI, 4K!", "two dogs playing... in 2024?",
    "café crème brûlée über straße", "don't stop: it's 12:30 & we're late", "  leading and trailing  ",
    "a   lot\tof\n space", "日本の猫 🐶", "", "x", "The cat's and the dog's; they're 100% done",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models here are tiny: on a busy machine, intra-op threads cost ~100x more than they save.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- tokenizer files in the released formats

def write_gpt2_files(folder, gz: bool = False) -> None:
    """encoder.json + vocab.bpe (GPT-2 format, '#version: 0.2' header), trained on CORPUS;
    <|endoftext|> last, as in GLIDE's files."""
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(folder, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([s.lower() for s in CORPUS] * 3, vocab_size=400, min_frequency=1, show_progress=False)
    bpe.save_model(str(folder))
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as fh:
        vocab = json.load(fh)
    vocab = {token: i for i, token in enumerate(sorted(vocab, key=vocab.get))}
    vocab["<|endoftext|>"] = len(vocab)
    os.remove(os.path.join(folder, "vocab.json"))
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as fh:
        merges = fh.read()
    os.remove(os.path.join(folder, "merges.txt"))
    assert merges.startswith("#version: 0.2\n") and merges.endswith("\n")
    files = {"encoder.json": json.dumps(vocab), "vocab.bpe": merges}
    for name, text in files.items():
        if gz:
            with gzip.open(os.path.join(folder, name + ".gz"), "wt", encoding="utf-8") as fh:
                fh.write(text)
        else:
            with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
                fh.write(text)


def train_clip_merges(n_merges: int = 120):
    """A tiny CLIP-style BPE (word-final symbols carry '</w>'), trained greedily on CORPUS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    words = collections.Counter()
    for line in CORPUS:
        for piece in pattern.findall(line.lower()):
            mapped = [table[b] for b in piece.encode("utf-8")]
            words[tuple(mapped[:-1] + [mapped[-1] + "</w>"])] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def write_clip_files(folder):
    """bpe_simple_vocab_16e6.txt (+ .gz) in CLIP's format, and the transformers vocab.json /
    merges.txt derived from it the way CLIP derives its vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    os.makedirs(folder, exist_ok=True)
    merges = train_clip_merges()
    lines = ['"bpe_simple_vocab_16e6.txt#version: 0.2'] + [" ".join(m) for m in merges]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "bpe_simple_vocab_16e6.txt"), "w", encoding="utf-8") as fh:
        fh.write(text)
    with gzip.open(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"), "wt", encoding="utf-8") as fh:
        fh.write(text)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({s: i for i, s in enumerate(vocab)}, fh)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_bpe")
    return str(folder), write_clip_files(str(folder))


# ---------------------------------------------------------------- GLIDE tokenizer

def test_glide_tokenizer_matches_gpt2(tmp_path):
    from transformers import GPT2Tokenizer

    write_gpt2_files(tmp_path / "plain")
    write_gpt2_files(tmp_path / "gz", gz=True)
    reference = GPT2Tokenizer(str(tmp_path / "plain" / "encoder.json"), str(tmp_path / "plain" / "vocab.bpe"))
    ours = GlideTokenizer.from_folder(tmp_path / "plain")
    zipped = GlideTokenizer.from_folder(tmp_path / "gz")
    explicit = GlideTokenizer.from_files(tmp_path / "gz" / "encoder.json.gz", tmp_path / "plain" / "vocab.bpe")
    assert ours.n_vocab == len(reference) and ours.end_token == reference.convert_tokens_to_ids("<|endoftext|>")
    merged_any = False
    for prompt in PROMPTS:
        expected = reference.encode(prompt.lower())
        assert ours.encode(prompt) == expected, prompt
        assert zipped.encode(prompt) == expected and explicit.encode(prompt) == expected
        assert ours.decode(expected) == prompt.lower()
        merged_any |= len(expected) < len(prompt.encode("utf-8"))
    assert merged_any  # the vocabulary's merges are exercised, not only single bytes


def test_glide_tokenizer_padding_and_batches(tmp_path):
    write_gpt2_files(tmp_path)
    tok = GlideTokenizer.from_folder(tmp_path)
    ids = tok.encode("a corgi in a field")
    padded, mask = tok.padded_tokens_and_mask(ids, 10)
    assert padded == ids + [tok.end_token] * (10 - len(ids)) and mask == [True] * len(ids) + [False] * (10 - len(ids))
    assert tok.padded_tokens_and_mask(ids, 2) == (ids[:2], [True, True])
    assert tok.padded_tokens_and_mask([], 3) == ([tok.end_token] * 3, [False] * 3)
    tokens, mask = tok(["a corgi in a field", ""], 6)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool and tokens.shape == mask.shape == (2, 6)
    assert tokens[0].tolist() == ids[:6] and mask[0].all() and not mask[1].any()
    assert (tokens[1] == tok.end_token).all()


def test_glide_tokenizer_errors_name_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"encoder\.json or .*encoder\.json\.gz.*vocab\.bpe or"):
        GlideTokenizer.from_folder(empty)
    write_gpt2_files(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        GlideTokenizer.from_files(tmp_path / "nowhere.json", tmp_path / "ok" / "vocab.bpe")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    (bad / "encoder.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.encoder\.json"):
        GlideTokenizer.from_folder(bad)
    (bad / "encoder.json").unlink()
    (bad / "encoder.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match=r"encoder\.json\.gz"):
        GlideTokenizer.from_folder(bad)
    shutil.copy(tmp_path / "ok" / "encoder.json", bad / "encoder.json")
    (bad / "vocab.bpe").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"vocab\.bpe.*line 2"):
        GlideTokenizer.from_folder(bad)
    (bad / "encoder.json").write_text(json.dumps({"a": 0, "b": 1}))
    (bad / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="byte symbols"):
        GlideTokenizer.from_folder(bad)


# ---------------------------------------------------------------- CLIP tokenizer

def test_clip_tokenizer_matches_transformers(clip_files):
    from transformers import CLIPTokenizer

    folder, n_vocab = clip_files
    # transformers' CLIPTokenizer does not html-unescape (nor run ftfy, nor does fastdiff without it);
    # prompts without HTML entities agree exactly and are compared here, the unescaping is checked
    # against its definition in the next test.
    reference = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    ours = ClipTokenizer.from_file(os.path.join(folder, "bpe_simple_vocab_16e6.txt"))
    from_folder = ClipTokenizer.from_folder(folder)
    assert ours.n_vocab == n_vocab == len(reference)
    assert (ours.start_token, ours.end_token) == (n_vocab - 2, n_vocab - 1) == (reference.bos_token_id,
                                                                                reference.eos_token_id)
    comparable = [p for p in PROMPTS if "&" not in p]
    for prompt in comparable:
        expected = reference(prompt)["input_ids"]
        assert [ours.start_token] + ours.encode(prompt) + [ours.end_token] == expected, prompt
        assert from_folder.encode(prompt) == ours.encode(prompt)
    assert any(len(ours.encode(p)) < len(ours.clean(p).replace(" ", "").encode()) for p in comparable)


def test_clip_tokenizer_cleaning_and_padding(clip_files):
    folder, _ = clip_files
    tok = ClipTokenizer.from_file(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"))
    # html unescaped twice, whitespace collapsed, lower-cased (CLIP's basic_clean / whitespace_clean).
    assert tok.encode("A &amp;amp; B") == tok.encode("a & b") == tok.encode("  a\t&\n\nb ")
    assert tok.encode("Tom &lt;3") == tok.encode("tom <3")
    # digits one by one, specials whole, decoding marks word ends with spaces.
    assert len(tok.encode("2024")) == 4
    assert tok.encode("<|startoftext|>x") == [tok.start_token] + tok.encode("x")
    assert tok.decode(tok.encode("a corgi in a field")) == "a corgi in a field "
    ids = tok.encode("a red circle above a blue square")
    padded, length = tok.padded_tokens_and_len(ids, 6)
    assert padded == [tok.start_token] + ids[:4] + [tok.end_token] and length == 6
    padded, length = tok.padded_tokens_and_len(ids[:2], 8)
    assert padded == [tok.start_token] + ids[:2] + [tok.end_token, 0, 0, 0, 0] and length == 4
    tokens, lengths = tok(["a corgi", ""], 5)
    assert tokens.dtype == lengths.dtype == torch.long and tokens.shape == (2, 5)
    assert tokens[1].tolist() == [tok.start_token, tok.end_token, 0, 0, 0] and lengths.tolist()[1] == 2
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        ClipTokenizer.from_file(os.path.join(folder, "nowhere.txt"))


# ---------------------------------------------------------------- a tiny noised CLIP in glide's layout

def tiny_config(n_vocab: int, max_text_len: int = 12, n_timesteps: int = 10) -> dict:
    return dict(logit_scale=100.0, n_timesteps=n_timesteps, image_size=8, patch_size=2, n_vocab=n_vocab,
                max_text_len=max_text_len, n_embd=6, n_head_state_text=4, n_head_text=2, n_xf_blocks_text=2,
                n_head_state_image=4, n_head_image=3, n_xf_blocks_image=2)


def random_state(config: dict, part: str, seed: int) -> dict:
    """Random weights with the keys and shapes of glide's TextEncoder / ImageEncoder state dicts."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    c = config
    n = c[f"n_head_{part}"] * c[f"n_head_state_{part}"]
    sd = {}
    if part == "text":
        sd["blocks.input.w_voc"] = rand(c["n_vocab"], n)
        sd["blocks.input.w_pos"] = rand(c["max_text_len"], n, std=0.5)
    else:
        p = c["patch_size"]
        sd["blocks.input.patch_proj"] = rand(n, 3, p, p, std=(1 / (3 * p * p)) ** 0.5)
        sd["blocks.input.w_pos"] = rand(1 + (c["image_size"] // p) ** 2, n, std=0.5)
        if c["n_timesteps"]:
            sd["blocks.input.w_t"] = rand(c["n_timesteps"], n)
        else:
            sd["blocks.input.pred_state"] = rand(n)
        sd["blocks.input.ln.g"], sd["blocks.input.ln.b"] = rand(n, std=0.1, mean=1.0), rand(n, std=0.1)
    for i in range(c[f"n_xf_blocks_{part}"]):
        b = f"blocks.block_{i}"
        for ln in ("f_attn.ln", "f_mlp.ln"):
            sd[f"{b}.{ln}.g"], sd[f"{b}.{ln}.b"] = rand(n, std=0.1, mean=1.0), rand(n, std=0.1)
        for name in ("f_q", "f_k", "f_v", "f_c"):
            sd[f"{b}.f_attn.{name}.w"] = rand(n, n, std=n ** -0.5)
            if name != "f_k":
                sd[f"{b}.f_attn.{name}.b"] = rand(n, std=0.1)
        sd[f"{b}.f_mlp.f_1.w"], sd[f"{b}.f_mlp.f_1.b"] = rand(4 * n, n, std=n ** -0.5), rand(4 * n, std=0.1)
        sd[f"{b}.f_mlp.f_2.w"], sd[f"{b}.f_mlp.f_2.b"] = rand(n, 4 * n, std=(4 * n) ** -0.5), rand(n, std=0.1)
    sd["blocks.output.ln.g"], sd["blocks.output.ln.b"] = rand(n, std=0.1, mean=1.0), rand(n, std=0.1)
    sd["blocks.output.f.w"] = rand(c["n_embd"], n, std=n ** -0.5)
    return sd


def write_clip_folder(folder, clip_files, seed: int = 0, **config_overrides):
    bpe_folder, n_vocab = clip_files
    os.makedirs(folder, exist_ok=True)
    config = tiny_config(n_vocab + 3, **config_overrides)
    states = {part: random_state(config, part, seed + k) for k, part in enumerate(("text", "image"))}
    torch.save(states["text"], os.path.join(folder, "clip_text_enc.pt"))
    torch.save(states["image"], os.path.join(folder, "clip_image_enc.pt"))
    shutil.copy(os.path.join(bpe_folder, "bpe_simple_vocab_16e6.txt.gz"), folder)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)
    return config, states


# ---------------------------------------------------------------- glide's forward, restated with einsum

MEANS = torch.tensor([122.77093945, 116.74601272, 104.09373519]).view(1, 3, 1, 1)
STDS = torch.tensor([68.50053285, 66.63215831, 70.32316309]).view(1, 3, 1, 1)


def glide_layout(n_context: int, causal: bool) -> torch.Tensor:
    """make_full_layout of glide's Dense(Causal)AttentionMask, block by 32x32 block, as a -1e10 bias."""
    bs = 32
    size = bs * math.ceil(n_context / bs)
    full = np.zeros((size, size), dtype=bool)
    for qb in range(size // bs):
        for kb in range(size // bs):
            block = np.ones((bs, bs), dtype=bool)
            rows = np.arange(qb * bs, (qb + 1) * bs)
            cols = np.arange(kb * bs, (kb + 1) * bs)
            block[rows >= n_context] = False
            block[:, cols >= n_context] = False
            if causal:
                block &= np.ones((bs, bs), bool) if qb > kb else np.tril(np.ones((bs, bs), bool)) if qb == kb \
                    else np.zeros((bs, bs), bool)
            full[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs] = block
    bias = 1 - full.astype(np.float32)
    bias[bias == 1] = -1e10
    return torch.from_numpy(bias)


def ref_ln(x, sd, key):
    return F.layer_norm(x.float(), (x.shape[-1],), sd[key + ".g"], sd[key + ".b"], 1e-5)


def ref_lin(x, sd, key):
    return F.linear(x, sd[key + ".w"], sd.get(key + ".b"))


def ref_blocks(h, sd, n_blocks, n_head, bias):
    n_ctx, size = h.shape[1], bias.shape[0]
    for i in range(n_blocks):
        b = f"blocks.block_{i}"
        r = ref_ln(h, sd, f"{b}.f_attn.ln")
        q, k, v = (F.pad(ref_lin(r, sd, f"{b}.f_attn.{name}"), (0, 0, 0, size - n_ctx))  # queries padded too
                   for name in ("f_q", "f_k", "f_v"))
        q, k, v = (x.view(x.shape[0], size, n_head, -1).permute(0, 2, 1, 3) for x in (q, k, v))
        scale = math.sqrt(1 / math.sqrt(q.shape[-1]))
        w = torch.softmax(torch.einsum("bhcd,bhkd->bhck", q * scale, k * scale) + bias[None, None], dim=-1)
        r = torch.einsum("bhck,bhkd->bhcd", w, v).permute(0, 2, 1, 3).reshape(h.shape[0], size, -1)[:, :n_ctx]
        h = h + ref_lin(r, sd, f"{b}.f_attn.f_c")
        r = ref_ln(h, sd, f"{b}.f_mlp.ln")
        h = h + ref_lin(F.gelu(ref_lin(r, sd, f"{b}.f_mlp.f_1")), sd, f"{b}.f_mlp.f_2")
    return h


def ref_text(sd, c, tokens, lengths):
    h = sd["blocks.input.w_voc"][tokens] + sd["blocks.input.w_pos"][None]
    h = ref_blocks(h, sd, c["n_xf_blocks_text"], c["n_head_text"], glide_layout(c["max_text_len"], causal=True))
    h = torch.gather(h, 1, (lengths - 1)[:, None, None].expand(-1, 1, h.shape[2]))
    return ref_lin(ref_ln(h, sd, "blocks.output.ln")[:, 0], sd, "blocks.output.f")


def ref_image(sd, c, image, t):
    p, n_state = c["patch_size"], sd["blocks.input.w_pos"].shape[1]
    x = F.conv2d((image - MEANS) / STDS, sd["blocks.input.patch_proj"], stride=p)
    x = x.reshape(x.shape[0], n_state, -1).permute(0, 2, 1)
    first = sd["blocks.input.w_t"][t][:, None] if t is not None else \
        sd["blocks.input.pred_state"][None, None].expand(x.shape[0], 1, -1)
    h = ref_ln(torch.cat((first, x), 1) + sd["blocks.input.w_pos"][None], sd, "blocks.input.ln")
    h = ref_blocks(h, sd, c["n_xf_blocks_image"], c["n_head_image"], glide_layout(h.shape[1], causal=False))
    return ref_lin(ref_ln(h[:, :1], sd, "blocks.output.ln")[:, 0], sd, "blocks.output.f")


# ---------------------------------------------------------------- noised CLIP tests

@pytest.mark.parametrize("max_text_len,n_timesteps", [(12, 10), (32, 0)])
def test_noised_clip_matches_glide_restatement(tmp_path, clip_files, max_text_len, n_timesteps):
    config, states = write_clip_folder(tmp_path, clip_files, max_text_len=max_text_len, n_timesteps=n_timesteps)
    clip = load_noised_clip(tmp_path)
    assert isinstance(clip, NoisedClip) and not any(p.requires_grad for p in clip.parameters())
    assert set(clip.text_encoder.state_dict()) == set(states["text"])
    assert set(clip.image_encoder.state_dict()) == set(states["image"])
    assert torch.exp(clip.logit_scale).item() == pytest.approx(100.0, rel=1e-6)
    prompts = ["a corgi in a field", "two dogs playing... in 2024", "x"]
    tokens, lengths = clip.encode_prompts(prompts)
    assert tokens.shape == (3, max_text_len)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 255
    t = torch.tensor([0, 7]) if n_timesteps else None
    # the same math as the restatement, other kernels and orders (tests/tolerances.py)
    text_terms = reduction_terms(clip.text_encoder, lambda: clip.text_encoder(tokens, lengths))
    image_terms = reduction_terms(clip.image_encoder, lambda: clip.image_encoder(image, t))
    with torch.no_grad():
        got, want = clip.text_encoder(tokens, lengths), ref_text(states["text"], config, tokens, lengths)
        torch.testing.assert_close(got, want, atol=fp32_bound(max(1.0, want.abs().max().item()), text_terms), rtol=0)
        got, want = clip.image_encoder(image, t), ref_image(states["image"], config, image, t)
        torch.testing.assert_close(got, want, atol=fp32_bound(max(1.0, want.abs().max().item()), image_terms), rtol=0)
        z_t = clip.text_embeddings(prompts)
        torch.testing.assert_close(z_t.norm(dim=-1), torch.ones(3))
        if n_timesteps:  # the image embedding depends on the timestep
            a, b = clip.image_encoder(image, torch.tensor([3, 3])), clip.image_encoder(image, torch.tensor([4, 4]))
            assert (a - b).abs().max() > 1e-3
            torch.testing.assert_close(clip.image_encoder(image, 3), a)
            x = image / 127.5 - 1
            z_i = clip.image_embeddings(x, t)
            score = clip.score(x, t, prompts[:1])
            # the same embeddings, normalised and multiplied in another order: ~n_embd + 4 roundings of
            # the score's scale, logit_scale = 100
            terms = z_i.shape[-1] + 4
            torch.testing.assert_close(score, 100 * (z_t[:1] * z_i).sum(-1), atol=fp32_bound(100.0, terms), rtol=0)


def test_text_encoder_is_causal(tmp_path, clip_files):
    write_clip_folder(tmp_path, clip_files)
    clip = load_noised_clip(tmp_path)
    tokens, lengths = clip.encode_prompts(["a red circle above a blue square"])
    n = int(lengths[0])
    assert 3 < n < tokens.shape[1]
    later, earlier = tokens.clone(), tokens.clone()
    later[0, n:] = 17  # padding after the end token: never seen by position n - 1
    earlier[0, 1] = 17
    with torch.no_grad():
        base = clip.text_encoder(tokens, lengths)
        torch.testing.assert_close(clip.text_encoder(later, lengths), base, rtol=0, atol=0)
        assert (clip.text_encoder(earlier, lengths) - base).abs().max() > 1e-4
        # The feature is read at length - 1: a shorter length reads an earlier position.
        assert (clip.text_encoder(tokens, lengths - 1) - base).abs().max() > 1e-4
        changed_last = tokens.clone()
        changed_last[0, n - 1] = 17
        assert (clip.text_encoder(changed_last, lengths) - base).abs().max() > 1e-4


def test_encoder_input_validation(tmp_path, clip_files):
    write_clip_folder(tmp_path / "t", clip_files)
    clip = load_noised_clip(tmp_path / "t")
    image = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="needs the timesteps"):
        clip.image_encoder(image)
    with pytest.raises(ValueError, match="must be 8x8"):
        clip.image_encoder(torch.zeros(2, 3, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip.image_encoder(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        clip.image_encoder(image, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="integer"):
        clip.image_encoder(image, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[B\] = \[2\]"):
        clip.image_encoder(image, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        clip.text_encoder(torch.zeros(1, 5, dtype=torch.long), torch.tensor([2]))
    with pytest.raises(ValueError, match="lengths"):
        clip.text_encoder(torch.zeros(1, 12, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="one prompt or one per image"):
        clip.score(image, torch.tensor([1, 2]), ["a", "b", "c"])
    write_clip_folder(tmp_path / "u", clip_files, n_timesteps=0)
    unconditional = load_noised_clip(tmp_path / "u")
    with pytest.raises(ValueError, match="n_timestep=0"):
        unconditional.image_encoder(image, torch.tensor([1, 2]))


def test_loader_errors_are_named(tmp_path, clip_files):
    config, states = write_clip_folder(tmp_path / "ok", clip_files)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    text = dict(states["text"])
    del text["blocks.block_1.f_attn.f_q.b"]
    text["blocks.block_1.f_attn.f_k.b"] = torch.zeros(8)
    text["blocks.output.f.w"] = torch.zeros(7, 8)
    torch.save(text, bad / "clip_text_enc.pt")
    with pytest.raises(ValueError) as info:
        load_noised_clip(bad)
    message = str(info.value)
    assert "clip_text_enc.pt" in message and "missing: blocks.block_1.f_attn.f_q.b" in message
    assert "unexpected: blocks.block_1.f_attn.f_k.b" in message
    assert "blocks.output.f.w (file (7, 8), model (6, 8))" in message
    assert state_dict_problems(states["text"], states["text"]) == []
    # A config that does not describe the weights is reported the same way.
    with pytest.raises(ValueError, match=r"clip_image_enc\.pt does not fit.*w_t \(file \(10, 12\), model \(20, 12\)\)"):
        load_noised_clip(tmp_path / "ok", config={**config, "n_timesteps": 20})
    (bad / "clip_image_enc.pt").write_bytes(b"not a checkpoint")
    shutil.copy(tmp_path / "ok" / "clip_text_enc.pt", bad / "clip_text_enc.pt")
    with pytest.raises(CheckpointError, match="clip_image_enc.pt"):
        load_noised_clip(bad)
    (bad / "clip_image_enc.pt").unlink()
    with pytest.raises(FileNotFoundError, match="clip_image_enc.pt"):
        load_noised_clip(bad)
    (tmp_path / "ok" / "bpe_simple_vocab_16e6.txt.gz").rename(tmp_path / "bpe.gz")
    with pytest.raises(FileNotFoundError, match=r"bpe_simple_vocab_16e6\.txt or .*\.txt\.gz"):
        load_noised_clip(tmp_path / "ok")
    # Explicit files and a YAML config work without a folder.
    yaml = require("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    clip = load_noised_clip(image=tmp_path / "ok" / "clip_image_enc.pt", text=tmp_path / "ok" / "clip_text_enc.pt",
                            bpe=tmp_path / "bpe.gz", config=tmp_path / "c.yaml")
    assert clip.image_encoder.n_timestep == 10
    with pytest.raises(ValueError, match="missing: bpe"):
        load_noised_clip(image=tmp_path / "ok" / "clip_image_enc.pt", text=tmp_path / "ok" / "clip_text_enc.pt")


def test_cond_fn_gradient(tmp_path, clip_files):
    write_clip_folder(tmp_path, clip_files)
    clip = load_noised_clip(tmp_path)
    prompts = ["a corgi in a field", "a red circle above a blue square"]
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
        t = torch.randint(0, 10, (2,), generator=gen)
        with torch.no_grad():  # as a sampler calls it
            grad = clip.cond_fn(prompts, 1.0)(x, t)
            assert grad.shape == x.shape and not grad.requires_grad
            torch.testing.assert_close(clip.cond_fn(prompts, 2.5)(x, t), 2.5 * grad)
            before = clip.score(x, t, prompts)
            norms = grad.flatten(1).norm(dim=1)
            step = (0.05 / norms)[:, None, None, None]  # a small move along each image's own gradient
            after = clip.score(x + step * grad, t, prompts)
        assert (after > before).all(), (seed, before, after)
        torch.testing.assert_close(after - before, 0.05 * norms, rtol=0.2, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(clip.cond_fn(prompts, 1.0)(x, t), grad)
    # Finite differences in float64 on a few elements agree with autograd.
    clip64 = clip.double()
    x64 = x.double()
    grad64 = clip64.cond_fn(prompts, 1.0)(x64, t)
    # float32's own rounding against float64, through both encoders forward and the image one back
    terms = 2 * reduction_terms(clip64.image_encoder, lambda: clip64.image_embeddings(x64, t)) + \
        reduction_terms(clip64.text_encoder, lambda: clip64.text_embeddings(prompts))
    torch.testing.assert_close(grad64.float(), grad, atol=fp32_bound(grad64.abs().max().item(), terms), rtol=0)
    h = 1e-5
    for index in [(0, 0, 1, 2), (1, 2, 7, 3), (1, 1, 4, 4)]:
        plus, minus = x64.clone(), x64.clone()
        plus[index] += h
        minus[index] -= h
        with torch.no_grad():
            numeric = (clip64.score(plus, t, prompts).sum() - clip64.score(minus, t, prompts).sum()) / (2 * h)
        assert float(numeric) == pytest.approx(float(grad64[index]), rel=1e-5, abs=1e-7)


def test_clip_defaults_are_glides():
    assert CLIP_DEFAULTS["logit_scale"] == 100.0 and CLIP_DEFAULTS["n_timesteps"] == 1000
    assert (CLIP_DEFAULTS["image_size"], CLIP_DEFAULTS["patch_size"], CLIP_DEFAULTS["max_text_len"]) == (64, 4, 77)
    assert (CLIP_DEFAULTS["n_embd"], CLIP_DEFAULTS["n_head_text"], CLIP_DEFAULTS["n_head_image"]) == (512, 8, 12)
    assert CLIP_DEFAULTS["n_vocab"] == 65536 and CLIP_DEFAULTS["n_xf_blocks_text"] == 12
