// group_norm on the CPU: statistics, then one fused pass that writes
// SiLU?(((x - mean) * rstd * w + b) * (1 + scale) + shift) as y = (x - mean) * a + c per
// channel. (Not x * a + c': for a group of nearly equal values c' would cancel x * a, and
// its rounding, ulp(mean * a), would show; x - mean is exact there.)
//
// Statistics are exact to float32 rounding even for inputs far from zero: the values are
// taken a chunk at a time (kChunk values in L1; for channels-last kRowChunk values of whole
// rows, in L2), each chunk by the corrected two-pass formula (mean, then the sums of
// d = x - mean and d^2; Bjorck's correction removes the mean's rounding), and chunks are
// merged in double by Chan et al.'s update. So each value is read once from memory for the
// statistics and the naive E[x^2] - E[x]^2 cancellation never happens (torch's own CPU
// kernel for channels-last loses the whole variance on x = 1000 + randn; see the tests).
//
// Parallel work:
//   channels-first, B * G >= threads: one task per group (b, g): its D * S values are
//     read for the statistics and read again, from L2, by the write;
//   channels-first, fewer groups: pieces of groups in parallel for the statistics, then
//     the write in parallel over the whole tensor;
//   channels-last: blocks of rows [rows, C] per sample; both the statistics and the write
//     run over tiles of kChannelTile channels with the rows inside, so per-channel
//     accumulators and coefficients stay in registers.
//
// The inner loops are plain loops that GCC/Clang vectorise (SiLU over GCC vector types,
// see silu_inplace); on x86-64 they are compiled three times (AVX-512, AVX2+FMA, baseline
// SSE2) and the CPU's best one is chosen once at run time, since the extension itself is
// built for the baseline ISA. SiLU uses its own exp() (range reduction + Cephes'
// polynomial, about 2 ulp) so that it vectorises too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "group_norm/group_norm_args.h"

namespace fastdiff {
namespace gn {
namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define FD_X86_MULTIVERSION 1
#define FD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FD_X86_MULTIVERSION 0
#define FD_ALWAYS_INLINE inline
#endif

constexpr int64_t kChunk = 4096;       // values per two-pass chunk: 16 KiB of fp32, in L1
constexpr int64_t kWriteTile = 1024;   // values per write tile (SiLU'd, or converted, in L1)
constexpr int64_t kPiece = 32 * 1024;  // values per statistics task when groups are few
// Channels-last statistics take rows kRowChunk values at a time (128 KiB of fp32, in L2):
// the per-group work after each chunk costs O(C), so a chunk should hold many rows.
constexpr int64_t kRowChunk = 32 * 1024;

// Running moments of a set of values: count, mean, sum of squared deviations.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mean_b, double m2_b) {  // Chan, Golub & LeVeque (1979)
    if (nb <= 0) return;
    const double n_ab = n + nb, delta = mean_b - mean;
    mean += delta * (nb / n_ab);
    m2 += m2_b + delta * delta * (n * nb / n_ab);
    n = n_ab;
  }
  void merge(const Moments& o) { merge(o.n, o.mean, o.m2); }
};

