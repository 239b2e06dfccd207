// Argument checking and layout preparation shared by every guided_step kernel.
//
// Kernels see each tensor as a base pointer plus a batch stride: sample b's
// elements are the N = numel / B values starting at ptr + b * batch_stride, in
// the memory order of the output. That keeps the conditional/unconditional
// halves of one CFG batch (and batch-strided views in general) zero-copy;
// anything laid out differently is made to match with one copy.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

#include "guided_step.h"

namespace fastdiff {
namespace guided {

struct Operand {
  const void* ptr = nullptr;
  int64_t batch_stride = 0;
  at::Tensor keep;  // owns a copy when one was needed
};

struct Prepared {
  int64_t batch = 0;
  int64_t inner = 0;  // elements per sample
  Operand x, cond, uncond, var, noise;
  std::vector<Operand> hist;
  at::Tensor scale;   // float32, [1] or [B]
  at::Tensor coeffs;  // float32, [1 or B, kNumFixed + H], contiguous
  int64_t scale_bstride = 0;
  int64_t coeff_bstride = 0;
  bool has_uncond = false, has_noise = false, learned = false, clip = false, write_den = false;
  float clip_range = 0.f;
  at::Tensor out, den;
};

// One rule, mirrored by the Python fake function, for the output's layout.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

inline bool same_inner_layout(const at::Tensor& t, const at::Tensor& ref) {
  for (int64_t d = 1; d < ref.dim(); ++d)
    if (ref.size(d) > 1 && t.stride(d) != ref.stride(d)) return false;
  return true;
}

inline Operand operand(const at::Tensor& t, const at::Tensor& out, at::MemoryFormat fmt) {
  Operand o;
  at::Tensor u = t;
  if (!same_inner_layout(u, out)) {
    u = t.contiguous(fmt);
    if (!same_inner_layout(u, out)) u = at::empty_like(out).copy_(t);
    o.keep = u;
  }
  o.ptr = u.data_ptr();
  o.batch_stride = out.size(0) > 1 ? u.stride(0) : 0;
  return o;
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name,
                       int64_t channels) {
  TORCH_CHECK(t.device() == x.device(), "guided_step: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "guided_step: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
  bool ok = t.dim() == x.dim() && t.size(0) == x.size(0) && t.size(1) == channels;
  for (int64_t d = 2; ok && d < x.dim(); ++d) ok = t.size(d) == x.size(d);
  TORCH_CHECK(ok, "guided_step: ", name, " has shape ", t.sizes(), ", expected [", x.size(0),
              ", ", channels, ", ...] matching x of shape ", x.sizes());
}

inline Prepared prepare(const at::Tensor& x, const at::Tensor& cond,
                        const c10::optional<at::Tensor>& uncond,
                        const c10::optional<at::Tensor>& guidance_scale,
                        const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise,
                        at::TensorList history, c10::optional<double> clip_range,
                        bool learned_variance, bool write_denoised) {
  TORCH_CHECK(x.dim() >= 2, "guided_step: x must be [B, C, ...], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "guided_step: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1);
  // A model with learned variance outputs 2C channels; samplers that ignore the
  // variance still read the first C.
  TORCH_CHECK(!learned_variance || cond.dim() < 2 || cond.size(1) == 2 * C,
              "guided_step: learned_variance needs cond with 2 * C = ", 2 * C,
              " channels (prediction, then variance), got shape ", cond.sizes());
  check_like(cond, x, "cond", cond.dim() >= 2 && cond.size(1) == 2 * C ? 2 * C : C);
  if (uncond.has_value()) {
    TORCH_CHECK(uncond->size(1) == cond.size(1),
                "guided_step: uncond has ", uncond->size(1), " channels but cond has ", cond.size(1));
    check_like(*uncond, x, "uncond", cond.size(1));
  }
  if (noise.has_value()) check_like(*noise, x, "noise", C);
  TORCH_CHECK(static_cast<int64_t>(history.size()) <= kMaxHistory, "guided_step: at most ",
              kMaxHistory, " history tensors, got ", history.size());
  for (const auto& h : history) check_like(h, x, "history tensor", C);

  TORCH_CHECK(coeffs.device() == x.device(), "guided_step: coeffs is on ", coeffs.device(),
              " but x is on ", x.device());
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat, "guided_step: coeffs must be float32, got ",
              coeffs.scalar_type());
  const int64_t K = kNumFixed + static_cast<int64_t>(history.size());
  TORCH_CHECK(coeffs.dim() == 2 && (coeffs.size(0) == 1 || coeffs.size(0) == B) &&
                  coeffs.size(1) == K,
              "guided_step: coeffs must have shape [1 or ", B, ", ", K, "] for ", history.size(),
              " history tensors, got ", coeffs.sizes());

  Prepared p;
  p.batch = B;
  p.has_uncond = uncond.has_value();
  if (p.has_uncond) {
    TORCH_CHECK(guidance_scale.has_value(), "guided_step: uncond given without guidance_scale");
  }
  if (guidance_scale.has_value()) {
    const auto& s = *guidance_scale;
    TORCH_CHECK(s.device() == x.device(), "guided_step: guidance_scale is on ", s.device(),
                " but x is on ", x.device());
    TORCH_CHECK(s.scalar_type() == at::kFloat, "guided_step: guidance_scale must be float32, got ",
                s.scalar_type());
    TORCH_CHECK(s.dim() <= 1 && (s.numel() == 1 || s.numel() == B),
                "guided_step: guidance_scale must have 1 or ", B, " elements, got shape ", s.sizes());
    p.scale = s.reshape({-1}).contiguous();
    p.scale_bstride = p.scale.numel() == 1 ? 0 : 1;
  }
  p.coeffs = coeffs.contiguous();
  p.coeff_bstride = p.coeffs.size(0) == 1 ? 0 : K;
  p.has_noise = noise.has_value();
  p.learned = learned_variance;
  p.clip = clip_range.has_value();
  p.clip_range = p.clip ? static_cast<float>(*clip_range) : 0.f;
  TORCH_CHECK(!p.clip || *clip_range > 0, "guided_step: clip_range must be positive, got ",
              *clip_range);
  p.write_den = write_denoised;

  const auto fmt = output_format(x);
  p.out = at::empty(x.sizes(), x.options().memory_format(fmt));
  p.den = write_denoised ? at::empty(x.sizes(), x.options().memory_format(fmt))
                         : at::empty({0}, x.options());
  p.inner = B == 0 ? 0 : x.numel() / B;
  if (p.inner == 0) return p;

  p.x = operand(x, p.out, fmt);
  p.cond = operand(cond.size(1) == C ? cond : cond.narrow(1, 0, C), p.out, fmt);
  if (learned_variance) p.var = operand(cond.narrow(1, C, C), p.out, fmt);
  if (p.has_uncond) p.uncond = operand(uncond->narrow(1, 0, C), p.out, fmt);
  if (p.has_noise) p.noise = operand(*noise, p.out, fmt);
  for (const auto& h : history) p.hist.push_back(operand(h, p.out, fmt));
  return p;
}

}  // namespace guided
}  // namespace fastdiff
