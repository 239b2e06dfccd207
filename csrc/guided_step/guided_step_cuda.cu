// guided_step on CUDA: one pass over memory, each thread moving 16 bytes per
// operand per iteration.
//
// The op reads 2-9 tensors and writes 1-2 for a few dozen flops per element, so
// it is bound by memory bandwidth; what matters is wide, coalesced accesses and
// no second pass. The arithmetic is element<H>() from guided_step.h, the same
// formula the other backends are tested against.
//
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h: that one pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers, which a toolkit with just nvcc and cudart
// lacks, and this kernel needs nothing from them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "guided_step_args.h"

namespace fastdiff {
namespace guided {
namespace {

constexpr int kThreads = 256;
constexpr int kVecBytes = 16;
// Blocks in flight per resident block slot. A few waves hide the tail of the
// last one; more than that only repeats each thread's coefficient-row load.
constexpr int64_t kWaves = 4;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct Input {
  const T* ptr = nullptr;
  int64_t batch_stride = 0;
};

template <typename T>
struct Args {
  Input<T> x, cond, uncond, var, noise;
  Input<T> hist[kMaxHistory];
  T* out = nullptr;
  T* den = nullptr;  // null unless write_den
  const float* coeffs = nullptr;
  int64_t coeff_bstride = 0;
  const float* scale = nullptr;  // null unless has_uncond
  int64_t scale_bstride = 0;
  int64_t batch = 0, inner = 0;
  float clip_range = 0.f;
  bool has_uncond = false, has_noise = false, learned = false, clip = false, write_den = false;
};

// Alignment equals size so that V = 1 packs stay as tightly laid out as the
// tensor itself, and V * sizeof(T) == 16 packs become one 128-bit access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ const Pack<T, V>* sample(const Input<T>& in, int64_t b) {
  return reinterpret_cast<const Pack<T, V>*>(in.ptr + b * in.batch_stride);
}

// V elements per thread per iteration: V = 16 / sizeof(T) on the aligned fast
// path, V = 1 otherwise. The flags are kernel-uniform, so their branches cost
// no divergence and need no instantiations of their own.
template <typename T, int H, int V>
__global__ void __launch_bounds__(kThreads) guided_step_kernel(const Args<T> a) {
  using P = Pack<T, V>;
  constexpr int K = kNumFixed + H;
  constexpr int kHistSlots = H > 0 ? H : 1;  // zero-length arrays are not C++
  const int64_t packs = a.inner / V;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    // Every index into k is a compile-time constant once unrolled, so the row
    // lives in registers rather than local memory.
    float k[K];
    const float* row = a.coeffs + b * a.coeff_bstride;
#pragma unroll
    for (int j = 0; j < K; ++j) k[j] = __ldg(row + j);
    const float s = a.has_uncond ? __ldg(a.scale + b * a.scale_bstride) : 1.0f;

    const P* x = sample<T, V>(a.x, b);
    const P* c = sample<T, V>(a.cond, b);
    const P* u = a.has_uncond ? sample<T, V>(a.uncond, b) : nullptr;
    const P* z = a.has_noise ? sample<T, V>(a.noise, b) : nullptr;
    const P* var = a.has_noise && a.learned ? sample<T, V>(a.var, b) : nullptr;
    const P* h[kHistSlots];
#pragma unroll
    for (int j = 0; j < H; ++j) h[j] = sample<T, V>(a.hist[j], b);
    P* out = reinterpret_cast<P*>(a.out + b * a.inner);
    P* den = a.write_den ? reinterpret_cast<P*>(a.den + b * a.inner) : nullptr;

    for (int64_t i = first; i < packs; i += step) {
      // Issue every load before any arithmetic so they are all in flight at once.
      const P xv = x[i];
      const P cv = c[i];
      P uv{}, zv{}, vv{};
      if (u) uv = u[i];
      if (z) zv = z[i];
      if (var) vv = var[i];
      P hv[kHistSlots];
#pragma unroll
      for (int j = 0; j < H; ++j) hv[j] = h[j][i];

      P ov, dv;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float hist[kHistSlots];
#pragma unroll
        for (int j = 0; j < H; ++j) hist[j] = static_cast<float>(hv[j].v[e]);
        float o, d;
        element<H>(k, static_cast<float>(xv.v[e]), static_cast<float>(cv.v[e]),
                   static_cast<float>(uv.v[e]), a.has_uncond, s, static_cast<float>(vv.v[e]),
                   a.learned, static_cast<float>(zv.v[e]), a.has_noise, hist, a.clip,
                   a.clip_range, o, d);
        ov.v[e] = static_cast<T>(o);
        dv.v[e] = static_cast<T>(d);
      }
      out[i] = ov;
      if (den) den[i] = dv;
    }
  }
}

template <typename T>
Input<T> input(const Operand& o) {
  return {static_cast<const T*>(o.ptr), o.batch_stride};
}