template <typename T>
FD_ALWAYS_INLINE void to_float(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
FD_ALWAYS_INLINE void from_float(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

FD_ALWAYS_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FD_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// y * sigmoid(y) = y / (1 + exp(-y)). exp(t) = 2^n e^r with n = round(t / ln 2), r = t - n ln 2
// (ln 2 in two parts), e^r by Cephes' expf polynomial. t is clamped so that 2^n stays a
// normal float (the result is then within rounding of 0 or y); a NaN y stays NaN through
// the final y / (...). V is float or a GCC vector of floats (the same code, lane-wise).
template <typename V, typename U>
FD_ALWAYS_INLINE V silu_of(V y, V lo, V hi) {
  V t = -y;
  t = t < lo ? lo : t;
  t = t > hi ? hi : t;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V k = t * 1.44269504088896341f + kRound;
  const V n = k - kRound;
  U ni;  // n as an integer: the low bits of k
  std::memcpy(&ni, &k, sizeof(ni));
  ni = ni - 0x4B400000u + 127u;  // 0x4B400000: the bits of kRound; 127: the exponent bias
  ni = ni << 23;
  V scale;
  std::memcpy(&scale, &ni, sizeof(scale));
  V r = t - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return y / (1.0f + p * scale);
}

FD_ALWAYS_INLINE float silu(float y) { return silu_of<float, uint32_t>(y, -87.0f, 88.0f); }

// SiLU in place over n floats. GCC does not if-convert the clamps of a scalar loop for AVX2
// (it does for AVX-512), so the loop is written over GCC vectors of VecBytes, the register
// width of the ISA it is compiled for (a wider vector would be lowered lane by lane).
#if defined(__GNUC__)
template <int VecBytes>
struct VecTypes {
  typedef float Float __attribute__((vector_size(VecBytes)));
  typedef uint32_t Uint __attribute__((vector_size(VecBytes)));
};

template <int VecBytes>
FD_ALWAYS_INLINE void silu_inplace(float* __restrict__ y, int64_t n) {
  typedef typename VecTypes<VecBytes>::Float FloatVec;
  typedef typename VecTypes<VecBytes>::Uint UintVec;
  constexpr int64_t kLanes = VecBytes / sizeof(float);
  const FloatVec lo = FloatVec{} - 87.0f, hi = FloatVec{} + 88.0f;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    FloatVec v;
    std::memcpy(&v, y + i, sizeof(v));
    v = silu_of<FloatVec, UintVec>(v, lo, hi);
    std::memcpy(y + i, &v, sizeof(v));
  }
  for (; i < n; ++i) y[i] = silu(y[i]);
}
#else
template <int VecBytes>
FD_ALWAYS_INLINE void silu_inplace(float* __restrict__ y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = silu(y[i]);
}
#endif

// ----------------------------------------------------------------- ISA-independent bodies

// Moments of n contiguous float values, by the corrected two-pass formula (n <= kChunk).
FD_ALWAYS_INLINE void chunk_moments(const float* __restrict__ x, int64_t n, Moments& acc) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(n);
  float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < n; ++i) {
    const float d = x[i] - mean;
    s1 += d;
    s2 += d * d;
  }
  const double nd = static_cast<double>(n), c = s1;
  acc.merge(nd, mean + c / nd, static_cast<double>(s2) - c * c / nd);
}

template <typename T, int VecBytes>
FD_ALWAYS_INLINE void range_moments_body(const T* __restrict__ x, int64_t n, Moments* out) {
  Moments acc;
  alignas(64) float buf[std::is_same<T, float>::value ? 1 : kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    if constexpr (std::is_same<T, float>::value) {
      chunk_moments(x + i, m, acc);
    } else {
      to_float(x + i, buf, m);
      chunk_moments(buf, m, acc);
    }
  }
  *out = acc;
}

// y[i] = (x[i] - mean) * a + c, then SiLU tile by tile (while the tile is in L1); x may be y.
template <bool Silu, int VecBytes>
FD_ALWAYS_INLINE void affine_float(const float* x, float* y, int64_t n, float mean, float a,
                                   float c) {
  for (int64_t i0 = 0; i0 < n; i0 += kWriteTile) {
    const int64_t m = std::min(kWriteTile, n - i0);
    const float* xt = x + i0;
    float* yt = y + i0;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) yt[i] = (xt[i] - mean) * a + c;
    if (Silu) silu_inplace<VecBytes>(yt, m);
  }
}

// y[i] = (x[i] - mean) * a + c (then SiLU) for n contiguous values.
template <typename T, bool Silu, int VecBytes>
FD_ALWAYS_INLINE void range_affine_body(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                                        float mean, float a, float c) {
  if constexpr (std::is_same<T, float>::value) {
    affine_float<Silu, VecBytes>(x, y, n, mean, a, c);
  } else {
    alignas(64) float buf[kWriteTile];
    for (int64_t i = 0; i < n; i += kWriteTile) {
      const int64_t m = std::min(kWriteTile, n - i);
      to_float(x + i, buf, m);
      affine_float<Silu, VecBytes>(buf, buf, m, mean, a, c);
      from_float(buf, y + i, m);
    }
  }
}

