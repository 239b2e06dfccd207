// group_norm on CUDA: two kernels over a grid of (group, chunk) blocks.
//
// A group (b, g) is its D = C / G channels over S positions, N = D * S values; in either
// layout (see group_norm_args.h) it is a matrix of R rows of L contiguous values, rows RS
// elements apart, starting at `base`:
//   channels-first  rows are channels:   R = D, L = S, RS = S, base = (b C + g D) S,
//                   the channel of row r is g D + r;
//   channels-last   rows are positions:  R = S, L = D, RS = C, base = b S C + g D,
//                   the channel of column j is g D + j.
// Rows are read as vectors of VEC values (16 bytes where L, RS and the pointers allow,
// else 8, 4, 2 bytes, else single values), so a thread's channel comes from its row or
// column, with no division per value. A block's 256 threads are TR rows of TL vector
// columns (TL = min(L / VEC, 256)); a block takes one chunk of its group: a rectangle of
// rows_per_chunk rows and cols_per_chunk vector columns (blockIdx.y, blockIdx.z).
//
// 1. group_norm_stats: each thread sums d = x - k and d^2 over its values in float32,
//    k being its own first value (exact differences for data with a large offset; the
//    sums only carry the spread of a thread's few values), moves its sums to the
//    block's shift (the chunk's first value) in float64, and the block adds them up:
//    the chunk's count, mean and M2, in float64. No division per value.
// 2. group_norm_write: each block merges its group's chunk moments the same way
//    (shifted sums in float64), then writes its chunk as y = (x - mean) a + o with
//    a = rstd w (1 + scale), o = bias (1 + scale) + shift per channel (computed once per
//    row or column, in float64), SiLU'd.
//
// The parameters are read where they lie, in float32 or in x's dtype (a flag per
// parameter), so an fp16 U-Net's weights cost no cast kernel; other dtypes and channel
// strides other than 1 are converted on the host first.
//
// Chunks hold about max(kMinChunk, N / kMaxChunks) values (fewer for a group's last one,
// or a small group), so a group has at most 2 kMaxChunks of them and a U-Net's groups
// spread over many blocks. No host sync: the partial moments live in a device buffer and
// both kernels go on the current stream (CUDA-graph capturable).
//
// Only c10/cuda headers, as guided_step_cuda.cu (no cuBLAS headers needed).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "group_norm/group_norm_args.h"

namespace fastdiff {
namespace gn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kMaxChunks = 1024;

// A parameter as the kernels read it: float32, or x's dtype T; channel stride 1.
struct Param {
  const void* ptr = nullptr;
  int64_t bstride = 0;  // between samples (per-sample parameters; 0: one shared row)
  bool is_float = true;
};

struct Args {
  const void* x = nullptr;
  void* y = nullptr;
  Param weight, bias, scale, shift;
  bool param_vectors = false;  // channels-last: parameters aligned for vector loads
  double* part = nullptr;      // [3, groups * chunks]: count, mean, M2 of each chunk
  int64_t part_stride = 0;     // groups * chunks
  int64_t S = 0, C = 0, D = 0, G = 0;
  int64_t R = 0, LV = 0, RS = 0;  // rows, vectors per row, row stride (elements)
  int TL = 1, TR = 1;             // threads per row (vector columns), rows per step
  int64_t rows_per_chunk = 0, cols_per_chunk = 0, col_chunks = 0, chunks = 0;
  float eps = 0.f;
  bool silu = false;
};

// ---------------------------------------------------------------- vector loads and stores

template <int Bytes> struct Bits;
template <> struct Bits<16> { using type = uint4; };
template <> struct Bits<8> { using type = uint2; };
template <> struct Bits<4> { using type = unsigned int; };
template <> struct Bits<2> { using type = unsigned short; };

// N values of T at p (aligned to N * sizeof(T) <= 16 bytes) as floats, in one load.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  static_assert(N * sizeof(T) <= 16, "one load holds at most 16 bytes");
  using B = typename Bits<N * sizeof(T)>::type;
  const B bits = __ldg(reinterpret_cast<const B*>(p));
  T v[N];
  memcpy(v, &bits, sizeof(bits));
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  static_assert(N * sizeof(T) <= 16, "one store holds at most 16 bytes");
  using B = typename Bits<N * sizeof(T)>::type;
  T v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = static_cast<T>(in[i]);
  B bits;
  memcpy(&bits, v, sizeof(bits));
  *reinterpret_cast<B*>(p) = bits;
}

