// guided_step: one fused pass per sampler step.
//
// Per element (fp32 arithmetic whatever the storage dtype):
//   p     = uncond ? u + s * (c - u) : c                      classifier-free combine
//   x0    = X0_X * x + X0_P * p                                prediction -> x0 (eps / v / x0)
//   x0    = clamp(x0, -clip, clip)                             optional (GLIDE clip_denoised)
//   std   = learned ? exp(0.5 * (f * LOGVAR_MAX + (1 - f) * LOGVAR_MIN)), f = (v + 1) / 2
//           : 1                                                 v read from the conditional half
//   out   = OUT_X * x + OUT_P * p + OUT_X0 * x0 + sum_j HIST_j * h_j + OUT_NOISE * std * z
//   den   = DEN_X * x + DEN_P * p + DEN_X0 * x0                 optional second output (history)
//
// Every sampler in fastdiff/sampling/ reduces its update to one row of these
// coefficients per sample, computed on the host in float64 once per run.
#pragma once

#include <cmath>

namespace fastdiff {
namespace guided {

// Column indices of the coefficient tensor (float32, shape [1 or B, kNumFixed + H]).
// fastdiff/ops/coeffs.py mirrors these names; keep both in sync.
enum Coeff : int {
  X0_X = 0,
  X0_P = 1,
  OUT_X = 2,
  OUT_P = 3,
  OUT_X0 = 4,
  OUT_NOISE = 5,
  DEN_X = 6,
  DEN_P = 7,
  DEN_X0 = 8,
  LOGVAR_MAX = 9,
  LOGVAR_MIN = 10,
  HIST0 = 11,
};
constexpr int kNumFixed = 11;
constexpr int kMaxHistory = 4;

#if defined(__CUDACC__)
#define FASTDIFF_HD __host__ __device__ __forceinline__
#define FASTDIFF_UNROLL _Pragma("unroll")
#else
#define FASTDIFF_HD inline
#define FASTDIFF_UNROLL
#endif

// The whole per-element computation of the CUDA kernel. The CPU kernel runs the
// same formula staged over L1 tiles (so it vectorises); both are tested against
// the twin. `hist` holds the already-loaded history values.
template <int H>
FASTDIFF_HD void element(const float* k, float x, float c, float u, bool has_uncond, float s,
                         float var, bool learned, float z, bool has_noise, const float* hist,
                         bool clip, float clip_range, float& out, float& den) {
  const float p = has_uncond ? u + s * (c - u) : c;
  float x0 = k[X0_X] * x + k[X0_P] * p;
  // Comparisons, not fminf/fmaxf: those turn a NaN into a bound and hide it.
  if (clip) x0 = x0 < -clip_range ? -clip_range : (x0 > clip_range ? clip_range : x0);
  float acc = k[OUT_X] * x + k[OUT_P] * p + k[OUT_X0] * x0;
FASTDIFF_UNROLL
  for (int j = 0; j < H; ++j) acc += k[HIST0 + j] * hist[j];
  if (has_noise) {
    float std = 1.0f;
    if (learned) {
      const float frac = 0.5f * (var + 1.0f);
      std = expf(0.5f * (frac * k[LOGVAR_MAX] + (1.0f - frac) * k[LOGVAR_MIN]));
    }
    acc += k[OUT_NOISE] * std * z;
  }
  out = acc;
  den = k[DEN_X] * x + k[DEN_P] * p + k[DEN_X0] * x0;
}

}  // namespace guided
}  // namespace fastdiff
