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

// Sort key: descending value, then ascending class index (a stable descending sort).
inline uint64_t descending_key(float v, int64_t i) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(i);
}

// diffusers' VQDiffusionPipeline.truncate: keep class r of the descending order when
// the classes before it sum (float64, compared in float32, as torch's CPU cumsum and
// `<`) to less than the rate; the first one always.
// Called only for rates below 1; 1 or more keeps every class (reference.truncate_log_probs).
void truncate(float* v, int64_t m, float rate, std::vector<uint64_t>& keys) {
  double total = 0.0;
  int64_t top = 0;
  for (int64_t i = 0; i < m; ++i) {
    total += static_cast<double>(std::exp(v[i]));
    if (v[i] > v[top]) top = i;
  }
  // Every partial sum is at most the total (up to the order of summation, far inside
  // the margin), so when even the total stays under the rate every class is kept.
  if (static_cast<float>(total * (1.0 + 1e-11)) < rate) return;
  // When the most likely class alone reaches the rate, only it is kept.
  if (!(static_cast<float>(static_cast<double>(std::exp(v[top]))) < rate) && !std::isnan(v[top])) {
    bool tie = false;
    for (int64_t i = 0; i < m; ++i) tie |= (i != top && v[i] == v[top]);
    if (!tie) {
      for (int64_t i = 0; i < m; ++i) if (i != top) v[i] = kNegInf;
      return;
    }
  }
  keys.resize(m);
  for (int64_t i = 0; i < m; ++i) keys[i] = descending_key(v[i], i);
  std::sort(keys.begin(), keys.end());
  double mass = 0.0;
  int64_t r = 0;
  for (; r < m; ++r) {
    if (r > 0 && !(static_cast<float>(mass) < rate)) break;
    mass += static_cast<double>(std::exp(v[keys[r] & 0xffffffffu]));
  }
  for (; r < m; ++r) v[keys[r] & 0xffffffffu] = kNegInf;
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
  TORCH_CHECK(x_t.dim() == 2 && x_t.scalar_type() == at::kLong,
              "discrete_step: x_t must be an int64 [B, N] tensor");
  const int64_t B = x_t.size(0), N = x_t.size(1);
  TORCH_CHECK(cond.dim() == 3 && cond.size(0) == B && cond.size(2) == N && cond.size(1) >= 1,
              "discrete_step: cond has shape ", cond.sizes(), ", expected [B, K-1, N] with B=", B,
              ", N=", N);
  const auto dtype = cond.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "discrete_step: cond must be float32, float16 or bfloat16");
  const int64_t M = cond.size(1), K = M + 1;
  const bool guided = uncond.has_value() && uncond->defined();
  auto on_cpu = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x_t.device(), "discrete_step: ", name, " is on ", t.device(),
                " but x_t is on ", x_t.device());
  };
  on_cpu(cond, "cond");
  on_cpu(coeffs, "coeffs");
  at::Tensor scale;
  if (guided) {
    on_cpu(*uncond, "uncond");
    TORCH_CHECK(uncond->sizes() == cond.sizes(), "discrete_step: uncond has shape ",
                uncond->sizes(), ", cond ", cond.sizes());
    TORCH_CHECK(uncond->scalar_type() == dtype, "discrete_step: uncond dtype differs from cond's");
    TORCH_CHECK(guidance_scale.has_value() && guidance_scale->defined(),
                "discrete_step: uncond given without guidance_scale");
    on_cpu(*guidance_scale, "guidance_scale");
    TORCH_CHECK(guidance_scale->scalar_type() == at::kFloat &&
                    (guidance_scale->numel() == 1 || guidance_scale->numel() == B),
                "discrete_step: guidance_scale must have 1 or B=", B, " float32 values");
    scale = guidance_scale->contiguous();
  }
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat, "discrete_step: coeffs must be float32");
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(1) == NUM_COEFFS &&
                  (coeffs.size(0) == 1 || coeffs.size(0) == B),
              "discrete_step: coeffs must have shape [1 or B, ", int(NUM_COEFFS), "], got ",
              coeffs.sizes());
  const bool has_noise = noise.has_value() && noise->defined();
  if (has_noise) {
    on_cpu(*noise, "noise");
    TORCH_CHECK(noise->dim() == 3 && noise->size(0) == B && noise->size(1) == K &&
                    noise->size(2) == N,
                "discrete_step: noise has shape ", noise->sizes(), ", expected [B, K, N] = [", B,
                ", ", K, ", ", N, "]");
    TORCH_CHECK(noise->scalar_type() == at::kFloat,
                "discrete_step: noise must be float32 (uniform in [0, 1))");
  }

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