// Channels-last loops run over tiles of kChannelTile channels, rows inside, so that a tile's
// accumulators (or coefficients) stay in registers while the rows stream past.
constexpr int64_t kChannelTile = 64;

// sum[j] = sum over rows of v[r * C + j] - m[j], and, with Squares, sq[j] the sum of the
// squares; j < W (W = 0: a width w known only at run time, for the last, narrower tile).
template <int64_t W, bool Squares>
FD_ALWAYS_INLINE void tile_sums(const float* __restrict__ v, int64_t rows, int64_t C, int64_t w,
                                const float* __restrict__ m, float* __restrict__ sum,
                                float* __restrict__ sq) {
  const int64_t n = W > 0 ? W : w;
  alignas(64) float acc[W > 0 ? W : kChannelTile] = {};
  alignas(64) float acc2[W > 0 ? W : kChannelTile] = {};
  alignas(64) float mt[W > 0 ? W : kChannelTile];
  for (int64_t j = 0; j < n; ++j) mt[j] = m ? m[j] : 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict__ row = v + r * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float d = row[j] - mt[j];
      acc[j] += d;
      if (Squares) acc2[j] += d * d;
    }
  }
  for (int64_t j = 0; j < n; ++j) sum[j] = acc[j];
  if (Squares)
    for (int64_t j = 0; j < n; ++j) sq[j] = acc2[j];
}

template <bool Squares>
FD_ALWAYS_INLINE void channel_sums(const float* __restrict__ v, int64_t rows, int64_t C,
                                   const float* __restrict__ m, float* __restrict__ sum,
                                   float* __restrict__ sq) {
  int64_t c0 = 0;
  for (; c0 + kChannelTile <= C; c0 += kChannelTile)
    tile_sums<kChannelTile, Squares>(v + c0, rows, C, 0, m ? m + c0 : nullptr, sum + c0,
                                     Squares ? sq + c0 : nullptr);
  if (c0 < C)
    tile_sums<0, Squares>(v + c0, rows, C, C - c0, m ? m + c0 : nullptr, sum + c0,
                          Squares ? sq + c0 : nullptr);
}

// Channels-last statistics: `rows` rows of C values (groups of D neighbours), merged into
// out[0, C / D). scratch holds 4 * C + max(kRowChunk, C) floats.
template <typename T, int VecBytes>
FD_ALWAYS_INLINE void rows_moments_body(const T* __restrict__ x, int64_t rows, int64_t C,
                                        int64_t D, Moments* __restrict__ out,
                                        float* __restrict__ scratch) {
  const int64_t G = C / D;
  float* __restrict__ s0 = scratch;          // per-channel sums of x
  float* __restrict__ mc = scratch + C;      // the group's chunk mean, per channel
  float* __restrict__ s1 = scratch + 2 * C;  // per-channel sums of d = x - mean
  float* __restrict__ s2 = scratch + 3 * C;  // per-channel sums of d^2
  float* __restrict__ buf = scratch + 4 * C;
  const int64_t step = std::max<int64_t>(1, kRowChunk / C);
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t nr = std::min(step, rows - r0);
    const float* __restrict__ v;
    if constexpr (std::is_same<T, float>::value) {
      v = x + r0 * C;
    } else {
      to_float(x + r0 * C, buf, nr * C);
      v = buf;
    }
    channel_sums<false>(v, nr, C, nullptr, s0, nullptr);
    const float count = static_cast<float>(nr * D);
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t j = 0; j < D; ++j) s += s0[g * D + j];
      const float m = s / count;
      for (int64_t j = 0; j < D; ++j) mc[g * D + j] = m;
    }
    channel_sums<true>(v, nr, C, mc, s1, s2);
    const double nd = static_cast<double>(nr * D);
    for (int64_t g = 0; g < G; ++g) {
      double c1 = 0, c2 = 0;
      for (int64_t j = 0; j < D; ++j) {
        c1 += s1[g * D + j];
        c2 += s2[g * D + j];
      }
      out[g].merge(nd, mc[g * D] + c1 / nd, c2 - c1 * c1 / nd);
    }
  }
}

