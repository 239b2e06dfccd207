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

from . import _library, reference

OP = "attention"
_compiled_keys = set()  # dispatch keys a compiled C++ kernel filled (none today)


def _token_major_empty(q: Tensor, d_v: int) -> Tensor:
    batch, heads, lq, _ = q.shape
    return q.new_empty((batch, lq, heads, d_v)).permute(0, 2, 1, 3)


@torch.library.register_fake("fastdiff::attention")
def _attention_fake(q, k, v, key_padding_mask, scale):
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


def _cuda_kernel(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                 scale: Optional[float]) -> Tensor:
    from .triton import attention as triton_attention
    from .triton._launch import is_out_of_resources

    if triton_attention.check_supported(q, k, v) is not None or \
            (q.dtype == torch.float32 and FP32_ON_CUDA == "sdpa"):
        return _sdpa(q, k, v, key_padding_mask, scale)
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


def _register_python_kernels() -> None:
    """Kernels for the dispatch keys the C++ extension did not fill."""
    for key, kernel in (("CPU", _sdpa), ("CUDA", _cuda_kernel)):
        if _library.has_kernel(OP, key):
            _compiled_keys.add(key)
        else:
            torch.library.impl(f"fastdiff::{OP}", key)(kernel)


_register_python_kernels()


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, H, L, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on {q.device}, {k.device}, {v.device}")
    if not (q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype):
        raise ValueError(f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape != (q.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be [B, Lk] = {(q.shape[0], k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    return key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v; q [B, H, Lq, D], k/v [B, H, Lk, D]; mask [B, Lk] True = keep.

    Any strides are accepted (views of one fused projection need no copy on CUDA). The
    scale defaults to D ** -0.5. A query whose keys are all masked gets zeros.
    """
    mask = _check(q, k, v, key_padding_mask)
    backend = _library.get_backend()
    if backend == "reference":
        return reference.attention(q, k, v, mask, scale)
    scale = None if scale is None else float(scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _sdpa(q, k, v, mask, scale)
    if backend == "triton" and q.is_cuda:
        from .triton.attention import attention_triton
        return attention_triton(q, k, v, mask, scale)
    return torch.ops.fastdiff.attention(q, k, v, mask, scale)


def implementation(device_type: str) -> str:
    """Which implementation serves attention on `device_type` under the current backend."""
    backend = _library.get_backend()
    if backend == "reference":
        return "reference"
    if device_type == "cuda":
        if "CUDA" in _compiled_keys and backend != "triton":
            return "CUDA C++"
        if not _library.triton_available():
            return "PyTorch SDPA"
        if backend == "triton" or FP32_ON_CUDA != "sdpa":
            return "Triton (flash)"
        return "Triton (flash); PyTorch SDPA for fp32"
    if device_type == "cpu":
        return "C++ (OpenMP)" if "CPU" in _compiled_keys else "PyTorch SDPA"
    return "reference"
