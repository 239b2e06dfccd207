"""fastdiff's CLIP text transformer against transformers' CLIPTextModel: the same folder, as
save_pretrained writes it, loaded by both; the same ids; fp32 on CPU.

Every output (last_hidden_state, pooler_output and every hidden state, which clip_skip reads)
must agree to what summing in another order can move it by (tests/tolerances.py), and one
weight 1% off must not. Then the loader's refusals, and that the module never imports transformers.
"""
import fractions
import json
import os
import subprocess
import sys

import pytest
import torch

from deps import require
from sd_fixtures import randomize
from tolerances import fp32_bound, reduction_terms

from fastdiff.loaders.diffusers_folder import load_clip_text
from fastdiff.models.clip_text import CLIPTextConfig, CLIPTextTransformer

transformers = require("transformers")
safetensors_torch = require("safetensors.torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, MAX_LEN, BOS, EOS = 40, 16, 38, 39
# (hidden_act, eos_token_id): SD 1.x-like CLIP-L, SD 2.x-like OpenCLIP, and the legacy eos_token_id 2
# for which transformers pools at the largest id.
KINDS = {"quick_gelu": ("quick_gelu", EOS), "gelu": ("gelu", EOS),
         "quick_gelu_legacy": ("quick_gelu", 2), "gelu_legacy": ("gelu", 2)}
SHAPES = [(1, 1), (2, 7), (3, MAX_LEN)]  # (batch, length): a single token, a short prompt, the longest


def make_reference(folder, hidden_act="quick_gelu", eos_token_id=EOS, seed=0):
    """A tiny random CLIPTextModel saved by transformers into `folder`; returned in eval mode."""
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_LEN, projection_dim=32, bos_token_id=BOS, eos_token_id=eos_token_id,
        pad_token_id=EOS, hidden_act=hidden_act)
    model = randomize(transformers.CLIPTextModel(config), seed).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (folder, reference model)."""
    made = {}
    for seed, (kind, (act, eos)) in enumerate(KINDS.items()):
        folder = str(tmp_path_factory.mktemp(kind))
        made[kind] = (folder, make_reference(folder, act, eos, seed))
    return made


def prompt_ids(batch, length, seed=0):
    """Tokenizer-like ids: bos, words, eos, then eos as padding; the attention mask keeps bos..eos.
    Prompts of several lengths, so the pooled position differs per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), EOS, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        text = max(0, min(length - 2, length - 2 - row * 2))  # words before eos (0 for the shortest)
        ids[row, 0] = BOS
        ids[row, 1:1 + text] = torch.randint(3, BOS, (text,), generator=gen)
        mask[row, :min(length, text + 2)] = 1
    return ids, mask


def assert_close(name, ours, ref, terms):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (name, ours.shape, ref.shape, ours.dtype, ref.dtype)
    diff = (ours - ref).abs().max().item()
    bound = fp32_bound(max(1.0, ref.abs().max().item()), terms)
    assert diff <= bound, f"{name}: max abs diff {diff} > {bound}"


def compare(ours, ref, ids, mask, name):
    terms = reduction_terms(ours, lambda: ours(ids, attention_mask=mask, output_hidden_states=True))
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
        want = ref(ids, attention_mask=mask, output_hidden_states=True)
    assert_close(f"{name} last_hidden_state", got.last_hidden_state, want.last_hidden_state, terms)
    assert_close(f"{name} pooler_output", got.pooler_output, want.pooler_output, terms)
    assert len(got.hidden_states) == len(want.hidden_states) == ours.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert_close(f"{name} hidden_states[{i}]", a, b, terms)
    return terms


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_transformers(folders, kind, masked):
    folder, ref = folders[kind]
    ours = load_clip_text(folder)
    assert ours.dtype == torch.float32 and not ours.training
    for batch, length in SHAPES:
        ids, mask = prompt_ids(batch, length, seed=batch * 100 + length)
        compare(ours, ref, ids, mask if masked else None, f"{kind} {batch}x{length}")


def test_query_with_no_visible_key_matches(folders):
    """A padded first token sees no key at all (causal mask and padding together): transformers' SDPA
    path gives that query zeros, and so does fastdiff."""
    folder, ref = folders["quick_gelu"]
    ids, mask = prompt_ids(2, 7)
    mask[0, 0] = 0
    compare(load_clip_text(folder), ref, ids, mask, "first token masked")


