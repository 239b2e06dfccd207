"""The flash-style Triton attention kernel against its PyTorch twin (reference.attention).

Without a GPU the kernel runs under Triton's interpreter on CPU tensors, so the sweep uses
one or two heads; the sequence lengths are the ones the issue names (77, 97, 1025, 4096),
the head dims every model uses (40, 64, 80, 88, 128, 160). On a GPU the same tests run the
compiled kernel.
"""
import os

import pytest
import torch

from deps import require

if not torch.cuda.is_available():
    # Read when a kernel is decorated, so it must be set before the module below loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
require("triton")

from fastdiff.ops.triton import attention as triton_module  # noqa: E402
from fastdiff.ops.triton.attention import attention_triton, split_head_dim  # noqa: E402
from test_attention import assert_attention_close  # noqa: E402  (fp32: fp32_bound; 16-bit: 2x PyTorch's error)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAD_DIMS = (40, 64, 80, 88, 128, 160)


def make_qkv(batch, heads, lq, lk, d, dtype=torch.float32, seed=0, layout="bhld"):
    gen = torch.Generator().manual_seed(seed)

    def rand(length):
        x = torch.randn(batch, length, heads, d, generator=gen)
        if layout == "bhld":
            x = x.transpose(1, 2).contiguous()
        else:  # [B, L, H, D] memory seen as [B, H, L, D], as a projection split into heads gives
            x = x.transpose(1, 2)
        return x.to(device=DEVICE, dtype=dtype)

    return rand(lq), rand(lk), rand(lk)


def assert_close(out, q, k, v, mask=None, scale=None):
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert_attention_close(out, q, k, v, mask, scale)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cross_attention_77_tokens(d, dtype):
    q, k, v = make_qkv(2, 2, 97, 77, d, dtype, seed=d)
    assert_close(attention_triton(q, k, v), q, k, v)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("lq", [77, 97])
def test_self_attention_odd_lengths(lq, d):
    q, k, v = make_qkv(2, 1, lq, lq, d, torch.float16, seed=lq + d, layout="blhd")
    out = attention_triton(q, k, v)
    assert_close(out, q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # token-major memory, free to merge the heads


@pytest.mark.parametrize("lk, d", [(256, 80), (128, 64), (64, 160)])
def test_full_key_tiles_take_the_unmasked_loads(lk, d):
    """Lk a multiple of the key tile and D = D0 + D1 exactly: the loads without bounds masks."""
    q, k, v = make_qkv(2, 2, 50, lk, d, torch.float16, seed=lk + d)
    assert_close(attention_triton(q, k, v), q, k, v)


@pytest.mark.parametrize("d", [40, 88, 160])
def test_self_attention_1025(d):
    q, k, v = make_qkv(1, 1, 1025, 1025, d, torch.float32, seed=d)
    assert_close(attention_triton(q, k, v), q, k, v)


def test_self_attention_4096_tokens():
    q, k, v = make_qkv(1, 1, 4096, 4096, 40, torch.float16, seed=3)
    assert_close(attention_triton(q, k, v), q, k, v)


def test_cross_attention_4096_queries():
    q, k, v = make_qkv(2, 1, 4096, 77, 80, torch.bfloat16, seed=4)
    assert_close(attention_triton(q, k, v), q, k, v)


def test_glide_text_length_with_padding_mask():
    """GLIDE's 128 text tokens with a key padding mask; sample 1 is fully padded."""
    q, k, v = make_qkv(2, 2, 65, 128, 64, torch.float32, seed=5)
    mask = torch.zeros(2, 128, dtype=torch.bool, device=DEVICE)
    mask[0, :37] = True
    out = attention_triton(q, k, v, mask)
    assert_close(out, q, k, v, mask)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("d", [40, 88])
def test_random_mask_over_several_key_tiles(d):
    q, k, v = make_qkv(2, 2, 33, 300, d, torch.float16, seed=6)
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(2, 300, generator=gen) > 0.6).to(DEVICE)
    mask[1, :250] = False  # whole key tiles masked before the first kept key
    assert_close(attention_triton(q, k, v, mask), q, k, v, mask)