// One tile of channels over `rows` rows: y = (x - mean) * a + c, then SiLU.
template <typename T, bool Silu, int VecBytes, int64_t W>
FD_ALWAYS_INLINE void tile_affine(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                  int64_t C, int64_t w, const float* __restrict__ mean,
                                  const float* __restrict__ a, const float* __restrict__ c) {
  constexpr int64_t kW = W > 0 ? W : kChannelTile;
  const int64_t n = W > 0 ? W : w;
  alignas(64) float mt[kW], at[kW], ct[kW], out[kW];
  for (int64_t j = 0; j < n; ++j) {
    mt[j] = mean[j];
    at[j] = a[j];
    ct[j] = c[j];
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ xr = x + r * C;
    T* __restrict__ yr = y + r * C;
    if constexpr (std::is_same<T, float>::value) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] = (xr[j] - mt[j]) * at[j] + ct[j];
      if (Silu) silu_inplace<VecBytes>(yr, n);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = (static_cast<float>(xr[j]) - mt[j]) * at[j] + ct[j];
      if (Silu) silu_inplace<VecBytes>(out, n);
      from_float(out, yr, n);
    }
  }
}

// Channels-last write of `rows` rows of C values with per-channel mean[c], a[c], c[c].
template <typename T, bool Silu, int VecBytes>
FD_ALWAYS_INLINE void rows_affine_body(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                       int64_t C, const float* __restrict__ mean,
                                       const float* __restrict__ a,
                                       const float* __restrict__ c) {
  int64_t c0 = 0;
  for (; c0 + kChannelTile <= C; c0 += kChannelTile)
    tile_affine<T, Silu, VecBytes, kChannelTile>(x + c0, y + c0, rows, C, 0, mean + c0, a + c0, c + c0);
  if (c0 < C)
    tile_affine<T, Silu, VecBytes, 0>(x + c0, y + c0, rows, C, C - c0, mean + c0, a + c0, c + c0);
}

// ----------------------------------------------------------------- per-ISA entry points

#if FD_X86_MULTIVERSION
#define FD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define FD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The best ISA of this CPU; FASTDIFF_CPU_ISA=avx2 or =baseline (read once) lowers it, so
// tests can run every variant on one machine.
Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if FD_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    best = Isa::kAvx2;
#endif
  const char* asked = std::getenv("FASTDIFF_CPU_ISA");
  if (asked != nullptr && std::strcmp(asked, "baseline") == 0) return Isa::kBaseline;
  if (asked != nullptr && std::strcmp(asked, "avx2") == 0 && best == Isa::kAvx512)
    return Isa::kAvx2;
  return best;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

// NAME(args) calls NAME_body<..., VecBytes>(args) compiled for the best ISA of this CPU.
#if FD_X86_MULTIVERSION
#define FD_DISPATCH(NAME, TPARAMS, TARGS, PARAMS, ARGS)                        \
  template <TPARAMS>                                                           \
  FD_TARGET_AVX512 void NAME##_avx512 PARAMS { NAME##_body<TARGS, 64> ARGS; }     \
  template <TPARAMS>                                                           \
  FD_TARGET_AVX2 void NAME##_avx2 PARAMS { NAME##_body<TARGS, 32> ARGS; }         \
  template <TPARAMS>                                                           \
  void NAME##_baseline PARAMS { NAME##_body<TARGS, 16> ARGS; }                    \
  template <TPARAMS>                                                           \
  void NAME PARAMS {                                                           \
    switch (isa()) {                                                           \
      case Isa::kAvx512: NAME##_avx512<TARGS> ARGS; break;                     \
      case Isa::kAvx2: NAME##_avx2<TARGS> ARGS; break;                         \
      default: NAME##_baseline<TARGS> ARGS; break;                             \
    }                                                                          \
  }
