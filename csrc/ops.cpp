// Schemas of the pyboundary ops, defined once. Each kernel file registers its implementations
// for its dispatch key (csrc/cpu/*_kernel.cpp: CPU, csrc/cuda/*_kernel.cu: CUDA); fake kernels
// and autograd are registered from Python (pyboundary/ops).
//
// Contract of the block origins (row0, col0 of dct_block_analysis / dct_block_synthesis): every
// block must lie inside the image grid. CPU inputs are checked on the host (ValueError naming
// the argument). CUDA inputs are checked inside the kernels without a device-to-host copy: an
// out-of-range origin triggers a device-side assert (reported at the next synchronisation) and
// is never dereferenced. Callers that build origins (pyboundary.subspaces) validate them where
// they create them.
#include "pyboundary_math.h"

#include <torch/library.h>

#include <tuple>

#ifndef PYBOUNDARY_WITH_CUDA
#define PYBOUNDARY_WITH_CUDA 0
#endif

namespace {
bool cuda_kernels_built() { return PYBOUNDARY_WITH_CUDA != 0; }

// (default eps of deepfool_select, absolute push floor in logit units): the one definition the
// Python side reads (pyboundary.ops); the schema default below is checked against it by a test.
std::tuple<double, double> select_constants() {
  return {pyboundary::math::kSelectDefaultEps, pyboundary::math::kSelectAbsPush};
}
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
  m.def("_select_constants() -> (float, float)", &select_constants);
}