// N values of a parameter from element i on: vector loads of up to 16 bytes when
// `vectors` (the host checked the alignment), else one value at a time.
template <typename T, int N>
__device__ __forceinline__ void load_param(const Param& p, int64_t i, bool vectors,
                                           float (&out)[N]) {
  if (p.is_float) {
    const float* q = static_cast<const float*>(p.ptr) + i;
    constexpr int kPiece = N < 4 ? N : 4;  // floats per 16-byte load
    if (vectors) {
#pragma unroll
      for (int k = 0; k < N; k += kPiece) {
        float piece[kPiece];
        load_floats<float, kPiece>(q + k, piece);
#pragma unroll
        for (int j = 0; j < kPiece; ++j) out[k + j] = piece[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = __ldg(q + j);
    }
  } else {
    const T* q = static_cast<const T*>(p.ptr) + i;
    if (vectors) {
      load_floats<T, N>(q, out);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float one[1];
        load_floats<T, 1>(q + j, one);
        out[j] = one[0];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ float load_param(const Param& p, int64_t i) {
  float one[1];
  load_param<T, 1>(p, i, false, one);
  return one[0];
}

// ---------------------------------------------------------------- block reductions

// Sums of (a, b, c) over the block, valid in thread 0. Every thread must call it.
__device__ __forceinline__ void block_sum3(double& a, double& b, double& c) {
  __shared__ double s[3][kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
    c += __shfl_down_sync(0xffffffffu, c, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s[0][warp] = a;
    s[1][warp] = b;
    s[2][warp] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      a += s[0][w];
      b += s[1][w];
      c += s[2][w];
    }
  }
}

// ---------------------------------------------------------------- the block's place

// Where a block and its thread work. Counts and indices inside a chunk are 32-bit (a
// chunk holds well under 2^31 values, checked on the host); positions in x are 64-bit.
struct Place {
  unsigned b, g;     // sample, group (B G < 2^31)
  int64_t r0, c0;    // the chunk's first row and vector column
  int rows, cols;    // its size: rows x vector columns
  int64_t chunk;     // its index among the group's chunks
  int tr, tl;        // the thread's row and column in the block's TR x TL layout
};

__device__ __forceinline__ Place place_of(const Args& a) {
  Place p;
  // groups < 2^31 (checked on the host): 32-bit divisions, once per thread.
  const unsigned bg = blockIdx.x, G = static_cast<unsigned>(a.G);
  p.b = bg / G;
  p.g = bg - p.b * G;
  p.r0 = static_cast<int64_t>(blockIdx.y) * a.rows_per_chunk;
  p.rows = static_cast<int>(min(a.rows_per_chunk, a.R - p.r0));
  p.c0 = static_cast<int64_t>(blockIdx.z) * a.cols_per_chunk;
  p.cols = static_cast<int>(min(a.cols_per_chunk, a.LV - p.c0));
  p.chunk = static_cast<int64_t>(blockIdx.y) * a.col_chunks + blockIdx.z;
  const unsigned t = threadIdx.x, TL = static_cast<unsigned>(a.TL);
  const unsigned tr = t / TL;
  p.tr = static_cast<int>(tr);
  p.tl = static_cast<int>(t - tr * TL);
  return p;
}

// The offset of the chunk's first value in x (and y).
template <bool ChannelsLast, int VEC>
__device__ __forceinline__ int64_t chunk_origin(const Args& a, const Place& p) {
  const int64_t b = p.b, g = p.g;
  const int64_t base = ChannelsLast ? (b * a.S) * a.C + g * a.D : (b * a.C + g * a.D) * a.S;
  return base + p.r0 * a.RS + p.c0 * VEC;
}

// ---------------------------------------------------------------- kernels
//
// The streaming loops run two vectors per trip (two loads in flight per thread). Each
// kernel states its register budget as blocks per SM (__launch_bounds__): left to itself,
// ptxas for sm_90 spills a few bytes to reach 32 registers in some variants. The stats
// kernels fit in 32 (8 blocks of 256 threads per SM); the writes in 40 (6 blocks), the
// channels-last writes with vectors of 8 or 16 bytes, which keep 2 VEC coefficients per
// thread, in 64 (4 blocks).
constexpr int kStatsBlocks = 8;

template <typename T, int VEC, bool ChannelsLast>
constexpr int write_blocks() {
  return ChannelsLast && VEC * sizeof(T) >= 8 ? 4 : 6;
}

template <typename T, int VEC, bool ChannelsLast>
__global__ void __launch_bounds__(kThreads, kStatsBlocks) group_norm_stats(const Args a) {
  const Place p = place_of(a);
  const T* x = static_cast<const T*>(a.x) + chunk_origin<ChannelsLast, VEC>(a, p);
  float k_block[1];  // the chunk's first value: the block's shift
  load_floats<T, 1>(x, k_block);

  int n = 0;
  float k = 0.f, s1 = 0.f, s2 = 0.f;  // the thread's shift; sums of d = x - k and d^2
  const auto add = [&](const float (&v)[VEC]) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float d = v[e] - k;
      s1 += d;
      s2 = fmaf(d, d, s2);
    }
    n += VEC;
  };
  if (p.tr < a.TR && p.tr < p.rows && p.tl < p.cols) {
    const int64_t step = static_cast<int64_t>(a.TR) * a.RS;
    const T* first = x + p.tr * a.RS + p.tl * VEC;  // the thread's first vector
    float k_thread[1];
    load_floats<T, 1>(first, k_thread);
    k = k_thread[0];
    if (ChannelsLast) {  // rows stream past each of the thread's columns (as in the write)
      for (int j = p.tl; j < p.cols; j += a.TL) {
        const T* xr = first + (j - p.tl) * VEC;
#pragma unroll 2
        for (int i = p.tr; i < p.rows; i += a.TR, xr += step) {
          float v[VEC];
          load_floats<T, VEC>(xr, v);
          add(v);
        }
      }
    } else {  // columns stream past in each of the thread's rows
      const T* xr = first;
      for (int i = p.tr; i < p.rows; i += a.TR, xr += step) {
#pragma unroll 2
        for (int j = p.tl; j < p.cols; j += a.TL) {
          float v[VEC];
          load_floats<T, VEC>(xr + (j - p.tl) * VEC, v);
          add(v);
        }
      }
    }
  }
  // Sums about the block's shift: x - k_block = d + dk, exactly so in float64.
  double count = n, sum1 = 0.0, sum2 = 0.0;
  if (n > 0) {
    const double dk = static_cast<double>(k) - static_cast<double>(k_block[0]);
    sum1 = static_cast<double>(s1) + count * dk;
    sum2 = static_cast<double>(s2) + dk * (2.0 * static_cast<double>(s1) + count * dk);
  }
  block_sum3(count, sum1, sum2);
  if (threadIdx.x == 0) {
    // count > 0: every chunk holds a value (its first row and column exist).
    const int64_t at = static_cast<int64_t>(blockIdx.x) * a.chunks + p.chunk;
    a.part[at] = count;
    a.part[a.part_stride + at] = static_cast<double>(k_block[0]) + sum1 / count;
    a.part[2 * a.part_stride + at] = sum2 - sum1 * sum1 / count;
  }
}

// y / (1 + e^-y) without the IEEE division's slow path (a subroutine call): the quotient
// from an approximate reciprocal, then one correction step q + (y - d q) r (Markstein),
// which leaves it within about half an ulp of y / d. e^-y is capped at e^80 so that d and
// 1 / d stay normal floats: for y < -80 the result is y e^-80 instead of y e^y, both under
// 1e-33 |y|, i.e. 0 to any tolerance. A NaN y stays NaN; y = +-inf gives +-inf.
__device__ __forceinline__ float silu(float y) {
  const float d = 1.f + expf(fminf(-y, 80.f));
  const float r = __fdividef(1.f, d);
  const float q = y * r;
  const float corrected = fmaf(fmaf(-d, q, y), r, q);
  return isinf(q) ? q : corrected;
}

// The coefficients of one channel: y = (x - mean) * mul + add, with mul = rstd w (1 + scale)
// and add = bias (1 + scale) + shift, in float64 and rounded once.
__device__ __forceinline__ void coefficients(double rstd, float w, float bias, float scale,
                                             float shift, float* mul, float* add) {
  const double s = 1.0 + static_cast<double>(scale);
  *mul = static_cast<float>(rstd * static_cast<double>(w) * s);
  *add = static_cast<float>(static_cast<double>(bias) * s + static_cast<double>(shift));
}

template <typename T, int VEC, bool ChannelsLast>
__global__ void __launch_bounds__(kThreads, (write_blocks<T, VEC, ChannelsLast>())) group_norm_write(const Args a) {
  const Place p = place_of(a);
  __shared__ float s_mean;
  __shared__ double s_rstd;
  {
    // The group's moments from its chunks': sums about the first chunk's mean, in float64.
    const double* part = a.part + static_cast<int64_t>(blockIdx.x) * a.chunks;
    const double shift = part[a.part_stride];
    double count = 0.0, sum1 = 0.0, sum2 = 0.0;
    for (int64_t j = threadIdx.x; j < a.chunks; j += kThreads) {
      const double nj = part[j];
      const double dj = part[a.part_stride + j] - shift;
      count += nj;
      sum1 += nj * dj;
      sum2 += part[2 * a.part_stride + j] + nj * dj * dj;
    }
    block_sum3(count, sum1, sum2);
    if (threadIdx.x == 0) {
      const double var = fmax((sum2 - sum1 * sum1 / count) / count, 0.0);
      // A NaN in the group makes the mean NaN, and with it every output, as in torch
      // (fmax would drop a NaN variance; the mean carries it).
      s_mean = static_cast<float>(shift + sum1 / count);
      s_rstd = rsqrt(var + static_cast<double>(a.eps));
    }
    __syncthreads();
  }
  if (p.tr >= a.TR || p.tr >= p.rows || p.tl >= p.cols) return;  // no barrier follows
  const float mean = s_mean;
  const int64_t origin = chunk_origin<ChannelsLast, VEC>(a, p);
  const T* x = static_cast<const T*>(a.x) + origin + p.tr * a.RS;  // the thread's first row
  T* y = static_cast<T*>(a.y) + origin + p.tr * a.RS;
  const int64_t step = static_cast<int64_t>(a.TR) * a.RS;

  if (ChannelsLast) {
    // Channels along the row: a thread's column fixes its channels; rows stream past.
    for (int j = p.tl; j < p.cols; j += a.TL) {
      const int64_t c = static_cast<int64_t>(p.g) * a.D + (p.c0 + j) * VEC;  // c .. c + VEC - 1
      const int64_t s_row = p.b * a.scale.bstride, h_row = p.b * a.shift.bstride;
      float w[VEC], bi[VEC], sc[VEC], sh[VEC], mul[VEC], add[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        w[e] = 1.f;
        bi[e] = sc[e] = sh[e] = 0.f;
      }
      if (a.weight.ptr) load_param<T, VEC>(a.weight, c, a.param_vectors, w);
      if (a.bias.ptr) load_param<T, VEC>(a.bias, c, a.param_vectors, bi);
      if (a.scale.ptr) load_param<T, VEC>(a.scale, s_row + c, a.param_vectors, sc);
      if (a.shift.ptr) load_param<T, VEC>(a.shift, h_row + c, a.param_vectors, sh);
      const double rstd = s_rstd;
#pragma unroll
      for (int e = 0; e < VEC; ++e) coefficients(rstd, w[e], bi[e], sc[e], sh[e], &mul[e], &add[e]);
      const T* xr = x + j * VEC;
      T* yr = y + j * VEC;
#pragma unroll 2
      for (int i = p.tr; i < p.rows; i += a.TR, xr += step, yr += step) {
        float v[VEC];
        load_floats<T, VEC>(xr, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[e] = fmaf(v[e] - mean, mul[e], add[e]);
          if (a.silu) v[e] = silu(v[e]);
        }
        store_floats<T, VEC>(yr, v);
      }
    }
  } else {
    // One channel per row: a thread's row fixes its channel; columns stream past.
    const T* xr = x;
    T* yr = y;
    for (int i = p.tr; i < p.rows; i += a.TR, xr += step, yr += step) {
      const int64_t c = static_cast<int64_t>(p.g) * a.D + p.r0 + i;
      const int64_t s_row = p.b * a.scale.bstride, h_row = p.b * a.shift.bstride;
      const float w = a.weight.ptr ? load_param<T>(a.weight, c) : 1.f;
      const float bi = a.bias.ptr ? load_param<T>(a.bias, c) : 0.f;
      const float sc = a.scale.ptr ? load_param<T>(a.scale, s_row + c) : 0.f;
      const float sh = a.shift.ptr ? load_param<T>(a.shift, h_row + c) : 0.f;
      float mul, add;
      coefficients(s_rstd, w, bi, sc, sh, &mul, &add);
#pragma unroll 2
      for (int j = p.tl; j < p.cols; j += a.TL) {
        float v[VEC];
        load_floats<T, VEC>(xr + j * VEC, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[e] = fmaf(v[e] - mean, mul, add);
          if (a.silu) v[e] = silu(v[e]);
        }
        store_floats<T, VEC>(yr + j * VEC, v);
      }
    }
  }
}

// ---------------------------------------------------------------- host side

template <typename T, int VEC, bool ChannelsLast>
void launch_kernels(const Args& a, dim3 grid, cudaStream_t stream) {
  group_norm_stats<T, VEC, ChannelsLast><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_norm_write<T, VEC, ChannelsLast><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool ChannelsLast>
void launch_vec(const Args& a, int vec, dim3 grid, cudaStream_t stream) {
  switch (vec) {
    case 8:
      if constexpr (16 / sizeof(T) >= 8) return launch_kernels<T, 8, ChannelsLast>(a, grid, stream);
      break;
    case 4: return launch_kernels<T, 4, ChannelsLast>(a, grid, stream);
    case 2: return launch_kernels<T, 2, ChannelsLast>(a, grid, stream);
    default: break;
  }
  launch_kernels<T, 1, ChannelsLast>(a, grid, stream);
}

template <typename T>
void launch(const Args& a, int vec, bool channels_last, dim3 grid, cudaStream_t stream) {
  if (channels_last)
    launch_vec<T, true>(a, vec, grid, stream);
  else
    launch_vec<T, false>(a, vec, grid, stream);
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// A parameter in a form the kernels read: float32 or x's dtype, unit channel stride.
// Anything else is converted here, once per call; `keep` holds the conversion until the
// kernels are queued (the caching allocator then reuses it only for later work).
Param param_of(const at::Tensor& t, at::ScalarType x_dtype, bool per_sample, at::Tensor* keep) {
  Param p;
  if (!t.defined()) return p;
  at::Tensor u = t;
  if (u.scalar_type() != at::kFloat && u.scalar_type() != x_dtype) u = u.to(at::kFloat);
  const int64_t channel_dim = per_sample ? 1 : 0;
  if (u.size(channel_dim) > 1 && u.stride(channel_dim) != 1) u = u.contiguous();
  *keep = u;
  p.ptr = u.data_ptr();
  p.is_float = u.scalar_type() == at::kFloat;
  p.bstride = per_sample ? sample_stride(u) : 0;
  return p;
}

// Whether VEC channels of p from any multiple of VEC on (in any sample's row) can be read
// in vector loads of min(16, VEC * size) bytes.
bool param_vectors_ok(const Param& p, int64_t vec, int64_t x_size) {
  if (!p.ptr) return true;
  const int64_t size = p.is_float ? 4 : x_size;
  const int64_t piece = std::min<int64_t>(16, vec * size);
  return aligned(p.ptr, piece) && (p.bstride * size) % piece == 0;
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
  const auto dtype = x.scalar_type();
  const int64_t size = static_cast<int64_t>(x.element_size());
  Args a;
  a.x = p.x.data_ptr();
  a.y = p.out.data_ptr();
  at::Tensor keep[4];
  a.weight = param_of(p.weight, dtype, false, &keep[0]);
  a.bias = param_of(p.bias, dtype, false, &keep[1]);
  a.scale = param_of(p.scale, dtype, true, &keep[2]);
  a.shift = param_of(p.shift, dtype, true, &keep[3]);
  a.C = p.channels;
  a.G = p.groups;
  a.D = p.channels / p.groups;
  a.S = p.spatial;
  const int64_t N = a.D * a.S;
  // Chunks then hold fewer than 2^31 values (about max(kMinChunk, N / kMaxChunks)), so
  // the kernels count inside a chunk in 32 bits; no GPU holds a group of 2^40 values.
  TORCH_CHECK(N < (int64_t(1) << 40), "group_norm: groups of ", N, " values are not supported");
  int64_t L;
  if (p.channels_last) {
    a.R = a.S, L = a.D, a.RS = a.C;
  } else {
    a.R = a.D, L = a.S, a.RS = a.S;
  }
  // The widest vector that divides the rows and their stride (so that every row of every
  // group starts on a multiple of it) and that both x and y are aligned to.
  int vec = static_cast<int>(16 / size);
  while (vec > 1 && !(L % vec == 0 && a.RS % vec == 0 && aligned(a.x, vec * size) &&
                      aligned(a.y, vec * size)))
    vec /= 2;
  a.LV = L / vec;
  a.param_vectors = p.channels_last && param_vectors_ok(a.weight, vec, size) &&
                    param_vectors_ok(a.bias, vec, size) && param_vectors_ok(a.scale, vec, size) &&
                    param_vectors_ok(a.shift, vec, size);
  a.TL = static_cast<int>(std::min<int64_t>(a.LV, kThreads));
  a.TR = kThreads / a.TL;
  // Chunks of about `target` values: whole rows (a multiple of TR of them), or, for rows
  // longer than that (then TL = kThreads), one row cut into multiples of kThreads vectors.
  const int64_t target = std::max(kMinChunk, (N + kMaxChunks - 1) / kMaxChunks);
  if (L >= target) {
    const int64_t want = (target + vec - 1) / vec;
    a.rows_per_chunk = 1;
    a.cols_per_chunk = std::min(a.LV, (want + kThreads - 1) / kThreads * kThreads);
  } else {
    const int64_t want = (target + L - 1) / L;
    a.rows_per_chunk = (want + a.TR - 1) / a.TR * a.TR;
    a.cols_per_chunk = a.LV;
  }
  const int64_t row_chunks = (a.R + a.rows_per_chunk - 1) / a.rows_per_chunk;
  a.col_chunks = (a.LV + a.cols_per_chunk - 1) / a.cols_per_chunk;
  a.chunks = row_chunks * a.col_chunks;
  TORCH_CHECK(row_chunks <= 65535 && a.col_chunks <= 65535, "group_norm: internal error: ",
              row_chunks, " x ", a.col_chunks, " chunks per group");
  a.eps = p.eps;
  a.silu = p.silu;
  at::Tensor part = at::empty({3, groups * a.chunks}, x.options().dtype(at::kDouble));
  a.part = part.data_ptr<double>();
  a.part_stride = groups * a.chunks;
  // `part` and the parameter conversions are freed on return while the kernels may still
  // read them; the caching allocator reuses a block only for work queued later on this
  // stream, so that is safe without a sync.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(row_chunks),
                  static_cast<unsigned>(a.col_chunks));
  switch (dtype) {
    case at::kFloat: launch<float>(a, vec, p.channels_last, grid, stream); break;
    case at::kHalf: launch<at::Half>(a, vec, p.channels_last, grid, stream); break;
    default: launch<at::BFloat16>(a, vec, p.channels_last, grid, stream); break;
  }
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("group_norm", &group_norm_cuda); }

}  // namespace gn
}  // namespace fastdiff
