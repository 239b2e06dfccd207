// group_norm on CUDA: two kernels over a grid of (group, chunk) blocks.
//
// A group (b, g) is its D = C / G channels over S positions, N = D * S values, taken in
// memory order for either layout (see group_norm_args.h):
//   channels-first  value i at  (b C + g D) S + i,             channel g D + i / S;
//   channels-last   value i = s D + j at  (b S + s) C + g D + j,  channel g D + j.
//
// 1. group_norm_stats: each block takes one chunk of a group; each thread keeps Welford's
//    running (n, mean, M2) over its values (stable for any offset of the data), the
//    block merges them (Chan et al.) and writes the chunk's mean and M2 in float64.
// 2. group_norm_write: each block merges its group's chunk moments (float64), then
//    writes its chunk: y = ((x - mean) rstd w + bias) (1 + scale) + shift, SiLU'd.
//
// Chunks are at least kMinChunk values and a group has at most kMaxChunks of them, so a
// U-Net's groups spread over many blocks. No host sync: the partial moments live in a
// device buffer and both kernels go on the current stream (CUDA-graph capturable).
//
// Only c10/cuda headers, as guided_step_cuda.cu (no cuBLAS headers needed).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "group_norm/group_norm_args.h"

namespace fastdiff {
namespace gn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kMaxChunks = 1024;

struct Args {
  const void* x = nullptr;
  void* y = nullptr;
  const float *weight = nullptr, *bias = nullptr, *scale = nullptr, *shift = nullptr;
  int64_t scale_bstride = 0, shift_bstride = 0;
  double* part_mean = nullptr;
  double* part_m2 = nullptr;
  int64_t N = 0, S = 0, C = 0, D = 0, G = 0, chunk = 0, chunks = 0;
  float eps = 0.f;
  bool channels_last = false, silu = false;
};

template <typename Acc>
struct Moments {
  Acc n, mean, m2;
};

template <typename Acc>
__device__ __forceinline__ Moments<Acc> merge(Moments<Acc> a, Moments<Acc> b) {
  const Acc n = a.n + b.n;
  if (n == Acc(0)) return a;
  const Acc delta = b.mean - a.mean, frac = b.n / n;
  return {n, a.mean + delta * frac, a.m2 + b.m2 + delta * delta * a.n * frac};
}

// Block-wide merge; the result is valid in thread 0.
template <typename Acc>
__device__ Moments<Acc> block_merge(Moments<Acc> m) {
  __shared__ Acc sn[kWarps], smean[kWarps], sm2[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments<Acc> o;
    o.n = __shfl_down_sync(0xffffffffu, m.n, offset);
    o.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
    o.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
    m = merge(m, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sn[warp] = m.n;
    smean[warp] = m.mean;
    sm2[warp] = m.m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = {sn[0], smean[0], sm2[0]};
    for (int w = 1; w < kWarps; ++w) m = merge(m, Moments<Acc>{sn[w], smean[w], sm2[w]});
  }
  return m;
}

__device__ __forceinline__ int64_t offset_of(const Args& a, int64_t b, int64_t g, int64_t i,
                                             int64_t* channel) {
  if (a.channels_last) {
    const int64_t s = i / a.D, j = i - s * a.D;
    *channel = g * a.D + j;
    return (b * a.S + s) * a.C + g * a.D + j;
  }
  *channel = g * a.D + i / a.S;
  return (b * a.C + g * a.D) * a.S + i;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) group_norm_stats(const Args a) {
  const int64_t bg = blockIdx.x, k = blockIdx.y;
  const int64_t b = bg / a.G, g = bg - b * a.G;
  const int64_t start = k * a.chunk, end = min(start + a.chunk, a.N);
  const T* x = static_cast<const T*>(a.x);
  Moments<float> m{0.f, 0.f, 0.f};
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    int64_t c;
    const float v = static_cast<float>(x[offset_of(a, b, g, i, &c)]);
    m.n += 1.f;
    const float delta = v - m.mean;
    m.mean += delta / m.n;
    m.m2 += delta * (v - m.mean);
  }
  const Moments<double> total =
      block_merge(Moments<double>{double(m.n), double(m.mean), double(m.m2)});
  if (threadIdx.x == 0) {
    a.part_mean[bg * a.chunks + k] = total.mean;
    a.part_m2[bg * a.chunks + k] = total.m2;
  }
}

__device__ __forceinline__ float silu(float y) { return y / (1.f + expf(-y)); }

template <typename T>
__global__ void __launch_bounds__(kThreads) group_norm_write(const Args a) {
  const int64_t bg = blockIdx.x, k = blockIdx.y;
  const int64_t b = bg / a.G, g = bg - b * a.G;
  __shared__ float s_mean, s_rstd;
  {
    Moments<double> m{0.0, 0.0, 0.0};
    for (int64_t j = threadIdx.x; j < a.chunks; j += kThreads) {
      const double n = static_cast<double>(min(a.chunk, a.N - j * a.chunk));
      const int64_t at = bg * a.chunks + j;
      m = merge(m, Moments<double>{n, a.part_mean[at], a.part_m2[at]});
    }
    m = block_merge(m);
    if (threadIdx.x == 0) {
      const double var = fmax(m.m2 / m.n, 0.0);
      s_mean = static_cast<float>(m.mean);
      // A NaN in the group makes the mean NaN, and with it every output, as in torch
      // (fmax would drop a NaN variance; the mean carries it).
      s_rstd = static_cast<float>(rsqrt(var + static_cast<double>(a.eps)));
    }
    __syncthreads();
  }
  const float mean = s_mean, rstd = s_rstd;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t start = k * a.chunk, end = min(start + a.chunk, a.N);
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    int64_t c;
    const int64_t o = offset_of(a, b, g, i, &c);
    float v = (static_cast<float>(x[o]) - mean) * rstd;
    if (a.weight) v *= a.weight[c];
    if (a.bias) v += a.bias[c];
    if (a.scale) v *= 1.f + a.scale[b * a.scale_bstride + c];
    if (a.shift) v += a.shift[b * a.shift_bstride + c];
    if (a.silu) v = silu(v);
    y[o] = static_cast<T>(v);
  }
}

