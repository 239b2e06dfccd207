// group_norm's argument checks and layout choice, shared by the CPU and CUDA kernels so
// that both reject the same inputs and lay out their output the same way (the Python
// fake function in fastdiff/ops/group_norm.py mirrors output_like()).
//
// Layouts the kernels read directly:
//   channels-first  x.is_contiguous(): [B, C, *spatial], a group (b, g) is one run of
//                   D * S values (D = C / G channels of S = prod(spatial) values);
//   channels-last   [B, *spatial, C] in memory (torch.channels_last for 4-D,
//                   channels_last_3d for 5-D, the same permutation for 3-D): a group is
//                   D neighbouring values in each of S rows of C.
// Anything else (views with gaps, other permutations) is read from a contiguous copy.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace fastdiff {
namespace gn {

struct Prepared {
  at::Tensor x;  // x itself, or its contiguous copy
  bool channels_last = false;
  int64_t batch = 0, channels = 0, groups = 0, spatial = 1;
  // The parameters as given (checked: device, floating dtype, shape), or undefined when
  // not given. Each kernel reads them in their own dtype and strides where it can
  // (group_norm_cpu.cpp: any; group_norm_cuda.cu: float32 or x's dtype, unit channel
  // stride) and converts only what it cannot read, so a U-Net's fp16 parameters cost no
  // cast kernel per call. weight/bias are [C]; scale/shift are [B, C] or [1, C].
  at::Tensor weight, bias, scale, shift;
  float eps = 0.f;
  bool silu = false;
  at::Tensor out;
};

// [0, 2, 3, ..., dim-1, 1]: the order in which a channels-last tensor is stored.
inline std::vector<int64_t> channels_last_order(int64_t dim) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < dim; ++d) order.push_back(d);
  order.push_back(1);
  return order;
}

inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() >= 3 && x.permute(channels_last_order(x.dim())).is_contiguous();
}

// The output: contiguous for a contiguous x, channels-last for a channels-last x, else
// contiguous (the kernel then reads a contiguous copy of x).
inline at::Tensor output_like(const at::Tensor& x) {
  if (x.is_contiguous() || !is_channels_last(x)) return at::empty(x.sizes(), x.options());
  const auto order = channels_last_order(x.dim());
  std::vector<int64_t> stored;
  for (int64_t d : order) stored.push_back(x.size(d));
  std::vector<int64_t> inverse(order.size());
  for (size_t i = 0; i < order.size(); ++i) inverse[order[i]] = static_cast<int64_t>(i);
  return at::empty(stored, x.options()).permute(inverse);
}

inline at::Tensor per_channel(const c10::optional<at::Tensor>& t, const at::Tensor& x,
                              const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), "group_norm: ", name, " is on ", t->device(),
              " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "group_norm: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "group_norm: ", name, " has shape ",
              t->sizes(), ", expected [C] = [", x.size(1), "]");
  return *t;
}

inline at::Tensor per_sample(const c10::optional<at::Tensor>& t, const at::Tensor& x,
                             const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), "group_norm: ", name, " is on ", t->device(),
              " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "group_norm: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(t->dim() == 2 && t->size(1) == C && (t->size(0) == B || t->size(0) == 1),
              "group_norm: ", name, " has shape ", t->sizes(), ", expected [B, C] = [", B, ", ",
              C, "] (or [1, C])");
  return *t;
}

// The distance between the rows of samples b and b + 1 of a per-sample parameter: 0 for
// a [1, C] row shared by every sample (whatever its stride says).
inline int64_t sample_stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : t.stride(0); }

inline Prepared prepare(const at::Tensor& x, int64_t num_groups,
                        const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double eps,
                        const c10::optional<at::Tensor>& scale,
                        const c10::optional<at::Tensor>& shift, bool silu) {
  TORCH_CHECK(x.dim() >= 2, "group_norm: x must have shape [B, C, *spatial], got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "group_norm: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(num_groups > 0, "group_norm: num_groups must be positive, got ", num_groups);
  TORCH_CHECK(x.size(1) % num_groups == 0, "group_norm: ", x.size(1),
              " channels are not divisible into ", num_groups, " groups (x of shape ", x.sizes(),
              ")");
  TORCH_CHECK(eps >= 0, "group_norm: eps must be non-negative, got ", eps);
  Prepared p;
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.groups = num_groups;
  for (int64_t d = 2; d < x.dim(); ++d) p.spatial *= x.size(d);
  p.weight = per_channel(weight, x, "weight");
  p.bias = per_channel(bias, x, "bias");
  p.scale = per_sample(scale, x, "scale");
  p.shift = per_sample(shift, x, "shift");
  p.eps = static_cast<float>(eps);
  p.silu = silu;
  p.out = output_like(x);
  p.channels_last = !x.is_contiguous() && is_channels_last(x);
  p.x = (x.is_contiguous() || p.channels_last) ? x : x.contiguous();
  return p;
}

}  // namespace gn
}  // namespace fastdiff
