"""fastdiff's SD UNet and VAE against diffusers': same weights (strict state-dict load), same inputs.

Tiny random models in fp32 on CPU. Every parameter is randomized, because diffusers
zero-initializes some layers (conv_out, proj_out, ...) and a zero layer hides a bug
upstream of it. Outputs must agree to what summing in another order can move them by
(tests/tolerances.py): 6e-5 to 1.5e-4 here, for outputs up to ~3.
"""
import json

import pytest
import torch

from fastdiff.models import AutoencoderKL, UNet2DConditionModel
from tolerances import fp32_bound, reduction_terms
from deps import require

diffusers = require("diffusers")

UNET_BASE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
UNET_CONFIGS = {
    "sd1": dict(layers_per_block=2, attention_head_dim=8),
    "sd2": dict(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True, cross_attention_dim=24,
                dropout=0.1,
                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
    "only_cross": dict(only_cross_attention=True, flip_sin_to_cos=False, freq_shift=1, center_input_sample=True,
                       mid_block_scale_factor=1.5, downsample_padding=0, norm_num_groups=16),
    "three_levels": dict(block_out_channels=(32, 64, 64), attention_head_dim=[2, 4, 4], cross_attention_dim=24,
                         only_cross_attention=[False, True, False],
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}
# (name, latent H x W): odd sizes exercise the upsample-to-skip-size path
UNET_CASES = [("sd1", (16, 16)), ("sd1", (9, 11)), ("sd2", (8, 8)), ("only_cross", (8, 8)),
              ("three_levels", (16, 16)), ("three_levels", (9, 11))]
TIMESTEPS = {
    "0d_int": torch.tensor(999),
    "batch_int": torch.tensor([10, 999]),
    "batch_float": torch.tensor([0.5, 700.25]),
    "0d_float": torch.tensor(412.75, dtype=torch.float64),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), every other parameter ~ N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise / (p[0].numel() ** 0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def as_json(config) -> dict:
    """A config the way a loader sees it: config.json, lists instead of tuples, _keys included."""
    return json.loads(json.dumps(dict(config)))


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, terms: int) -> None:
    """The same math with other kernels (fastdiff's group_norm, attention and layouts against
    diffusers' modules) differs in the order of its sums, over `terms` roundings."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    diff = (ours - ref).abs().max().item()
    bound = fp32_bound(max(1.0, ref.abs().max().item()), terms)
    print(f"{name}: max abs diff {diff:.3g} (reference max |x| {ref.abs().max().item():.3g}, bound {bound:.3g})")
    assert diff <= bound, f"{name}: max abs diff {diff} > {bound}"


def unet_pair(name: str):
    ref = diffusers.UNet2DConditionModel(**{**UNET_BASE, **UNET_CONFIGS[name]}).eval()
    randomize_(ref, seed=len(name))
    ours = UNet2DConditionModel.from_config(as_json(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def unets():
    return {name: unet_pair(name) for name in UNET_CONFIGS}


@pytest.mark.parametrize("name,size", UNET_CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in UNET_CASES])
def test_unet_matches_diffusers(unets, name, size):
    ours, ref = unets[name]
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, *size, generator=gen)
    context = torch.randn(2, 7, ref.config.cross_attention_dim, generator=gen)
    terms = reduction_terms(ours, lambda: ours(sample, TIMESTEPS["0d_int"], context))
    with torch.no_grad():
        for tname, t in TIMESTEPS.items():
            assert_close(f"{name} {size} t={tname}", ours(sample, t, context), ref(sample, t, context).sample, terms)


@pytest.mark.parametrize("name", ["sd1", "sd2", "only_cross"])
def test_unet_encoder_attention_mask(unets, name):
    """A padding mask without fully masked rows: diffusers' -10000 bias and a hard mask agree."""
    ours, ref = unets[name]
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, ref.config.cross_attention_dim, generator=gen)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    t = torch.tensor([3, 501])
    terms = reduction_terms(ours, lambda: ours(sample, t, context, encoder_attention_mask=mask))
    with torch.no_grad():
        masked = ours(sample, t, context, encoder_attention_mask=mask)
        assert_close(f"{name} masked", masked, ref(sample, t, context, encoder_attention_mask=mask).sample, terms)
        assert_close(f"{name} 0/1 float mask", ours(sample, t, context, encoder_attention_mask=mask.float()), masked,
                     terms)
        # the mask must matter: the padded keys carry different values in sample 1 only
        assert (masked[1] - ours(sample, t, context)[1]).abs().max() > 1e-4
        assert_close(f"{name} unmasked sample 0", masked[0], ours(sample, t, context)[0], terms)


def test_unet_dropout_sits_where_diffusers_puts_it(unets):
    """Module names match, so training-mode dropout can be compared layer by layer: diffusers
    gives the config's dropout to the resnets only, the transformers keep 0."""
    ours, ref = unets["sd2"]

    def dropouts(model):
        return {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}

    assert dropouts(ours) == dropouts(ref)
    assert {p for name, p in dropouts(ours).items() if "resnets" in name} == {0.1}


def test_unet_has_no_data_dependent_host_ops(unets):
    """On the meta device every .item() or branch on a tensor value raises; the forward must not need one."""
    ours, _ = unets["three_levels"]
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(ours.config)
        out = model(torch.empty(2, 4, 9, 11), torch.empty((), dtype=torch.int64), torch.empty(2, 7, 24),
                    encoder_attention_mask=torch.empty(2, 7, dtype=torch.bool))
    assert out.shape == (2, 4, 9, 11)


UNSUPPORTED_UNET = [
    ("addition_embed_type", "text"), ("class_embed_type", "timestep"), ("num_class_embeds", 10),
    ("time_cond_proj_dim", 32), ("resnet_time_scale_shift", "scale_shift"), ("attention_type", "gated"),
    ("transformer_layers_per_block", 2), ("num_attention_heads", 8), ("dual_cross_attention", True),
    ("encoder_hid_dim", 16), ("time_embedding_type", "fourier"), ("mid_block_type", "UNetMidBlock2D"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]), ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("act_fn", "gelu"), ("some_future_key", 1),
]


