"""Attention over [B, H, L, D]: self- and cross-attention for the U-Nets and transformers.

Models call ``fastdiff.ops.attention`` and never a kernel directly. The op
``torch.ops.fastdiff.attention`` dispatches per device:

  CUDA  the flash-style Triton kernel (fastdiff/ops/triton/attention.py) for fp16/bf16:
        tiled, online softmax, fp32 accumulation, head dims split into power-of-two parts
        instead of padded; PyTorch's SDPA for fp32 (FP32_ON_CUDA below), where Triton is
        absent or cannot serve the operands, or where no tiling fits the GPU at hand.
  CPU   PyTorch's scaled_dot_product_attention, whose CPU backend is itself a tiled,
        OpenMP-parallel flash kernel; benchmarks/bench_attention.py measures it against
        the math path.
  twin  ``reference.attention``, plain matmul-softmax-matmul in fp32 (``FASTDIFF_BACKEND=reference``).

Every implementation returns its output as [B, Lq, H, D] memory viewed as [B, H, Lq, D],
so a model's ``out.transpose(1, 2).flatten(2)`` back to tokens costs nothing.

Gradients: the kernels are forward-only. When autograd records (grad enabled and an
input requires grad, e.g. guidance that differentiates through the model, or training),
attention runs SDPA, which is differentiable, instead of the op.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch, _library, reference
from ._checks import check_attention

OP = "attention"


def _token_major_empty(q: Tensor, d_v: int) -> Tensor:
    batch, heads, lq, _ = q.shape
    return q.new_empty((batch, lq, heads, d_v)).permute(0, 2, 1, 3)


@torch.library.register_fake("fastdiff::attention")
def _attention_fake(q, k, v, key_padding_mask, scale):
    check_attention(q, k, v, key_padding_mask, scale)
    return _token_major_empty(q, v.shape[-1])


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """PyTorch's SDPA with the twin's semantics: fully masked rows give zeros, not NaN."""
    # SDPA's fused CPU kernel needs unit stride in the head dimension; with views such as
    # GLIDE's per-head [q | k | v] channel layout it falls back to the (2-3x slower) math path.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        out = out.nan_to_num(0.0)
    if not out.transpose(1, 2).is_contiguous():  # the math path returns [B, H, Lq, D] memory
        out = _token_major_empty(q, v.shape[-1]).copy_(out)
    return out


# fp32 on CUDA: the flash kernel's fp32 products run on CUDA cores (IEEE, no TF32), where
# only small tiles fit without spilling; PyTorch's SDPA serves fp32 with its memory-efficient
# kernel instead. Which of the two is faster has not been measured on a GPU yet
# (benchmarks/bench_attention.py times both; benchmarks/RESULTS.md); SDPA is the default
# until it is. The "triton" backend forces the kernel for every dtype.
FP32_ON_CUDA = "sdpa"
_fallback_warned = set()


def _triton_serves(backend: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask, scale) -> bool:
    """The flash kernel takes these operands (check_supported), and fp32 only where asked
    for: by FP32_ON_CUDA, or by the "triton" backend, which forces the kernel for every dtype."""
    from .triton import attention as triton_attention

    if triton_attention.check_supported(q, k, v) is not None:
        return False
    return backend == "triton" or q.dtype != torch.float32 or FP32_ON_CUDA != "sdpa"


def _triton(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
            scale: Optional[float]) -> Tensor:
    """The flash kernel; SDPA (warned once per shape) where no tiling fits the GPU at hand."""
    from .triton import attention as triton_attention
    from .triton._launch import is_out_of_resources

    try:
        return triton_attention.attention_triton(q, k, v, key_padding_mask, scale)
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_resources(exc):
            raise
        key = (q.shape[2], k.shape[2], q.shape[3], q.dtype)
        if key not in _fallback_warned:
            _fallback_warned.add(key)
            warnings.warn(f"attention: no Triton tiling fits this GPU for Lq={key[0]}, Lk={key[1]}, D={key[2]}, "
                          f"{q.dtype} ({exc}); using PyTorch's SDPA", RuntimeWarning, stacklevel=2)
        return _sdpa(q, k, v, key_padding_mask, scale)


def _triton_label(backend: str) -> str:
    if backend == "triton" or FP32_ON_CUDA != "sdpa":
        return "Triton (flash)"
    return "Triton (flash); PyTorch SDPA for fp32"


_SDPA = _dispatch.Impl("PyTorch SDPA", _dispatch.TORCH, _sdpa)
_dispatch.register(
    OP, lambda *args: reference.attention(*args),
    cpu=[_dispatch.compiled("C++ (OpenMP)"), _SDPA],
    cuda=[_dispatch.compiled("CUDA C++"),
          _dispatch.Impl("Triton (flash)", _dispatch.TRITON, _triton, serves=_triton_serves, label=_triton_label),
          _SDPA],
)
_cuda_kernel = _dispatch.python_kernel(OP, "cuda")  # the op's CUDA kernel without a compiled one


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v; q [B, H, Lq, D], k/v [B, H, Lk, D]; mask [B, Lk] True = keep.

    Any strides are accepted (views of one fused projection need no copy on CUDA). The
    scale defaults to D ** -0.5. A query whose keys are all masked gets zeros.
    """
    mask = check_attention(q, k, v, key_padding_mask, scale)
    backend = _library.get_backend()
    if backend == "reference":
        return reference.attention(q, k, v, mask, scale)
    scale = None if scale is None else float(scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _sdpa(q, k, v, mask, scale)
    return _dispatch.call(OP, q.device.type, (q, k, v, mask, scale))


def implementation(device_type: str) -> str:
    """Which implementation serves attention on `device_type` under the current backend."""
    return _dispatch.implementation(OP, device_type)
