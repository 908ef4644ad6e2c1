// CPU kernels of the pyboundary ops (registered for the CPU dispatch key by the file that
// defines them: dct_kernel.cpp, select_kernel.cpp). Contracts: pyboundary/ops (the twins).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace pyboundary {

at::Tensor dct2_cpu(const at::Tensor& x);
at::Tensor idct2_cpu(const at::Tensor& x);
at::Tensor dct_block_analysis_cpu(const at::Tensor& x, const at::Tensor& row0,
                                  const at::Tensor& col0, int64_t kh, int64_t kw);
at::Tensor dct_block_synthesis_cpu(const at::Tensor& coeffs, const at::Tensor& row0,
                                   const at::Tensor& col0, int64_t H, int64_t W);
std::tuple<at::Tensor, at::Tensor, at::Tensor> deepfool_select_cpu(const at::Tensor& gap,
                                                                   const at::Tensor& grad_gap,
                                                                   double p, double eps);

}  // namespace pyboundary