@pytest.mark.parametrize("key,value", UNSUPPORTED_UNET, ids=[k for k, _ in UNSUPPORTED_UNET])
def test_unet_unsupported_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        UNet2DConditionModel.from_config({**UNET_BASE, key: value})


VAE_BASE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                norm_num_groups=8, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)
VAE_CONFIGS = {
    "sd": dict(),
    "two_layers_16_groups": dict(layers_per_block=2, norm_num_groups=16, scaling_factor=0.13025),
    "no_quant_no_attention": dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                                  block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3),
}


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_matches_diffusers(name):
    ref = diffusers.AutoencoderKL(**{**VAE_BASE, **VAE_CONFIGS[name]}).eval()
    randomize_(ref, seed=7)
    ours = AutoencoderKL.from_config(as_json(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.scaling_factor == ref.config.scaling_factor
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    z = torch.randn(2, 4, 5, 6, generator=gen)
    encode, decode = reduction_terms(ours, lambda: ours.encode(image)), reduction_terms(ours, lambda: ours.decode(z))
    with torch.no_grad():
        mean, logvar = ours.encode(image)
        posterior = ref.encode(image).latent_dist
        assert_close(f"vae {name} mean", mean, posterior.mean, encode)
        assert_close(f"vae {name} logvar", logvar, posterior.logvar, encode)
        assert_close(f"vae {name} decode", ours.decode(z), ref.decode(z).sample, decode)


def test_vae_clamps_logvar():
    model = AutoencoderKL.from_config(VAE_BASE)
    with torch.no_grad():
        model.quant_conv.bias[4:] = 100.0  # the logvar half of the moments
        _, logvar = model.encode(torch.zeros(1, 3, 8, 8))
    assert logvar.max().item() == 20.0


UNSUPPORTED_VAE = [("down_block_types", ["DownEncoderBlock2D", "DownBlock2D"]),
                   ("up_block_types", ["UpDecoderBlock2D"]), ("act_fn", "relu"), ("norm_type", "spatial")]


@pytest.mark.parametrize("key,value", UNSUPPORTED_VAE, ids=[k for k, _ in UNSUPPORTED_VAE])
def test_vae_unsupported_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        AutoencoderKL.from_config({**VAE_BASE, key: value})
