"""VQ-Diffusion's models against diffusers' on the same random weights: the VQ-VAE (encode to
tokens, decode tokens) and the discrete transformer (log p(x0 | x_t)), over several configs,
timesteps given as scalars or per sample, reduced precision, and strict loading."""
import copy
import os

import pytest
import torch

from fastdiff.loaders import diffusers_folder as folder_io
from fastdiff.loaders.files import CheckpointError
from fastdiff.models.discrete_transformer import VQDiffusionTransformer
from fastdiff.models.vqvae import VQModel
from deps import require

diffusers = require("diffusers")
from sd_fixtures import randomize  # noqa: E402
from tolerances import fp32_bound, reduction_terms  # noqa: E402

TRANSFORMERS = {
    "ithq-like": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=24,
                      attention_bias=True, sample_size=4, num_vector_embeds=97, activation_fn="geglu-approximate",
                      num_embeds_ada_norm=12, norm_type="ada_norm"),
    # an older config: norm_type unset (diffusers reads it as ada_norm), geglu, no bias, odd grid
    "legacy-geglu": dict(num_attention_heads=3, attention_head_dim=6, num_layers=1, cross_attention_dim=10,
                         sample_size=5, num_vector_embeds=31, activation_fn="geglu", num_embeds_ada_norm=7),
}


def save(module, folder):
    module.save_pretrained(folder)
    return os.path.dirname(folder), os.path.basename(folder)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_log_probs_match_diffusers(tmp_path, name):
    ref = randomize(diffusers.Transformer2DModel(**TRANSFORMERS[name]), 3).eval()
    ours = folder_io.load_module(VQDiffusionTransformer, *save(ref, str(tmp_path / "transformer")))
    K, N, T = ref.config.num_vector_embeds, ref.num_latent_pixels, ref.config.num_embeds_ada_norm
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, K, (3, N), generator=gen)
    tokens[:, ::3] = K - 1  # masked latent pixels
    context = torch.randn(3, 7, ref.config.cross_attention_dim, generator=gen)
    # the same math with other kernels and orders, and a row alone on other GEMM blockings
    # than in its batch (tests/tolerances.py)
    terms = reduction_terms(ours, lambda: ours(tokens, context, torch.tensor([0])))
    with torch.no_grad():
        for t in (0, T // 2, T - 1):
            want = ref(tokens, encoder_hidden_states=context, timestep=torch.tensor(t)).sample
            got = ours(tokens, context, torch.tensor([t]))
            assert got.dtype == torch.float32 and got.shape == (3, K - 1, N)
            torch.testing.assert_close(got, want, atol=fp32_bound(max(1.0, want.abs().max().item()), terms), rtol=0)
        # one timestep per sample (diffusers' AdaLayerNorm only takes one): each row alone
        per_sample = ours(tokens, context, torch.tensor([0, 1, T - 1]))
        for i, t in enumerate((0, 1, T - 1)):
            alone = ours(tokens[i:i + 1], context[i:i + 1], t)
            torch.testing.assert_close(per_sample[i:i + 1], alone, atol=fp32_bound(max(1.0, alone.abs().max().item()),
                                                                                    terms), rtol=0)


def test_transformer_reduced_precision_is_close(tmp_path):
    ref = randomize(diffusers.Transformer2DModel(**TRANSFORMERS["ithq-like"]), 4).eval()
    folder, name = save(ref, str(tmp_path / "transformer"))
    fp32 = folder_io.load_module(VQDiffusionTransformer, folder, name)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 16), generator=gen)
    context = torch.randn(2, 5, 24, generator=gen)
    with torch.no_grad():
        want = fp32(tokens, context, 3).exp()  # probabilities, not log-probabilities
        for dtype in (torch.bfloat16, torch.float16):
            low = folder_io.load_module(VQDiffusionTransformer, folder, name, dtype=dtype)
            got = low(tokens, context.to(dtype), 3)
            assert got.dtype == torch.float32
            theirs = copy.deepcopy(ref).to(dtype)(tokens, encoder_hidden_states=context.to(dtype),
                                                  timestep=torch.tensor(3)).sample.float().exp()
            mine, pytorch = (got.exp() - want).abs().max().item(), (theirs - want).abs().max().item()
            # STYLE.md item 6: as close to float32 as diffusers' model in the same dtype, within
            # twice its error and an ulp of a probability
            assert mine <= 2 * pytorch + torch.finfo(dtype).eps, (dtype, mine, pytorch)


