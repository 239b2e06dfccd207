// guided_step on the CPU: one pass over memory, OpenMP across tiles.
//
// fp32 without learned variance runs one streaming loop per tile, specialised on
// the step's flags. Otherwise each tile of kTile elements is converted to float
// once and the formula of guided_step.h runs as a few branch-free float loops
// (staging through L1 instead of one loop with per-element branches).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "guided_step_args.h"

namespace fastdiff {
namespace guided {
namespace {

constexpr int64_t kTile = 512;

template <typename T>
inline void load(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void store(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
inline const T* at_sample(const Operand& o, int64_t b, int64_t off) {
  return static_cast<const T*>(o.ptr) + b * o.batch_stride + off;
}

template <typename T>
void run_tile(const Prepared& p, const float* __restrict__ k, float s, int64_t b, int64_t off,
              int64_t n) {
  alignas(64) float x[kTile], pr[kTile], x0[kTile], acc[kTile], tmp[kTile];
  load(at_sample<T>(p.x, b, off), x, n);
  load(at_sample<T>(p.cond, b, off), pr, n);
  if (p.has_uncond) {
    load(at_sample<T>(p.uncond, b, off), tmp, n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) pr[i] = tmp[i] + s * (pr[i] - tmp[i]);
  }
  const float kx0x = k[X0_X], kx0p = k[X0_P];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x0[i] = kx0x * x[i] + kx0p * pr[i];
  if (p.clip) {
    // Written with comparisons (not fmin/fmax) so a NaN stays a NaN.
    const float r = p.clip_range;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x0[i] = x0[i] < -r ? -r : (x0[i] > r ? r : x0[i]);
  }
  const float kox = k[OUT_X], kop = k[OUT_P], ko0 = k[OUT_X0];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] = kox * x[i] + kop * pr[i] + ko0 * x0[i];
  for (size_t j = 0; j < p.hist.size(); ++j) {
    load(at_sample<T>(p.hist[j], b, off), tmp, n);
    const float kh = k[HIST0 + j];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += kh * tmp[i];
  }
  if (p.has_noise) {
    const float kn = k[OUT_NOISE];
    if (p.learned) {
      alignas(64) float v[kTile];
      load(at_sample<T>(p.var, b, off), v, n);
      load(at_sample<T>(p.noise, b, off), tmp, n);
      const float lmax = k[LOGVAR_MAX], lmin = k[LOGVAR_MIN];
      for (int64_t i = 0; i < n; ++i) {
        const float frac = 0.5f * (v[i] + 1.0f);
        acc[i] += kn * std::exp(0.5f * (frac * lmax + (1.0f - frac) * lmin)) * tmp[i];
      }
    } else {
      load(at_sample<T>(p.noise, b, off), tmp, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) acc[i] += kn * tmp[i];
    }
  }
  store(acc, p.out.data_ptr<T>() + b * p.inner + off, n);
  if (p.write_den) {
    const float kdx = k[DEN_X], kdp = k[DEN_P], kd0 = k[DEN_X0];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] = kdx * x[i] + kdp * pr[i] + kd0 * x0[i];
    store(acc, p.den.data_ptr<T>() + b * p.inner + off, n);
  }
}

// fp32 without learned variance (every latent-diffusion step): one streaming loop per
// tile straight from the inputs, no staging copies. The flags are template
// parameters so each variant is a branch-free loop the compiler vectorises.
template <int H, bool U, bool NOISE, bool DEN>
void run_tile_f32(const Prepared& p, const float* __restrict__ k, float s, int64_t b, int64_t off,
                  int64_t n) {
  // Separate __restrict__ pointers (an array of pointers would not promise the
  // compiler that outputs and inputs are disjoint, and it would not vectorise).
  const float* __restrict__ x = at_sample<float>(p.x, b, off);
  const float* __restrict__ c = at_sample<float>(p.cond, b, off);
  const float* __restrict__ u = U ? at_sample<float>(p.uncond, b, off) : c;
  const float* __restrict__ z = NOISE ? at_sample<float>(p.noise, b, off) : x;
  const float* __restrict__ h0 = H > 0 ? at_sample<float>(p.hist[0], b, off) : x;
  const float* __restrict__ h1 = H > 1 ? at_sample<float>(p.hist[1], b, off) : x;
  const float* __restrict__ h2 = H > 2 ? at_sample<float>(p.hist[2], b, off) : x;
  const float* __restrict__ h3 = H > 3 ? at_sample<float>(p.hist[3], b, off) : x;
  float* __restrict__ out = p.out.data_ptr<float>() + b * p.inner + off;
  float* __restrict__ den = DEN ? p.den.data_ptr<float>() + b * p.inner + off : nullptr;
  const float kx0x = k[X0_X], kx0p = k[X0_P], kox = k[OUT_X], kop = k[OUT_P], ko0 = k[OUT_X0];
  const float kn = k[OUT_NOISE], kdx = k[DEN_X], kdp = k[DEN_P], kd0 = k[DEN_X0];
  const float k0 = H > 0 ? k[HIST0] : 0.f, k1 = H > 1 ? k[HIST0 + 1] : 0.f;
  const float k2 = H > 2 ? k[HIST0 + 2] : 0.f, k3 = H > 3 ? k[HIST0 + 3] : 0.f;
  // Without clipping the bound is +inf; the comparisons keep NaNs either way.
  const float r = p.clip ? p.clip_range : std::numeric_limits<float>::infinity();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float pr = U ? u[i] + s * (c[i] - u[i]) : c[i];
    float x0 = kx0x * xi + kx0p * pr;
    x0 = x0 < -r ? -r : (x0 > r ? r : x0);
    float acc = kox * xi + kop * pr + ko0 * x0;
    if (H > 0) acc += k0 * h0[i];
    if (H > 1) acc += k1 * h1[i];
    if (H > 2) acc += k2 * h2[i];
    if (H > 3) acc += k3 * h3[i];
    if (NOISE) acc += kn * z[i];
    out[i] = acc;
    if (DEN) den[i] = kdx * xi + kdp * pr + kd0 * x0;
  }
}

using TileFn = void (*)(const Prepared&, const float*, float, int64_t, int64_t, int64_t);

template <int H>
TileFn pick_f32(bool u, bool noise, bool den) {
  const int key = (u ? 4 : 0) | (noise ? 2 : 0) | (den ? 1 : 0);
  switch (key) {
    case 0: return run_tile_f32<H, false, false, false>;
    case 1: return run_tile_f32<H, false, false, true>;
    case 2: return run_tile_f32<H, false, true, false>;
    case 3: return run_tile_f32<H, false, true, true>;
    case 4: return run_tile_f32<H, true, false, false>;
    case 5: return run_tile_f32<H, true, false, true>;
    case 6: return run_tile_f32<H, true, true, false>;
    default: return run_tile_f32<H, true, true, true>;
  }
}

TileFn fast_f32_tile(const Prepared& p) {
  switch (p.hist.size()) {
    case 0: return pick_f32<0>(p.has_uncond, p.has_noise, p.write_den);
    case 1: return pick_f32<1>(p.has_uncond, p.has_noise, p.write_den);
    case 2: return pick_f32<2>(p.has_uncond, p.has_noise, p.write_den);
    case 3: return pick_f32<3>(p.has_uncond, p.has_noise, p.write_den);
    default: return pick_f32<4>(p.has_uncond, p.has_noise, p.write_den);
  }
}

template <typename T>
void run(const Prepared& p) {
  const int64_t tiles = (p.inner + kTile - 1) / kTile;
  const float* coeffs = p.coeffs.data_ptr<float>();
  const float* scale = p.scale.defined() ? p.scale.data_ptr<float>() : nullptr;
  // Grain of 16 tiles (8K elements): below that, thread start-up costs more
  // than the work.
  TileFn tile_fn = &run_tile<T>;
  if constexpr (std::is_same_v<T, float>) {
    if (!p.learned) tile_fn = fast_f32_tile(p);
  }
  at::parallel_for(0, p.batch * tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles, off = (t % tiles) * kTile;
      const float s = scale ? scale[b * p.scale_bstride] : 1.0f;
      tile_fn(p, coeffs + b * p.coeff_bstride, s, b, off, std::min(kTile, p.inner - off));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> guided_step_cpu(
    const at::Tensor& x, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
    const c10::optional<at::Tensor>& guidance_scale, const at::Tensor& coeffs,
    const c10::optional<at::Tensor>& noise, at::TensorList history,
    c10::optional<double> clip_range, bool learned_variance, bool write_denoised) {
  TORCH_CHECK(x.device().is_cpu(), "guided_step_cpu: x must be a CPU tensor");
  Prepared p = prepare(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                       learned_variance, write_denoised);
  if (p.inner == 0) return {p.out, p.den};
  switch (x.scalar_type()) {
    case at::kFloat: run<float>(p); break;
    case at::kHalf: run<at::Half>(p); break;
    case at::kBFloat16: run<at::BFloat16>(p); break;
    default: TORCH_CHECK(false, "guided_step: unsupported dtype ", x.scalar_type());
  }
  return {p.out, p.den};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("guided_step", &guided_step_cpu); }

}  // namespace guided
}  // namespace fastdiff
