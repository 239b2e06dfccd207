// discrete_step on CUDA: a block takes TN neighbouring tokens of one sample, a group of
// kThreads / TN threads per token, and keeps each token's M = K - 1 log-probs (and, for
// truncation, their probabilities) in a scratch row of shared memory.
//
// The inputs keep diffusers' layout, classes on dim 1 and tokens innermost, so the block
// moves whole class rows of its TN tokens at once (reads of cond / uncond / noise and
// writes of the log-probs), and each group then works on its own row: logsumexp,
// truncation, q-posterior and Gumbel-max, each a reduction over the group.
//
// Truncation without sorting (as the Triton kernel, fastdiff/ops/triton/discrete_step.py):
// an int64 key orders the classes as torch.sort(descending=True, stable=True) does, and the
// kept prefix {key >= c*} is found by bisection on c*, one float64 group reduction of the
// mass of {key >= mid} per step, until a single class lies between the bounds. Reductions
// run in a fixed order, so results are deterministic.
//
// expf / logf / log1pf are CUDA's accurate ones (no fast math), the functions torch's own
// CUDA kernels call, so exp() of a log-probability matches torch's bit for bit.
//
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h (see guided_step_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "discrete_step/discrete_step_args.h"
#include "discrete_step/discrete_step_coeffs.h"

namespace fastdiff {
namespace discrete {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;
// Two tokens per block while their scratch rows stay under this size (M up to about
// 4600), so that a few blocks share an SM; one token per block above it, and rows in a
// global workspace when one row does not fit in shared memory at all.
constexpr int64_t kTwoTokenBytes = 72 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Args {
  const T* cond = nullptr;
  const T* uncond = nullptr;  // null unless guided
  const float* noise = nullptr;  // null without noise
  int64_t c_sb = 0, c_sk = 0, c_sn = 0, u_sb = 0, u_sk = 0, u_sn = 0, z_sb = 0, z_sk = 0, z_sn = 0;
  const int64_t* x_t = nullptr;
  int64_t x_sb = 0, x_sn = 0;
  const float* coeffs = nullptr;
  int64_t coeff_bstride = 0;
  const float* scale = nullptr;
  int64_t scale_bstride = 0;
  int64_t batch = 0, n = 0, m = 0;
  int index_bits = 1;
  float rate = 1.0f;
  bool truncate = false;
  int64_t* tokens = nullptr;
  float* log_probs = nullptr;  // [B, K, N], null unless written
  float* workspace = nullptr;  // null: the scratch rows live in shared memory
};

// --- reductions over the kThreads / TN threads of one token ------------------------------
// Shuffle butterflies give every lane the same value (IEEE addition and the max/argmax
// below are commutative), and the warps' values are combined in warp order, so the result
// is the same on every thread of the group and on every run. Every thread of the block
// must call these (they synchronise the block).

template <typename V>
__device__ __forceinline__ V shfl_xor(V v, int offset) {
  return __shfl_xor_sync(kFullMask, v, offset);
}

template <int TN, typename A, typename B, typename Op>
__device__ __forceinline__ void group_reduce(A& a, B& b, Op op, A* buf_a, B* buf_b) {
  constexpr int kWarpsPerToken = kWarps / TN;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other_a = shfl_xor(a, offset);
    const B other_b = shfl_xor(b, offset);
    op(a, b, other_a, other_b);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    buf_a[warp] = a;
    buf_b[warp] = b;
  }
  __syncthreads();
  const int first = warp / kWarpsPerToken * kWarpsPerToken;
  a = buf_a[first];
  b = buf_b[first];
  for (int w = first + 1; w < first + kWarpsPerToken; ++w) op(a, b, buf_a[w], buf_b[w]);
  __syncthreads();
}

// One slot per warp for each operand type a reduction combines.
struct SharedBuffers {
  double d[kWarps];
  long long l0[kWarps], l1[kWarps];
  float f[kWarps];
  int i0[kWarps], i1[kWarps];
};

struct SumOp {
  template <typename A, typename B>
  __device__ void operator()(A& a, B& b, A oa, B ob) const { a += oa; b += ob; }
};
struct MaxMinOp {  // (max, min)
  __device__ void operator()(long long& a, long long& b, long long oa, long long ob) const {
    a = oa > a ? oa : a;
    b = ob < b ? ob : b;
  }
};
struct MaxFloatOp {  // fmaxf ignores NaN; a NaN still reaches logsumexp through its sum
  __device__ void operator()(float& a, int&, float oa, int) const { a = fmaxf(a, oa); }
};
struct ArgmaxOp {  // larger value, then lower index; values are NaN-free here
  __device__ void operator()(float& v, int& i, float ov, int oi) const {
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
};
struct MinIntOp {
  __device__ void operator()(int& a, int&, int oa, int) const { a = oa < a ? oa : a; }
};

// --- per-class formula pieces ------------------------------------------------------------

// Orders the classes as torch.sort(descending=True, stable=True), reversed: a larger key
// comes earlier. Value bits above, the reversed class index below; NaN ranks first and
// -0.0 ties with +0.0.
__device__ __forceinline__ long long order_key(float v, int64_t i, int64_t m, int index_bits) {
  int bits = __float_as_int(v == 0.0f ? 0.0f : v);
  bits ^= bits < 0 ? 0x7fffffff : 0;  // negatives: larger magnitude, smaller key
  if (isnan(v)) bits = 0x7fffffff;
  return static_cast<long long>(bits) * (1LL << index_bits) + static_cast<long long>(m - 1 - i);
}

// torch's logaddexp, so ties of infinities behave the same.
__device__ __forceinline__ float logaddexp(float a, float b) {
  if (isinf(a) && a == b) return a;
  const float big = a > b ? a : b;
  return big + log1pf(expf(-fabsf(a - b)));
}

__device__ __forceinline__ float gumbel(float u) {
  return -logf(-logf(u + kGumbelEps) + kGumbelEps);
}

// logsumexp of the group's row, as torch's: an infinite maximum is not subtracted.
template <int TN, typename F>
__device__ float group_logsumexp(F value, int64_t m, int lt, SharedBuffers& sh) {
  constexpr int kGroup = kThreads / TN;
  float mx = -INFINITY;
  int unused = 0;
  for (int64_t i = lt; i < m; i += kGroup) mx = fmaxf(mx, value(i));
  group_reduce<TN>(mx, unused, MaxFloatOp(), sh.f, sh.i0);
  if (isinf(mx)) mx = 0.0f;
  float sum = 0.0f;
  for (int64_t i = lt; i < m; i += kGroup) sum += expf(value(i) - mx);
  group_reduce<TN>(sum, unused, SumOp(), sh.f, sh.i0);
  return logf(sum) + mx;
}

// reference.truncate_log_probs on the group's row lp (probabilities in p).
template <int TN>
__device__ void truncate_row(float* lp, float* p, bool token_ok, int64_t m, int bits, float rate,
                             int lt, SharedBuffers& sh) {
  constexpr int kGroup = kThreads / TN;
  long long top = LLONG_MIN, lo = LLONG_MAX;
  double total = 0.0;
  for (int64_t i = lt; i < m; i += kGroup) {
    p[i] = expf(lp[i]);
    const long long key = order_key(lp[i], i, m, bits);
    top = key > top ? key : top;
    lo = key < lo ? key : lo;
    total += static_cast<double>(p[i]);
  }
  group_reduce<TN>(top, lo, MaxMinOp(), sh.l0, sh.l1);
  float top_p = 0.0f;
  for (int64_t i = lt; i < m; i += kGroup)
    if (order_key(lp[i], i, m, bits) == top) top_p = p[i];
  group_reduce<TN>(total, top_p, SumOp(), sh.d, sh.f);
  // The first class of the order alone reaches the rate: only it is kept. Even the
  // whole row stays under the rate: every class is kept.
  const bool keep_top = !(top_p < rate);
  const bool keep_all = static_cast<float>(total) < rate;
  // Invariant while searching: {key >= lo} reaches the rate, {key >= hi} does not; the
  // counts are the sizes of those sets.
  if (keep_top) lo = top;
  long long hi = top;
  int count_lo = static_cast<int>(m), count_hi = 1;
  bool active = token_ok && !keep_top && !keep_all && count_lo - count_hi > 1 && hi - lo > 1;
  while (__syncthreads_or(active)) {
    const long long mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1);  // floor((lo + hi) / 2)
    double mass = 0.0;
    int count = 0;
    for (int64_t i = lt; i < m; i += kGroup) {
      if (order_key(lp[i], i, m, bits) >= mid) {
        mass += static_cast<double>(p[i]);
        ++count;
      }
    }
    group_reduce<TN>(mass, count, SumOp(), sh.d, sh.i0);
    if (active) {
      if (!(static_cast<float>(mass) < rate)) {
        lo = mid;
        count_lo = count;
      } else {
        hi = mid;
        count_hi = count;
      }
      active = count_lo - count_hi > 1 && hi - lo > 1;
    }
  }
  for (int64_t i = lt; i < m; i += kGroup)
    if (order_key(lp[i], i, m, bits) < lo) lp[i] = -INFINITY;
}

template <typename T, int TN>
__global__ void __launch_bounds__(kThreads) discrete_step_kernel(const Args<T> a) {
  extern __shared__ float shared_rows[];
  __shared__ SharedBuffers sh;
  constexpr int kGroup = kThreads / TN;
  const int64_t m = a.m, row_stride = 2 * m + 1;  // lp[m], p[m], one float against bank conflicts
  const int g = threadIdx.x / kGroup, lt = threadIdx.x % kGroup;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * TN;
  const int64_t n = n0 + g;
  const bool token_ok = n < a.n;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    float* rows = a.workspace
        ? a.workspace + (b * gridDim.x + blockIdx.x) * TN * row_stride
        : shared_rows;
    float* lp = rows + g * row_stride;
    float* p = lp + m;
    const float* k = a.coeffs + b * a.coeff_bstride;
    const float s = a.uncond ? a.scale[b * a.scale_bstride] : 1.0f;

    // Load whole class rows of the TN tokens; tokens past N get zeros, never stored.
    for (int64_t e = threadIdx.x; e < m * TN; e += kThreads) {
      const int j = static_cast<int>(e % TN);
      const int64_t i = e / TN, nj = n0 + j;
      float v = 0.0f;
      if (nj < a.n) {
        v = static_cast<float>(a.cond[b * a.c_sb + i * a.c_sk + nj * a.c_sn]);
        if (a.uncond) {
          const float u = static_cast<float>(a.uncond[b * a.u_sb + i * a.u_sk + nj * a.u_sn]);
          v = u + s * (v - u);
        }
      }
      rows[j * row_stride + i] = v;
    }
    __syncthreads();

    if (a.uncond) {  // renormalise the guided log-probs
      const float lse = group_logsumexp<TN>([&](int64_t i) { return lp[i]; }, m, lt, sh);
      for (int64_t i = lt; i < m; i += kGroup) lp[i] -= lse;
    }
    if (a.truncate) truncate_row<TN>(lp, p, token_ok, m, a.index_bits, a.rate, lt, sh);
    for (int64_t i = lt; i < m; i += kGroup) lp[i] = lp[i] < kClampMin ? kClampMin : lp[i];

    float out_mask = -INFINITY;  // at t = 0 the mask class is impossible
    if (k[POSTERIOR] > 0.5f) {
      // q-posterior (VQDiffusionScheduler.q_posterior), in the twin's operation order.
      const int64_t x = token_ok ? a.x_t[b * a.x_sb + n * a.x_sn] : 0;
      const bool masked = x == m;
      const float cum_mask = k[CUM_MASK], cum_same = k[CUM_SAME], cum_other = k[CUM_OTHER];
      auto q = [&](int64_t i) {
        return lp[i] - (masked ? cum_mask : (i == x ? cum_same : cum_other));
      };
      const float norm = group_logsumexp<TN>(q, m, lt, sh);
      const float pa = k[PREV_A], pb = k[PREV_B];
      for (int64_t i = lt; i < m; i += kGroup) {
        const float post = logaddexp(q(i) - norm + pa, pb);
        const float step = masked ? k[STEP_MASK] : (i == x ? k[STEP_SAME] : k[STEP_OTHER]);
        lp[i] = post + step + norm;
      }
      out_mask = k[PREV_C] + (masked ? 0.0f : k[STEP_UNMASK]) + norm;
    }
    __syncthreads();  // the rows are read across groups below

    float v_mask = out_mask;
    if (a.noise) {
      for (int64_t e = threadIdx.x; e < m * TN; e += kThreads) {
        const int j = static_cast<int>(e % TN);
        const int64_t i = e / TN, nj = n0 + j;
        const float u = nj < a.n ? a.noise[b * a.z_sb + i * a.z_sk + nj * a.z_sn] : 0.5f;
        rows[j * row_stride + m + i] = gumbel(u);
      }
      if (token_ok) v_mask = gumbel(a.noise[b * a.z_sb + m * a.z_sk + n * a.z_sn]) + out_mask;
      __syncthreads();
    }

    // Gumbel-max; argmax as torch's: the first maximum, and a NaN counts as the maximum.
    float best = -INFINITY;
    int best_i = INT_MAX, first_nan = INT_MAX;
    for (int64_t i = lt; i < m; i += kGroup) {
      const float v = a.noise ? p[i] + lp[i] : lp[i];
      if (isnan(v)) {
        first_nan = min(first_nan, static_cast<int>(i));
      } else if (v > best || (v == best && i < best_i)) {
        best = v;
        best_i = static_cast<int>(i);
      }
    }
    group_reduce<TN>(best, best_i, ArgmaxOp(), sh.f, sh.i0);
    int unused = 0;
    group_reduce<TN>(first_nan, unused, MinIntOp(), sh.i0, sh.i1);
    if (token_ok && lt == 0) {
      int64_t token = best_i;
      if (first_nan != INT_MAX) token = first_nan;
      else if (isnan(v_mask) || v_mask > best) token = m;
      a.tokens[b * a.n + n] = token;
      if (a.log_probs) a.log_probs[(b * (m + 1) + m) * a.n + n] = out_mask;
    }

    if (a.log_probs) {
      for (int64_t e = threadIdx.x; e < m * TN; e += kThreads) {
        const int j = static_cast<int>(e % TN);
        const int64_t i = e / TN, nj = n0 + j;
        if (nj < a.n) a.log_probs[(b * (m + 1) + i) * a.n + nj] = rows[j * row_stride + i];
      }
    }
    __syncthreads();  // the rows are refilled for the next sample
  }
}

template <typename T, int TN>
void launch(const Args<T>& a, int64_t row_bytes, const c10::cuda::CUDAStream& stream) {
  const int64_t tiles = (a.n + TN - 1) / TN;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(a.batch, kMaxGridY)));
  const int64_t smem = a.workspace ? 0 : TN * row_bytes;
  auto kernel = discrete_step_kernel<T, TN>;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  kernel<<<grid, kThreads, static_cast<size_t>(smem), stream.stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run(Args<T> a, const at::Tensor& like, const c10::cuda::CUDAStream& stream) {
  const int64_t row_bytes = (2 * a.m + 1) * static_cast<int64_t>(sizeof(float));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        stream.device_index()));
  const int64_t room = optin - static_cast<int64_t>(sizeof(SharedBuffers));
  at::Tensor workspace;
  if (2 * row_bytes <= std::min<int64_t>(kTwoTokenBytes, room)) {
    launch<T, 2>(a, row_bytes, stream);
  } else if (row_bytes <= room) {
    launch<T, 1>(a, row_bytes, stream);
  } else {
    // One row per token of the whole batch; the caching allocator keeps it for the next step.
    const int64_t tiles = (a.n + 1) / 2;
    workspace = at::empty({a.batch * tiles * 2 * (2 * a.m + 1)}, like.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
    launch<T, 2>(a, row_bytes, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> discrete_step_cuda(
    const at::Tensor& x_t, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
    const c10::optional<at::Tensor>& guidance_scale, const at::Tensor& coeffs,
    const c10::optional<at::Tensor>& noise, double truncation_rate, bool write_log_probs) {
  TORCH_CHECK(x_t.is_cuda(), "discrete_step_cuda: x_t must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x_t.device());
  const Checked c = check_args(x_t, cond, uncond, guidance_scale, coeffs, noise);
  const int64_t B = c.batch, N = c.tokens, M = c.codes, K = M + 1;
  at::Tensor tokens = at::empty({B, N}, x_t.options());
  at::Tensor log_probs = write_log_probs ? at::empty({B, K, N}, cond.options().dtype(at::kFloat))
                                         : at::empty({0}, cond.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {tokens, log_probs};
  TORCH_CHECK(M < (int64_t{1} << 31) - 1, "discrete_step: too many classes (", K, ")");
  const at::Tensor coeffs_c = coeffs.contiguous();
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();

  auto fill = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Args<T> a;
    a.cond = static_cast<const T*>(cond.data_ptr());
    a.c_sb = cond.stride(0);
    a.c_sk = cond.stride(1);
    a.c_sn = cond.stride(2);
    if (c.guided) {
      a.uncond = static_cast<const T*>(uncond->data_ptr());
      a.u_sb = uncond->stride(0);
      a.u_sk = uncond->stride(1);
      a.u_sn = uncond->stride(2);
      a.scale = c.scale.data_ptr<float>();
      a.scale_bstride = c.scale.numel() == B && B > 1 ? 1 : 0;
    }
    if (c.has_noise) {
      a.noise = noise->data_ptr<float>();
      a.z_sb = noise->stride(0);
      a.z_sk = noise->stride(1);
      a.z_sn = noise->stride(2);
    }
    a.x_t = x_t.data_ptr<int64_t>();
    a.x_sb = x_t.stride(0);
    a.x_sn = x_t.stride(1);
    a.coeffs = coeffs_c.data_ptr<float>();
    a.coeff_bstride = coeffs.size(0) == 1 ? 0 : NUM_COEFFS;
    a.batch = B;
    a.n = N;
    a.m = M;
    int bits = 1;
    while ((int64_t{1} << bits) < M) ++bits;
    a.index_bits = bits;
    a.rate = static_cast<float>(truncation_rate);
    a.truncate = truncation_rate < 1.0;
    a.tokens = tokens.data_ptr<int64_t>();
    a.log_probs = write_log_probs ? log_probs.data_ptr<float>() : nullptr;
    run<T>(a, x_t, stream);
  };
  switch (cond.scalar_type()) {
    case at::kFloat: fill(static_cast<float*>(nullptr)); break;
    case at::kHalf: fill(static_cast<at::Half*>(nullptr)); break;
    default: fill(static_cast<at::BFloat16*>(nullptr)); break;
  }
  return {tokens, log_probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("discrete_step", &discrete_step_cuda); }

}  // namespace discrete
}  // namespace fastdiff