template <typename T>
Args<T> make_args(const Prepared& p) {
  Args<T> a;
  a.x = input<T>(p.x);
  a.cond = input<T>(p.cond);
  if (p.has_uncond) a.uncond = input<T>(p.uncond);
  if (p.has_noise) a.noise = input<T>(p.noise);
  if (p.has_noise && p.learned) a.var = input<T>(p.var);
  for (size_t j = 0; j < p.hist.size(); ++j) a.hist[j] = input<T>(p.hist[j]);
  a.out = p.out.data_ptr<T>();
  if (p.write_den) a.den = p.den.data_ptr<T>();
  a.coeffs = p.coeffs.data_ptr<float>();
  a.coeff_bstride = p.coeff_bstride;
  if (p.has_uncond) {
    a.scale = p.scale.data_ptr<float>();
    a.scale_bstride = p.scale_bstride;
  }
  a.batch = p.batch;
  a.inner = p.inner;
  a.clip_range = p.clip_range;
  a.has_uncond = p.has_uncond;
  a.has_noise = p.has_noise;
  a.learned = p.learned;
  a.clip = p.clip;
  a.write_den = p.write_den;
  return a;
}

// The fast path reinterprets every sample of every operand as packs of V, so
// each base pointer must be 16-byte aligned and every per-sample offset
// (batch stride, and inner for the dense outputs) a multiple of V. Operands the
// kernel will not read are null in Args and do not constrain it.
template <typename T>
bool packs_fit(const Args<T>& a, int64_t V) {
  auto fits = [&](const void* ptr, int64_t batch_stride) {
    return reinterpret_cast<std::uintptr_t>(ptr) % kVecBytes == 0 && batch_stride % V == 0;
  };
  if (a.inner % V != 0) return false;
  bool ok = fits(a.x.ptr, a.x.batch_stride) && fits(a.cond.ptr, a.cond.batch_stride) &&
            fits(a.out, a.inner);
  if (a.uncond.ptr) ok = ok && fits(a.uncond.ptr, a.uncond.batch_stride);
  if (a.noise.ptr) ok = ok && fits(a.noise.ptr, a.noise.batch_stride);
  if (a.var.ptr) ok = ok && fits(a.var.ptr, a.var.batch_stride);
  for (const auto& h : a.hist)
    if (h.ptr) ok = ok && fits(h.ptr, h.batch_stride);
  if (a.den) ok = ok && fits(a.den, a.inner);
  return ok;
}

// Attribute queries read values the runtime cached at context creation; they
// neither synchronise nor touch the device.
int64_t resident_blocks(c10::DeviceIndex device) {
  int sms = 0, threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return std::max<int64_t>(1, static_cast<int64_t>(sms) * (threads_per_sm / kThreads));
}

dim3 grid_for(int64_t resident, int64_t batch, int64_t packs) {
  const int64_t grid_y = std::min(batch, kMaxGridY);
  const int64_t wanted_x = std::max<int64_t>(1, (packs + kThreads - 1) / kThreads);
  const int64_t cap_x = std::max<int64_t>(1, (kWaves * resident + grid_y - 1) / grid_y);
  return dim3(static_cast<unsigned>(std::min(wanted_x, cap_x)), static_cast<unsigned>(grid_y));
}

template <typename T, int H>
void launch(const Prepared& p, const c10::cuda::CUDAStream& stream) {
  constexpr int V = kVecBytes / sizeof(T);
  const Args<T> a = make_args<T>(p);
  const int64_t resident = resident_blocks(stream.device_index());
  if (packs_fit(a, V)) {
    guided_step_kernel<T, H, V>
        <<<grid_for(resident, p.batch, p.inner / V), kThreads, 0, stream.stream()>>>(a);
  } else {
    guided_step_kernel<T, H, 1>
        <<<grid_for(resident, p.batch, p.inner), kThreads, 0, stream.stream()>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_history(const Prepared& p, const c10::cuda::CUDAStream& stream) {
  switch (p.hist.size()) {
    case 0: launch<T, 0>(p, stream); break;
    case 1: launch<T, 1>(p, stream); break;
    case 2: launch<T, 2>(p, stream); break;
    case 3: launch<T, 3>(p, stream); break;
    case 4: launch<T, 4>(p, stream); break;
    default: TORCH_CHECK(false, "guided_step: at most ", kMaxHistory, " history tensors");
  }
}

std::tuple<at::Tensor, at::Tensor> guided_step_cuda(
    const at::Tensor& x, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
    const c10::optional<at::Tensor>& guidance_scale, const at::Tensor& coeffs,
    const c10::optional<at::Tensor>& noise, at::TensorList history,
    c10::optional<double> clip_range, bool learned_variance, bool write_denoised) {
  TORCH_CHECK(x.is_cuda(), "guided_step_cuda: x must be a CUDA tensor");
  // Before prepare(): the outputs and any layout copies it makes must be
  // allocated on, and enqueued to the stream of, x's device.
  const c10::cuda::CUDAGuard device_guard(x.device());
  Prepared p = prepare(x, cond, uncond, guidance_scale, coeffs, noise, history, clip_range,
                       learned_variance, write_denoised);
  if (p.inner == 0) return {p.out, p.den};
  // Copies held in p are released when p goes out of scope, while the kernel may
  // still be reading them; the caching allocator only reuses a block for work
  // queued later on this same stream, so that is safe without a sync.
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat: launch_for_history<float>(p, stream); break;
    case at::kHalf: launch_for_history<at::Half>(p, stream); break;
    case at::kBFloat16: launch_for_history<at::BFloat16>(p, stream); break;
    default: TORCH_CHECK(false, "guided_step: unsupported dtype ", x.scalar_type());
  }
  return {p.out, p.den};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("guided_step", &guided_step_cuda); }

}  // namespace guided
}  // namespace fastdiff
