"""How far two float32 computations of the same math may legitimately differ.

Two implementations of one formula that add their terms in another order round
differently: another convolution algorithm (channels-last, oneDNN's AVX2 or AVX-512
kernels), SDPA instead of softmax(q k^T) v, a fused kernel instead of its twin, a
reduction split over another number of threads. Their outputs then differ by a few units
of float32 rounding, scaled by the values. fp32_bound derives a bound on that difference
from the computation, not from what one machine showed:

    |a - b| <= headroom * sqrt(terms) * u * scale

u = 2^-24 is float32's unit roundoff. `terms` counts the rounded operations on the
longest path from the inputs to the output: an n-term dot product, sum or normalisation
adds n, a network the lengths of its layers in sequence (at most its depth times its
widest reduction), a k-step sampler k times its model's count, an elementwise formula one
per operation. Rounding errors behave as independent zero-mean variables, so their sum
grows like sqrt(terms) * u rather than the worst case terms * u (Higham & Mary, "A new
approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019);
summing the same terms in another order moves the result by about as much. `scale` is the
magnitude of the values on that path, normally max |reference| (and at least 1 where the
path goes through O(1) intermediates to reach smaller outputs).

headroom (HEADROOM = 4) covers the tail of that distribution over every element of the
output, and the gains the count leaves out: a sampler's coefficients, a VAE's
1 / scaling_factor, the exponential in a softmax. Classifier-free guidance is the one gain
counted explicitly (guidance_gain), since it reaches ~10 at the scales the tests use. The
count itself over-estimates (layers side by side are counted in sequence, and BLAS sums in
blocks), and a sampler damps most of what its early steps do: measured under emulated
AVX2, AVX-512 and baseline CPUs with 1 to 3 threads, the suite's float32 comparisons use
under a third of their bounds.

A real error stays outside them: 1% more guidance moves the tiny test pipelines' images
by 2.5e-3 (SD) to 5e-1 (GLIDE), and a sampler coefficient 1% off at one step by 1e-3 to
2e-2 (at every step, by 1e-2 to 1e-1), against bounds of 3e-5 to 1e-3.

Low precision (float16 / bfloat16): where both sides accumulate in float32 and round
only the result to the storage dtype, they differ by that rounding, a unit in the last
place or two (dtype_rounding_bound). Where a kernel computes in the storage dtype, its
error against a float32 reference is held to about twice the error of the PyTorch path
in the same dtype (STYLE.md item 6).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

U = 2.0 ** -24  # float32 unit roundoff: half the spacing of float32 numbers in [1, 2)
HEADROOM = 4.0


def fp32_bound(scale: float, terms: float, headroom: float = HEADROOM) -> float:
    """The largest |a - b| two float32 evaluations of one computation may show when they
    order its sums differently: headroom * sqrt(terms) * u * scale (derivation above)."""
    return headroom * math.sqrt(terms) * U * scale


def guidance_gain(scale) -> float:
    """How much classifier-free guidance, uncond + s * (cond - uncond), amplifies rounding
    differences: those of its two branches are independent, so they add in quadrature with
    weights 1 - s and s, giving sqrt(s^2 + (s - 1)^2) (1 without guidance, s = 1). For
    several scales (one per sample), the largest."""
    s = torch.as_tensor(scale, dtype=torch.float64).abs().max().item() if not isinstance(scale, (int, float)) \
        else abs(float(scale))
    return math.sqrt(s * s + (s - 1.0) ** 2)


def dtype_rounding_bound(dtype: torch.dtype, ulps: float = 2.0) -> float:
    """rtol (and atol near |x| ~ 1) for two results accumulated in float32 and rounded to
    `dtype` once: the roundings differ by at most one unit in the last place, and by a
    second one where the float32 values themselves straddle a rounding boundary."""
    return ulps * torch.finfo(dtype).eps


def reduction_terms(model: torch.nn.Module, call: Callable[[], object]) -> int:
    """`terms` of call() (one pass through model's layers), counted while it runs: the sum of the
    lengths of the reductions it makes, each layer's fan-in (a convolution's C_in / groups
    x kernel, a linear layer's in_features), each normalisation's elements per group, each
    attention's head dim + 2 x keys (q.k, then the softmax's sum and p.v). Layers that run
    side by side (q, k and v; the branches of a block) are counted as if in sequence, which
    over-counts the longest path a little."""
    import torch.nn.functional as F

    import fastdiff.ops

    terms = []

    def layer(module, inputs, output):
        weight = getattr(module, "weight", None)
        weight = weight if isinstance(weight, torch.Tensor) else getattr(module, "w", None)
        if getattr(module, "num_groups", None) and inputs and isinstance(inputs[0], torch.Tensor):
            terms.append(inputs[0][0].numel() // module.num_groups)
        elif "LayerNorm" in type(module).__name__ and inputs and isinstance(inputs[0], torch.Tensor):
            terms.append(inputs[0].shape[-1])
        elif isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(module, torch.nn.Embedding):
            terms.append(weight[0].numel())

    def counting(attention):
        def run(q, k, *rest, **kw):
            terms.append(q.shape[-1] + 2 * k.shape[-2])
            return attention(q, k, *rest, **kw)
        return run

    hooks = [m.register_forward_hook(layer) for m in model.modules()]
    ops_attention, sdpa = fastdiff.ops.attention, F.scaled_dot_product_attention
    fastdiff.ops.attention, F.scaled_dot_product_attention = counting(ops_attention), counting(sdpa)
    try:
        with torch.no_grad():
            call()
    finally:
        fastdiff.ops.attention, F.scaled_dot_product_attention = ops_attention, sdpa
        for hook in hooks:
            hook.remove()
    return sum(terms)
