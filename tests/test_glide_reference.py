"""Self-checks of tests/glide_reference.py, the restatement of GLIDE the GLIDE tests lean on.

These use no fastdiff code: they check the restatement against GLIDE's published facts
and against second, independent derivations of the same equations.
"""
import numpy as np
import pytest
import torch

import glide_reference as R

TINY = dict(image_size=16, channel_mult="1,2", num_channels=32, num_res_blocks=1, num_head_channels=16,
            attention_resolutions="16,8", text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2, use_fp16=False)
N_VOCAB = 100


def tiny_options(**overrides):
    return R.glide_options(**{**TINY, **overrides})


# --- timestep spacing and schedules ------------------------------------------------------

def test_fast27_spacing():
    steps = R.space_timesteps(1000, "fast27")
    assert len(steps) == 27
    assert 997 in steps and 999 not in steps and 0 in steps
    assert 999 in R.space_timesteps(1000, "10,10,3,2,2")


def test_ddim_and_section_spacing():
    assert R.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    hundred = R.space_timesteps(1000, "100")
    assert len(hundred) == 100 and {0, 999} <= hundred
    assert R.space_timesteps(1000, "100") == R.space_timesteps(1000, [100]) == R.space_timesteps(1000, 100)
    with pytest.raises(ValueError):
        R.space_timesteps(1000, "ddim600")  # strides 1 and 2 give 1000 and 500


