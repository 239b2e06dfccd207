"""One argument check per op, shared by every implementation of it.

The public wrapper (fastdiff.ops.<op>) runs the op's check before it picks a backend, and
the twin (reference.py), the Triton wrapper and the fake (register_fake) function run the
same one, so every backend refuses a bad call with the same error and message. The checks
mirror the compiled kernels' (csrc/*/..._args.h): the same conditions in the same order,
with the same wording, so the C++ kernels called directly say the same thing too.

The errors are ValueError (a value, shape or device) or TypeError (a Python type or a
tensor dtype); both are also RuntimeErrors, the type torch's own checks (TORCH_CHECK)
raise, so code that caught the kernels' errors before still catches these.

Only metadata is read (shapes, dtypes, devices, Python numbers), never a tensor's values:
a check must not synchronise with the GPU or break a CUDA graph capture. Float parameters
on which two implementations would disagree (NaN, a non-positive scale or eps) are refused.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from .coeffs import DS_NUM_COEFFS, MAX_HISTORY, NUM_FIXED


class OpValueError(ValueError, RuntimeError):
    """A bad value, shape or device given to a fastdiff op."""


class OpTypeError(TypeError, RuntimeError):
    """An argument of the wrong Python type or tensor dtype given to a fastdiff op."""


STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# guided_step also takes float64 (served by its twin only): torch.autograd.gradcheck of its
# backward needs float64 finite differences. The compiled and Triton kernels decline it.
GUIDED_STEP_DTYPES = STORAGE_DTYPES + (torch.float64,)


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _tensor(t, op: str, name: str) -> None:
    if not isinstance(t, Tensor):
        raise OpTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _same_device(t: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise OpValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _number(value, op: str, name: str) -> float:
    if type(value) is float:  # the common case, without the ABC check's cost (ops run per layer)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OpTypeError(f"{op}: {name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _positive(value, op: str, name: str, *, finite: bool) -> float:
    number = _number(value, op, name)
    if not number > 0 or (finite and math.isinf(number)):
        what = "a positive finite number" if finite else "positive"
        raise OpValueError(f"{op}: {name} must be {what}, got {value!r}")
    return number


# --- guided_step (csrc/guided_step/guided_step_args.h) -------------------------------------

def _like(t, x: Tensor, name: str, channels: int) -> None:
    """t must match x in device, dtype and shape, except for having `channels` channels."""
    _tensor(t, "guided_step", name)
    _same_device(t, x, "guided_step", name, "x")
    if t.dtype != x.dtype:
        raise OpTypeError(f"guided_step: {name} has dtype {t.dtype} but x has dtype {x.dtype}")
    expected = [x.shape[0], channels, *x.shape[2:]]
    if _shape(t) != expected:
        raise OpValueError(f"guided_step: {name} has shape {_shape(t)}, expected {expected} "
                           f"matching x of shape {_shape(x)}")


def _float32_on(t, x: Tensor, name: str) -> None:
    """coeffs and guidance_scale are float32 by the layout; with a float64 x they may also be
    float64, so that gradcheck can perturb guidance_scale finely enough (and float64 rows
    built on the host need not be rounded)."""
    _tensor(t, "guided_step", name)
    _same_device(t, x, "guided_step", name, "x")
    if t.dtype != torch.float32 and not (t.dtype == torch.float64 == x.dtype):
        raise OpTypeError(f"guided_step: {name} must be float32, got {t.dtype}")


def check_guided_step(x, cond, uncond, guidance_scale, coeffs, noise, history: Sequence,
                      clip_range, learned_variance) -> None:
    _tensor(x, "guided_step", "x")
    if x.dim() < 2:
        raise OpValueError(f"guided_step: x must be [B, C, ...], got shape {_shape(x)}")
    if x.dtype not in GUIDED_STEP_DTYPES:
        # The kernels' wording (csrc/guided_step/guided_step_args.h); float64 is the twin's extra.
        raise OpTypeError(f"guided_step: x must be float32, float16 or bfloat16, got {x.dtype}")
    batch, channels = x.shape[0], x.shape[1]
    _tensor(cond, "guided_step", "cond")
    # A learned-variance model outputs 2C channels; samplers ignoring the variance read the first C.
    if learned_variance and (cond.dim() < 2 or cond.shape[1] != 2 * channels):
        raise OpValueError(f"guided_step: learned_variance needs cond with 2 * C = {2 * channels} channels "
                           f"(prediction, then variance), got shape {_shape(cond)}")
    wide = cond.dim() >= 2 and cond.shape[1] == 2 * channels
    _like(cond, x, "cond", 2 * channels if wide else channels)
    if uncond is not None:
        _like(uncond, x, "uncond", cond.shape[1])
    if noise is not None:
        _like(noise, x, "noise", channels)
    if isinstance(history, Tensor) or not isinstance(history, (list, tuple)):
        raise OpTypeError(f"guided_step: history must be a list of tensors, got {type(history).__name__}")
    if len(history) > MAX_HISTORY:
        raise OpValueError(f"guided_step: at most {MAX_HISTORY} history tensors, got {len(history)}")
    for h in history:
        _like(h, x, "history tensor", channels)

    _float32_on(coeffs, x, "coeffs")
    width = NUM_FIXED + len(history)
    if coeffs.dim() != 2 or coeffs.shape[0] not in (1, batch) or coeffs.shape[1] != width:
        raise OpValueError(f"guided_step: coeffs must have shape [1 or {batch}, {width}] for "
                           f"{len(history)} history tensors, got {_shape(coeffs)}")
    if uncond is not None and guidance_scale is None:
        raise OpValueError("guided_step: uncond given without guidance_scale")
    if guidance_scale is not None:
        _float32_on(guidance_scale, x, "guidance_scale")
        if guidance_scale.dim() > 1 or guidance_scale.numel() not in (1, batch):
            raise OpValueError(f"guided_step: guidance_scale must have 1 or {batch} elements, "
                               f"got shape {_shape(guidance_scale)}")
    if clip_range is not None:
        _positive(clip_range, "guided_step", "clip_range", finite=False)


# --- discrete_step (csrc/discrete_step/discrete_step_args.h) -------------------------------

def check_discrete_step(x_t, cond, uncond, guidance_scale, coeffs, noise, truncation_rate) -> None:
    op = "discrete_step"
    _tensor(x_t, op, "x_t")
    if x_t.dim() != 2 or x_t.dtype != torch.int64:
        error = OpValueError if x_t.dtype == torch.int64 else OpTypeError
        raise error(f"discrete_step: x_t must be an int64 [B, N] tensor, got {x_t.dtype} {_shape(x_t)}")
    B, N = x_t.shape
    _tensor(cond, op, "cond")
    if cond.dim() != 3 or cond.shape[0] != B or cond.shape[2] != N or cond.shape[1] < 1:
        raise OpValueError(f"discrete_step: cond has shape {_shape(cond)}, expected [B, K-1, N] with B={B}, N={N}")
    if cond.dtype not in STORAGE_DTYPES:
        raise OpTypeError(f"discrete_step: cond must be float32, float16 or bfloat16, got {cond.dtype}")
    K = cond.shape[1] + 1
    _same_device(cond, x_t, op, "cond", "x_t")
    _tensor(coeffs, op, "coeffs")
    _same_device(coeffs, x_t, op, "coeffs", "x_t")
    if uncond is not None:
        _tensor(uncond, op, "uncond")
        _same_device(uncond, x_t, op, "uncond", "x_t")
        if uncond.shape != cond.shape:
            raise OpValueError(f"discrete_step: uncond has shape {_shape(uncond)}, cond {_shape(cond)}")
        if uncond.dtype != cond.dtype:
            raise OpTypeError(f"discrete_step: uncond dtype differs from cond's ({uncond.dtype}, {cond.dtype})")
        if guidance_scale is None:
            raise OpValueError("discrete_step: uncond given without guidance_scale")
        _tensor(guidance_scale, op, "guidance_scale")
        _same_device(guidance_scale, x_t, op, "guidance_scale", "x_t")
        if guidance_scale.dtype != torch.float32 or guidance_scale.numel() not in (1, B):
            error = OpTypeError if guidance_scale.dtype != torch.float32 else OpValueError
            raise error(f"discrete_step: guidance_scale must have 1 or B={B} float32 values, "
                               f"got {guidance_scale.dtype} {_shape(guidance_scale)}")
    if coeffs.dtype != torch.float32:
        raise OpTypeError(f"discrete_step: coeffs must be float32, got {coeffs.dtype}")
    if coeffs.dim() != 2 or coeffs.shape[1] != DS_NUM_COEFFS or coeffs.shape[0] not in (1, B):
        raise OpValueError(f"discrete_step: coeffs must have shape [1 or B, {DS_NUM_COEFFS}], got {_shape(coeffs)}")
    if noise is not None:
        _tensor(noise, op, "noise")
        _same_device(noise, x_t, op, "noise", "x_t")
        if _shape(noise) != [B, K, N]:
            raise OpValueError(f"discrete_step: noise has shape {_shape(noise)}, expected [B, K, N] = {[B, K, N]}")
        if noise.dtype != torch.float32:
            raise OpTypeError(f"discrete_step: noise must be float32 (uniform in [0, 1)), got {noise.dtype}")
    # NaN compares false everywhere, and the kernels' selection and the twin's sort then keep
    # different classes; a rate below 0 has no meaning (0 keeps the most likely class only).
    rate = _number(truncation_rate, op, "truncation_rate")
    if not rate >= 0.0:
        raise OpValueError(f"discrete_step: truncation_rate must be a number >= 0 (0 keeps only the "
                           f"most likely class, 1 or more keeps every class), got {truncation_rate!r}")


# --- attention (no C++ kernel: the Triton wrapper's and the twin's contract) ---------------

def check_attention(q, k, v, key_padding_mask, scale) -> Optional[Tensor]:
    """Checks the operands and returns the mask as bool (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(t, "attention", name)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise OpValueError(f"attention expects [B, H, L, D] tensors, got {_shape(q)}, {_shape(k)}, {_shape(v)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise OpValueError(f"attention shapes disagree: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if not (q.device == k.device == v.device):
        raise OpValueError(f"attention: q, k, v are on {q.device}, {k.device}, {v.device}")
    if not (q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype):
        raise OpTypeError(f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if scale is not None:
        # A NaN or infinite scale gives the kernels' zeros but the twin's NaN; <= 0 is no softmax scale.
        _positive(scale, "attention", "scale", finite=True)
    if key_padding_mask is None:
        return None
    _tensor(key_padding_mask, "attention", "key_padding_mask")
    if key_padding_mask.shape != (q.shape[0], k.shape[2]):
        raise OpValueError(f"attention: key_padding_mask must be [B, Lk] = {[q.shape[0], k.shape[2]]}, "
                           f"got {_shape(key_padding_mask)}")
    if key_padding_mask.device != q.device:
        raise OpValueError(f"attention: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    return key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0


# --- group_norm (csrc/group_norm/group_norm_args.h) ----------------------------------------

def check_group_norm(x, num_groups, weight, bias, eps, scale, shift) -> None:
    op = "group_norm"
    _tensor(x, op, "x")
    if x.dim() < 2:
        raise OpValueError(f"group_norm: x must have shape [B, C, *spatial], got {_shape(x)}")
    if x.dtype not in STORAGE_DTYPES:
        raise OpTypeError(f"group_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if type(num_groups) is not int and (isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral)):
        raise OpTypeError(f"group_norm: num_groups must be an int, got {type(num_groups).__name__} {num_groups!r}")
    if num_groups <= 0:
        raise OpValueError(f"group_norm: num_groups must be positive, got {num_groups}")
    B, C = x.shape[0], x.shape[1]
    if C % num_groups:
        raise OpValueError(f"group_norm: {C} channels are not divisible into {num_groups} groups "
                           f"(x of shape {_shape(x)})")
    # eps = 0 divides by a zero variance (a constant group); NaN gives NaN in one kernel only.
    _positive(eps, op, "eps", finite=True)
    for name, t, per_sample in (("weight", weight, False), ("bias", bias, False),
                                ("scale", scale, True), ("shift", shift, True)):
        if t is None:
            continue
        _tensor(t, op, name)
        _same_device(t, x, op, name, "x")
        if not t.is_floating_point():
            raise OpTypeError(f"group_norm: {name} must be a floating-point tensor, got {t.dtype}")
        ok = (t.dim() == 2 and t.shape[1] == C and t.shape[0] in (1, B)) if per_sample else \
            (t.dim() == 1 and t.shape[0] == C)
        if not ok:
            want = f"[B, C] = [{B}, {C}] (or [1, C])" if per_sample else f"[C] = [{C}]"
            raise OpValueError(f"group_norm: {name} has shape {_shape(t)}, expected {want}")