def test_outputs_index_as_transformers(folders):
    folder, ref = folders["quick_gelu"]
    ours = load_clip_text(folder)
    ids, _ = prompt_ids(2, 7)
    with torch.no_grad():
        out = ours(ids)
        assert out.hidden_states is None and len(out) == 2
        assert out[0] is out.last_hidden_state and out[1] is out.pooler_output
        assert ours(ids, return_dict=True).pooler_output.shape == (2, 32)
        assert len(ours(ids, output_hidden_states=True)) == 3


@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_clip_skip_as_the_pipeline_reads_it(folders, clip_skip):
    """StableDiffusionPipeline._embed: final_layer_norm (at text_model.final_layer_norm or, flat, at the
    top) over hidden_states[-(clip_skip + 1)]."""
    folder, ref = folders["gelu"]
    ours = load_clip_text(folder)
    ids, _ = prompt_ids(2, MAX_LEN)
    terms = reduction_terms(ours, lambda: ours(ids, output_hidden_states=True))

    def embed(encoder):
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        return getattr(encoder, "text_model", encoder).final_layer_norm(hidden[-(clip_skip + 1)])

    with torch.no_grad():
        assert_close(f"clip_skip={clip_skip}", embed(ours), embed(ref), terms)
    assert ours.config.num_hidden_layers == 3 and ours.config.hidden_size == 32 and ours.config.vocab_size == VOCAB


def test_bound_catches_one_weight_one_percent_off(folders):
    folder, ref = folders["quick_gelu"]
    ours = load_clip_text(folder)
    ids, mask = prompt_ids(3, MAX_LEN)
    with torch.no_grad():
        ours.encoder.layers[1].mlp.fc1.weight.mul_(1.01)
    with pytest.raises(AssertionError, match="last_hidden_state: max abs diff"):
        compare(ours, ref, ids, mask, "perturbed")


def _state(ref, prefix=""):
    state = {prefix + k: v.clone() for k, v in ref.state_dict().items()}
    state[prefix + "embeddings.position_ids"] = torch.arange(MAX_LEN)[None]  # as older checkpoints carry it
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("prefix", ["text_model.", ""], ids=["prefixed", "flat"])
def test_loads_both_key_layouts_and_formats(folders, tmp_path, fmt, prefix):
    """transformers < 5.6 wrote text_model.* names (and some files a position_ids buffer); pytorch_model.bin
    is read with weights_only=True."""
    folder, ref = folders["quick_gelu"]
    with open(os.path.join(folder, "config.json")) as src, open(tmp_path / "config.json", "w") as dst:
        dst.write(src.read())
    state = _state(ref, prefix)
    if fmt == "safetensors":
        safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    ours = load_clip_text(tmp_path)
    compare(ours, ref, *prompt_ids(2, 7), f"{prefix or 'flat'} {fmt}")