VQ_CONFIGS = {
    "two-level": dict(block_out_channels=(8, 16), latent_channels=8, vq_embed_dim=6, num_vq_embeddings=50,
                      norm_num_groups=4, layers_per_block=1),
    "three-level-no-embed-dim": dict(block_out_channels=(8, 8, 16), latent_channels=5, num_vq_embeddings=33,
                                     norm_num_groups=4, layers_per_block=2, mid_block_add_attention=False),
}


@pytest.mark.parametrize("name", list(VQ_CONFIGS))
def test_vqvae_tokens_and_decode_match_diffusers(tmp_path, name):
    cfg = VQ_CONFIGS[name]
    levels = len(cfg["block_out_channels"])
    ref = randomize(diffusers.VQModel(down_block_types=("DownEncoderBlock2D",) * levels,
                                      up_block_types=("UpDecoderBlock2D",) * levels, sample_size=16, **cfg), 5).eval()
    ours = folder_io.load_module(VQModel, *save(ref, str(tmp_path / "vqvae")))
    assert ours.downsample_factor == 2 ** (levels - 1) and ours.num_codes == cfg["num_vq_embeddings"]
    images = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(2)) * 2 - 1
    h, w = 16 // ours.downsample_factor, 12 // ours.downsample_factor
    with torch.no_grad():
        _, _, (_, _, indices) = ref.quantize(ref.encode(images).latents)
        tokens = ours.encode_tokens(images)
        assert torch.equal(tokens, indices.reshape(2, -1))
        embed_dim = cfg.get("vq_embed_dim") or cfg["latent_channels"]
        want = ref.decode(ref.quantize.get_codebook_entry(tokens, shape=(2, h, w, embed_dim)),
                          force_not_quantize=True).sample
        terms = reduction_terms(ours, lambda: ours.decode_tokens(tokens, h, w))
        torch.testing.assert_close(ours.decode_tokens(tokens, h, w), want,
                                   atol=fp32_bound(max(1.0, want.abs().max().item()), terms), rtol=0)
        with pytest.raises(ValueError, match="codebook"):
            ours.decode_tokens(torch.full((2, h * w), cfg["num_vq_embeddings"]), h, w)
        with pytest.raises(ValueError, match="grid"):
            ours.decode_tokens(tokens, h + 1, w)


def test_strict_loading_names_the_missing_key(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = randomize(diffusers.Transformer2DModel(**TRANSFORMERS["ithq-like"]), 6)
    folder, name = save(ref, str(tmp_path / "transformer"))
    path = os.path.join(folder, name, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    del state["transformer_blocks.1.norm2.linear.weight"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match="transformer_blocks.1.norm2.linear.weight"):
        folder_io.load_module(VQDiffusionTransformer, folder, name)


@pytest.mark.parametrize("change,match", [
    (dict(norm_type="ada_norm_zero"), "norm_type"),
    (dict(num_embeds_ada_norm=None, norm_type="layer_norm"), "num_embeds_ada_norm"),
    (dict(activation_fn="swiglu"), "activation"),
    (dict(only_cross_attention=True), "only_cross_attention"),
    (dict(num_vector_embeds=None, in_channels=4), "num_vector_embeds"),
])
def test_unsupported_transformer_configs_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        VQDiffusionTransformer.from_config({**TRANSFORMERS["ithq-like"], **change})


def test_unsupported_vqvae_configs_are_named():
    with pytest.raises(ValueError, match="spatial"):
        VQModel.from_config({**VQ_CONFIGS["two-level"], "norm_type": "spatial"})
    with pytest.raises(ValueError, match="unknown config key"):
        VQModel.from_config({**VQ_CONFIGS["two-level"], "remap": "used.npy"})