def test_named_betas():
    lin = R.named_betas("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    assert R.named_betas("linear", 500)[-1] == pytest.approx(0.04)  # scaled by 1000 / T
    cos = R.named_betas("squaredcos_cap_v2", 1000)
    assert cos.max() == 0.999 and cos[-1] == 0.999
    # below the cap, the cumulative product follows Nichol & Dhariwal's alpha_bar(t) / alpha_bar(0)
    f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(1, 901)
    np.testing.assert_allclose(np.cumprod(1 - cos)[:900], f(t / 1000) / f(0), rtol=1e-10)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("respacing", ["fast27", "ddim50", "100"])
def test_respaced_betas_reproduce_kept_alphas_cumprod(schedule, respacing):
    betas = R.named_betas(schedule, 1000)
    diffusion = R.SpacedDiffusionRef(betas, R.space_timesteps(1000, respacing))
    assert diffusion.timestep_map == sorted(R.space_timesteps(1000, respacing))
    kept = np.cumprod(1 - betas)[diffusion.timestep_map]
    np.testing.assert_allclose(np.cumprod(1 - diffusion.betas), kept, rtol=1e-10)
    np.testing.assert_allclose(diffusion.alphas_cumprod, kept, rtol=1e-10)


# --- checkpoint layout and forward -------------------------------------------------------

@pytest.mark.parametrize("upsampler,inpaint,count", [
    # counted from glide-text2im's create_model(**defaults) at commit 69b5307 (the notebooks'
    # "total base parameters" / "total upsampler parameters")
    (False, False, 385_030_726), (True, False, 398_361_286),
    (False, True, 385_037_638), (True, True, 398_368_198),
])
def test_full_size_parameter_counts(upsampler, inpaint, count):
    shapes = R.glide_param_shapes(R.glide_options(upsampler=upsampler, inpaint=inpaint))
    assert sum(int(np.prod(s)) for s in shapes.values()) == count
    assert shapes["token_embedding.weight"] == (R.GLIDE_N_VOCAB, 512)
    assert shapes["input_blocks.0.0.weight"][1] == 3 + 4 * inpaint + 3 * upsampler


class _Recording(dict):
    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _inputs(options, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, ctx = options["image_size"], options["text_ctx"]
    x = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.randint(0, N_VOCAB, (batch, ctx), generator=g)
    mask = torch.arange(ctx)[None] < torch.tensor([[5], [2]])[:batch]
    extra = {}
    if options["super_res"]:
        extra["low_res"] = torch.randn(batch, 3, size // 4, size // 4, generator=g)
    if options["inpaint"]:
        extra["inpaint_image"] = torch.randn(batch, 3, size, size, generator=g)
        extra["inpaint_mask"] = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return x, torch.tensor([999, 3])[:batch], tokens, mask, extra


@pytest.mark.parametrize("variant", [{}, {"super_res": True}, {"inpaint": True}, {"super_res": True, "inpaint": True},
                                     {"use_scale_shift_norm": False, "resblock_updown": False, "xf_padding": False,
                                      "xf_final_ln": False, "num_head_channels": -1, "num_heads": 2}])
def test_tiny_forward_uses_every_parameter(variant):
    options = tiny_options(**variant)
    state = R.random_glide_state_dict(options, seed=1, n_vocab=N_VOCAB)
    assert list(state) == list(R.glide_param_shapes(options, n_vocab=N_VOCAB))
    assert all(v.dtype == torch.float32 and v.abs().max() > 0 for v in state.values())
    assert ("padding_embedding" in state) == options["xf_padding"]
    assert ("input_blocks.2.0.op.weight" in state) != options["resblock_updown"]
    recording = _Recording(state)
    x, t, tokens, mask, extra = _inputs(options)
    with torch.no_grad():
        out = R.reference_forward(recording, options, x, t, tokens, mask, **extra)
    assert out.shape == (2, 6, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and 0.05 < out.std() < 5
    assert recording.read == set(state)


def test_text_conditioning_and_padding():
    options = tiny_options()
    state = R.random_glide_state_dict(options, seed=2, n_vocab=N_VOCAB)
    x, t, tokens, mask, _ = _inputs(options)
    run = lambda tok, m: R.reference_forward(state, options, x, t, tok, m)  # noqa: E731
    with torch.no_grad():
        base = run(tokens, mask)
        padded = tokens.clone()
        padded[~mask] = (padded[~mask] + 7) % N_VOCAB  # xf_padding: padded ids are replaced anyway
        assert torch.equal(run(padded, mask), base)
        real = tokens.clone()
        real[:, 0] = (real[:, 0] + 7) % N_VOCAB
        assert not torch.allclose(run(real, mask), base)
        assert not torch.allclose(run(tokens, torch.ones_like(mask)), base)


def test_timestep_embedding_layout():
    emb = R.timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos half, then sin half
    assert emb[1, 0] == pytest.approx(np.cos(5.0)) and emb[1, 4] == pytest.approx(np.sin(5.0))
    assert emb[1, 1] == pytest.approx(np.cos(5.0 * 10000 ** -0.25), rel=1e-5)


# --- diffusion steps ---------------------------------------------------------------------

def _diffusion(schedule="linear", respacing="fast27"):
    return R.SpacedDiffusionRef(R.named_betas(schedule, 1000), R.space_timesteps(1000, respacing))


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_p_mean_variance_two_ways(schedule):
    diffusion = _diffusion(schedule, "50")
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 17, 49])
    x = torch.randn(4, 3, 4, 4, generator=g)
    eps = torch.randn(4, 3, 4, 4, generator=g)
    v = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    out = diffusion.p_mean_variance(torch.cat([eps, v], 1), x, t, clip_denoised=False)

    # Ho et al. eq. 11, from the respaced betas alone, in float64
    beta = diffusion.betas[t.numpy()][:, None, None, None]
    abar = np.cumprod(1 - diffusion.betas)[t.numpy()][:, None, None, None]
    x64, eps64 = x.double().numpy(), eps.double().numpy()
    mean = (x64 - beta / np.sqrt(1 - abar) * eps64) / np.sqrt(1 - beta)
    np.testing.assert_allclose(out["mean"].double().numpy(), mean, rtol=1e-4, atol=1e-4)

    # with clipping: the q(x_{t-1} | x_t, x_0) mean at the clipped x_0 (eq. 7)
    abar_prev = np.cumprod(np.append(1.0, 1 - diffusion.betas))[t.numpy()][:, None, None, None]
    x0 = np.clip((x64 - np.sqrt(1 - abar) * eps64) / np.sqrt(abar), -1, 1)
    mean = (np.sqrt(abar_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - abar_prev) * x64) / (1 - abar)
    clipped = diffusion.p_mean_variance(torch.cat([eps, v], 1), x, t)
    np.testing.assert_allclose(clipped["mean"].double().numpy(), mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(clipped["pred_xstart"].double().numpy(), x0, rtol=1e-4, atol=1e-4)

    # learned range: v = -1 is the (clipped) posterior variance, v = +1 is beta
    ones = torch.ones_like(x)
    lo = diffusion.p_mean_variance(torch.cat([eps, -ones], 1), x, t)["variance"][:, 0, 0, 0].double().numpy()
    hi = diffusion.p_mean_variance(torch.cat([eps, ones], 1), x, t)["variance"][:, 0, 0, 0].double().numpy()
    post = beta[:, 0, 0, 0] * (1 - abar_prev[:, 0, 0, 0]) / (1 - abar[:, 0, 0, 0])
    post[t.numpy() == 0] = diffusion.posterior_variance[1]
    np.testing.assert_allclose(lo, post, rtol=1e-5)
    np.testing.assert_allclose(hi, beta[:, 0, 0, 0], rtol=1e-5)


def test_guidance_gradients_enter_as_stated():
    diffusion = _diffusion("squaredcos_cap_v2", "50")
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([30, 5])
    x, eps, v, grad = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    out = torch.cat([eps, v.clamp(-1, 1)], 1)
    # condition_mean: the DDPM mean moves by variance * grad
    plain = diffusion.p_sample(out, x, t, None)["sample"]
    guided = diffusion.p_sample(out, x, t, None, cond_grad=grad)["sample"]
    variance = diffusion.p_mean_variance(out, x, t)["variance"]
    torch.testing.assert_close(guided - plain, variance * grad, rtol=1e-5, atol=1e-6)
    # condition_score: DDIM with grad == DDIM on eps - sqrt(1 - alpha_bar) * grad
    abar = torch.tensor(diffusion.alphas_cumprod[t.numpy()], dtype=torch.float32)[:, None, None, None]
    shifted = torch.cat([eps - (1 - abar).sqrt() * grad, v], 1)
    a = diffusion.ddim_sample(out, x, t, None, clip_denoised=False, cond_grad=grad)["sample"]
    b = diffusion.ddim_sample(shifted, x, t, None, clip_denoised=False)["sample"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddim_loop_follows_the_deterministic_path_with_original_timesteps():
    diffusion = _diffusion("linear", "fast27")
    base_abar = np.cumprod(1 - R.named_betas("linear", 1000))
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 1.8 - 0.9
    eps0 = torch.randn(2, 3, 4, 4, generator=g)
    on_path = lambda t: (np.sqrt(base_abar[t]) * x0.double() + np.sqrt(1 - base_abar[t]) * eps0.double()).float()  # noqa: E731
    seen, cond_seen = [], []

    def model_fn(x, t):  # an oracle eps model that checks x is where DDIM (eta=0) must be
        assert t.dtype == torch.long and (t == t[0]).all()
        seen.append(int(t[0]))
        torch.testing.assert_close(x, on_path(int(t[0])), rtol=1e-4, atol=1e-4)
        return torch.cat([eps0, torch.zeros_like(eps0)], 1)

    def cond_fn(x, t):
        cond_seen.append(int(t[0]))
        return torch.zeros_like(x)

    x_T = on_path(diffusion.timestep_map[-1])
    result = R.reference_sample(model_fn, x0.shape, diffusion, [x_T] + [None] * 27, sampler="ddim", cond_fn=cond_fn)
    assert seen == cond_seen == diffusion.timestep_map[::-1] and seen[0] == 997
    torch.testing.assert_close(result, x0, rtol=1e-4, atol=1e-4)


def test_ddpm_loop_noise_injection():
    diffusion = _diffusion("squaredcos_cap_v2", "ddim25")
    g = torch.Generator().manual_seed(5)
    shape = (2, 3, 4, 4)
    W = torch.randn(6, 3, generator=g) * 0.3
    model_fn = lambda x, t: torch.einsum("oc,bchw->bohw", W, x) + (t.float() / 1000)[:, None, None, None]  # noqa: E731
    noises = [torch.randn(shape, generator=g) for _ in range(26)]
    first = R.reference_sample(model_fn, shape, diffusion, noises)
    last_changed = R.reference_sample(model_fn, shape, diffusion, noises[:-1] + [torch.randn(shape, generator=g)])
    assert torch.equal(first, last_changed)  # no noise at respaced index 0
    mid_changed = R.reference_sample(model_fn, shape, diffusion, noises[:5] + [-noises[5]] + noises[6:])
    assert not torch.allclose(first, mid_changed)
    with_x_T = R.reference_sample(model_fn, shape, diffusion, noises[1:], x_T=noises[0])
    assert torch.equal(first, with_x_T)


def test_cfg_model_fn_combines_eps_only():
    g = torch.Generator().manual_seed(6)
    out = torch.randn(4, 6, 2, 2, generator=g)
    calls = []

    def model(x, t):
        calls.append(x)
        return out

    x = torch.randn(4, 3, 2, 2, generator=g)
    guided = R.cfg_model_fn(model, 3.0)(x, torch.zeros(4, dtype=torch.long))
    assert torch.equal(calls[0], torch.cat([x[:2], x[:2]]))  # both halves see the first half's x
    expected = out[2:, :3] + 3.0 * (out[:2, :3] - out[2:, :3])
    assert torch.equal(guided[:2, :3], expected) and torch.equal(guided[2:, :3], expected)
    assert torch.equal(guided[:, 3:], out[:, 3:])  # each half keeps its own variance channels


def test_inpaint_denoised_fn_and_low_res_quantization():
    image = torch.full((1, 3, 2, 2), 0.5)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    pasted = R.inpaint_denoised_fn(image, mask)(torch.full((1, 3, 2, 2), -3.0))
    assert torch.equal(pasted[0, 0], torch.tensor([[0.5, -3.0], [-3.0, 0.5]]))
    q = R.quantize_low_res(torch.tensor([-1.0, 0.0, 0.3, 1.0]))
    torch.testing.assert_close(q, torch.tensor([-1.0, 1 / 255, 166 / 255 * 2 - 1, 1.0]))