#else
#define FD_DISPATCH(NAME, TPARAMS, TARGS, PARAMS, ARGS) \
  template <TPARAMS>                                    \
  void NAME PARAMS { NAME##_body<TARGS, 16> ARGS; }
#endif

#define FD_COMMA ,
FD_DISPATCH(range_moments, typename T, T, (const T* x, int64_t n, Moments* out), (x, n, out))
FD_DISPATCH(range_affine, typename T FD_COMMA bool Silu, T FD_COMMA Silu,
            (const T* x, T* y, int64_t n, float mean, float a, float c), (x, y, n, mean, a, c))
FD_DISPATCH(rows_moments, typename T, T,
            (const T* x, int64_t rows, int64_t C, int64_t D, Moments* out, float* scratch),
            (x, rows, C, D, out, scratch))
FD_DISPATCH(rows_affine, typename T FD_COMMA bool Silu, T FD_COMMA Silu,
            (const T* x, T* y, int64_t rows, int64_t C, const float* mean, const float* a,
             const float* c),
            (x, y, rows, C, mean, a, c))
#undef FD_COMMA

// ----------------------------------------------------------------- drivers

// One parameter as given: read where it lies, in its own dtype and strides, and widened to
// float per channel (the twin's weight.float()); nothing is cast or copied per call. Only a
// dtype without a case below (the float8 types) is converted, once per call.
struct ParamRef {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t stride = 0, bstride = 0;  // between channels; between samples (0: one shared row)
  at::Tensor converted;             // keeps a conversion alive

  static ParamRef of(const at::Tensor& t, bool per_sample) {
    ParamRef r;
    if (!t.defined()) return r;
    at::Tensor u = t;
    const auto dt = u.scalar_type();
    if (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16 && dt != at::kDouble)
      u = r.converted = u.to(at::kFloat);
    r.data = u.data_ptr();
    r.dtype = u.scalar_type();
    r.stride = u.stride(per_sample ? 1 : 0);
    r.bstride = per_sample ? sample_stride(u) : 0;
    return r;
  }

  explicit operator bool() const { return data != nullptr; }

  // The value for sample b, channel c (a per-channel parameter ignores b).
  float at(int64_t b, int64_t c) const {
    const int64_t i = b * bstride + c * stride;
    switch (dtype) {
      case at::kHalf: return static_cast<float>(static_cast<const at::Half*>(data)[i]);
      case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(data)[i]);
      case at::kDouble: return static_cast<float>(static_cast<const double*>(data)[i]);
      default: return static_cast<const float*>(data)[i];
    }
  }
};

struct Coeffs {
  ParamRef weight, bias, scale, shift;
  float eps = 0.f;

  static Coeffs of(const Prepared& p) {
    Coeffs k;
    k.weight = ParamRef::of(p.weight, false);
    k.bias = ParamRef::of(p.bias, false);
    k.scale = ParamRef::of(p.scale, true);
    k.shift = ParamRef::of(p.shift, true);
    k.eps = p.eps;
    return k;
  }

  // Channel c of sample b: y = (x - mean) * a + c with a = rstd w (1 + s),
  // c = bias (1 + s) + shift.
  void channel(const Moments& m, int64_t b, int64_t c, float* mean, float* a, float* off) const {
    const double var = m.n > 0 ? std::max(m.m2 / m.n, 0.0) : 0.0;
    const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
    const double w = weight ? weight.at(0, c) : 1.0;
    const double bi = bias ? bias.at(0, c) : 0.0;
    const double s = scale ? 1.0 + scale.at(b, c) : 1.0;
    const double sh = shift ? shift.at(b, c) : 0.0;
    // A NaN in the group makes the mean NaN, and with it every output, as in torch.
    *mean = static_cast<float>(m.n > 0 ? m.mean : 0.0);
    *a = static_cast<float>(rstd * w * s);
    *off = static_cast<float>(bi * s + sh);
  }
};