def test_safetensors_first_and_dtype(folders, tmp_path):
    folder, ref = folders["gelu"]
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(folder, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    torch.save({"not": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # would fail if read
    half = load_clip_text(tmp_path, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.device.type == "cpu"
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_config_reads_as_transformers_config(folders):
    folder, ref = folders["quick_gelu_legacy"]
    config = load_clip_text(folder).config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                "pad_token_id", "projection_dim"):
        assert getattr(config, key) == getattr(ref.config, key), key
    assert config.to_dict()["eos_token_id"] == 2 and config.to_dict()["model_type"] == "clip_text_model"
    assert getattr(config, "use_attention_mask", False) is False  # the pipeline's probe
    assert CLIPTextConfig(config.to_dict()) == config
    model = CLIPTextTransformer(config.to_dict())
    assert set(model.state_dict()) == set(ref.state_dict())  # flat names, as transformers >= 5.6


# ---------------------------------------------------------------------------------------- bad input

def _copy(folder, dst, state=None, config=None):
    with open(os.path.join(folder, "config.json")) as fh:
        values = json.load(fh)
    values.update(config or {})
    with open(dst / "config.json", "w") as fh:
        json.dump(values, fh)
    if state is not None:
        safetensors_torch.save_file(state, str(dst / "model.safetensors"))


def _edit(ref, change):
    state = _state(ref)
    change(state)
    return state


BAD_WEIGHTS = {
    "missing": (lambda s: s.pop("encoder.layers.2.mlp.fc2.bias"), "1 missing: encoder.layers.2.mlp.fc2.bias"),
    "unexpected": (lambda s: s.update(extra=torch.zeros(3)), "1 unexpected: extra"),
    "shape": (lambda s: s.update({"final_layer_norm.weight": torch.ones(31)}),
              r"shape mismatch: final_layer_norm.weight \(file \(31,\), model \(32,\)\)"),
    "nan": (lambda s: s["encoder.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan")),
            "NaN or infinite values in encoder.layers.0.self_attn.q_proj.weight"),
    "integer": (lambda s: s.update({"final_layer_norm.bias": torch.zeros(32, dtype=torch.int64)}),
                r"integer tensors for float parameters: final_layer_norm.bias \(torch.int64\)"),
}


@pytest.mark.parametrize("problem", list(BAD_WEIGHTS))
def test_refuses_weights_that_do_not_fit(folders, tmp_path, problem):
    change, message = BAD_WEIGHTS[problem]
    _copy(folders["quick_gelu"][0], tmp_path, _edit(folders["quick_gelu"][1], change))
    with pytest.raises(ValueError, match=message) as info:
        load_clip_text(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(info.value) and "\n" not in str(info.value)


def test_refuses_missing_and_truncated_files(folders, tmp_path):
    folder, ref = folders["quick_gelu"]
    with pytest.raises(FileNotFoundError, match="missing file: .*config.json"):
        load_clip_text(tmp_path)
    _copy(folder, tmp_path)
    with pytest.raises(FileNotFoundError,
                       match="no weights in .*expected one of model.safetensors, .*pytorch_model.bin"):
        load_clip_text(tmp_path)
    with open(os.path.join(folder, "model.safetensors"), "rb") as fh:
        data = fh.read()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError,
                       match="cannot read .*model.safetensors: corrupt or truncated safetensors file") as info:
        load_clip_text(tmp_path)
    assert "\n" not in str(info.value)
    os.remove(tmp_path / "model.safetensors")

    # A pickle that holds an object other than tensors, which weights_only=True refuses.
    torch.save({"w": fractions.Fraction(1, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: it holds objects other than tensors"):
        load_clip_text(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_clip_text(tmp_path)


BAD_CONFIGS = {
    "act": (dict(hidden_act="relu"), r"config.json: config key 'hidden_act'='relu' is not supported"),
    "type": (dict(hidden_size="32"), r"config key 'hidden_size'='32' is not valid \(needs an integer >= 1\)"),
    "bool": (dict(num_hidden_layers=True), r"config key 'num_hidden_layers'=True is not valid"),
    "heads": (dict(num_attention_heads=5), "hidden_size=32 is not divisible by num_attention_heads=5"),
    "eps": (dict(layer_norm_eps=0), r"'layer_norm_eps'=0 is not valid"),
    "eos_list": (dict(eos_token_id=[2, 3]), r"'eos_token_id'=\[2, 3\] is not valid"),
    "missing": (dict(vocab_size=None), "config key 'vocab_size' is missing"),
}


@pytest.mark.parametrize("problem", list(BAD_CONFIGS))
def test_refuses_bad_configs(folders, tmp_path, problem):
    change, message = BAD_CONFIGS[problem]
    folder, ref = folders["quick_gelu"]
    _copy(folder, tmp_path, _state(ref), {k: v for k, v in change.items() if v is not None})
    if problem == "missing":
        values = json.loads((tmp_path / "config.json").read_text())
        del values["vocab_size"]
        (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message) as info:
        load_clip_text(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value) and "\n" not in str(info.value)


def test_refuses_bad_inputs(folders):
    ours = load_clip_text(folders["quick_gelu"][0])
    with pytest.raises(ValueError, match="1 to 16"):
        ours(torch.zeros(1, MAX_LEN + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        ours(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        ours(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))


def test_import_does_not_load_transformers():
    code = ("import sys, fastdiff.models.clip_text; "
            "found = sorted(m for m in sys.modules if m.startswith('transformers')); "
            "assert not found, found")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_pipelines_load_it_and_the_main_job_never_imports_transformers_modeling():
    """The built-in model (a diffusers SD folder; the README's main job) gets fastdiff's text
    encoder, and transformers' CLIP modeling module (4-5 s of start-up) is never imported."""
    code = ("import sys, fastdiff; pipe = fastdiff.Pipeline(); "
            "from fastdiff.models.clip_text import CLIPTextTransformer; "
            "assert isinstance(pipe.text_encoder, CLIPTextTransformer), type(pipe.text_encoder); "
            "found = sorted(m for m in sys.modules if m.startswith('transformers.models.clip.modeling')); "
            "assert not found, found")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
