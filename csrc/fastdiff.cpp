// The fastdiff operator library: every schema is declared here, once.
// Kernels register per backend in csrc/<op>/<op>_{cpu.cpp,cuda.cu}.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A plain module object is all Python needs to load this library; the ops
// reach Python through torch.ops.fastdiff once the shared object is loaded.
static PyMethodDef kMethods[] = {{nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
PyObject* PyInit__C(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
#ifdef FASTDIFF_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(m, "with_openmp", 1);
#else
  PyModule_AddIntConstant(m, "with_openmp", 0);
#endif
  return m;
}
}

TORCH_LIBRARY(fastdiff, m) {
  // fastdiff/ops/_schemas.py holds the same strings for builds without this
  // library; tests/test_build.py checks that the two agree.
  m.def(
      "guided_step(Tensor x, Tensor cond, Tensor? uncond, Tensor? guidance_scale, "
      "Tensor coeffs, Tensor? noise, Tensor[] history, float? clip_range, "
      "bool learned_variance, bool write_denoised) -> (Tensor, Tensor)");
  m.def(
      "discrete_step(Tensor x_t, Tensor cond, Tensor? uncond, Tensor? guidance_scale, "
      "Tensor coeffs, Tensor? noise, float truncation_rate, bool write_log_probs) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float? scale) -> Tensor");
  m.def(
      "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "Tensor? scale, Tensor? shift, bool silu) -> Tensor");
}
