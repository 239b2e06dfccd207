// discrete_step's argument checks, shared by the CPU and CUDA kernels so that both reject
// the same inputs with the messages of reference._check_discrete_args.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "discrete_step/discrete_step_coeffs.h"

namespace fastdiff {
namespace discrete {

struct Checked {
  int64_t batch = 0, tokens = 0, codes = 0;  // B, N and M = K - 1
  bool guided = false, has_noise = false;
  at::Tensor scale;  // the guidance scales, contiguous, when guided
};

inline Checked check_args(const at::Tensor& x_t, const at::Tensor& cond,
                          const c10::optional<at::Tensor>& uncond,
                          const c10::optional<at::Tensor>& guidance_scale,
                          const at::Tensor& coeffs, const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(x_t.dim() == 2 && x_t.scalar_type() == at::kLong,
              "discrete_step: x_t must be an int64 [B, N] tensor");
  Checked c;
  const int64_t B = x_t.size(0), N = x_t.size(1);
  c.batch = B;
  c.tokens = N;
  TORCH_CHECK(cond.dim() == 3 && cond.size(0) == B && cond.size(2) == N && cond.size(1) >= 1,
              "discrete_step: cond has shape ", cond.sizes(), ", expected [B, K-1, N] with B=", B,
              ", N=", N);
  const auto dtype = cond.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "discrete_step: cond must be float32, float16 or bfloat16");
  c.codes = cond.size(1);
  const int64_t K = c.codes + 1;
  c.guided = uncond.has_value() && uncond->defined();
  auto same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x_t.device(), "discrete_step: ", name, " is on ", t.device(),
                " but x_t is on ", x_t.device());
  };
  same_device(cond, "cond");
  same_device(coeffs, "coeffs");
  if (c.guided) {
    same_device(*uncond, "uncond");
    TORCH_CHECK(uncond->sizes() == cond.sizes(), "discrete_step: uncond has shape ",
                uncond->sizes(), ", cond ", cond.sizes());
    TORCH_CHECK(uncond->scalar_type() == dtype, "discrete_step: uncond dtype differs from cond's");
    TORCH_CHECK(guidance_scale.has_value() && guidance_scale->defined(),
                "discrete_step: uncond given without guidance_scale");
    same_device(*guidance_scale, "guidance_scale");
    TORCH_CHECK(guidance_scale->scalar_type() == at::kFloat &&
                    (guidance_scale->numel() == 1 || guidance_scale->numel() == B),
                "discrete_step: guidance_scale must have 1 or B=", B, " float32 values");
    c.scale = guidance_scale->contiguous();
  }
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat, "discrete_step: coeffs must be float32");
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(1) == NUM_COEFFS &&
                  (coeffs.size(0) == 1 || coeffs.size(0) == B),
              "discrete_step: coeffs must have shape [1 or B, ", int(NUM_COEFFS), "], got ",
              coeffs.sizes());
  c.has_noise = noise.has_value() && noise->defined();
  if (c.has_noise) {
    same_device(*noise, "noise");
    TORCH_CHECK(noise->dim() == 3 && noise->size(0) == B && noise->size(1) == K &&
                    noise->size(2) == N,
                "discrete_step: noise has shape ", noise->sizes(), ", expected [B, K, N] = [", B,
                ", ", K, ", ", N, "]");
    TORCH_CHECK(noise->scalar_type() == at::kFloat,
                "discrete_step: noise must be float32 (uniform in [0, 1))");
  }
  return c;
}

}  // namespace discrete
}  // namespace fastdiff
