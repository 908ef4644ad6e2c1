// Schemas of the pyboundary ops, registered once. Implementations: csrc/cpu (CPU dispatch key)
// and csrc/cuda (CUDA dispatch key); fake kernels and autograd: pyboundary/ops.py.
#include <torch/library.h>

#ifndef PYBOUNDARY_WITH_CUDA
#define PYBOUNDARY_WITH_CUDA 0
#endif

namespace {
bool cuda_kernels_built() { return PYBOUNDARY_WITH_CUDA != 0; }
}  // namespace

TORCH_LIBRARY(pyboundary, m) {
  m.def("dct2(Tensor x) -> Tensor");
  m.def("idct2(Tensor x) -> Tensor");
  m.def("dct_block_analysis(Tensor x, Tensor row0, Tensor col0, int kh, int kw) -> Tensor");
  m.def("dct_block_synthesis(Tensor coeffs, Tensor row0, Tensor col0, int H, int W) -> Tensor");
  m.def(
      "deepfool_select(Tensor gap, Tensor grad_gap, float p, float eps=1e-4) "
      "-> (Tensor, Tensor, Tensor)");
  // Build information: whether this library contains the CUDA kernels.
  m.def("_cuda_kernels_built() -> bool", &cuda_kernels_built);
}