template <typename T, bool Silu>
void run_channels_first(const Prepared& p) {
  const int64_t B = p.batch, C = p.channels, G = p.groups, D = C / G, S = p.spatial;
  const int64_t N = D * S;  // values per group
  const T* x = p.x.data_ptr<T>();
  T* y = p.out.data_ptr<T>();
  const Coeffs k = Coeffs::of(p);
  if (B * G >= at::get_num_threads()) {
    at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        Moments m;
        range_moments<T>(x + bg * N, N, &m);
        const int64_t b = bg / G, c0 = (bg % G) * D;
        for (int64_t j = 0; j < D; ++j) {
          float mean, a, off;
          k.channel(m, b, c0 + j, &mean, &a, &off);
          const int64_t o = (bg * D + j) * S;
          range_affine<T, Silu>(x + o, y + o, S, mean, a, off);
        }
      }
    });
    return;
  }
  // Few, large groups: statistics over pieces of groups, then one parallel write.
  const int64_t pieces = (N + kPiece - 1) / kPiece;
  std::vector<Moments> part(B * G * pieces);
  at::parallel_for(0, B * G * pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bg = t / pieces, i = (t % pieces) * kPiece;
      range_moments<T>(x + bg * N + i, std::min(kPiece, N - i), &part[t]);
    }
  });
  std::vector<float> mean(B * C), a(B * C), off(B * C);
  for (int64_t bg = 0; bg < B * G; ++bg) {
    Moments m;
    for (int64_t i = 0; i < pieces; ++i) m.merge(part[bg * pieces + i]);
    for (int64_t j = 0; j < D; ++j) {
      const int64_t bc = bg * D + j;
      k.channel(m, bg / G, bc % C, &mean[bc], &a[bc], &off[bc]);
    }
  }
  at::parallel_for(0, B * C * S, kPiece, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t bc = i / S, n = std::min(end - i, (bc + 1) * S - i);
      range_affine<T, Silu>(x + i, y + i, n, mean[bc], a[bc], off[bc]);
      i += n;
    }
  });
}

template <typename T, bool Silu>
void run_channels_last(const Prepared& p) {
  const int64_t B = p.batch, C = p.channels, G = p.groups, D = C / G, S = p.spatial;
  const T* x = p.x.data_ptr<T>();
  T* y = p.out.data_ptr<T>();
  const Coeffs k = Coeffs::of(p);
  // Statistics over blocks of rows: a block size that depends only on the shape keeps the
  // result independent of the thread count.
  const int64_t block = std::max<int64_t>(1, 2 * kRowChunk / C);
  const int64_t blocks = (S + block - 1) / block;
  std::vector<Moments> part(B * blocks * G);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(4 * C + std::max(kRowChunk, C));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, r0 = (t % blocks) * block;
      rows_moments<T>(x + (b * S + r0) * C, std::min(block, S - r0), C, D, &part[t * G],
                      scratch.data());
    }
  });
  std::vector<float> mean(B * C), a(B * C), off(B * C);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      Moments m;
      for (int64_t i = 0; i < blocks; ++i) m.merge(part[(b * blocks + i) * G + g]);
      for (int64_t j = 0; j < D; ++j) {
        const int64_t c = g * D + j;
        k.channel(m, b, c, &mean[b * C + c], &a[b * C + c], &off[b * C + c]);
      }
    }
  }
  at::parallel_for(0, B * S, block, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end;) {
      const int64_t b = r / S, n = std::min(end - r, (b + 1) * S - r);
      rows_affine<T, Silu>(x + r * C, y + r * C, n, C, mean.data() + b * C, a.data() + b * C,
                           off.data() + b * C);
      r += n;
    }
  });
}

template <typename T>
void run(const Prepared& p) {
  if (p.channels_last) {
    p.silu ? run_channels_last<T, true>(p) : run_channels_last<T, false>(p);
  } else {
    p.silu ? run_channels_first<T, true>(p) : run_channels_first<T, false>(p);
  }
}

at::Tensor group_norm_cpu(const at::Tensor& x, int64_t num_groups,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, double eps,
                          const c10::optional<at::Tensor>& scale,
                          const c10::optional<at::Tensor>& shift, bool silu) {
  TORCH_CHECK(x.device().is_cpu(), "group_norm_cpu: x must be a CPU tensor");
  const Prepared p = prepare(x, num_groups, weight, bias, eps, scale, shift, silu);
  if (p.out.numel() == 0) return p.out;
  switch (x.scalar_type()) {
    case at::kFloat: run<float>(p); break;
    case at::kHalf: run<at::Half>(p); break;
    default: run<at::BFloat16>(p); break;
  }
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("group_norm", &group_norm_cpu); }

}  // namespace gn
}  // namespace fastdiff
