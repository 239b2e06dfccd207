// discrete_step on the CPU: OpenMP over blocks of tokens, one token's K classes at a time.
//
// The inputs keep diffusers' layout, classes on dim 1 ([B, K-1, N]), so one token's
// classes lie N elements apart. A task gathers kBlock neighbouring tokens row by row
// (contiguous reads) into a per-token scratch, runs the formula per token on
// contiguous floats, and scatters the log-probs back row by row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "discrete_step/discrete_step_args.h"
#include "discrete_step/discrete_step_coeffs.h"

namespace fastdiff {
namespace discrete {
namespace {

constexpr int64_t kBlock = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Strided {
  const void* ptr = nullptr;
  int64_t sb = 0, sk = 0, sn = 0;
  static Strided of(const at::Tensor& t) {
    return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
  }
};

// torch's CPU logaddexp, so ties of infinities behave the same.
inline float logaddexp(float a, float b) {
  if (std::isinf(a) && a == b) return a;
  const float m = std::max(a, b);
  return m + std::log1p(std::exp(-std::abs(a - b)));
}

// torch's logsumexp: an infinite maximum is not subtracted (it would give NaN).
inline float logsumexp(const float* v, int64_t n) {
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, v[i]);
  if (std::isinf(m)) m = 0.0f;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(v[i] - m);
  return static_cast<float>(std::log(sum)) + m;
}

// Sort key of torch.sort(descending=True, stable=True) for a value that is not NaN:
// descending value, then ascending class index. -0.0 ties with +0.0, as in torch.
// (truncate() places NaNs itself: torch ranks them above +inf.)
inline uint64_t descending_key(float v, int64_t i) {
  v += 0.0f;  // -0.0 + 0.0 = +0.0; every other value is unchanged
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  // Order-preserving as unsigned: negatives flip every bit, the rest only the sign bit.
  const uint32_t ascending = bits ^ ((0u - (bits >> 31)) | 0x80000000u);
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(i);
}

inline int64_t key_class(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffu); }

// Selection parameters of truncate(): classes within kFirstBand nats of the top form the
// first band, each further band is twice as wide, and past kLastBand nats the rest of the
// classes form the last one (their probabilities are below e^-64 of the top's). Within a
// band the order is built chunk by chunk, the first of at least kFirstChunk classes.
constexpr float kFirstBand = 4.0f;
constexpr float kLastBand = 64.0f;
constexpr int64_t kFirstChunk = 32;

// diffusers' VQDiffusionPipeline.truncate: keep class r of the descending order when
// the classes before it sum (float64, compared in float32, as torch's CPU cumsum and
// `<`) to less than the rate; the first one always.
// Called only for rates below 1; 1 or more keeps every class (reference.truncate_log_probs).
//
// Only the kept prefix of the order matters, and it is short unless the distribution is
// flat, so the classes are not sorted: the prefix is built band by band of values below
// the top (a linear scan each), and inside a band chunk by chunk (nth_element, then a
// sort of the chunk), until the running sum reaches the rate. Each band holds exactly the
// next classes of the order, so the sum runs over the same classes in the same order as
// after a full sort, and the result is bit-identical to sorting.
void truncate(float* v, int64_t m, float rate, std::vector<uint64_t>& keys) {
  // The passes over all m classes below are written without data-dependent branches
  // where they can be: with random values those branches mispredict.
  float vtop = kNegInf;
  bool any_nan = false;
  for (int64_t i = 0; i < m; ++i) {
    vtop = v[i] > vtop ? v[i] : vtop;
    any_nan |= std::isnan(v[i]);
  }
  // A NaN ranks first and makes every later partial sum NaN: only the first NaN is kept.
  if (any_nan) {
    int64_t first_nan = 0;
    while (!std::isnan(v[first_nan])) ++first_nan;
    for (int64_t i = 0; i < m; ++i) if (i != first_nan) v[i] = kNegInf;
    return;
  }
  int64_t top = 0;
  while (v[top] != vtop) ++top;  // the first maximum
  // When the most likely class alone reaches the rate, only it is kept.
  if (!(static_cast<float>(static_cast<double>(std::exp(vtop))) < rate)) {
    bool tie = false;
    for (int64_t i = 0; i < m; ++i) tie |= (i != top && v[i] == vtop);
    if (!tie) {
      for (int64_t i = 0; i < m; ++i) if (i != top) v[i] = kNegInf;
      return;
    }
  }
  // Invariant: keys[0, filled) hold the classes of the bands scanned so far, and
  // keys[0, done) the first `done` classes of the order, sorted; `mass` is their running
  // sum. Keys are distinct (they hold the class), so the order is total. One slot more
  // than m for the band scan's last (discarded) write.
  keys.resize(m + 1);
  int64_t filled = 0;
  double mass = 0.0;
  // Every class has probability <= the top's, so at least rate / p_top are kept.
  const double top_p = static_cast<double>(std::exp(vtop));
  const double first = top_p > 0.0 ? 1.25 * static_cast<double>(rate) / top_p + 1.0 : 1e300;
  int64_t done = 0, cut = -1;
  int64_t chunk = first >= static_cast<double>(m) ? m : std::max(kFirstChunk, static_cast<int64_t>(first));
  bool total_checked = false;
  float width = kFirstBand, band_top = vtop, band_low = vtop;
  while (cut < 0) {
    // The next band: classes in [band_low, band_top), the first one closed above.
    band_low = (width > kLastBand || std::isinf(vtop)) ? kNegInf : vtop - width;
    const int64_t band_start = filled;
    const bool first_band = band_start == 0;
    for (int64_t i = 0; i < m; ++i) {  // write every class, keep those in the band
      keys[filled] = descending_key(v[i], i);
      filled += (v[i] >= band_low) & (first_band | (v[i] < band_top));
    }
    const int64_t band_end = filled;
    // Every partial sum is at most the total (up to the order of summation, far inside
    // the margin), so when even the total stays under the rate every class is kept. Worth
    // its m exp() calls only before sorting a large band.
    if (!total_checked && 4 * (band_end - done) > m) {
      total_checked = true;
      double total = 0.0;
      for (int64_t i = 0; i < m; ++i) total += static_cast<double>(std::exp(v[i]));
      if (static_cast<float>(total * (1.0 + 1e-11)) < rate) return;
    }
    while (done < band_end) {
      if (done > 0 && !(static_cast<float>(mass) < rate)) break;
      // A chunk of more than about two thirds of the band's rest is cheaper to sort with
      // the rest than to select.
      const int64_t end = 2 * (band_end - done) <= 3 * chunk ? band_end : done + chunk;
      if (end < band_end)
        std::nth_element(keys.begin() + done, keys.begin() + end, keys.begin() + band_end);
      std::sort(keys.begin() + done, keys.begin() + end);
      float last = 0.0f;
      const int64_t done0 = done;
      int64_t r = done;
      for (; r < end; ++r) {
        if (r > 0 && !(static_cast<float>(mass) < rate)) break;
        last = std::exp(v[key_class(keys[r])]);
        mass += static_cast<double>(last);
      }
      done = r;
      if (r < end) break;
      // Every class not yet placed has probability <= last, so at least
      // (rate - mass) / last more are needed; take half as many again, and at least
      // twice the last chunk, so that the rounds stay few.
      const double needed = last > 0.0f ? (static_cast<double>(rate) - mass) / last : 1e300;
      const double next = std::max(2.0 * static_cast<double>(end - done0), 1.5 * needed + 16.0);
      chunk = next >= static_cast<double>(m) ? m : static_cast<int64_t>(next);
    }
    if (done > 0 && !(static_cast<float>(mass) < rate)) cut = done;
    else if (band_low == kNegInf) return;  // the sum never reached the rate: keep all
    band_top = band_low;
    width *= 2.0f;
  }
  // Kept: the first `cut` classes of the order, i.e. those above the last kept one's value,
  // and those equal to it up to its class (no NaN is left here, and -0.0 == +0.0).
  const int64_t last_class = key_class(keys[cut - 1]);
  const float last_value = v[last_class];
  for (int64_t i = 0; i < m; ++i)
    if (v[i] < last_value || (v[i] == last_value && i > last_class)) v[i] = kNegInf;
}

struct Args {
  Strided cond, uncond, noise;
  const int64_t* x_t;
  int64_t x_sb, x_sn;
  const float* coeffs;
  int64_t coeff_bstride;
  const float* scale;
  int64_t scale_bstride;
  int64_t batch, m, n;
  float rate;
  bool truncate;
  int64_t* tokens;
  float* log_probs;  // [B, K, N] or nullptr
};

// One token: lp holds its M = K-1 model log-probs; out receives K posterior log-probs.
inline int64_t step_token(float* lp, float* out, const float* gumbel, int64_t x, const float* k,
                          bool guided, const Args& a, std::vector<uint64_t>& keys) {
  const int64_t m = a.m;
  if (guided) {
    const float lse = logsumexp(lp, m);
    for (int64_t i = 0; i < m; ++i) lp[i] -= lse;
  }
  if (a.truncate) truncate(lp, m, a.rate, keys);
  for (int64_t i = 0; i < m; ++i) lp[i] = lp[i] < kClampMin ? kClampMin : lp[i];  // keeps NaN

  if (k[POSTERIOR] > 0.5f) {
    TORCH_CHECK(x >= 0 && x <= m, "discrete_step: x_t holds class ", x, ", outside [0, ", m, "]");
    const bool masked = x == m;
    // q-posterior (VQDiffusionScheduler.q_posterior), in the scheduler's operation order.
    for (int64_t i = 0; i < m; ++i)
      out[i] = lp[i] - (masked ? k[CUM_MASK] : (i == x ? k[CUM_SAME] : k[CUM_OTHER]));
    const float norm = logsumexp(out, m);
    const float pa = k[PREV_A], pb = k[PREV_B];
    for (int64_t i = 0; i < m; ++i) {
      const float q = logaddexp(out[i] - norm + pa, pb);
      const float step = masked ? k[STEP_MASK] : (i == x ? k[STEP_SAME] : k[STEP_OTHER]);
      out[i] = q + step + norm;
    }
    out[m] = k[PREV_C] + (masked ? 0.0f : k[STEP_UNMASK]) + norm;
  } else {
    std::copy(lp, lp + m, out);
    out[m] = kNegInf;
  }

  // Gumbel-max; argmax as torch's: the first maximum, a NaN counts as the maximum.
  int64_t best = 0;
  float best_v = kNegInf;
  for (int64_t i = 0; i <= m; ++i) {
    const float v = gumbel ? gumbel[i] + out[i] : out[i];
    if (std::isnan(v)) return i;
    if (i == 0 || v > best_v) best = i, best_v = v;
  }
  return best;
}

template <typename T>
void run(const Args& a, bool guided) {
  const int64_t m = a.m, K = m + 1, blocks = (a.n + kBlock - 1) / kBlock;
  at::parallel_for(0, a.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lp(kBlock * m), out(kBlock * K), gumbel(a.noise.ptr ? kBlock * K : 0);
    std::vector<uint64_t> keys;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, n0 = (task % blocks) * kBlock;
      const int64_t nt = std::min(kBlock, a.n - n0);
      const T* c = static_cast<const T*>(a.cond.ptr) + b * a.cond.sb + n0 * a.cond.sn;
      const float s = guided ? a.scale[b * a.scale_bstride] : 1.0f;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < nt; ++j)
          lp[j * m + i] = static_cast<float>(c[i * a.cond.sk + j * a.cond.sn]);
      if (guided) {
        const T* u = static_cast<const T*>(a.uncond.ptr) + b * a.uncond.sb + n0 * a.uncond.sn;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < nt; ++j) {
            const float uv = static_cast<float>(u[i * a.uncond.sk + j * a.uncond.sn]);
            lp[j * m + i] = uv + s * (lp[j * m + i] - uv);
          }
      }
      if (a.noise.ptr) {
        const float* z = static_cast<const float*>(a.noise.ptr) + b * a.noise.sb + n0 * a.noise.sn;
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < nt; ++j) {
            const float uv = z[i * a.noise.sk + j * a.noise.sn];
            gumbel[j * K + i] = -std::log(-std::log(uv + kGumbelEps) + kGumbelEps);
          }
      }
      const float* k = a.coeffs + b * a.coeff_bstride;
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t x = a.x_t[b * a.x_sb + (n0 + j) * a.x_sn];
        a.tokens[b * a.n + n0 + j] = step_token(lp.data() + j * m, out.data() + j * K,
                                                a.noise.ptr ? gumbel.data() + j * K : nullptr, x,
                                                k, guided, a, keys);
      }
      if (a.log_probs) {
        float* dst = a.log_probs + b * K * a.n + n0;
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < nt; ++j) dst[i * a.n + j] = out[j * K + i];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> discrete_step_cpu(
    const at::Tensor& x_t, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
    const c10::optional<at::Tensor>& guidance_scale, const at::Tensor& coeffs,
    const c10::optional<at::Tensor>& noise, double truncation_rate, bool write_log_probs) {
  TORCH_CHECK(x_t.device().is_cpu(), "discrete_step_cpu: x_t must be a CPU tensor");
  const Checked c = check_args(x_t, cond, uncond, guidance_scale, coeffs, noise);
  const int64_t B = c.batch, N = c.tokens, M = c.codes, K = M + 1;
  const bool guided = c.guided, has_noise = c.has_noise;
  const at::Tensor& scale = c.scale;
  const auto dtype = cond.scalar_type();

  at::Tensor tokens = at::empty({B, N}, x_t.options());
  at::Tensor log_probs = write_log_probs ? at::empty({B, K, N}, cond.options().dtype(at::kFloat))
                                         : at::empty({0}, cond.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {tokens, log_probs};

  at::Tensor coeffs_c = coeffs.contiguous();
  Args a;
  a.cond = Strided::of(cond);
  if (guided) a.uncond = Strided::of(*uncond);
  if (has_noise) a.noise = Strided::of(*noise);
  a.x_t = x_t.data_ptr<int64_t>();
  a.x_sb = x_t.stride(0);
  a.x_sn = x_t.stride(1);
  a.coeffs = coeffs_c.data_ptr<float>();
  a.coeff_bstride = coeffs.size(0) == 1 ? 0 : NUM_COEFFS;
  a.scale = guided ? scale.data_ptr<float>() : nullptr;
  a.scale_bstride = guided && scale.numel() == B && B > 1 ? 1 : 0;
  a.batch = B;
  a.m = M;
  a.n = N;
  a.rate = static_cast<float>(truncation_rate);
  a.truncate = truncation_rate < 1.0;
  a.tokens = tokens.data_ptr<int64_t>();
  a.log_probs = write_log_probs ? log_probs.data_ptr<float>() : nullptr;
  switch (dtype) {
    case at::kFloat: run<float>(a, guided); break;
    case at::kHalf: run<at::Half>(a, guided); break;
    default: run<at::BFloat16>(a, guided); break;
  }
  return {tokens, log_probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("discrete_step", &discrete_step_cpu); }

}  // namespace discrete
}  // namespace fastdiff