def test_integer_mask_and_scale():
    q, k, v = make_qkv(1, 3, 20, 9, 16, torch.float32, seed=8)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1]], dtype=torch.uint8, device=DEVICE)
    out = attention_triton(q, k, v, mask.bool(), scale=0.3)
    assert_close(out, q, k, v, mask.bool(), scale=0.3)


def test_strided_views_of_a_fused_projection():
    """q, k, v as views of one [B, L, H, 3, D] tensor (GLIDE's per-head qkv split)."""
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 45, 3, 3, 40, generator=gen).to(DEVICE)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    assert q.stride(-1) == 1 and not q.is_contiguous()
    assert_close(attention_triton(q, k, v), q, k, v)
    # and a head dimension with a non-unit stride
    q2, k2, v2 = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
    assert q2.stride(-1) != 1
    assert_close(attention_triton(q2, k2, v2), q2, k2, v2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poisoned_output_is_fully_written(dtype):
    q, k, v = make_qkv(2, 2, 50, 77, 80, dtype, seed=10)
    out = torch.full((2, 2, 80, 50), float("nan"), dtype=dtype, device=DEVICE).transpose(-1, -2)
    result = attention_triton(q, k, v, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, q, k, v)


def test_single_query_single_key():
    q, k, v = make_qkv(1, 1, 1, 1, 64, torch.float32, seed=11)
    assert_close(attention_triton(q, k, v), q, k, v)


def test_large_logits_do_not_overflow():
    q, k, v = make_qkv(1, 2, 40, 200, 64, torch.float16, seed=12)
    q = q * 30  # scores in the thousands: exp without the running max would overflow
    assert_close(attention_triton(q, k, v), q, k, v)


def test_out_argument_is_checked():
    q, k, v = make_qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="out must be"):
        attention_triton(q, k, v, out=torch.empty(1, 1, 8, 32, device=DEVICE))


@pytest.mark.parametrize("d, parts", [(40, (32, 16)), (64, (64, 0)), (80, (64, 16)), (88, (64, 32)),
                                      (128, (128, 0)), (160, (128, 32)), (8, (16, 0)), (250, (256, 0)),
                                      (24, (32, 0))])
def test_head_dim_split(d, parts):
    assert split_head_dim(d) == parts
    d0, d1 = parts
    assert d0 + d1 >= d and d0 & (d0 - 1) == 0 and (d1 == 0 or (d1 >= 16 and d1 & (d1 - 1) == 0))


def test_unsupported_operands_are_named():
    q = torch.randn(1, 1, 4, 300)
    assert "head dimension" in triton_module.check_supported(q, q, q)
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    assert "dtypes" in triton_module.check_supported(q, q, q)


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (64, 32, 4, 2), (128, 128, 8, 3), (32, 64, 4, 4)])
def test_every_launch_config_gives_the_same_result(config):
    """The tuner may pick any candidate tiling; each must be correct (partial tiles included)."""
    q, k, v = make_qkv(2, 2, 97, 150, 80, torch.float16, seed=13)
    mask = torch.rand(2, 150, generator=torch.Generator().manual_seed(14)).to(DEVICE) > 0.3
    assert_close(attention_triton(q, k, v, mask, config=config), q, k, v, mask)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_tuning_needs_a_gpu():
    q, k, v = make_qkv(1, 1, 8, 8, 16)
    with pytest.raises(RuntimeError, match="on a GPU"):
        triton_module.tune(q, k, v)


@pytest.mark.cuda
def test_tuning_remembers_the_fastest_config():
    q, k, v = make_qkv(2, 8, 1024, 77, 80, torch.float16, seed=15)
    best = triton_module.tune(q, k, v, candidates=[(64, 128, 4, 2), (128, 128, 8, 3)])
    assert triton_module.tuned_configs()[(1024, 77, 80, torch.float16, False)] == best
    assert_close(attention_triton(q, k, v), q, k, v)