template <typename T>
void launch(const Args& a, int64_t groups, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(a.chunks));
  group_norm_stats<T><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_norm_write<T><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor group_norm_cuda(const at::Tensor& x, int64_t num_groups,
                           const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, double eps,
                           const c10::optional<at::Tensor>& scale,
                           const c10::optional<at::Tensor>& shift, bool silu) {
  TORCH_CHECK(x.is_cuda(), "group_norm_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Prepared p = prepare(x, num_groups, weight, bias, eps, scale, shift, silu);
  if (p.out.numel() == 0) return p.out;
  const int64_t groups = p.batch * p.groups;
  TORCH_CHECK(groups < (int64_t(1) << 31), "group_norm: too many groups for one grid (",
              groups, ")");
  Args a;
  a.x = p.x.data_ptr();
  a.y = p.out.data_ptr();
  if (p.weight.defined()) a.weight = p.weight.data_ptr<float>();
  if (p.bias.defined()) a.bias = p.bias.data_ptr<float>();
  if (p.scale.defined()) a.scale = p.scale.data_ptr<float>();
  if (p.shift.defined()) a.shift = p.shift.data_ptr<float>();
  a.scale_bstride = p.scale_bstride;
  a.shift_bstride = p.shift_bstride;
  a.C = p.channels;
  a.G = p.groups;
  a.D = p.channels / p.groups;
  a.S = p.spatial;
  a.N = a.D * a.S;
  const int64_t per_chunk = (a.N + kMaxChunks - 1) / kMaxChunks;
  a.chunk = std::max(kMinChunk, (per_chunk + kThreads - 1) / kThreads * kThreads);
  a.chunks = (a.N + a.chunk - 1) / a.chunk;
  a.eps = p.eps;
  a.channels_last = p.channels_last;
  a.silu = p.silu;
  at::Tensor part = at::empty({2, groups * a.chunks}, x.options().dtype(at::kDouble));
  a.part_mean = part[0].data_ptr<double>();
  a.part_m2 = part[1].data_ptr<double>();
  // `part` and p's float copies are freed on return while the kernels may still read
  // them; the caching allocator reuses a block only for work queued later on this
  // stream, so that is safe without a sync.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat: launch<float>(a, groups, stream); break;
    case at::kHalf: launch<at::Half>(a, groups, stream); break;
    default: launch<at::BFloat16>(a, groups, stream); break;
  }
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("group_norm", &group_norm_cuda); }

}  // namespace gn
}  // namespace fastdiff
